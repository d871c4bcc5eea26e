"""An LLMEngine on its own thread: requests arrive from any thread, outputs leave by callback.

The engine itself is single-threaded; this loop is its only caller once started. Other
threads `submit` and `cancel`; both take effect at the next step boundary, so a cancelled
request's KV blocks and batch slots are free before the step after the one running now.
"""

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

from specserve.workers.engine.llm_engine import LLMEngine, RequestOutput
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

log = logging.getLogger("specserve.engine_loop")

# Called on the loop thread with each RequestOutput of the request, or once with an exception
# when it fails; the last call is a finished output or the exception. Must not block.
OutputCallback = Callable[[RequestOutput | Exception], None]


class QueueFullError(RuntimeError):
    """Admission refused: as many requests as the loop admits are already in flight."""


class LoopStoppedError(RuntimeError):
    """The loop is shutting down and admits nothing new."""


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
    spec_steps: int
    drafted_tokens: int
    accepted_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int


def combine_stats(stats: list[LoopStats]) -> LoopStats:
    """The field-wise sum over several loops (replicas)."""
    return LoopStats(**{f: sum(getattr(s, f) for s in stats) for f in LoopStats.__dataclass_fields__})


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    on_output: OutputCallback
    cache_salt: str
    prefix_kv: PrefixKV | None = None  # the prompt's blocks found in the shared prefix cache


class EngineLoop:
    """max_queued: requests admitted beyond the engine's batch (planner max_num_seqs). Once
    max_num_seqs + max_queued requests are in flight, submit raises QueueFullError at once
    instead of growing a backlog.

    With a shared prefix cache, a request first looks its prompt up there on a fetch thread (the
    engine keeps stepping meanwhile) and joins the inbox when the blocks have arrived."""

    def __init__(self, engine: LLMEngine, max_queued: int):
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        self.engine, self.max_queued = engine, max_queued
        self.max_in_flight = engine.config.planner.max_num_seqs + max_queued
        self._cv = threading.Condition()
        self._inbox: deque[_Pending] = deque()
        self._cancels: deque[str] = deque()
        self._callbacks: dict[str, OutputCallback] = {}  # every admitted, unfinished request
        self._fetching = 0  # requests looking up the shared prefix cache
        self._cancelled: set[str] = set()  # cancelled before they reached the engine
        self._fetcher = ThreadPoolExecutor(2, "prefix-fetch") if engine.shared_cache is not None else None
        self._closed = False  # no new admissions
        self._stopping = False  # abort what is in flight and end the thread
        self._counters = dict.fromkeys(
            ("finished", "rejected", "prompt_tokens", "generation_tokens", "cached_tokens", "spec_steps",
             "drafted_tokens", "accepted_tokens"), 0)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, on_output: OutputCallback,
               cache_salt: str = "", prefix_kv: PrefixKV | None = None) -> None:
        """Admits a request; outputs go to on_output. Raises QueueFullError, LoopStoppedError,
        or ValueError for a request_id already in flight. prefix_kv: prompt K/V computed
        elsewhere (a prefill worker's; see LLMEngine.add_request), skipping the shared cache lookup."""
        with self._cv:
            if self._closed:
                raise LoopStoppedError("the server is shutting down")
            if request_id in self._callbacks:
                raise ValueError(f"request_id {request_id!r} is already in flight")
            if len(self._callbacks) >= self.max_in_flight:
                self._counters["rejected"] += 1
                raise QueueFullError(f"{len(self._callbacks)} requests in flight, the limit is {self.max_in_flight}")
            self._callbacks[request_id] = on_output
            pending = _Pending(list(prompt_ids), params, request_id, on_output, cache_salt, prefix_kv)
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
                self._cancels.append(request_id)
                self._cv.notify()

    def in_flight(self) -> int:
        with self._cv:
            return len(self._callbacks)

    def has_room(self) -> bool:
        """Whether submit would admit a request now."""
        with self._cv:
            return not self._closed and len(self._callbacks) < self.max_in_flight

    def stats(self) -> LoopStats:
        with self._cv:
            in_flight, counters = len(self._callbacks), dict(self._counters)
        running = len(self.engine.planner.running)
        kv = self.engine.kv
        return LoopStats(queued=max(in_flight - running, 0), running=running, max_queued=self.max_queued,
                         kv_blocks_total=kv.config.num_blocks, kv_blocks_free=kv.allocator.num_free, **counters)

    def close(self) -> None:
        """Stops admitting; requests in flight run on."""
        with self._cv:
            self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Stops admitting, aborts what is still in flight, and joins the thread."""
        with self._cv:
            self._closed = self._stopping = True
            self._cancels.extend(self._callbacks)
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
            for request_id in cancels:
                self._abort(request_id)
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
                                    pending.prefix_kv)
        except ValueError as e:
            self._deliver(pending.request_id, e)

    def _abort(self, request_id: str) -> None:
        seq = self.engine.running_sequence(request_id)
        if seq is None:
            with self._cv:
                if request_id in self._callbacks:  # still looking up the prefix cache
                    self._cancelled.add(request_id)
            return  # or finished in the meantime
        self.engine.abort(request_id)
        self._deliver(request_id, RequestOutput(request_id, [], "", True, FinishReason.ABORT, seq))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
            with self._cv:
                request_ids = list(self._callbacks)
            for request_id in request_ids:
                self.engine.abort(request_id)
                self._deliver(request_id, RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            return
        for out in outputs:
            self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        final = isinstance(item, Exception) or item.finished
        with self._cv:
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

    def _count(self, seq: Sequence) -> None:
        c = self._counters
        c["finished"] += 1
        c["prompt_tokens"] += len(seq.prompt_ids)
        c["generation_tokens"] += len(seq.output_ids)
        c["cached_tokens"] += seq.cached_tokens
        c["spec_steps"] += seq.spec_steps
        c["drafted_tokens"] += seq.drafted_tokens
        c["accepted_tokens"] += seq.accepted_tokens
