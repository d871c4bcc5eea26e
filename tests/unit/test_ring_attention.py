"""Ring attention on 2, 3 and 4 local gloo ranks equals single-process attention on every rank's
shard: causal and not, zigzag and contiguous layouts, lengths not divisible by the world size, GQA."""

import pytest
import torch

from specserve.cluster.prefill_group import LocalPrefillGroup
from specserve.kernels.attention import attention_with_lse
from specserve.kernels.ring_attention import attend_block
from specserve.kernels.attention_merge import AttentionState
from specserve.kernels.sequence_shards import zigzag_layout, contiguous_layout

from tests.helpers.sp_programs import AttentionCase, AttentionProgram

# fp32 throughout; the ring merges W partial softmaxes computed by a tiled kernel where the
# reference does one softmax: they differ by summation order only (observed <= 2e-6).
ATOL, RTOL = 1e-5, 1e-5

CASES = [
    AttentionCase("ring", seq_len=64, heads=4, kv_heads=4, causal=True),
    AttentionCase("ring", seq_len=61, heads=4, kv_heads=2, causal=True),  # GQA, 61 % W != 0
    AttentionCase("ring", seq_len=61, heads=6, kv_heads=2, causal=False),
    AttentionCase("ring", seq_len=50, heads=4, kv_heads=1, causal=True, layout="contiguous"),
    AttentionCase("ring", seq_len=7, heads=2, kv_heads=1, causal=True),  # some chunks empty at W=4
]


def reference(case: AttentionCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process attention over the whole sequence: out [T, H, D], lse [T, H]."""
    q, k, v = case.inputs()
    mask = torch.ones(case.seq_len, case.seq_len, dtype=torch.bool).tril() if case.causal else None
    out, lse = attention_with_lse(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def group(request):
    with LocalPrefillGroup(AttentionProgram(), request.param, timeout_s=60) as g:
        yield g


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.layout}-T{c.seq_len}-H{c.heads}kv{c.kv_heads}-causal{c.causal}")
def test_every_rank_matches_single_process(group, case):
    expected_out, expected_lse = reference(case)
    layout = case.shard_layout(group.world_size)
    results = group.run(case)
    for rank, (out, lse) in enumerate(results):
        torch.testing.assert_close(out, layout.shard(expected_out, rank), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse, layout.shard(expected_lse, rank), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_zigzag_gives_every_rank_equal_causal_work(world_size):
    """Chunk pairs attended over the whole ring: 2W+1 on every rank with zigzag; contiguous
    gives rank r (r+1) pairs — the imbalance zigzag removes."""
    seq_len = 8 * world_size
    q = torch.randn(seq_len, 2, 4)

    def pairs(layout, rank):
        qs = layout.shard(q, rank)
        total = 0
        for src in range(world_size):
            ks = layout.shard(q, src)
            state = AttentionState.empty(qs.shape[0], 2, 4)
            total += attend_block(state, qs, layout, rank, ks, ks, src, causal=True, scale=1.0)
        return total

    zigzag = [pairs(zigzag_layout(seq_len, world_size), r) for r in range(world_size)]
    contiguous = [pairs(contiguous_layout(seq_len, world_size), r) for r in range(world_size)]
    assert zigzag == [2 * world_size + 1] * world_size
    assert contiguous == list(range(1, world_size + 1))
