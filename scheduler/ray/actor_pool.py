"""The named worker actors of one backend: created (or found again by name), placed by role,
watched, replaced when lost, killed on shutdown.

Actors are detached and named `<name>-<role>-<i>` in the specserve namespace, so a restarted
scheduler finds its workers again. Each verify actor slot is a `VerifyReplica`; only the pool
writes it (on the backend's event loop thread): `alive` from the periodic stats poll and from
requests that lost the worker, `handle` when the actor is replaced. Everyone else reads it.
"""

import asyncio
import logging
import time

from specserve.cluster.placement import Role, actor_options, roles_not_offered
from specserve.cluster.ray_cluster import NAMESPACE, ClusterInfo
from specserve.workers.actors.messages import WorkerInfo
from specserve.workers.actors.worker_model import WorkerModel
from specserve.workers.engine.engine_loop import LoopStats

from specserve.scheduler.ray.config import RayBackendConfig

log = logging.getLogger("specserve.actor_pool")
# Worker processes: OpenMP threads sleep as soon as a parallel region ends instead of spinning.
# Draft and verify run in turn in two processes; spinning threads of the idle one took cores from
# the busy one (measured on 2 cores: the draft step 2x slower than in-process).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


class VerifyReplica:
    """The verify actor slot `<name>-verify-<index>`: the actor serving it now, whether it
    answers, and the stats it last reported (a slow worker keeps its last numbers)."""

    def __init__(self, index: int, handle, max_queued: int):
        self.index, self.handle = index, handle
        self.alive = True  # the last stats poll or request reached the worker
        self.stats = LoopStats.empty(max_queued)


class ActorPool:
    def __init__(self, config: RayBackendConfig, worker_model: WorkerModel, cluster: ClusterInfo):
        self.config, self.worker_model, self.cluster = config, worker_model, cluster
        self.prefill_handles: list = []
        self.draft_handles: list = []
        self.replicas: list[VerifyReplica] = []
        self._revivals: dict[int, asyncio.Future] = {}  # replica index -> the replacement being started

    @property
    def uses_draft_worker(self) -> bool:
        return self.worker_model.uses_model_drafter and self.config.draft.replicas > 0

    def start(self) -> WorkerInfo:
        """Creates or finds every actor and waits until each is ready (blocking); what the first
        verify worker serves."""
        import ray

        c = self.config
        roles = [Role.VERIFY] + [Role.PREFILL] * bool(c.prefill.replicas) + [Role.DRAFT] * self.uses_draft_worker
        if not self.cluster.embedded and (waiting := roles_not_offered(roles, self.cluster.resources)):
            log.warning("%s; the workers wait for it (up to %.0f s)", waiting, c.ready_timeout_s)
        if self.uses_draft_worker:
            self.draft_handles = [self._actor(Role.DRAFT, i) for i in range(c.draft.replicas)]
        self.prefill_handles = [self._actor(Role.PREFILL, i) for i in range(c.prefill.replicas)]
        verify = [self._actor(Role.VERIFY, i) for i in range(c.verify.replicas)]
        deadline = time.monotonic() + c.ready_timeout_s
        try:
            ray.get([h.ready.remote() for h in self.draft_handles + self.prefill_handles], timeout=c.ready_timeout_s)
            infos = ray.get([h.ready.remote() for h in verify], timeout=max(deadline - time.monotonic(), 1.0))
        except ray.exceptions.GetTimeoutError:
            why = roles_not_offered(roles, ray.cluster_resources()) or "the role nodes are busy or still loading"
            self._kill(verify + self.prefill_handles + self.draft_handles)  # detached: pending ones would take a later node
            raise RuntimeError(f"worker actors not ready after {c.ready_timeout_s:.0f} s (ready_timeout_s): "
                               f"{why}") from None
        self.replicas = [VerifyReplica(i, h, c.max_queued) for i, h in enumerate(verify)]
        return infos[0]

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
        options = actor_options(role, self.config.role(role), self.cluster.resources, self.cluster.node_id,
                                joined=not self.cluster.embedded)
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

    # ---- verify replicas (on the backend's event loop) --------------------------------------------

    async def answers(self, replica: VerifyReplica, within_s: float | None = None) -> bool:
        """Whether the replica answers, waiting (up to within_s, default ready_timeout_s) while Ray
        restarts it; one that does not is marked lost."""
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + (self.config.ready_timeout_s if within_s is None else within_s)
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(replica.handle.ping.remote(), deadline - time.monotonic())
                replica.alive = True
                return True
            except ActorUnavailableError:  # restarting: ask again
                await asyncio.sleep(0.1)
            except Exception:  # noqa: BLE001 - dead for good, or not back in time
                break
        replica.alive = False
        return False

    async def revive(self, replica: VerifyReplica) -> VerifyReplica:
        """A new actor under the lost replica's name (one revival at a time per replica)."""
        pending = self._revivals.get(replica.index)
        if pending is None:
            async def create():
                handle = await asyncio.to_thread(self._actor, Role.VERIFY, replica.index)
                await asyncio.wait_for(handle.ping.remote(), self.config.ready_timeout_s)
                replica.handle, replica.alive = handle, True
                log.warning("verify worker %s replaced", self.config.actor_name(Role.VERIFY, replica.index))

            pending = self._revivals[replica.index] = asyncio.ensure_future(create())
            pending.add_done_callback(lambda _: self._revivals.pop(replica.index, None))
        try:
            await asyncio.shield(pending)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"no verify worker could be started again: {e}") from None
        return replica

    async def poll_stats(self) -> None:
        """Forever: every replica's stats, every stats_interval_s. A worker that Ray reports
        dead or unavailable is marked lost, one that answers alive again."""
        from ray.exceptions import RayActorError

        interval = self.config.stats_interval_s
        while True:
            for replica in self.replicas:
                handle = replica.handle
                try:
                    stats = await asyncio.wait_for(handle.stats.remote(), interval * 4)
                except RayActorError:  # dead, or restarting
                    stats = None
                except Exception:  # noqa: BLE001 - slow (a long step): keep the last numbers
                    continue
                if replica.handle is handle:  # not replaced meanwhile
                    replica.alive = stats is not None
                    replica.stats = stats or replica.stats
            await asyncio.sleep(interval)

    def kill_all(self) -> None:
        self._kill([r.handle for r in self.replicas] + self.prefill_handles + self.draft_handles)

    @staticmethod
    def _kill(handles: list) -> None:
        import ray

        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
