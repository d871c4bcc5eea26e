"""A scheduler that joined a cluster (`--address`) before any node offers a role: its workers
wait for such a node and then serve from it (a role can start after the scheduler, or scale up
from zero); when none comes, start-up fails with a message naming the missing resource and how
to offer it. Both run in one other process (tests/helpers/late_roles_program.py): a process
joins one Ray cluster, and this session's is taken by ray_cluster_fixture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_folder import GreedyReference, save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
PROMPT, N = [5, 9, 14, 21, 30, 41], 12  # as in the program


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("late-roles"))


@pytest.fixture(scope="module")
def result(folder) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's cluster
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.late_roles_program", folder],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1])


def test_workers_wait_for_a_role_node_that_joins_later_and_serve_from_it(result, folder):
    assert not result["started_before_node"]
    assert result["started"] and result["error"] is None
    assert result["on_new_node"]
    assert result["tokens"] == GreedyReference(folder)(PROMPT, N)


def test_no_role_node_ends_start_up_with_a_message_naming_the_resource(result):
    error = result["error_without_node"]
    assert error is not None
    assert "not ready after 4 s" in error and "specserve_verify" in error and "SPECSERVE_ROLE=verify" in error
