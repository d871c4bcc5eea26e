"""A real specserve cluster whose hosts are network namespaces (specserve.cluster.netns_lab): a
Ray node per host, each started by `deploy/start-node.sh start` inside its namespace with the
host's lab address, the scheduler (`specserve serve --address auto`) on the head, and a
redis-server (the shared prefix cache) on its own host. `specserve bench chaos` and the fault
tests (tests/integration/test_netns_ray_faults.py) run on it.

    head     10.213.X.1   Ray head (GCS), `specserve serve` on its lab address, the load client
    verify   .2           role verify   (VerifyWorker)
    draft    .3           role draft    (DraftWorker: the model drafting for itself, --spec model)
    prefill  .4           role prefill  (PrefillWorker: prompts of >= PREFILL_THRESHOLD tokens)
    spare    .5           no Ray node until `start_node("spare", "verify")`: a second verify host
    redis    .6           redis-server (SPECSERVE_REDIS of the server and its workers)

This process cannot reach lab addresses (nothing in the root namespace changes): it talks to the
server through a load client (bench/lab_load_client.py) running on the head. Teardown (also after
a failed start) kills every process of every namespace, deletes them and the work folder (Ray's
temp dir, logs); no `ray stop`, which would stop every Ray of this machine. `deploy/` must be
beside this package (a checkout, installed editable: `deploy/setup.sh`).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from specserve.cluster.netns_lab import Host, NetnsLab

REPO = Path(__file__).resolve().parents[1]
START_NODE = REPO / "deploy" / "start-node.sh"
VENV_BIN = Path(sys.executable).parent
HOSTS = ["head", "verify", "draft", "prefill", "spare", "redis"]
ROLES = ("verify", "draft", "prefill")
RAY_PORT, SERVE_PORT, REDIS_PORT = 6379, 50051, 6379  # each host has its own address: no collisions
PREFILL_THRESHOLD = 8  # prompts of at least this many tokens go through the prefill worker
# Short prompts are prefilled by the verify worker, long ones (>= PREFILL_THRESHOLD) by the prefill worker.
PROMPTS = [" ".join(f"w{(7 * i + 3 * j) % 90 + 3}" for j in range(n)) for i, n in enumerate((4, 12, 6, 20, 9, 5))]
RAY_START_TIMEOUT_S = 180.0  # `ray start` of one node on a busy 2-core machine
SERVING_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 20.0  # redis-server
REPLY_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 120.0  # for the workers to release the last requests' sequences (and Ray to restart them)
# Ray's GCS declares a silent node dead after failure_threshold missed health checks (default
# ~30 s and more); a lab host that lost its link is noticed in about 10 s.
RAY_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                     "RAY_health_check_failure_threshold": "5"}


def wait_started(proc: subprocess.Popen, what: str, log: Callable[[], str]) -> None:
    """Waits for a `start-node.sh start` run to exit 0; RuntimeError with its log otherwise."""
    try:
        rc = proc.wait(timeout=RAY_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"start-node.sh ({what}) still running after {RAY_START_TIMEOUT_S:.0f}s:\n{log()}") from None
    if rc != 0:
        raise RuntimeError(f"start-node.sh ({what}) exited {rc}:\n{log()}")


def poll_until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Polls condition every 0.2 s; TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.2)  # poll interval


class HeadProcess:
    """A helper process on the head host driven by JSON lines (bench/lab_load_client.py,
    lab_worker_stats.py). The load client's finished requests collect in `records`, the ids of
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
        """Sends a command and returns its reply; TimeoutError when none comes in time,
        RuntimeError when the reply is an error."""
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self._replies.get(timeout=reply_timeout_s)
        except queue.Empty:
            raise TimeoutError(f"{self.proc.args}: no reply to {cmd!r} within {reply_timeout_s:.0f}s "
                               f"(exit code {self.proc.poll()})") from None
        if reply["event"] == "error":
            raise RuntimeError(f"{self.proc.args}: {reply}")
        return reply


