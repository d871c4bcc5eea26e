"""`specserve serve` over Ray: connect (embedded or join), start the workers, describe the model."""

import math
import os
from dataclasses import dataclass

from specserve.cluster.ray_cluster import ClusterInfo, RayConnectConfig, connect, disconnect
from specserve.workers.actors.messages import WorkerInfo
from specserve.workers.spec.methods import SpecMethod
from specserve.workers.actors.worker_model import WorkerModel
from specserve.workers.model.loader import LoadOptions

from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.scheduler.server.validation import ServedModel


@dataclass(frozen=True)
class RayServeOptions:
    address: str | None  # None: embedded local Ray; "auto" or host:port: join
    backend: RayBackendConfig


def embedded_cpus(config: RayBackendConfig, uses_draft: bool) -> int:
    """An embedded Ray gets the machine's cores, or the CPUs the roles ask for if that is more
    (Ray's CPUs are a scheduling count; torch threads are set by --threads)."""
    wanted = (config.verify.num_cpus * config.verify.replicas + config.prefill.num_cpus * config.prefill.replicas
              + (config.draft.num_cpus * config.draft.replicas if uses_draft else 0)
              + (config.prefill.num_cpus * config.prefill_group_size if config.prefill_group_size > 1 else 0))
    return max(os.cpu_count() or 1, math.ceil(wanted))


def start_backend(options: RayServeOptions, model: str, load_options: LoadOptions) -> RayBackend:
    """Connects to Ray and starts (or finds again) every worker; blocks until they are ready."""
    worker_model = WorkerModel(model, load_options)
    cpus = embedded_cpus(options.backend, worker_model.uses_model_drafter) if options.address is None else None
    cluster: ClusterInfo = connect(RayConnectConfig(address=options.address, num_cpus=cpus))
    backend = RayBackend(options.backend, worker_model, cluster)
    try:
        backend.start()
    except BaseException:
        backend.shutdown()
        disconnect()
        raise
    return backend


def stop_backend(backend: RayBackend) -> None:
    backend.shutdown()
    disconnect()


def served_model_from(info: WorkerInfo, name: str) -> ServedModel:
    return ServedModel(name=name, tokenizer=info.tokenizer, context_length=info.context_length,
                       vocab_size=info.vocab_size, spec_method=info.spec_method,
                       known_spec_methods=tuple(m.value for m in SpecMethod), max_draft_tokens=info.max_draft_tokens)
