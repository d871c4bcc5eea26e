"""Step planner: admission order, chunked prefill, decode-first ordering, preemption."""

import pytest

from specserve.workers.engine.kv_cache import KVCacheConfig, PagedKVCache
from specserve.workers.engine.sequence import SamplingParams, Sequence, SequenceStatus
from specserve.workers.engine.step_planner import PlannerConfig, StepPlan, StepPlanner


def make_planner(num_blocks=64, block_size=4, **planner_kw) -> StepPlanner:
    kv = PagedKVCache(KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=num_blocks,
                                    block_size=block_size))
    return StepPlanner(PlannerConfig(**planner_kw), kv)


def seq(prompt_len: int, name: str) -> Sequence:
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(), request_id=name)


def run(planner: StepPlanner, plan: StepPlan, next_token: int = 5) -> None:
    """What the engine does with a plan: reserve the slots, and give a token to each completed one."""
    assert plan.stuck == []
    for p in plan.scheduled:
        completes = p.completes  # read before the append moves num_computed
        planner.kv.append(p.seq.table, p.num_new)
        if completes:
            p.seq.output_ids.append(next_token)


def summary(plan: StepPlan) -> list[tuple[str, int, bool]]:
    assert plan.stuck == []
    return [(p.seq.request_id, p.num_new, p.completes) for p in plan.scheduled]


def test_waiting_sequences_are_admitted_in_order_up_to_max_num_seqs():
    planner = make_planner(max_num_seqs=2)
    a, b, c = seq(3, "a"), seq(5, "b"), seq(2, "c")
    for s in (a, b, c):
        planner.add(s)
    plan = planner.plan()
    assert summary(plan) == [("a", 3, True), ("b", 5, True)]
    assert planner.running == [a, b] and list(planner.waiting) == [c]
    assert a.status is b.status is SequenceStatus.RUNNING and c.status is SequenceStatus.WAITING


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    planner = make_planner(max_num_batched_tokens=4)
    s = seq(10, "long")
    planner.add(s)
    chunks = []
    for _ in range(4):
        plan = planner.plan()
        chunks.append(summary(plan))
        run(planner, plan)
    # prompt 10 tokens, budget 4: chunks 4 + 4 + 2; the last one completes and yields a token,
    # then one decode slot for that token.
    assert chunks == [[("long", 4, False)], [("long", 4, False)], [("long", 2, True)], [("long", 1, True)]]
    assert s.num_computed == 11 and s.output_ids == [5, 5]


def test_running_decodes_come_first_and_a_new_prompt_gets_the_leftover_budget():
    planner = make_planner(max_num_batched_tokens=6)
    a, b = seq(3, "a"), seq(4, "b")
    planner.add(a)
    planner.add(b)
    first = planner.plan()
    assert summary(first) == [("a", 3, True), ("b", 3, False)]  # b's prompt is chunked: 6 - 3 = 3
    run(planner, first)
    c = seq(9, "c")
    planner.add(c)
    second = planner.plan()
    # running first, in order: a decodes 1, b finishes its prompt (1), then c gets 6 - 2 = 4
    assert summary(second) == [("a", 1, True), ("b", 1, True), ("c", 4, False)]


def test_budget_exhausted_by_running_sequences_admits_nobody():
    planner = make_planner(max_num_batched_tokens=2)
    a, b = seq(1, "a"), seq(1, "b")
    planner.add(a)
    planner.add(b)
    run(planner, planner.plan())
    late = seq(3, "late")
    planner.add(late)
    assert summary(planner.plan()) == [("a", 1, True), ("b", 1, True)]
    assert list(planner.waiting) == [late]


def test_waiting_sequence_waits_when_the_pool_is_short():
    planner = make_planner(num_blocks=3, block_size=4)
    a, b = seq(8, "a"), seq(8, "b")  # 2 blocks each
    planner.add(a)
    planner.add(b)
    assert summary(planner.plan()) == [("a", 8, True)]  # b needs 2 blocks, 1 is left
    assert list(planner.waiting) == [b]


def test_preemption_frees_the_newest_running_sequence_and_puts_it_first_in_line():
    # 4 blocks of 4 slots. a and b take 2 blocks each; c waits (max_num_seqs 2).
    planner = make_planner(num_blocks=4, block_size=4, max_num_seqs=2)
    a, b, c = seq(8, "a"), seq(8, "b"), seq(2, "c")
    for s in (a, b, c):
        planner.add(s)
    first = planner.plan()
    assert summary(first) == [("a", 8, True), ("b", 8, True)]
    run(planner, first)
    assert planner.kv.allocator.num_free == 0
    # Both now hold 9 tokens with 8 computed: a's 9th slot needs a new block, so b is preempted.
    b_blocks = list(b.table.blocks)
    second = planner.plan()
    assert summary(second) == [("a", 1, True)]
    assert planner.running == [a]
    assert list(planner.waiting) == [b, c]  # the victim goes to the front
    assert b.status is SequenceStatus.WAITING
    assert b.table.blocks == [] and b.num_computed == 0  # recomputed from scratch later
    assert b.output_ids == [5]  # its generated token is kept and will be recomputed
    assert planner.kv.allocator.num_free == len(b_blocks) == 2  # plan() reserves nothing itself
    run(planner, second)
    # a holds 3 blocks, one left: b (9 tokens, 3 blocks) does not fit yet, and c must queue behind it.
    third = planner.plan()
    assert summary(third) == [("a", 1, True)]
    assert list(planner.waiting) == [b, c]


