"""The scheduler's side of the Ray workers: engine loops that live in VerifyWorker actors.

`RayBackend.start()` creates (or finds again, by name) the prefill, draft and verify actors,
places them by role (cluster/placement.py) and returns one `RemoteEngineLoop` per verify
replica. A RemoteEngineLoop has the methods the servicer and router use on an in-process
EngineLoop (submit / cancel / in_flight / has_room / stats / close / stop), so the servicer does
not know where the engine runs.

A request's way: prompts of at least `prefill_threshold` tokens go to a PrefillWorker first; its
K/V ObjectRefs (not the tensors) go with the request to the VerifyWorker, which streams lists
of StreamChunks back (a Ray streaming generator). Every request is a task on one asyncio loop
thread here. With prefill_group_size > 1, prompts of at least `long_prompt_threshold` tokens are
prefilled by a sequence-parallel group of actors instead (scheduler/ray/prefill_group.py; the
target's K/V only, so not with a draft worker), handed over the same way.

Faults: when a verify actor dies mid-request (or stops answering for `stall_timeout_s`), the
request is resubmitted with its prompt + every token already delivered and max_new_tokens
reduced by as many, to the same actor once Ray restarted it, else to another live replica, else
to a replacement actor created under the same name. Delivered tokens are never sent again, and
greedy output is identical; after `max_resubmits` the request ends with a clear error.
"""

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from specserve.cluster.placement import Role, RoleSpec, actor_options
from specserve.cluster.ray_cluster import NAMESPACE, ClusterInfo
from specserve.workers.actors.messages import StreamChunk, WorkerInfo
from specserve.workers.engine.llm_engine import RequestOutput
from specserve.workers.engine.sequence import FinishReason
from specserve.workers.model.sequence_parallel import SequenceParallelMode
from specserve.workers.actors.worker_model import WorkerModel

from specserve.scheduler.ray.prefill_group import PrefillGroupConfig, RayPrefillGroup
from specserve.scheduler.ray.remote_loop import RemoteEngineLoop
from specserve.scheduler.ray.request_driver import MAX_UNSTARTED_RETRIES, RemoteRequest, WorkerLost

