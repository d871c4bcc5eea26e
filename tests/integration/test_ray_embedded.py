"""`specserve serve` without --address starts its own Ray, whatever an earlier cluster left behind.

`ray start` writes the cluster's address to `<ray temp>/ray_current_cluster`; once that cluster
is gone the file is stale, and a plain `ray.init(num_cpus=...)` would try to join it ("When
connecting to an existing cluster, num_cpus and num_gpus must not be provided"). The embedded
start runs in a child process with its own Ray temp folder (RAY_TMPDIR), so neither the shared
test cluster nor a real /tmp/ray is touched.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")

DEAD_ADDRESS = "127.0.0.1:1"  # nothing listens on port 1

CHILD = """
import ray
from specserve.cluster.ray_cluster import RayConnectConfig, connect, disconnect

info = connect(RayConnectConfig(num_cpus=1))
answer = ray.get(ray.remote(lambda: 42).remote())
print("embedded", info.embedded, "address", info.address, "answer", answer)
disconnect()
"""


def test_embedded_ray_starts_its_own_despite_a_stale_current_cluster_file():
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(DEAD_ADDRESS)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0")
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        words = done.stdout.split()
        assert words[words.index("embedded") + 1] == "True" and words[words.index("answer") + 1] == "42"
        assert not words[words.index("address") + 1].endswith(":1")  # a new cluster, not the stale one
    finally:
        shutil.rmtree(temp, ignore_errors=True)
