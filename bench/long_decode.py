"""Decode at long contexts: how the verify forward's latency grows with context length, and
what speculation still gains on a real 8000-token prompt (part of `specserve bench longctx`).

Verify latency: one forward of S new tokens (S = 1: plain decode; S > 1: a draft of S - 1
tokens plus the root) after C tokens already in the paged cache. The cache contents do not
change the arithmetic, so the C tokens are reserved, not prefilled. SmolLM2's weights with the
RoPE table extended to 16384 positions (timing only past 8192).
"""

import time

import torch

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, KVCacheConfig, PagedKVCache
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.sequence_parallel import CheckpointModel
from specserve.workers.spec.methods import SpecConfig

from specserve.bench.long_prompts import long_prompt_ids

CONTEXTS = (1024, 4096, 8192, 16384)
NEW_SLOTS = (1, 8, 16, 32, 64)
ROUNDS = 5  # the fastest counts: noise on a shared machine only adds time
REAL_PROMPT_TOKENS = 8000  # + new tokens within SmolLM2's 8192 positions


def verify_latency(model, contexts=CONTEXTS, new_slots=NEW_SLOTS, rounds: int = ROUNDS) -> list[dict]:
    """Fastest of `rounds` forwards per (context, new slots); the rounds go over every pair in
    turn, so load from other processes on a shared machine spreads over all pairs alike."""
    cfg = model.config
    block = 16
    blocks = sum(-(-(c + max(new_slots)) // block) for c in contexts)  # one table per context
    kv = PagedKVCache(KVCacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, blocks, block, model.dtype))
    tables = {}
    for context in contexts:
        tables[context] = BlockTable()
        kv.append(tables[context], context)
    best: dict[tuple[int, int], float] = {}
    for round_no in range(rounds + 1):  # round 0 warms up and is not counted
        for context in contexts:
            for s in new_slots:
                table = tables[context]
                batch = build_forward_batch([SequenceSlots(table, [1] * s, logits_rows=list(range(s)))], kv)
                start = time.perf_counter()
                model.forward(batch, kv)
                seconds = time.perf_counter() - start
                kv.truncate(table, context)
                if round_no > 0:
                    best[context, s] = min(best.get((context, s), float("inf")), seconds)
    rows = []
    for context in contexts:
        for s in new_slots:
            t, t1 = best[context, s], best[context, 1]
            rows.append({"context": context, "new_slots": s, "seconds": t, "vs_one_slot": t / t1})
            print(f"verify forward: context {context:>6}, {s:>3} new slots: {1e3 * t:8.1f} ms ({t / t1:.2f}x one slot)",
                  flush=True)
    return rows


def spec_gain_at_8k(model_name: str, tokenizer, threads: int, seed: int, new_tokens: int) -> dict:
    """Decode tokens/s with ngram speculation vs without, on one real 8000-token prompt whose K/V
    is computed once and handed to both engines (decode time only: first token excluded)."""
    from specserve.workers.model.loader import LoadOptions, load_engine

    base = load_engine(model_name, LoadOptions(threads=threads, progress=False)).engine
    ids = long_prompt_ids(tokenizer, REAL_PROMPT_TOKENS, seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    plain = LLMEngine(base.model, base.tokenizer, EngineConfig(kv_cache_bytes=64 << 20), base.eos_token_ids)
    seq = plain.add_request(ids, params)
    while not seq.output_ids:
        plain.step()
    prefix = PrefixKV(0, *plain.kv.read(seq.table, 0, len(ids)))
    runs = {}
    for method in ("none", "ngram", "none", "ngram"):  # alternating: drift hits both alike
        engine = LLMEngine(base.model, base.tokenizer,
                           EngineConfig(kv_cache_bytes=64 << 20, spec=SpecConfig(method)), base.eos_token_ids)
        s = engine.add_request(ids, params, prefix_kv=prefix)
        while not s.output_ids:
            engine.step()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        seconds = time.perf_counter() - start
        rate = (len(s.output_ids) - 1) / seconds
        if method not in runs or rate > runs[method]["tokens_per_s"]:
            runs[method] = {"tokens_per_s": rate, "tokens": s.output_ids, "steps": s.spec.decode_steps - 1,
                            "accepted": s.spec.accepted_tokens, "drafted": s.spec.drafted_tokens}
    identical = runs["none"]["tokens"] == runs["ngram"]["tokens"]
    gain = runs["ngram"]["tokens_per_s"] / runs["none"]["tokens_per_s"]
    print(f"decode at {REAL_PROMPT_TOKENS} tokens: none {runs['none']['tokens_per_s']:.2f} tok/s, ngram "
          f"{runs['ngram']['tokens_per_s']:.2f} tok/s ({gain:.2f}x), tokens identical: {identical}", flush=True)
    for r in runs.values():
        r.pop("tokens")
    return {"prompt_tokens": REAL_PROMPT_TOKENS, "new_tokens": new_tokens, "runs": runs, "ngram_gain": gain,
            "tokens_identical": identical}


def run_long_decode(model_name: str, tokenizer, threads: int, seed: int, new_tokens: int) -> dict:
    torch.set_num_threads(threads)
    model = CheckpointModel(model_name, max_position_embeddings=max(CONTEXTS) + max(NEW_SLOTS))()
    latency = verify_latency(model)
    del model
    return {"verify_latency": latency, "spec_at_8k": spec_gain_at_8k(model_name, tokenizer, threads, seed, new_tokens)}
