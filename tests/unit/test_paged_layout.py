"""Paged attention layout (gather indices and masks) and the attention kernels' numerics."""

import pytest
import torch

from specserve.kernels.attention import attention_with_lse, batched_paged_attention, paged_attention
from specserve.kernels.paged_layout import build_batch_layout, build_paged_layout, group_sequences

# fp32 on CPU: SDPA, the log-sum-exp form and the naive loop differ only in summation order.
ATOL = 1e-5

T, F = True, False


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ---- layout on hand-built inputs ----------------------------------------------------------------


def test_decode_of_one_sequence_needs_no_mask():
    layout = build_paged_layout([slots(8, 9, 10, 3)], [1])
    assert layout.mask is None and layout.causal is False
    assert layout.q_index.tolist() == [[0]]
    assert layout.kv_slots.tolist() == [[8, 9, 10, 3]]
    assert layout.out_index is None
    assert layout.dense_kv_start is None and not layout.is_dense_single  # slots not contiguous


def test_fresh_prefill_is_plain_causal_and_dense():
    layout = build_paged_layout([torch.arange(4, 9)], [5])
    assert layout.mask is None and layout.causal is True
    assert layout.q_index.tolist() == [[0, 1, 2, 3, 4]]
    assert layout.dense_kv_start == 4 and layout.is_dense_single


def test_chunked_prefill_sees_its_prefix_then_causal():
    # P = 2 cached keys, Q = 3 new slots:   keys  p0 p1 n0 n1 n2
    #                                   n0     1  1  1  0  0
    #                                   n1     1  1  1  1  0
    #                                   n2     1  1  1  1  1
    layout = build_paged_layout([slots(12, 13, 14, 15, 0)], [3])
    assert layout.causal is False and layout.dense_kv_start is None
    assert layout.mask.tolist() == [[[[T, T, T, F, F], [T, T, T, T, F], [T, T, T, T, T]]]]


def test_two_sequences_of_different_lengths_are_padded():
    # seq 0: decode, P=3, Q=1 (keys at slots 20..23); seq 1: fresh prefill, Q=K=3 (slots 4..6).
    # Flat slots: [a0 | b0 b1 b2]. Padded to Q=3, K=4:
    #   q_index   [[0, 0, 0],        a0 repeated
    #              [1, 2, 3]]
    #   kv_slots  [[20, 21, 22, 23],
    #              [ 4,  5,  6,  4]] padding repeats key 0
    #   mask seq 0 (every row a copy of a0's)   mask seq 1 (causal, padded key column off)
    #     1 1 1 1                                 1 0 0 0
    #     1 1 1 1                                 1 1 0 0
    #     1 1 1 1                                 1 1 1 0
    #   out_index: rows of the (2*3) output holding real slots: [0, 3, 4, 5]
    layout = build_paged_layout([slots(20, 21, 22, 23), slots(4, 5, 6)], [1, 3])
    assert layout.q_index.tolist() == [[0, 0, 0], [1, 2, 3]]
    assert layout.kv_slots.tolist() == [[20, 21, 22, 23], [4, 5, 6, 4]]
    assert layout.out_index.tolist() == [0, 3, 4, 5]
    assert layout.causal is False and layout.dense_kv_start is None
    assert layout.mask.shape == (2, 1, 3, 4)
    assert layout.mask[0, 0].tolist() == [[T, T, T, T]] * 3
    assert layout.mask[1, 0].tolist() == [[T, F, F, F], [T, T, F, F], [T, T, T, F]]


def test_equal_lengths_need_no_out_index():
    layout = build_paged_layout([slots(0, 1), slots(8, 9)], [1, 1])
    assert layout.out_index is None
    assert layout.mask.tolist() == [[[[T, T]]], [[[T, T]]]]


TREE_4 = torch.tensor([
    # r  a  b  c        r ─ a ─ c
    [T, F, F, F],  # r     └ b
    [T, T, F, F],  # a
    [T, F, T, F],  # b
    [T, T, F, T],  # c
])


def test_tree_mask_sits_after_the_prefix_columns():
    # P = 2 prefix keys, then the tree's 4 nodes as new slots.
    layout = build_paged_layout([slots(30, 31, 5, 6, 7, 8)], [4], [TREE_4])
    assert layout.causal is False
    assert layout.mask[0, 0].tolist() == [
        [T, T, T, F, F, F],
        [T, T, T, T, F, F],
        [T, T, T, F, T, F],
        [T, T, T, T, F, T],
    ]


def test_tree_mask_of_the_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"tree mask has shape \(4, 4\), expected \(3, R\) with 3 <= R <= 4"):
        build_paged_layout([slots(0, 1, 2, 3)], [3], [TREE_4])


