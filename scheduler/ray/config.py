"""How the scheduler runs its Ray worker pools (`specserve serve` builds it from its flags)."""

from dataclasses import dataclass

from specserve.cluster.placement import Role, RoleSpec
from specserve.workers.model.sequence_parallel import SequenceParallelMode


@dataclass(frozen=True)
class RayBackendConfig:
    name: str = "specserve"  # actor names: <name>-<role>-<i>, in the specserve namespace
    verify: RoleSpec = RoleSpec(replicas=1, num_cpus=1.0)
    # Prefill and draft actors hold no request's state: Ray restarts them however often they die
    # (with a cap, one kill too many left the role gone until the scheduler restarted). A verify
    # actor whose restarts ran out is replaced by the pool (ActorPool.revive).
    prefill: RoleSpec = RoleSpec(replicas=1, num_cpus=0.5, max_restarts=-1)
    draft: RoleSpec = RoleSpec(replicas=1, num_cpus=0.5, max_restarts=-1)  # used only with spec method `model`
    prefill_threshold: int = 256  # prompts of at least this many tokens are prefilled by a PrefillWorker
    max_queued: int = 64  # per verify replica, as EngineLoop's
    stall_timeout_s: float = 300.0  # no chunk for this long: the worker is treated as dead
    ready_timeout_s: float = 900.0  # actor start (model load) limit
    max_resubmits: int = 3  # per request, after worker deaths
    draft_timeout_s: float = 30.0  # a draft call slower than this: no speculation that step
    stats_interval_s: float = 0.5  # how often workers' stats (and liveness) are refreshed
    keep_workers: bool = False  # on shutdown leave the actors running (a restarted scheduler finds them)
    prefill_group_size: int = 1  # >1: long prompts are prefilled by a sequence-parallel group of this many actors
    sequence_parallel: SequenceParallelMode = SequenceParallelMode.RING  # attention across the group
    long_prompt_threshold: int = 4096  # LongPromptPolicy: prompts of more than this many tokens use the group

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

    def role(self, role: Role) -> RoleSpec:
        return {Role.VERIFY: self.verify, Role.PREFILL: self.prefill, Role.DRAFT: self.draft}[role]
