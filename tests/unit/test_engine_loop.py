"""EngineLoop: the engine on its own thread, fed and cancelled from other threads."""

import dataclasses
import queue

import pytest

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.engine_loop import (AdmissionGate, EngineLoop, LoopStats, LoopStoppedError,
                                                  QueueFullError, combine_stats)
from specserve.workers.engine.sequence import FinishReason, SamplingParams, SpecCounters
from specserve.workers.engine.step_planner import PlannerConfig

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

WAIT_S = 30


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3, max_position_embeddings=4096))


def make_loop(model, max_queued=4, max_num_seqs=4) -> EngineLoop:
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 22, planner=PlannerConfig(max_num_seqs=max_num_seqs))
    return EngineLoop(LLMEngine(model, tiny_tokenizer(), config, eos_token_ids=()), max_queued).start()


def submit(loop, request_id, max_new_tokens=10, prompt=(5, 6, 7)) -> queue.Queue:
    outputs = queue.Queue()
    loop.submit(list(prompt), SamplingParams(max_new_tokens=max_new_tokens), request_id, outputs.put)
    return outputs


def drain(outputs: queue.Queue) -> list:
    items = [outputs.get(timeout=WAIT_S)]
    while not (isinstance(items[-1], Exception) or items[-1].finished):
        items.append(outputs.get(timeout=WAIT_S))
    return items


def test_outputs_equal_running_the_engine_directly(model):
    loop = make_loop(model)
    try:
        got = [t for out in drain(submit(loop, "a", 20)) for t in out.new_token_ids]
    finally:
        loop.stop()
    direct = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 22), eos_token_ids=())
    assert got == [t for out in direct.generate([5, 6, 7], SamplingParams(max_new_tokens=20)) for t in out.new_token_ids]


def test_cancel_ends_with_abort_and_frees_every_block(model):
    loop = make_loop(model)
    try:
        outputs = submit(loop, "long", 3000)
        outputs.get(timeout=WAIT_S)
        loop.cancel("long")
        last = drain(outputs)[-1]
        assert last.finish_reason is FinishReason.ABORT
        assert loop.in_flight() == 0
        stats = loop.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total and stats.finished == 1
    finally:
        loop.stop()


def test_admission_is_bounded_by_batch_plus_queue(model):
    loop = make_loop(model, max_queued=1, max_num_seqs=1)
    try:
        submit(loop, "a", 3000)
        submit(loop, "b", 3000)
        with pytest.raises(QueueFullError, match="limit is 2"):
            submit(loop, "c")
        with pytest.raises(ValueError, match="already in flight"):
            submit(loop, "a")
        assert loop.stats().rejected == 1
        loop.cancel("a")
        loop.cancel("b")
    finally:
        loop.stop()


def test_a_failing_step_fails_its_requests_and_the_loop_serves_on(model, monkeypatch):
    loop = make_loop(model)
    try:
        real_step = loop.engine.step
        monkeypatch.setattr(loop.engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        failed = drain(submit(loop, "x"))[-1]
        assert isinstance(failed, RuntimeError) and "boom" in str(failed)
        monkeypatch.setattr(loop.engine, "step", real_step)
        assert drain(submit(loop, "y", 5))[-1].finish_reason is FinishReason.LENGTH
    finally:
        loop.stop()


def test_an_engine_refusal_reaches_the_caller(model):
    loop = make_loop(model)
    try:
        refused = drain(submit(loop, "too-long", prompt=[5] * 5000))[-1]
        assert isinstance(refused, ValueError) and "context" in str(refused)
    finally:
        loop.stop()


def test_stop_aborts_what_runs_and_refuses_new_requests(model):
    loop = make_loop(model)
    outputs = submit(loop, "long", 3000)
    outputs.get(timeout=WAIT_S)
    loop.stop(timeout=WAIT_S)
    assert drain(outputs)[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(LoopStoppedError):
        submit(loop, "late")


def test_finished_requests_add_their_spec_counters_to_the_loop_stats(model):
    loop = make_loop(model)
    try:
        seqs = [drain(submit(loop, rid, 6))[-1].seq for rid in ("a", "b")]
        stats = loop.stats()
    finally:
        loop.stop()
    assert [s.spec.decode_steps for s in seqs] == [6, 6]  # speculation off: one token per forward
    assert stats.spec == seqs[0].spec + seqs[1].spec
    assert stats.finished == 2 and stats.generation_tokens == 12


def test_healthy_while_the_loop_thread_runs(model):
    loop = make_loop(model)
    assert loop.healthy()
    loop.stop(timeout=WAIT_S)
    assert not loop.healthy()


def test_spec_counters_add_field_by_field_and_refuse_negative_counts():
    a = SpecCounters(decode_steps=3, spec_steps=2, drafted_tokens=10, accepted_tokens=4)
    b = SpecCounters(decode_steps=1, accepted_tokens=1)
    assert a + b == SpecCounters(decode_steps=4, spec_steps=2, drafted_tokens=10, accepted_tokens=5)
    with pytest.raises(ValueError, match="drafted_tokens must be >= 0, got -1"):
        SpecCounters(drafted_tokens=-1)


def test_combine_stats_sums_every_field_spec_counters_included():
    one = LoopStats.empty(max_queued=4)
    two = dataclasses.replace(one, running=2, finished=5, spec=SpecCounters(spec_steps=3, drafted_tokens=9))
    both = combine_stats([one, two, two])
    assert (both.running, both.finished, both.max_queued) == (4, 10, 12)
    assert both.spec == SpecCounters(spec_steps=6, drafted_tokens=18)


def test_admission_gate_refuses_after_close_duplicates_and_beyond_the_limit():
    gate = AdmissionGate(max_in_flight=2)
    gate.admit("a", set())
    with pytest.raises(ValueError, match="request_id 'a' is already in flight"):
        gate.admit("a", {"a"})
    with pytest.raises(QueueFullError, match="2 requests in flight, the limit is 2"):
        gate.admit("c", {"a", "b"})
    assert gate.rejected == 1 and gate.has_room(1) and not gate.has_room(2)
    gate.closed = True
    with pytest.raises(LoopStoppedError):
        gate.admit("d", set())
    assert not gate.has_room(0)

