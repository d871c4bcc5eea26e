"""Paged KV cache: block allocation, slot arithmetic, fork / copy-on-write, truncate, free."""

import pytest
import torch

from specserve.workers.engine.kv_cache import BlockAllocator, BlockTable, KVCacheConfig, OutOfBlocksError, PagedKVCache


def make_cache(num_blocks=8, block_size=4, num_layers=2, num_kv_heads=2, head_dim=3) -> PagedKVCache:
    return PagedKVCache(KVCacheConfig(num_layers, num_kv_heads, head_dim, num_blocks, block_size))


def fill(kv: PagedKVCache, slots: torch.Tensor, base: float) -> None:
    """Writes distinct values into every layer at `slots`: layer l, slot s -> base + 100*l + s."""
    _, _, hkv, d = kv.k.shape
    for layer in range(kv.k.shape[0]):
        vals = (base + 100 * layer + slots.float())[:, None, None].expand(-1, hkv, d).contiguous()
        kv.write(layer, slots, vals, -vals)


def test_allocator_hands_out_low_ids_first_and_reuses_the_last_released():
    alloc = BlockAllocator(4)
    assert [alloc.allocate() for _ in range(3)] == [0, 1, 2]
    alloc.release(1)
    assert alloc.num_free == 2
    assert alloc.allocate() == 1  # the released block comes back before untouched block 3
    assert alloc.allocate() == 3


def test_slots_of_a_hand_built_table():
    # block_size 4, blocks [7, 2]:
    #   tokens 0..3 -> block 7 -> slots 28..31
    #   tokens 4..5 -> block 2 -> slots  8..9   (token 5 is slot 2*4+1)
    kv = make_cache(num_blocks=8)
    table = BlockTable([7, 2], 6)
    assert kv.slots(table, 0, 6).tolist() == [28, 29, 30, 31, 8, 9]
    assert kv.slots(table, 5, 6).tolist() == [9]
    with pytest.raises(IndexError, match=r"\[5, 7\)"):
        kv.slots(table, 5, 7)


def test_append_within_a_block_and_across_boundaries():
    kv = make_cache(num_blocks=8, block_size=4)
    table = BlockTable()
    assert kv.append(table, 3).tolist() == [0, 1, 2]  # block 0, partly filled
    assert table.blocks == [0] and table.num_tokens == 3
    assert kv.append(table, 1).tolist() == [3]  # fills block 0, takes no new block
    assert table.blocks == [0] and kv.allocator.num_free == 7
    assert kv.append(table, 6).tolist() == [4, 5, 6, 7, 8, 9]  # crosses into blocks 1 and 2
    assert table.blocks == [0, 1, 2] and table.num_tokens == 10


def test_append_follows_a_non_trivial_block_order():
    kv = make_cache(num_blocks=8, block_size=4)
    a, b, c = BlockTable(), BlockTable(), BlockTable()
    for t in (a, b, c):
        kv.append(t, 4)
    assert (a.blocks, b.blocks, c.blocks) == ([0], [1], [2])
    kv.free(a)  # free list: ..., 3, 0
    kv.free(c)  # free list: ..., 3, 0, 2  -> handed out 2, 0, 3
    d = BlockTable()
    slots = kv.append(d, 6)
    # d.blocks == [2, 0]: tokens 0..3 -> slots 8..11, tokens 4..5 -> slots 0..1
    assert d.blocks == [2, 0]
    assert slots.tolist() == [8, 9, 10, 11, 0, 1]
    assert kv.append(d, 3).tolist() == [2, 3, 12]  # finish block 0, then block 3
    assert d.blocks == [2, 0, 3]


def test_blocks_needed():
    kv = make_cache(num_blocks=8, block_size=4)
    table = BlockTable()
    assert kv.blocks_needed(table, 0) == 0
    assert kv.blocks_needed(table, 1) == 1
    assert kv.blocks_needed(table, 4) == 1
    assert kv.blocks_needed(table, 5) == 2
    kv.append(table, 3)
    assert kv.blocks_needed(table, 1) == 0  # fits in block 0's last slot
    assert kv.blocks_needed(table, 2) == 1
    assert kv.blocks_needed(table, 9) == 2  # 12 tokens: 3 blocks, 1 held
    assert kv.blocks_needed(table, 10) == 3  # 13 tokens: 4 blocks, 1 held


