"""Prompt lookup: continue the longest suffix of the tokens so far that occurred before.

Matches are searched in the prompt and the output, longest n-gram first, most recent first;
each distinct continuation becomes a branch of the draft tree.
"""

import numpy as np

from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.draft_tree import DraftTree, merge_trees
from specserve.workers.spec.drafter import Drafter


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_branches: int = 4, branch_len: int = 10):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_branches, self.branch_len = max_branches, branch_len

    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        history = np.asarray(seq.token_ids, dtype=np.int64)
        root = int(history[-1])
        branches: list[DraftTree] = []
        seen: set[tuple[int, ...]] = set()
        for n in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            for start in self._matches(history, n):
                cont = tuple(history[start + n : start + n + self.branch_len].tolist())
                if cont and cont not in seen:
                    seen.add(cont)
                    branches.append(DraftTree([root, *cont], list(range(-1, len(cont)))))
                    if len(branches) == self.max_branches:
                        return merge_trees(branches, max_nodes)
        return merge_trees(branches, max_nodes) if branches else DraftTree.root_only(root)

    @staticmethod
    def _matches(history: np.ndarray, n: int) -> list[int]:
        """Starts of earlier occurrences of the last n tokens, most recent first."""
        suffix = history[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)  # (L - n, n): no self-match
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        return hits[::-1].tolist()
