"""The drafter interface: propose a draft tree for a sequence, observe how it was verified."""

from abc import ABC, abstractmethod

import torch

from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.draft_tree import DraftTree, merge_trees
from specserve.workers.spec.verify import Acceptance


class Drafter(ABC):
    name: str

    @abstractmethod
    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        """A tree rooted at seq's last token with at most max_nodes nodes (root included).

        Returns DraftTree.root_only when there is nothing worth drafting.
        """

    def propose_many(self, seqs: list[Sequence], max_nodes: list[int]) -> list[DraftTree]:
        """propose for several sequences at once (a drafter in another process answers them in one call)."""
        return [self.propose(seq, n) for seq, n in zip(seqs, max_nodes)]

    def observe(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, acceptance: Acceptance) -> None:
        """Called after verification with the target's logits at every node [tree.size, V]."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished: drop any state kept for it."""


class CombinedDrafter(Drafter):
    """Several drafters' trees merged into one, siblings deduplicated; earlier drafters first."""

    def __init__(self, drafters: list[Drafter]):
        self.drafters = drafters
        self.name = "+".join(d.name for d in drafters)

    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        return merge_trees([d.propose(seq, max_nodes) for d in self.drafters], max_nodes)

    def propose_many(self, seqs: list[Sequence], max_nodes: list[int]) -> list[DraftTree]:
        per_drafter = [d.propose_many(seqs, max_nodes) for d in self.drafters]  # [drafter][seq]
        return [merge_trees(list(trees), n) for trees, n in zip(zip(*per_drafter), max_nodes)]

    def observe(self, seq, tree, logits, acceptance) -> None:
        for d in self.drafters:
            d.observe(seq, tree, logits, acceptance)

    def release(self, seq) -> None:
        for d in self.drafters:
            d.release(seq)
