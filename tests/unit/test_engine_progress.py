"""The engine never spins: every step makes progress or fails the request that blocks it, and one
request's bad numbers (non-finite logits, a failing verification) fail that request only.

Invariants (tests/helpers/engine_invariants.py) are asserted after every step."""

import pytest
import torch

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import FinishReason, SamplingParams
from specserve.workers.engine.step_planner import PlannerConfig
from specserve.workers.spec.methods import SpecConfig
from specserve.workers.spec.tree_size import LatencyCurve

from tests.helpers.engine_invariants import checked_step
from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

CONTEXT = 64  # the pool keeps its minimum, one context: 16 blocks of 4 slots, so sequences get preempted
# A verify forward that costs little more with more slots: the latency model keeps big trees.
FLAT_CURVE = LatencyCurve((1, 8, 32, 80), (1e-3, 1.05e-3, 1.2e-3, 1.5e-3))
METHODS = ("none", "ngram", "recycling", "model", "ngram+recycling")
TEMPERATURES = (0.0, 1.4e-45, 1e-40, 1e-6, 0.7, 1.3, 100.0, 3.4e38)
TOP_P = (1.0, 1e-9, 0.5, 0.999)
TOP_K = (0, 1, 2, 96, 97, 1000)
MAX_DRAFT = (None, 0, 1, 2, 79, 80, 1000)
STOPS = ((), ("w5",), ("w9 w9", "w3"))


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3, max_position_embeddings=CONTEXT))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_engine(model, tok, method="none", **planner) -> LLMEngine:
    spec = SpecConfig(method, 0, draft_model="self" if "model" in method else None)
    config = EngineConfig(block_size=4, kv_cache_bytes=1, spec=spec, planner=PlannerConfig(max_num_seqs=8, **planner))
    return LLMEngine(model, tok, config, eos_token_ids=[0], latency_curve=FLAT_CURVE,
                     draft_model=model if "model" in method else None)


