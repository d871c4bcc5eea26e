"""Which engine replica serves a request: prefix affinity, bounded by load.

A replica that recently served a prompt with the same leading blocks likely still holds their
KV (the prefix cache), so a request goes back to it unless that replica has more than `slack`
requests in flight beyond the least loaded one; otherwise to the least loaded replica. The
affinity table maps the prefix cache's chained keys of a prompt's first blocks
(cluster/prefix_cache/block_hash.py, with the request's cache salt, so two salts never share
affinity, as they never share cached blocks) to the replica that last took them, longest match
first, with the oldest entries dropped past `max_entries`.
"""

from collections import OrderedDict

from specserve.cluster.prefix_cache.block_hash import prefix_block_hashes


class Router:
    def __init__(self, num_replicas: int, block_size: int = 16, max_blocks: int = 8, slack: int = 2,
                 max_entries: int = 100_000):
        for name, value, low in (("num_replicas", num_replicas, 1), ("block_size", block_size, 1),
                                 ("max_blocks", max_blocks, 1), ("slack", slack, 0), ("max_entries", max_entries, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.num_replicas, self.block_size, self.max_blocks = num_replicas, block_size, max_blocks
        self.slack, self.max_entries = slack, max_entries
        self._affinity: OrderedDict[bytes, int] = OrderedDict()

    def prefix_keys(self, prompt_ids: list[int], cache_salt: str = "") -> list[bytes]:
        """The prefix cache's chained keys of the prompt's first full blocks (at most max_blocks)."""
        hashes = prefix_block_hashes(prompt_ids, self.block_size, (cache_salt,), max_blocks=self.max_blocks)
        return [h.digest for h in hashes]

    def choose(self, prompt_ids: list[int], loads: list[int], cache_salt: str = "") -> int:
        """The replica for a prompt, given each replica's requests in flight."""
        if len(loads) != self.num_replicas:
            raise ValueError(f"need {self.num_replicas} loads, got {len(loads)}")
        least = min(range(self.num_replicas), key=lambda r: loads[r])
        keys = self.prefix_keys(prompt_ids, cache_salt)
        chosen = least
        for key in reversed(keys):  # longest known prefix first
            replica = self._affinity.get(key)
            if replica is not None:
                if loads[replica] <= loads[least] + self.slack:
                    chosen = replica
                break
        for key in keys:
            self._affinity[key] = chosen
            self._affinity.move_to_end(key)
        while len(self._affinity) > self.max_entries:
            self._affinity.popitem(last=False)
        return chosen