def test_newest_running_sequence_that_cannot_grow_is_skipped_not_self_preempted():
    planner = make_planner(num_blocks=4, block_size=4)
    a, b = seq(7, "a"), seq(8, "b")  # a's 8th slot fits its second block; b needs a third block
    planner.add(a)
    planner.add(b)
    run(planner, planner.plan())
    plan = planner.plan()
    assert summary(plan) == [("a", 1, True)]
    assert planner.running == [a, b] and b.num_computed == 8


def test_remove_frees_blocks_and_dequeues():
    planner = make_planner(num_blocks=8)
    a, b = seq(5, "a"), seq(5, "b")
    planner.add(a)
    planner.add(b)
    run(planner, planner.plan(), next_token=7)
    planner.remove(a)
    waiting = seq(3, "w")
    planner.add(waiting)
    planner.remove(waiting)
    assert planner.running == [b] and list(planner.waiting) == []
    assert planner.kv.allocator.num_free == 8 - 2


def test_decode_slots_ask_for_a_draft_tree_and_fall_back_to_one():
    planner = make_planner(max_num_batched_tokens=8)
    a = seq(3, "a")
    planner.add(a)
    run(planner, planner.plan())
    assert summary(planner.plan({a: 5})) == [("a", 5, True)]
    assert summary(planner.plan({a: 9})) == [("a", 1, True)]  # over the budget: a plain decode


def test_draft_tree_that_does_not_fit_the_pool_falls_back_to_a_plain_decode_slot():
    # 2 blocks of 4. a holds 4 computed tokens (block 0) and 1 new token; 1 block is free.
    #   tree of 4 slots -> tokens 4..7  -> block 1          fits: the whole tree
    #   tree of 9 slots -> tokens 4..12 -> 3 more blocks    does not fit: one plain decode slot,
    # not nothing (with a single sequence, an empty plan means the engine never moves again).
    planner = make_planner(num_blocks=2, block_size=4)
    a = seq(4, "a")
    planner.add(a)
    run(planner, planner.plan())
    assert summary(planner.plan({a: 4})) == [("a", 4, True)]
    assert summary(planner.plan({a: 9})) == [("a", 1, True)]


@pytest.mark.parametrize("field", ["max_num_seqs", "max_num_batched_tokens"])
def test_planner_config_rejects_non_positive_values(field):
    with pytest.raises(ValueError, match=rf"{field} must be >= 1, got 0"):
        PlannerConfig(**{field: 0})


def test_a_running_sequence_with_nothing_to_compute_is_stuck_and_the_rest_still_run():
    # a's last token already has K/V but no next token was appended (a step failed half way):
    # before, plan() stopped at a and returned nothing, forever.
    planner = make_planner()
    a, b = seq(3, "a"), seq(4, "b")
    planner.add(a)
    planner.add(b)
    run(planner, planner.plan())
    planner.kv.append(a.table, 1)  # a: 4 tokens, 4 computed
    plan = planner.plan()
    assert [(s.seq.request_id, s.reason) for s in plan.stuck] == [("a", "no token left to compute (4 of 4 computed)")]
    assert [(p.seq.request_id, p.num_new) for p in plan.scheduled] == [("b", 1)]
    assert planner.running == [b] and a.table.blocks == []


def test_a_sequence_alone_in_a_pool_too_short_for_it_is_stuck():
    # 3 blocks of 4; one leaked (held by nobody): a's 9th token needs a third block that never comes.
    planner = make_planner(num_blocks=3, block_size=4)
    a = seq(8, "a")
    planner.add(a)
    run(planner, planner.plan())
    planner.kv.allocator.allocate()
    plan = planner.plan()
    assert plan.scheduled == []
    assert [(s.seq.request_id, s.reason) for s in plan.stuck] == [("a", "1 new tokens need 1 KV blocks, 0 of 3 are free")]
    assert planner.running == [] and planner.kv.allocator.num_free == 2  # a's blocks back, the leaked one not


def test_a_waiting_prompt_that_cannot_fit_an_empty_pool_is_stuck_and_the_next_is_admitted():
    planner = make_planner(num_blocks=2, block_size=4)
    big, small = seq(12, "big"), seq(3, "small")
    planner.add(big)
    planner.add(small)
    plan = planner.plan()
    assert [(s.seq.request_id, s.reason) for s in plan.stuck] == [("big", "12 new tokens need 3 KV blocks, 2 of 2 are free")]
    assert [(p.seq.request_id, p.num_new) for p in plan.scheduled] == [("small", 3)]
    assert list(planner.waiting) == []
