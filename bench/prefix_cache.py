"""`specserve bench prefix`: TTFT of long prompts cold, with an L1 hit and with an L2 (Redis) hit.

For each prompt length: a process with an empty cache prefills the prompt (cold), then the same
prompt again (L1 hit: its blocks are still in the worker's KV pool); a fresh process then sends
it again (L2 hit: its blocks come from Redis). One new token each; TTFT includes the lookup.
Prompts are ShareGPT conversations joined until the length is reached, cut to it exactly
(bench/long_prompts.py).
Without --redis, a redis-server is started for the run on a free loopback port.
"""

import json
import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from specserve.cluster.prefix_cache.admin import clear
from specserve.cluster.prefix_cache.redis_store import RedisBlockStore
from specserve.workers.engine.llm_engine import LLMEngine
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.engine.sequence import SamplingParams

from specserve.bench.harness import BenchConfig
from specserve.bench.long_prompts import long_prompt_ids

LENGTHS = (2048, 4096)


def timed_first_token(engine: LLMEngine, ids: list[int]) -> dict:
    start = time.perf_counter()
    prefix = engine.lookup_shared_prefix(ids)
    fetched = time.perf_counter()
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True), prefix_kv=prefix)
    while engine.has_unfinished():
        engine.step()
    return {"ttft_s": seq.first_token_time - start, "lookup_s": fetched - start, "cached_tokens": seq.cached_tokens,
            "token": seq.output_ids[0]}


def _process_run(model: str, options: LoadOptions, prompts: list[list[int]], repeat: bool) -> list[list[dict]]:
    """In a fresh process: each prompt once (and once more when repeat), after a warm-up."""
    engine = load_engine(model, replace(options, progress=False)).engine
    timed_first_token(engine, list(range(1000, 1040)))  # warm-up, shorter than a block run of interest
    runs = []
    for ids in prompts:
        row = [timed_first_token(engine, ids)]
        if repeat:
            row.append(timed_first_token(engine, ids))
        runs.append(row)
    engine.shared_cache.flush(timeout_s=300)
    return runs


def _in_fresh_process(*args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_process_run, *args).result()


@contextmanager
def _redis(url: str | None):
    if url:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="specserve-bench-redis-")
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", folder, "--maxmemory", "4gb",
                             "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        store = RedisBlockStore(url)
        deadline = time.monotonic() + 20
        while not store.ping():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)  # poll interval
        yield url
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class PrefixBenchConfig(BenchConfig):
    load: LoadOptions = field(default_factory=lambda: LoadOptions(threads=2))  # redis_url None: start a redis-server


def run_prefix_bench(config: PrefixBenchConfig) -> dict:
    options = config.load
    with _redis(options.redis_url) as url:
        options = replace(options, redis_url=url)
        clear(RedisBlockStore(url), None)
        tokenizer = load_engine(config.model, replace(options, redis_url=None)).engine.tokenizer
        prompts = [long_prompt_ids(tokenizer, n, config.seed + n) for n in LENGTHS]  # no shared prefix between them
        print(f"seed {config.seed}: ShareGPT prompts of {', '.join(map(str, LENGTHS))} tokens; model {config.model}, "
              f"{options.threads} threads; redis {url}", flush=True)
        first = _in_fresh_process(config.model, options, prompts, True)
        stats = redis_bytes(url, options.config.block_size)
        second = _in_fresh_process(config.model, options, prompts, False)
    rows = []
    for n, (cold, l1), (l2,) in zip(LENGTHS, first, second):
        moved = stats["bytes"] * l2["cached_tokens"] / max(stats["tokens"], 1)
        rows.append({"prompt_tokens": n, "cold_ttft_s": cold["ttft_s"], "l1_ttft_s": l1["ttft_s"],
                     "l2_ttft_s": l2["ttft_s"], "l2_lookup_s": l2["lookup_s"], "l1_cached_tokens": l1["cached_tokens"],
                     "l2_cached_tokens": l2["cached_tokens"], "l2_bytes": moved,
                     "l2_bytes_per_s": moved / l2["lookup_s"], "same_first_token": cold["token"] == l1["token"] == l2["token"],
                     "l1_over_cold": l1["ttft_s"] / cold["ttft_s"], "l2_over_cold": l2["ttft_s"] / cold["ttft_s"]})
    report = {"model": config.model, "threads": options.threads, "seed": config.seed, "torch": torch.__version__,
              "rows": rows}
    print(f"{'tokens':>7} {'cold s':>8} {'L1 s':>7} {'L2 s':>7} {'L1/cold':>8} {'L2/cold':>8} {'L2 MB':>7} "
          f"{'MB/s':>7} same")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} {r['cold_ttft_s']:>8.3f} {r['l1_ttft_s']:>7.3f} {r['l2_ttft_s']:>7.3f} "
              f"{r['l1_over_cold']:>8.3f} {r['l2_over_cold']:>8.3f} {r['l2_bytes'] / 1e6:>7.1f} "
              f"{r['l2_bytes_per_s'] / 1e6:>7.0f} {r['same_first_token']}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(report, indent=2))
    print(f"results: {out / 'prefix_cache.json'}")
    return report


def redis_bytes(url: str, block_size: int) -> dict:
    """Bytes and tokens' worth of blocks stored (to turn cached tokens into bytes moved)."""
    from specserve.cluster.prefix_cache.cache import NAMESPACE

    sizes = [n for _, n in RedisBlockStore(url, timeout_s=5).scan(NAMESPACE)]
    return {"bytes": sum(sizes), "tokens": block_size * len(sizes)}
