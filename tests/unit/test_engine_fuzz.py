"""Property-based: random request mixes against an EngineLoop over a tiny model with a tiny KV pool.

Each example draws a speculation method and a burst of requests — valid and hostile fields,
prompts with tokens outside the vocabulary or longer than the context, duplicate request ids,
cancels right away or after the first output — submitted while the loop runs. After each one:
every admitted request ended exactly once (its last output), nothing runs or waits, every KV
block is free, the loop's counters add up to what the callers saw, and every step kept the
engine's invariants (tests/helpers/engine_invariants.py)."""

import threading
import time
from dataclasses import dataclass, field

from hypothesis import given, strategies as st

import pytest

from specserve.workers.engine.engine_loop import EngineLoop, QueueFullError
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from specserve.workers.engine.sequence import FinishReason, SamplingParams
from specserve.workers.engine.step_planner import PlannerConfig
from specserve.workers.spec.methods import SpecConfig
from specserve.workers.spec.tree_size import LatencyCurve

from tests.helpers.engine_invariants import check_every_step
from tests.helpers.fuzz import MAX_DRAFT, STOPS, TEMPERATURES, TOP_K, TOP_P, fuzz_settings
from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

CONTEXT = 64  # the pool keeps its minimum, one context: 16 blocks of 4 slots (preemption under load)
VOCAB = 97
METHODS = ("none", "ngram", "recycling", "model", "ngram+recycling")
FLAT_CURVE = LatencyCurve((1, 8, 32, 80), (1e-3, 1.05e-3, 1.2e-3, 1.5e-3))
END_S = 60.0  # generous: every request of an example must have ended by then

MODEL = ours_from_hf(tiny_hf("llama", initializer_range=0.3, max_position_embeddings=CONTEXT))
TOKENIZER = tiny_tokenizer()


@dataclass(frozen=True)
class FuzzRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    salt: str
    cancel: str  # "no", "now" (right after submit) or "first" (after its first output)


@dataclass
class Seen:
    """What one request's caller received."""

    items: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def receive(self, item) -> None:
        self.items.append(item)
        if isinstance(item, Exception) or item.finished:
            self.done.set()


prompts = st.one_of(
    st.lists(st.integers(2, 20), min_size=1, max_size=24),  # small alphabet: ngram finds matches
    st.lists(st.integers(0, VOCAB + 5), min_size=1, max_size=8),  # may hold ids outside the vocabulary
    st.just([5] * CONTEXT),  # no room for a new token
)
params = st.builds(
    SamplingParams,
    max_new_tokens=st.integers(1, 24),
    temperature=st.sampled_from(TEMPERATURES),
    top_p=st.sampled_from(TOP_P),
    top_k=st.sampled_from(TOP_K),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.sampled_from(STOPS),
    ignore_eos=st.booleans(),
    max_draft_tokens=st.one_of(st.none(), st.sampled_from(MAX_DRAFT)),
)
requests = st.builds(FuzzRequest, request_id=st.sampled_from([f"r{i}" for i in range(8)]), prompt=prompts,
                     params=params, salt=st.sampled_from(["", "tenant-a"]),
                     cancel=st.sampled_from(["no", "no", "no", "now", "first"]))


def make_loop(method: str, max_num_seqs: int, max_queued: int) -> EngineLoop:
    spec = SpecConfig(method, 0, draft_model="self" if "model" in method else None)
    config = EngineConfig(block_size=4, kv_cache_bytes=1, spec=spec, planner=PlannerConfig(max_num_seqs=max_num_seqs))
    engine = LLMEngine(MODEL, TOKENIZER, config, eos_token_ids=[0], latency_curve=FLAT_CURVE,
                       draft_model=MODEL if "model" in method else None)
    return EngineLoop(engine, max_queued)


@fuzz_settings()
@given(method=st.sampled_from(METHODS), burst=st.lists(requests, min_size=1, max_size=10),
       max_num_seqs=st.integers(1, 6), max_queued=st.integers(0, 6))
def test_every_request_ends_and_nothing_is_left_behind(method, burst, max_num_seqs, max_queued):
    loop = make_loop(method, max_num_seqs, max_queued)
    violations = check_every_step(loop.engine)
    loop.start()
    try:
        seen, refused = [], {"full": 0, "duplicate": 0}
        for req in burst:
            s = Seen()
            if req.cancel == "first":
                def receive(item, s=s, rid=req.request_id):
                    s.receive(item)
                    if len(s.items) == 1:
                        loop.cancel(rid)  # on the loop thread, from the callback: the next step boundary
            else:
                receive = s.receive
            try:
                loop.submit(req.prompt, req.params, req.request_id, receive, req.salt)
            except QueueFullError:
                refused["full"] += 1
                continue
            except ValueError as e:
                assert "already in flight" in str(e)
                refused["duplicate"] += 1
                continue
            if req.cancel == "now":
                loop.cancel(req.request_id)
            seen.append((req, s))
        deadline = time.monotonic() + END_S
        for req, s in seen:
            assert s.done.wait(max(deadline - time.monotonic(), 0)), f"{req.request_id} never ended ({method})"
        stats = loop.stats()
    finally:
        loop.stop(timeout=END_S)

    assert violations == []
    generated = 0
    for req, s in seen:
        *stream, final = s.items
        assert all(isinstance(i, RequestOutput) and not i.finished for i in stream)
        if isinstance(final, ValueError):  # refused by the engine: a prompt it can never run
            assert max(req.prompt) >= VOCAB or len(req.prompt) >= CONTEXT, final
            continue
        assert isinstance(final, RequestOutput), f"{req.request_id} failed: {final!r}"
        tokens = [t for i in s.items for t in i.new_token_ids]
        assert tokens == final.seq.output_ids
        generated += len(tokens)
        if final.finish_reason is FinishReason.ABORT:
            assert req.cancel != "no"
        elif final.finish_reason is FinishReason.LENGTH:
            assert len(tokens) == req.params.max_new_tokens or len(req.prompt) + len(tokens) == CONTEXT
        else:
            assert final.finish_reason is FinishReason.STOP and len(tokens) <= req.params.max_new_tokens
    assert stats.running == stats.queued == 0 and loop.in_flight() == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.finished == len(seen) and stats.rejected == refused["full"]
    assert stats.generation_tokens == generated
    assert loop.healthy() is False  # stopped: the thread has ended


@pytest.mark.parametrize("method", METHODS)
def test_each_method_builds_for_the_fuzz(method):
    # The fuzz above draws its method; make sure each one really speculates in this setup.
    loop = make_loop(method, 4, 4)
    seq = loop.engine.add_request([5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(max_new_tokens=8, ignore_eos=True))
    while loop.engine.has_unfinished():
        loop.engine.step()
    assert len(seq.output_ids) == 8
    assert (seq.spec.spec_steps > 0) == (method != "none")
