"""`ray up deploy/cluster.yaml` for real, onto four lab hosts (network namespaces, each its own
machine with an sshd: tests/integration/netns_sshd.py), then `ray down`.

The test copy of the config is the real file loaded and changed only where this lab differs from
a user's machines: the addresses, the ssh user and key, and the setup commands that pip-install
(the hosts have no internet: they link this checkout's .venv instead). File mounts, the roles map
and settings (~/.config/specserve, synced to every host), the head's and workers' start commands
(deploy/start-node.sh stop/start) and the autoscaler that sets up the workers run as written.

    laptop   the launcher (`ray up` / `ray down`): the head's network, its own /root and /tmp
    head     10.213.X.1   Ray head, the autoscaler, `specserve serve` (gRPC on 50051, token)
    verify / draft / prefill   .2 .3 .4   roles from ~/.config/specserve/roles

The answer of a streamed gRPC Generate (sent from inside the lab) must equal the in-process greedy
reference. Teardown (also after a failure) kills every process in the lab's namespaces and removes
the work folder; nothing is written to this machine's /root or /tmp.

Without root, `ip netns`, openssh-server or rsync the test skips with the reason; under CI that is
an error.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from specserve.cluster.netns_lab import NetnsLab, lab_unavailable_reason

from tests.helpers.tiny_folder import GreedyReference, save_tiny_model
from tests.integration.netns_sshd import SshHosts, sshd_unavailable_reason

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
HOSTS = ["head", "verify", "draft", "prefill"]
ROLES = ("verify", "draft", "prefill")
SERVE_PORT = 50051  # start-node.sh's default: each host has its own address
CONFIG_DIR = "/root/.config/specserve"  # ~/.config/specserve on every host (its own /root)
RAY_UP_TIMEOUT_S = 300.0
SERVING_TIMEOUT_S = 300.0
DOWN_TIMEOUT_S = 120.0
MAX_TOKENS = 8
PROMPT = [5, 7, 9, 11, 13, 17]  # token ids; longer than --prefill-threshold: the prefill worker runs it


def require_lab() -> None:
    reason = lab_unavailable_reason() or sshd_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI runs as root and requires it", pytrace=False)
        pytest.skip(reason)


def cluster_yaml_copy(lab: NetnsLab, key: Path) -> dict:
    """deploy/cluster.yaml with this lab's addresses and key, and setup commands that link the
    checkout's .venv instead of installing one."""
    config = yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text())
    config["provider"]["head_ip"] = lab["head"].address
    config["provider"]["worker_ips"] = [lab[role].address for role in ROLES]
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    installs = [c for c in config["setup_commands"] if "pip install" in c or "-m venv" in c]
    assert installs, "deploy/cluster.yaml no longer installs a venv: update this test's setup commands"
    config["setup_commands"] = [f"ln -sfn {VENV} ~/specserve/.venv",
                                *(c for c in config["setup_commands"] if c not in installs)]
    return config


def settings(lab: NetnsLab, token: str) -> tuple[str, str]:
    """(roles map, specserve.env) of ~/.config/specserve on the laptop, synced to every host."""
    roles = "".join(f"{lab[role].address}  {role}\n" for role in ROLES)
    model = f"{CONFIG_DIR}/model"
    env = {
        "SPECSERVE_MODEL": model,
        "SPECSERVE_TOKEN": token,  # required: the server listens beyond loopback
        "SPECSERVE_PORT": str(SERVE_PORT),
        "SPECSERVE_SERVE_ARGS": (f"--verify-replicas 1 --prefill-replicas 1 --prefill-threshold 2 --spec model "
                                 f"--draft-model {model} --draft-replicas 1 --threads 1 --kv-cache-gb 0.05 "
                                 f"--block-size 4 --shutdown-grace-s 2"),
        # Small nodes for a 2-core machine; the head without Ray's dashboard (ten processes).
        "SPECSERVE_RAY_ARGS": "--num-cpus=1 --object-store-memory=78643200",
        "SPECSERVE_RAY_HEAD_ARGS": "--include-dashboard=false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
    }
    return roles, "".join(f"{k}={v}\n" for k, v in env.items())


