"""A small causal LM that shares the target's tokenizer drafts a tree, level by level.

Greedy requests grow a dynamic tree from the draft model's own probabilities (EAGLE-2, arXiv
2406.16858): every node's score is its cumulative draft probability (the product along its
path); each level expands the `beam` best-scored new nodes, each proposing its `top_k` likeliest
next tokens; at the end the `max_nodes` best-scored nodes form the tree (a child never
outscores its parent, so that is a tree). Greedy verification is exact for any tree.

Sampling requests get a tree whose *shape* is fixed before anything is drawn, and every draw
in it is verified (recursive rejection sampling, verify.py):
- every expanded node gets exactly `top_k` children x1..xk drawn from its q (the draft model's
  distribution with the request's temperature / top-k / top-p): each from q without the
  earlier draws (renormalised), or from q itself once q has no tokens left;
- each level expands the first `beam` nodes of the level in node order (creation order:
  parents' order, then draw order), and the tree is the first max_nodes - 1 nodes created.
Each node records the distribution q_i it was drawn from (the tree's draft_q).

Why this is exact. Take one node with target distribution p and its children in order, where
given the earlier siblings x1..x(i-1), xi ~ q_i and whether sibling i exists does not depend on
xi or later draws. The verifier accepts xi with probability min(1, p(xi)/q_i(xi)), else moves
on with p <- norm(max(p - q_i, 0)), and draws from p when every child is rejected. By induction
from the last child: the step emits y with probability min(p, q_i)(y) + sum(max(p - q_i, 0)) *
p'(y) = p(y), because the rest emits p' whatever xi was (the induction hypothesis holds given
any earlier draws). Duplicates need no care: a rejected token has p' = 0 and is rejected again,
with its residual step. Down the tree, the children of an accepted node are drawn after that
node, from fresh randomness, so the argument repeats one level down.

The shape condition is what breaks if the tree is pruned by the drawn values: keeping the
best-scored draws (or only some of a node's draws, chosen by score) makes the number of a
node's verified draws depend on which tokens came out, and the output is biased (issue 17: p =
(.2, .4, .4), q = (.6, .3, .1), two draws, one kept by score -> (.271, .286, .443)). Here nothing
about the shape depends on drawn values: the node count, which nodes are expanded and the cut
at max_nodes are all set by (top_k, beam, max_depth, max_nodes). That also keeps the later
pruning exact: limit_depth and the latency-sized choose_trees (tree_size.py) look only at the
shape and at earlier steps' statistics, and keep a prefix of every node's children. Score-based
expansion (EAGLE-2 for sampling) would be exact on its own, but choose_trees would then see a
shape that depends on the draws.

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
    q: torch.Tensor | None  # [V] q_i, the distribution it was drawn from (sampling only)
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
        return self._tree(seq.token_ids[-1], cands, max_nodes, greedy=seq.params.greedy)

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
            if seq.params.greedy:
                expand = heapq.nlargest(self.beam, frontier, key=lambda c: cands[c].score)
            else:  # the shape is fixed before drawing: the first nodes, only while their children fit
                room = -(-(max_nodes - 1 - len(cands)) // self.top_k)  # [13 nodes left, top_k 4] -> 4
                expand = frontier[: min(self.beam, max(room, 0))]
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
        """top_k next tokens of a node: the likeliest (greedy), or top_k draws (sampling)."""
        if seq.params.greedy:
            probs, tokens = q.topk(self.top_k)
            return [_Candidate(score * float(p), depth + 1, int(t), parent, None) for p, t in zip(probs, tokens)]
        children, left = [], q.clone()  # left: q without the tokens drawn so far
        for _ in range(self.top_k):
            q_i = left / left.sum() if left.sum() > 0 else q  # [V] exhausted (top-p, tiny vocab): q again
            token = int(torch.multinomial(q_i, 1, generator=seq.generator))
            children.append(_Candidate(score * float(q[token]), depth + 1, token, parent, q_i))
            left[token] = 0.0
        return children

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

    def _tree(self, root: int, cands: list[_Candidate], max_nodes: int, greedy: bool) -> DraftTree:
        """Greedy: the max_nodes - 1 best-scored candidates. Sampling: the first max_nodes - 1
        created (a fixed shape; every draw of a kept node's children up to the cut is kept)."""
        if greedy:
            best = heapq.nlargest(max_nodes - 1, range(len(cands)), key=lambda c: (cands[c].score, -cands[c].depth))
        else:
            best = range(min(len(cands), max_nodes - 1))
        keep = sorted(best, key=lambda c: (cands[c].depth, c))  # parents before children
        index = {c: i + 1 for i, c in enumerate(keep)}
        tokens = [root] + [cands[c].token for c in keep]
        parents = [-1] + [index[cands[c].parent] if cands[c].parent >= 0 else 0 for c in keep]
        q = None
        if not greedy and keep:
            q = torch.stack([cands[keep[0]].q] + [cands[c].q for c in keep])  # [n, V] row 0 unused
        return DraftTree(tokens, parents, q)
