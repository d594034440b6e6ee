"""Sampling on the last stage: any temperature the API accepts gives a token, never an error."""
from __future__ import annotations

import pytest
import torch

from kevlard.gpu.sampler import sample_row


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-8, 1e-3])
def test_a_tiny_temperature_samples_the_greedy_token(temperature):
    """1e-300 is a valid temperature; dividing float32 logits by it gave inf, then NaN
    probabilities, and every step of the batch failed on the worker."""
    logits = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 5
    for seed in range(5):
        assert sample_row(logits, temperature, 1.0, 0, seed, 0) == int(torch.argmax(logits))


def test_logits_that_are_nan_or_infinite_never_raise():
    logits = torch.tensor([0.5, float("nan"), 2.0, -1.0])
    picks = {sample_row(logits, 1.0, 1.0, 0, seed, 0) for seed in range(50)}
    assert picks <= {0, 2, 3} and 2 in picks  # NaN is never drawn
    assert sample_row(torch.tensor([1.0, float("inf"), 3.0]), 0.7, 0.9, 0, 1, 0) == 1
    assert sample_row(torch.full((3,), float("nan")), 0.7, 1.0, 0, 1, 0) in (0, 1, 2)
    assert sample_row(torch.full((3,), float("-inf")), 0.7, 1.0, 2, 1, 0) in (0, 1, 2)


def test_sampling_is_reproducible_from_the_seed_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    draws = [sample_row(logits, 1.0, 1.0, 0, seed, 3) for seed in range(2000)]
    assert draws == [sample_row(logits, 1.0, 1.0, 0, seed, 3) for seed in range(2000)]
    share = [draws.count(t) / len(draws) for t in range(3)]
    assert share[0] == pytest.approx(0.7, abs=0.05) and share[2] == pytest.approx(0.1, abs=0.03)
    # top_p 0.75 keeps the two likeliest; top_k 1 is greedy
    assert {sample_row(logits, 1.0, 0.75, 0, seed, 0) for seed in range(200)} == {0, 1}
    assert {sample_row(logits, 1.0, 1.0, 1, seed, 0) for seed in range(50)} == {0}


def test_seeds_that_differ_only_in_their_high_bits_sample_differently():
    """torch's CPU generator reads the low 32 bits of a seed: seeds 1 and 1 + 2**32 (and s and
    s - 2**63, both valid API seeds) sampled the same tokens."""
    logits = torch.zeros(1000)  # uniform: two independent draws agree one time in a thousand
    for base in (1, 12345, -7):
        for other in (base + 2 ** 32, base + 2 ** 40, base - 2 ** 63 if base > 0 else base + 2 ** 63):
            a = [sample_row(logits, 1.0, 1.0, 0, base, i) for i in range(8)]
            b = [sample_row(logits, 1.0, 1.0, 0, other, i) for i in range(8)]
            assert a != b, (base, other)
