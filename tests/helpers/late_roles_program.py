"""Run in a subprocess by tests/integration/test_ray_late_roles.py (a process joins one Ray cluster,
and the test session's own is taken): schedulers join a Ray cluster where no node offers the
verify role.

    python -m tests.helpers.late_roles_program FOLDER

First a backend whose workers may wait 4 s: its start-up error. Then one that waits while a
verify node joins: the greedy tokens it serves and whether the worker runs on that node.
Prints one JSON line on stdout.
"""

import json
import os
import socket
import sys
import threading
import uuid

import ray
from ray.cluster_utils import Cluster

from specserve.cluster.placement import Role, RoleSpec
from specserve.cluster.ray_cluster import NAMESPACE, RayConnectConfig, connect
from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.workers.actors.worker_model import WorkerModel
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.loader import LoadOptions
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_folder import tiny_engine_config
from tests.integration.ray_cluster_fixture import Collector, poll

PROMPT, N = [5, 9, 14, 21, 30, 41], 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registered(name: str) -> bool:
    """Whether the named actor exists (created, maybe still waiting for a node)."""
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def backend_of(info, folder: str, ready_timeout_s: float) -> tuple[RayBackend, RayBackendConfig]:
    small = RoleSpec(replicas=1, num_cpus=0.1)
    config = RayBackendConfig(name=f"late{uuid.uuid4().hex[:6]}", verify=small, prefill=RoleSpec(replicas=0),
                              ready_timeout_s=ready_timeout_s)
    model = WorkerModel(folder, LoadOptions(config=tiny_engine_config(SpecConfig("none")), threads=1))
    return RayBackend(config, model, info), config


def main(folder: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a GCS port of its own: the test session's cluster (ray_cluster_fixture) may hold the default one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "gcs_server_port": free_port()})
    try:
        info = connect(RayConnectConfig(address=cluster.address))
        result = {"error_without_node": None}
        backend, failed = backend_of(info, folder, ready_timeout_s=4.0)
        try:
            backend.start()
        except RuntimeError as e:
            result["error_without_node"] = str(e)
        backend.shutdown()
        # the failed start leaves no actor waiting: it would take the verify node that joins below
        poll(lambda: not registered(failed.actor_name(Role.VERIFY, 0)), "the failed start's actor to be gone")

        backend, config = backend_of(info, folder, ready_timeout_s=240.0)
        started: list = []
        thread = threading.Thread(target=lambda: started.append(backend.start() or True), daemon=True)
        thread.start()
        poll(lambda: registered(config.actor_name(Role.VERIFY, 0)), "the verify actor to be created")
        result["started_before_node"] = bool(started)  # it cannot start: no node offers its role
        node = cluster.add_node(num_cpus=1, resources={Role.VERIFY.resource: 1})
        thread.join(timeout=240)
        out = Collector()
        backend.loops[0].submit(PROMPT, SamplingParams(max_new_tokens=N, ignore_eos=True), "late-1", out)
        last = out.wait()
        where = ray.get(backend.loops[0].handle.ready.remote()).node_id
        result.update(started=bool(started), error=str(last) if isinstance(last, Exception) else None,
                      tokens=out.tokens, on_new_node=where == node.node_id)
        print(json.dumps(result), flush=True)
        backend.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