def test_tree_mask_may_cover_earlier_tree_keys():
    # Keys: prefix p0 p1, tree nodes a b written earlier, new slots c (child of a), d (child of b).
    #          p0 p1 a  b  c  d
    #   c      1  1  1  0  1  0
    #   d      1  1  0  1  0  1
    grow = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    layout = build_paged_layout([torch.arange(6)], [2], [grow])
    assert layout.mask[0, 0].tolist() == [[T, T, T, F, T, F], [T, T, F, T, F, T]]


def test_sliding_window_masks_old_keys():
    # P = 4, Q = 2 at positions 4, 5, window 3: a query sees keys with q_pos - k_pos < 3.
    #            k_pos  0 1 2 3 4 5
    #   q_pos 4         0 0 1 1 1 0
    #   q_pos 5         0 0 0 1 1 1
    layout = build_paged_layout([torch.arange(6)], [2], query_positions=[slots(4, 5)], sliding_window=3)
    assert layout.mask[0, 0].tolist() == [[F, F, T, T, T, F], [F, F, F, T, T, T]]


def test_sliding_window_that_does_not_bind_keeps_the_fast_paths():
    layout = build_paged_layout([torch.arange(3)], [1], query_positions=[slots(2)], sliding_window=8)
    assert layout.mask is None and layout.causal is False
    with pytest.raises(ValueError, match="query_positions"):
        build_paged_layout([torch.arange(10)], [1], sliding_window=8)


def test_dense_kv_start_only_for_one_sequence_in_order():
    assert build_paged_layout([torch.arange(16, 21)], [1]).dense_kv_start == 16
    assert build_paged_layout([torch.arange(16, 21)], [2]).dense_kv_start == 16  # masked, still dense
    assert build_paged_layout([slots(16, 17, 19)], [1]).dense_kv_start is None
    assert build_paged_layout([torch.arange(3), torch.arange(3, 6)], [1, 1]).dense_kv_start is None


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="need one num_new per sequence"):
        build_paged_layout([slots(0, 1)], [1, 1])
    with pytest.raises(ValueError, match="3 new slots but 2 keys"):
        build_paged_layout([slots(0, 1)], [3])
    with pytest.raises(ValueError, match="0 new slots"):
        build_paged_layout([slots(0, 1)], [0])


# ---- numerics -----------------------------------------------------------------------------------

H, HKV, D = 4, 2, 8  # GQA: query heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
BLOCK, NUM_BLOCKS = 4, 12
SCALE = D**-0.5


