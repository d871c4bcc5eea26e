"""EngineLoop under faults: a failed step, a request the engine fails alone, a stalled engine
(the watchdog), and a cancel that arrives after its request ended and its id was reused."""

import queue
import threading
import time

import pytest

from specserve.workers.engine.engine_loop import NO_PROGRESS_WAIT_S, EngineLoop, RequestFailedError
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import FinishReason, SamplingParams

from tests.helpers.engine_invariants import check_engine, check_every_step
from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

WAIT_S = 30
POLL_S = 10


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def make_loop(model, stall_timeout_s: float = 60.0) -> EngineLoop:
    engine = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20), eos_token_ids=())
    return EngineLoop(engine, max_queued=8, stall_timeout_s=stall_timeout_s)


def submit(loop, request_id, max_new_tokens=5, prompt=(5, 6, 7), **params) -> queue.Queue:
    outputs = queue.Queue()
    loop.submit(list(prompt), SamplingParams(max_new_tokens=max_new_tokens, **params), request_id, outputs.put)
    return outputs


def last(outputs: queue.Queue):
    item = outputs.get(timeout=WAIT_S)
    while not (isinstance(item, Exception) or item.finished):
        item = outputs.get(timeout=WAIT_S)
    return item


def poll(condition, what: str) -> None:
    deadline = time.monotonic() + POLL_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_idle_and_clean(loop: EngineLoop) -> None:
    poll(lambda: loop.in_flight() == 0, "every request to end")
    stats = loop.stats()
    assert stats.running == stats.queued == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    check_engine(loop.engine)


def test_a_failed_step_fails_the_requests_in_the_engine_and_leaves_none_behind(model, monkeypatch):
    # Issue 17's wedge: a step raised after its forward (a NaN draw), and a request submitted
    # meanwhile got the error yet still entered the engine, with no one to fail it when the next
    # step raised: it kept K/V for its last token and no next token, plan() returned nothing
    # forever, and every later request got its first token and hung.
    loop = make_loop(model)
    forward, failures, late = loop.engine.model.forward, [2], {}

    def failing_forward(batch, kv):
        if not failures[0]:
            return forward(batch, kv)
        failures[0] -= 1
        if "b" not in late:
            late["b"] = submit(loop, "b")  # arrives while a step runs
        raise RuntimeError("numerical trouble")

    monkeypatch.setattr(loop.engine.model, "forward", failing_forward)
    loop.start()
    try:
        a = last(submit(loop, "a"))
        b = last(late["b"])
        assert isinstance(a, RuntimeError) and "numerical trouble" in str(a)
        assert isinstance(b, RuntimeError)  # b was in the engine when the second step raised
        assert_idle_and_clean(loop)
        assert last(submit(loop, "c")).finish_reason is FinishReason.LENGTH
        assert loop.healthy()
    finally:
        loop.stop()


def test_a_request_the_engine_fails_alone_ends_with_request_failed_error(model, monkeypatch):
    loop = make_loop(model)
    forward = loop.engine.model.forward

    def nan_for_token_90(batch, kv):
        logits = forward(batch, kv)
        return logits.masked_fill((batch.token_ids[batch.logits_index] == 90)[:, None], float("nan"))

    monkeypatch.setattr(loop.engine.model, "forward", nan_for_token_90)
    violations = check_every_step(loop.engine)
    loop.start()
    try:
        bad, good = submit(loop, "bad", prompt=(5, 90)), submit(loop, "good", max_new_tokens=8, ignore_eos=True)
        failed = last(bad)
        assert isinstance(failed, RequestFailedError) and "NaN or inf" in str(failed)
        assert last(good).finish_reason is FinishReason.LENGTH
        assert_idle_and_clean(loop)
        assert loop.stats().finished == 2 and violations == []
    finally:
        loop.stop()


def test_a_stalled_loop_is_unhealthy_until_a_step_makes_progress(model, monkeypatch):
    loop = make_loop(model, stall_timeout_s=0.2)
    real_step = loop.engine.step
    monkeypatch.setattr(loop.engine, "step", lambda: [])  # steps that never move anything
    started = time.monotonic()
    loop.start()
    try:
        assert loop.healthy()
        outputs = submit(loop, "a", max_new_tokens=3)
        poll(lambda: not loop.healthy(), "the watchdog to see the stall")
        assert loop.stalled() and not loop.has_room()
        # it waits after each step that made no progress instead of spinning (a spinning loop
        # ran ~100k steps a second)
        assert loop.steps <= (time.monotonic() - started) / NO_PROGRESS_WAIT_S + 2
        monkeypatch.setattr(loop.engine, "step", real_step)
        assert last(outputs).finish_reason is FinishReason.LENGTH
        poll(loop.healthy, "the loop to recover")
        assert loop.has_room()
    finally:
        loop.stop()


def test_a_step_that_never_returns_is_a_stall_too(model, monkeypatch):
    loop = make_loop(model, stall_timeout_s=0.2)
    real_step, release = loop.engine.step, threading.Event()

    def hanging_step():
        release.wait(WAIT_S)
        return real_step()

    monkeypatch.setattr(loop.engine, "step", hanging_step)
    loop.start()
    try:
        outputs = submit(loop, "a", max_new_tokens=3)
        poll(lambda: not loop.healthy(), "the watchdog to see the hung step")
        release.set()
        assert last(outputs).finish_reason is FinishReason.LENGTH
        poll(loop.healthy, "the loop to recover")
    finally:
        release.set()
        loop.stop()


def test_a_cancel_that_arrives_after_its_request_ended_spares_a_new_request_with_its_id(model, monkeypatch):
    loop = make_loop(model)
    real_step, again = loop.engine.step, {}

    def step_cancelling_a():
        loop.cancel("a")  # the client gives up while the step that ends "a" runs
        return real_step()

    def on_output(item):  # a's final output: a new request reuses the id at once
        if not isinstance(item, Exception) and item.finished and "a" not in again:
            monkeypatch.setattr(loop.engine, "step", real_step)
            again["a"] = submit(loop, "a", max_new_tokens=4)

    monkeypatch.setattr(loop.engine, "step", step_cancelling_a)
    loop.start()
    try:
        loop.submit([5, 6, 7], SamplingParams(max_new_tokens=1), "a", on_output)
        poll(lambda: "a" in again, "the first request to end")
        assert last(again["a"]).finish_reason is FinishReason.LENGTH  # not aborted by the old cancel
        assert_idle_and_clean(loop)
    finally:
        loop.stop()


def test_stall_timeout_must_be_positive(model):
    engine = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    with pytest.raises(ValueError, match="stall_timeout_s must be > 0, got 0"):
        EngineLoop(engine, max_queued=1, stall_timeout_s=0)
