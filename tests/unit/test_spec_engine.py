"""Speculation inside the engine on tiny models: same tokens as without it, stops honoured."""

import pytest
import torch

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import FinishReason, SamplingParams
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

PROMPTS = [[5, 7, 9, 11, 3, 5, 7, 9, 11, 3, 5, 7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [40, 41, 42], [8] * 9]


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def run(model, spec: SpecConfig, params=SamplingParams(max_new_tokens=24), eos=(), draft=None):
    engine = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=spec),
                       eos_token_ids=eos, draft_model=draft)
    seqs = [engine.add_request(p, params) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.allocator.num_free == engine.kv.config.num_blocks  # every block given back
    return seqs


@pytest.mark.parametrize("method", ["ngram", "recycling", "ngram+recycling", "model", "model+ngram"])
@pytest.mark.parametrize("max_draft", [0, 4, 16])
def test_greedy_output_is_unchanged(model, method, max_draft):
    reference = [s.output_ids for s in run(model, SpecConfig("none"))]
    draft = model if "model" in method else None
    spec = SpecConfig(method, max_draft, draft_model="self" if draft else None)
    assert [s.output_ids for s in run(model, spec, draft=draft)] == reference


def test_self_drafting_accepts_and_saves_steps(model):
    seqs = run(model, SpecConfig("model", 8, draft_model="self"), draft=model)
    assert all(s.spec.accepted_tokens > 0 and s.spec.decode_steps < len(s.output_ids) for s in seqs)


def test_seeded_sampling_with_speculation_is_reproducible(model):
    params = SamplingParams(max_new_tokens=24, temperature=0.9, seed=11)
    spec = SpecConfig("model+ngram", 8, draft_model="self")
    a = [s.output_ids for s in run(model, spec, params, draft=model)]
    b = [s.output_ids for s in run(model, spec, params, draft=model)]
    assert a == b


def test_multi_token_steps_respect_max_new_tokens_and_eos(model):
    spec = SpecConfig("model", 8, draft_model="self")
    reference = run(model, SpecConfig("none"), SamplingParams(max_new_tokens=30))
    for n in (1, 5, 13):
        seqs = run(model, spec, SamplingParams(max_new_tokens=n), draft=model)
        assert [s.output_ids for s in seqs] == [r.output_ids[:n] for r in reference]
    eos = reference[0].output_ids[6]  # a token the first prompt emits at step 7
    seqs = run(model, spec, SamplingParams(max_new_tokens=30), eos=[eos], draft=model)
    first = seqs[0].output_ids
    assert first[-1] == eos and eos not in first[:-1] and seqs[0].finish_reason is FinishReason.STOP


def test_fixed_max_draft_tokens_ignores_a_latency_curve(model):
    """A fixed max_draft_tokens means fixed trees: a cached curve that says every extra slot
    costs 10x (one measured on a contended machine) must not prune them to nothing."""
    from specserve.workers.spec.tree_size import LatencyCurve

    steep = LatencyCurve((1, 2, 16), (0.001, 0.01, 0.011))
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=SpecConfig("model", 8, draft_model="self"))
    engine = LLMEngine(model, tiny_tokenizer(), config, eos_token_ids=(), draft_model=model, latency_curve=steep)
    assert engine.speculator.curve is None and engine.speculator.gate is None
    seq = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=24))
    while engine.has_unfinished():
        engine.step()
    assert seq.spec.drafted_tokens > 0 and seq.spec.accepted_tokens > 0


def test_measured_latency_curve_never_falls_as_slots_grow(model):
    from specserve.workers.spec.latency_profile import measure_latency_curve

    engine = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20), eos_token_ids=())
    curve = measure_latency_curve(model, engine.kv, max_slots=16, context_len=8, repeats=2, progress=False)
    assert curve.slots == (1, 2, 4, 8, 16)
    assert list(curve.seconds) == sorted(curve.seconds) and curve.seconds[0] > 0
    assert engine.kv.allocator.num_free == engine.kv.config.num_blocks


@pytest.fixture(scope="module")
def bf16_model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3), dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["ngram", "suffix", "recycling", "model"])
def test_bf16_speculation_is_token_identical_to_bf16_without(bf16_model, method):
    """--dtype bfloat16 on CPU: a draft tree's rows go through the same kernels as one decode
    row, so speculation may not change a bf16 greedy output either."""
    reference = [s.output_ids for s in run(bf16_model, SpecConfig("none"))]
    draft = bf16_model if method == "model" else None
    seqs = run(bf16_model, SpecConfig(method, 8, draft_model="self" if draft else None), draft=draft)
    assert [s.output_ids for s in seqs] == reference
    assert sum(s.spec.drafted_tokens for s in seqs) > 0


@pytest.mark.parametrize("method", ["ngram", "recycling", "ngram+recycling", "model", "model+ngram"])
@pytest.mark.parametrize("max_draft", [2, 16])
def test_seeded_sampling_samples_the_same_tokens_with_every_method(model, method, max_draft):
    """Sampling is exact in the strongest sense: token for token what no speculation samples
    with the same seed (each position's token is decided by the target and that position's
    noise alone; verify.py)."""
    params = SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.95, seed=5)
    reference = [s.output_ids for s in run(model, SpecConfig("none"), params)]
    draft = model if "model" in method else None
    spec = SpecConfig(method, max_draft, draft_model="self" if draft else None)
    seqs = run(model, spec, params, draft=draft)
    assert [s.output_ids for s in seqs] == reference
    if method == "model":  # self-drafting guesses its own draws: nearly every draft token is taken
        assert sum(s.spec.accepted_tokens for s in seqs) > 0.8 * sum(s.spec.drafted_tokens for s in seqs) / max_draft
