"""Typed, chained hashes of full KV blocks: the keys of the prefix cache.

A block's key is SHA-256 over its parent block's key, the block's token ids and extra keys
(what else decides the KV: model fingerprint, KV dtype, cache salt). Chaining makes the key
name the whole prefix, not just the block. The bytes hashed are fixed (length-prefixed UTF-8
and big-endian token ids), so every process on every machine computes the same key; Python's
hash() is salted per process and must never be used here.
"""

import hashlib
import struct
from dataclasses import dataclass

ROOT = b"\0" * 32  # the parent of a prompt's first block


@dataclass(frozen=True)
class BlockHash:
    digest: bytes  # 32 bytes of SHA-256

    def __post_init__(self):
        if len(self.digest) != 32:
            raise ValueError(f"a block hash has 32 bytes, got {len(self.digest)}")

    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> "BlockHash":
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ValueError(f"not a block hash: {text!r} (64 hex digits expected)") from None


def block_hash(parent: BlockHash | None, token_ids: list[int], extra: tuple[str, ...] = ()) -> BlockHash:
    digest = hashlib.sha256(parent.digest if parent else ROOT)
    digest.update(struct.pack(f">I{len(token_ids)}q", len(token_ids), *token_ids))
    for key in extra:
        data = key.encode()
        digest.update(struct.pack(">I", len(data)) + data)
    return BlockHash(digest.digest())


def prefix_block_hashes(token_ids: list[int], block_size: int, extra: tuple[str, ...] = (),
                        max_blocks: int | None = None) -> list[BlockHash]:
    """Chained keys of the full blocks of token_ids (at most max_blocks); a partial block has none."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    count = len(token_ids) // block_size if max_blocks is None else min(len(token_ids) // block_size, max_blocks)
    hashes, parent = [], None
    for b in range(count):
        parent = block_hash(parent, token_ids[b * block_size : (b + 1) * block_size], extra)
        hashes.append(parent)
    return hashes