def naive_attention(q, k, v, mask):
    """q [Q, H, D], k / v [K, Hkv, D], mask [Q, K] -> [Q, H, D], one head and one query at a time."""
    out = torch.empty_like(q)
    for h in range(H):
        kh, vh = k[:, h // (H // HKV)], v[:, h // (H // HKV)]  # (K, D)
        for i in range(q.shape[0]):
            scores = (kh @ q[i, h]) * SCALE  # (K,)
            scores[~mask[i]] = float("-inf")
            out[i, h] = torch.softmax(scores, 0) @ vh
    return out


def seq_mask(num_keys: int, num_new: int, tree: torch.Tensor | None) -> torch.Tensor:
    mask = torch.ones(num_new, num_keys, dtype=torch.bool)
    mask[:, num_keys - num_new :] = tree if tree is not None else torch.ones(num_new, num_new).tril().bool()
    return mask


def scattered_slots(blocks: list[int], num_keys: int) -> torch.Tensor:
    pos = torch.arange(num_keys)
    return torch.tensor(blocks)[pos // BLOCK] * BLOCK + pos % BLOCK


# (keys K_b, new slots Q_b, tree or None)
MIXED = [(6, 1, None), (7, 7, None), (7, 4, TREE_4)]  # decode, fresh prefill, tree after 3 prefix keys
CASES = {
    "mixed_batch": MIXED,
    "single_decode": [(9, 1, None)],
    "single_prefill": [(6, 6, None)],
    "single_chunk": [(7, 3, None)],
    "single_tree": [(5, 4, TREE_4)],
}


@pytest.mark.parametrize("grouping", [None, 1.01, 100.0])  # one padded call; a call per length; one group
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_equals_exact_and_naive_attention(case, grouping):
    specs = CASES[case]
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(NUM_BLOCKS * BLOCK, HKV, D, generator=gen)
    v_cache = torch.randn(NUM_BLOCKS * BLOCK, HKV, D, generator=gen)
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()  # blocks handed out in shuffled order
    kv_slots, start = [], 0
    for num_keys, _, _ in specs:
        n_blocks = -(-num_keys // BLOCK)
        kv_slots.append(scattered_slots(order[start : start + n_blocks], num_keys))
        start += n_blocks
    num_new = [q for _, q, _ in specs]
    q = torch.randn(sum(num_new), H, D, generator=gen)

    trees = [t for _, _, t in specs]
    if grouping is None:
        got = paged_attention(q, k_cache, v_cache, build_paged_layout(kv_slots, num_new, trees), SCALE)  # (T, H, D)
    else:
        layout = build_batch_layout(kv_slots, num_new, trees, max_ratio=grouping)
        got = batched_paged_attention(q, k_cache, v_cache, layout, SCALE)

    exact, naive, offset = [], [], 0
    for (num_keys, q_len, tree), s in zip(specs, kv_slots):
        qb, kb, vb = q[offset : offset + q_len], k_cache[s], v_cache[s]
        mask = seq_mask(num_keys, q_len, tree)
        out, _ = attention_with_lse(qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                                    mask[None, None], SCALE)  # (1, H, Q, D)
        exact.append(out[0].transpose(0, 1))
        naive.append(naive_attention(qb, kb, vb, mask))
        offset += q_len
    assert got.shape == q.shape
    torch.testing.assert_close(got, torch.cat(exact), atol=ATOL, rtol=0)
    torch.testing.assert_close(got, torch.cat(naive), atol=ATOL, rtol=0)


def test_paged_attention_dense_single_sequence_slices_the_cache():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(32, HKV, D, generator=gen), torch.randn(32, HKV, D, generator=gen)
    q = torch.randn(5, H, D, generator=gen)
    layout = build_paged_layout([torch.arange(9, 14)], [5])
    assert layout.is_dense_single
    got = paged_attention(q, k_cache, v_cache, layout, SCALE)
    expected = naive_attention(q, k_cache[9:14], v_cache[9:14], seq_mask(5, 5, None))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_attention_with_lse_returns_the_log_sum_exp_of_the_masked_scores():
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, H, 3, D, generator=gen)
    k = torch.randn(2, HKV, 5, D, generator=gen)
    v = torch.randn(2, HKV, 5, D, generator=gen)
    mask = torch.rand(2, 1, 3, 5, generator=gen) > 0.4
    mask[..., 0] = True  # no empty rows here
    out, lse = attention_with_lse(q, k, v, mask)  # default scale D ** -0.5
    k_rep = k.repeat_interleave(H // HKV, dim=1)  # (2, H, 5, D)
    v_rep = v.repeat_interleave(H // HKV, dim=1)
    scores = (q @ k_rep.transpose(-1, -2) * SCALE).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=ATOL, rtol=0)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v_rep, atol=ATOL, rtol=0)
    assert out.shape == (2, H, 3, D) and lse.shape == (2, H, 3)


def test_attention_with_lse_fully_masked_row_is_zero_with_minus_inf_lse():
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 2, 2, D, generator=gen), torch.randn(1, 2, 3, D, generator=gen), torch.randn(1, 2, 3, D, generator=gen)
    mask = torch.tensor([[T, F, T], [F, F, F]])  # query 1 sees nothing
    out, lse = attention_with_lse(q, k, v, mask)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, D))
    assert torch.isneginf(lse[:, :, 1]).all()
    assert torch.isfinite(lse[:, :, 0]).all() and not torch.isnan(out).any()


def test_attention_with_lse_rejects_heads_that_do_not_group():
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        attention_with_lse(torch.zeros(1, 3, 1, D), torch.zeros(1, 2, 1, D), torch.zeros(1, 2, 1, D))


def test_sequences_group_by_similar_key_and_slot_counts():
    # decode steps of 10, 11, 30 keys; a 3-node tree at 12 keys; a 200-slot prefill chunk
    num_new, key_lens = [1, 1, 1, 3, 200], [10, 11, 30, 12, 200]
    assert group_sequences(num_new, key_lens, max_ratio=1.25) == [[0, 1], [2], [3], [4]]
    assert group_sequences(num_new, key_lens, max_ratio=1000.0) == [[0, 1, 2, 3, 4]]


def test_one_group_in_order_needs_no_slot_index():
    layout = build_batch_layout([slots(0, 1, 2), slots(4, 5, 6)], [1, 1])
    assert len(layout.groups) == 1 and layout.groups[0].slots is None
    layout = build_batch_layout([slots(0, 1, 2), slots(*range(4, 40))], [1, 1])
    assert [g.slots.tolist() for g in layout.groups] == [[0], [1]]
