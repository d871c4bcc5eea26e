"""Faults on a real multi-host specserve cluster (hosts = network namespaces, each a Ray node
started by deploy/start-node.sh; specserve.bench.lab_cluster), each injected during
steady load of greedy streams whose outputs are known (the in-process engine's):

  (a) kill -9 of the VerifyWorker process     Ray restarts the actor; its requests are resubmitted
  (b) kill -9 of the DraftWorker process      steps run without drafts until Ray restarted it
  (c) kill -9 of the PrefillWorker process    the verify worker prefills itself until it is back
  (d) SIGKILL of `specserve serve`, then `start-node.sh serve` on the head: it finds its
      (detached, named) actors again and serves new requests
  (e) 50 ms delay and 1% loss on everything the draft host sends (`Host.impair`: tc netem, or a
      user-space delay line where the kernel has no sch_netem)
  (f) the verify host lost: its link down and every process on it killed. A spare host offering
      verify has joined the cluster (after the actors were placed, so placement is deterministic):
      Ray restarts the verify actor there and the driver resubmits the lost requests to it.
  (g) the draft host lost, no other host offering draft: speculation stops, serving goes on at
      full speed (the verify worker stops calling the lost draft worker until it answers a ping)

The hard figures are asserted: no token lost, duplicated or wrong; every failed request got a
clean gRPC error; a request sent after the fault completes. The rest is printed as a table
(`pytest -s`). The tests share one cluster and run in this order; (f) and (g) come last (their
hosts stay lost).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from specserve.bench.fault_figures import FaultFigures, RequestRecord, markdown_table
from specserve.bench.lab_cluster import PREFILL_THRESHOLD, PROMPTS, LabRayCluster, poll_until
from specserve.scheduler.prompts import Prompt
from specserve.workers.model.model_source import load_tokenizer, resolve_model

from tests.helpers.tiny_folder import GreedyReference

pytestmark = pytest.mark.integration

CLIENTS = 3  # concurrent streams
MAX_TOKENS = 160  # long enough that the requests in flight at a fault have streamed part of their output
STEADY_REQUESTS = 3  # completed before the fault is injected
STREAMING_AT_FAULT = 2  # requests that have streamed part of their output when the fault comes
AFTER_REQUESTS = 3  # completed after it, sent after it
REQUEST_TIMEOUT_S = 150.0  # the client's gRPC deadline: a request still open then hung
RECOVERY_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def reference(lab_cluster: LabRayCluster):
    """reference(prompt index): the full greedy output of PROMPTS[index]."""
    greedy = GreedyReference(lab_cluster.model_folder)
    tokenizer = load_tokenizer(resolve_model(lab_cluster.model_folder, progress=False))
    ids = [Prompt(text=p).token_ids(tokenizer) for p in PROMPTS]
    assert min(map(len, ids)) < PREFILL_THRESHOLD <= max(map(len, ids)), [len(i) for i in ids]
    return lambda index: greedy(ids[index], MAX_TOKENS)


@pytest.fixture(scope="module")
def table():
    """The figures of every fault, printed as a markdown table after the module."""
    figures: list[FaultFigures] = []
    yield figures
    print("\n" + markdown_table(figures))
    for f in figures:
        for failure in f.failures:
            print(f"  {f.fault}: {failure}")


def under_load(cluster: LabRayCluster, reference, fault: str, inject) -> FaultFigures:
    """Steady load, inject(), load until AFTER_REQUESTS sent after the fault completed; the figures."""
    cluster.wait_serving()
    load, first = cluster.load, len(cluster.load.records)

    def records() -> list[RequestRecord]:
        return [RequestRecord.from_event(e) for e in load.records[first:]]

    load.command("start", run=fault, clients=CLIENTS, prompts=PROMPTS, max_tokens=MAX_TOKENS,
                 timeout_s=REQUEST_TIMEOUT_S)
    try:
        poll_until(lambda: sum(r.completed for r in records()) >= STEADY_REQUESTS, "steady load", RECOVERY_TIMEOUT_S)
        poll_until(lambda: len(load.streaming) >= STREAMING_AT_FAULT, "streams mid-way", RECOVERY_TIMEOUT_S)
        fault_at = time.monotonic()
        inject()
        poll_until(lambda: sum(r.completed and r.start >= fault_at for r in records()) >= AFTER_REQUESTS,
                   f"requests completing after {fault}", RECOVERY_TIMEOUT_S)
    finally:
        load.command("stop", reply_timeout_s=REQUEST_TIMEOUT_S + 30)
    return FaultFigures.measure(fault, records(), fault_at, reference)


def assert_survived(cluster: LabRayCluster, figures: FaultFigures, table: list[FaultFigures],
                    draft_lost: bool = False) -> None:
    table.append(figures)
    assert figures.in_flight >= 1, figures  # the fault hit requests mid-stream
    assert figures.tokens.lost == figures.tokens.duplicated == figures.tokens.wrong == 0, figures
    assert figures.failed_other == 0, figures.failures
    assert figures.recovery_s is not None, figures
    held = cluster.idle_worker_stats(with_draft=not draft_lost)  # the load has ended: nothing may stay behind
    assert held["verify_running"] == 0 and held["verify_blocks_free"] == held["verify_blocks_total"], held
    assert held["draft_sequences"] == (None if draft_lost else 0), held["draft_error"]  # None: it does not answer


def actor_pids(cluster: LabRayCluster) -> dict[str, int]:
    """The worker process of each role's actor, on its role's host."""
    return {role: cluster.worker_pid(role, cls) for role, cls in
            (("verify", "VerifyWorker"), ("draft", "DraftWorker"), ("prefill", "PrefillWorker"))}


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def test_verify_worker_killed(lab_cluster, reference, table):
    pid = lab_cluster.worker_pid("verify", "VerifyWorker")
    figures = under_load(lab_cluster, reference, "kill -9 verify worker", lambda: kill9(pid))
    assert_survived(lab_cluster, figures, table)
    assert figures.failed_clean == 0, figures.failures  # every lost request was resubmitted


def test_draft_worker_killed(lab_cluster, reference, table):
    pid = lab_cluster.worker_pid("draft", "DraftWorker")
    figures = under_load(lab_cluster, reference, "kill -9 draft worker", lambda: kill9(pid))
    assert_survived(lab_cluster, figures, table)
    assert figures.failed_clean == 0, figures.failures  # a lost draft costs speed only


def test_prefill_worker_killed(lab_cluster, reference, table):
    pid = lab_cluster.worker_pid("prefill", "PrefillWorker")
    figures = under_load(lab_cluster, reference, "kill -9 prefill worker", lambda: kill9(pid))
    assert_survived(lab_cluster, figures, table)
    assert figures.failed_clean == 0, figures.failures  # the verify worker prefills itself meanwhile


def test_scheduler_killed_and_restarted(lab_cluster, reference, table):
    actors = actor_pids(lab_cluster)

    def inject():
        kill9(lab_cluster.serve_pid())
        lab_cluster.restart_serve()

    figures = under_load(lab_cluster, reference, "scheduler SIGKILL + restart", inject)
    assert_survived(lab_cluster, figures, table)
    assert actor_pids(lab_cluster) == actors  # found again by name: the same worker processes serve


def test_draft_host_slow_and_lossy(lab_cluster, reference, table):
    """Every frame the draft host sends is held 50 ms and 1% are lost (tc netem, or the user-space
    delay line where the kernel has no sch_netem) for the rest of the load: drafts come later,
    nothing is lost."""
    draft, how = lab_cluster.lab["draft"], []
    try:
        figures = under_load(lab_cluster, reference, "draft host +50 ms, 1% loss",
                             lambda: how.append(draft.impair(delay_ms=50, loss_pct=1)))
    finally:
        draft.clear_impairment()
    assert_survived(lab_cluster, figures, table)
    assert figures.failed_clean == 0, figures.failures
    print(f"\ndraft host impaired by {how[0]}")


def test_verify_host_lost(lab_cluster, reference, table):
    lab_cluster.start_node("spare", "verify")  # where a lost verify actor can be restarted
    verify = lab_cluster.lab["verify"]

    def inject():
        verify.disconnect()
        verify.kill_all()

    figures = under_load(lab_cluster, reference, "verify host lost (link down, processes killed)", inject)
    assert_survived(lab_cluster, figures, table)
    assert lab_cluster.worker_pid("spare", "VerifyWorker")  # restarted on the spare host


def test_draft_host_lost_without_a_replacement(lab_cluster, reference, table):
    """No other host offers `draft`: Ray cannot restart the draft actor, and the verify worker
    runs without speculation from then on, without asking the lost worker at every step."""
    draft = lab_cluster.lab["draft"]
    before = lab_cluster.idle_worker_stats()["draft_failures"]

    def inject():
        draft.disconnect()
        draft.kill_all()

    figures = under_load(lab_cluster, reference, "draft host lost, no replacement", inject)
    assert_survived(lab_cluster, figures, table, draft_lost=True)
    after = lab_cluster.idle_worker_stats(with_draft=False)
    # Only the calls in flight when it went failed (one per step otherwise: hundreds of steps).
    assert after["draft_failures"] - before <= 2, (before, after)
