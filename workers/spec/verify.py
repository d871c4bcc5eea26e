"""Exact verification of a draft tree against the target's logits at every node.

Vocabulary: the *accepted path* runs from the root through draft nodes the target agrees
with; the *bonus token* is the target's own token after the last accepted node. Both forms
below are lossless: greedy returns exactly the target's greedy tokens, and sampling returns
tokens distributed exactly as the target's sampling distribution p (temperature, top-k and
top-p applied to p before verification).

Sampling is recursive rejection over siblings (SpecInfer, arXiv 2305.09781, Algorithm 2): at
a node with distribution p and children x1, x2, ... drawn from q,
    accept xi with probability min(1, p(xi) / q(xi));
    on rejection p <- norm(max(p - q, 0)), and q <- norm(q without xi) (draws without replacement);
    when every child is rejected, the bonus token is drawn from the residual p.
A drafter without probabilities proposes each child deterministically (q = one-hot at xi),
which reduces to: accept xi with probability p(xi), else zero p(xi) and renormalise.
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
        p = target_p(node).clone()
        q = tree.draft_q[children[node][0]].clone().float() if tree.draft_q is not None and children[node] else None
        accepted = None
        for child in _distinct_children(tree, children[node]):
            x = tree.tokens[child]
            q_x = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=generator))
            if q_x > 0 and u * q_x < float(p[x]):  # u < p(x) / q(x), without dividing by zero
                accepted = child
                break
            if q is None:
                p[x] = 0.0
            else:
                p = (p - q).clamp_(min=0.0)
                q[x] = 0.0
                q = q / q.sum() if q.sum() > 0 else q
            # Never empty: a token holding all of p's mass is accepted with probability 1.
            p /= p.sum()
        if accepted is None:
            bonus = int(torch.multinomial(p, 1, generator=generator))
            return Acceptance(path, [tree.tokens[n] for n in path[1:]] + [bonus])
        node = accepted
        path.append(node)


def _distinct_children(tree: DraftTree, kids: list[int]) -> list[int]:
    """Siblings in order, each token once (a repeated sibling adds nothing to verification)."""
    seen, out = set(), []
    for c in kids:
        if tree.tokens[c] not in seen:
            seen.add(tree.tokens[c])
            out.append(c)
    return out
