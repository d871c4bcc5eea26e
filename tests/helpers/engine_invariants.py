"""What must hold of an LLMEngine between steps, asserted after every step in tests.

- every unfinished request is in the planner's queues, and only those are;
- every running sequence has work: a token without K/V (so the next plan can schedule it);
- waiting sequences hold no blocks, and the pool's referenced blocks are exactly the running
  sequences' (no leak, no block counted twice);
- a step taken with requests in the engine makes progress: it writes K/V slots or ends a request.
"""

from collections import Counter

from specserve.workers.engine.llm_engine import LLMEngine, RequestOutput
from specserve.workers.engine.sequence import SequenceStatus


def check_engine(engine: LLMEngine) -> None:
    running, waiting = list(engine.planner.running), list(engine.planner.waiting)
    queued = [s.request_id for s in running + waiting]
    assert sorted(engine.request_ids()) == sorted(queued), f"engine {engine.request_ids()} vs queues {queued}"
    for s in running:
        assert s.status is SequenceStatus.RUNNING, f"{s.request_id} runs with status {s.status}"
        assert s.num_computed < s.num_tokens, (f"{s.request_id} runs with nothing to compute "
                                               f"({s.num_computed} of {s.num_tokens})")
    for s in waiting:
        assert s.status is SequenceStatus.WAITING and s.table.blocks == [], f"{s.request_id} waits holding blocks"
    held = Counter(b for s in running for b in s.table.blocks)
    refs = engine.kv.allocator.ref_counts
    assert all(refs[b] == n for b, n in held.items()), "a block's references differ from the tables holding it"
    assert sum(refs) == sum(held.values()), f"{sum(refs) - sum(held.values())} block references held by nobody"


def checked_step(engine: LLMEngine, step=None) -> list[RequestOutput]:
    """engine.step() (or `step`, the engine's own step saved before it was replaced), then the
    invariants and progress."""
    before_ids, before_slots = set(engine.request_ids()), engine.slots_computed
    outputs = (step or engine.step)()
    ended = {out.request_id for out in outputs if out.finished}
    assert not before_ids or engine.slots_computed > before_slots or ended, \
        f"a step with {len(before_ids)} requests made no progress"
    check_engine(engine)
    return outputs


def check_every_step(engine: LLMEngine) -> list[str]:
    """Makes engine.step check itself (for an engine driven by an EngineLoop thread, where an
    assertion would only fail the step's requests). Returns the list that collects violations."""
    violations: list[str] = []
    real_step = engine.step

    def step() -> list[RequestOutput]:
        try:
            return checked_step(engine, real_step)
        except AssertionError as e:
            violations.append(str(e))
            raise

    engine.step = step
    return violations
