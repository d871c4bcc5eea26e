"""Drives each request through verify workers to its end: attempt, and after a lost worker,
resubmit. Runs every request as a task on the backend's one asyncio loop thread.

An attempt: the prompt's K/V from the PrefillRouter (ObjectRefs), then the replica's
VerifyWorker.generate stream (a Ray streaming generator of StreamChunk lists), each chunk
absorbed into the request and delivered. When the worker dies mid-request, or sends nothing for
`stall_timeout_s`, the request is resubmitted with its prompt + every token already delivered
and max_new_tokens reduced by as many: to the same replica once Ray restarted it, else to the
least loaded other live replica, else to a replacement actor under the lost one's name. Greedy
output is identical; after `max_resubmits` the request ends with a clear error.
"""

import asyncio
import concurrent.futures
import logging

from specserve.workers.actors.messages import StreamChunk
from specserve.workers.engine.sequence import FinishReason

from specserve.scheduler.ray.actor_pool import ActorPool, VerifyReplica
from specserve.scheduler.ray.prefill_router import PrefillRouter
from specserve.scheduler.ray.remote_request import RemoteRequest, WorkerLost

log = logging.getLogger("specserve.request_driver")
MAX_UNSTARTED_RETRIES = 10  # submissions to a worker that was restarting, per request
RESTART_GRACE_S = 3.0  # how long a lost replica may take to answer again while another one can take its requests


class RequestDriver:
    def __init__(self, event_loop: asyncio.AbstractEventLoop, pool: ActorPool, prefill: PrefillRouter,
                 stall_timeout_s: float, max_resubmits: int):
        self._aio, self._pool, self._prefill = event_loop, pool, prefill
        self.stall_timeout_s, self.max_resubmits = stall_timeout_s, max_resubmits
        self._active: set[RemoteRequest] = set()  # being driven (touched on the loop thread only)
        self.resubmits = 0  # requests resubmitted after a verify worker was lost

    def start(self, req: RemoteRequest) -> concurrent.futures.Future:
        """Drives req from any thread; the future is done once its last output was delivered."""
        return asyncio.run_coroutine_threadsafe(self._drive(req), self._aio)

    def cancel(self, req: RemoteRequest) -> None:
        """Aborts req at its worker's next step boundary (thread-safe)."""
        req.cancelled = True
        try:
            req.replica.handle.cancel.remote(req.request_id)
        except Exception:  # noqa: BLE001 - a dead worker: the request ends as lost, then aborted
            pass

    def abandon(self, req: RemoteRequest) -> None:
        """Ends req here without waiting for its worker (one that does not answer a cancel)."""
        if req.task is not None:
            self._aio.call_soon_threadsafe(req.task.cancel)
        req.finish(FinishReason.ABORT)

    async def _drive(self, req: RemoteRequest) -> None:
        req.task = asyncio.current_task()
        self._active.add(req)
        try:
            while True:
                try:
                    await self._attempt(req)
                    return
                except WorkerLost as e:
                    req.end_attempt(e.started)
                    if req.cancelled:
                        req.finish(FinishReason.ABORT)
                        return
                    if len(req.seq.output_ids) >= req.params.max_new_tokens:  # lost only its last message
                        req.finish(FinishReason.LENGTH)
                        return
                    if req.attempts > self.max_resubmits or req.unstarted > MAX_UNSTARTED_RETRIES:
                        raise RuntimeError(f"verify worker lost {req.attempts} times ({e}); giving up after "
                                           f"{len(req.seq.output_ids)} tokens") from None
                    log.warning("request %s: %s; resubmitting after %d tokens", req.request_id, e,
                                len(req.seq.output_ids))
                    req.replica = await self._replacement(req.replica)
                    self.resubmits += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the request ends with this error, the server goes on
            req.deliver(e if isinstance(e, (ValueError, RuntimeError)) else RuntimeError(str(e)))
        finally:
            self._active.discard(req)
            req.finish(FinishReason.ABORT)  # nothing if it ended already

    async def _attempt(self, req: RemoteRequest) -> None:
        """One submission to one worker; returns when the request ended, raises WorkerLost."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        request = req.next_request()
        handoff = await self._prefill.handoff(request.prompt_ids)
        handle = req.replica.handle
        started = False
        try:
            stream = handle.generate.options(num_returns="streaming").remote(request, handoff.prefix,
                                                                             handoff.draft_prefix)
            while True:
                try:
                    ref = await asyncio.wait_for(stream.__anext__(), self.stall_timeout_s)
                except StopAsyncIteration:
                    raise WorkerLost("the worker's stream ended before the request did") from None
                chunks: list[StreamChunk] = await ref
                started = True
                for chunk in chunks:
                    if chunk.error is not None:
                        raise (ValueError if chunk.invalid else RuntimeError)(chunk.error)
                    out = req.absorb(chunk)
                    if out.new_token_ids or out.finished:
                        req.deliver(out)
                    if chunk.finished:
                        return
        except asyncio.TimeoutError:
            handle.cancel.remote(req.request_id)
            raise WorkerLost(f"no output for {self.stall_timeout_s:g} s") from None
        except RayTaskError as e:
            if isinstance(e, RayActorError):
                raise WorkerLost(f"worker died: {type(e).__name__}", started) from None
            raise RuntimeError(f"verify worker failed: {e}") from None
        except ActorUnavailableError as e:
            raise WorkerLost(f"worker unavailable: {type(e).__name__}", started) from None
        except RayActorError as e:
            raise WorkerLost(f"worker died: {type(e).__name__}", started) from None

    async def _replacement(self, lost: VerifyReplica) -> VerifyReplica:
        """The replica to resubmit to: the lost one once Ray restarted it, else the least loaded
        other live one, else the lost one with a new actor. While another replica is alive the
        lost one gets only RESTART_GRACE_S to come back (a replica whose host is gone, with no
        other node offering verify, would pend for the whole ready timeout)."""
        alive = any(r is not lost and r.alive for r in self._pool.replicas)
        if await self._pool.answers(lost, RESTART_GRACE_S if alive else None):
            return lost
        others = [r for r in self._pool.replicas if r is not lost and r.alive]
        if others:
            return min(others, key=lambda r: sum(req.replica is r for req in self._active))
        return await self._pool.revive(lost)
