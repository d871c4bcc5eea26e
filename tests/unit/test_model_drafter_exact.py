"""The model drafter's sampled trees are verified exactly: computed, not sampled.

Every random draw the drafter makes is enumerated (each call of torch.multinomial branches over
its support, weighted by its probability), and for each drawn tree the verifier's output is
computed exactly: child i is accepted with probability min(1, p(x)/q_i(x)), and the residual
after a rejection is verify._residual. The toy target and draft are Markov in the last token:

    root ─ x1 ─ y1       first token: p(. | root); second: p(. | first)
         │    └ y2       q(. | token) is the draft model's; the tree's shape is (top_k, beam,
         └ x2 ─ ...      max_nodes); x1, x2 drawn from q(. | root), y1, y2 from q(. | x1)

Each test compares the exact distribution of the first one or two tokens with the target's to
1e-9. The old rule (keep the best-scored draws, issue 17) fails the same comparison: TV 0.114.
"""

import heapq
from collections import defaultdict

import pytest
import torch

from specserve.workers.engine.sampler import target_probs
from specserve.workers.engine.sequence import SamplingParams, Sequence
from specserve.workers.spec.draft_tree import DraftTree, merge_trees
from specserve.workers.spec.model_drafter import ModelDrafter
from specserve.workers.spec.tree_size import AcceptanceStats, LatencyCurve, choose_trees
from specserve.workers.spec.verify import _residual

EXACT = 1e-9
ROOT = 0  # the root's token: p(. | ROOT) is the first token's distribution


def tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def step_exact(tree: DraftTree, node: int, p: torch.Tensor) -> list[tuple[float, int | None, int]]:
    """[(probability, accepted child or None for the bonus, token)]: the verifier's next token at node."""
    out, reach = [], 1.0
    for child in tree.children()[node]:
        x = tree.tokens[child]
        q = None if tree.draft_q is None else tree.draft_q[child].double()  # [V]
        q_x = 1.0 if q is None else float(q[x])
        accept = min(1.0, float(p[x]) / q_x) if q_x > 0 else 0.0
        out.append((reach * accept, child, x))
        reach *= 1.0 - accept
        p = _residual(p, x, q)
    return out + [(reach * p_t, None, t) for t, p_t in enumerate(p.tolist()) if p_t > 0]


def verified_exact(tree: DraftTree, target: torch.Tensor, tokens: int) -> dict[tuple[int, ...], float]:
    """Exact distribution of the first `tokens` (1 or 2) tokens emitted; target[t] = p(. | t).
    After a bonus token the next one is the next step's, exact by induction: p(. | bonus)."""
    dist: dict[tuple[int, ...], float] = defaultdict(float)
    for a, child, x in step_exact(tree, 0, target[tree.tokens[0]].double()):
        if tokens == 1:
            dist[(x,)] += a
        elif child is None:
            for y, b in enumerate(target[x].double().tolist()):
                dist[(x, y)] += a * b
        else:
            for b, _, y in step_exact(tree, child, target[x].double()):
                dist[(x, y)] += a * b
    return dist


def true_dist(target: torch.Tensor, tokens: int) -> dict[tuple[int, ...], float]:
    first = target[ROOT].double().tolist()
    if tokens == 1:
        return {(x,): px for x, px in enumerate(first)}
    return {(x, y): px * py for x, px in enumerate(first) for y, py in enumerate(target[x].double().tolist())}


def enumerate_draws(build, monkeypatch) -> list[tuple[float, DraftTree]]:
    """Every outcome of build() over the values torch.multinomial can return, with its probability.
    build() is replayed with a fixed prefix of choices; each new call branches over its support."""
    outcomes, pending = [], [[]]
    while pending:
        prefix = pending.pop()
        chosen, weight = [], [1.0]

        def multinomial(q, n, replacement=False, generator=None):
            assert n == 1, "the drafter draws one token per call"
            q = q.tolist()
            support = [t for t, q_t in enumerate(q) if q_t > 0]
            if len(chosen) < len(prefix):
                token = prefix[len(chosen)]
            else:
                token = support[0]
                pending.extend(chosen + [t] for t in support[1:])
            chosen.append(token)
            weight[0] *= q[token] / sum(q)
            return torch.tensor([token])

        with monkeypatch.context() as m:
            m.setattr(torch, "multinomial", multinomial)
            tree = build()
        outcomes.append((weight[0], tree))
    assert sum(w for w, _ in outcomes) == pytest.approx(1.0, abs=EXACT)
    return outcomes


