"""SuffixDecoding (Oliaro et al., arXiv 2411.04975): drafts from suffix trees of text seen before.

Two trees answer each proposal (suffix_tree.py):
- the request's own tree over its prompt + output so far, extended by the tokens committed
  since its last proposal;
- the shared tree of its cache salt over recent finished requests (the last max_match prompt
  tokens + the output of each, so an output's start is reachable from the prompt's end),
  fed when a request is released; requests with different salts never share drafts.
Each grows a frequency-scored tree; the one with more expected accepted tokens comes first in
the merge, the other fills the remaining nodes. Proposals read only committed tokens and
finished requests, never the verifier's coins, so target-only verification stays exact.
"""

from dataclasses import dataclass

from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.draft_tree import DraftTree, merge_trees
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.suffix_tree import SharedSuffixTrees, SuffixConfig, SuffixTree


@dataclass
class _RequestTree:
    tree: SuffixTree
    indexed: int = 0  # tokens of the sequence already in the tree


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, config: SuffixConfig = SuffixConfig()):
        self.config = config
        self.shared = SharedSuffixTrees(config.max_depth, config.shared_max_nodes)
        self._requests: dict[str, _RequestTree] = {}

    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        own = self._requests.get(seq.request_id)
        if own is None:
            own = self._requests[seq.request_id] = _RequestTree(SuffixTree(self.config.max_depth))
        if own.indexed < seq.num_tokens:
            own.tree.extend(_tokens_from(seq, own.indexed))
            own.indexed = seq.num_tokens
        context = _tokens_from(seq, seq.num_tokens - self.config.max_match)
        trees = [own.tree, self.shared.tree(seq.cache_salt)]
        found = [t.speculate(context, max_nodes, self.config) for t in trees if t is not None]
        found.sort(key=lambda s: -s.score)  # stable: the request's own tree wins ties
        return merge_trees([s.tree for s in found], max_nodes)

    def release(self, seq: Sequence) -> None:
        self._requests.pop(seq.request_id, None)
        if seq.output_ids:
            self.shared.add(seq.cache_salt, seq.prompt_ids[-self.config.max_match:] + seq.output_ids)


def _tokens_from(seq: Sequence, start: int) -> list[int]:
    """seq.token_ids[start:] without joining prompt and output first."""
    start = max(start, 0)
    n = len(seq.prompt_ids)
    if start >= n:
        return seq.output_ids[start - n:]
    return seq.prompt_ids[start:] + seq.output_ids
