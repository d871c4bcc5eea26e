"""The shared prefix cache (L2): KV blocks any worker computed, for any worker to reuse.

Values live in a BlockStore (Redis in production) under `specserve:kv:<model>:<block key>`,
one per full block, encoded by block_codec (a checked header, then K and V). Reads are one
pipelined multi-get for a prompt's blocks; writes go through a background thread so they never
sit on a request's path. A store that is down or slow turns into misses: after a failure the
cache stays quiet for `retry_s` and then tries again (redis-py reconnects on that call). A value
that fails its header or checksum is a miss, is deleted and is counted.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, fields

import torch

from specserve.cluster.prefix_cache.block_codec import BlockKV, CorruptBlockError, decode_block, encode_block
from specserve.cluster.prefix_cache.block_store import BlockStore, StoreUnavailableError

log = logging.getLogger("specserve.prefix_cache")
NAMESPACE = "specserve:kv:"
BATCH_BLOCKS = 16  # blocks per round trip: short calls stay within the store's timeout under load


@dataclass
class PrefixCacheStats:
    queries: int = 0  # lookups sent to the store (none while it is quiet after a failure)
    queried_blocks: int = 0
    hit_blocks: int = 0  # the leading run found intact (a lookup stops at the first absent block)
    corrupt_blocks: int = 0  # present but rejected: deleted
    unavailable: int = 0  # calls that failed because the store did not answer
    bytes_read: int = 0
    bytes_written: int = 0
    written_blocks: int = 0
    dropped_writes: int = 0  # blocks not written: the write queue was full or the store was down

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def model_prefix(fingerprint: str) -> str:
    """The key prefix of one model's blocks (what `specserve cache clear --model` removes)."""
    return f"{NAMESPACE}{fingerprint[:16]}:"


class SharedPrefixCache:
    def __init__(self, store: BlockStore, fingerprint: str, block_shape: tuple[int, int, int, int],
                 dtype: torch.dtype, ttl_s: int | None = None, retry_s: float = 5.0, max_queued_writes: int = 256):
        """block_shape: (num_layers, block_size, num_kv_heads, head_dim) of K (and of V).
        ttl_s: values expire after this many seconds (None: only Redis's LRU evicts them)."""
        if ttl_s is not None and ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1 second, got {ttl_s}")
        self.store, self.fingerprint = store, fingerprint
        self.block_shape, self.dtype, self.ttl_s, self.retry_s = tuple(block_shape), dtype, ttl_s, retry_s
        self.stats = PrefixCacheStats()
        self._prefix = model_prefix(fingerprint)
        self._quiet_until = 0.0
        self._writes: queue.Queue = queue.Queue(max_queued_writes)
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-writer", daemon=True)
        self._writer.start()

    @property
    def block_size(self) -> int:
        return self.block_shape[1]

    def key(self, digest: bytes) -> str:
        return self._prefix + digest.hex()

    def fetch(self, digests: list[bytes]) -> list[BlockKV]:
        """The blocks of the leading run of digests that the store holds intact; [] on any trouble."""
        if not digests or self._quiet():
            return []
        keys = [self.key(d) for d in digests]
        blocks, corrupt, nbytes = [], [], 0
        for first in range(0, len(keys), BATCH_BLOCKS):  # stops at the first absent or rejected block
            batch = keys[first : first + BATCH_BLOCKS]
            try:
                values = self.store.get_many(batch)
            except StoreUnavailableError as e:
                self._went_quiet(e)
                break
            for key, value in zip(batch, values):
                if value is None:
                    break
                try:
                    blocks.append(decode_block(value, self.fingerprint, self.block_shape, self.dtype))
                except CorruptBlockError as e:
                    log.warning("prefix cache: dropping %s: %s", key, e)
                    corrupt.append(key)
                    break
                nbytes += len(value)
            if len(blocks) < first + len(batch):
                break
        with self._lock:
            s = self.stats
            s.queries += 1
            s.queried_blocks += len(keys)
            s.hit_blocks += len(blocks)
            s.corrupt_blocks += len(corrupt)
            s.bytes_read += nbytes
        if corrupt:
            try:
                self.store.delete(corrupt)
            except StoreUnavailableError as e:
                self._went_quiet(e)
        return blocks

    def publish(self, digests: list[bytes], k: torch.Tensor, v: torch.Tensor) -> None:
        """Queues the blocks for writing: k, v [L, len(digests) * block_size, Hkv, D]. Never blocks."""
        bs = self.block_size
        if k.shape[1] != len(digests) * bs:
            raise ValueError(f"{len(digests)} blocks need {len(digests) * bs} tokens of K/V, got {k.shape[1]}")
        if not digests:
            return
        try:
            self._writes.put_nowait((digests, k, v))
        except queue.Full:
            with self._lock:
                self.stats.dropped_writes += len(digests)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until queued writes are done (for a process about to exit); False on timeout."""
        done = threading.Event()
        try:
            self._writes.put((None, done, None), timeout=timeout_s)  # a marker: set when reached
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def _write_loop(self) -> None:
        while True:
            digests, k, v = self._writes.get()
            if digests is None:  # flush's marker: everything queued before it is written
                k.set()
                continue
            if self._quiet():
                with self._lock:
                    self.stats.dropped_writes += len(digests)
                continue
            for first in range(0, len(digests), BATCH_BLOCKS):
                if not self._write(digests[first : first + BATCH_BLOCKS], k, v, first):
                    with self._lock:
                        self.stats.dropped_writes += len(digests) - first
                    break

    def _write(self, digests: list[bytes], k: torch.Tensor, v: torch.Tensor, first: int) -> bool:
        """Writes blocks first, first + 1, ... of k and v under digests; False when the store failed."""
        bs = self.block_size
        items = {self.key(d): encode_block(BlockKV(k[:, (first + i) * bs : (first + i + 1) * bs],
                                                   v[:, (first + i) * bs : (first + i + 1) * bs]), self.fingerprint)
                 for i, d in enumerate(digests)}
        try:
            self.store.put_many(items, self.ttl_s)
        except Exception as e:  # noqa: BLE001 - the writer thread must outlive any store error
            if not isinstance(e, StoreUnavailableError):
                log.exception("prefix cache write failed")
            self._went_quiet(e)
            return False
        with self._lock:
            self.stats.written_blocks += len(items)
            self.stats.bytes_written += sum(map(len, items.values()))
        return True

    def _quiet(self) -> bool:
        return time.monotonic() < self._quiet_until

    def _went_quiet(self, error: Exception) -> None:
        with self._lock:
            self.stats.unavailable += 1
            first = not self._quiet()
            self._quiet_until = time.monotonic() + self.retry_s
        if first:
            log.warning("prefix cache unavailable (%s); lookups are misses, retrying in %.0f s", error, self.retry_s)
