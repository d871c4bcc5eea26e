"""The shared prefix cache against a real redis-server: round trips of real KV, reuse across
processes, eviction under a small maxmemory, and Redis dying mid-run."""

import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

from specserve.cluster.prefix_cache.block_store import StoreUnavailableError
from specserve.cluster.prefix_cache.cache import NAMESPACE, SharedPrefixCache
from specserve.cluster.prefix_cache.redis_store import RedisBlockStore
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.sequence import SamplingParams

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer
from .conftest import READY_TIMEOUT_S, _free_port, _redis_answers_ping

FP = "ab" * 32
SHAPE = (2, 4, 2, 16)  # the tiny model's layers, block size, kv heads, head dim
SPECSERVE = [sys.executable, "-m", "specserve.scheduler.cli.main"]


@contextmanager
def own_redis(tmp_path, *args: str):
    """A redis-server of this test's own (it may be killed), with extra arguments."""
    port = _free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _redis_answers_ping(port):
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)  # poll interval
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def engine(model, url: str | RedisBlockStore) -> LLMEngine:
    store = RedisBlockStore(url) if isinstance(url, str) else url
    shared = SharedPrefixCache(store, FP, SHAPE, torch.float32, retry_s=0.2)
    return LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20), eos_token_ids=(),
                     shared_cache=shared, model_fingerprint=FP)


def run(eng, prompt, n=10):
    seq = list(eng.generate(prompt, SamplingParams(max_new_tokens=n)))[-1].seq
    assert eng.shared_cache.flush()
    return seq


def test_store_round_trip(redis_server):
    store = RedisBlockStore(redis_server)
    store.put_many({"specserve:test:a": b"\x00" * 1000, "specserve:test:b": b"xy"}, ttl_s=60)
    assert store.get_many(["specserve:test:a", "specserve:test:zz", "specserve:test:b"]) == [b"\x00" * 1000, None, b"xy"]
    assert sorted(store.scan("specserve:test:")) == [("specserve:test:a", 1000), ("specserve:test:b", 2)]
    store.delete(["specserve:test:a", "specserve:test:b"])
    assert list(store.scan("specserve:test:")) == []


def test_another_engine_reuses_real_kv_through_redis(model, redis_server):
    prompt = list(range(2, 40))  # 9 full blocks of 4 before the last token
    first = run(engine(model, redis_server), prompt)
    other = engine(model, redis_server)
    second = run(other, prompt)
    assert first.cached_tokens == 0 and second.cached_tokens == 36
    assert second.output_ids == first.output_ids
    assert other.shared_cache.stats.hit_blocks == 9 and other.shared_cache.stats.corrupt_blocks == 0


def test_eviction_under_a_small_maxmemory_keeps_the_cache_consistent(model, tmp_path):
    # Redis itself takes ~1 MB, so 2 MB leaves room for a few hundred of the tiny model's blocks.
    with own_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru") as (_, url):
        store = RedisBlockStore(url)  # one connection pool: every client's buffers count against maxmemory
        reference = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, prefix_caching=False),
                              eos_token_ids=())
        prompts = [[i + 2] * 3 + [5 + t % 90 for t in range(190)] for i in range(12)]  # 12 x 48 blocks of ~2.2 KB: over 1 MB
        for p in prompts:
            run(engine(model, store), p)
        hits = []
        for p in reversed(prompts):  # the newest first: LRU kept those
            fresh = engine(model, store)
            seq = run(fresh, p)
            want = list(reference.generate(p, SamplingParams(max_new_tokens=10)))[-1].seq.output_ids
            assert seq.output_ids == want  # whatever survived eviction is a correct prefix
            assert fresh.shared_cache.stats.corrupt_blocks == 0
            hits.append(seq.cached_tokens)
        assert hits[0] > 0  # the newest prompt's blocks survived
        assert min(hits) < len(prompts[0]) - 4  # older ones were evicted, wholly or partly


def test_redis_killed_mid_run_requests_still_complete(model, tmp_path):
    with own_redis(tmp_path) as (proc, url):
        eng = engine(model, url)
        prompt = list(range(2, 30))
        cold = run(eng, prompt)
        proc.kill()
        proc.wait()
        other = engine(model, url)
        for i in range(3):
            seq = run(other, prompt if i == 0 else [i] + prompt)
            assert seq.is_finished and len(seq.output_ids) == 10
        assert run(other, prompt).output_ids == cold.output_ids
        assert other.shared_cache.stats.unavailable >= 1


def generate_json(url: str, prompt: str) -> dict:
    out = subprocess.run([*SPECSERVE, "generate", prompt, "--json", "--max-new-tokens", "16", "--redis", url,
                          "--threads", "2", "--spec", "none"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_second_process_reuses_the_first_ones_blocks(redis_server):
    """The real model in two `specserve generate` processes: the second's prefill is a cache hit."""
    prompt = "Summarise the following support ticket in one sentence. " * 12
    first = generate_json(redis_server, prompt)
    second = generate_json(redis_server, prompt)
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == (first["prompt_tokens"] - 1) // 16 * 16 > 0
    assert second["token_ids"] == first["token_ids"]

    store = RedisBlockStore(redis_server)
    store.put_many({"other-app:key": b"keep me"})
    stats = subprocess.run([*SPECSERVE, "cache", "stats", "--redis", redis_server], capture_output=True, text=True)
    assert stats.returncode == 0 and "total" in stats.stdout, stats.stderr
    cleared = subprocess.run([*SPECSERVE, "cache", "clear", "--redis", redis_server], capture_output=True, text=True)
    assert cleared.returncode == 0, cleared.stderr
    assert list(store.scan(NAMESPACE)) == [] and store.get_many(["other-app:key"]) == [b"keep me"]


def test_values_expire_after_the_ttl_and_clear_can_pick_one_model(redis_server):
    import redis

    store = RedisBlockStore(redis_server)
    cache = SharedPrefixCache(store, FP, SHAPE, torch.float32, ttl_s=60)
    cache.publish([b"a"], torch.zeros(SHAPE), torch.ones(SHAPE))
    assert cache.flush()
    assert 0 < redis.Redis.from_url(redis_server).ttl(cache.key(b"a")) <= 60
    other = SharedPrefixCache(store, "cd" * 32, SHAPE, torch.float32)
    other.publish([b"a"], torch.zeros(SHAPE), torch.ones(SHAPE))
    assert other.flush()
    out = subprocess.run([*SPECSERVE, "cache", "clear", "--redis", redis_server, "--model-prefix", "abab"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert store.get_many([cache.key(b"a"), other.key(b"a")])[0] is None  # FP's block went
    assert store.get_many([other.key(b"a")])[0] is not None  # the other model's stayed
    store.delete([other.key(b"a")])


def test_cache_command_names_an_unreachable_redis():
    out = subprocess.run([*SPECSERVE, "cache", "stats", "--redis", f"redis://127.0.0.1:{_free_port()}/0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "redis at redis://127.0.0.1" in out.stderr and "Traceback" not in out.stderr


def test_an_unreachable_store_raises_its_own_error():
    with pytest.raises(StoreUnavailableError):
        RedisBlockStore(f"redis://127.0.0.1:{_free_port()}/0").get_many(["x"])
