"""`specserve bench chaos`: a soak of faults at random times on a real multi-host cluster
(bench/lab_cluster.py: hosts are network namespaces; needs root) under steady load of greedy
streams, with the figures of every fault (bench/fault_figures.py).

Faults come in rounds, each fault of the list once per round in a random order, each after a
random pause (exponential, mean `mean_gap_s`) once the previous one has recovered (a request
sent after it completed) and a stream is mid-way:

  verify-kill        kill -9 of the VerifyWorker process (Ray restarts it; its requests are resubmitted)
  draft-kill         kill -9 of the DraftWorker process (steps run without drafts meanwhile)
  prefill-kill       kill -9 of the PrefillWorker process (the verify worker prefills itself meanwhile)
  scheduler-restart  SIGKILL of `specserve serve`, then `start-node.sh serve`: it finds its actors again
  redis-restart      kill -9 of redis-server, started again at once (empty: cache misses only)
  redis-partition    the Redis host's link down until the fault recovered, then up again
  draft-impaired     50 ms delay and 1% loss on everything the draft host sends, for 20 s
                     (`Host.impair`: tc netem, or a user-space delay line without sch_netem)
  verify-host-lost   the host running the VerifyWorker loses its link and every process; the other
                     verify host (a spare joins at start) takes the actor; the lost host comes back
                     (link up, `start-node.sh start`) once serving recovered
  draft-host-lost    the same for the draft host, with no other draft host: speculation stops until
                     the host is back and Ray restarted the DraftWorker there

The reference output of each prompt is the cluster's own, completed before the first fault:
the figures say what faults changed (the in-process exactness of the same cluster is proved by
tests/integration/test_netns_ray_faults.py). Exit status 0 only when no token was lost,
duplicated or wrong, every failed request got a clean gRPC error, every fault recovered and the
workers hold nothing once the load ended.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from specserve.bench.fault_figures import FaultFigures, RequestRecord, markdown_table
from specserve.bench.lab_cluster import PROMPTS, LabRayCluster, lab_ray_cluster, poll_until
from specserve.cluster.netns_lab import lab_unavailable_reason

RECOVERY_TIMEOUT_S = 240.0
REQUEST_TIMEOUT_S = 150.0  # the client's gRPC deadline: a request still open then hung
MIN_GAP_S = 5.0
IMPAIRED_S = 20.0  # how long the draft host's link stays slow and lossy


@dataclass(frozen=True)
class ChaosConfig:
    model: str  # a name or folder every node can load
    duration_s: float = 1200.0  # faults are injected until then; the load ends after the last recovery
    max_faults: int | None = None  # or until this many were injected
    faults: tuple[str, ...] = ()  # empty: every fault in FAULTS
    mean_gap_s: float = 30.0
    clients: int = 3  # concurrent streams
    max_tokens: int = 64
    seed: int = 0
    out: Path | None = Path("bench/results")

    def __post_init__(self):
        unknown = sorted(set(self.faults) - set(FAULTS))
        if unknown:
            raise ValueError(f"faults: unknown {unknown}; known: {', '.join(FAULTS)}")
        if self.duration_s <= 0 or self.mean_gap_s <= 0 or self.clients < 1 or self.max_tokens < 1:
            raise ValueError("duration_s, mean_gap_s, clients and max_tokens must be positive")
        if self.max_faults is not None and self.max_faults < 1:
            raise ValueError(f"max_faults must be at least 1, got {self.max_faults}")


Restore = Callable[[], None] | None


def _kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _verify_host(cluster: LabRayCluster) -> str:
    """The host whose namespace runs the VerifyWorker now (verify or spare)."""
    def found() -> bool:
        return any(cluster.find_worker_pids(h, "VerifyWorker") for h in ("verify", "spare"))

    poll_until(found, "a VerifyWorker process", RECOVERY_TIMEOUT_S)
    return next(h for h in ("verify", "spare") if cluster.find_worker_pids(h, "VerifyWorker"))


def _worker_kill(host: str | None, actor_class: str) -> Callable[[LabRayCluster], Restore]:
    def inject(cluster: LabRayCluster) -> Restore:
        _kill9(cluster.worker_pid(host or _verify_host(cluster), actor_class))
        return None

    return inject


def _scheduler_restart(cluster: LabRayCluster) -> Restore:
    _kill9(cluster.serve_pid())
    cluster.restart_serve()
    return None


def _redis_restart(cluster: LabRayCluster) -> Restore:
    cluster.redis.kill9()
    cluster.redis.start()
    return None


def _redis_partition(cluster: LabRayCluster) -> Restore:
    host = cluster.redis.host
    host.disconnect()
    return host.reconnect


def _draft_impaired(cluster: LabRayCluster) -> Restore:
    host, since = cluster.lab["draft"], time.monotonic()
    host.impair(delay_ms=50, loss_pct=1, seed=int(since))

    def restore() -> None:
        time.sleep(max(0.0, since + IMPAIRED_S - time.monotonic()))
        host.clear_impairment()

    return restore


def _host_lost(role: str) -> Callable[[LabRayCluster], Restore]:
    def inject(cluster: LabRayCluster) -> Restore:
        name = _verify_host(cluster) if role == "verify" else role
        host = cluster.lab[name]
        host.disconnect()
        host.kill_all()

        def restore() -> None:
            host.reconnect()
            cluster.start_node(name, role)

        return restore

    return inject


FAULTS: dict[str, Callable[[LabRayCluster], Restore]] = {
    "verify-kill": _worker_kill(None, "VerifyWorker"),
    "draft-kill": _worker_kill("draft", "DraftWorker"),
    "prefill-kill": _worker_kill("prefill", "PrefillWorker"),
    "scheduler-restart": _scheduler_restart,
    "redis-restart": _redis_restart,
    "redis-partition": _redis_partition,
    "draft-impaired": _draft_impaired,
    "verify-host-lost": _host_lost("verify"),
    "draft-host-lost": _host_lost("draft"),
}


@dataclass(frozen=True)
class ChaosResult:
    figures: list[FaultFigures]
    unrecovered: str | None  # the fault after which no request completed in time
    idle: dict  # what the workers held once the load ended
    references_consistent: bool  # every fault-free completion of a prompt streamed the same tokens

    @property
    def ok(self) -> bool:
        clean = all(f.tokens.lost == f.tokens.duplicated == f.tokens.wrong == f.failed_other == 0
                    for f in self.figures)
        idle = self.idle.get("verify_running") == 0 and self.idle.get("verify_blocks_free") == \
            self.idle.get("verify_blocks_total")
        return clean and self.unrecovered is None and idle and self.references_consistent


def _records(cluster: LabRayCluster) -> list[RequestRecord]:
    return [RequestRecord.from_event(e) for e in list(cluster.load.records)]


def _references(records: list[RequestRecord]) -> tuple[dict[int, list[int]], bool]:
    """Each prompt's first completed output, and whether every completion agreed with it."""
    refs: dict[int, list[int]] = {}
    consistent = True
    for r in records:
        if r.completed:
            consistent &= refs.setdefault(r.prompt, r.tokens) == r.tokens
    return refs, consistent


