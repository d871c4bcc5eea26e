"""Chained block hashes: deterministic across processes, sensitive to everything that decides KV."""

import subprocess
import sys

import pytest

from specserve.cluster.prefix_cache.block_hash import BlockHash, block_hash, prefix_block_hashes

TOKENS = list(range(100, 140))


def test_full_blocks_only_and_chained():
    hashes = prefix_block_hashes(TOKENS, block_size=16)
    assert len(hashes) == 2  # 40 tokens: 2 full blocks, the partial third has no key
    assert hashes[0] == block_hash(None, TOKENS[:16])
    assert hashes[1] == block_hash(hashes[0], TOKENS[16:32])
    assert hashes[1] != block_hash(None, TOKENS[16:32])  # the key names the whole prefix
    assert prefix_block_hashes(TOKENS, 16, max_blocks=1) == hashes[:1]


@pytest.mark.parametrize("change", ["token", "salt", "dtype"])
def test_every_input_changes_the_key(change):
    base = prefix_block_hashes(TOKENS, 16, ("torch.float32", ""))
    tokens, extra = list(TOKENS), ["torch.float32", ""]
    if change == "token":
        tokens[3] += 1
    else:
        extra[1 if change == "salt" else 0] = "tenant-b" if change == "salt" else "torch.bfloat16"
    assert prefix_block_hashes(tokens, 16, tuple(extra))[1] != base[1]


def test_extra_keys_are_length_prefixed():
    assert block_hash(None, [1], ("ab", "c")) != block_hash(None, [1], ("a", "bc"))


def test_same_key_in_another_process():
    code = ("from specserve.cluster.prefix_cache.block_hash import prefix_block_hashes as p;"
            "print(p(list(range(100, 140)), 16, ('x',))[1].hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == prefix_block_hashes(TOKENS, 16, ("x",))[1].hex()


def test_string_form_round_trips():
    h = prefix_block_hashes(TOKENS, 16)[0]
    assert BlockHash.from_hex(h.hex()) == h and len(h.hex()) == 64
    with pytest.raises(ValueError, match="64 hex digits"):
        BlockHash.from_hex("zz")
    with pytest.raises(ValueError, match="32 bytes"):
        BlockHash(b"ab")
