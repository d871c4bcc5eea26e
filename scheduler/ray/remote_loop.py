"""One VerifyWorker replica seen as an engine loop (EngineLoopLike): what the servicer and the
server call, so they do not know where the engine runs.

Admission and in-flight accounting are this loop's own: a request counts here from submit to
its last output, wherever its attempts ran (a resubmission may go to another replica). The
RequestDriver streams it; the VerifyReplica (the ActorPool's) says whether the worker answers
and what it last reported. `close` and `stop` concern this replica alone.
"""

import dataclasses
import threading
import time

from specserve.workers.engine.engine_loop import AdmissionGate, LoopStats, OutputCallback
from specserve.workers.engine.sequence import SamplingParams

from specserve.scheduler.ray.actor_pool import VerifyReplica
from specserve.scheduler.ray.remote_request import RemoteRequest
from specserve.scheduler.ray.request_driver import RequestDriver


class RemoteEngineLoop:
    def __init__(self, replica: VerifyReplica, driver: RequestDriver, max_in_flight: int):
        self.replica, self._driver = replica, driver
        self._lock = threading.Lock()
        self._gate = AdmissionGate(max_in_flight)
        self._requests: dict[str, RemoteRequest] = {}  # admitted here, not yet ended

    @property
    def handle(self):
        """The verify actor serving this replica now."""
        return self.replica.handle

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, on_output: OutputCallback,
               cache_salt: str = "") -> None:
        with self._lock:
            self._gate.admit(request_id, self._requests)
            req = RemoteRequest(request_id, list(prompt_ids), params, cache_salt, on_output, self.replica)
            self._requests[request_id] = req
        self._driver.start(req).add_done_callback(lambda _: self._forget(req))

    def _forget(self, req: RemoteRequest) -> None:
        with self._lock:
            if self._requests.get(req.request_id) is req:
                del self._requests[req.request_id]

    def cancel(self, request_id: str) -> None:
        with self._lock:
            req = self._requests.get(request_id)
        if req is not None:
            self._driver.cancel(req)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._requests)

    def has_room(self) -> bool:
        with self._lock:
            return self.replica.alive and self._gate.has_room(len(self._requests))

    def healthy(self) -> bool:
        """Whether the verify worker answered the last stats poll (or request)."""
        return self.replica.alive

    def stats(self) -> LoopStats:
        """The worker's last reported stats (refreshed every stats_interval_s; a slow or dead
        worker keeps its last numbers rather than blocking the caller) + this loop's rejections."""
        s = self.replica.stats
        return dataclasses.replace(s, rejected=s.rejected + self._gate.rejected)

    def close(self) -> None:
        with self._lock:
            self._gate.closed = True

    def stop(self, timeout: float | None = None) -> None:
        self.close()
        with self._lock:
            requests = list(self._requests.values())
        for req in requests:
            self._driver.cancel(req)
        deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)  # poll interval
        with self._lock:
            left = list(self._requests.values())
        for req in left:  # a worker that does not answer: end the requests here
            self._driver.abandon(req)