def _inject_until_done(cluster: LabRayCluster, config: ChaosConfig, log) -> tuple[list[tuple[str, float]], str | None]:
    rng = random.Random(config.seed)
    names, round_left = list(config.faults or FAULTS), []
    injected: list[tuple[str, float]] = []
    started = time.monotonic()
    while time.monotonic() - started < config.duration_s and len(injected) < (config.max_faults or sys.maxsize):
        time.sleep(min(max(rng.expovariate(1 / config.mean_gap_s), MIN_GAP_S), 3 * config.mean_gap_s))
        poll_until(lambda: len(cluster.load.streaming) >= 1, "a stream mid-way", RECOVERY_TIMEOUT_S)
        if not round_left:
            round_left = rng.sample(names, len(names))
        name = round_left.pop()
        fault_at = time.monotonic()
        restore = FAULTS[name](cluster)
        injected.append((name, fault_at))
        try:
            poll_until(lambda: any(r.completed and r.start >= fault_at for r in _records(cluster)),
                       f"a request completing after {name}", RECOVERY_TIMEOUT_S)
        except TimeoutError:
            return injected, name
        finally:
            if restore is not None:
                restore()
        log(f"[{time.monotonic() - started:6.0f}/{config.duration_s:.0f} s] {name}: recovered in "
            f"{time.monotonic() - fault_at:.1f} s ({len(injected)} faults)")
    return injected, None


def run_chaos_bench(config: ChaosConfig, log=print) -> ChaosResult:
    reason = lab_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"bench chaos: {reason}")
    with lab_ray_cluster(config.model) as cluster:
        cluster.start_node("spare", "verify")
        load = cluster.load
        load.command("start", run="chaos", clients=config.clients, prompts=PROMPTS, max_tokens=config.max_tokens,
                     timeout_s=REQUEST_TIMEOUT_S)
        try:
            poll_until(lambda: {r.prompt for r in _records(cluster) if r.completed} == set(range(len(PROMPTS))),
                       "every prompt completed once before the first fault", RECOVERY_TIMEOUT_S)
            injected, unrecovered = _inject_until_done(cluster, config, log)
        finally:
            load.command("stop", reply_timeout_s=REQUEST_TIMEOUT_S + 30)
        records = _records(cluster)
        first_fault = injected[0][1] if injected else float("inf")
        references, consistent = _references([r for r in records if r.end < first_fault])
        figures = []
        for i, (name, fault_at) in enumerate(injected):
            until = injected[i + 1][1] if i + 1 < len(injected) else float("inf")
            window = [r for r in records if fault_at <= r.end < until]
            figures.append(FaultFigures.measure(name, window, fault_at, references.__getitem__))
        idle = cluster.idle_worker_stats(with_draft=unrecovered is None)
    result = ChaosResult(figures, unrecovered, idle, consistent)
    _report(config, result, log)
    return result


def _report(config: ChaosConfig, result: ChaosResult, log) -> None:
    log("\n" + markdown_table(result.figures))
    by_kind: dict[str, list[FaultFigures]] = {}
    for f in result.figures:
        by_kind.setdefault(f.fault, []).append(f)
    log("\n| fault | times | recovery s (median / max) | p99 inter-token ms during (max) |\n|---|---|---|---|")
    for kind, fs in sorted(by_kind.items()):
        rec = sorted(f.recovery_s for f in fs if f.recovery_s is not None)
        p99 = [f.p99_itl_fault_ms for f in fs if f.p99_itl_fault_ms is not None]
        log(f"| {kind} | {len(fs)} | {rec[len(rec) // 2]:.1f} / {rec[-1]:.1f} | {max(p99, default=0):.0f} |"
            if rec else f"| {kind} | {len(fs)} | - | - |")
    log(f"\nunrecovered: {result.unrecovered}; idle after the load: {result.idle}; "
        f"fault-free outputs consistent: {result.references_consistent}; ok: {result.ok}")
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        path = config.out / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({"config": {**asdict(config), "out": str(config.out)},
                                    "figures": [asdict(f) for f in result.figures],
                                    "unrecovered": result.unrecovered, "idle": result.idle,
                                    "references_consistent": result.references_consistent, "ok": result.ok},
                                   indent=1, default=str))
        log(f"wrote {path}")