class LabRedis:
    """redis-server on a lab host, bound to that host's address, no persistence."""

    def __init__(self, host: Host, workdir: Path):
        self.host, self.workdir = host, workdir
        self.url = f"redis://{host.address}:{REDIS_PORT}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server not installed (run deploy/setup.sh or apt-get install redis-server)")
        self.proc = self.host.popen(
            [server, "--bind", self.host.address, "--port", str(REDIS_PORT), "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not answering after {READY_TIMEOUT_S:.0f}s")
            time.sleep(0.05)  # poll interval

    def answers(self) -> bool:
        """PING from inside the redis host's namespace (the root namespace has no route to it)."""
        out = self.host.run(["redis-cli", "-h", self.host.address, "-p", str(REDIS_PORT), "ping"],
                            capture_output=True, text=True)
        return out.stdout.strip() == "PONG"

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


class LabRayCluster:
    """The running cluster: its hosts, Ray's and the server's logs, and the faults' handles."""

    def __init__(self, lab: NetnsLab, workdir: Path, model_folder: str, redis: LabRedis):
        self.lab, self.workdir, self.model_folder, self.redis = lab, workdir, model_folder, redis
        self.token = secrets.token_hex(16)
        self.head_address = lab["head"].address
        self.target = f"{self.head_address}:{SERVE_PORT}"
        self.load: HeadProcess | None = None  # bench/lab_load_client.py
        self.stats: HeadProcess | None = None  # bench/lab_worker_stats.py: a Ray driver
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
            "SPECSERVE_REDIS": redis.url,
            "SPECSERVE_WAIT_FOR_ROLES": ",".join(ROLES),
            # One actor per role on its role's host. Every actor takes 0.5 of its node's one CPU, so
            # a restarted scheduler's lookups and Ray's restarts never wait for a CPU.
            "SPECSERVE_SERVE_ARGS": (
                f"--verify-replicas 1 --prefill-replicas 1 --prefill-threshold {PREFILL_THRESHOLD} "
                f"--spec model --draft-model {model_folder} --draft-replicas 1 "
                f"--verify-cpus 0.5 --draft-cpus 0.5 --prefill-cpus 0.5 "
                f"--threads 1 --kv-cache-gb 0.25 --block-size 4 --shutdown-grace-s 2 --no-http --no-metrics"),
        }
        if cache := os.environ.get("SPECSERVE_CACHE"):  # converted GGUF, kernel choice, profiles
            self.base_env["SPECSERVE_CACHE"] = cache

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
        with open(self.log_dir / f"start-{name}.log", "ab") as log:
            proc = self.lab[name].popen(["bash", str(START_NODE), "start"], env=self.node_env(self.lab[name], role),
                                        cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
        wait_started(proc, f"on {name}", lambda: self.log("start-" + name))

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
            if not self.serve_alive():
                raise RuntimeError(f"specserve serve is not running; serve.log:\n{self.log('serve')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"health not SERVING after {SERVING_TIMEOUT_S:.0f}s (last: {status}); "
                                   f"serve.log:\n{self.log('serve')}")
            time.sleep(0.5)  # poll interval, not a wait-for-ready guess

    def find_worker_pids(self, host: str, actor_class: str) -> list[int]:
        """The Ray worker processes in the host's namespace whose title names actor_class (Ray
        sets it to `ray::<ActorClass>...`)."""
        pids = subprocess.run(["ip", "netns", "pids", self.lab[host].netns], capture_output=True, text=True,
                              check=False).stdout.split()
        found = []
        for pid in map(int, pids):
            try:
                if " ".join(psutil.Process(pid).cmdline()).startswith(f"ray::{actor_class}"):
                    found.append(pid)
            except psutil.Error:
                continue
        return found

    def worker_pid(self, host: str, actor_class: str) -> int:
        """The one actor_class process on host; waits while it is being (re)started."""
        deadline = time.monotonic() + SERVING_TIMEOUT_S
        while len(found := self.find_worker_pids(host, actor_class)) != 1:
            if len(found) > 1:
                raise RuntimeError(f"several {actor_class} processes on {host}: {found}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {actor_class} process on {host} after {SERVING_TIMEOUT_S:.0f}s")
            time.sleep(0.2)  # poll interval while Ray restarts the actor
        return found[0]

    def idle_worker_stats(self, with_draft: bool = True) -> dict:
        """What the verify and draft workers hold once idle (see lab_worker_stats); with_draft:
        wait until the draft worker answers (False: its host is lost)."""
        if self.stats is None:
            env = {**self.node_env(self.lab["head"], "head"), "RAY_AUTH_MODE": "token"}
            self.stats = self.start_helper("specserve.bench.lab_worker_stats", "specserve", env=env)
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


@contextlib.contextmanager
def lab_ray_cluster(model_folder: str) -> Iterator[LabRayCluster]:
    """Head, verify, draft and prefill hosts each running a Ray node, Redis on its host, the
    scheduler SERVING; torn down on exit, also after a failed start. Needs root (see
    netns_lab.lab_unavailable_reason)."""
    if not START_NODE.exists():
        raise RuntimeError(f"{START_NODE} not found: the lab cluster runs from a checkout (deploy/setup.sh)")
    workdir = Path(tempfile.mkdtemp(prefix="snr-", dir="/tmp"))  # short: Ray's unix socket paths are limited
    (workdir / "log").mkdir()
    (workdir / "config").mkdir()  # empty: no user settings leak in
    lab = NetnsLab.create(HOSTS)
    try:
        redis = LabRedis(lab["redis"], workdir)
        redis.start()
        cluster = LabRayCluster(lab, workdir, model_folder, redis)
        cluster.start_node("head", "head")
        for role in ROLES:  # one at a time, as nodes join a real cluster
            cluster.start_node(role, role)
        cluster.load = cluster.start_helper("specserve.bench.lab_load_client", cluster.target, env=cluster.base_env)
        cluster.wait_serving()
        yield cluster
    finally:
        lab.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
