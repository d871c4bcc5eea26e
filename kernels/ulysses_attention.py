"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence-sharded to head-sharded,
full-sequence attention on a slice of the heads, all-to-all back.

Each rank starts with its tokens for all heads, [Tr, H, D]; after the first all-to-all it holds
every token for H/W heads, [T, H/W, D]; attention runs locally; the second all-to-all returns
[Tr, H, D]. Query heads must divide by the world size. Key/value heads (GQA) are split the same
way when they divide; when fewer than the ranks (W a multiple of Hkv), each is repeated W/Hkv
times first so every rank receives the one head its query heads share. Communication per rank:
(W-1)/W of its q, k, v and output shards, independent of the ring's W steps.
"""

import torch
import torch.distributed as dist

from .block_attention import block_attention
from .sequence_shards import ShardLayout


def kv_heads_for_ranks(num_heads: int, num_kv_heads: int, world_size: int) -> int:
    """How many times each K/V head is repeated so heads split evenly over the ranks (1 = none).

    Raises ValueError naming the counts when the heads cannot be split."""
    if num_heads % world_size:
        raise ValueError(f"Ulysses needs the query heads ({num_heads}) to divide by the world size ({world_size})")
    if num_kv_heads % world_size == 0:
        return 1
    if world_size % num_kv_heads == 0:
        return world_size // num_kv_heads
    raise ValueError(f"Ulysses needs the key/value heads ({num_kv_heads}) and the world size ({world_size}) "
                     "to divide one another")


def _seq_to_heads(x: torch.Tensor, layout: ShardLayout, group: dist.ProcessGroup) -> torch.Tensor:
    """[Tr, Hx, D] (this rank's tokens, all heads) -> [T, Hx/W, D] (all tokens, rank order)."""
    world = layout.world_size
    tokens, heads, dim = x.shape
    send = x.reshape(tokens, world, heads // world, dim).transpose(0, 1).contiguous()  # (W, Tr, Hx/W, D)
    recv = torch.empty(layout.seq_len, heads // world, dim, dtype=x.dtype, device=x.device)  # (T, Hx/W, D)
    sizes = [layout.shard_len(r) for r in range(world)]
    dist.all_to_all_single(recv, send.view(world * tokens, heads // world, dim), sizes, [tokens] * world,
                           group=group)
    return recv


def _heads_to_seq(x: torch.Tensor, layout: ShardLayout, rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[T, H/W, D] (all tokens in rank order, this rank's heads) -> [Tr, H, D]."""
    world = layout.world_size
    tokens, heads, dim = layout.shard_len(rank), x.shape[1] * world, x.shape[2]
    recv = torch.empty(world * tokens, heads // world, dim, dtype=x.dtype, device=x.device)  # (W*Tr, H/W, D)
    sizes = [layout.shard_len(r) for r in range(world)]
    dist.all_to_all_single(recv, x.contiguous(), [tokens] * world, sizes, group=group)
    return recv.view(world, tokens, heads // world, dim).transpose(0, 1).reshape(tokens, heads, dim)  # (Tr, H, D)


def ulysses_attention(
    q: torch.Tensor,  # [Tr, H, D] this rank's queries, rows in layout.positions(rank) order
    k: torch.Tensor,  # [Tr, Hkv, D]
    v: torch.Tensor,  # [Tr, Hkv, D]
    layout: ShardLayout,
    group: dist.ProcessGroup,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole sequence; returns [Tr, H, D] float32."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if layout.world_size != world:
        raise ValueError(f"layout is for {layout.world_size} ranks, the group has {world}")
    repeat = kv_heads_for_ranks(q.shape[1], k.shape[1], world)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (Tr, W, D)
    # Tokens arrive in rank order; `order` puts them in sequence order for the causal kernel.
    order = torch.cat([layout.positions(r, q.device) for r in range(world)])  # order[i]: position of row i
    rows = torch.empty_like(order)
    rows[order] = torch.arange(order.numel(), device=q.device)  # rows[p]: row holding position p
    qh, kh, vh = (_seq_to_heads(x, layout, group)[rows] for x in (q, k, v))  # (T, H/W or Hkv', D)
    out = block_attention(qh, kh, vh, causal=causal, scale=scale).out  # (T, H/W, D) float32
    return _heads_to_seq(out[order], layout, rank, group)


def ulysses_bytes_sent(layout: ShardLayout, rank: int, heads: int, kv_heads: int, head_dim: int,
                       element_size: int) -> int:
    """Bytes rank sends in one ulysses_attention call: (W-1)/W of its q, k, v shards out and of
    the other ranks' rows of its output heads back."""
    world = layout.world_size
    kv = kv_heads * kv_heads_for_ranks(heads, kv_heads, world)
    out_rows = layout.seq_len - layout.shard_len(rank)  # rows of other ranks, H/W heads each
    return (layout.shard_len(rank) * (heads + 2 * kv) * (world - 1) // world + out_rows * heads // world) * head_dim * element_size
