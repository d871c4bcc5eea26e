"""Ray bootstrap: an embedded local Ray sized to this machine, or joining an existing cluster.

An embedded Ray is always a new one of this process (`address="local"`): never a cluster named by
RAY_ADDRESS or by the `ray_current_cluster` file a `ray start` leaves in Ray's temp folder (stale
once that cluster is gone). Every specserve process uses one fixed namespace, so a restarted
scheduler finds its (detached, named) worker actors again by name.
"""

import logging
import os
from dataclasses import dataclass

NAMESPACE = "specserve"
log = logging.getLogger("specserve.ray_cluster")


@dataclass(frozen=True)
class RayConnectConfig:
    address: str | None = None  # None: start an embedded local Ray; "auto" or "host:port": join that cluster
    num_cpus: int | None = None  # embedded only; None: the machine's cores
    num_gpus: int | None = None  # embedded only; None: Ray's detection
    namespace: str = NAMESPACE
    object_store_bytes: int | None = None  # embedded only; None: Ray's default

    def __post_init__(self):
        if self.address is not None and not self.address.strip():
            raise ValueError("address must be 'auto' or host:port, got an empty string")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")


@dataclass(frozen=True)
class ClusterInfo:
    embedded: bool  # this process started Ray (and stops it on disconnect)
    address: str  # the GCS address
    node_id: str  # the node this process runs on (hex)
    resources: dict  # the whole cluster's resources, e.g. {"CPU": 4.0, "specserve_verify": 1.0}


def connect(config: RayConnectConfig = RayConnectConfig()) -> ClusterInfo:
    """Connects this process to Ray (once; later calls return the same cluster's info)."""
    import ray

    embedded = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if config.address is None:
            # Ray starts its workers at nice 15 by default: on a busy machine a worker actor then gets a
            # fraction of a core against any ordinary process (measured: the draft step 3x slower).
            os.environ.setdefault("RAY_worker_niceness", "0")
        common = dict(namespace=config.namespace, include_dashboard=False, logging_level=logging.WARNING,
                      log_to_driver=True)
        if config.address is None:
            embedded = True
            ray.init(address="local", num_cpus=config.num_cpus or os.cpu_count() or 1, num_gpus=config.num_gpus,
                     object_store_memory=config.object_store_bytes, **common)
        else:
            common.pop("include_dashboard")  # a joining driver starts no dashboard
            ray.init(address=config.address, **common)
    context = ray.get_runtime_context()
    return ClusterInfo(embedded=embedded, address=context.gcs_address, node_id=context.get_node_id(),
                       resources=dict(ray.cluster_resources()))


def disconnect() -> None:
    """Disconnects this process (an embedded Ray stops with it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
