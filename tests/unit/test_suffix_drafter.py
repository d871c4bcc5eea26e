"""The suffix drafter and the per-request drafter mix: on hand-made state, then inside the engine
on a tiny model (greedy output identical to no speculation, drafts across requests)."""

import pytest

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import SamplingParams, Sequence
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.drafter_mix import DrafterMix
from specserve.workers.spec.methods import SpecConfig, build_drafter, parse_method
from specserve.workers.spec.suffix import SuffixDrafter
from specserve.workers.spec.suffix_tree import SuffixConfig
from specserve.workers.spec.verify import Acceptance

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

SMALL = SuffixConfig(max_depth=8, max_match=3, max_spec=4, spec_factor=2.0)


def seq(prompt, output=(), salt="", request_id="r") -> Sequence:
    s = Sequence(list(prompt), SamplingParams(), request_id=request_id, cache_salt=salt)
    s.output_ids.extend(output)
    return s


def test_request_tree_follows_the_committed_tokens():
    # prompt 1 2 3 4 | 1 2: "1 2" continues with "3 4 1 2" (depth 2 * match length 2).
    drafter = SuffixDrafter(SMALL)
    s = seq([1, 2, 3, 4, 1, 2])
    assert drafter.propose(s, 10).tokens == [2, 3, 4, 1, 2]
    # output 3 9 | 1 2: "1 2 3" twice, then 9 and 4 once each; 9 is more recent, so first:
    #   2 ─ 3 ─ 9 ─ 1 ─ 2
    #         └ 4 ─ 1 ─ 2
    s.output_ids.extend([3, 9, 1, 2])
    tree = drafter.propose(s, 10)
    assert tree.tokens == [2, 3, 9, 1, 2, 4, 1, 2] and tree.parents == [-1, 0, 1, 2, 3, 1, 5, 6]
    fresh = SuffixDrafter(SMALL).propose(seq(s.token_ids), 10)  # incremental == built at once
    assert (fresh.tokens, fresh.parents) == (tree.tokens, tree.parents)


def test_released_requests_feed_the_shared_tree_of_their_salt_only():
    drafter = SuffixDrafter(SMALL)
    done = seq([7, 8, 9], output=[40, 41, 42, 43], salt="a", request_id="done")
    drafter.propose(done, 10)
    drafter.release(done)
    assert drafter.shared.tree("a").count([7, 8, 9, 40]) == 1  # the prompt's tail leads into the output
    same_tenant = seq([5, 8, 9], salt="a", request_id="next")
    assert drafter.propose(same_tenant, 10).tokens == [9, 40, 41, 42, 43]
    other_tenant = seq([5, 8, 9], salt="b", request_id="other")
    assert drafter.propose(other_tenant, 10).tokens == [9]


class ChainDrafter(Drafter):
    """Always drafts the chain first, first + 1, ... as long as max_nodes allows."""

    def __init__(self, name: str, first: int):
        self.name, self.first = name, first

    def propose(self, s: Sequence, max_nodes: int) -> DraftTree:
        n = max_nodes - 1
        return DraftTree([s.token_ids[-1]] + list(range(self.first, self.first + n)), list(range(-1, n)))


def test_mix_moves_budget_to_the_drafter_that_is_accepted():
    mix = DrafterMix([ChainDrafter("a", 10), ChainDrafter("b", 20)], floor=0.1, prior_weight=8, prior_rate=0.25)
    s = seq([1])
    assert mix.budgets(s, 20) == [10, 10]  # equal priors: 0.1 + 0.8 / 2 each
    tree = mix.propose(s, 21)
    #   1 ─ 10 ─ 11 ─ ... ─ 19      a's 10 nodes first (ties keep the drafters' order)
    #     └ 20 ─ 21 ─ ... ─ 29      b's 10
    assert tree.tokens == [1, *range(10, 20), *range(20, 30)]
    mix.observe(s, tree, None, Acceptance([0, 1, 2, 3], [10, 11, 12, 13]))
    # a: (8 * 0.25 + 3) / (8 + 10) = 5/18, b: 2/18 -> shares 0.1 + 0.8 * 5/7, 0.1 + 0.8 * 2/7
    assert mix.budgets(s, 20) == [13, 6]
    assert mix.budgets(seq([1], request_id="new"), 20) == [13, 6]  # a new request starts from engine-wide rates
    assert mix.propose(s, 21).tokens == [1, *range(10, 23), *range(20, 26)]


