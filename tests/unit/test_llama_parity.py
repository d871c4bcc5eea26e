"""Logits of our forward equal transformers' on tiny random Llama and Qwen2 models (fp32)."""

import pytest
import torch

from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, KVCacheConfig, PagedKVCache

from tests.helpers.tiny_models import ours_from_hf, tiny_hf

# fp32 on CPU: the two forwards differ only in summation order (fused matmuls, SDPA).
MAX_ABS_DIFF = 1e-4

CASES = [
    ("llama", {}),
    ("qwen2", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("mistral", {"sliding_window": 16}),  # 37 tokens: the window binds
]


def make_cache(model, block_size=4, num_blocks=64) -> PagedKVCache:
    cfg = model.config
    return PagedKVCache(KVCacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, block_size))


@pytest.mark.parametrize("kind,overrides", CASES)
def test_prefill_logits_match_transformers(kind, overrides):
    hf = tiny_hf(kind, **overrides)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 97, (37,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]  # (T, V)
    kv = make_cache(ours)
    spans = [SequenceSlots(BlockTable(), ids.tolist(), logits_rows=list(range(37)))]
    batch = build_forward_batch(spans, kv, ours.config.sliding_window)
    got = ours.forward(batch, kv)
    assert (got - expected).abs().max().item() < MAX_ABS_DIFF


@pytest.mark.parametrize("kind,overrides", [CASES[0], CASES[1], CASES[4]])
def test_stepwise_decode_through_paged_cache_matches_transformers(kind, overrides):
    hf = tiny_hf(kind, **overrides)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    kv = make_cache(ours, block_size=4)
    table = BlockTable()
    prefill = 11  # not a multiple of the block size: decode appends across block boundaries
    window = ours.config.sliding_window
    got = [ours.forward(build_forward_batch([SequenceSlots(table, ids[:prefill].tolist())], kv, window), kv)]
    for t in range(prefill, 30):
        got.append(ours.forward(build_forward_batch([SequenceSlots(table, [int(ids[t])])], kv, window), kv))
    got = torch.cat(got)  # logits after slot prefill-1, prefill, ..., 29
    assert table.num_tokens == 30
    assert (got - expected[prefill - 1 :]).abs().max().item() < MAX_ABS_DIFF


def test_batched_sequences_of_different_lengths_match_one_by_one():
    hf = tiny_hf("llama")
    ours = ours_from_hf(hf)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    kv = make_cache(ours)
    tables = [BlockTable() for _ in prompts]
    # Prefill the first two together, then a mixed step: decode them while prefilling the third.
    ours.forward(build_forward_batch([SequenceSlots(t, p) for t, p in zip(tables[:2], prompts[:2])], kv), kv)
    mixed = build_forward_batch(
        [SequenceSlots(tables[0], [7]), SequenceSlots(tables[1], [8]), SequenceSlots(tables[2], prompts[2])], kv
    )
    got = ours.forward(mixed, kv)
    with torch.no_grad():
        expected = torch.stack(
            [hf(torch.tensor([p + [x]]) if x is not None else torch.tensor([p])).logits[0, -1]
             for p, x in zip(prompts, (7, 8, None))]
        )
    assert (got - expected).abs().max().item() < MAX_ABS_DIFF
