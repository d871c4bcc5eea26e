"""How much to speculate: latency curves, acceptance statistics, pruning."""

import pytest

from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.tree_size import AcceptanceStats, LatencyCurve, choose_trees

#   0 ─ 1 ─ 3
#     └ 2
TREE = DraftTree([9, 1, 2, 3], [-1, 0, 0, 1])


def wide_tree(n: int) -> DraftTree:
    """A root with a chain of n nodes (chance falls with depth)."""
    return DraftTree([0] + list(range(1, n + 1)), [-1] + list(range(n)))


def test_curve_interpolates_and_extends():
    curve = LatencyCurve((1, 2, 4), (1.0, 2.0, 3.0))
    assert curve.time(1) == 1.0 and curve.time(3) == 2.5 and curve.time(6) == 4.0
    with pytest.raises(ValueError):
        LatencyCurve((2, 1), (1.0, 2.0))


def test_curve_round_trips_and_bad_files_are_none(tmp_path):
    curve = LatencyCurve((1, 8), (0.01, 0.02))
    curve.save(tmp_path / "c.json")
    assert LatencyCurve.load(tmp_path / "c.json") == curve
    assert LatencyCurve.load(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert LatencyCurve.load(tmp_path / "bad.json") is None


def test_record_counts_the_children_of_accepted_nodes():
    stats = AcceptanceStats(prior=0.5, prior_weight=2)
    stats.record(TREE, [0, 1])  # 1 accepted among root's children (ranks 0, 1); 3 tried under 1, rejected
    assert stats.tried[1][0] == 3 and stats.accepted[1][0] == 2  # prior 1/2, then accepted
    assert stats.tried[1][1] == 3 and stats.accepted[1][1] == 1  # tried, rejected
    assert stats.tried[2][0] == 3 and stats.accepted[2][0] == 1
    assert stats.rate(1, 0) == pytest.approx(2 / 3)


def test_chances_never_exceed_parent_or_earlier_sibling():
    stats = AcceptanceStats()
    stats.accepted[1][1], stats.tried[1][1] = 9, 10  # rank 1 looks better than rank 0 (0.5)
    chances = stats.chances(TREE)
    assert chances[2] <= chances[1] <= 1.0 and chances[3] <= chances[1]


def test_flat_curve_keeps_everything():
    flat = LatencyCurve((1, 64), (1.0, 1.0))
    assert choose_trees([TREE], AcceptanceStats(), flat)[0].tokens == TREE.tokens


def test_steep_curve_and_low_acceptance_prune_to_the_root():
    steep = LatencyCurve((1, 64), (1.0, 64.0))  # time proportional to slots
    stats = AcceptanceStats(prior=0.2)
    assert choose_trees([TREE], stats, steep)[0].tokens == [9]


def test_more_sequences_speculate_less_each():
    curve = LatencyCurve((1, 8, 16, 64, 256), (1.0, 1.2, 1.6, 4.0, 16.0))  # flat, then compute-bound
    stats = AcceptanceStats(prior=0.7)
    one = choose_trees([wide_tree(12)], stats, curve)
    many = choose_trees([wide_tree(12) for _ in range(32)], stats, curve)
    per_seq_one = one[0].num_drafted
    per_seq_many = sum(t.num_drafted for t in many) / len(many)
    assert per_seq_many < per_seq_one
