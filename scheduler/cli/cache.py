"""`specserve cache stats|clear`: what the shared prefix cache holds in Redis, and removing it.

Only keys under specserve's namespace are read or deleted (never FLUSHALL/FLUSHDB): the same
Redis may hold other applications' data.
"""

from collections import defaultdict

from specserve.cluster.prefix_cache.block_store import StoreUnavailableError
from specserve.cluster.prefix_cache.cache import NAMESPACE
from specserve.cluster.prefix_cache.redis_store import RedisBlockStore

DELETE_BATCH = 1000


def cache_command(action: str, url: str, model_prefix: str | None = None) -> None:
    store = RedisBlockStore(url, timeout_s=5.0)
    try:
        if action == "stats":
            print_stats(store)
        else:
            clear(store, model_prefix)
    except StoreUnavailableError as e:
        raise ValueError(str(e)) from None


def print_stats(store: RedisBlockStore) -> None:
    blocks, size = defaultdict(int), defaultdict(int)
    for key, nbytes in store.scan(NAMESPACE):
        model = key[len(NAMESPACE) :].split(":", 1)[0]
        blocks[model] += 1
        size[model] += nbytes
    if not blocks:
        print("no cached blocks")
        return
    print(f"{'model (fingerprint prefix)':<28} {'blocks':>8} {'MiB':>10}")
    for model in sorted(blocks):
        print(f"{model:<28} {blocks[model]:>8} {size[model] / (1 << 20):>10.1f}")
    print(f"{'total':<28} {sum(blocks.values()):>8} {sum(size.values()) / (1 << 20):>10.1f}")


def clear(store: RedisBlockStore, model_prefix: str | None) -> None:
    prefix = NAMESPACE + (model_prefix or "")
    keys = [key for key, _ in store.scan(prefix)]
    for i in range(0, len(keys), DELETE_BATCH):
        store.delete(keys[i : i + DELETE_BATCH])
    print(f"deleted {len(keys)} cached blocks" + (f" of models {model_prefix}*" if model_prefix else ""))
