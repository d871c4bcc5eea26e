"""Ring attention: each rank keeps its queries; the K/V shards travel around the ring.

At step s rank r holds the K/V of rank (r - s) mod W. It posts the send of that block to rank
r + 1 and the receive of the next one from rank r - 1, attends its queries to the block it
holds while the transfer runs, then waits. After W steps every query has seen every key; the
W partial results are merged with their log-sum-exps (attention_merge.py).

Causal masking works on chunks of the shard layout (sequence_shards.py): a (query chunk, key
chunk) pair is skipped when the keys lie after the queries, attended without mask when they lie
before, and with the causal mask on the diagonal. With the zigzag layout every rank attends the
same number of pairs. The process group is an argument; the backend follows the group (gloo
for CPU tensors, NCCL for CUDA tensors).
"""

import torch
import torch.distributed as dist

from .attention_merge import AttentionState
from .block_attention import block_attention
from .sequence_shards import ShardLayout


class RingComm:
    """One in-flight send-to-next / receive-from-previous exchange at a time.

    Usage per step: `incoming = comm.send_recv(block)`, compute, `comm.wait()`; then
    `incoming` holds the previous rank's block. Raises on misuse (two exchanges in flight,
    waiting with none).
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.prev = dist.get_global_rank(group, (rank - 1) % world)
        self._pending: list | None = None
        self.bytes_sent = 0

    def send_recv(self, block: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            raise RuntimeError("send_recv called with an exchange still in flight (call wait first)")
        incoming = torch.empty_like(block)
        ops = [dist.P2POp(dist.isend, block, self.next, self.group),
               dist.P2POp(dist.irecv, incoming, self.prev, self.group)]
        self._pending = dist.batch_isend_irecv(ops)
        self.bytes_sent += block.numel() * block.element_size()
        return incoming

    def wait(self) -> None:
        if self._pending is None:
            raise RuntimeError("wait called with no exchange in flight")
        for request in self._pending:
            request.wait()
        self._pending = None


def attend_block(
    state: AttentionState,  # of the rank's queries, merged into in place
    q: torch.Tensor,  # [Tq, H, D] the rank's queries
    layout: ShardLayout, q_rank: int,
    k: torch.Tensor,  # [Tk, Hkv, D] the keys of rank kv_rank's shard (Tk >= its shard length)
    v: torch.Tensor,  # [Tk, Hkv, D]
    kv_rank: int,
    causal: bool,
    scale: float,
) -> int:
    """Merges the attention of q over one shard's keys into state; returns chunk pairs attended."""
    pairs = 0
    for qc, q_rows in layout.local_chunks(q_rank):
        for kc, k_rows in layout.local_chunks(kv_rank):
            if qc.length == 0 or kc.length == 0 or (causal and kc.start >= qc.end):
                continue  # nothing here, or every key after every query
            diagonal = causal and kc.start == qc.start  # same chunk: the causal mask applies
            part = block_attention(q[q_rows], k[k_rows], v[k_rows], causal=diagonal, scale=scale)
            state.merge_(part, q_rows)
            pairs += 1
    return pairs


def ring_attention(
    q: torch.Tensor,  # [Tr, H, D] this rank's queries, rows in layout.positions(rank) order
    k: torch.Tensor,  # [Tr, Hkv, D] this rank's keys (after RoPE)
    v: torch.Tensor,  # [Tr, Hkv, D]
    layout: ShardLayout,
    group: dist.ProcessGroup,
    causal: bool = True,
    scale: float | None = None,
) -> AttentionState:
    """Exact attention of this rank's queries over the whole sequence's keys.

    Returns float32 out [Tr, H, D] and lse [Tr, H] for this rank's rows. Every rank of the
    group must call it with the same layout.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if layout.world_size != world:
        raise ValueError(f"layout is for {layout.world_size} ranks, the group has {world}")
    if q.shape[0] != layout.shard_len(rank) or k.shape[0] != q.shape[0] or v.shape != k.shape:
        raise ValueError(f"rank {rank} holds {layout.shard_len(rank)} tokens; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = AttentionState.empty(q.shape[0], q.shape[1], q.shape[2], q.device)
    # K and V travel as one buffer, padded to the longest shard so every rank sends one shape.
    block = torch.zeros(2, layout.max_shard_len, k.shape[1], k.shape[2], dtype=k.dtype, device=k.device)
    block[0, : k.shape[0]], block[1, : v.shape[0]] = k, v  # (2, Tmax, Hkv, D)
    comm = RingComm(group)
    for step in range(world):
        incoming = comm.send_recv(block) if step + 1 < world else None  # overlaps with the compute below
        attend_block(state, q, layout, rank, block[0], block[1], (rank - step) % world, causal, scale)
        if incoming is not None:
            comm.wait()
            block = incoming
    return state


def ring_bytes_sent(layout: ShardLayout, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes each rank sends in one ring_attention call: W-1 padded K/V blocks."""
    return (layout.world_size - 1) * 2 * layout.max_shard_len * kv_heads * head_dim * element_size
