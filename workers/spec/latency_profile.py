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
    repeats: int = 5,
    progress: bool = True,
) -> LatencyCurve:
    """Best-of-`repeats` forward time for S = 1, 2, 4, ... max_slots new slots on one
    sequence that already holds context_len tokens. Uses (and gives back) pool blocks.

    The curve is cached for good, so one busy moment must not skew it: every round times each
    size once (a burst of contention then slows one sample of several sizes, not every sample
    of one), and t(S) is at most any larger size's time. A curve measured with every sample of
    S >= 2 slowed tenfold (CPU contention on a 2-core box) pruned every tree to nothing.
    """
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    context_len = min(context_len, model.config.max_position_embeddings - max_slots - 1)
    counts = default_slot_counts(max_slots)
    best = [float("inf")] * len(counts)
    table = BlockTable()
    try:
        tokens = torch.randint(0, vocab, (context_len + max_slots,), generator=gen).tolist()
        model.forward(build_forward_batch([SequenceSlots(table, tokens[:context_len])], kv), kv)
        rounds = tqdm(range(repeats), desc="profiling verify latency", unit="round", disable=not progress, leave=False)
        for _ in rounds:
            for i, slots in enumerate(counts):
                span = SequenceSlots(table, tokens[context_len : context_len + slots], logits_rows=list(range(slots)))
                start = time.perf_counter()
                model.forward(build_forward_batch([span], kv), kv)
                best[i] = min(best[i], time.perf_counter() - start)
                kv.truncate(table, context_len)
    finally:
        kv.free(table)
    for i in range(len(best) - 2, -1, -1):  # fewer slots never cost more: a dip later means noise here
        best[i] = min(best[i], best[i + 1])
    return LatencyCurve(tuple(counts), tuple(best))
