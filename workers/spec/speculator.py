"""One speculation step for a sequence: draft a tree, lay it out, verify, commit its KV."""

import torch

from specserve.kernels.tree import tree_attention_mask

from specserve.workers.engine.forward_batch import SequenceSlots
from specserve.workers.engine.kv_cache import PagedKVCache
from specserve.workers.engine.sampler import target_probs
from specserve.workers.engine.sequence import Sequence, SpecCounters
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.spec_gate import SpecGate
from specserve.workers.spec.tree_size import AcceptanceStats, LatencyCurve, choose_trees
from specserve.workers.spec.verify import Acceptance, verify_greedy, verify_sampling


class Speculator:
    """Drafts, sizes, verifies and commits draft trees for the engine.

    Tree size: with a latency curve, every step's trees are pruned to what maximises
    expected tokens per second (tree_size.py), and speculation is switched off at loads where
    it measurably does not pay (spec_gate.py); max_draft_tokens caps each tree either way.
    """

    def __init__(
        self,
        drafter: Drafter,
        kv: PagedKVCache,
        max_draft_tokens: int,
        max_model_len: int,
        curve: LatencyCurve | None = None,
        gate: bool = True,
    ):
        self.drafter, self.kv = drafter, kv
        self.max_draft_tokens, self.max_model_len = max_draft_tokens, max_model_len
        self.curve = curve
        # On/off by measured rates, when latency-sized and not switched off (SpecConfig.gate).
        self.gate = SpecGate() if curve is not None and gate else None
        self.stats = AcceptanceStats()

    def propose(self, seqs: list[Sequence], other_slots: int = 0) -> list[DraftTree]:
        """Draft trees rooted at each sequence's last token (whose KV is not computed yet),
        no deeper than the tokens it may still produce or the context can hold, with at most
        the engine's and the request's max_draft_tokens (the engine skips requests with 0)."""
        trees = []
        caps = [min(self.max_draft_tokens, seq.params.max_draft_tokens or self.max_draft_tokens) + 1 for seq in seqs]
        for seq, tree in zip(seqs, self.drafter.propose_many(seqs, caps)):  # one call: a remote drafter batches
            room = min(seq.params.max_new_tokens - len(seq.output_ids), self.max_model_len - seq.num_tokens) - 1
            trees.append(tree.limit_depth(max(room, 0)))
        if self.curve is not None and trees:
            trees = choose_trees(trees, self.stats, self.curve, other_slots)
        return trees

    def slots(self, seq: Sequence, tree: DraftTree) -> SequenceSlots:
        """The tree as new slots of seq: position = prefix length + depth, tree attention."""
        prefix = seq.num_computed
        return SequenceSlots(
            seq.table,
            tree.tokens,
            positions=[prefix + d for d in tree.depths],
            tree_mask=tree_attention_mask(tree.parents),
            logits_rows=list(range(tree.size)),
        )

    def verify_and_commit(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor) -> Acceptance:
        """Verifies the tree with the target's logits at its nodes [tree.size, V], keeps the
        accepted path's KV (root included) and frees the rest; returns the new tokens.
        logits[acceptance.path] are the rows that chose acceptance.tokens, one each (the bonus
        token's last): a request's log-probabilities are read from them (engine/logprobs.py)."""
        prefix = seq.num_computed - tree.size
        if seq.params.greedy:
            acceptance = verify_greedy(tree, logits.argmax(dim=-1).tolist())
        else:
            acceptance = verify_sampling(tree, lambda node: target_probs(logits[node], seq.params),
                                         lambda depth: seq.noise(seq.num_tokens + depth, logits.shape[-1]))
        self.kv.compact(seq.table, prefix, acceptance.path)
        self.drafter.observe(seq, tree, logits, acceptance)
        self.stats.record(tree, acceptance.path)
        seq.spec += SpecCounters(spec_steps=1, drafted_tokens=tree.num_drafted, accepted_tokens=acceptance.num_accepted)
        return acceptance

    def speculate(self, num_seqs: int, mixed: bool = False) -> bool:
        """Whether to draft this step for num_seqs decoding sequences, with a prefill chunk in the
        step when mixed (see spec_gate.py)."""
        return self.gate is None or self.gate.speculate(num_seqs, mixed)

    def record_step(self, num_seqs: int, speculated: bool, tokens: int, seconds: float, mixed: bool = False) -> None:
        if self.gate is not None:
            self.gate.record(num_seqs, speculated, tokens, seconds, mixed)

    def release(self, seq: Sequence) -> None:
        self.drafter.release(seq)
