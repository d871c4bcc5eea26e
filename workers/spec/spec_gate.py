"""Whether speculation pays at the current load: measured, not modelled.

The latency curve sizes each step's trees, but it is profiled on one sequence: with many
sequences in a step the real costs differ (each sequence's own keys, padding among draft trees,
drafting and verification in Python), and where acceptance is low speculation can cost more
than it yields. So the engine also measures: per load level (the number of decoding sequences,
in powers of two) and step kind (pure decode, or decode mixed with a prefill chunk), moving
averages of decode tokens and of seconds per step with speculation and without (their ratio is
the rate). It speculates where that is at least as fast (within MARGIN), and spends one step in
`explore_every` (one in 4 until it has WARMUP_SAMPLES of it) on the other choice so both stay
measured as conditions change.

Mixed steps are a situation of their own: under load most steps also prefill newly arrived
prompts, the prefill dominates their time, and a draft tree there delays every other request.
Both choices see the same mix of prefill chunks on average, so their rates compare fairly.
"""

from collections import defaultdict

WARMUP_SAMPLES = 4  # samples of a choice before exploration slows down
# Speculation stays on unless plain decoding is measured this much faster. 0.05 (to ride out
# bursts of steps that accept nothing) kept speculation on at 8 streams where it measured 6%
# slower than off (bench serve, 2026-11-23); the moving averages already smooth the bursts.
MARGIN = 0.0


class SpecGate:
    def __init__(self, explore_every: int = 16, weight: float = 0.05):
        if explore_every < 2:
            raise ValueError(f"explore_every must be >= 2, got {explore_every}")
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.explore_every, self.weight = explore_every, weight
        # ((load level, mixed), speculated) -> moving averages of tokens and seconds per step; their
        # ratio is the rate (a ratio of averages: one step that accepted nothing does not swing it)
        self._tokens: dict[tuple[tuple[int, bool], bool], float] = {}
        self._seconds: dict[tuple[tuple[int, bool], bool], float] = {}
        self._samples: defaultdict[tuple[tuple[int, bool], bool], int] = defaultdict(int)
        self._steps: defaultdict[tuple[int, bool], int] = defaultdict(int)

    @staticmethod
    def level(num_seqs: int) -> int:
        """1 -> 1, 2..3 -> 2, 4..7 -> 3, 8..15 -> 4, ..."""
        return max(num_seqs, 1).bit_length()

    def speculate(self, num_seqs: int, mixed: bool = False) -> bool:
        """Whether the next step with num_seqs decoding sequences (and a prefill chunk when mixed)
        should speculate."""
        situation = (self.level(num_seqs), mixed)
        self._steps[situation] += 1
        best = self.pays(*situation)
        # explore often until the other choice has a few samples, then once in explore_every steps
        period = self.explore_every if self._samples[situation, not best] >= WARMUP_SAMPLES else 4
        return not best if self._steps[situation] % period == 0 else best

    def pays(self, level: int, mixed: bool = False) -> bool:
        """Speculation's measured rate is at least the plain one, less MARGIN (or either is unmeasured)."""
        on, off = self.rate(level, True, mixed), self.rate(level, False, mixed)
        return on is None or off is None or on >= (1 - MARGIN) * off

    def rate(self, level: int, speculated: bool, mixed: bool = False) -> float | None:
        """Measured decode tokens per second at a load level and step kind, with or without speculation."""
        key = ((level, mixed), speculated)
        return self._tokens[key] / self._seconds[key] if key in self._tokens else None

    def record(self, num_seqs: int, speculated: bool, tokens: int, seconds: float, mixed: bool = False) -> None:
        """A step: its decoding sequences, choice, decode tokens made, wall time, and whether it
        also ran a prefill chunk."""
        if seconds <= 0 or num_seqs < 1:
            return
        key = ((self.level(num_seqs), mixed), speculated)
        self._samples[key] += 1
        w = max(1 / self._samples[key], self.weight)  # a plain mean until 1/weight samples
        for table, value in ((self._tokens, tokens), (self._seconds, seconds)):
            table[key] = table.get(key, 0.0) + w * (value - table.get(key, 0.0))
