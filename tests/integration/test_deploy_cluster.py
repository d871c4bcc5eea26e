"""deploy/start-node.sh for real: it brings up a multi-node Ray cluster on this machine (a head and
one node per role, roles from SPECSERVE_ROLE), the head's `specserve serve --address auto` joins
it, and clients get answers over gRPC (streamed) and over the OpenAI HTTP API on the port the
script gives it. (The script's role handling against stand-in commands: test_deploy_start.py.)

These are the commands `ray up` (deploy/cluster*.yaml) and the KubeRay head run; only the ports,
the temp dir and the model differ. The cluster is isolated (its own --temp-dir and ports) and is
torn down by process session and temp dir, never with a global `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest

from specserve.scheduler.client import Client

from specserve.bench.lab_cluster import START_NODE, wait_started
from tests.helpers.tiny_folder import save_tiny_model

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
ROLES = ("prefill", "draft", "verify")
SERVING_TIMEOUT_S = 300.0
GENERATE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0  # the server's drain
KILL_AFTER_S = 5.0  # Ray's processes after SIGTERM (gcs_server does not exit on it)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll_serve(cluster, probe, wanted, what: str) -> None:
    """Calls probe() until it returns wanted, while the head's `specserve serve` stays alive,
    for at most SERVING_TIMEOUT_S; fails with serve.log otherwise."""
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while (status := probe()) != wanted:
        pid = cluster.serve_pid()
        running = pid is not None and psutil.pid_exists(pid) and _running(psutil.Process(pid))
        assert running, f"specserve serve is not running; serve.log:\n{cluster.log('serve')}"
        assert time.monotonic() < deadline, (f"{what} not {wanted} after {SERVING_TIMEOUT_S:.0f}s (last: {status}); "
                                             f"serve.log:\n{cluster.log('serve')}")
        time.sleep(0.2)  # poll interval, not a wait-for-ready guess


def _running(proc: psutil.Process) -> bool:
    """Running and not a zombie (a reparented zombie is reaped by init, not by us)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- the real cluster --------------------------------------------------------------------------

@dataclass
class LocalCluster:
    """A Ray cluster started by deploy/start-node.sh on this machine, and what it left behind."""

    workdir: Path  # short path: Ray's unix sockets live under it
    ray_port: int
    serve_port: int
    http_port: int
    base_env: dict[str, str]
    sessions: set[int] = field(default_factory=set)  # process sessions of the script runs

    @property
    def temp_dir(self) -> Path:
        return self.workdir / "ray"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    def node_env(self, role: str, head: bool) -> dict[str, str]:
        # Every port named: several raylets on one machine must not reach for the same defaults.
        ports = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "metrics-export-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port")
        ray_args = [f"--temp-dir={self.temp_dir}", "--num-cpus=1", "--object-store-memory=78643200",
                    "--disable-usage-stats", *(f"--{name}={_free_port()}" for name in ports)]
        if head:
            ray_args += ["--include-dashboard=false", f"--ray-client-server-port={_free_port()}"]
        env = {**self.base_env, "SPECSERVE_ROLE": role, "SPECSERVE_RAY_ARGS": " ".join(ray_args)}
        if head:
            env["RAY_ADDRESS"] = f"127.0.0.1:{self.ray_port}"  # what `--address auto` resolves to here
        else:
            env["SPECSERVE_HEAD_ADDRESS"] = f"127.0.0.1:{self.ray_port}"
        return env

    def start_node(self, role: str, head: bool = False) -> subprocess.Popen:
        log = open(self.log_dir / f"start-{role}.log", "wb")
        proc = subprocess.Popen(["bash", str(START_NODE), "start"], env=self.node_env(role, head), cwd=self.workdir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.sessions.add(proc.pid)  # a new session: its id is the leader's pid
        return proc

    def wait_started(self, proc: subprocess.Popen, role: str) -> None:
        wait_started(proc, role, lambda: self.log("start-" + role))

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else f"(no {path.name})"

    def serve_pid(self) -> int | None:
        path = self.log_dir / "serve.pid"
        return int(path.read_text()) if path.exists() else None

    def _ours(self, proc: psutil.Process) -> bool:
        try:
            if os.getsid(proc.pid) in self.sessions:
                return True
            return str(self.workdir) in " ".join(proc.cmdline())
        except (psutil.Error, ProcessLookupError, PermissionError):
            return False

    def teardown(self) -> None:
        """Stops the server (SIGTERM, as `start-node.sh stop` does) and every process of this cluster."""
        pid = self.serve_pid()
        if pid is not None:
            self.sessions.add(pid)  # started with setsid: it leads its own session
            try:
                server = psutil.Process(pid)
                server.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while _running(server) and time.monotonic() < deadline:
                    time.sleep(0.1)  # poll interval while the server drains
            except psutil.Error:
                pass
        me = os.getpid()
        procs = [p for p in psutil.process_iter() if p.pid != me and self._ours(p)]
        for send in (psutil.Process.terminate, psutil.Process.kill):
            for p in procs:
                try:
                    send(p)
                except psutil.Error:
                    pass
            deadline = time.monotonic() + KILL_AFTER_S
            while (procs := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
                time.sleep(0.1)  # poll interval while processes exit


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def cluster(model_folder):
    """Head (scheduler) + one node per role, each started by deploy/start-node.sh."""
    if shutil.which("ray", path=str(VENV_BIN)) is None:
        pytest.fail(f"no `ray` next to {sys.executable}", pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="ssd-", dir="/tmp"))  # short: unix socket paths are limited
    (workdir / "log").mkdir()
    (workdir / "config").mkdir()  # empty: no user settings leak in
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPECSERVE_"))},
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # Ray's token auth, as deploy/README.md sets it up
        "SPECSERVE_CONFIG_DIR": str(workdir / "config"),
        "SPECSERVE_LOG_DIR": str(workdir / "log"),
        "SPECSERVE_RAY_PORT": str(_free_port()),
        "SPECSERVE_HOST": "127.0.0.1",
        "SPECSERVE_PORT": str(_free_port()),
        "SPECSERVE_HTTP_PORT": str(_free_port()),
        "SPECSERVE_METRICS_PORT": "0",
        "SPECSERVE_MODEL": model_folder,
        "SPECSERVE_WAIT_FOR_ROLES": ",".join(ROLES),  # a static cluster: the server starts once all joined
        # One actor per role, each on its role's node: prompts go through the prefill worker, the
        # draft model (the tiny model drafting for itself) runs in the draft worker.
        "SPECSERVE_SERVE_ARGS": (f"--verify-replicas 1 --prefill-replicas 1 --prefill-threshold 2 "
                                 f"--spec model --draft-model {model_folder} --draft-replicas 1 "
                                 f"--threads 1 --kv-cache-gb 0.05 --block-size 4 --shutdown-grace-s 2"),
    }
    c = LocalCluster(workdir, int(base_env["SPECSERVE_RAY_PORT"]), int(base_env["SPECSERVE_PORT"]),
                     int(base_env["SPECSERVE_HTTP_PORT"]), base_env)
    try:
        c.wait_started(c.start_node("head", head=True), "head")
        for role in ROLES:  # one at a time, as nodes join a real cluster
            c.wait_started(c.start_node(role), role)
        yield c
    finally:
        c.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


