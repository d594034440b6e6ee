"""Sampling on the last stage: greedy, temperature, top-k, top-p.

Each draw is seeded by (request seed, output index) alone, so a request's sampled tokens are the
same whatever batch, worker or replay produced them.
"""
from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1
# in StepDone, the token of a request whose sampling raised: that request fails alone, not the step
SAMPLING_FAILED = -1


def draw_seed(seed: int, output_index: int) -> int:
    return ((seed * 6364136223846793005) ^ ((output_index + 1) * _MIX)) & _MASK


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int,
               output_index: int) -> int:
    """logits: [V] float32 -> one token id.

    In float64 and shifted so that the largest logit is 0 before dividing by the temperature:
    however small the temperature (1e-300 is a valid one), every logit then ends in [-inf, 0],
    the best one at exactly 0, and the softmax never sees inf - inf. Logits that are NaN never
    win; when no finite one is left, the choice is the greedy one."""
    if temperature <= 0.0 or top_k == 1:
        return int(torch.argmax(logits))
    logits = torch.nan_to_num(logits.to(torch.float64), nan=float("-inf"))
    best = logits.max()
    if not torch.isfinite(best):
        return int(torch.argmax(logits))  # +inf logits, or none but -inf: nothing to sample from
    logits = (logits - best) / temperature
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator(device=logits.device).manual_seed(draw_seed(seed, output_index))
    return int(torch.multinomial(probs, 1, generator=gen))
