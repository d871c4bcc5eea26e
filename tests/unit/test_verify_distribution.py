"""Sampling under speculation has exactly the target distribution (toy vocabulary of 5).

    r ─ x1 ─ y1          drafts: three children of the root, two under the first one
      ├ x2   └ y2
      └ x3
The first emitted token must follow p(root); given that it is x1, the second must follow p(x1).
Total-variation bounds below are ~4x the sampling noise at these counts; the broken acceptor
at the end shows the test tells a wrong rule apart (its TV is > 0.05).
"""

from collections import Counter

import torch

from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.verify import verify_sampling

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
        tree = make_tree(gen)
        tokens = verify(tree, lambda node: P[node], gen).tokens
        first[tokens[0]] += 1
        if tokens[0] == tree.tokens[1] and len(tokens) > 1:
            second_after_x1[tokens[1]] += 1
    return first, second_after_x1


def fixed_tree(gen) -> DraftTree:
    return DraftTree([0, 1, 2, 3, 0, 4], [-1, 0, 0, 0, 1, 1])


def draws_without_replacement(q: torch.Tensor, n: int, gen) -> tuple[list[int], list[torch.Tensor]]:
    """n tokens drawn one by one from q without the earlier ones, and each one's q_i."""
    tokens, rows, left = [], [], q.clone()
    for _ in range(n):
        rows.append(left / left.sum())
        tokens.append(int(torch.multinomial(rows[-1], 1, generator=gen)))
        left[tokens[-1]] = 0.0
    return tokens, rows


def drafted_tree(gen) -> DraftTree:
    """Children drawn from q without replacement, each node's q_i recorded."""
    xs, x_rows = draws_without_replacement(Q_ROOT, 3, gen)
    ys, y_rows = draws_without_replacement(Q_X1, 2, gen)
    q = torch.stack([Q_ROOT, *x_rows, *y_rows])
    return DraftTree([0, *xs, *ys], [-1, 0, 0, 0, 1, 1], draft_q=q)


def test_target_only_form_keeps_the_target_distribution():
    first, second = sample_pairs(fixed_tree, verify_sampling)
    assert tv(first, P[0]) < TV_FIRST
    assert tv(second, P[1]) < TV_SECOND


def test_draft_probability_form_keeps_the_target_distribution():
    first, second = sample_pairs(drafted_tree, verify_sampling)
    assert tv(first, P[0]) < TV_FIRST
    assert tv(second, P[1]) < TV_SECOND


def broken_verify(tree, target_p, gen):
    """Accepts a child with probability p(x) but forgets to remove rejected mass."""
    from specserve.workers.spec.verify import Acceptance

    p = target_p(0)
    for child in tree.children()[0]:
        if float(torch.rand((), generator=gen)) < float(p[tree.tokens[child]]):
            return Acceptance([0, child], [tree.tokens[child], 0])
    return Acceptance([0], [int(torch.multinomial(p, 1, generator=gen))])


def test_a_wrong_acceptance_rule_is_caught():
    first, _ = sample_pairs(fixed_tree, broken_verify)
    assert tv(first, P[0]) > 0.05
