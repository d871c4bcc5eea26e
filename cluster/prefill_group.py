"""A prefill group of N local worker processes joined in one torch.distributed group.

For `specserve generate --prefill-workers N` and for tests: the processes are spawned here
(torch.multiprocessing, spawn start method), rank 0's address is a free port on 127.0.0.1. What
each rank runs is a `RankProgram` passed in (workers/model/sequence_parallel.py has the model's), so
this file knows processes and groups, not models.

Failure: a member that dies (killed, out of memory) or a program that raises fails the request
with `PrefillGroupError`; the group is torn down (every process ended and joined) and formed
again with fresh processes on the next `run`. A dead member's request is retried `retries` times.
"""

import os
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

import torch.multiprocessing as mp

from specserve.cluster.process_group import DEFAULT_TIMEOUT_S, Rendezvous, RendezvousHost, join_group

POLL_S = 0.05  # how often the parent checks member liveness while it waits
DEATH_WAIT_S = 2.0  # after a rank reports an error: how long to look for a dead peer that caused it


class RankProgram(Protocol):
    """What every rank of the group runs; pickled into each spawned process."""

    def setup(self, rank: int, world_size: int, group) -> None:
        """Once, after the group formed (load the model here)."""

    def run(self, request: Any) -> Any:
        """Every rank, for every request, in the same order; collectives over `group` inside."""


class PrefillGroupError(RuntimeError):
    """A request failed because a member died or raised; the group was torn down."""


class MemberDiedError(PrefillGroupError):
    pass


@dataclass(frozen=True)
class _Reply:
    rank: int
    request_no: int  # -1 for the ready message after setup
    ok: bool
    value: Any  # the result, or the traceback text when not ok


def _rank_main(rank: int, rendezvous: Rendezvous, device: str, program: RankProgram, inbox, outbox,
               timeout_s: float) -> None:
    handle = join_group(rendezvous, rank, device, timeout_s)
    try:
        try:
            program.setup(rank, rendezvous.world_size, handle.group)
            outbox.put(_Reply(rank, -1, True, os.getpid()))
        except BaseException:
            outbox.put(_Reply(rank, -1, False, traceback.format_exc()))
            return
        while (item := inbox.get()) is not None:
            request_no, request = item
            try:
                outbox.put(_Reply(rank, request_no, True, program.run(request)))
            except BaseException:
                outbox.put(_Reply(rank, request_no, False, traceback.format_exc()))
    finally:
        handle.close()


class LocalPrefillGroup:
    """N processes running `program` as ranks 0..N-1 of one group.

    `run(request)` sends the request to every rank and returns every rank's result (rank
    order). Use as a context manager, or call `close()`: it always ends the processes.
    """

    def __init__(self, program: RankProgram, world_size: int, device: str = "cpu",
                 timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = 1):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.program, self.world_size, self.device = program, world_size, device
        self.timeout_s, self.retries = timeout_s, retries
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._inboxes: list = []
        self._outbox = None
        self._store_host: RendezvousHost | None = None
        self._request_no = 0
        self.formations = 0  # how many times the group was formed (re-forms after failures)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def is_formed(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        """Spawns the members and waits until every one has joined and set up."""
        if self._procs:
            return
        self._store_host = RendezvousHost(self.world_size, timeout_s=self.timeout_s)
        rendezvous = self._store_host.rendezvous
        self._outbox = self._ctx.Queue()
        self._inboxes = [self._ctx.Queue() for _ in range(self.world_size)]
        for rank in range(self.world_size):
            proc = self._ctx.Process(
                target=_rank_main, daemon=True, name=f"specserve-prefill-{rank}",
                args=(rank, rendezvous, self.device, self.program, self._inboxes[rank], self._outbox, self.timeout_s),
            )
            proc.start()
            self._procs.append(proc)
        self.formations += 1
        self._collect(-1, "setup")

    def run(self, request: Any) -> list[Any]:
        """Every rank's result for request. Raises PrefillGroupError (group torn down) on failure;
        a member death is retried on a re-formed group up to `retries` times first."""
        for attempt in range(self.retries + 1):
            self.start()
            self._request_no += 1
            for inbox in self._inboxes:
                inbox.put((self._request_no, request))
            try:
                return self._collect(self._request_no, "request")
            except MemberDiedError:
                if attempt == self.retries:
                    raise
        raise AssertionError("unreachable")

    def _collect(self, request_no: int, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(results) < self.world_size:
            try:
                reply = self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                dead = self._dead_members()
                if dead:
                    self._fail(dead, what)
                if time.monotonic() > deadline:
                    self.close(grace_s=0.0)
                    raise PrefillGroupError(f"prefill group {what} took over {self.timeout_s:.0f} s; torn down")
                continue
            if reply.request_no != request_no:
                continue  # a late reply to a request that already failed
            if not reply.ok:
                dead = self._dead_members(wait_s=DEATH_WAIT_S)  # a peer's death makes the living fail too
                self._fail(dead, what, f"rank {reply.rank} raised:\n{reply.value}")
            results[reply.rank] = reply.value
        return [results[r] for r in range(self.world_size)]

    def _fail(self, dead: list[int], what: str, detail: str = ""):
        """Tears the group down and raises: MemberDiedError when members died, else PrefillGroupError."""
        codes = [self._procs[r].exitcode for r in dead]
        self.close(grace_s=0.0)  # the living may be stuck in collectives with the dead
        if dead:
            raise MemberDiedError(f"prefill group member(s) {dead} died during {what} (exit codes {codes}); "
                                  f"the group was torn down" + (f"\n{detail}" if detail else ""))
        raise PrefillGroupError(f"prefill group {what} failed; the group was torn down\n{detail}")

    def _dead_members(self, wait_s: float = 0.0) -> list[int]:
        """Ranks whose process has exited, polling up to wait_s for one to show."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            if dead or time.monotonic() >= deadline:
                return dead
            self._procs[0].join(timeout=POLL_S)  # wakes early if rank 0 exits

    def close(self, grace_s: float = 5.0) -> None:
        """Ends every member: asks them to stop, gives them grace_s to leave the group, then
        terminates and kills what is left; joins all."""
        for inbox in self._inboxes:
            try:
                inbox.put(None)
            except (ValueError, OSError):
                pass
        deadline = time.monotonic() + grace_s
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in [*self._inboxes, self._outbox]:
            if q is not None:
                q.close()
                q.cancel_join_thread()
        if self._store_host is not None:
            self._store_host.close()
        self._procs, self._inboxes, self._outbox, self._store_host = [], [], None, None

    def __enter__(self) -> "LocalPrefillGroup":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
