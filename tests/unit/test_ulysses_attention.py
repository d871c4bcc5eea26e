"""Ulysses attention on 2, 3 and 4 local gloo ranks equals single-process attention on every
rank's shard; GQA with K/V heads split or repeated; a clear error when heads do not divide."""

import pytest
import torch

from specserve.cluster.prefill_group import LocalPrefillGroup
from specserve.kernels.ulysses_attention import kv_heads_for_ranks

from tests.helpers.sp_programs import AttentionCase, AttentionProgram
from .test_ring_attention import reference

# fp32; one full-sequence tiled softmax per head vs the reference's single softmax: summation
# order only (observed <= 1e-6).
ATOL, RTOL = 1e-5, 1e-5


def cases(world_size: int) -> list[AttentionCase]:
    heads = 2 * world_size
    return [
        AttentionCase("ulysses", 64, heads, heads, causal=True, layout="contiguous"),
        AttentionCase("ulysses", 61, heads, world_size, causal=True, layout="contiguous"),  # GQA, Hkv = W
        AttentionCase("ulysses", 59, heads, 1, causal=False, layout="contiguous"),  # Hkv = 1 repeated W times
        AttentionCase("ulysses", 61, heads, heads, causal=True, layout="zigzag"),  # any layout works
    ]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_rank_matches_single_process(world_size):
    with LocalPrefillGroup(AttentionProgram(), world_size, timeout_s=60) as group:
        for case in cases(world_size):
            expected, _ = reference(case)
            layout = case.shard_layout(world_size)
            for rank, (out, _) in enumerate(group.run(case)):
                torch.testing.assert_close(out, layout.shard(expected, rank), atol=ATOL, rtol=RTOL)
        # heads that do not divide: every rank raises the same clear error before communicating
        bad = AttentionCase("ulysses", 16, heads=2 * world_size + 1, kv_heads=1, causal=True)
        messages = [out for out, _ in group.run(bad)]
        assert all(isinstance(m, str) and "query heads" in m for m in messages)


def test_head_split_rules():
    assert kv_heads_for_ranks(8, 4, 2) == 1  # 2 K/V heads per rank
    assert kv_heads_for_ranks(8, 2, 4) == 2  # each K/V head sent to 2 ranks
    with pytest.raises(ValueError, match=r"query heads \(9\).*world size \(2\)"):
        kv_heads_for_ranks(9, 3, 2)
    with pytest.raises(ValueError, match=r"key/value heads \(3\).*world size \(2\)"):
        kv_heads_for_ranks(6, 3, 2)
