"""A small causal LM that shares the target's tokenizer drafts a tree, level by level.

Every request grows a dynamic tree from the draft model's own probabilities q (EAGLE-2, arXiv
2406.16858): every node's score is its cumulative draft probability (the product along its
path); each level expands the `beam` best-scored new nodes, each proposing `top_k` next
tokens; at the end the `max_nodes` best-scored nodes form the tree (a child never outscores its
parent, so that is a tree). A greedy request's children are q's likeliest tokens; a sampled
request's are the top_k winners of the race q(t) / E(t) against the request's noise E for that
position (q with its temperature / top-k / top-p) — top_k draws from q without replacement that
are coupled to the target's own draw there: when q is close to p, the target's token is likely
among them. Verification is exact for any tree however it was chosen (verify.py): the tree
never decides which token a position gets.

The draft model keeps its own paged KV per sequence, for the committed tokens only: each
proposal first feeds the tokens committed since the last one, then writes tree nodes after
them, and gives those tree slots back before returning.
"""

import heapq
from dataclasses import dataclass

import torch

from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, OutOfBlocksError, PagedKVCache
from specserve.workers.model.llama import LlamaModel
from specserve.workers.engine.sampler import target_probs
from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.draft_prefix import DraftPrefixCache
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.drafter import Drafter


@dataclass
class _Candidate:
    score: float  # cumulative draft probability of the path
    depth: int
    token: int
    parent: int  # index of the parent candidate, -1 for the root's children
    draft_slot: int = -1  # its position among the tree slots in the draft KV, once forwarded


TOP_K, BEAM, MAX_DEPTH = 4, 4, 8


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, model: LlamaModel, kv: PagedKVCache, top_k: int = TOP_K, beam: int = BEAM,
                 max_depth: int = MAX_DEPTH, prefix_cache: DraftPrefixCache | None = None):
        """prefix_cache: caches the draft model's prompt blocks (draft_prefix.py); None: always computed."""
        self.model, self.kv, self.prefix_cache = model, kv, prefix_cache
        self.top_k, self.beam, self.max_depth = top_k, beam, max_depth
        self._tables: dict[Sequence, BlockTable] = {}

    @staticmethod
    def max_tree_slots(beam: int = BEAM, max_depth: int = MAX_DEPTH) -> int:
        """Draft-KV slots one proposal may write beyond the committed tokens."""
        return beam * max_depth

    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        table = self._tables.setdefault(seq, BlockTable())
        committed = seq.num_tokens  # the root (last token) included
        if table.num_tokens >= committed:  # a preempted sequence starts over
            self.kv.truncate(table, 0)
        fresh = table.num_tokens == 0 and self.prefix_cache is not None
        try:
            if fresh:
                self.prefix_cache.attach(seq, table)
            root_q = self._forward(table, seq.token_ids[table.num_tokens :], None, [], seq)[0]  # [V]
            if fresh:
                self.prefix_cache.computed(seq, table)
            cands = self._grow(seq, table, root_q, committed, max_nodes)
        except OutOfBlocksError:  # the draft pool is full: no draft this step
            return DraftTree.root_only(seq.token_ids[-1])
        finally:
            self.kv.truncate(table, min(committed, table.num_tokens))  # drop the tree slots
        return self._tree(seq.token_ids[-1], cands, max_nodes)

    def place_prefix(self, seq: Sequence, k: torch.Tensor, v: torch.Tensor) -> None:
        """Takes the draft model's K/V of seq's first tokens computed elsewhere (a prefill worker),
        [L, n, Hkv, D] each with n < seq.num_tokens, so the next proposal computes only the rest."""
        if k.shape[1] >= seq.num_tokens:
            raise ValueError(f"draft K/V of {k.shape[1]} tokens for a sequence of {seq.num_tokens}: the last token "
                             "(the root) must be computed by the drafter")
        self.release(seq)
        table = BlockTable()
        self.kv.extend(table, k, v)
        self._tables[seq] = table

    def release(self, seq: Sequence) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.forget(seq)
        table = self._tables.pop(seq, None)
        if table is not None:
            self.kv.free(table)

    def _grow(self, seq: Sequence, table: BlockTable, root_q: torch.Tensor, committed: int, max_nodes: int):
        cands = self._children(seq, root_q, -1, 1.0, 0)
        frontier = list(range(len(cands)))
        forwarded: list[int] = []  # candidates with KV in the tree slots, in slot order
        depth = 1
        while depth <= min(self.max_depth - 1, max_nodes - 2):
            expand = heapq.nlargest(self.beam, frontier, key=lambda c: cands[c].score)
            if not expand:
                break
            mask = self._grow_mask(cands, forwarded, expand)
            positions = [committed - 1 + depth] * len(expand)
            for i, c in enumerate(expand):
                cands[c].draft_slot = len(forwarded) + i
            q_rows = self._forward(table, [cands[c].token for c in expand], mask, positions, seq)
            forwarded += expand
            frontier = []
            for c, q in zip(expand, q_rows):
                start = len(cands)
                cands += self._children(seq, q, c, cands[c].score, depth)
                frontier += range(start, len(cands))
            depth += 1
        return cands

    def _children(self, seq: Sequence, q: torch.Tensor, parent: int, score: float, depth: int) -> list[_Candidate]:
        """top_k next tokens of a node at `depth`: q's likeliest (greedy), or the top_k winners of
        q's race against the noise of the position they would fill (sampling), never one q rules out."""
        if seq.params.greedy:
            tokens = q.topk(self.top_k).indices
        else:
            tokens = (q / seq.noise(seq.num_tokens + depth, q.shape[-1])).topk(self.top_k).indices
        return [_Candidate(score * float(q[t]), depth + 1, int(t), parent) for t in tokens if q[t] > 0]

    def _grow_mask(self, cands: list[_Candidate], forwarded: list[int], expand: list[int]) -> torch.Tensor:
        """[len(expand), len(forwarded) + len(expand)]: each new node sees its forwarded ancestors and itself."""
        mask = torch.zeros(len(expand), len(forwarded) + len(expand), dtype=torch.bool)
        for i, c in enumerate(expand):
            mask[i, len(forwarded) + i] = True
            a = cands[c].parent
            while a >= 0:
                mask[i, cands[a].draft_slot] = True
                a = cands[a].parent
        return mask

    def _forward(self, table, tokens, mask, positions, seq: Sequence) -> list[torch.Tensor]:
        """Runs new slots through the draft model; returns q [V] at each of them."""
        slots = SequenceSlots(table, list(tokens), positions=positions or None, tree_mask=mask,
                              logits_rows=list(range(len(tokens))) if mask is not None else None)
        logits = self.model.forward(build_forward_batch([slots], self.kv, None, self.model.device), self.kv)
        if seq.params.greedy:
            return list(torch.softmax(logits, dim=-1))
        return [target_probs(row, seq.params) for row in logits]

    def _tree(self, root: int, cands: list[_Candidate], max_nodes: int) -> DraftTree:
        """The max_nodes - 1 best-scored candidates."""
        best = heapq.nlargest(max_nodes - 1, range(len(cands)), key=lambda c: (cands[c].score, -cands[c].depth))
        keep = sorted(best, key=lambda c: (cands[c].depth, c))  # parents before children
        index = {c: i + 1 for i, c in enumerate(keep)}
        tokens = [root] + [cands[c].token for c in keep]
        parents = [-1] + [index[cands[c].parent] if cands[c].parent >= 0 else 0 for c in keep]
        return DraftTree(tokens, parents)
