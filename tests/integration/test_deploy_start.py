"""deploy/start-node.sh's role handling, against stand-in `ray` / `specserve` commands that record
their arguments (fast). The script bringing up a real cluster: test_deploy_cluster.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START_NODE = REPO / "deploy" / "start-node.sh"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- start-node.sh with stand-in `ray` and `specserve` (they record their arguments) -----------

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
with open(os.environ["FAKE_LOG"] + ".redis", "w") as f:  # the Redis URL the command was given
    f.write(os.environ.get("SPECSERVE_REDIS", ""))
"""


def run_script(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Runs start-node.sh with `ray` and `specserve` recording their arguments; returns the result
    and the recorded command lines (a daemonized `specserve serve` is waited for)."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name in ("ray", "specserve"):
            (bin_dir / name).write_text(RECORDER.format(python=sys.executable))
            (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    full_env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path),
                "FAKE_LOG": str(log), "SPECSERVE_CONFIG_DIR": str(tmp_path / "config"),
                "SPECSERVE_LOG_DIR": str(tmp_path / "log"), **env}
    result = subprocess.run(["bash", str(START_NODE), *args], env=full_env, capture_output=True, text=True,
                            timeout=60)
    serve_expected = result.returncode == 0 and "serve.log)" in result.stderr  # daemonized: "(log .../serve.log)"
    deadline = time.monotonic() + 30
    while serve_expected and not (log.exists() and '"specserve"' in log.read_text()):
        assert time.monotonic() < deadline, "the daemonized server never ran"
        time.sleep(0.05)  # poll interval for the daemonized stand-in
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


@pytest.mark.parametrize("role, resources", [
    ("verify", {"specserve_verify": 1}),
    ("prefill,draft", {"specserve_prefill": 1, "specserve_draft": 1}),
    ("verify:2", {"specserve_verify": 2}),
    ("all", {"specserve_prefill": 1, "specserve_draft": 1, "specserve_verify": 1}),
])
def test_start_node_turns_a_worker_role_into_ray_resources(tmp_path, role, resources):
    result, calls = run_script(tmp_path, {"SPECSERVE_ROLE": role, "SPECSERVE_HEAD_ADDRESS": "10.1.2.3:6379"})
    assert result.returncode == 0, result.stderr
    [call] = calls
    assert call[:3] == ["ray", "start", "--address=10.1.2.3:6379"]
    assert json.loads(call[3].removeprefix("--resources=")) == resources


def test_start_node_takes_the_role_from_the_roles_map_by_host_name(tmp_path):
    if Path("/etc/specserve/role").exists():
        pytest.skip("/etc/specserve/role on this machine wins over the map")
    (tmp_path / "config").mkdir()
    host = socket.gethostname()
    (tmp_path / "config" / "roles").write_text(f"# address or name, role\n10.255.0.9 verify\n{host} draft:3\n")
    (tmp_path / "config" / "specserve.env").write_text('SPECSERVE_RAY_ARGS="--num-cpus=4"\n')
    result, calls = run_script(tmp_path, {"RAY_HEAD_IP": "10.1.2.3"})
    assert result.returncode == 0, result.stderr
    assert calls == [["ray", "start", "--address=10.1.2.3:6379", '--resources={"specserve_draft": 3}',
                      "--num-cpus=4"]]


def test_start_node_refuses_a_node_without_a_known_role(tmp_path):
    missing, _ = run_script(tmp_path, {"RAY_HEAD_IP": "10.1.2.3"})
    unknown, _ = run_script(tmp_path, {"SPECSERVE_ROLE": "verifier", "RAY_HEAD_IP": "10.1.2.3"})
    assert missing.returncode == 2 and "no role for this node" in missing.stderr
    assert unknown.returncode == 2 and "unknown role 'verifier'" in unknown.stderr


def test_start_node_checks_kuberay_group_resources_against_the_role(tmp_path):
    result, calls = run_script(tmp_path, {"SPECSERVE_ROLE": "verify",
                                          "KUBERAY_GEN_RAY_START_CMD": "ray start --address=h:6379 --block"})
    assert result.returncode == 2 and "specserve_verify" in result.stderr and calls == []


