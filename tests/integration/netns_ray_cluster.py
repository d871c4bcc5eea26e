"""The `lab_cluster` fixture: specserve.bench.lab_cluster's cluster of network-namespace hosts
(Ray head, verify, draft and prefill nodes, Redis, the scheduler SERVING), serving the tiny model.

Without root or `ip netns` the tests skip with the reason; under CI (`CI` set) that is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from specserve.bench.lab_cluster import LabRayCluster, lab_ray_cluster
from specserve.cluster.netns_lab import lab_unavailable_reason

from tests.helpers.tiny_folder import save_tiny_model


def require_root_lab() -> None:
    reason = lab_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI runs as root and requires it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def lab_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRayCluster]:
    require_root_lab()
    model_folder = save_tiny_model(tmp_path_factory.mktemp("tiny-netns"), max_position_embeddings=1024)
    with lab_ray_cluster(model_folder) as cluster:
        yield cluster
