"""Figures of one fault injected during steady load: what the clients saw, checked token by token
against the in-process greedy reference.

Definitions (every time is the clients' time.monotonic(), one clock for the whole machine):
- sent: requests of the load run (steady phase, fault, after); completed: ended with
  FINISH_REASON_LENGTH and every token; failed clean: ended with a gRPC error in CLEAN_CODES and
  a message; failed other: anything else (a hang past the client's deadline, UNKNOWN, a stream
  that ended without its last message).
- lost / duplicated / wrong: tokens of a completed request missing / repeated / different from
  the reference (difflib's alignment); a failed request's tokens must be a prefix of it.
- in flight: requests that had streamed a message before the fault and ended after it.
- recovery: from the fault to the first completed request that was sent after it.
- longest stall: the longest wait of one request for its next message (or its first, counted from
  sending it) among the waits that overlap [fault, recovery].
- p99 inter-token latency: gaps between consecutive streamed messages of one request (a message
  carries every token a step accepted), those that ended before the fault (steady) and those that
  ended between the fault and the recovery (fault).
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CLEAN_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "ABORTED", "RESOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class RequestRecord:
    """One request as lab_load_client reported it."""

    prompt: int  # index into the run's prompts
    start: float
    end: float
    chunks: list  # [[arrival, [token ids]], ...]
    finish_reason: str | None
    error_code: str | None
    error: str | None

    @classmethod
    def from_event(cls, event: dict) -> RequestRecord:
        return cls(event["prompt"], event["start"], event["end"], event["chunks"], event["finish_reason"],
                   event["error_code"], event["error"])

    @property
    def tokens(self) -> list[int]:
        return [t for _, ids in self.chunks for t in ids]

    @property
    def completed(self) -> bool:
        return self.error_code is None and self.finish_reason == "FINISH_REASON_LENGTH"

    @property
    def failed_clean(self) -> bool:
        return self.error_code in CLEAN_CODES and bool(self.error)

    def gaps(self) -> list[tuple[float, float]]:
        """(end time, seconds) of each gap between consecutive messages."""
        times = [t for t, _ in self.chunks]
        return [(b, b - a) for a, b in itertools.pairwise(times)]

    def waits(self) -> list[tuple[float, float]]:
        """(from, to) of each wait: sending to the first message, then between messages."""
        times = [self.start] + [t for t, _ in self.chunks]
        return list(itertools.pairwise(times))


@dataclass(frozen=True)
class TokenErrors:
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0

    def __add__(self, other: TokenErrors) -> TokenErrors:
        return TokenErrors(self.lost + other.lost, self.duplicated + other.duplicated, self.wrong + other.wrong)


def token_errors(tokens: list[int], reference: list[int], complete: bool) -> TokenErrors:
    """How tokens differ from reference (complete: all of it was due; else a prefix was)."""
    if not complete:
        reference = reference[: len(tokens)]
    errors = TokenErrors()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=reference, b=tokens, autojunk=False).get_opcodes():
        if op == "delete":
            errors += TokenErrors(lost=i2 - i1)
        elif op == "insert":
            errors += TokenErrors(duplicated=j2 - j1)
        elif op == "replace":
            errors += TokenErrors(wrong=max(i2 - i1, j2 - j1))
    return errors


def p99_ms(seconds: list[float]) -> float | None:
    return float(np.percentile(seconds, 99) * 1000) if seconds else None


@dataclass(frozen=True)
class FaultFigures:
    fault: str
    sent: int
    completed: int
    failed_clean: int
    failed_other: int
    tokens: TokenErrors
    in_flight: int
    recovery_s: float | None  # None: no request sent after the fault completed
    longest_stall_s: float
    p99_itl_steady_ms: float | None
    p99_itl_fault_ms: float | None
    failures: tuple[str, ...]  # "CODE: message" of each failed request (distinct)

    @classmethod
    def measure(cls, fault: str, records: list[RequestRecord], fault_at: float,
                reference: Callable[[int], list[int]]) -> FaultFigures:
        """reference(prompt index): the full greedy output the request should have streamed."""
        tokens = TokenErrors()
        for r in records:
            if r.completed or r.failed_clean:
                tokens += token_errors(r.tokens, reference(r.prompt), complete=r.completed)
        after = [r.end for r in records if r.completed and r.start >= fault_at]
        recovery = min(after) - fault_at if after else None
        recovered_at = fault_at + recovery if recovery is not None else float("inf")
        gaps = [g for r in records for g in r.gaps()]
        failed = [r for r in records if not r.completed]
        in_flight = sum(bool(r.chunks) and r.chunks[0][0] < fault_at < r.end for r in records)
        stalls = [b - a for r in records for a, b in r.waits() if b >= fault_at and a <= recovered_at]
        return cls(fault, len(records), sum(r.completed for r in records), sum(r.failed_clean for r in failed),
                   sum(not r.failed_clean for r in failed), tokens, in_flight, recovery, max(stalls, default=0.0),
                   p99_ms([s for end, s in gaps if end < fault_at]),
                   p99_ms([s for end, s in gaps if fault_at <= end <= recovered_at]),
                   tuple(sorted({f"{r.error_code}: {r.error}" for r in failed})))


def markdown_table(figures: list[FaultFigures]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [("| fault | sent | completed | failed (clean gRPC error) | failed (other) | tokens lost / duplicated "
              "/ wrong | in flight | recovery (s) | longest stall (s) | p99 inter-token ms: steady / fault |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in figures:
        recovery = "-" if f.recovery_s is None else f"{f.recovery_s:.1f}"
        lines.append(f"| {f.fault} | {f.sent} | {f.completed} | {f.failed_clean} | {f.failed_other} | "
                     f"{f.tokens.lost} / {f.tokens.duplicated} / {f.tokens.wrong} | {f.in_flight} | {recovery} | "
                     f"{f.longest_stall_s:.1f} | "
                     f"{ms(f.p99_itl_steady_ms)} / {ms(f.p99_itl_fault_ms)} |")
    return "\n".join(lines)
