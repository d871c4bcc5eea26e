"""deploy/start-node.sh as the cluster tests run it: where it is, and waiting for `start` to end."""

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

START_NODE = Path(__file__).resolve().parents[2] / "deploy" / "start-node.sh"
RAY_START_TIMEOUT_S = 180.0  # `ray start` of one node on a busy 2-core machine


def wait_started(proc: subprocess.Popen, what: str, log: Callable[[], str]) -> None:
    """Waits for a `start-node.sh start` run to exit 0; fails the test with its log otherwise."""
    try:
        rc = proc.wait(timeout=RAY_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"start-node.sh ({what}) still running after {RAY_START_TIMEOUT_S:.0f}s:\n{log()}", pytrace=False)
    assert rc == 0, f"start-node.sh ({what}) exited {rc}:\n{log()}"