def test_fork_shares_blocks_and_copies_a_shared_partial_block_on_first_append():
    kv = make_cache(num_blocks=8, block_size=4)
    parent = BlockTable()
    parent_slots = kv.append(parent, 6)  # blocks [0, 1]; block 1 holds 2 tokens
    fill(kv, parent_slots, base=1000.0)
    k_before, v_before = kv.k.clone(), kv.v.clone()

    child = kv.fork(parent)
    assert child.blocks == parent.blocks == [0, 1] and child.num_tokens == 6
    assert kv.allocator.ref_counts[:2] == [2, 2]
    assert kv.allocator.num_free == 6  # forking takes no block
    assert kv.blocks_needed(child, 1) == 1  # the copy of block 1

    new_slot = kv.append(child, 1)
    # child: [0, 1] -> [0, 2]; block 1 copied into block 2, the new token at offset 2 of block 2
    assert child.blocks == [0, 2] and parent.blocks == [0, 1]
    assert new_slot.tolist() == [2 * 4 + 2]
    assert kv.allocator.ref_counts[:3] == [2, 1, 1]
    copied = kv.slots(child, 0, 6)
    for layer in range(kv.config.num_layers):
        assert torch.equal(kv.k[layer, copied], kv.k[layer, parent_slots])
        assert torch.equal(kv.v[layer, copied], kv.v[layer, parent_slots])

    fill(kv, new_slot, base=5000.0)  # writing into the child ...
    assert torch.equal(kv.k[:, parent_slots], k_before[:, parent_slots])  # ... leaves the parent alone
    assert torch.equal(kv.v[:, parent_slots], v_before[:, parent_slots])
    assert kv.blocks_needed(parent, 1) == 0  # block 1 is the parent's alone now: no copy
    assert kv.append(parent, 1).tolist() == [1 * 4 + 2]


def test_fork_of_full_blocks_needs_no_copy():
    kv = make_cache(num_blocks=8, block_size=4)
    parent = BlockTable()
    kv.append(parent, 8)
    child = kv.fork(parent)
    assert kv.blocks_needed(child, 1) == 1  # just the next block
    kv.append(child, 1)
    assert child.blocks == [0, 1, 2]
    assert kv.allocator.ref_counts[:3] == [2, 2, 1]


def test_truncate_gives_back_blocks():
    kv = make_cache(num_blocks=8, block_size=4)
    table = BlockTable()
    kv.append(table, 10)  # blocks [0, 1, 2]
    kv.truncate(table, 5)
    assert table.blocks == [0, 1] and table.num_tokens == 5
    assert kv.allocator.num_free == 6
    kv.truncate(table, 4)
    assert table.blocks == [0] and kv.allocator.num_free == 7
    kv.truncate(table, 4)  # no-op
    assert table.blocks == [0]
    with pytest.raises(IndexError, match="5"):
        kv.truncate(table, 5)


def test_truncate_of_a_fork_keeps_the_shared_blocks_of_the_other():
    kv = make_cache(num_blocks=8, block_size=4)
    parent = BlockTable()
    kv.append(parent, 8)
    child = kv.fork(parent)
    kv.free(child)
    assert child.blocks == [] and child.num_tokens == 0
    assert kv.allocator.ref_counts[:2] == [1, 1]
    assert kv.allocator.num_free == 6


def test_free_returns_every_block():
    kv = make_cache(num_blocks=8, block_size=4)
    tables = [BlockTable() for _ in range(3)]
    for t, n in zip(tables, (5, 9, 1)):
        kv.append(t, n)
    assert kv.allocator.num_free == 8 - (2 + 3 + 1)
    for t in tables:
        kv.free(t)
    assert kv.allocator.num_free == 8
    assert kv.allocator.ref_counts == [0] * 8


def test_out_of_blocks_raises_and_leaves_the_table_unchanged():
    kv = make_cache(num_blocks=3, block_size=4)
    table = BlockTable()
    kv.append(table, 6)  # 2 blocks, 1 free
    with pytest.raises(OutOfBlocksError, match="2 blocks, 1 free"):
        kv.append(table, 7)  # 13 tokens would need 4 blocks
    assert table.blocks == [0, 1] and table.num_tokens == 6
    assert kv.allocator.num_free == 1
    assert kv.append(table, 6).tolist() == [6, 7, 8, 9, 10, 11]  # the one free block still works


def test_out_of_blocks_during_copy_on_write_leaves_the_fork_unchanged():
    kv = make_cache(num_blocks=2, block_size=4)
    parent = BlockTable()
    kv.append(parent, 6)  # both blocks
    child = kv.fork(parent)
    with pytest.raises(OutOfBlocksError):
        kv.append(child, 1)  # block 1 is shared and partial: the copy needs a free block
    assert child.blocks == [0, 1] and child.num_tokens == 6
    assert kv.allocator.ref_counts == [2, 2]


def test_allocator_raises_on_misuse():
    alloc = BlockAllocator(2)
    with pytest.raises(ValueError, match="block 1 released more often than taken"):
        alloc.release(1)
    with pytest.raises(ValueError, match="block 0 is free"):
        alloc.share(0)
    alloc.allocate(), alloc.allocate()
    with pytest.raises(OutOfBlocksError, match="all 2 KV blocks"):
        alloc.allocate()


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"])
def test_config_rejects_non_positive_values_naming_the_field(field):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=rf"{field} must be >= 1, got 0"):
        KVCacheConfig(**{**args, field: 0})


def test_bytes_per_block():
    # 2 (K and V) * 3 layers * 4 slots * 2 heads * 5 dims * element size
    cfg = KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=5, num_blocks=1, block_size=4)
    assert cfg.bytes_per_block == 2 * 3 * 4 * 2 * 5 * 4
    half = KVCacheConfig(3, 2, 5, 1, 4, dtype=torch.float16)
    assert half.bytes_per_block == 2 * 3 * 4 * 2 * 5 * 2
    kv = PagedKVCache(cfg)
    assert kv.k.numel() * kv.k.element_size() + kv.v.numel() * kv.v.element_size() == cfg.bytes_per_block
