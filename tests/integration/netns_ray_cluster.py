"""A real specserve cluster whose hosts are network namespaces (specserve.cluster.netns_lab): a
Ray node per host, each started by `deploy/start-node.sh start` inside its namespace with the
host's lab address, and the scheduler (`specserve serve --address auto`) on the head.

    head     10.213.X.1   Ray head (GCS), `specserve serve` on its lab address, the load client
    verify   .2           role verify   (VerifyWorker)
    draft    .3           role draft    (DraftWorker: the tiny model drafting for itself, --spec model)
    prefill  .4           role prefill  (PrefillWorker: prompts of >= PREFILL_THRESHOLD tokens)
    spare    .5           no Ray node until `start_spare()`: then a second node offering verify

The test process cannot reach lab addresses (nothing in the root namespace changes): it talks
to the server through a load client (tests/helpers/netns_load_client.py) running on the head.
Teardown (also after a failed start) kills every process of every namespace, deletes them and
the work folder (Ray's temp dir, logs); no `ray stop`, which would stop every Ray of this machine.

Without root or `ip netns` the tests skip with the reason; under CI (`CI` set) that is an error.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from specserve.cluster.netns_lab import Host, NetnsLab, lab_unavailable_reason

from tests.helpers.start_node import START_NODE, wait_started
from tests.helpers.tiny_folder import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HOSTS = ["head", "verify", "draft", "prefill", "spare"]
ROLES = ("verify", "draft", "prefill")
RAY_PORT, SERVE_PORT = 6379, 50051  # each host has its own address: the defaults cannot collide
PREFILL_THRESHOLD = 8  # prompts of at least this many tokens go through the prefill worker
SERVING_TIMEOUT_S = 300.0
REPLY_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 120.0  # for the workers to release the last requests' sequences (and Ray to restart them)
# Ray's GCS declares a silent node dead after failure_threshold missed health checks (default
# ~30 s and more); a lab host that lost its link is noticed in about 10 s.
RAY_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                     "RAY_health_check_failure_threshold": "5"}


def require_root_lab() -> None:
    reason = lab_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI runs as root and requires it", pytrace=False)
        pytest.skip(reason)


class HeadProcess:
    """A helper process on the head host driven by JSON lines (tests/helpers/netns_load_client.py,
    netns_worker_stats.py). The load client's finished requests collect in `records`, the ids of
    those streaming now (a first message came, the last did not) in `streaming`."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.records: list[dict] = []
        self.streaming: set[str] = set()
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.startswith("{"):  # not ours: a library's print
                print(f"{self.proc.args[-2]}: {line.rstrip()}", file=sys.stderr)
                continue
            event = json.loads(line)
            if event["event"] == "streaming":
                self.streaming.add(event["id"])
            elif event["event"] == "request":
                self.streaming.discard(event["id"])
                self.records.append(event)
            else:
                self._replies.put(event)

    def command(self, cmd: str, reply_timeout_s: float = REPLY_TIMEOUT_S, **args) -> dict:
        """Sends a command and returns its reply; AssertionError when none comes in time."""
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self._replies.get(timeout=reply_timeout_s)
        except queue.Empty:
            raise AssertionError(f"{self.proc.args}: no reply to {cmd!r} within {reply_timeout_s:.0f}s "
                                 f"(exit code {self.proc.poll()})") from None
        assert reply["event"] != "error", reply
        return reply


