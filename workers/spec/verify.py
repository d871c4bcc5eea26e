"""Exact verification of a draft tree against the target's logits at every node.

Vocabulary: the *accepted path* runs from the root through draft nodes the target agrees
with; the *bonus token* is the target's own token after the last accepted node. Both forms
below are lossless: greedy returns exactly the target's greedy tokens, and sampling returns
tokens distributed exactly as the target's sampling distribution p (temperature, top-k and
top-p applied to p before verification).

Sampling is recursive rejection over siblings (SpecInfer, arXiv 2305.09781, Algorithm 2;
recursive rejection sampling, arXiv 2402.14160): at a node with distribution p and children
x1, x2, ... in order, child xi drawn from q_i (the tree's draft_q row of xi),
    accept xi with probability min(1, p(xi) / q_i(xi));
    on rejection p <- norm(max(p - q_i, 0));
    when every child is rejected, the bonus token is drawn from the residual p.
q_i is the distribution xi was drawn from *given its earlier siblings*: the same q for i.i.d.
draws, q without x1..x(i-1) for draws without replacement. This emits exactly p when each xi
really is a draw from q_i and whether child i exists is settled before xi is drawn (proof in
model_drafter.py). Every child is tried, repeated tokens too: a token rejected once has p = 0
and is rejected again, but its residual step still counts for drawn children.
A drafter without probabilities proposes each child deterministically (q_i = one-hot at xi),
which reduces to: accept xi with probability p(xi), else zero p(xi) and renormalise. That form
is exact for any tree however it was chosen: it is sampling from p and looking the token up
among the children.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve.workers.spec.draft_tree import DraftTree


@dataclass(frozen=True)
class Acceptance:
    path: list[int]  # accepted nodes, root first: [0, a, b] = two draft tokens accepted
    tokens: list[int]  # the new tokens to commit: tokens of path[1:] then the bonus token

    @property
    def num_accepted(self) -> int:
        """Draft tokens accepted (the bonus token not counted)."""
        return len(self.path) - 1


def verify_greedy(tree: DraftTree, target_argmax: list[int]) -> Acceptance:
    """target_argmax[i] = argmax of the target's logits at node i (its next-token choice)."""
    children = tree.children()
    node, path = 0, [0]
    while True:
        want = target_argmax[node]
        match = next((c for c in children[node] if tree.tokens[c] == want), None)
        if match is None:
            break
        node = match
        path.append(node)
    return Acceptance(path, [tree.tokens[n] for n in path[1:]] + [target_argmax[node]])


def verify_sampling(
    tree: DraftTree,
    target_p: Callable[[int], torch.Tensor],  # node -> p [V] at that node (float32, sums to 1)
    generator: torch.Generator,
) -> Acceptance:
    """Recursive rejection sampling down the tree; p is asked for only at visited nodes."""
    children = tree.children()
    node, path = 0, [0]
    while True:
        p = target_p(node)  # [V]
        accepted = None
        for child in children[node]:
            x = tree.tokens[child]
            q = None if tree.draft_q is None else tree.draft_q[child].float()  # [V] q_i; None: one-hot at x
            q_x = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=generator))
            if q_x > 0 and u * q_x < float(p[x]):  # u < p(x) / q(x), without dividing by zero
                accepted = child
                break
            p = _residual(p, x, q)
        if accepted is None:
            bonus = int(torch.multinomial(p, 1, generator=generator))
            return Acceptance(path, [tree.tokens[n] for n in path[1:]] + [bonus])
        node = accepted
        path.append(node)


def _residual(p: torch.Tensor, x: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(p - q, 0)) after x ~ q was rejected; q None: one-hot at x, so p without x."""
    if q is None:
        rest = p.clone()
        rest[x] = 0.0
    else:
        rest = (p - q).clamp(min=0.0)
    total = float(rest.sum())
    # Never empty in exact arithmetic: a rejection needs p(x) < q(x), so p has mass where q has
    # less. Rounding can reject when p == q; p then stays as it was.
    return rest / total if total > 0 else p
