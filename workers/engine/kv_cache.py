"""Paged KV cache: fixed-size blocks in one pool, a block table per sequence.

Blocks are reference-counted so a forked sequence shares its parent's blocks; the first
write into a shared block copies it (copy-on-write). A cache *slot* is
`block_id * block_size + offset`, the row of a layer's flat key/value tensor.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


class OutOfBlocksError(RuntimeError):
    """The pool has no free block left for an allocation."""


@dataclass(frozen=True)
class KVCacheConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


class BlockAllocator:
    """A fixed pool of block ids with reference counts, doubling as a prefix cache.

    A full block may be registered under its content key (cluster/prefix_cache/block_hash.py). When its last
    reference goes, a registered block is not freed but kept, findable by key, in LRU order; an
    allocation with no free block left evicts the least recently used of them. `num_free` counts
    both, since either can be handed out.
    """

    def __init__(self, num_blocks: int):
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._key_of: dict[int, bytes] = {}  # registered block -> key
        self._block_of: dict[bytes, int] = {}  # key -> registered block
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; oldest first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for their content."""
        return len(self._cached)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        else:
            raise OutOfBlocksError(f"all {len(self.ref_counts)} KV blocks are in use")
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.ref_counts[block] < 1:
            raise ValueError(f"block {block} is free and cannot be shared")
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        if self.ref_counts[block] < 1:
            raise ValueError(f"block {block} released more often than taken")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._free.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Makes a referenced, full block findable by key (a key already held keeps its block)."""
        if self.ref_counts[block] < 1:
            raise ValueError(f"block {block} is free and cannot be registered")
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key], self._key_of[block] = block, key

    def is_cached(self, key: bytes) -> bool:
        """Whether a block is registered under key (referenced or kept for reuse)."""
        return key in self._block_of

    def take_cached(self, key: bytes) -> int | None:
        """The block registered under key with one more reference, or None."""
        block = self._block_of.get(key)
        if block is None:
            return None
        if self.ref_counts[block] == 0:
            del self._cached[block]
        self.ref_counts[block] += 1
        return block


@dataclass
class BlockTable:
    """The blocks of one sequence, in order, and how many tokens they hold."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PagedKVCache:
    """Key and value tensors of every layer over one block pool."""

    def __init__(self, config: KVCacheConfig):
        self.config = config
        slots = config.num_blocks * config.block_size
        shape = (config.num_layers, slots, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=config.dtype, device=config.device)  # [L, slots, Hkv, D]
        self.v = torch.zeros(shape, dtype=config.dtype, device=config.device)
        self.allocator = BlockAllocator(config.num_blocks)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def blocks_needed(self, table: BlockTable, num_new_tokens: int) -> int:
        """Blocks an append of num_new_tokens would take from the pool (copy-on-write included)."""
        bs = self.block_size
        total = -(-(table.num_tokens + num_new_tokens) // bs)
        needed = max(0, total - len(table.blocks))
        partial = table.num_tokens % bs
        if num_new_tokens and partial and self.allocator.ref_counts[table.blocks[-1]] > 1:
            needed += 1
        return needed

    def append(self, table: BlockTable, num_new_tokens: int) -> torch.Tensor:
        """Reserves slots for num_new_tokens more tokens; returns their slots [num_new_tokens].

        Raises OutOfBlocksError, leaving the table unchanged, when the pool cannot hold them.
        """
        if self.blocks_needed(table, num_new_tokens) > self.allocator.num_free:
            raise OutOfBlocksError(
                f"{num_new_tokens} more tokens need {self.blocks_needed(table, num_new_tokens)} blocks, "
                f"{self.allocator.num_free} free"
            )
        bs = self.block_size
        if num_new_tokens and table.num_tokens % bs and self.allocator.ref_counts[table.blocks[-1]] > 1:
            table.blocks[-1] = self._copy_block(table.blocks[-1])
        start = table.num_tokens
        table.num_tokens += num_new_tokens
        while len(table.blocks) * bs < table.num_tokens:
            table.blocks.append(self.allocator.allocate())
        return self.slots(table, start, table.num_tokens)

    def slots(self, table: BlockTable, start: int, end: int) -> torch.Tensor:
        """Cache slots of the table's tokens [start, end)."""
        if not 0 <= start <= end <= table.num_tokens:
            raise IndexError(f"tokens [{start}, {end}) outside a table of {table.num_tokens}")
        bs = self.block_size
        positions = torch.arange(start, end)
        blocks = torch.tensor(table.blocks, dtype=torch.long)
        return blocks[positions // bs] * bs + positions % bs  # e.g. bs=4, blocks [7, 2]: pos 5 -> 2*4+1

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing every block of `table`; writes to shared blocks copy first."""
        for block in table.blocks:
            self.allocator.share(block)
        return BlockTable(list(table.blocks), table.num_tokens)

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keeps the first num_tokens tokens and gives back blocks no longer needed."""
        if not 0 <= num_tokens <= table.num_tokens:
            raise IndexError(f"cannot truncate a table of {table.num_tokens} tokens to {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        for block in reversed(table.blocks[keep:]):  # the pool hands them out again in this order
            self.allocator.release(block)
        del table.blocks[keep:]
        table.num_tokens = num_tokens

    def compact(self, table: BlockTable, start: int, keep: list[int]) -> None:
        """Keeps token start + keep[i] as token start + i, for increasing keep; drops the rest.

        Commits a draft tree's accepted path: tree nodes sit at start, start + 1, ... in node
        order, and path [0, 2, 5] moves node 2 to start + 1 and node 5 to start + 2.
        """
        if any(b <= a for a, b in zip(keep, keep[1:])) or (keep and keep[0] < 0):
            raise ValueError(f"keep must be increasing and non-negative, got {keep}")
        moved = [i for i, k in enumerate(keep) if k != i]
        if moved:
            slots = self.slots(table, start, start + keep[-1] + 1)
            src, dst = slots[[keep[i] for i in moved]], slots[moved]
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
        self.truncate(table, start + len(keep))

    def free(self, table: BlockTable) -> None:
        self.truncate(table, 0)

    def read(self, table: BlockTable, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of the table's tokens [start, end): [L, n, Hkv, D] each."""
        slots = self.slots(table, start, end).to(self.k.device)
        return self.k[:, slots], self.v[:, slots]  # advanced indexing copies

    def extend(self, table: BlockTable, k: torch.Tensor, v: torch.Tensor) -> None:
        """Appends tokens whose keys and values are given ([L, n, Hkv, D] each, computed elsewhere).

        Raises ValueError when the shape does not fit this cache, OutOfBlocksError when the pool
        is short (the table is left unchanged).
        """
        c = self.config
        expected = (c.num_layers, c.num_kv_heads, c.head_dim)
        if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != expected:
            raise ValueError(f"K/V of shape {tuple(k.shape)} do not fit a cache of [layers, tokens, kv_heads, "
                             f"head_dim] = [{c.num_layers}, n, {c.num_kv_heads}, {c.head_dim}]")
        slots = self.append(table, k.shape[1]).to(self.k.device)
        self.k[:, slots] = k.to(self.k.device, self.k.dtype)
        self.v[:, slots] = v.to(self.v.device, self.v.dtype)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores keys/values [n, Hkv, D] of one layer at slots [n]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def _copy_block(self, block: int) -> int:
        new = self.allocator.allocate()
        bs = self.block_size
        src, dst = slice(block * bs, (block + 1) * bs), slice(new * bs, (new + 1) * bs)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.allocator.release(block)
        return new
