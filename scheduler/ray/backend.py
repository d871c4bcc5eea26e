"""The scheduler's side of the Ray workers: one engine loop per VerifyWorker replica.

`RayBackend.start()` creates (or finds again, by name) the prefill, draft and verify actors
(scheduler/ray/actor_pool.py, placed by role: cluster/placement.py), forms the sequence-parallel
prefill group when prefill_group_size > 1, and returns one RemoteEngineLoop per verify replica
(scheduler/ray/remote_loop.py) — the EngineLoopLike the servicer serves from.

This file only wires the parts and owns their asyncio loop thread: every request is a task on it
(scheduler/ray/request_driver.py: attempts, resubmission after lost workers), beside the pool's
stats poll that tells which workers answer. The prompt's K/V path is scheduler/ray/prefill_router.py.
"""

import asyncio
import threading
import time

from specserve.cluster.ray_cluster import ClusterInfo
from specserve.workers.actors.messages import WorkerInfo
from specserve.workers.actors.worker_model import WorkerModel

from specserve.scheduler.ray.actor_pool import WORKER_ENV, ActorPool
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.scheduler.ray.prefill_group import PrefillGroupConfig, RayPrefillGroup
from specserve.scheduler.ray.prefill_router import PrefillRouter
from specserve.scheduler.ray.remote_loop import RemoteEngineLoop
from specserve.scheduler.ray.request_driver import RequestDriver


class RayBackend:
    def __init__(self, config: RayBackendConfig, worker_model: WorkerModel, cluster: ClusterInfo,
                 group_model_factory=None):
        """group_model_factory: the prefill group's model (tests pass a tiny one; None loads the target)."""
        self.config, self.worker_model = config, worker_model
        self.pool = ActorPool(config, worker_model, cluster)
        self.prefill_group: RayPrefillGroup | None = None
        if config.prefill_group_size > 1:
            self.prefill_group = RayPrefillGroup(
                PrefillGroupConfig(config.name, config.prefill_group_size, config.sequence_parallel,
                                   config.long_prompt_threshold, config.prefill, ready_timeout_s=config.ready_timeout_s),
                worker_model, cluster, {"runtime_env": {"env_vars": WORKER_ENV}}, group_model_factory)
        self.info: WorkerInfo | None = None
        self.driver: RequestDriver | None = None  # once started
        self.loops: list[RemoteEngineLoop] = []
        self._aio = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._aio.run_forever, name="ray-backend", daemon=True)
        self._thread.start()

    def start(self) -> list[RemoteEngineLoop]:
        """Creates or finds every actor, waits until each is ready (blocking); the verify loops."""
        c, pool = self.config, self.pool
        self.info = pool.start()
        if self.prefill_group is not None:
            self.prefill_group.form()
        prefill = PrefillRouter(pool.prefill_handles, c.prefill_threshold, pool.uses_draft_worker, self.prefill_group)
        self.driver = RequestDriver(self._aio, pool, prefill, c.stall_timeout_s, c.max_resubmits)
        max_in_flight = self.worker_model.config.planner.max_num_seqs + c.max_queued
        self.loops = [RemoteEngineLoop(replica, self.driver, max_in_flight) for replica in pool.replicas]
        asyncio.run_coroutine_threadsafe(pool.poll_stats(), self._aio)
        return self.loops

    def actor_names(self) -> list[str]:
        return self.pool.actor_names()

    def shutdown(self) -> None:
        """Ends every request, kills the actors (unless keep_workers), stops the loop thread."""
        import ray

        deadline = time.monotonic() + 5.0  # for all loops together
        for loop in self.loops:
            loop.stop(timeout=max(deadline - time.monotonic(), 0.0))
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all_but_current(), self._aio).result(timeout=5.0)
        except Exception:  # noqa: BLE001 - a task that does not end in time is dropped with the loop
            pass
        if self.prefill_group is not None and ray.is_initialized():
            self.prefill_group.teardown()
        if not self.config.keep_workers and ray.is_initialized():
            self.pool.kill_all()
        self._aio.call_soon_threadsafe(self._aio.stop)
        self._thread.join(timeout=5)


async def _cancel_all_but_current() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
