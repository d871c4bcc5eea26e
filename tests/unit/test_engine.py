"""LLMEngine end to end on a tiny random Llama: greedy parity with transformers under continuous
batching and preemption, finish reasons, stop strings, abort, seeded sampling."""

import pytest
import torch

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import FinishReason, SamplingParams
from specserve.workers.engine.step_planner import PlannerConfig

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

NEW_TOKENS = 12
PROMPT_LENS = (5, 13, 22)  # different lengths, run concurrently


def make_prompts(lens, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=gen).tolist() for n in lens]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def hf():
    return tiny_hf("llama", initializer_range=0.3)  # larger weights than default: varied tokens


@pytest.fixture(scope="module")
def model(hf):
    return ours_from_hf(hf)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(PROMPT_LENS)


@pytest.fixture(scope="module")
def expected(hf, prompts):
    return [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


def engine(model, tok, eos_token_ids=(), **kw) -> LLMEngine:
    # 256 KiB of KV = 128 blocks of 4 slots: room for every test, and cheap to allocate
    # (the 1 GiB default would take seconds to zero).
    config = EngineConfig(**{"block_size": 4, "kv_cache_bytes": 1 << 18, **kw})
    return LLMEngine(model, tok, config, eos_token_ids=eos_token_ids)


def run_all(eng: LLMEngine, prompts, params) -> tuple[list, dict]:
    """Adds every request at once and steps until all finish; returns the sequences and texts."""
    seqs = [eng.add_request(p, params) for p in prompts]
    texts = {s.request_id: "" for s in seqs}
    for _ in range(500):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            texts[out.request_id] += out.new_text
    assert not eng.has_unfinished()
    return seqs, texts


def test_concurrent_greedy_equals_transformers_generate(model, tok, prompts, expected):
    assert len({t for e in expected for t in e}) > 5  # the reference is not one repeated token
    eng = engine(model, tok, planner=PlannerConfig(max_num_batched_tokens=16))  # prompts chunked too
    seqs, texts = run_all(eng, prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [s.output_ids for s in seqs] == expected
    for s in seqs:
        context = s.prompt_ids[-6:]
        full = tok.decode(context + s.output_ids)[len(tok.decode(context)) :]
        assert texts[s.request_id] == full
    assert eng.kv.allocator.num_free == eng.kv.config.num_blocks  # every block back


def test_max_new_tokens_finishes_with_length(model, tok, prompts, expected):
    eng = engine(model, tok)
    outs = list(eng.generate(prompts[0], SamplingParams(max_new_tokens=5)))
    assert [o.new_token_ids for o in outs] == [[t] for t in expected[0][:5]]
    assert [o.finished for o in outs] == [False] * 4 + [True]
    assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].seq.finish_reason is FinishReason.LENGTH


def test_full_context_finishes_with_length(hf, model, tok):
    eng = engine(model, tok)
    prompt = make_prompts([eng.max_model_len - 2], seed=5)[0]
    seq = eng.add_request(prompt, SamplingParams(max_new_tokens=10))
    while eng.has_unfinished():
        eng.step()
    assert len(seq.output_ids) == 2 and seq.num_tokens == eng.max_model_len
    assert seq.finish_reason is FinishReason.LENGTH


def first_new_token_index(tokens: list[int], start: int = 2) -> int:
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_eos_token_finishes_with_stop(model, tok, prompts, expected):
    i = first_new_token_index(expected[1])  # a token the greedy run produces first at step i
    eos = expected[1][i]
    eng = engine(model, tok, eos_token_ids=[eos])
    seq = eng.add_request(prompts[1], SamplingParams(max_new_tokens=NEW_TOKENS))
    while eng.has_unfinished():
        eng.step()
    assert seq.output_ids == expected[1][: i + 1]  # the eos token is kept as the last output
    assert seq.finish_reason is FinishReason.STOP


def test_ignore_eos_runs_to_max_new_tokens(model, tok, prompts, expected):
    eos = expected[1][first_new_token_index(expected[1])]
    eng = engine(model, tok, eos_token_ids=[eos])
    seq = eng.add_request(prompts[1], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert seq.output_ids == expected[1] and seq.finish_reason is FinishReason.LENGTH


def test_stop_string_ends_the_text_before_it(model, tok, prompts, expected):
    prompt, greedy = prompts[2], expected[2]
    context = prompt[-6:]

    def text_of(n: int) -> str:  # the output text after n tokens
        return tok.decode(context + greedy[:n])[len(tok.decode(context)) :]

    stop = f"w{greedy[3]} w{greedy[4]}"
    full = text_of(len(greedy))
    cut = full.find(stop)
    assert cut > 0
    needed = next(n for n in range(1, len(greedy) + 1) if stop in text_of(n))  # token completing it

    eng = engine(model, tok)
    outs = list(eng.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, stop=(stop,))))
    assert "".join(o.new_text for o in outs) == full[:cut]
    assert outs[-1].seq.output_ids == greedy[:needed]
    assert outs[-1].finish_reason is FinishReason.STOP