def ray_query(cluster: LocalCluster, expression: str):
    """The JSON value of `expression` evaluated by a driver connected to the cluster."""
    script = (f"import json, ray; ray.init(address='127.0.0.1:{cluster.ray_port}', logging_level='ERROR'); "
              f"print(json.dumps({expression}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**cluster.base_env, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_role_node_offers_its_role_resource(cluster):
    nodes = ray_query(cluster, "[n['Resources'] for n in ray.nodes() if n['Alive']]")
    assert len(nodes) == 1 + len(ROLES), nodes
    for role in ROLES:
        holders = [n for n in nodes if f"specserve_{role}" in n]
        assert len(holders) == 1 and holders[0][f"specserve_{role}"] == 1, (role, nodes)
        assert not any(f"specserve_{other}" in holders[0] for other in ROLES if other != role), holders


def test_head_serves_a_streamed_answer_over_grpc(cluster):
    target = f"127.0.0.1:{cluster.serve_port}"
    with Client(target) as client:

        def health() -> str:
            try:
                return client.health(timeout=5)
            except grpc.RpcError as e:
                return e.code().name

        _poll_serve(cluster, health, "SERVING", "gRPC health")
        chunks = list(client.generate(prompt="w5 w7 w9 w11", max_tokens=8, ignore_eos=True,
                                      timeout=GENERATE_TIMEOUT_S))
    text = "".join(c.text for c in chunks)
    token_ids = [t for c in chunks for t in c.token_ids]
    assert len(chunks) >= 2, chunks  # streamed: more than one message
    assert len(token_ids) == 8 and text.strip(), (token_ids, text)
    assert chunks[-1].usage.completion_tokens == 8
    for kind in ("live", "ready"):  # the probes the KubeRay head runs
        probe = subprocess.run(["bash", str(START_NODE), "probe", kind], env=cluster.base_env,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0 and probe.stdout.strip() == "SERVING", (kind, probe.stdout, probe.stderr)
    available = ray_query(cluster, "ray.available_resources()")
    for role in ROLES:  # each role's actor holds its node's role resource
        assert available.get(f"specserve_{role}", 0) == 0, (role, available)


def test_head_serves_the_openai_http_api_on_its_http_port(cluster):
    """The port start-node.sh gives `--http-port` (SPECSERVE_HTTP_PORT) answers OpenAI requests."""
    base = f"http://127.0.0.1:{cluster.http_port}"

    def health() -> object:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code  # 503 while loading or waiting for workers
        except OSError as e:
            return repr(e)

    _poll_serve(cluster, health, 200, "GET /health")
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
        [model] = [m["id"] for m in json.load(response)["data"]]
    body = json.dumps({"model": model, "prompt": "w5 w7 w9 w11", "max_tokens": 8, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=GENERATE_TIMEOUT_S) as response:
        completion = json.load(response)
    assert completion["usage"]["completion_tokens"] == 8, completion
    assert completion["choices"][0]["finish_reason"] == "length" and completion["choices"][0]["text"], completion
