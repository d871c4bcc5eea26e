"""`specserve cache stats|clear`: what the shared prefix cache holds in Redis, and removing it
(cluster/prefix_cache/admin.py: only specserve's keys, never FLUSHALL)."""

from specserve.cluster.prefix_cache.admin import clear, usage
from specserve.cluster.prefix_cache.block_store import StoreUnavailableError
from specserve.cluster.prefix_cache.redis_store import RedisBlockStore


def cache_command(action: str, url: str, model_prefix: str | None = None) -> None:
    store = RedisBlockStore(url, timeout_s=5.0)
    try:
        if action == "stats":
            print_stats(store)
        else:
            deleted = clear(store, model_prefix)
            print(f"deleted {deleted} cached blocks" + (f" of models {model_prefix}*" if model_prefix else ""))
    except StoreUnavailableError as e:
        raise ValueError(str(e)) from None


def print_stats(store: RedisBlockStore) -> None:
    models = usage(store)
    if not models:
        print("no cached blocks")
        return
    print(f"{'model (fingerprint prefix)':<28} {'blocks':>8} {'MiB':>10}")
    for model, u in models.items():
        print(f"{model:<28} {u.blocks:>8} {u.bytes / (1 << 20):>10.1f}")
    total_blocks, total_bytes = sum(u.blocks for u in models.values()), sum(u.bytes for u in models.values())
    print(f"{'total':<28} {total_blocks:>8} {total_bytes / (1 << 20):>10.1f}")
