"""The shared prefix cache's store in Redis: one string value per block, pipelined calls.

Run Redis with a memory bound and LRU eviction (`maxmemory 8gb`, `maxmemory-policy allkeys-lru`)
so the cache never grows past the machine: every block is a separate key, so an eviction drops
single blocks and a lookup simply stops at the first missing one.
"""

from collections.abc import Iterator

import redis

from specserve.cluster.prefix_cache.block_store import BlockStore, StoreUnavailableError

DEFAULT_TIMEOUT_S = 1.0  # per socket operation: a slow Redis is a miss after this, never a stuck request


class RedisBlockStore(BlockStore):
    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        """url: redis://[:password@]host:port/db or rediss:// (TLS)."""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis URL must start with redis://, rediss:// or unix://, got {url!r}")
        self.url = url
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            health_check_interval=30)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        with _answers(self.url):
            return self._client.mget(keys)

    def put_many(self, items: dict[str, bytes], ttl_s: int | None = None) -> None:
        if not items:
            return
        with _answers(self.url):
            pipe = self._client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value, ex=ttl_s)
            pipe.execute()

    def delete(self, keys: list[str]) -> None:
        if keys:
            with _answers(self.url):
                self._client.delete(*keys)

    def scan(self, prefix: str) -> Iterator[tuple[str, int]]:
        with _answers(self.url):
            keys = [k.decode() for k in self._client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)]
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(key)
            sizes = pipe.execute()
        return iter(zip(keys, sizes))

    def ping(self) -> bool:
        try:
            with _answers(self.url):
                return bool(self._client.ping())
        except StoreUnavailableError:
            return False


class _answers:
    """Turns redis-py's errors (connection, timeout, memory, auth) into StoreUnavailableError."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, redis.OutOfMemoryError):  # maxmemory without an evicting policy
            raise StoreUnavailableError(f"redis at {_redact(self.url)} is full: {error}") from error
        if isinstance(error, (redis.RedisError, OSError)):  # down, unreachable, slow, or refusing us
            raise StoreUnavailableError(f"redis at {_redact(self.url)}: {error}") from error
        return False


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
