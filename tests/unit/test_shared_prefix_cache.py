"""The shared (L2) prefix cache on a fake store: block encoding, lookup runs, integrity, outages,
and engines on two "nodes" reusing each other's blocks. tests/integration/test_redis_prefix_cache.py
runs the same paths against a real redis-server."""

import time

import pytest
import torch

from specserve.cluster.prefix_cache.block_codec import BlockKV, CorruptBlockError, decode_block, encode_block
from specserve.cluster.prefix_cache.block_store import MemoryBlockStore
from specserve.cluster.prefix_cache.cache import SharedPrefixCache
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.engine_loop import EngineLoop
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

FP = "ab" * 32  # a model fingerprint
SHAPE = (2, 4, 2, 16)  # layers, block_size, kv heads, head dim of the tiny model
SYSTEM = [5, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67]  # 4 full blocks of 4 + 2


def block(seed: int, dtype=torch.float32) -> BlockKV:
    g = torch.Generator().manual_seed(seed)
    return BlockKV(torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_block_round_trips_bit_exactly(dtype):
    b = block(0, dtype)
    back = decode_block(encode_block(b, FP), FP, SHAPE, dtype)
    assert torch.equal(back.k, b.k) and torch.equal(back.v, b.v)


@pytest.mark.parametrize("field, reader", [
    ("fingerprint", dict(fingerprint="cd" * 32)),
    ("dtype", dict(dtype=torch.float16)),
    ("shape", dict(shape=(2, 8, 2, 16))),
])
def test_a_block_for_another_reader_is_rejected(field, reader):
    args = dict(fingerprint=FP, shape=SHAPE, dtype=torch.float32) | reader
    with pytest.raises(CorruptBlockError, match=field):
        decode_block(encode_block(block(0), FP), args["fingerprint"], args["shape"], args["dtype"])


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: d[:-4], "payload has"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:8] + b"}" + d[9:], "header"),
])
def test_a_damaged_block_is_rejected(damage, message):
    with pytest.raises(CorruptBlockError, match=message):
        decode_block(damage(encode_block(block(0), FP)), FP, SHAPE, torch.float32)


def cache(store, **kw) -> SharedPrefixCache:
    return SharedPrefixCache(store, FP, SHAPE, torch.float32, **kw)


def publish(c: SharedPrefixCache, digests: list[bytes], seeds: list[int]) -> None:
    blocks = [block(s) for s in seeds]
    c.publish(digests, torch.cat([b.k for b in blocks], 1), torch.cat([b.v for b in blocks], 1))
    assert c.flush()


def test_fetch_returns_the_leading_run_of_stored_blocks():
    store = MemoryBlockStore()
    c = cache(store)
    publish(c, [b"a", b"b", b"c"], [1, 2, 3])
    got = c.fetch([b"a", b"b", b"c", b"d"])
    assert [torch.equal(g.k, block(s).k) for g, s in zip(got, [1, 2, 3])] == [True] * 3
    store.delete([c.key(b"b")])  # evicted in the middle: only the run before it counts
    assert len(c.fetch([b"a", b"b", b"c"])) == 1
    assert c.stats.hit_blocks == 4 and c.stats.queried_blocks == 7 and c.stats.written_blocks == 3


def test_a_corrupt_value_is_a_miss_and_is_deleted():
    store = MemoryBlockStore()
    c = cache(store)
    publish(c, [b"a", b"b"], [1, 2])
    store._data[c.key(b"b")] = store._data[c.key(b"b")][:-1]
    assert len(c.fetch([b"a", b"b"])) == 1
    assert c.key(b"b") not in store._data and c.stats.corrupt_blocks == 1


def test_a_down_store_gives_misses_then_is_retried():
    store = MemoryBlockStore()
    c = cache(store, retry_s=0.2)
    publish(c, [b"a"], [1])
    store.down = True
    assert c.fetch([b"a"]) == [] and c.stats.unavailable == 1
    store.down = False
    assert c.fetch([b"a"]) == []  # quiet until retry_s has passed: no call reaches the store
    assert c.stats.unavailable == 1 and c.stats.queries == 1  # the failed one only
    deadline = time.monotonic() + 5
    while not c.fetch([b"a"]) and time.monotonic() < deadline:
        time.sleep(0.02)  # polls the retry window, then the store answers again
    assert c.stats.hit_blocks == 1


def test_writes_while_down_are_dropped_and_counted():
    store = MemoryBlockStore()
    store.down = True
    c = cache(store)
    publish(c, [b"a", b"b"], [1, 2])
    assert c.stats.dropped_writes == 2 and not store._data


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def engine(model, store, spec="none", fingerprint=FP):
    shared = SharedPrefixCache(store, fingerprint, SHAPE, torch.float32)
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=SpecConfig(spec, 4 if spec != "none" else 0))
    return LLMEngine(model, tiny_tokenizer(), config, eos_token_ids=(), shared_cache=shared,
                     model_fingerprint=fingerprint)


