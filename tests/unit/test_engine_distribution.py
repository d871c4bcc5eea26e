"""Sampling through the whole engine has the target's distribution, for every speculation method.

A tiny random target (vocabulary of 12, temperature 1.3) continues one repetitive prompt, so
prompt lookup and the other drafters propose on every step. The exact distribution of the first
three sampled tokens comes from the target's logits (transformers, not our engine); the engine
samples N sequences with seeds 0..N-1 and the counts are compared by a chi-square test:

    cells: every 3-token outcome expected >= 5 times; the rest pooled into one cell
    statistic: sum (observed - expected)^2 / expected, with (cells - 1) degrees of freedom
    fails when p-value < ALPHA = 1e-3: a correct engine fails one method in 1000 (seeds fixed,
    so a given run always gives the same answer)

Token 1 is the prefill's plain sample; tokens 2 and 3 come from verification (the tree is cut
to depth 2 as the request has max_new_tokens 4), so a bonus token and acceptance one level down
are both tested. A verifier that accepts every first draft fails the same test, and every
method must have proposed and accepted drafts, or the test would prove nothing.

N is 2000 per method here; SPECSERVE_DIST_SAMPLES raises it (20000 for the full bench size).
Speculation runs on every step: max_draft_tokens is fixed, so there is no latency curve and no
speculation gate (Speculator.gate is None). That any tree, however pruned, emits the plain
sampler's tokens is checked token for token in test_verify.py and test_spec_engine.py. One torch thread: the model is tiny, and on a
shared 2-core machine more threads made each forward ~10x slower.
"""

import os
from collections import Counter

import pytest
import torch

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.engine.step_planner import PlannerConfig
from specserve.workers.spec import speculator as speculator_module
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.chi_square import chi_square_p_value
from tests.helpers.sampling_distribution import (DRAFT_SEED, DRAFT_SHAPE, PROMPT, SHAPE, TARGET_SEED, V,
                                                 accept_first_drafts, exact_first_tokens)
from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

PARAMS = dict(temperature=1.3, max_new_tokens=4)  # 4: the first tree may be 2 deep; 3 tokens compared
SAMPLES = int(os.environ.get("SPECSERVE_DIST_SAMPLES", "2000"))
CHUNK = 250  # requests per batch; later batches find the drafters warm (recycling's matrix, suffix trees)
ALPHA = 1e-3
MODEL_SHAPE = dict(**SHAPE, max_position_embeddings=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_target():
    return tiny_hf("llama", seed=TARGET_SEED, **MODEL_SHAPE)


@pytest.fixture(scope="module")
def target(hf_target):
    return ours_from_hf(hf_target)


@pytest.fixture(scope="module")
def draft():
    """Another model with the same vocabulary: other weights, one layer."""
    return ours_from_hf(tiny_hf("llama", seed=DRAFT_SEED, **DRAFT_SHAPE, **MODEL_SHAPE))


@pytest.fixture(scope="module")
def expected(hf_target) -> dict[tuple[int, int, int], float]:
    """Exact probability of every first three tokens, from the target's logits."""
    return exact_first_tokens(hf_target, PROMPT, SamplingParams(**PARAMS), 3)


def sample(target, draft, spec: SpecConfig):
    """First three tokens of SAMPLES seeded requests, and the summed speculation counters."""
    config = EngineConfig(block_size=4, kv_cache_bytes=8 << 20, spec=spec,
                          planner=PlannerConfig(max_num_seqs=CHUNK, max_num_batched_tokens=CHUNK * len(PROMPT)))
    engine = LLMEngine(target, tiny_tokenizer(V), config, draft_model=draft if "model" in spec.method else None)
    assert engine.speculator is None or engine.speculator.gate is None  # speculates on every step
    counts, drafted, accepted = Counter(), 0, 0
    for start in range(0, SAMPLES, CHUNK):
        seqs = [engine.add_request(PROMPT, SamplingParams(**PARAMS, seed=s))
                for s in range(start, min(start + CHUNK, SAMPLES))]
        while engine.has_unfinished():
            engine.step()
        counts.update(tuple(s.output_ids[:3]) for s in seqs)
        drafted += sum(s.spec.drafted_tokens for s in seqs)
        accepted += sum(s.spec.accepted_tokens for s in seqs)
    return counts, drafted, accepted


METHODS = ["none", "ngram", "recycling", "suffix", "auto", "model", "model+ngram", "ngram+recycling"]


@pytest.mark.parametrize("method", METHODS)
def test_first_tokens_follow_the_target(method, target, draft, expected):
    spec = SpecConfig(method, 6 if method != "none" else 0, draft_model="tiny-draft" if "model" in method else None)
    counts, drafted, accepted = sample(target, draft, spec)
    if method != "none":
        assert drafted > SAMPLES and accepted > SAMPLES // 10, (drafted, accepted)
    p_value = chi_square_p_value(counts, expected, SAMPLES)
    print(f"{method}: N = {SAMPLES}, p = {p_value:.3g}, drafted {drafted}, accepted {accepted}")  # pytest -s
    assert p_value >= ALPHA


@pytest.mark.parametrize("method", ["ngram", "model"])
def test_a_broken_verifier_fails(method, target, draft, expected, monkeypatch):
    monkeypatch.setattr(speculator_module, "verify_sampling", accept_first_drafts)
    spec = SpecConfig(method, 6, draft_model="tiny-draft" if method == "model" else None)
    counts, _, _ = sample(target, draft, spec)
    p_value = chi_square_p_value(counts, expected, SAMPLES)
    print(f"broken verifier, {method}: N = {SAMPLES}, p = {p_value:.3g}")  # pytest -s
    assert p_value < ALPHA
