"""Worker-local prefix caching: freed prompt blocks stay findable by content until evicted."""

import pytest

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.kv_cache import BlockAllocator
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

SYSTEM = [5, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67]  # 4 full blocks of 4


def test_allocator_keeps_registered_blocks_until_it_needs_them():
    pool = BlockAllocator(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"key-a")
    pool.release(a)
    pool.release(b)
    assert pool.num_free == 3 and pool.num_cached == 1
    assert pool.take_cached(b"key-a") == a and pool.ref_counts[a] == 1
    pool.release(a)
    assert [pool.allocate() for _ in range(3)][-1] == a  # evicted last, when nothing else is free
    assert pool.take_cached(b"key-a") is None  # eviction forgot the key


def test_registering_needs_a_referenced_block_and_keeps_the_first_block_for_a_key():
    pool = BlockAllocator(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"k")
    pool.register(b, b"k")
    assert pool.take_cached(b"k") == a
    pool.release(b)
    with pytest.raises(ValueError, match="free"):
        pool.register(b, b"other")


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def engine(model, spec="none", kv_bytes=1 << 20, prefix_caching=True):
    config = EngineConfig(block_size=4, kv_cache_bytes=kv_bytes, spec=SpecConfig(spec, 4 if spec != "none" else 0),
                          prefix_caching=prefix_caching)
    return LLMEngine(model, tiny_tokenizer(), config, eos_token_ids=())


def run(eng, prompt, salt="", n=16):
    seq = eng.add_request(prompt, SamplingParams(max_new_tokens=n), cache_salt=salt)
    while eng.has_unfinished():
        eng.step()
    return seq


@pytest.mark.parametrize("spec", ["none", "ngram"])
def test_a_shared_prefix_is_reused_and_the_output_is_unchanged(model, spec):
    cold = run(engine(model, spec, prefix_caching=False), SYSTEM + [3, 4, 5])
    eng = engine(model, spec)
    first = run(eng, SYSTEM + [3, 4, 5])
    second = run(eng, SYSTEM + [3, 4, 5])
    other = run(eng, SYSTEM + [8, 8])
    assert first.cached_tokens == 0 and first.output_ids == cold.output_ids
    assert second.cached_tokens == 20 and second.output_ids == cold.output_ids  # 5 full blocks of 21 tokens
    assert other.cached_tokens == 16  # the 4 blocks of SYSTEM
    assert eng.kv.allocator.num_free == eng.kv.config.num_blocks


def test_a_whole_prompt_hit_still_computes_its_last_token(model):
    eng = engine(model)
    prompt = SYSTEM[:16]  # exactly 4 blocks
    cold = run(eng, prompt)
    warm = run(eng, prompt)
    assert warm.cached_tokens == 12 and warm.output_ids == cold.output_ids


def test_different_salts_never_share(model):
    eng = engine(model)
    run(eng, SYSTEM + [3], salt="tenant-a")
    assert run(eng, SYSTEM + [3], salt="tenant-b").cached_tokens == 0
    assert run(eng, SYSTEM + [3], salt="tenant-a").cached_tokens == 16


def test_eviction_under_a_small_pool_keeps_outputs_right(model):
    small = engine(model, kv_bytes=1)  # the minimum: one full context
    reference = engine(model, prefix_caching=False)
    for i in range(12):
        prompt = [i + 2] * 9 + SYSTEM
        assert run(small, prompt, n=30).output_ids == run(reference, prompt, n=30).output_ids
    assert small.kv.allocator.num_free == small.kv.config.num_blocks
