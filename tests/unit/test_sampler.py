"""Sampler: greedy, temperature / top-k / top-p distributions, seeding, and SamplingParams checks."""

import pytest
import torch

from specserve.workers.engine.sampler import sample_tokens, target_probs, usable_rows
from specserve.workers.engine.sequence import SamplingParams, Sequence

# Empirical frequencies of N seeded draws vs. the target distribution: the largest standard
# error is sqrt(0.25 / 20000) ~= 0.0035, so 0.015 is over 4 standard errors.
NUM_DRAWS = 20000
MAX_FREQ_DIFF = 0.015


def sampled(temperature=1.0, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, **kw)


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 4.0], [-3.0, -2.0, -1.0, -4.0]])
    greedy = SamplingParams()
    assert greedy.greedy
    assert sample_tokens(logits, [greedy] * 3, [None] * 3) == [1, 0, 2]


def test_greedy_has_no_sampling_distribution():
    with pytest.raises(ValueError, match="greedy"):
        target_probs(torch.zeros(4), SamplingParams())


def test_mixed_batch_samples_only_the_sampling_rows():
    # Row 1 puts all mass on token 3 (the others at -inf), so its draw is certain.
    logits = torch.tensor([[0.0, 9.0, 0.0, 0.0], [float("-inf"), float("-inf"), float("-inf"), 0.0]])
    assert sample_tokens(logits, [SamplingParams(), sampled()], [None, torch.rand(4) + 0.1]) == [1, 3]


def test_temperature_one_is_plain_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    torch.testing.assert_close(target_probs(logits, sampled(1.0)), torch.softmax(logits, -1))


def test_temperature_scales_the_logits():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    cold, hot = target_probs(logits, sampled(0.5)), target_probs(logits, sampled(2.0))
    torch.testing.assert_close(cold, torch.softmax(logits * 2, -1))
    torch.testing.assert_close(hot, torch.softmax(logits / 2, -1))
    assert cold[1] > torch.softmax(logits, -1)[1] > hot[1]  # colder: the top token gains mass


def test_top_k_keeps_only_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    probs = target_probs(logits, sampled(top_k=2))
    assert (probs > 0).tolist() == [False, True, False, True, False]
    torch.testing.assert_close(probs[[1, 3]], torch.softmax(torch.tensor([5.0, 4.0]), -1))
    # top_k >= vocabulary size, or 0, keeps everything
    torch.testing.assert_close(target_probs(logits, sampled(top_k=5)), torch.softmax(logits, -1))
    torch.testing.assert_close(target_probs(logits, sampled(top_k=0)), torch.softmax(logits, -1))


def test_top_k_applies_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0], [9.0, 0.0, 8.0]])
    probs = target_probs(logits, sampled(top_k=1))
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # sorted probs      0.5   0.3   0.15  0.05
    # mass before       0.0   0.5   0.8   0.95
    # top_p = 0.8 keeps the tokens whose mass-before is < 0.8: the first two (0.5 + 0.3 = 0.8)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = target_probs(probs.log(), sampled(top_p=0.8))
    torch.testing.assert_close(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert target_probs(probs.log(), sampled(top_p=0.5)).tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(target_probs(probs.log(), sampled(top_p=0.9)),
                               torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_top_p_on_unsorted_vocabulary():
    probs = torch.tensor([0.15, 0.05, 0.5, 0.3])  # same mass, shuffled ids
    kept = target_probs(probs.log(), sampled(top_p=0.8))
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.0, 0.625, 0.375]))


def test_top_p_tiny_keeps_the_single_most_likely_token():
    probs = torch.tensor([0.2, 0.4, 0.4 - 1e-3, 1e-3])
    assert target_probs(probs.log(), sampled(top_p=1e-6)).tolist() == [0.0, 1.0, 0.0, 0.0]


def draws(seed: int, n: int = 50) -> list[int]:
    """The tokens a request with this seed samples at positions 3 .. 3 + n (uniform over 16)."""
    seq = Sequence([1, 2, 3], sampled(seed=seed))
    logits = torch.zeros(1, 16)
    return [sample_tokens(logits, [seq.params], [seq.noise(3 + i, 16)])[0] for i in range(n)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    first, again, other = draws(123), draws(123), draws(124)
    assert first == again
    assert first != other
    assert len(set(first)) > 5  # the draws are actually random


def test_unseeded_request_leaves_the_global_rng_alone():
    # A request without a seed gets fresh entropy for its own noise; torch's global RNG
    # (which model init, data shuffling, other tests rely on) must not be drawn from by it.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    Sequence([1], sampled()).noise(1, 16)
    assert torch.equal(torch.rand(3), expected)


def test_sampled_tokens_follow_the_target_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -3.0])
    params = sampled(temperature=0.8, top_k=4, top_p=0.95)
    target = target_probs(logits, params)
    assert target[4] == 0  # cut by top_k
    noise = torch.empty(NUM_DRAWS, 5).exponential_(generator=torch.Generator().manual_seed(2024))
    tokens = sample_tokens(logits.expand(NUM_DRAWS, -1), [params] * NUM_DRAWS, list(noise))
    freq = torch.bincount(torch.tensor(tokens), minlength=5).float() / NUM_DRAWS
    assert freq[4] == 0
    assert (freq - target).abs().max().item() < MAX_FREQ_DIFF


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"max_new_tokens": -3}, "max_new_tokens must be >= 1, got -3"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\], got nan"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -1}, "top_k must be >= 0, got -1"),
        ({"stop": ("ok", "")}, "stop strings must not be empty"),
    ],
)
def test_sampling_params_validation_names_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-40, 1e-30])
def test_a_tiny_temperature_is_the_argmax_not_nan(temperature):
    # Plain logits / T overflows to inf and softmax(inf) is NaN (issue 17: torch.multinomial raised
    # and failed every request in the step); the shifted form puts all the mass on the argmax.
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.999], [1.0, 1.0, 0.0, -2.0]])
    probs = target_probs(logits, sampled(temperature))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]))  # ties share it
    assert sample_tokens(logits, [sampled(temperature)] * 2, [torch.rand(logits.shape[-1]) + 0.1] * 2)[0] == 1


def test_a_temperature_that_rounds_to_zero_in_float32_is_the_argmax_too():
    probs = target_probs(torch.tensor([0.0, 2.0, 1.0]), sampled(1e-50))  # float32(1e-50) == 0
    torch.testing.assert_close(probs, torch.tensor([0.0, 1.0, 0.0]))


def test_the_largest_finite_temperature_is_uniform_over_what_top_k_keeps():
    logits = torch.tensor([5.0, -3.0, 1.0, 0.0])
    torch.testing.assert_close(target_probs(logits, sampled(3.4e38)), torch.full((4,), 0.25))
    torch.testing.assert_close(target_probs(logits, sampled(3.4e38, top_k=2)), torch.tensor([0.5, 0.0, 0.5, 0.0]))


def test_usable_rows_reject_nan_and_positive_inf_but_not_masked_tokens():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.0, 1.0], [-inf, 1.0], [nan, 1.0], [inf, 1.0], [-inf, -inf]])
    assert usable_rows(logits).tolist() == [True, True, False, False, False]