def drafter_for(draft: torch.Tensor, top_k: int, beam: int = 2) -> ModelDrafter:
    """A ModelDrafter whose 'model' answers q(. | token) from the table draft[token]."""
    drafter = ModelDrafter(model=None, kv=None, top_k=top_k, beam=beam)
    drafter._forward = lambda table, tokens, mask, positions, seq: [draft[t] for t in tokens]
    return drafter


def sampled_tree(drafter: ModelDrafter, draft: torch.Tensor, max_nodes: int) -> DraftTree:
    seq = Sequence([ROOT], SamplingParams(temperature=1.0))
    cands = drafter._grow(seq, None, draft[ROOT], committed=1, max_nodes=max_nodes)
    return drafter._tree(ROOT, cands, max_nodes, greedy=False)


def old_tree(drafter: ModelDrafter, draft: torch.Tensor, max_nodes: int) -> DraftTree:
    """The rule issue 17 found biased: the best-scored candidates, then every sibling drawn after a
    dropped one dropped too."""
    seq = Sequence([ROOT], SamplingParams(temperature=1.0))
    cands = drafter._grow(seq, None, draft[ROOT], committed=1, max_nodes=max_nodes)
    best = set(heapq.nlargest(max_nodes - 1, range(len(cands)), key=lambda c: (cands[c].score, -cands[c].depth)))
    keep, broken = [], set()
    for c in range(len(cands)):
        if c in best and cands[c].parent not in broken and (cands[c].parent < 0 or cands[c].parent in keep):
            keep.append(c)
        else:
            broken.add(cands[c].parent)
    index = {c: i + 1 for i, c in enumerate(keep)}
    parents = [-1] + [index.get(cands[c].parent, 0) for c in keep]
    q = torch.stack([draft[ROOT]] + [cands[c].q for c in keep])
    return DraftTree([ROOT] + [cands[c].token for c in keep], parents, q)


def exact_output(outcomes, target: torch.Tensor, tokens: int) -> dict[tuple[int, ...], float]:
    total: dict[tuple[int, ...], float] = defaultdict(float)
    for weight, tree in outcomes:
        for key, prob in verified_exact(tree, target, tokens).items():
            total[key] += weight * prob
    return total


def markov(rows: list[list[float]]) -> torch.Tensor:
    """[V, V] row t = a distribution given the last token t (rows normalised)."""
    table = torch.tensor(rows, dtype=torch.float64)
    return table / table.sum(dim=-1, keepdim=True)


def test_issue_17_counter_example(monkeypatch):
    # p = (.2, .4, .4), q = (.6, .3, .1), two draws, max_nodes = 2 (one draft node kept)
    target = markov([[0.2, 0.4, 0.4]] * 3)
    draft = markov([[0.6, 0.3, 0.1]] * 3)
    drafter = drafter_for(draft, top_k=2)
    old = exact_output(enumerate_draws(lambda: old_tree(drafter, draft, 2), monkeypatch), target, 1)
    assert [round(old[(t,)], 3) for t in range(3)] == [0.271, 0.286, 0.443]
    assert tv(old, true_dist(target, 1)) == pytest.approx(0.114, abs=1e-3)  # would fail the check below
    new = exact_output(enumerate_draws(lambda: sampled_tree(drafter, draft, 2), monkeypatch), target, 1)
    assert tv(new, true_dist(target, 1)) < EXACT