class LabRayCluster:
    """The running cluster: its hosts, Ray's and the server's logs, and the faults' handles."""

    def __init__(self, lab: NetnsLab, workdir: Path, model_folder: str):
        self.lab, self.workdir, self.model_folder = lab, workdir, model_folder
        self.token = secrets.token_hex(16)
        self.head_address = lab["head"].address
        self.target = f"{self.head_address}:{SERVE_PORT}"
        self.load: HeadProcess | None = None  # tests/helpers/netns_load_client.py
        self.stats: HeadProcess | None = None  # tests/helpers/netns_worker_stats.py: a Ray driver
        self.serve_proc: subprocess.Popen | None = None  # a restarted server (`start-node.sh serve`)
        self.base_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPECSERVE_"))},
            **RAY_HEALTH_CHECKS,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "SPECSERVE_TOKEN": self.token,  # required: the server listens beyond loopback
            "SPECSERVE_CONFIG_DIR": str(workdir / "config"),
            "SPECSERVE_LOG_DIR": str(workdir / "log"),
            "SPECSERVE_RAY_PORT": str(RAY_PORT),
            "SPECSERVE_HOST": self.head_address,
            "SPECSERVE_PORT": str(SERVE_PORT),
            "SPECSERVE_MODEL": model_folder,
            "SPECSERVE_WAIT_FOR_ROLES": ",".join(ROLES),
            # One actor per role on its role's host. Every actor takes 0.5 of its node's one CPU, so
            # a restarted scheduler's lookups and Ray's restarts never wait for a CPU.
            "SPECSERVE_SERVE_ARGS": (
                f"--verify-replicas 1 --prefill-replicas 1 --prefill-threshold {PREFILL_THRESHOLD} "
                f"--spec model --draft-model {model_folder} --draft-replicas 1 "
                f"--verify-cpus 0.5 --draft-cpus 0.5 --prefill-cpus 0.5 "
                f"--threads 1 --kv-cache-gb 0.05 --block-size 4 --shutdown-grace-s 2 --no-http --no-metrics"),
        }

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    def node_env(self, host: Host, role: str) -> dict[str, str]:
        ray_args = [f"--temp-dir={self.workdir / 'ray'}", "--num-cpus=1", "--object-store-memory=78643200",
                    "--disable-usage-stats", f"--node-ip-address={host.address}"]
        env = {**self.base_env, "SPECSERVE_ROLE": role}
        if role == "head":
            ray_args.append("--include-dashboard=false")
            env["RAY_ADDRESS"] = f"{self.head_address}:{RAY_PORT}"  # what `--address auto` resolves to
        else:
            env["SPECSERVE_HEAD_ADDRESS"] = f"{self.head_address}:{RAY_PORT}"
        env["SPECSERVE_RAY_ARGS"] = " ".join(ray_args)
        return env

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else f"(no {path.name})"

    def start_node(self, name: str, role: str) -> None:
        """`start-node.sh start` on the host (Ray's daemons stay in its namespace after it exits)."""
        with open(self.log_dir / f"start-{name}.log", "wb") as log:
            proc = self.lab[name].popen(["bash", str(START_NODE), "start"], env=self.node_env(self.lab[name], role),
                                        cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
        wait_started(proc, f"on {name}", lambda: self.log("start-" + name))

    def start_spare(self) -> None:
        """The spare host joins, offering verify: where a lost verify actor can be restarted."""
        self.start_node("spare", "verify")

    def serve_pid(self) -> int | None:
        if self.serve_proc is not None:
            return self.serve_proc.pid
        path = self.log_dir / "serve.pid"
        return int(path.read_text()) if path.exists() else None

    def serve_alive(self) -> bool:
        pid = self.serve_pid()
        try:
            return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def wait_serving(self) -> None:
        """Polls gRPC health from the head until SERVING, while the server runs."""
        deadline = time.monotonic() + SERVING_TIMEOUT_S
        while (status := self.load.command("health")["status"]) != "SERVING":
            assert self.serve_alive(), f"specserve serve is not running; serve.log:\n{self.log('serve')}"
            assert time.monotonic() < deadline, (f"health not SERVING after {SERVING_TIMEOUT_S:.0f}s (last: "
                                                 f"{status}); serve.log:\n{self.log('serve')}")
            time.sleep(0.5)  # poll interval, not a wait-for-ready guess

    def worker_pid(self, host: str, actor_class: str) -> int:
        """The Ray worker process in the host's namespace whose title names actor_class (Ray sets
        it to `ray::<ActorClass>...`); waits while it is being (re)started."""
        ns = self.lab[host].netns
        deadline = time.monotonic() + SERVING_TIMEOUT_S
        while True:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout.split()
            found = []
            for pid in map(int, pids):
                try:
                    if " ".join(psutil.Process(pid).cmdline()).startswith(f"ray::{actor_class}"):
                        found.append(pid)
                except psutil.Error:
                    continue
            if len(found) == 1:
                return found[0]
            assert len(found) < 2, f"several {actor_class} processes on {host}: {found}"
            assert time.monotonic() < deadline, f"no {actor_class} process on {host} after {SERVING_TIMEOUT_S:.0f}s"
            time.sleep(0.2)  # poll interval while Ray restarts the actor

    def idle_worker_stats(self, with_draft: bool = True) -> dict:
        """What the verify and draft workers hold once idle (see netns_worker_stats); with_draft:
        wait until the draft worker answers (False: its host is lost)."""
        if self.stats is None:
            env = {**self.node_env(self.lab["head"], "head"), "RAY_AUTH_MODE": "token"}
            self.stats = self.start_helper("tests.helpers.netns_worker_stats", "specserve", env=env)
        return self.stats.command("idle", reply_timeout_s=IDLE_TIMEOUT_S + REPLY_TIMEOUT_S, timeout_s=IDLE_TIMEOUT_S,
                                  draft=with_draft)

    def restart_serve(self) -> None:
        """`start-node.sh serve` on the head (what start-node.sh runs in the background at start)."""
        with open(self.log_dir / "serve.log", "ab") as log:
            self.serve_proc = self.lab["head"].popen(
                ["bash", str(START_NODE), "serve"], env=self.node_env(self.lab["head"], "head"), cwd=self.workdir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def start_helper(self, module: str, *args: str, env: dict[str, str]) -> HeadProcess:
        return HeadProcess(self.lab["head"].popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))


@pytest.fixture(scope="module")
def lab_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRayCluster]:
    """Head, verify, draft and prefill hosts each running a Ray node, the scheduler SERVING."""
    require_root_lab()
    model_folder = save_tiny_model(tmp_path_factory.mktemp("tiny-netns"), max_position_embeddings=1024)
    workdir = Path(tempfile.mkdtemp(prefix="snr-", dir="/tmp"))  # short: Ray's unix socket paths are limited
    (workdir / "log").mkdir()
    (workdir / "config").mkdir()  # empty: no user settings leak in
    lab = NetnsLab.create(HOSTS)
    try:
        cluster = LabRayCluster(lab, workdir, model_folder)
        cluster.start_node("head", "head")
        for role in ROLES:  # one at a time, as nodes join a real cluster
            cluster.start_node(role, role)
        cluster.load = cluster.start_helper("tests.helpers.netns_load_client", cluster.target, env=cluster.base_env)
        cluster.wait_serving()
        yield cluster
    finally:
        lab.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
