"""The `auto` method: several drafters' trees merged, with each request's node budget shared out
by how well each drafter has done for that request so far (no drafter is best everywhere:
suffix trees win on repeated text, recycling on open chat).

Per request and drafter, rate = accepted draft tokens / drafted nodes it proposed, credited
through the merged tree (a node proposed by two drafters counts for both). A new request starts
from the engine-wide rates, weighted as prior_weight drafted nodes. Each step:
    share_i  = floor + (1 - n * floor) * rate_i / sum(rate)     (floor: no drafter starves)
    budget_i = share_i * (max_nodes - 1)
drafters are merged best rate first, and nodes a drafter leaves unused pass to the next.
Budgets depend only on earlier steps' results, never on the current step's verification, so
target-only verification of the merged tree stays exact.
"""

from dataclasses import dataclass, field

import torch

from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.draft_tree import DraftTree, merge_trees
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.verify import Acceptance


@dataclass
class _Rates:
    accepted: list[float]  # [drafters] accepted draft tokens credited to each
    drafted: list[float]  # [drafters] drafted nodes credited to each

    def rate(self, i: int) -> float:
        return self.accepted[i] / self.drafted[i]


@dataclass
class _RequestMix:
    rates: _Rates
    owners: list[int] = field(default_factory=list)  # [merged nodes] bit i set: drafter i proposed it
    child_of: dict[tuple[int, int], int] = field(default_factory=dict)  # (merged parent, token) -> merged node


class DrafterMix(Drafter):
    name = "auto"

    def __init__(self, drafters: list[Drafter], floor: float = 0.1, prior_weight: float = 8.0, prior_rate: float = 0.25):
        if not 0 <= floor * len(drafters) <= 1:
            raise ValueError(f"floor {floor} for {len(drafters)} drafters leaves no share to divide (need floor * n <= 1)")
        if prior_weight <= 0 or prior_rate <= 0:
            raise ValueError(f"prior_weight and prior_rate must be > 0, got {prior_weight}, {prior_rate}")
        self.drafters, self.floor, self.prior_weight = drafters, floor, prior_weight
        n = len(drafters)
        self.engine_rates = _Rates([prior_rate * prior_weight] * n, [prior_weight] * n)  # all requests
        self._requests: dict[str, _RequestMix] = {}

    def budgets(self, seq: Sequence, draft_nodes: int) -> list[int]:
        """Draft nodes each drafter may add for seq this step (their sum is at most draft_nodes)."""
        rates = self._mix(seq).rates
        r = [rates.rate(i) for i in range(len(self.drafters))]
        spread = 1 - self.floor * len(r)
        return [int(draft_nodes * (self.floor + spread * ri / sum(r))) for ri in r]

    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        mix = self._mix(seq)
        budgets = self.budgets(seq, max_nodes - 1)
        order = sorted(range(len(self.drafters)), key=lambda i: -mix.rates.rate(i))
        merged, allowed = DraftTree.root_only((seq.output_ids or seq.prompt_ids)[-1]), 1
        sources: list[tuple[int, DraftTree]] = []
        for i in order:
            allowed += budgets[i]  # what a drafter leaves unused passes to the next
            if allowed > merged.size:
                tree = self.drafters[i].propose(seq, allowed - merged.size + 1)
                merged = merge_trees([merged, tree], allowed)
                sources.append((i, tree))
        self._record_owners(mix, merged, sources)
        return merged

    def _record_owners(self, mix: _RequestMix, merged: DraftTree, sources: list[tuple[int, DraftTree]]) -> None:
        mix.child_of = {(p, t): n for n, (p, t) in enumerate(zip(merged.parents, merged.tokens)) if n}
        mix.owners = [0] * merged.size
        for i, tree in sources:
            where = [0] * tree.size  # node of tree -> merged node (-1: cut off)
            for n in range(1, tree.size):
                parent = where[tree.parents[n]]
                where[n] = mix.child_of.get((parent, tree.tokens[n]), -1) if parent >= 0 else -1
                if where[n] >= 0:
                    mix.owners[where[n]] |= 1 << i

    def observe(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, acceptance: Acceptance) -> None:
        """Credits each drafter with the verified tree's nodes it proposed and the accepted ones
        among them; the verified tree may be a pruned copy of the proposal (tree size policy)."""
        for d in self.drafters:
            d.observe(seq, tree, logits, acceptance)
        mix = self._requests.get(seq.request_id)
        if mix is None:
            return
        accepted, where = set(acceptance.path), [0] * tree.size
        for n in range(1, tree.size):
            parent = where[tree.parents[n]]
            where[n] = mix.child_of.get((parent, tree.tokens[n]), -1) if parent >= 0 else -1
            owners = mix.owners[where[n]] if where[n] >= 0 else 0
            for i in range(len(self.drafters)):
                if owners >> i & 1:
                    for rates in (mix.rates, self.engine_rates):
                        rates.drafted[i] += 1
                        rates.accepted[i] += n in accepted

    def release(self, seq: Sequence) -> None:
        for d in self.drafters:
            d.release(seq)
        self._requests.pop(seq.request_id, None)

    def _mix(self, seq: Sequence) -> _RequestMix:
        mix = self._requests.get(seq.request_id)
        if mix is None:
            w, engine = self.prior_weight, self.engine_rates
            prior = [w * engine.rate(i) for i in range(len(self.drafters))]
            mix = self._requests[seq.request_id] = _RequestMix(_Rates(prior, [w] * len(self.drafters)))
        return mix
