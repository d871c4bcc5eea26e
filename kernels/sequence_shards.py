"""Which prompt positions each rank of a sequence-parallel group holds.

A layout cuts the sequence into contiguous chunks and gives each rank some of them, in order.
Every function here is deterministic in (seq_len, world_size), so each rank computes every
other rank's layout itself and nothing about the layout is communicated.

- `contiguous`: rank r holds chunk r of W. Under a causal mask the last rank's queries see
  the whole sequence while rank 0's see one chunk: W-fold imbalance in ring attention.
- `zigzag`: 2W chunks; rank r holds chunks r and 2W-1-r. With causal masking every rank then
  attends exactly 2W+1 (query chunk, key chunk) pairs: each pair on or below the diagonal.
  Example, seq_len 10, W 2: chunks [0,3) [3,6) [6,8) [8,10); rank 0 holds [0,3)+[8,10),
  rank 1 holds [3,6)+[6,8). Lengths that do not divide give the first chunks one token more.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    start: int  # first global position
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ShardLayout:
    seq_len: int
    shards: tuple[tuple[Chunk, ...], ...]  # shards[rank]: the rank's chunks in local order

    def __post_init__(self):
        covered = sorted((c.start, c.end) for shard in self.shards for c in shard if c.length)
        expected_start = 0
        for start, end in covered:
            if start != expected_start:
                raise ValueError(f"chunks must tile [0, {self.seq_len}) exactly; gap or overlap at {start}")
            expected_start = end
        if expected_start != self.seq_len:
            raise ValueError(f"chunks cover [0, {expected_start}), not [0, {self.seq_len})")

    @property
    def world_size(self) -> int:
        return len(self.shards)

    def shard_len(self, rank: int) -> int:
        return sum(c.length for c in self.shards[rank])

    @property
    def max_shard_len(self) -> int:
        return max(self.shard_len(r) for r in range(self.world_size))

    def positions(self, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global positions of the rank's tokens, in local order: [shard_len(rank)] int64."""
        parts = [torch.arange(c.start, c.end, device=device) for c in self.shards[rank]]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)

    def local_chunks(self, rank: int) -> list[tuple[Chunk, slice]]:
        """(chunk, rows of the rank's local tensors that hold it) for each chunk of the rank."""
        out, offset = [], 0
        for c in self.shards[rank]:
            out.append((c, slice(offset, offset + c.length)))
            offset += c.length
        return out

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """The rank's rows of a full-sequence tensor x [seq_len, ...]."""
        return x[self.positions(rank, x.device)]


def _even_sizes(total: int, parts: int) -> list[int]:
    """[10, 4] -> [3, 3, 2, 2]: sizes differing by at most one, larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _chunks(seq_len: int, parts: int) -> list[Chunk]:
    chunks, start = [], 0
    for size in _even_sizes(seq_len, parts):
        chunks.append(Chunk(start, size))
        start += size
    return chunks


def contiguous_layout(seq_len: int, world_size: int) -> ShardLayout:
    _check(seq_len, world_size)
    return ShardLayout(seq_len, tuple((c,) for c in _chunks(seq_len, world_size)))


def zigzag_layout(seq_len: int, world_size: int) -> ShardLayout:
    _check(seq_len, world_size)
    chunks = _chunks(seq_len, 2 * world_size)
    return ShardLayout(seq_len, tuple((chunks[r], chunks[2 * world_size - 1 - r]) for r in range(world_size)))


def _check(seq_len: int, world_size: int) -> None:
    if world_size < 1 or seq_len < 0:
        raise ValueError(f"need world_size >= 1 and seq_len >= 0, got {world_size}, {seq_len}")
