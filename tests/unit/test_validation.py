"""Request validation at the edges of the sampling fields (scheduler/server/validation.py's rules)."""

import pytest

from specserve.scheduler.client import build_request
from specserve.scheduler.server.validation import InvalidRequest, ServedModel, validate

from tests.helpers.tiny_models import tiny_tokenizer

MODEL = ServedModel(name="tiny", tokenizer=tiny_tokenizer(), context_length=128, vocab_size=97, spec_method="ngram",
                    known_spec_methods=("none", "ngram", "recycling", "model"), max_draft_tokens=8)
NAN, INF = float("nan"), float("inf")


def params(**kwargs):
    return validate(build_request("w5 w6", **kwargs), MODEL).params


@pytest.mark.parametrize("temperature", [NAN, INF, -INF, -0.5, -1.4e-45])
def test_a_non_finite_or_negative_temperature_is_invalid_naming_the_limit(temperature):
    with pytest.raises(InvalidRequest, match=r"^temperature: must be a finite number >= 0, got"):
        params(temperature=temperature)


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-40, 1e-6, 1e-5])
def test_a_temperature_at_or_below_the_floor_is_served_greedy(temperature):
    assert params(temperature=temperature, seed=3).greedy


@pytest.mark.parametrize("temperature", [2e-5, 0.7, 3.4e38])
def test_a_temperature_above_the_floor_is_sampled_as_given(temperature):
    p = params(temperature=temperature)
    assert not p.greedy and p.temperature == pytest.approx(temperature, rel=1e-6)  # float32 on the wire


@pytest.mark.parametrize("top_p", [NAN, 0.0, -0.1, 1.5, INF])
def test_top_p_outside_zero_one_is_invalid(top_p):
    with pytest.raises(InvalidRequest, match=r"^top_p: must be in \(0, 1\], got"):
        params(temperature=0.7, top_p=top_p)


def test_edges_that_are_valid_reach_the_engine_unchanged():
    p = params(temperature=0.7, top_p=1e-9, top_k=2**32 - 1, seed=2**64 - 1)
    assert (p.top_k, p.seed) == (2**32 - 1, 2**64 - 1) and p.top_p == pytest.approx(1e-9)


def test_a_draft_budget_above_the_servers_names_the_limit():
    with pytest.raises(InvalidRequest, match=r"^spec.max_draft_tokens: at most 8, got 1000"):
        params(max_draft_tokens=1000)
