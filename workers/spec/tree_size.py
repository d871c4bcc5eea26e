"""How much to speculate: the tree size per step that maximises expected tokens per second.

Two measurements meet here:
- a latency curve t(S), the verify forward's time for S slots in one step, profiled once
  per model, machine, dtype, thread count and kernel paths (cached on disk);
- acceptance statistics: for a node at depth d that is its parent's r-th child, the rate
  a(d, r) at which it is accepted when its parent is. A node's chance to be on the
  accepted path is the product of a() along its path, so keeping the nodes with the highest
  chance keeps a tree (a child never beats its parent).

Each step every decoding sequence yields 1 token for sure (the bonus) plus, in expectation,
the chances of its kept nodes. The policy adds candidate nodes of all sequences, best chance
first, and keeps the count that maximises (sequences + sum of chances) / t(slots): with many
sequences the curve is steep and speculation shrinks, down to none.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from specserve.workers.spec.draft_tree import DraftTree

MAX_DEPTH, MAX_RANK = 16, 16
# Part of a cached curve's file name: bumped when the measurement changes, so curves measured the
# old way are measured again (2: interleaved rounds, non-decreasing; see latency_profile.py).
CURVE_MEASUREMENT = 2


@dataclass(frozen=True)
class LatencyCurve:
    slots: tuple[int, ...]  # increasing slot counts that were measured
    seconds: tuple[float, ...]  # forward time at each

    def __post_init__(self):
        if len(self.slots) < 2 or len(self.slots) != len(self.seconds) or list(self.slots) != sorted(set(self.slots)):
            raise ValueError(f"a latency curve needs >= 2 increasing slot counts with times, got {self.slots}")

    def time(self, slots: int) -> float:
        """Piecewise-linear in slots, extended linearly past the last point."""
        xs, ys = self.slots, self.seconds
        i = max(1, min(len(xs) - 1, next((j for j, x in enumerate(xs) if x >= slots), len(xs) - 1)))
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(ys[0], y0 + (y1 - y0) * (slots - x0) / (x1 - x0))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"slots": list(self.slots), "seconds": list(self.seconds)}))

    @classmethod
    def load(cls, path: Path) -> "LatencyCurve | None":
        """None when the file is absent or unreadable (it is then measured again)."""
        try:
            data = json.loads(path.read_text())
            return cls(tuple(data["slots"]), tuple(data["seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class AcceptanceStats:
    """a(d, r) with a Beta prior, so an unseen position starts at `prior` and is tried."""

    def __init__(self, prior: float = 0.5, prior_weight: float = 2.0):
        self.accepted = [[prior * prior_weight] * MAX_RANK for _ in range(MAX_DEPTH + 1)]
        self.tried = [[prior_weight] * MAX_RANK for _ in range(MAX_DEPTH + 1)]

    def rate(self, depth: int, rank: int) -> float:
        d, r = min(depth, MAX_DEPTH), min(rank, MAX_RANK - 1)
        return self.accepted[d][r] / self.tried[d][r]

    def record(self, tree: DraftTree, path: list[int]) -> None:
        """Counts the children of every accepted node: tried, and accepted when on the path."""
        on_path, ranks, children = set(path), tree.sibling_ranks(), tree.children()
        for node in path:
            for child in children[node]:
                d, r = min(tree.depths[child], MAX_DEPTH), min(ranks[child], MAX_RANK - 1)
                self.tried[d][r] += 1
                self.accepted[d][r] += child in on_path

    def chances(self, tree: DraftTree) -> list[float]:
        """Each node's estimated chance to be on the accepted path (root: 1), never above
        its parent's or an earlier sibling's: pruning by chance then keeps a tree whose
        siblings are a prefix of the drafter's order (its best guesses first)."""
        ranks, chance = tree.sibling_ranks(), [1.0] * tree.size
        last_sibling: dict[int, int] = {}
        for i in range(1, tree.size):
            parent = tree.parents[i]
            chance[i] = chance[parent] * self.rate(tree.depths[i], ranks[i])
            if parent in last_sibling:
                chance[i] = min(chance[i], chance[last_sibling[parent]])
            last_sibling[parent] = i
        return chance


def choose_trees(
    trees: list[DraftTree],
    stats: AcceptanceStats,
    curve: LatencyCurve,
    other_slots: int = 0,  # slots of the step outside the trees (sequences decoding without drafts)
) -> list[DraftTree]:
    """Prunes every tree to the nodes that maximise expected tokens per second of the step."""
    candidates = []  # (chance, tree index, node), parents before children at equal chance
    for t, tree in enumerate(trees):
        for node, chance in enumerate(stats.chances(tree)[1:], 1):
            candidates.append((-chance, tree.depths[node], t, node))
    candidates.sort()
    base_slots = other_slots + len(trees)  # every root takes a slot
    best_gain, best_count, expected = len(trees) / curve.time(base_slots), 0, float(len(trees))
    for count, (neg_chance, _, _, _) in enumerate(candidates, 1):
        expected -= neg_chance
        gain = expected / curve.time(base_slots + count)
        if gain > best_gain * (1 + 1e-9):
            best_gain, best_count = gain, count
    keep = [[0] for _ in trees]
    for _, _, t, node in candidates[:best_count]:
        keep[t].append(node)
    return [tree.select(sorted(k)) for tree, k in zip(trees, keep)]


def curve_key(fingerprint: str, machine: str, device: str, dtype: str, threads: int, kernels: str) -> str:
    """File name of a cached curve: per model, machine (GPU name, or CPU model and ISA flags),
    device, dtype, thread count and kernel paths (`KernelChoice.tag`)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{machine}-{device}-{dtype}-t{threads}-{kernels}")
    return f"{fingerprint[:16]}-{safe}-m{CURVE_MEASUREMENT}"


def default_slot_counts(max_slots: int) -> list[int]:
    """1, 2, 4, ... up to max_slots (and max_slots itself)."""
    counts = [2**i for i in range(int(math.log2(max(1, max_slots))) + 1)]
    return counts if counts[-1] == max_slots else counts + [max_slots]
