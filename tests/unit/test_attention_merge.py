"""The stable merge of partial attention equals attention over the union of the key sets, stays
finite where the naive formula overflows, and treats an empty side as a no-op; the shard layouts
tile the sequence."""

import pytest
import torch

from specserve.kernels.attention import attention_with_lse
from specserve.kernels.attention_merge import AttentionState, merge_attention
from specserve.kernels.block_attention import QUERY_TILE, block_attention
from specserve.kernels.sequence_shards import contiguous_layout, zigzag_layout

# fp32, two softmaxes merged vs one: summation order only.
ATOL, RTOL = 1e-5, 1e-5


def as_state(out, lse) -> AttentionState:  # [1, H, T, D], [1, H, T] -> [T, H, D], [T, H]
    return AttentionState(out[0].transpose(0, 1), lse[0].transpose(0, 1))


def test_merge_of_two_key_blocks_equals_attention_over_all_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g) for n in (5, 12, 12))
    full = as_state(*attention_with_lse(q, k, v))
    a = as_state(*attention_with_lse(q, k[:, :, :7], v[:, :, :7]))
    b = as_state(*attention_with_lse(q, k[:, :, 7:], v[:, :, 7:]))
    merged = merge_attention(a, b)
    torch.testing.assert_close(merged.out, full.out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(merged.lse, full.lse, atol=ATOL, rtol=RTOL)


def test_merge_is_stable_where_the_naive_formula_overflows():
    out_a, out_b = torch.ones(1, 1, 2), torch.full((1, 1, 2), 3.0)
    a, b = AttentionState(out_a, torch.tensor([[1000.0]])), AttentionState(out_b, torch.tensor([[1000.0]]))
    assert torch.isinf(torch.exp(a.lse)).all()  # exp(1000) overflows float32
    merged = merge_attention(a, b)
    torch.testing.assert_close(merged.out, torch.full((1, 1, 2), 2.0))  # equal weights
    torch.testing.assert_close(merged.lse, torch.tensor([[1000.0 + torch.log(torch.tensor(2.0)).item()]]))


def test_empty_side_is_a_no_op_and_two_empties_stay_empty():
    empty = AttentionState.empty(3, 2, 4)
    part = AttentionState(torch.randn(3, 2, 4), torch.randn(3, 2))
    merged = merge_attention(empty, part)
    torch.testing.assert_close(merged.out, part.out, atol=0, rtol=0)
    torch.testing.assert_close(merged.lse, part.lse, atol=0, rtol=0)
    both = merge_attention(empty, AttentionState.empty(3, 2, 4))
    assert torch.equal(both.out, torch.zeros(3, 2, 4)) and torch.isneginf(both.lse).all()


@pytest.mark.parametrize("causal", [True, False])
def test_block_attention_matches_attention_with_lse(causal, monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(37, 6, 8, generator=g), torch.randn(37, 2, 8, generator=g), torch.randn(37, 2, 8, generator=g)
    mask = torch.ones(37, 37, dtype=torch.bool).tril() if causal else None
    expected = as_state(*attention_with_lse(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            v.transpose(0, 1)[None], mask))
    fused = block_attention(q, k, v, causal)
    monkeypatch.setattr("specserve.kernels.block_attention.QUERY_TILE", 10)  # the tiled fallback path
    monkeypatch.setattr("specserve.kernels.block_attention._cpu_flash", lambda *a: None)
    tiled = block_attention(q, k, v, causal)
    for got in (fused, tiled):
        torch.testing.assert_close(got.out, expected.out, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got.lse, expected.lse, atol=ATOL, rtol=RTOL)
    assert QUERY_TILE > 10


@pytest.mark.parametrize("seq_len,world_size", [(10, 2), (61, 3), (7, 4), (0, 2), (100, 1)])
def test_layouts_tile_the_sequence(seq_len, world_size):
    for layout in (zigzag_layout(seq_len, world_size), contiguous_layout(seq_len, world_size)):
        every = torch.cat([layout.positions(r) for r in range(world_size)])
        assert sorted(every.tolist()) == list(range(seq_len))
        assert max(layout.shard_len(r) for r in range(world_size)) - min(
            layout.shard_len(r) for r in range(world_size)) <= 2
    assert zigzag_layout(10, 2).positions(0).tolist() == [0, 1, 2, 8, 9]  # the docstring's example
