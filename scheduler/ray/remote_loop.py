"""One VerifyWorker replica seen as an EngineLoop: what the servicer and router call.

Admission and in-flight accounting happen here, in the scheduler; the request itself is driven
by the RayBackend's loop thread (scheduler/ray/backend.py).
"""

import dataclasses
from typing import TYPE_CHECKING

from specserve.workers.engine.engine_loop import LoopStats, LoopStoppedError, OutputCallback, QueueFullError
from specserve.workers.engine.sequence import SamplingParams

from specserve.scheduler.ray.request_driver import RemoteRequest, SeqView

if TYPE_CHECKING:
    from specserve.scheduler.ray.backend import RayBackend


class RemoteEngineLoop:
    """One VerifyWorker replica, seen as an EngineLoop by the servicer."""

    def __init__(self, backend: "RayBackend", index: int, handle, max_in_flight: int, max_queued: int):
        self.backend, self.index, self.handle = backend, index, handle
        self.max_in_flight, self.max_queued = max_in_flight, max_queued
        self.requests: dict[str, RemoteRequest] = {}  # in flight here (guarded by backend.lock)
        self.alive = True
        self.rejected = 0
        self.cached_stats: LoopStats | None = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, on_output: OutputCallback,
               cache_salt: str = "") -> None:
        """Admits a request (EngineLoop.submit's contract)."""
        b = self.backend
        with b.lock:
            if b.closed:
                raise LoopStoppedError("the server is shutting down")
            if request_id in b.requests:
                raise ValueError(f"request_id {request_id!r} is already in flight")
            if len(self.requests) >= self.max_in_flight:
                self.rejected += 1
                raise QueueFullError(f"{len(self.requests)} requests in flight, the limit is {self.max_in_flight}")
            req = RemoteRequest(request_id, list(prompt_ids), params, cache_salt, on_output, SeqView(list(prompt_ids)))
            self.requests[request_id] = req
            b.requests[request_id] = req
        b.run_soon(b.drive(req, self))

    def cancel(self, request_id: str) -> None:
        self.backend.cancel(request_id)

    def in_flight(self) -> int:
        with self.backend.lock:
            return len(self.requests)

    def has_room(self) -> bool:
        with self.backend.lock:
            return not self.backend.closed and self.alive and len(self.requests) < self.max_in_flight

    def stats(self) -> LoopStats:
        """The worker's last reported stats (refreshed every stats_interval_s; a slow or dead
        worker keeps its last numbers rather than blocking the caller)."""
        s = self.cached_stats or LoopStats(**{**dict.fromkeys(LoopStats.__dataclass_fields__, 0),
                                              "max_queued": self.max_queued})
        return dataclasses.replace(s, rejected=s.rejected + self.rejected)

    def close(self) -> None:
        self.backend.close()

    def stop(self, timeout: float | None = None) -> None:
        self.backend.stop_requests(timeout)
