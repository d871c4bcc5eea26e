"""Measures the verify forward's latency curve t(S) on this machine (see tree_size.py)."""

import time

import torch
from tqdm import tqdm

from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, PagedKVCache
from specserve.workers.model.llama import LlamaModel
from specserve.workers.spec.tree_size import LatencyCurve, default_slot_counts


def measure_latency_curve(
    model: LlamaModel,
    kv: PagedKVCache,
    max_slots: int = 128,
    context_len: int = 256,
    repeats: int = 3,
    progress: bool = True,
) -> LatencyCurve:
    """Best-of-`repeats` forward time for S = 1, 2, 4, ... max_slots new slots on one
    sequence that already holds context_len tokens. Uses (and gives back) pool blocks."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    context_len = min(context_len, model.config.max_position_embeddings - max_slots - 1)
    table = BlockTable()
    try:
        tokens = torch.randint(0, vocab, (context_len + max_slots,), generator=gen).tolist()
        model.forward(build_forward_batch([SequenceSlots(table, tokens[:context_len])], kv), kv)
        counts = default_slot_counts(max_slots)
        seconds = []
        for slots in tqdm(counts, desc="profiling verify latency", unit="size", disable=not progress, leave=False):
            best = float("inf")
            for _ in range(repeats):
                span = SequenceSlots(table, tokens[context_len : context_len + slots], logits_rows=list(range(slots)))
                start = time.perf_counter()
                model.forward(build_forward_batch([span], kv), kv)
                best = min(best, time.perf_counter() - start)
                kv.truncate(table, context_len)
            seconds.append(best)
    finally:
        kv.free(table)
    return LatencyCurve(tuple(counts), tuple(seconds))