log = logging.getLogger("specserve.ray_backend")
# Worker processes: OpenMP threads sleep as soon as a parallel region ends instead of spinning.
# Draft and verify run in turn in two processes; spinning threads of the idle one took cores from
# the busy one (measured on 2 cores: the draft step 2x slower than in-process).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class RayBackendConfig:
    name: str = "specserve"  # actor names: <name>-<role>-<i>, in the specserve namespace
    verify: RoleSpec = RoleSpec(replicas=1, num_cpus=1.0)
    prefill: RoleSpec = RoleSpec(replicas=1, num_cpus=0.5)
    draft: RoleSpec = RoleSpec(replicas=1, num_cpus=0.5)  # used only with spec method `model`
    prefill_threshold: int = 256  # prompts of at least this many tokens are prefilled by a PrefillWorker
    max_queued: int = 64  # per verify replica, as EngineLoop's
    stall_timeout_s: float = 300.0  # no chunk for this long: the worker is treated as dead
    ready_timeout_s: float = 900.0  # actor start (model load) limit
    max_resubmits: int = 3  # per request, after worker deaths
    draft_timeout_s: float = 30.0  # a draft call slower than this: no speculation that step
    stats_interval_s: float = 0.5  # how often workers' stats are refreshed
    keep_workers: bool = False  # on shutdown leave the actors running (a restarted scheduler finds them)
    prefill_group_size: int = 1  # >1: long prompts are prefilled by a sequence-parallel group of this many actors
    sequence_parallel: SequenceParallelMode = SequenceParallelMode.RING  # attention across the group
    long_prompt_threshold: int = 4096  # prompts of at least this many tokens use the group (when size > 1)

    def __post_init__(self):
        if self.verify.replicas < 1:
            raise ValueError(f"verify replicas must be >= 1, got {self.verify.replicas}")
        if self.prefill_threshold < 2:
            raise ValueError(f"prefill_threshold must be >= 2, got {self.prefill_threshold}")
        for name in ("stall_timeout_s", "ready_timeout_s", "draft_timeout_s", "stats_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.prefill_group_size < 1:
            raise ValueError(f"prefill_group_size must be >= 1, got {self.prefill_group_size}")
        if self.max_resubmits < 0 or self.max_queued < 0:
            raise ValueError(f"max_resubmits and max_queued must be >= 0, got {self.max_resubmits}, {self.max_queued}")

    def actor_name(self, role: Role, index: int) -> str:
        return f"{self.name}-{role.value}-{index}"


class RayBackend:
    def __init__(self, config: RayBackendConfig, worker_model: WorkerModel, cluster: ClusterInfo,
                 group_model_factory=None):
        """group_model_factory: the prefill group's model (tests pass a tiny one; None loads the target)."""
        self.config, self.worker_model, self.cluster = config, worker_model, cluster
        self.prefill_group: RayPrefillGroup | None = None
        if config.prefill_group_size > 1:
            self.prefill_group = RayPrefillGroup(
                PrefillGroupConfig(config.name, config.prefill_group_size, config.sequence_parallel,
                                   config.long_prompt_threshold, config.prefill, ready_timeout_s=config.ready_timeout_s),
                worker_model, cluster, {"runtime_env": {"env_vars": WORKER_ENV}}, group_model_factory)
        self.lock = threading.Lock()
        self.requests: dict[str, RemoteRequest] = {}
        self.closed = False
        self.loops: list[RemoteEngineLoop] = []
        self.prefill_handles: list = []
        self.draft_handles: list = []
        self.verify_handles: list = []
        self.info: WorkerInfo | None = None
        self._prefill_turn = itertools.count()
        self._revivals: dict[int, asyncio.Future] = {}
        self._aio = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._aio.run_forever, name="ray-backend", daemon=True)
        self._thread.start()
        self._stats_task = None
        self.resubmits = 0  # requests resubmitted after a verify worker was lost

    # ---- actors -------------------------------------------------------------------------------

    @property
    def uses_draft_worker(self) -> bool:
        return self.worker_model.uses_model_drafter and self.config.draft.replicas > 0

    def start(self) -> list[RemoteEngineLoop]:
        """Creates or finds every actor, waits until each is ready (blocking); the verify loops."""
        import ray

        c = self.config
        if self.uses_draft_worker:
            self.draft_handles = [self._actor(Role.DRAFT, i) for i in range(c.draft.replicas)]
        self.prefill_handles = [self._actor(Role.PREFILL, i) for i in range(c.prefill.replicas)]
        verify = self.verify_handles = [self._actor(Role.VERIFY, i) for i in range(c.verify.replicas)]
        ray.get([h.ready.remote() for h in self.draft_handles + self.prefill_handles], timeout=c.ready_timeout_s)
        if self.prefill_group is not None:
            self.prefill_group.form()
        infos = ray.get([h.ready.remote() for h in verify], timeout=c.ready_timeout_s)
        self.info = infos[0]
        max_in_flight = self.worker_model.config.planner.max_num_seqs + c.max_queued
        self.loops = [RemoteEngineLoop(self, i, h, max_in_flight, c.max_queued) for i, h in enumerate(verify)]
        self._stats_task = self.run_soon(self._refresh_stats())
        return self.loops

    def _actor(self, role: Role, index: int):
        """The named actor of a role, created here unless one of that name already runs with
        the same model (a restarted scheduler finds its workers again)."""
        import ray

        from specserve.workers.actors.draft import DraftWorker
        from specserve.workers.actors.prefill import PrefillWorker
        from specserve.workers.actors.verify import VerifyWorker

        name = self.config.actor_name(role, index)
        try:
            existing = ray.get_actor(name, namespace=NAMESPACE)
            if ray.get(existing.model_spec.remote(), timeout=30) == self.worker_model:
                log.info("found worker %s again", name)
                return existing
            ray.kill(existing)  # another model or configuration: replace it
        except Exception:  # noqa: BLE001 - none of that name (or it died): create it
            pass
        spec = {Role.VERIFY: self.config.verify, Role.PREFILL: self.config.prefill, Role.DRAFT: self.config.draft}[role]
        options = actor_options(role, spec, self.cluster.resources, self.cluster.node_id)
        options.update(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                       runtime_env={"env_vars": WORKER_ENV})
        wm = self.worker_model
        if role is Role.VERIFY:
            draft = self.draft_handles[index % len(self.draft_handles)] if self.draft_handles else None
            return ray.remote(VerifyWorker).options(**options).remote(
                wm, self.config.max_queued, draft, self.config.draft_timeout_s, name)
        cls = PrefillWorker if role is Role.PREFILL else DraftWorker
        return ray.remote(cls).options(**options).remote(wm)

    def actor_names(self) -> list[str]:
        c = self.config
        roles = [(Role.VERIFY, c.verify.replicas), (Role.PREFILL, c.prefill.replicas)]
        if self.uses_draft_worker:
            roles.append((Role.DRAFT, c.draft.replicas))
        return [c.actor_name(role, i) for role, n in roles for i in range(n)]

    # ---- requests ------------------------------------------------------------------------------

    def run_soon(self, coro) -> "asyncio.Future":
        return asyncio.run_coroutine_threadsafe(coro, self._aio)

    async def drive(self, req: RemoteRequest, loop: RemoteEngineLoop) -> None:
        """Streams one request to its end, resubmitting after worker deaths."""
        req.task = asyncio.current_task()
        try:
            while True:
                try:
                    await self._attempt(req, loop)
                    return
                except WorkerLost as e:
                    req.end_attempt()
                    if e.started:
                        req.attempts += 1
                    else:  # the worker was restarting when the request came: wait for it, nothing was lost
                        req.unstarted += 1
                    if req.cancelled:
                        self._deliver_abort(req)
                        return
                    if len(req.seq.output_ids) >= req.params.max_new_tokens:  # lost only its last message
                        self._deliver(req, RequestOutput(req.request_id, [], "", True, FinishReason.LENGTH, req.seq))
                        return
                    if req.attempts > self.config.max_resubmits or req.unstarted > MAX_UNSTARTED_RETRIES:
                        raise RuntimeError(f"verify worker lost {req.attempts} times ({e}); giving up after "
                                           f"{len(req.seq.output_ids)} tokens") from None
                    log.warning("request %s: %s; resubmitting after %d tokens", req.request_id, e,
                                len(req.seq.output_ids))
                    loop = await self._replacement(loop, req)
                    self.resubmits += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the request ends with this error, the server goes on
            self._deliver(req, e if isinstance(e, (ValueError, RuntimeError)) else RuntimeError(str(e)))
        finally:
            self._forget(req)

    async def _attempt(self, req: RemoteRequest, loop: RemoteEngineLoop) -> None:
        """One submission to one worker; returns when the request ended, raises WorkerLost."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        request = req.next_request()
        if self.prefill_group is not None and self.prefill_group.wants(request.prompt_ids) \
                and not self.uses_draft_worker:  # the group prefills the target only
            prefix, draft_prefix = await self.prefill_group.prefill(request.prompt_ids), None
        else:
            prefix, draft_prefix = self._prefill(request.prompt_ids)
        started = False
        try:
            stream = loop.handle.generate.options(num_returns="streaming").remote(request, prefix, draft_prefix)
            while True:
                try:
                    ref = await asyncio.wait_for(stream.__anext__(), self.config.stall_timeout_s)
                except StopAsyncIteration:
                    raise WorkerLost("the worker's stream ended before the request did") from None
                chunks: list[StreamChunk] = await ref
                started = True
                for chunk in chunks:
                    if chunk.error is not None:
                        raise (ValueError if chunk.invalid else RuntimeError)(chunk.error)
                    out = req.absorb(chunk)
                    if out.new_token_ids or out.finished:
                        self._deliver(req, out)
                    if chunk.finished:
                        return
        except asyncio.TimeoutError:
            loop.handle.cancel.remote(req.request_id)
            raise WorkerLost(f"no output for {self.config.stall_timeout_s:g} s") from None
        except RayTaskError as e:
            if isinstance(e, RayActorError):
                raise WorkerLost(f"worker died: {type(e).__name__}", started) from None
            raise RuntimeError(f"verify worker failed: {e}") from None
        except ActorUnavailableError as e:
            raise WorkerLost(f"worker unavailable: {type(e).__name__}", started) from None
        except RayActorError as e:
            raise WorkerLost(f"worker died: {type(e).__name__}", started) from None

    def _prefill(self, prompt_ids: list[int]) -> tuple[list | None, list | None]:
        """[ObjectRef] of the target's and the draft model's prompt K/V from a PrefillWorker, for
        long prompts (the refs only: the tensors go from the prefill node to the workers)."""
        if not self.prefill_handles or len(prompt_ids) < self.config.prefill_threshold:
            return None, None
        handle = self.prefill_handles[next(self._prefill_turn) % len(self.prefill_handles)]
        target, draft = handle.prefill.options(num_returns=2).remote(prompt_ids, self.uses_draft_worker)
        return [target], ([draft] if self.uses_draft_worker else None)

    async def _replacement(self, lost: RemoteEngineLoop, req: RemoteRequest) -> RemoteEngineLoop:
        """The replica to resubmit to: the lost one once Ray restarted it, else another live
        one, else the lost one replaced by a new actor of the same name."""
        if await self._answers(lost):
            chosen = lost
        else:
            lost.alive = False
            others = [loop for loop in self.loops if loop is not lost and loop.alive]
            chosen = min(others, key=lambda loop: len(loop.requests)) if others else await self._revive(lost)
        with self.lock:
            lost.requests.pop(req.request_id, None)
            chosen.requests[req.request_id] = req
        return chosen

    async def _answers(self, loop: RemoteEngineLoop) -> bool:
        """Whether the replica answers, waiting (up to ready_timeout_s) while Ray restarts it."""
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(loop.handle.ping.remote(), deadline - time.monotonic())
                return True
            except ActorUnavailableError:  # restarting: ask again
                await asyncio.sleep(0.1)
            except Exception:  # noqa: BLE001 - dead for good, or not back in time
                return False
        return False

    async def _revive(self, loop: RemoteEngineLoop) -> RemoteEngineLoop:
        """A new actor under the lost one's name (one revival at a time per replica)."""
        pending = self._revivals.get(loop.index)
        if pending is None:
            async def create():
                handle = await asyncio.to_thread(self._actor, Role.VERIFY, loop.index)
                await asyncio.wait_for(handle.ping.remote(), self.config.ready_timeout_s)
                loop.handle, loop.alive = handle, True
                log.warning("verify worker %s replaced", self.config.actor_name(Role.VERIFY, loop.index))

            pending = self._revivals[loop.index] = asyncio.ensure_future(create())
            pending.add_done_callback(lambda _: self._revivals.pop(loop.index, None))
        try:
            await asyncio.shield(pending)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"no verify worker could be started again: {e}") from None
        return loop

    def _deliver(self, req: RemoteRequest, item) -> None:
        final = isinstance(item, Exception) or item.finished
        if req.done:
            return
        req.done = final
        try:
            req.on_output(item)
        except Exception:  # noqa: BLE001 - a broken receiver must not stop the backend
            log.exception("output callback of request %s failed", req.request_id)

    def _deliver_abort(self, req: RemoteRequest) -> None:
        self._deliver(req, RequestOutput(req.request_id, [], "", True, FinishReason.ABORT, req.seq))

    def _forget(self, req: RemoteRequest) -> None:
        if not req.done:
            self._deliver_abort(req)
        with self.lock:
            self.requests.pop(req.request_id, None)
            for loop in self.loops:
                loop.requests.pop(req.request_id, None)

    def cancel(self, request_id: str) -> None:
        """Aborts a request at its worker's next step boundary (thread-safe)."""
        with self.lock:
            req = self.requests.get(request_id)
            loop = next((lp for lp in self.loops if request_id in lp.requests), None)
        if req is None:
            return
        req.cancelled = True
        if loop is not None:
            try:
                loop.handle.cancel.remote(request_id)
            except Exception:  # noqa: BLE001 - a dead worker: the request ends as lost, then aborted
                pass

    async def _refresh_stats(self) -> None:
        while True:
            for loop in self.loops:
                try:
                    loop.cached_stats = await asyncio.wait_for(loop.handle.stats.remote(), self.config.stats_interval_s * 4)
                except Exception:  # noqa: BLE001 - slow or dead: keep the last numbers
                    pass
            await asyncio.sleep(self.config.stats_interval_s)

    # ---- shutdown ------------------------------------------------------------------------------

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def stop_requests(self, timeout: float | None = None) -> None:
        """Stops admitting and aborts what is in flight; waits up to timeout for them to end."""
        self.close()
        with self.lock:
            ids = list(self.requests)
        for request_id in ids:
            self.cancel(request_id)
        deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
        while time.monotonic() < deadline:
            with self.lock:
                if not self.requests:
                    return
            time.sleep(0.02)  # poll interval
        with self.lock:
            left = list(self.requests.values())
        for req in left:  # workers that do not answer: end the requests here
            if req.task is not None:
                self._aio.call_soon_threadsafe(req.task.cancel)
            self._deliver_abort(req)

    def shutdown(self) -> None:
        """Ends every request, kills the actors (unless keep_workers), stops the loop thread."""
        import ray

        self.stop_requests(timeout=5.0)
        try:
            self.run_soon(_cancel_all_but_current()).result(timeout=5.0)
        except Exception:  # noqa: BLE001 - a task that does not end in time is dropped with the loop
            pass
        if self.prefill_group is not None and ray.is_initialized():
            self.prefill_group.teardown()
        if not self.config.keep_workers and ray.is_initialized():
            for handle in [loop.handle for loop in self.loops] + self.verify_handles + self.prefill_handles \
                    + self.draft_handles:
                _kill(handle)
        self._aio.call_soon_threadsafe(self._aio.stop)
        self._thread.join(timeout=5)


async def _cancel_all_but_current() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _kill(handle) -> None:
    import ray

    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
