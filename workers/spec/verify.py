"""Exact verification of a draft tree against the target's logits at every node.

Vocabulary: the *accepted path* runs from the root through draft nodes the target agrees
with; the *bonus token* is the target's own token after the last accepted node. Both forms
below are lossless, and for the same reason: the target decides every token by itself, and
the tree only settles how many of those decisions one forward makes.

Greedy: the token at each node is the argmax of the target's logits there.

Sampling: the token at each node is race(p, E) = argmax p(t) / E(t) (sampler.py), p the
target's sampling distribution there (temperature, top-k and top-p applied) and E the
request's noise for that token's position (Sequence.noise: i.i.d. Exp(1), from the request's
seed and the position alone). Walk from the root: the target's token at the node, if it is a
child, is accepted and the walk goes on from it; else it is the bonus token.

Why this is exact, for any tree and any drafter. The tokens a request emits are
x_j = race(p_j, E_j), p_j the target's distribution after x_<j; a node's logits are computed
on exactly that context, so the walk emits x_j for as long as x_j is a child, and the next
step picks up at the same position with the same E_j. E_j is independent of x_<j (a fresh
draw per position), so P(x_j = t | x_<j) = p_j(t): exactly autoregressive sampling from the
target. The drafter may see E_j (the model drafter draws its children by racing its own q
against it, so they are good guesses of x_j) — that cannot bias anything, because the tree
only decides when a step stops, never which token a position gets. Consequences that tests
check token for token: a seeded request samples the same tokens with every speculation
method, tree size and drafter as with none, and after a resubmission (issue 17 found the
earlier recursive-rejection scheme biased once a drafter pruned by drawn values; issue 18
needed a resubmitted sample to continue unchanged: both are properties of the race).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve.workers.engine.sampler import race
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
    return walk(tree, target_argmax.__getitem__)


def verify_sampling(
    tree: DraftTree,
    target_p: Callable[[int], torch.Tensor],  # node -> p [V] at that node (float32, sums to 1)
    noise: Callable[[int], torch.Tensor],  # depth d -> [V] the noise of the token d places past the root's
) -> Acceptance:
    """The target's sampled token at each visited node; p is asked for only at those nodes."""
    return walk(tree, lambda node: race(target_p(node), noise(tree.depths[node])))


def walk(tree: DraftTree, target_token: Callable[[int], int]) -> Acceptance:
    """Follows the target's token at each node down the tree while it is a child."""
    children = tree.children()
    node, path = 0, [0]
    while True:
        want = target_token(node)
        match = next((c for c in children[node] if tree.tokens[c] == want), None)
        if match is None:
            return Acceptance(path, [tree.tokens[n] for n in path[1:]] + [want])
        node = match
        path.append(node)
