"""Sampling under speculation has exactly the target distribution (toy vocabulary of 5).

    r ─ x1 ─ y1          drafts: three children of the root, two under the first one
      ├ x2   └ y2
      └ x3
The first emitted token must follow p(root); given that it is x1, the second must follow p(x1).
Trees: fixed; drawn by racing the drafter's q against the very noise verification uses (what the
model drafter does); pruned by the drawn values (what broke the old scheme, issue 17). Total-
variation bounds below are ~4x the sampling noise at these counts; the broken acceptor at the
end shows the test tells a wrong rule apart (its TV is > 0.05).
"""

from collections import Counter

import torch

from specserve.workers.engine.sampler import race
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.verify import Acceptance, verify_sampling

V = 5
P = torch.tensor([
    [0.10, 0.30, 0.20, 0.25, 0.15],  # root
    [0.40, 0.05, 0.10, 0.15, 0.30],  # x1
    [0.20, 0.20, 0.20, 0.20, 0.20],  # x2
    [0.50, 0.10, 0.10, 0.20, 0.10],  # x3
    [0.20, 0.20, 0.20, 0.20, 0.20],  # y1
    [0.20, 0.20, 0.20, 0.20, 0.20],  # y2
])
Q_ROOT = torch.tensor([0.05, 0.40, 0.30, 0.05, 0.20])  # the drafter's q at the root
Q_X1 = torch.tensor([0.30, 0.10, 0.20, 0.10, 0.30])  # and at x1

TRIALS = 60_000
TV_FIRST, TV_SECOND = 0.012, 0.02  # noise: ~0.003 and ~0.006 at these counts


def tv(counts: Counter, p: torch.Tensor) -> float:
    n = sum(counts.values())
    return 0.5 * sum(abs(counts.get(t, 0) / n - float(p[t])) for t in range(V))


def sample_pairs(make_tree, verify) -> tuple[Counter, Counter]:
    gen = torch.Generator().manual_seed(1234)
    first, second_after_x1 = Counter(), Counter()
    for _ in range(TRIALS):
        noise = torch.empty(3, V).exponential_(generator=gen)  # [depth, V]: the request's noise
        tree = make_tree(noise)
        tokens = verify(tree, lambda node: P[node], noise.__getitem__).tokens
        first[tokens[0]] += 1
        if tokens[0] == tree.tokens[1] and len(tokens) > 1:
            second_after_x1[tokens[1]] += 1
    return first, second_after_x1


def fixed_tree(noise) -> DraftTree:
    return DraftTree([0, 1, 2, 3, 0, 4], [-1, 0, 0, 0, 1, 1])


def raced_tree(noise) -> DraftTree:
    """Children drawn as the model drafter draws them: q raced against the verifier's noise."""
    xs = (Q_ROOT / noise[0]).topk(3).indices.tolist()
    ys = (Q_X1 / noise[1]).topk(2).indices.tolist()
    return DraftTree([0, *xs, *ys], [-1, 0, 0, 0, 1, 1])


def pruned_tree(noise) -> DraftTree:
    """Draws kept only when they scored well under q: the shape depends on the drawn values."""
    xs = [t for t in (Q_ROOT / noise[0]).topk(3).indices.tolist() if Q_ROOT[t] > 0.1]
    return DraftTree([0, *xs], [-1] + [0] * len(xs))


def test_a_fixed_tree_keeps_the_target_distribution():
    first, second = sample_pairs(fixed_tree, verify_sampling)
    assert tv(first, P[0]) < TV_FIRST
    assert tv(second, P[1]) < TV_SECOND


def test_a_tree_drawn_from_the_verifiers_own_noise_keeps_the_target_distribution():
    first, second = sample_pairs(raced_tree, verify_sampling)
    assert tv(first, P[0]) < TV_FIRST
    assert tv(second, P[1]) < TV_SECOND


def test_a_tree_pruned_by_its_drawn_values_keeps_the_target_distribution():
    first, _ = sample_pairs(pruned_tree, verify_sampling)
    assert tv(first, P[0]) < TV_FIRST


def broken_verify(tree, target_p, noise):
    """When the race winner is not a draft, emits the first draft anyway (a bonus that prefers
    the drafts: tokens nobody drafted are never emitted)."""
    winner = race(target_p(0), noise(0))
    kids = tree.children()[0]
    child = next((c for c in kids if tree.tokens[c] == winner), kids[0])
    return Acceptance([0, child], [tree.tokens[child], 0])


def test_a_wrong_acceptance_rule_is_caught():
    first, _ = sample_pairs(fixed_tree, broken_verify)
    assert tv(first, P[0]) > 0.05
