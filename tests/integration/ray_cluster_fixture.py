"""One multi-node Ray cluster on this machine for the whole test session: a head and one node per
worker role (offering specserve_prefill / specserve_draft / specserve_verify), no dashboard,
small CPU counts. Started on first use (a few seconds) and always shut down at the end; only
this cluster's own processes are stopped (never a global `ray stop`)."""

from __future__ import annotations

import os
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from specserve.cluster.placement import Role
from specserve.workers.engine.sequence import SamplingParams

POLL_S = 120.0
ROLE_UNITS = 4  # actors of a role a role node can host at once (tests start several backends)


@dataclass(frozen=True)
class RayTestCluster:
    address: str
    role_nodes: dict  # Role -> node id (hex) of the node offering that role's resource
    head_node: str


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayTestCluster]:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from specserve.cluster.ray_cluster import RayConnectConfig, connect

    if ray.is_initialized():
        pytest.fail("Ray is already initialised in this test process", pytrace=False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as an embedded Ray (cluster/ray_cluster.py)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = {role: cluster.add_node(num_cpus=2, resources={role.resource: ROLE_UNITS}) for role in Role}
        cluster.wait_for_nodes()
        connect(RayConnectConfig(address=cluster.address))
        yield RayTestCluster(cluster.address, {role: node.node_id for role, node in nodes.items()},
                             cluster.head_node.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()


def poll(condition, what: str, timeout: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # poll interval


class Collector:
    """Receives one request's outputs (called on the backend's thread)."""

    def __init__(self):
        self.items: queue.Queue = queue.Queue()
        self.tokens: list[int] = []
        self.text = ""
        self.last = None  # the final output or the exception, once run_collected waited for it

    def __call__(self, item) -> None:
        if not isinstance(item, Exception):
            self.tokens.extend(item.new_token_ids)
            self.text += item.new_text
        self.items.put(item)

    def wait(self, timeout: float = POLL_S):
        """The last output (finished) or the exception that ended the request."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.items.get(timeout=max(deadline - time.monotonic(), 0.01))
            if isinstance(item, Exception) or item.finished:
                return item


def run(backend, prompt: list[int], n: int, loop: int = 0, params: SamplingParams | None = None):
    """One request of n tokens (greedy unless params) through a RayBackend replica: its tokens and last output."""
    out = run_collected(backend, prompt, params or SamplingParams(max_new_tokens=n, ignore_eos=True), loop)
    return out.tokens, out.last


def run_collected(backend, prompt: list[int], params: SamplingParams, loop: int = 0) -> Collector:
    """One request through a RayBackend replica, run to its end: its Collector (last: the final output)."""
    out = Collector()
    backend.loops[loop].submit(prompt, params, uuid.uuid4().hex, out)
    out.last = out.wait()
    assert not isinstance(out.last, Exception), out.last
    return out
