"""What `specserve cache` does to the shared prefix cache: count and delete specserve's blocks.

Only keys under specserve's namespace are read or deleted (never FLUSHALL/FLUSHDB): the same
Redis may hold other applications' data. Raises StoreUnavailableError when Redis does not answer.
"""

from collections import defaultdict
from dataclasses import dataclass

from specserve.cluster.prefix_cache.cache import NAMESPACE
from specserve.cluster.prefix_cache.redis_store import RedisBlockStore

DELETE_BATCH = 1000


@dataclass(frozen=True)
class ModelUsage:
    blocks: int
    bytes: int


def usage(store: RedisBlockStore) -> dict[str, ModelUsage]:
    """Blocks and bytes stored per model (its fingerprint prefix, as in the keys)."""
    blocks, size = defaultdict(int), defaultdict(int)
    for key, nbytes in store.scan(NAMESPACE):
        model = key[len(NAMESPACE) :].split(":", 1)[0]
        blocks[model] += 1
        size[model] += nbytes
    return {model: ModelUsage(blocks[model], size[model]) for model in sorted(blocks)}


def clear(store: RedisBlockStore, model_prefix: str | None = None) -> int:
    """Deletes specserve's blocks (only those of models whose fingerprint starts with
    model_prefix, when given); returns how many."""
    keys = [key for key, _ in store.scan(NAMESPACE + (model_prefix or ""))]
    for i in range(0, len(keys), DELETE_BATCH):
        store.delete(keys[i : i + DELETE_BATCH])
    return len(keys)