def test_abort_frees_blocks(model, tok, prompts):
    eng = engine(model, tok)
    total = eng.kv.config.num_blocks
    running = eng.add_request(prompts[2], SamplingParams(max_new_tokens=50))
    other = eng.add_request(prompts[1], SamplingParams(max_new_tokens=50))
    eng.step()
    eng.step()
    assert eng.kv.allocator.num_free < total
    eng.abort(running.request_id)
    assert running.finish_reason is FinishReason.ABORT and running.table.blocks == []
    waiting = eng.add_request(prompts[0], SamplingParams(max_new_tokens=50))  # never scheduled
    eng.abort(waiting.request_id)
    eng.abort(other.request_id)
    eng.abort("no-such-request")  # ignored
    assert not eng.has_unfinished() and eng.step() == []
    assert eng.kv.allocator.num_free == total
    assert {s.finish_reason for s in (running, waiting, other)} == {FinishReason.ABORT}


def test_preemption_under_a_tiny_pool_keeps_greedy_outputs(tok):
    # Context 64 -> the pool keeps its minimum, one context: 16 blocks of 4 = 64 slots.
    # The three requests grow to 32 + 37 + 27 = 96 tokens, so some are preempted and recomputed.
    hf = tiny_hf("llama", initializer_range=0.3, max_position_embeddings=64)
    prompts = make_prompts((20, 25, 15), seed=1)
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    eng = engine(ours_from_hf(hf), tok, kv_cache_bytes=1)
    assert eng.kv.config.num_blocks == 16
    preempted = []
    preempt = eng.planner._preempt_newest

    def counting_preempt(keep):
        victim = eng.planner.running[-1]
        done = preempt(keep)
        if done:
            preempted.append(victim.request_id)
        return done

    eng.planner._preempt_newest = counting_preempt
    seqs, _ = run_all(eng, prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert preempted  # the pool really was too small
    assert [s.output_ids for s in seqs] == expected
    assert eng.kv.allocator.num_free == 16


def test_prompt_longer_than_the_context_raises_naming_both_numbers(model, tok):
    eng = engine(model, tok)
    assert eng.max_model_len == 256
    with pytest.raises(ValueError, match=r"prompt has 300 tokens; the model's context is 256"):
        eng.add_request([5] * 300, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())


def test_duplicate_request_id_raises(model, tok):
    eng = engine(model, tok)
    eng.add_request([5, 6], SamplingParams(), request_id="x")
    with pytest.raises(ValueError, match="'x' is already running"):
        eng.add_request([5, 6], SamplingParams(), request_id="x")


def test_seeded_sampling_through_the_engine_is_reproducible(model, tok, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=1234)

    alone = engine(model, tok)
    seq_alone = alone.add_request(prompts[1], params)
    while alone.has_unfinished():
        alone.step()

    batched = engine(model, tok)  # the same request among others must draw the same tokens
    batched.add_request(prompts[0], SamplingParams(max_new_tokens=10))
    seq_batched = batched.add_request(prompts[1], params)
    other_seed = batched.add_request(prompts[1], SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=99))
    while batched.has_unfinished():
        batched.step()

    assert seq_alone.output_ids == seq_batched.output_ids
    assert len(seq_alone.output_ids) == 10
    assert other_seed.output_ids != seq_alone.output_ids


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="kv_cache_bytes must be >= 1, got 0"):
        EngineConfig(kv_cache_bytes=0)
