"""An LLMEngine on its own thread: requests arrive from any thread, outputs leave by callback.

The engine itself is single-threaded; this loop is its only caller once started. Other
threads `submit` and `cancel`; both take effect at the next step boundary, so a cancelled
request's KV blocks and batch slots are free before the step after the one running now.

A request the engine fails alone (LLMEngine: RequestOutput.error) ends with RequestFailedError;
a step that raises fails every request in the engine, and only those (requests still arriving
run next). Stall watchdog: while requests are in the engine and no step has made progress
(computed a slot or ended a request) for stall_timeout_s — a spinning loop or a step that never
returns — the loop logs it and is not `healthy` (the server turns NOT_SERVING) until a step
makes progress again.
"""

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Protocol

from specserve.workers.engine.llm_engine import LLMEngine, RequestOutput
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.engine.sequence import (FinishReason, Resumed, SamplingParams, Sequence, SequenceStatus,
                                               SequenceView, SpecCounters)

log = logging.getLogger("specserve.engine_loop")

# Longer than any step should take: a long prefill chunk takes seconds on a CPU, and a step waits
# up to draft_timeout_s (30 s by default) for a remote drafter before it drafts nothing.
DEFAULT_STALL_TIMEOUT_S = 60.0
NO_PROGRESS_WAIT_S = 0.01  # after a step that made no progress: wait for input instead of spinning

# Called on the loop thread with each RequestOutput of the request, or once with an exception
# when it fails; the last call is a finished output or the exception. Must not block.
OutputCallback = Callable[[RequestOutput | Exception], None]


class QueueFullError(RuntimeError):
    """Admission refused: as many requests as the loop admits are already in flight."""


class LoopStoppedError(RuntimeError):
    """The loop is shutting down and admits nothing new."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (and no other); the message says why."""


@dataclass(frozen=True)
class LoopStats:
    queued: int  # admitted, not yet scheduled into a step
    running: int  # scheduled: prefilling or decoding
    max_queued: int  # admission bound: max_num_seqs + max_queued requests in flight at most
    finished: int  # since start, aborted ones included
    rejected: int  # submit calls refused because the loop was full
    prompt_tokens: int  # of finished requests
    generation_tokens: int  # of finished requests
    cached_tokens: int  # prompt tokens of finished requests found in the prefix cache
    spec: SpecCounters  # of finished requests
    kv_blocks_total: int
    kv_blocks_free: int

    @classmethod
    def empty(cls, max_queued: int = 0) -> "LoopStats":
        """Nothing counted yet (a worker that has not reported)."""
        zeros = {f.name: 0 for f in fields(cls) if f.name != "spec"}
        return cls(**{**zeros, "max_queued": max_queued, "spec": SpecCounters()})


def combine_stats(stats: list[LoopStats]) -> LoopStats:
    """The field-wise sum over several loops (replicas)."""
    sums = {f.name: sum((getattr(s, f.name) for s in stats), SpecCounters() if f.name == "spec" else 0)
            for f in fields(LoopStats)}
    return LoopStats(**sums)


class EngineLoopLike(Protocol):
    """What the front doors (gRPC servicer, server) know of an engine: an in-process EngineLoop,
    or one Ray verify replica (scheduler/ray/remote_loop.py). Every method is thread-safe and
    returns at once but `stop`."""

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, on_output: OutputCallback,
               cache_salt: str = "") -> None:
        """Admits a request; its outputs go to on_output (OutputCallback's contract). Raises
        LoopStoppedError after close, ValueError for a request_id already in flight here, and
        QueueFullError when max_in_flight requests are (AdmissionGate)."""

    def cancel(self, request_id: str) -> None:
        """Aborts the request at the next step boundary: its last output has finish_reason ABORT.
        An id not in flight here is ignored."""

    def in_flight(self) -> int:
        """Requests admitted here and not yet ended."""

    def has_room(self) -> bool:
        """Whether submit would admit a request now, to an engine that is healthy."""

    def healthy(self) -> bool:
        """Whether the engine behind this loop can serve (the server is NOT_SERVING while none is)."""

    def stats(self) -> LoopStats:
        """Counters since start and the engine's current load."""

    def close(self) -> None:
        """Stops admitting (this loop only); requests in flight run on."""

    def stop(self, timeout: float | None = None) -> None:
        """Stops admitting, aborts what is in flight and waits up to timeout for it to end."""


class AdmissionGate:
    """The admission rule every EngineLoopLike applies: nothing after close, no request_id twice,
    at most max_in_flight requests (then QueueFullError at once, never an unbounded backlog).
    Not locked: its owner calls it under the lock that guards its requests."""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.closed = False
        self.rejected = 0  # submit calls refused because the loop was full

    def admit(self, request_id: str, in_flight: Collection[str]) -> None:
        """Raises unless a request of this id may join the ones in flight."""
        if self.closed:
            raise LoopStoppedError("the server is shutting down")
        if request_id in in_flight:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        if len(in_flight) >= self.max_in_flight:
            self.rejected += 1
            raise QueueFullError(f"{len(in_flight)} requests in flight, the limit is {self.max_in_flight}")

    def has_room(self, in_flight: int) -> bool:
        return not self.closed and in_flight < self.max_in_flight


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    on_output: OutputCallback
    cache_salt: str
    prefix_kv: PrefixKV | None = None  # the prompt's blocks found in the shared prefix cache
    resumed: Resumed | None = None  # a resubmission (LLMEngine.add_request)


