"""A sequence-parallel prefill group of Ray PrefillGroupWorker actors, seen from the scheduler.

`form()` creates world_size actors (placed like prefill workers), asks rank 0 for a rendezvous,
has every rank join it (torch.distributed: gloo, NCCL on GPU). `prefill(ids)` calls every rank
with the same prompt and returns [ObjectRef] of rank 0's PrefixKV, to hand to a verify worker
exactly as a PrefillWorker's, or None when the group failed (a member died, a collective timed
out): then the verify worker prefills the prompt itself, and the group is torn down (its actors
killed) and formed again, with new actors, for the next long prompt.
"""

import asyncio
import itertools
import logging
from dataclasses import dataclass

from specserve.cluster.placement import Role, RoleSpec, actor_options
from specserve.cluster.ray_cluster import NAMESPACE, ClusterInfo
from specserve.workers.model.sequence_parallel import SequenceParallelMode
from specserve.workers.actors.worker_model import WorkerModel

from specserve.scheduler.long_prompt import LongPromptPolicy

log = logging.getLogger("specserve.ray_prefill_group")


@dataclass(frozen=True)
class PrefillGroupConfig:
    name: str  # actor names: <name>-prefill-group-g<formation>-r<rank>, in the specserve namespace
    world_size: int = 2
    mode: SequenceParallelMode = SequenceParallelMode.RING
    threshold: int = 4096  # LongPromptPolicy's: prompts of more than this many tokens are prefilled by the group
    role: RoleSpec = RoleSpec(replicas=1, num_cpus=0.5)  # per rank (replicas is unused)
    timeout_s: float = 60.0  # join and collective limit (a dead member is noticed after at most this)
    ready_timeout_s: float = 900.0  # actor start (model load) limit

    def __post_init__(self):
        if self.world_size < 2:
            raise ValueError(f"a prefill group needs world_size >= 2, got {self.world_size}")
        LongPromptPolicy(self.threshold)  # validates it
        if self.timeout_s <= 0 or self.ready_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got {self.timeout_s}, {self.ready_timeout_s}")


class RayPrefillGroup:
    def __init__(self, config: PrefillGroupConfig, worker_model: WorkerModel, cluster: ClusterInfo,
                 worker_options: dict | None = None, model_factory=None):
        """worker_options: extra Ray actor options (runtime_env); model_factory: passed to every
        rank (tests: a tiny model; None loads worker_model's target)."""
        self.config, self.worker_model, self.cluster = config, worker_model, cluster
        self.worker_options, self.model_factory = worker_options or {}, model_factory
        self.handles: list = []  # by rank; empty while no group is formed
        self.formations = 0  # groups formed so far
        self.failures = 0  # prefills that failed (each tore the group down)
        self._formation = itertools.count()
        self._lock = asyncio.Lock()

    def form(self) -> None:
        """Creates the actors and joins them into one group (blocking)."""
        import ray

        from specserve.workers.actors.prefill_group import PrefillGroupWorker

        c = self.config
        g = next(self._formation)
        options = actor_options(Role.PREFILL, c.role, self.cluster.resources, self.cluster.node_id,
                                joined=not self.cluster.embedded)
        options.update(namespace=NAMESPACE, max_restarts=0, **self.worker_options)
        handles = [ray.remote(PrefillGroupWorker).options(name=f"{c.name}-prefill-group-g{g}-r{rank}", **options)
                   .remote(self.worker_model, rank, c.world_size, c.mode, self.model_factory)
                   for rank in range(c.world_size)]
        try:
            ray.get([h.ready.remote() for h in handles], timeout=c.ready_timeout_s)
            rendezvous = ray.get(handles[0].rendezvous.remote(), timeout=c.timeout_s)
            ray.get([h.join.remote(rendezvous, c.timeout_s) for h in handles], timeout=c.timeout_s + 30)
        except Exception:
            _kill_all(handles)
            raise
        self.handles = handles
        self.formations += 1
        log.info("prefill group %d formed: %d ranks at %s (%s)", g, c.world_size, rendezvous.url, c.mode.value)

    def wants(self, prompt_ids: list[int]) -> bool:
        """The scheduler cannot see a verify worker's prefix cache: every prompt token counts as uncached."""
        return LongPromptPolicy(self.config.threshold).wants(len(prompt_ids))

    async def prefill(self, prompt_ids: list[int]) -> list | None:
        """[ObjectRef] of rank 0's PrefixKV of prompt_ids[:-1] once every rank finished, or None
        when the group failed (it is torn down; the next call forms a new one)."""
        async with self._lock:  # one prompt at a time: every rank must see the same order
            try:
                if not self.handles:
                    await asyncio.to_thread(self.form)
                results = [h.prefill.options(num_returns=2).remote(prompt_ids) for h in self.handles]
                counts = await asyncio.wait_for(asyncio.gather(*(n for _, n in results)),
                                                self.config.timeout_s + 30)
                if any(n != len(prompt_ids) - 1 for n in counts):
                    raise RuntimeError(f"ranks prefilled {counts} tokens, expected {len(prompt_ids) - 1}")
                return [results[0][0]]
            except Exception as e:  # noqa: BLE001 - a member died or timed out: the verify worker prefills
                self.failures += 1
                log.warning("prefill group failed (%s: %s); tearing it down", type(e).__name__, e)
                self.teardown()
                return None

    def teardown(self) -> None:
        """Kills every rank's actor (a group with a lost member cannot be repaired)."""
        handles, self.handles = self.handles, []
        _kill_all(handles)


def _kill_all(handles: list) -> None:
    import ray

    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