def edge_requests(n: int) -> list[tuple[list[int], SamplingParams, str]]:
    """n requests, each field cycling through its edge values (prompts repeat: ngram finds matches)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(2, 12, (3 + 5 * (i % 4),), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=(1, 2, 9, 30)[i % 4], temperature=TEMPERATURES[i % len(TEMPERATURES)],
                                top_p=TOP_P[i % len(TOP_P)], top_k=TOP_K[i % len(TOP_K)], seed=i,
                                stop=STOPS[i % len(STOPS)], ignore_eos=i % 2 == 0,
                                max_draft_tokens=MAX_DRAFT[i % len(MAX_DRAFT)])
        out.append((prompt, params, ("", "tenant-a")[i % 2]))
    return out


def run_checked(engine: LLMEngine, max_steps: int = 2000) -> int:
    steps = 0
    while engine.has_unfinished():
        checked_step(engine)
        steps += 1
        assert steps < max_steps, "the engine did not finish"
    return steps


@pytest.mark.parametrize("method", METHODS)
def test_a_burst_of_edge_fields_finishes_every_request_with_every_step_progressing(model, tok, method):
    engine = make_engine(model, tok, method)
    seqs = [engine.add_request(p, params, cache_salt=salt) for p, params, salt in edge_requests(24)]
    run_checked(engine)
    assert {s.finish_reason for s in seqs} <= {FinishReason.STOP, FinishReason.LENGTH}
    assert all(s.output_ids for s in seqs)
    assert engine.kv.allocator.num_free == engine.kv.config.num_blocks
    if method != "none":
        assert sum(s.spec.spec_steps for s in seqs) > 0  # the drafter really ran


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-40, 1e-30])
def test_a_tiny_temperature_samples_the_argmax(model, tok, temperature):
    engine = make_engine(model, tok)
    prompt = [5, 6, 7, 8]
    greedy = engine.add_request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    tiny = engine.add_request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=temperature))
    run_checked(engine)
    assert tiny.output_ids == greedy.output_ids and len(tiny.output_ids) == 12


def nan_rows_for(model, token: int):
    """model.forward whose logits rows are NaN where the input token is `token`."""
    forward = model.forward

    def poisoned(batch, kv):
        logits = forward(batch, kv)  # (L, V)
        hit = batch.token_ids[batch.logits_index] == token  # (L,)
        return logits.masked_fill(hit[:, None], float("nan"))

    return poisoned


@pytest.mark.parametrize("method", ["none", "ngram+recycling"])
def test_non_finite_logits_fail_that_request_only(model, tok, method, monkeypatch):
    engine = make_engine(model, tok, method)
    monkeypatch.setattr(engine.model, "forward", nan_rows_for(model, 90))
    ok = [engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=8, temperature=t, seed=1, ignore_eos=True))
          for t in (0.0, 0.8)]
    bad = engine.add_request([5, 6, 90], SamplingParams(max_new_tokens=8, temperature=0.8, seed=1))
    outputs = []
    while engine.has_unfinished():
        outputs += checked_step(engine)
    failed = [o for o in outputs if o.error is not None]
    assert [o.request_id for o in failed] == [bad.request_id]
    assert "NaN or inf" in failed[0].error and failed[0].finish_reason is FinishReason.ABORT
    assert [len(s.output_ids) for s in ok] == [8, 8]
    assert engine.kv.allocator.num_free == engine.kv.config.num_blocks


def test_an_error_verifying_one_tree_fails_that_request_only(model, tok, monkeypatch):
    engine = make_engine(model, tok, "ngram")
    verify = engine.speculator.verify_and_commit

    def verify_or_fail(seq, tree, logits):
        if seq.params.seed == 13:
            raise RuntimeError("broken verifier")
        return verify(seq, tree, logits)

    monkeypatch.setattr(engine.speculator, "verify_and_commit", verify_or_fail)
    repeat = [5, 6, 7, 5, 6, 7, 5, 6]  # ngram drafts on it from the first decode step
    bad = engine.add_request(repeat, SamplingParams(max_new_tokens=10, temperature=0.8, seed=13))
    ok = engine.add_request(repeat, SamplingParams(max_new_tokens=10, temperature=0.8, seed=14, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs += checked_step(engine)
    assert [(o.request_id, o.error) for o in outputs if o.error] == [
        (bad.request_id, "internal error: RuntimeError: broken verifier")]
    assert len(ok.output_ids) == 10 and ok.spec.spec_steps > 0


def test_a_sequence_left_with_nothing_to_compute_is_failed_and_the_rest_go_on(model, tok):
    # The state a half-done step used to leave behind (issue 17: plan() then returned nothing forever).
    engine = make_engine(model, tok)
    stuck = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=5))
    other = engine.add_request([8, 9], SamplingParams(max_new_tokens=5, ignore_eos=True))
    checked_step(engine)
    engine.kv.append(stuck.table, 1)  # its newest token got K/V but no next token
    outputs = engine.step()
    failed = [o for o in outputs if o.error]
    assert [o.request_id for o in failed] == [stuck.request_id]
    assert failed[0].error.startswith("internal error: the step planner cannot schedule it: no token left to compute")
    run_checked(engine)
    assert len(other.output_ids) == 5
    assert engine.kv.allocator.num_free == engine.kv.config.num_blocks


def test_a_bad_prompt_token_is_refused_before_it_reaches_a_step(model, tok):
    engine = make_engine(model, tok)
    with pytest.raises(ValueError, match=r"prompt token 1 is 97, not in the vocabulary \[0, 97\)"):
        engine.add_request([5, 97], SamplingParams())
    assert not engine.has_unfinished()


def test_a_drafter_that_raises_costs_the_step_its_drafts_not_a_request(model, tok, monkeypatch):
    engine = make_engine(model, tok, "ngram")
    propose, calls = engine.speculator.propose, []

    def propose_failing_once(seqs, other_slots=0):
        calls.append(len(seqs))
        if len(calls) == 1:
            raise RuntimeError("drafter down")
        return propose(seqs, other_slots)

    monkeypatch.setattr(engine.speculator, "propose", propose_failing_once)
    seqs = [engine.add_request([5, 6, 7, 5, 6, 7, 5], SamplingParams(max_new_tokens=6, temperature=t, seed=2,
                                                                     ignore_eos=True)) for t in (0.0, 0.9)]
    run_checked(engine)
    assert len(calls) > 1 and [len(s.output_ids) for s in seqs] == [6, 6]
    assert {s.finish_reason for s in seqs} == {FinishReason.LENGTH}
