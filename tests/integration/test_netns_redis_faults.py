"""Redis faults on a lab of network namespaces, with real parts: redis-server on the redis host
at its own address, the engine (tiny model, Redis-backed shared prefix cache) on the head host.

Each fault lands while a store call is under way: the driver holds the call, the test partitions
Redis (pulls its cable) or kills it with SIGKILL, then releases the call. Requests must complete
with the greedy reference's tokens (a miss, never an error or a wrong block), and once Redis is
back the cache must serve hits again. Each case prints its figures (run with -s to see them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from specserve.bench.lab_cluster import LabRedis
from specserve.cluster.netns_lab import NetnsLab

from tests.helpers.tiny_folder import GreedyReference

from .netns_fixture import EngineDriver

NEW_TOKENS = 8
DURING_FAULT = 3  # requests sent while the fault lasts
RECOVER_LIMIT_S = 60.0  # the cache's retry_s is 5 s: far past it, recovery has failed
POLL_S = 0.2


@pytest.fixture(scope="module")
def reference(lab_model_folder: str) -> GreedyReference:
    return GreedyReference(lab_model_folder)


def prompt(case: int, n: int) -> list[int]:
    """25 tokens (6 full blocks of 4 before the last), distinct for each (case, n)."""
    return [2 + (case * 31 + n * 7 + i * 3) % 90 for i in range(25)]


@dataclass
class Figures:
    """What one fault did to the requests sent around it."""

    fault: str
    sent: int = 0
    completed: int = 0  # finished with exactly the reference's tokens
    failed: int = 0  # an error reply, or tokens other than the reference's
    lost: int = 0  # tokens short of max_new_tokens
    duplicated: int = 0  # tokens past max_new_tokens
    held_request_s: float | None = None  # the request whose fetch met the fault (a write is off its path)
    recover_s: float = 0.0  # Redis back -> the first request served from the cache

    def record(self, reply: dict, want: list[int]) -> None:
        self.sent += 1
        out = reply.get("output_ids")
        if reply["event"] != "done" or out != want:
            self.failed += 1
        else:
            self.completed += 1
        if out is not None:
            self.lost += max(0, len(want) - len(out))
            self.duplicated += max(0, len(out) - len(want))


class Partition:
    """Redis's host loses its cable: packets vanish, calls time out (the store's 1 s timeout)."""

    name = "partition"

    def __init__(self, lab: NetnsLab, redis: LabRedis):
        self.host = lab["redis"]

    def inject(self) -> None:
        self.host.disconnect()

    def heal(self) -> None:
        self.host.reconnect()


class Restart:
    """redis-server killed with SIGKILL, then started again (empty: no persistence)."""

    name = "restart"

    def __init__(self, lab: NetnsLab, redis: LabRedis):
        self.redis = redis

    def inject(self) -> None:
        self.redis.kill9()

    def heal(self) -> None:
        self.redis.start()  # returns once it answers PING


class Case:
    """One driver, one reference, one Figures: sends requests and scores each reply."""

    def __init__(self, driver: EngineDriver, reference: GreedyReference, figures: Figures):
        self.driver, self.reference, self.figures = driver, reference, figures

    def send(self, ids: list[int], hold: str | None = None) -> None:
        self.driver.send(op="generate", prompt=ids, max_new_tokens=NEW_TOKENS, hold=hold)

    def score(self, ids: list[int], reply: dict) -> dict:
        self.figures.record(reply, self.reference(ids, NEW_TOKENS))
        return reply

    def generate(self, ids: list[int]) -> dict:
        self.send(ids)
        return self.score(ids, self.driver.reply())

    def flush(self) -> dict:
        self.driver.send(op="flush")
        reply = self.driver.expect("flushed")
        assert reply["ok"], "cache writes did not finish"
        return reply["stats"]


@pytest.mark.parametrize("call", ["get_many", "put_many"], ids=["mid_fetch", "mid_write"])
@pytest.mark.parametrize("fault_type", [Partition, Restart], ids=["partition", "restart"])
def test_redis_fault_mid_call_costs_only_cache_hits(netns_lab, lab_redis, head_driver, reference, fault_type, call):
    fault = fault_type(netns_lab, lab_redis)
    figures = Figures(f"redis {fault.name} mid-{'fetch' if call == 'get_many' else 'write'}")
    case = Case(head_driver, reference, figures)
    seed = 10 * (fault_type is Restart) + (call == "put_many")
    warm, during = prompt(seed, 0), [prompt(seed, n) for n in range(1, 1 + DURING_FAULT)]

    if call == "get_many":  # the held fetch would hit: the cache holds warm's blocks
        case.generate(warm)
        case.flush()
        assert case.generate(warm)["cached_tokens"] > 0, "the cache served no hit before the fault"
    before = case.flush()
    case.send(warm, hold=call)
    if call == "get_many":
        head_driver.expect("held")
    else:  # the write runs after the request: its reply and the held write race
        case.score(warm, head_driver.expect_each("held", "done")["done"])
    fault.inject()
    head_driver.send(op="go")
    if call == "get_many":
        held = case.score(warm, head_driver.reply())
        figures.held_request_s = held["seconds"]
        assert held["cached_tokens"] == 0  # the fetch met the fault: a miss
    for ids in during:
        case.generate(ids)
    faulted = case.flush()
    assert faulted["unavailable"] > before["unavailable"]
    if call == "put_many":
        assert faulted["dropped_writes"] > before["dropped_writes"]

    healed = time.monotonic()
    fault.heal()
    while case.generate(warm).get("cached_tokens", 0) == 0:  # a miss writes warm; the next may hit
        case.flush()
        assert time.monotonic() - healed < RECOVER_LIMIT_S, f"no cache hit {RECOVER_LIMIT_S:.0f}s after the fault"
        time.sleep(POLL_S)  # poll interval
    figures.recover_s = time.monotonic() - healed
    case.generate(prompt(seed, 1 + DURING_FAULT))  # a new prompt: its blocks must be written
    after = case.flush()

    print(f"\n{figures}")
    assert figures.failed == 0 and figures.completed == figures.sent
    assert figures.lost == 0 and figures.duplicated == 0
    assert after["corrupt_blocks"] == 0
    assert after["written_blocks"] > faulted["written_blocks"]  # writes succeed again
