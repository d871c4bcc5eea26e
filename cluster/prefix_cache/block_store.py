"""Where shared prefix-cache values live: a small key-value interface and an in-memory store.

`RedisBlockStore` (redis_store.py) is the real one; `MemoryBlockStore` stands in for it in unit
tests (tests/integration/test_redis_prefix_cache.py runs the same checks against redis-server).
"""

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator


class StoreUnavailableError(RuntimeError):
    """The store did not answer (down, unreachable or too slow)."""


class BlockStore(ABC):
    @abstractmethod
    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The value of each key, None where a key is absent; one round trip.
        Raises StoreUnavailableError when the store does not answer in time."""

    @abstractmethod
    def put_many(self, items: dict[str, bytes], ttl_s: int | None = None) -> None:
        """Stores every item (expiring after ttl_s seconds when given); one round trip."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Removes the keys; absent keys are ignored."""

    @abstractmethod
    def scan(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, value size in bytes) of every key starting with prefix, in no order."""


class MemoryBlockStore(BlockStore):
    """A dict with LRU eviction past max_bytes (like Redis's allkeys-lru); for tests.
    `down = True` makes every call raise StoreUnavailableError."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.down = False
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def get_many(self, keys):
        self._check()
        values = [self._data.get(k) for k in keys]
        for k, value in zip(keys, values):
            if value is not None:
                self._data.move_to_end(k)
        return values

    def put_many(self, items, ttl_s=None):
        self._check()
        for k, value in items.items():
            self._data[k] = value
            self._data.move_to_end(k)
        while self.max_bytes is not None and sum(map(len, self._data.values())) > self.max_bytes:
            self._data.popitem(last=False)

    def delete(self, keys):
        self._check()
        for k in keys:
            self._data.pop(k, None)

    def scan(self, prefix):
        self._check()
        return iter([(k, len(v)) for k, v in self._data.items() if k.startswith(prefix)])

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("memory store is down")
