"""The draft model's prompt KV, cached like the target's so a prefix hit does not leave the
drafter to prefill the whole prompt (or, worse, to draft without it).

The `model` drafter keeps its own paged KV; its prompt blocks get keys over the *draft* model's
fingerprint (cluster/prefix_cache/block_hash.py), stay findable in the drafter's pool after a request ends
(L1) and go to the shared cache (L2) under that fingerprint, beside the target's blocks.
"""

from specserve.cluster.prefix_cache.block_hash import prefix_block_hashes
from specserve.cluster.prefix_cache.cache import SharedPrefixCache

from specserve.workers.engine.kv_cache import BlockTable, PagedKVCache
from specserve.workers.engine.sequence import Sequence


class DraftPrefixCache:
    def __init__(self, kv: PagedKVCache, fingerprint: str, shared: SharedPrefixCache | None = None):
        self.kv, self.fingerprint, self.shared = kv, fingerprint, shared
        self._keys: dict[Sequence, list[bytes]] = {}  # a sequence's prompt block keys
        self._reused: dict[Sequence, int] = {}  # leading blocks it got from a cache

    def attach(self, seq: Sequence, table: BlockTable) -> None:
        """Fills an empty table with the cached run of seq's prompt blocks (L1, then L2), short of
        the block with its last token (the drafter computes that token: it needs its q)."""
        bs = self.kv.block_size
        extra = (self.fingerprint, str(self.kv.config.dtype), seq.cache_salt)
        keys = [h.digest for h in prefix_block_hashes(seq.prompt_ids, bs, extra)]
        self._keys[seq] = keys
        usable = keys[: (seq.num_tokens - 1) // bs]
        for key in usable:
            block = self.kv.allocator.take_cached(key)
            if block is None:
                break
            table.blocks.append(block)
        table.num_tokens = len(table.blocks) * bs
        if self.shared is not None and len(table.blocks) < len(usable):
            for block in self.shared.fetch(usable[len(table.blocks) :]):
                if self.kv.blocks_needed(table, bs) > self.kv.allocator.num_free:
                    break
                self.kv.extend(table, block.k, block.v)
        self._reused[seq] = len(table.blocks)

    def computed(self, seq: Sequence, table: BlockTable) -> None:
        """After the drafter's first forward over seq: its prompt blocks become findable (L1) and
        those no cache gave it go to the shared cache (L2)."""
        keys = self._keys.get(seq, [])[: table.num_tokens // self.kv.block_size]
        for block, key in zip(table.blocks, keys):
            self.kv.allocator.register(block, key)
        first = self._reused.get(seq, 0)
        if self.shared is not None and len(keys) > first:
            bs = self.kv.block_size
            k, v = self.kv.read(table, first * bs, len(keys) * bs)
            self.shared.publish(keys[first:], k, v)

    def forget(self, seq: Sequence) -> None:
        self._keys.pop(seq, None)
        self._reused.pop(seq, None)