def test_start_node_starts_the_head_and_its_server(tmp_path):
    env = {"SPECSERVE_ROLE": "head", "SPECSERVE_TOKEN": "t", "SPECSERVE_MODEL": "/models/m",
           "SPECSERVE_REDIS": "redis://:pw@redis:6379/0", "SPECSERVE_SERVE_ARGS": "--spec ngram --max-queued 8"}
    result, calls = run_script(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert calls[0] == ["ray", "start", "--head", "--port=6379"]
    # Token and Redis URL reach the server as environment: never on a command line (ps shows it).
    assert calls[1] == ["specserve", "serve", "--address", "auto", "--host", "0.0.0.0", "--port", "50051",
                        "--http-port", "8000", "--metrics-port", "9464", "--model", "/models/m", "--spec", "ngram",
                        "--max-queued", "8"]
    assert (tmp_path / "log" / "serve.pid").exists()


def test_start_node_gives_the_head_its_own_ray_flags_and_keeps_the_settings_ones(tmp_path):
    """cluster.yaml passes the autoscaler's config by SPECSERVE_AUTOSCALING_CONFIG: specserve.env's
    SPECSERVE_RAY_ARGS (every node) and SPECSERVE_RAY_HEAD_ARGS (head-only flags) still apply."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "specserve.env").write_text(
        'SPECSERVE_RAY_ARGS="--num-cpus=4"\nSPECSERVE_RAY_HEAD_ARGS=--include-dashboard=false\n')
    result, calls = run_script(tmp_path, {"SPECSERVE_ROLE": "head", "SPECSERVE_AUTOSCALING_CONFIG": "/h/boot.yaml"})
    assert result.returncode == 0, result.stderr
    assert calls[0] == ["ray", "start", "--head", "--port=6379", "--num-cpus=4", "--include-dashboard=false",
                        "--autoscaling-config=/h/boot.yaml"]


def test_start_node_starts_a_local_redis_with_a_password_for_the_server(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server not installed; CI requires it", pytrace=False)
        pytest.skip("redis-server not installed")
    port = _free_port()
    result, calls = run_script(tmp_path, {"SPECSERVE_ROLE": "head", "SPECSERVE_REDIS": "local",
                                          "SPECSERVE_REDIS_PORT": str(port), "SPECSERVE_NODE_IP": "127.0.0.1"})
    redis_pid = int((tmp_path / "log" / "redis.pid").read_text())
    try:
        assert result.returncode == 0, result.stderr
        url = (tmp_path / "calls.jsonl.redis").read_text()
        password = re.fullmatch(rf"redis://:([0-9a-f]{{48}})@127\.0\.0\.1:{port}/0", url).group(1)
        assert password not in " ".join(sum(calls, [])) and password not in result.stderr
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(64).startswith(b"-NOAUTH")
            s.sendall(f"AUTH {password}\r\nCONFIG GET maxmemory-policy\r\n".encode())
            deadline = time.monotonic() + 5
            reply = b""
            while b"allkeys-lru" not in reply and time.monotonic() < deadline:
                reply += s.recv(256)
            assert reply.startswith(b"+OK") and b"allkeys-lru" in reply, reply
    finally:
        os.kill(redis_pid, signal.SIGTERM)


def test_start_node_in_a_container_runs_ray_and_the_server_in_the_foreground(tmp_path):
    result, calls = run_script(tmp_path, {"SPECSERVE_ROLE": "head,verify", "SPECSERVE_FOREGROUND": "1",
                                          "SPECSERVE_PORT": "6000", "SPECSERVE_HTTP_PORT": "6001"})
    assert result.returncode == 0, result.stderr  # the stand-ins exit at once: so does the script
    said = [line.removeprefix("start-node: ") for line in result.stderr.splitlines()]
    assert 'ray start --head --port=6379 --resources={"specserve_verify": 1} --block' in said
    assert ["ray", "health-check", "--address", "127.0.0.1:6379"] in calls  # the server waits for Ray
    serve = "specserve serve --address auto --host 0.0.0.0 --port 6000 --http-port 6001 --metrics-port 9464"
    assert said.index(serve) > said.index('ray start --head --port=6379 --resources={"specserve_verify": 1} --block')
    assert "a process exited (0); stopping the rest" in said
