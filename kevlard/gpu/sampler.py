"""Sampling on the last stage: greedy, temperature, top-k, top-p.

Each draw is a uniform number made from (request seed, output index) alone, so a request's sampled tokens are the
same whatever batch, worker or replay produced them.
"""
from __future__ import annotations

import torch

_M64 = (1 << 64) - 1
# in StepDone, the token of a request whose sampling raised: that request fails alone, not the step
SAMPLING_FAILED = -1


def _splitmix64(x: int) -> int:
    """A bijection of 64-bit integers that mixes every input bit into every output bit."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def draw_uniform(seed: int, output_index: int) -> float:
    """The uniform number in [0, 1) of a request's `output_index`-th draw, from all 64 bits of its
    seed. Not torch's generator: a CPU one is seeded from the low 32 bits of its seed only, so
    seeds 1 and 1 + 2**32 sampled the same text."""
    h = _splitmix64(_splitmix64(seed & _M64) ^ output_index)
    return (h >> 11) / float(1 << 53)


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
    # inverse CDF: the first token whose cumulative probability exceeds the draw (a token of
    # probability 0 adds nothing to the sum, so it is never the one)
    cdf = torch.cumsum(probs, dim=-1)
    target = torch.tensor([draw_uniform(seed, output_index)], dtype=torch.float64, device=cdf.device) * cdf[-1]
    token = int(torch.searchsorted(cdf, target, right=True))
    if token >= cdf.shape[0]:  # the draw rounded up to the total: the last token that can be drawn
        token = int(torch.nonzero(probs > 0)[-1])
    return token