class Launcher:
    """`ray up` / `ray down` of the test copy, run as the laptop; their output in the work folder."""

    def __init__(self, hosts: SshHosts, config: Path):
        self.hosts, self.config = hosts, config

    def run(self, name: str, *args: str, timeout: float) -> None:
        log_path = self.hosts.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = self.hosts.lab["head"].popen(
                self.hosts.laptop_argv([str(VENV / "bin" / "ray"), *args, "-y", "--log-style", "record",
                                        str(self.config)]),
                cwd=REPO, env=_laptop_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ray {name} still running after {timeout:.0f}s:\n{_tail(log_path)}", pytrace=False)
        assert rc == 0, f"ray {name} exited {rc}:\n{_tail(log_path)}"


def _laptop_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPECSERVE_"))}
    return {**env, "HOME": "/root", "PATH": f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path})"


@pytest.fixture(scope="module")
def ray_up_cluster():
    """The lab's hosts running sshd, after `ray up` of the test copy returned."""
    require_lab()
    workdir = Path(tempfile.mkdtemp(prefix="snu-", dir="/var/tmp"))  # not /tmp: each host has its own
    lab = NetnsLab.create(HOSTS)
    try:
        hosts = SshHosts.start(lab, workdir)
        config_dir = hosts.laptop / "home" / ".config" / "specserve"
        model = save_tiny_model(config_dir / "model", max_position_embeddings=1024)
        token = secrets.token_hex(16)
        roles, env = settings(lab, token)
        (config_dir / "roles").write_text(roles)
        (config_dir / "specserve.env").write_text(env)
        config = hosts.laptop / "home" / "cluster.yaml"
        config.write_text(yaml.safe_dump(cluster_yaml_copy(lab, hosts.client_key), sort_keys=False))
        launcher = Launcher(hosts, config)
        launcher.run("up", "up", "--no-config-cache", "--disable-usage-stats", timeout=RAY_UP_TIMEOUT_S)
        yield hosts, launcher, model, token
    finally:
        try:
            lab.teardown()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


# A gRPC client inside the lab (the head's network): polls health until SERVING, then streams one
# greedy request. argv: target, token, timeout_s, max_tokens, prompt token ids (JSON). Prints JSON.
LAB_CLIENT = """
import json, sys, time
import grpc
from specserve.scheduler.client import Client

target, token, timeout_s, max_tokens, prompt = sys.argv[1:]
deadline = time.monotonic() + float(timeout_s)
with Client(target, token=token) as client:
    while True:
        try:
            status = client.health(timeout=5)
        except grpc.RpcError as e:
            status = e.code().name
        if status == "SERVING" or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # poll interval while the cluster starts
    chunks = [] if status != "SERVING" else [
        list(c.token_ids) for c in client.generate(prompt_token_ids=json.loads(prompt), max_tokens=int(max_tokens),
                                                   ignore_eos=True, timeout=120)]
print(json.dumps({"health": status, "chunks": chunks}))
"""

# Run on the head (over ssh, as a user would): what every alive Ray node offers.
NODE_RESOURCES = """
import json, ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
print(json.dumps([n["Resources"] for n in ray.nodes() if n["Alive"]]))
"""


def lab_generate(hosts: SshHosts, token: str, prompt: list[int]) -> dict:
    head = hosts.lab["head"]
    out = head.run([sys.executable, "-c", LAB_CLIENT, f"{head.address}:{SERVE_PORT}", token,
                    str(SERVING_TIMEOUT_S), str(MAX_TOKENS), json.dumps(prompt)],
                   cwd=REPO, capture_output=True, text=True, timeout=SERVING_TIMEOUT_S + 180)
    logs = head_logs(hosts)
    assert out.returncode == 0, f"lab client failed:\n{out.stderr[-4000:]}\n{logs}"
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["health"] == "SERVING", f"gRPC health {answer['health']}\n{logs}"
    return answer


