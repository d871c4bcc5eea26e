"""Chooses what the next forward runs: which sequences, and how many new slots each.

Continuous batching with chunked prefill: running sequences come first (a decode step
takes one slot each; a prompt still being prefilled takes what the token budget leaves),
then waiting sequences are admitted while the budget and the KV pool allow. When the pool
cannot give a running sequence its next slot, the newest running sequence is preempted:
its blocks are freed and it waits to be recomputed.

Progress: a plan schedules at least one sequence whenever any waits or runs, or names the
sequence that blocks the head of the line as stuck (taken out of the queues; the engine fails
it). The head is the first running sequence (else the first waiting one); it gets the whole
budget and may preempt everyone after it, so it is stuck only when the state is broken: it has
no token left to compute, or it does not fit an otherwise empty pool.
"""

from collections import deque
from dataclasses import dataclass

from specserve.workers.engine.kv_cache import PagedKVCache
from specserve.workers.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class PlannerConfig:
    max_num_seqs: int = 32  # sequences in one forward
    max_num_batched_tokens: int = 2048  # new slots in one forward (the prefill chunk size)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class PlannedSequence:
    seq: Sequence
    num_new: int  # slots this step: tokens [seq.num_computed, seq.num_computed + num_new)

    @property
    def completes(self) -> bool:
        """After this step every known token has K/V, so the next token can be chosen
        (num_new past that means draft-tree slots beyond the last token)."""
        return self.seq.num_computed + self.num_new >= self.seq.num_tokens


@dataclass(frozen=True)
class StuckSequence:
    seq: Sequence  # out of the queues, its blocks freed
    reason: str  # why it can never be scheduled, for the request's error


@dataclass(frozen=True)
class StepPlan:
    scheduled: list[PlannedSequence]  # what the next forward runs, in order
    stuck: list[StuckSequence]  # to be failed by the caller; empty unless the state is broken

    @classmethod
    def empty(cls) -> "StepPlan":
        return cls([], [])


class StepPlanner:
    """on_admit(seq): called when a waiting sequence with no KV is about to be scheduled; it may
    fill the sequence's table with cached prefix blocks (given back if the step has no room)."""

    def __init__(self, config: PlannerConfig, kv: PagedKVCache, on_admit=None):
        self.config = config
        self.kv = kv
        self.on_admit = on_admit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of the queues and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.table)

    def plan(self, decode_slots: dict[Sequence, int] | None = None) -> StepPlan:
        """decode_slots: slots a decoding sequence asks for (a draft tree's size); default 1.

        A sequence gets all it asks for or, when the budget or the pool is short, a plain
        decode slot.
        """
        decode_slots = decode_slots or {}
        budget = self.config.max_num_batched_tokens
        free = self.kv.allocator.num_free
        planned: list[PlannedSequence] = []
        stuck: list[StuckSequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room
                continue
            if budget == 0:
                break
            if seq.num_computed >= seq.num_tokens:
                stuck.append(self._take_out(seq, f"no token left to compute ({seq.num_computed} of "
                                                  f"{seq.num_tokens} computed)"))
                free = self._free_after(planned)
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            tree = decode_slots.get(seq, 1)
            if num_new == 1 and tree <= budget and self.kv.blocks_needed(seq.table, tree) <= free:
                num_new = tree  # a draft tree only when it fits without preempting anyone
            while (needed := self.kv.blocks_needed(seq.table, num_new)) > free and self._preempt_newest(seq):
                free = self._free_after(planned)
            if needed > free and not planned:  # alone in the pool, all after it preempted: it never fits
                stuck.append(self._take_out(seq, f"{num_new} new tokens need {needed} KV blocks, "
                                                  f"{free} of {self.kv.config.num_blocks} are free"))
                free = self._free_after(planned)
                continue
            if needed > free:
                break
            planned.append(PlannedSequence(seq, num_new))
            budget -= num_new
            free -= needed
        while self.waiting and budget > 0 and len(planned) < self.config.max_num_seqs:
            seq = self.waiting[0]
            attached = self.on_admit is not None and seq.table.num_tokens == 0
            if attached:
                before = self.kv.allocator.num_free
                self.on_admit(seq)
                free -= before - self.kv.allocator.num_free  # cached blocks it took were counted free
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            needed = self.kv.blocks_needed(seq.table, num_new)
            if needed > free:
                if attached:
                    self.kv.free(seq.table)  # cached blocks go back to the cache, not held while waiting
                if self.running or planned:
                    break  # blocks come back as running sequences finish
                self.waiting.popleft()  # the pool is empty of requests and still short: it never fits
                stuck.append(StuckSequence(seq, f"{num_new} new tokens need {needed} KV blocks, {free} of "
                                                f"{self.kv.config.num_blocks} are free"))
                free = self._free_after(planned)
                continue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            planned.append(PlannedSequence(seq, num_new))
            budget -= num_new
            free -= needed
        return StepPlan(planned, stuck)

    def _free_after(self, planned: list[PlannedSequence]) -> int:
        """Blocks the pool still has once the planned sequences have their slots."""
        return self.kv.allocator.num_free - sum(self.kv.blocks_needed(p.seq.table, p.num_new) for p in planned)

    def _take_out(self, seq: Sequence, reason: str) -> StuckSequence:
        self.remove(seq)
        return StuckSequence(seq, reason)

    def _preempt_newest(self, keep: Sequence) -> bool:
        victim = self.running[-1]
        if victim is keep:
            return False
        self.running.pop()
        self.kv.free(victim.table)
        victim.status = SequenceStatus.WAITING
        self.waiting.appendleft(victim)
        return True