class EngineLoop:
    """max_queued: requests admitted beyond the engine's batch (planner max_num_seqs). Once
    max_num_seqs + max_queued requests are in flight, submit raises QueueFullError at once
    instead of growing a backlog.

    With a shared prefix cache, a request first looks its prompt up there on a fetch thread (the
    engine keeps stepping meanwhile) and joins the inbox when the blocks have arrived."""

    def __init__(self, engine: LLMEngine, max_queued: int, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S):
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        self.engine, self.max_queued, self.stall_timeout_s = engine, max_queued, stall_timeout_s
        self._gate = AdmissionGate(engine.config.planner.max_num_seqs + max_queued)
        self._cv = threading.Condition()
        self._inbox: deque[_Pending] = deque()
        self._cancels: deque[tuple[str, OutputCallback]] = deque()  # the callback tells a reused id apart
        self._callbacks: dict[str, OutputCallback] = {}  # every admitted, unfinished request
        self._in_engine: set[str] = set()  # handed to the engine, final output not delivered yet
        self._progress_at: float | None = None  # monotonic: last progress, or work arriving; None while idle
        self._stall_reported = False
        self._fetching = 0  # requests looking up the shared prefix cache
        self._cancelled: set[str] = set()  # cancelled before they reached the engine
        self._fetcher = ThreadPoolExecutor(2, "prefix-fetch") if engine.shared_cache is not None else None
        self._stopping = False  # abort what is in flight and end the thread
        self._counters = dict.fromkeys(("finished", "prompt_tokens", "generation_tokens", "cached_tokens"), 0)
        self._spec = SpecCounters()  # of finished requests
        self.steps, self.step_seconds = 0, 0.0  # engine steps run and their wall time (written by the loop thread)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, on_output: OutputCallback,
               cache_salt: str = "", prefix_kv: PrefixKV | None = None, resumed: Resumed | None = None) -> None:
        """Admits a request; outputs go to on_output. Raises QueueFullError, LoopStoppedError,
        or ValueError for a request_id already in flight. prefix_kv: prompt K/V computed
        elsewhere (a prefill worker's; see LLMEngine.add_request), skipping the shared cache lookup.
        resumed: a resubmitted request's delivered output (see LLMEngine.add_request)."""
        with self._cv:
            self._gate.admit(request_id, self._callbacks)
            self._callbacks[request_id] = on_output
            pending = _Pending(list(prompt_ids), params, request_id, on_output, cache_salt, prefix_kv, resumed)
            if self._fetcher is None or prefix_kv is not None:
                self._inbox.append(pending)
                self._cv.notify()
                return
            self._fetching += 1
        self._fetcher.submit(self._fetch, pending)

    def _fetch(self, pending: _Pending) -> None:
        try:
            pending.prefix_kv = self.engine.lookup_shared_prefix(pending.prompt_ids, pending.cache_salt)
        except Exception:  # noqa: BLE001 - a failed lookup is a miss, never a failed request
            log.exception("prefix cache lookup of request %s failed", pending.request_id)
        with self._cv:
            self._fetching -= 1
            self._inbox.append(pending)
            self._cv.notify()

    def cancel(self, request_id: str) -> None:
        """Aborts a request at the next step boundary (its last output has finish_reason abort)."""
        with self._cv:
            if request_id in self._callbacks:
                self._cancels.append((request_id, self._callbacks[request_id]))
                self._cv.notify()

    def in_flight(self) -> int:
        with self._cv:
            return len(self._callbacks)

    def has_room(self) -> bool:
        """Whether submit would admit a request now."""
        with self._cv:
            room = self._gate.has_room(len(self._callbacks))
        return room and not self.stalled()

    def healthy(self) -> bool:
        """Whether the loop thread runs and is not stalled."""
        return self._thread.is_alive() and not self.stalled()

    def stalled(self) -> bool:
        """Whether requests are in the engine and no step made progress for stall_timeout_s.
        Logs when a stall is first seen and when it ends."""
        with self._cv:
            since = self._progress_at
            stalled = since is not None and time.monotonic() - since > self.stall_timeout_s
            changed, self._stall_reported = stalled != self._stall_reported, stalled
            in_engine = len(self._in_engine)
        if changed and stalled:
            log.error("engine loop stalled: %d requests in the engine and no step made progress for %.1f s",
                      in_engine, time.monotonic() - since)
        elif changed:
            log.warning("engine loop recovered: steps make progress again")
        return stalled

    def stats(self) -> LoopStats:
        with self._cv:
            in_flight, counters, spec = len(self._callbacks), dict(self._counters), self._spec
            rejected = self._gate.rejected
        running = len(self.engine.planner.running)
        kv = self.engine.kv
        return LoopStats(queued=max(in_flight - running, 0), running=running, max_queued=self.max_queued,
                         rejected=rejected, spec=spec, kv_blocks_total=kv.config.num_blocks,
                         kv_blocks_free=kv.allocator.num_free, **counters)

    def close(self) -> None:
        """Stops admitting; requests in flight run on."""
        with self._cv:
            self._gate.closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Stops admitting, aborts what is still in flight, and joins the thread."""
        with self._cv:
            self._gate.closed = self._stopping = True
            self._cancels.extend(self._callbacks.items())
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._cancels or self.engine.has_unfinished() or self._stopping):
                    self._cv.wait()
                adds, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = list(self._cancels), deque()
                if (self._stopping and not adds and not cancels and not self.engine.has_unfinished()
                        and not self._fetching):
                    return
                if self._stopping and not (adds or cancels or self.engine.has_unfinished()):
                    self._cv.wait()  # a lookup still in flight joins the inbox (and is aborted) when done
                    continue
            for pending in adds:
                self._add(pending)
            for request_id, callback in cancels:
                self._abort(request_id, callback)
            if self.engine.has_unfinished():
                self._step()

    def _add(self, pending: _Pending) -> None:
        if pending.request_id in self._cancelled or self._stopping:
            self._cancelled.discard(pending.request_id)
            seq = Sequence(pending.prompt_ids, pending.params, pending.request_id, status=SequenceStatus.FINISHED,
                           finish_reason=FinishReason.ABORT)
            self._deliver(pending.request_id, RequestOutput(pending.request_id, [], "", True, FinishReason.ABORT, seq))
            return
        try:
            self.engine.add_request(pending.prompt_ids, pending.params, pending.request_id, pending.cache_salt,
                                    pending.prefix_kv, pending.resumed)
        except ValueError as e:
            self._deliver(pending.request_id, e)
            return
        with self._cv:
            self._in_engine.add(pending.request_id)

    def _abort(self, request_id: str, callback: OutputCallback) -> None:
        with self._cv:
            if self._callbacks.get(request_id) is not callback:
                return  # it ended before the cancel came through (a new request may have its id now)
        seq = self.engine.running_sequence(request_id)
        if seq is None:
            with self._cv:
                self._cancelled.add(request_id)  # still looking up the prefix cache
            return
        self.engine.abort(request_id)
        self._deliver(request_id, RequestOutput(request_id, [], "", True, FinishReason.ABORT, seq))

    def _step(self) -> None:
        with self._cv:
            if self._progress_at is None:  # work arrived at an idle engine: the watchdog's clock starts
                self._progress_at = time.monotonic()
        start, slots = time.perf_counter(), self.engine.slots_computed
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
            # Every request the engine holds, and any it ended in this step before raising (its
            # final output never came out); not the requests still in the inbox, which run next.
            log.exception("engine step failed")
            with self._cv:
                request_ids = list(self._in_engine)
            for request_id in request_ids:
                self.engine.abort(request_id)
                self._deliver(request_id, RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            outputs = []
        finally:
            self.steps += 1
            self.step_seconds += time.perf_counter() - start
        for out in outputs:
            self._deliver(out.request_id, out)
        self._watch(progressed=bool(outputs) or self.engine.slots_computed != slots or not self.engine.has_unfinished())

    def _watch(self, progressed: bool) -> None:
        """After a step (loop thread): restarts the watchdog's clock on progress, and waits a
        little for input after a step that made none, so a stalled loop does not spin."""
        with self._cv:
            if progressed:
                self._progress_at = time.monotonic() if self.engine.has_unfinished() else None
            elif not (self._inbox or self._cancels or self._stopping):
                self._cv.wait(NO_PROGRESS_WAIT_S)
        self.stalled()

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        if isinstance(item, RequestOutput) and item.error is not None:
            item = RequestFailedError(item.error)
        final = isinstance(item, Exception) or item.finished
        with self._cv:
            if final:
                self._in_engine.discard(request_id)
            callback = self._callbacks.pop(request_id, None) if final else self._callbacks.get(request_id)
            if final and isinstance(item, RequestOutput):
                self._count(item.seq)
            elif final:
                self._counters["finished"] += 1
        if callback is not None:
            try:
                callback(item)
            except Exception:  # noqa: BLE001 - a broken receiver must not stop the loop
                log.exception("output callback of request %s failed", request_id)

    def _count(self, seq: SequenceView) -> None:
        c = self._counters
        c["finished"] += 1
        c["prompt_tokens"] += len(seq.prompt_ids)
        c["generation_tokens"] += len(seq.output_ids)
        c["cached_tokens"] += seq.cached_tokens
        self._spec += seq.spec