def run(eng, prompt, salt="", n=12):
    out = list(eng.generate(prompt, SamplingParams(max_new_tokens=n), cache_salt=salt))
    eng.shared_cache.flush()
    return out[-1].seq


@pytest.mark.parametrize("spec", ["none", "ngram"])
def test_a_second_node_reuses_the_first_nodes_blocks_with_identical_output(model, spec):
    store = MemoryBlockStore()
    first = run(engine(model, store, spec), SYSTEM + [3, 4, 5])
    second_node = engine(model, store, spec)
    second = run(second_node, SYSTEM + [3, 4, 5])
    assert first.cached_tokens == 0 and second.cached_tokens == 20  # 5 of the 21 tokens' 5 full blocks
    assert second.output_ids == first.output_ids
    assert second_node.shared_cache.stats.hit_blocks == 5
    assert second_node.kv.allocator.num_free == second_node.kv.config.num_blocks  # nothing leaked


def test_tenants_and_models_never_share_blocks(model):
    store = MemoryBlockStore()
    run(engine(model, store), SYSTEM + [3], salt="tenant-a")
    assert run(engine(model, store), SYSTEM + [3], salt="tenant-b").cached_tokens == 0
    assert run(engine(model, store, fingerprint="cd" * 32), SYSTEM + [3], salt="tenant-a").cached_tokens == 0
    assert run(engine(model, store), SYSTEM + [3], salt="tenant-a").cached_tokens == 16


def test_l1_blocks_are_not_fetched_again(model):
    store = MemoryBlockStore()
    eng = engine(model, store)
    run(eng, SYSTEM + [3])
    assert eng.shared_cache.stats.queried_blocks == 4  # cold: looked up, none found
    assert run(eng, SYSTEM + [3]).cached_tokens == 16  # all 4 prompt blocks are still in this engine's pool
    assert eng.shared_cache.stats.queried_blocks == 4


def test_a_down_store_changes_nothing_but_the_cached_count(model):
    store = MemoryBlockStore()
    reference = run(engine(model, store), SYSTEM + [3])
    store.down = True
    seq = run(engine(model, store), SYSTEM + [3])
    assert seq.cached_tokens == 0 and seq.output_ids == reference.output_ids


def test_the_engine_loop_fetches_off_its_thread_and_honours_a_cancel(model):
    store = MemoryBlockStore()
    run(engine(model, store), SYSTEM + [3])
    loop = EngineLoop(engine(model, store), max_queued=4).start()
    try:
        done, outputs = [], []
        loop.submit(SYSTEM + [3], SamplingParams(max_new_tokens=6), "r1", lambda o: (outputs.append(o), o.finished and done.append(o)))
        loop.submit(SYSTEM + [3], SamplingParams(max_new_tokens=6), "r2", lambda o: o.finished and done.append(o))
        loop.cancel("r2")
        deadline = time.monotonic() + 30
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # polls the callbacks
        by_id = {o.request_id: o for o in done}
        assert by_id["r1"].seq.cached_tokens == 16 and by_id["r1"].finish_reason.value == "length"
        assert by_id["r2"].finished  # aborted, or finished before the cancel landed
        assert loop.in_flight() == 0
    finally:
        loop.stop(timeout=10)


def draft_engine(model, store, draft):
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=SpecConfig("model", 6, draft_model="self"))
    return LLMEngine(model, tiny_tokenizer(), config, eos_token_ids=(), draft_model=draft,
                     shared_cache=SharedPrefixCache(store, FP, SHAPE, torch.float32), model_fingerprint=FP,
                     draft_shared_cache=SharedPrefixCache(store, "cd" * 32, SHAPE, torch.float32),
                     draft_fingerprint="cd" * 32)


def test_the_draft_models_prompt_kv_is_cached_too(model):
    """A target prefix hit must not leave the drafter without (or recomputing) its own prompt KV."""
    store = MemoryBlockStore()
    prompt = SYSTEM + [3, 4, 5]
    cold_engine = draft_engine(model, store, model)
    cold = run(cold_engine, prompt)
    cold_engine.draft_shared_cache.flush()
    warm_engine = draft_engine(model, store, model)  # another node: both caches come from the store
    warm = run(warm_engine, prompt)
    assert warm.cached_tokens == 20 and warm.output_ids == cold.output_ids
    assert warm_engine.draft_shared_cache.stats.hit_blocks == 5  # the drafter's 5 prompt blocks
    assert warm.spec.accepted_tokens == cold.spec.accepted_tokens  # the same draft KV: the same drafts
    again = run(warm_engine, prompt)  # on the same node: the drafter's blocks are in its pool (L1)
    assert again.output_ids == cold.output_ids and warm_engine.draft_shared_cache.stats.queried_blocks == 5