def head_logs(hosts: SshHosts) -> str:
    """The head's serve.log and the end of its autoscaler's output (how the workers' setup went)."""
    tmp = hosts.hosts["head"].tmp
    monitor = sorted(tmp.glob("ray/session_2*/logs/monitor.out"))
    return (f"serve.log:\n{_tail(tmp / 'specserve' / 'serve.log')}\nmonitor.out:\n"
            f"{_tail(monitor[-1], 4000) if monitor else '(none)'}")


def node_resources(hosts: SshHosts) -> list[dict]:
    out = hosts.lab["head"].run(hosts.ssh_argv("head", "~/specserve/.venv/bin/python -"), input=NODE_RESOURCES,
                                capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def leftover_processes(hosts: SshHosts, names: list[str], pattern: str = "") -> dict[str, list[str]]:
    """Per host of names, the command lines (containing pattern) of processes in its namespace
    other than its sshd's."""
    left = {}
    for name in names:
        pids = subprocess.run(["ip", "netns", "pids", hosts.hosts[name].host.netns], check=False, capture_output=True,
                              text=True)
        cmds = []
        for pid in map(int, pids.stdout.split()):
            try:
                proc = psutil.Process(pid)
                if proc.status() == psutil.STATUS_ZOMBIE or proc.name() in ("sshd", "unshare", "sh"):
                    continue
                cmds.append(" ".join(proc.cmdline()))
            except psutil.Error:
                continue
        if cmds := [c for c in cmds if c and pattern in c]:
            left[name] = cmds
    return left


def wait_gone(hosts: SshHosts, names: list[str], pattern: str, after: str) -> None:
    """Polls until no process matching pattern is left on the hosts names."""
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while left := leftover_processes(hosts, names, pattern):
        assert time.monotonic() < deadline, f"left running {DOWN_TIMEOUT_S:.0f}s after {after}: {left}"
        time.sleep(0.5)  # poll interval while processes notice the head is gone


def test_ray_up_starts_a_cluster_that_serves_and_ray_down_stops_it(ray_up_cluster):
    hosts, launcher, model, token = ray_up_cluster
    real_home = {p.name for p in Path("/root").glob("ray_bootstrap_*")}
    answer = lab_generate(hosts, token, PROMPT)

    nodes = node_resources(hosts)
    assert len(nodes) == 1 + len(ROLES), nodes
    for role in ROLES:
        assert sum(n.get(f"specserve_{role}", 0) for n in nodes) == 1, (role, nodes)
    tokens = [t for chunk in answer["chunks"] for t in chunk]
    assert len(answer["chunks"]) >= 2, answer  # streamed
    assert tokens == GreedyReference(model)(PROMPT, MAX_TOKENS), answer
    assert (hosts.hosts["head"].home / "ray_bootstrap_config.yaml").exists()  # the launcher's, on the head

    launcher.run("down", "down", timeout=DOWN_TIMEOUT_S)
    # Ray's local provider stops Ray on the head only; a worker's raylet, and its actors with it,
    # exit once they lose the head. Ray's helpers on a worker wait for `start-node.sh stop` there.
    wait_gone(hosts, ["head"], "", "`ray down`")
    wait_gone(hosts, list(ROLES), "raylet", "`ray down`")
    wait_gone(hosts, list(ROLES), "Worker", "`ray down`")  # ray::VerifyWorker, ...
    for role in ROLES:
        stop = hosts.lab["head"].run(hosts.ssh_argv(role, "bash ~/specserve/deploy/start-node.sh stop"),
                                     capture_output=True, text=True, timeout=DOWN_TIMEOUT_S)
        assert stop.returncode == 0, (role, stop.stdout, stop.stderr)
    wait_gone(hosts, list(ROLES), "", "`start-node.sh stop` on the workers")
    assert {p.name for p in Path("/root").glob("ray_bootstrap_*")} == real_home  # this machine's home untouched