def test_mix_credits_the_verified_tree_after_pruning_and_keeps_a_floor():
    mix = DrafterMix([ChainDrafter("a", 10), ChainDrafter("b", 20)], floor=0.2, prior_weight=8, prior_rate=0.25)
    s = seq([1])
    tree = mix.propose(s, 21)
    pruned = tree.select([0, 1, 2, 11])  # 1 ─ 10 ─ 11, 1 ─ 20
    mix.observe(s, pruned, None, Acceptance([0, 1, 2], [10, 11, 5]))
    # a: (2 + 2) / (8 + 2) = 0.4, b: 2 / 9 -> shares 0.2 + 0.6 * 0.4 / (0.4 + 2/9) = 0.586, 0.414
    assert mix.budgets(s, 20) == [11, 8]
    for _ in range(50):  # b is never accepted again, a always
        tree = mix.propose(s, 21)
        mix.observe(s, tree, None, Acceptance([0, 1, 2, 3, 4], [10, 11, 12, 13, 7]))
    assert mix.budgets(s, 20)[1] == 4  # the floor: 0.2 * 20


def test_auto_and_suffix_methods_are_registered():
    assert build_drafter(SpecConfig("suffix"), vocab_size=20).name == "suffix"
    assert build_drafter(SpecConfig("suffix+ngram"), vocab_size=20).name == "suffix+ngram"
    auto = build_drafter(SpecConfig("auto"), vocab_size=20)
    assert auto.name == "auto" and [d.name for d in auto.drafters] == ["suffix", "ngram", "recycling"]
    with pytest.raises(ValueError, match="'auto' cannot be combined"):
        parse_method("auto+ngram")


PROMPTS = [[5, 7, 9, 11, 3, 5, 7, 9, 11, 3, 5, 7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [40, 41, 42], [8] * 9]


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def engine_for(model, spec: SpecConfig) -> LLMEngine:
    return LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=spec))


def run(engine, prompts, salt="", params=SamplingParams(max_new_tokens=24)) -> list[Sequence]:
    seqs = [engine.add_request(p, params, cache_salt=salt) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.allocator.num_free == engine.kv.config.num_blocks  # every block given back
    return seqs


@pytest.mark.parametrize("method", ["suffix", "suffix+ngram", "suffix+recycling", "auto"])
@pytest.mark.parametrize("max_draft", [0, 8])
def test_greedy_output_is_unchanged(model, method, max_draft):
    reference = [s.output_ids for s in run(engine_for(model, SpecConfig("none")), PROMPTS)]
    engine = engine_for(model, SpecConfig(method, max_draft))
    first = run(engine, PROMPTS)
    again = run(engine, PROMPTS)  # with the shared trees and rates of the first round
    assert [s.output_ids for s in first] == [s.output_ids for s in again] == reference


@pytest.mark.parametrize("method", ["suffix", "auto"])
def test_a_repeated_request_is_drafted_from_the_first_ones_output(model, method):
    prompt = [[3, 14, 15, 92, 65, 35]]
    cold = run(engine_for(model, SpecConfig(method, 8)), prompt)[0]
    engine = engine_for(model, SpecConfig(method, 8))
    run(engine, prompt, salt="tenant")
    other_salt = run(engine, prompt, salt="other")[0]
    warm = run(engine, prompt, salt="tenant")[0]
    assert warm.output_ids == cold.output_ids == other_salt.output_ids
    assert warm.spec.accepted_tokens > cold.spec.accepted_tokens and warm.spec.decode_steps < cold.spec.decode_steps
    if method == "suffix":  # drafts never cross salts: the other tenant drafted as if cold
        assert other_salt.spec.accepted_tokens == cold.spec.accepted_tokens


def test_seeded_sampling_with_suffix_drafts_is_reproducible(model):
    params = SamplingParams(max_new_tokens=24, temperature=0.9, seed=11)
    a = [s.output_ids for s in run(engine_for(model, SpecConfig("auto", 8)), PROMPTS, params=params)]
    b = [s.output_ids for s in run(engine_for(model, SpecConfig("auto", 8)), PROMPTS, params=params)]
    assert a == b
