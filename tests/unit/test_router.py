"""Router: prefix affinity while load allows, else the least loaded replica."""

import pytest

from specserve.cluster.prefix_cache.block_hash import prefix_block_hashes
from specserve.scheduler.server.router import Router

A = list(range(100, 140))  # 40 tokens: 2 full blocks of 16
B = list(range(500, 540))


def test_same_prefix_returns_to_its_replica():
    router = Router(3, block_size=16)
    first = router.choose(A, [0, 0, 0])
    assert first == 0  # least loaded, lowest index
    assert router.choose(A + [7, 8], [1, 0, 0]) == first  # load within slack
    assert router.choose(B, [1, 0, 0]) == 1  # a new prefix goes to the least loaded


def test_affinity_gives_way_to_load_beyond_slack():
    router = Router(2, block_size=16, slack=2)
    assert router.choose(A, [0, 0]) == 0
    assert router.choose(A, [2, 0]) == 0
    assert router.choose(A, [3, 0]) == 1  # 3 > 0 + slack
    assert router.choose(A, [0, 0]) == 1  # the prefix follows its latest replica


def test_longest_known_prefix_wins():
    router = Router(2, block_size=16)
    assert router.choose(A[:16], [0, 0]) == 0  # knows block 1 -> 0
    assert router.choose(A[:16] + B[:16], [0, 0]) == 0  # shares block 1 only: back to 0, learns block 2
    assert router.choose(A[:16] + B[:16], [1, 0]) == 0
    assert router.choose(A[:16] + [1] * 16, [0, 1]) == 0


def test_prompts_shorter_than_a_block_go_to_the_least_loaded():
    router = Router(2, block_size=16)
    assert router.prefix_keys(A[:15]) == []
    assert router.choose(A[:15], [1, 0]) == 1
    assert router.choose(A[:15], [0, 1]) == 0


def test_keys_are_chained_and_bounded():
    router = Router(2, block_size=4, max_blocks=3)
    keys = router.prefix_keys(list(range(20)))
    assert len(keys) == 3
    assert router.prefix_keys([9, 9, 9, 9] + list(range(4, 8)))[1] != keys[1]  # depends on the first block


def test_keys_are_the_prefix_caches_block_keys_with_the_salt():
    router = Router(2, block_size=4, max_blocks=3)
    expected = [h.digest for h in prefix_block_hashes(list(range(20)), 4, ("tenant-a",))][:3]
    assert router.prefix_keys(list(range(20)), "tenant-a") == expected
    assert router.prefix_keys(list(range(20)), "tenant-b") != expected


def test_two_salts_never_share_affinity():
    router = Router(2, block_size=16)
    assert router.choose(A, [0, 0], cache_salt="a") == 0
    assert router.choose(A, [1, 0], cache_salt="a") == 0  # same salt: back to its replica
    assert router.choose(A, [1, 0], cache_salt="b") == 1  # same tokens, other salt: the least loaded
    assert router.choose(A, [0, 1], cache_salt="b") == 1  # "b" learned its own replica


def test_affinity_table_is_bounded():
    router = Router(2, block_size=4, max_entries=10)
    for i in range(50):
        router.choose([i] * 8, [0, 0])
    assert len(router._affinity) == 10


@pytest.mark.parametrize("kwargs", [{"num_replicas": 0}, {"num_replicas": 1, "block_size": 0},
                                    {"num_replicas": 1, "slack": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Router(**kwargs)


def test_loads_must_match_the_replicas():
    with pytest.raises(ValueError, match="need 2 loads"):
        Router(2).choose(A, [0])
