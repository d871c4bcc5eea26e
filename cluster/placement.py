"""Where a worker role's actors run: one Ray custom resource per role, else the local node.

A node that offers `specserve_<role>` hosts that role's actors; each actor takes
`resource_per_replica` units of it (deploy/start-node.sh offers N units for `verify:N`, so one
unit = one actor). In a cluster the scheduler joined (`--address`), a role's actors always ask
for its resource: when no node offers it yet they wait (pending in Ray) until one joins, so
role nodes may start after the scheduler or scale up from zero. In an embedded Ray (one machine)
a role no node offers is pinned to the node this process runs on.
"""

import enum
from dataclasses import dataclass


class Role(enum.Enum):
    PREFILL = "prefill"
    DRAFT = "draft"
    VERIFY = "verify"

    @property
    def resource(self) -> str:
        """The Ray custom resource a node offers to host this role: specserve_prefill|draft|verify."""
        return f"specserve_{self.value}"


@dataclass(frozen=True)
class RoleSpec:
    """How many actors of a role, and what each takes from its node."""

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resource_per_replica: float = 1.0  # units of the role's custom resource per actor
    max_restarts: int = 3  # Ray restarts a dead actor this often (-1: forever)

    def __post_init__(self):
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.resource_per_replica <= 0:
            raise ValueError(f"resource_per_replica must be > 0, got {self.resource_per_replica}")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts must be >= -1, got {self.max_restarts}")


def role_offered(role: Role, cluster_resources: dict[str, float]) -> bool:
    """Whether some node of the cluster offers the role's resource."""
    return cluster_resources.get(role.resource, 0) > 0


def roles_not_offered(roles: list[Role], cluster_resources: dict[str, float]) -> str:
    """What to tell someone whose actors of these roles wait: the roles no node offers, and how
    to start one ('' when every role is offered: the nodes are busy or still loading)."""
    missing = [r for r in roles if not role_offered(r, cluster_resources)]
    if not missing:
        return ""
    names = ", ".join(r.resource for r in missing)
    how = ",".join(r.value for r in missing)
    return f"no node offers {names}: start one with SPECSERVE_ROLE={how} deploy/start-node.sh (or ray start --resources)"


def actor_options(role: Role, spec: RoleSpec, cluster_resources: dict[str, float], local_node_id: str,
                  joined: bool = False) -> dict:
    """Ray actor options placing one actor of `role`: on a node offering the role's resource, or
    (embedded, no node offers it) on the local node. joined: the scheduler joined a cluster, so
    the resource is asked for even if no node offers it now. Name, namespace and lifetime are
    the caller's."""
    options = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "max_restarts": spec.max_restarts,
               "max_task_retries": 0}  # a streamed request is resubmitted by the scheduler, never replayed
    if joined or role_offered(role, cluster_resources):
        options["resources"] = {role.resource: spec.resource_per_replica}
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(local_node_id, soft=False)
    return options