P_FIRST = [0.2, 0.4, 0.3, 0.1]
CASES = {  # name: (p rows, q rows); both Markov on a vocabulary of 4
    "q equals p": ([P_FIRST, [0.1, 0.1, 0.4, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25] * 4], None),
    "q differs": ([P_FIRST, [0.1, 0.1, 0.4, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25] * 4],
                  [[0.6, 0.3, 0.05, 0.05], [0.4, 0.1, 0.1, 0.4], [0.1, 0.2, 0.3, 0.4], [0.9, 0.05, 0.03, 0.02]]),
    "q disjoint from p": ([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]],
                          [[0, 0, 0.5, 0.5], [0.5, 0.5, 0, 0], [0, 0, 0.3, 0.7], [0.6, 0.4, 0, 0]]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("top_k, beam, max_nodes", [(1, 1, 2), (2, 1, 3), (3, 1, 4), (2, 2, 7), (2, 2, 5), (3, 2, 6)])
def test_first_two_tokens_are_exact(case, top_k, beam, max_nodes, monkeypatch):
    p_rows, q_rows = CASES[case]
    target = markov(p_rows)
    draft = markov(q_rows) if q_rows else target
    drafter = drafter_for(draft, top_k, beam)
    outcomes = enumerate_draws(lambda: sampled_tree(drafter, draft, max_nodes), monkeypatch)
    assert max(tree.size for _, tree in outcomes) == max_nodes  # the tree was as large as allowed
    assert tv(exact_output(outcomes, target, 2), true_dist(target, 2)) < EXACT


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.3, top_k=2), SamplingParams(temperature=0.7, top_p=0.6)])
def test_truncated_p_and_q_with_fewer_tokens_than_draws(params, monkeypatch):
    """top-k / top-p leave q fewer tokens than top_k draws: the later draws come from q again
    (duplicates), and the result stays exact."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.5, 1.4], [2.0, 1.9, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    draft_logits = logits.flip(-1)
    target = markov(torch.stack([target_probs(row, params) for row in logits]).tolist())
    draft = markov(torch.stack([target_probs(row, params) for row in draft_logits]).tolist())
    drafter = drafter_for(draft, top_k=3, beam=1)
    outcomes = enumerate_draws(lambda: sampled_tree(drafter, draft, 7), monkeypatch)
    assert any(len(set(tree.tokens[1:4])) < 3 for _, tree in outcomes)  # a repeated draw happened
    assert tv(exact_output(outcomes, target, 2), true_dist(target, 2)) < EXACT


def test_pruning_by_chance_after_drafting_stays_exact(monkeypatch):
    """choose_trees cuts the sampled tree by its shape only (mid sibling group here)."""
    target, draft = markov(CASES["q differs"][0]), markov(CASES["q differs"][1])
    stats = AcceptanceStats()
    stats.accepted[1][1] = 0.2  # rank 1 at depth 1 rarely accepted: cut before depth 2's second draws
    curve = LatencyCurve((1, 4, 8), (1.0, 1.2, 3.0))
    drafter = drafter_for(draft, top_k=2, beam=2)
    outcomes = enumerate_draws(lambda: choose_trees([sampled_tree(drafter, draft, 7)], stats, curve)[0], monkeypatch)
    assert {tree.size for _, tree in outcomes} == {4}
    assert tv(exact_output(outcomes, target, 2), true_dist(target, 2)) < EXACT


def test_merged_with_a_deterministic_tree_is_exact(monkeypatch):
    """model+ngram: the merge keeps no draft probabilities, so the target-only form verifies it."""
    target, draft = markov(CASES["q differs"][0]), markov(CASES["q differs"][1])
    drafter = drafter_for(draft, top_k=2, beam=2)
    ngram = DraftTree([ROOT, 1, 2, 3], [-1, 0, 1, 0])  # root ─ 1 ─ 2, root ─ 3

    def merged() -> DraftTree:
        return merge_trees([sampled_tree(drafter, draft, 5), ngram], max_nodes=7)

    outcomes = enumerate_draws(merged, monkeypatch)
    assert all(tree.draft_q is None for _, tree in outcomes)
    assert tv(exact_output(outcomes, target, 2), true_dist(target, 2)) < EXACT


def iid_tree(draft: torch.Tensor, tokens: tuple[int, ...]) -> DraftTree:
    return DraftTree([ROOT, *tokens], [-1] + [0] * len(tokens), torch.stack([draft[ROOT]] * (len(tokens) + 1)))


def test_iid_draws_with_repeats_are_exact_and_skipping_repeats_is_not():
    """Three i.i.d. draws from q: every child tried is exact; dropping repeated tokens is not."""
    target, draft = markov(CASES["q differs"][0]), markov(CASES["q differs"][1])
    q = draft[ROOT].tolist()
    exact, deduped = defaultdict(float), defaultdict(float)
    for draws in torch.cartesian_prod(*[torch.arange(4)] * 3).tolist():
        weight = q[draws[0]] * q[draws[1]] * q[draws[2]]
        distinct = tuple(dict.fromkeys(draws))
        for out, tokens in ((exact, tuple(draws)), (deduped, distinct)):
            for key, prob in verified_exact(iid_tree(draft, tokens), target, 1).items():
                out[key] += weight * prob
    assert tv(exact, true_dist(target, 1)) < EXACT
    assert tv(deduped, true_dist(target, 1)) > 1e-3


def test_draws_record_the_distribution_each_came_from():
    """q_i = q without the earlier draws; once q has no tokens left, q itself."""
    q = torch.tensor([0.5, 0.5, 0.0])
    drafter = drafter_for(q.expand(3, 3), top_k=3)
    seq = Sequence([ROOT], SamplingParams(temperature=1.0, seed=3))
    kids = drafter._children(seq, q, -1, 1.0, 0)
    first, second = kids[0].token, kids[1].token
    assert {first, second} == {0, 1}
    assert torch.equal(kids[0].q, q) and kids[1].q[second] == 1.0 and torch.equal(kids[2].q, q)
