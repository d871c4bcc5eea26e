"""Exact acceptance on hand-built trees, and committing the accepted path's KV."""

import torch

from specserve.workers.engine.sampler import race
from specserve.workers.engine.kv_cache import BlockTable, KVCacheConfig, PagedKVCache
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.verify import verify_greedy, verify_sampling

#   r ─ a(5) ─ c(7)
#     └ b(6) ─ d(8) ─ e(9)
TREE = DraftTree([1, 5, 6, 7, 8, 9], [-1, 0, 0, 1, 2, 4])


def test_full_accept_plus_bonus():
    # target argmax at r, a, b, c, d, e
    acc = verify_greedy(TREE, [6, 0, 8, 0, 9, 4])
    assert acc.path == [0, 2, 4, 5] and acc.tokens == [6, 8, 9, 4] and acc.num_accepted == 3


def test_early_reject_gives_the_target_token():
    acc = verify_greedy(TREE, [3, 7, 8, 0, 0, 0])
    assert acc.path == [0] and acc.tokens == [3] and acc.num_accepted == 0


def test_second_branch_then_stop():
    acc = verify_greedy(TREE, [5, 2, 8, 0, 0, 0])  # a accepted, then target wants 2, not c(7)
    assert acc.path == [0, 1] and acc.tokens == [5, 2]


def test_root_only_tree_is_plain_decoding():
    acc = verify_greedy(DraftTree.root_only(1), [42])
    assert acc.path == [0] and acc.tokens == [42]


def noise_of(seed: int, depths: int = 6, vocab: int = 10) -> torch.Tensor:
    return torch.empty(depths, vocab).exponential_(generator=torch.Generator().manual_seed(seed))


def test_sampling_accepts_a_sure_draft():
    p = torch.zeros(6, 10)
    p[0, 6], p[2, 8], p[4, 9], p[5, 3] = 1.0, 1.0, 1.0, 1.0  # the target is certain of b, d, e, then 3
    acc = verify_sampling(TREE, lambda n: p[n], noise_of(0).__getitem__)
    assert acc.tokens == [6, 8, 9, 3]


def test_sampled_tokens_are_the_plain_samplers_whatever_the_tree():
    """Speculation emits, token for token, what sampling one token per step emits with the same
    noise: for random targets, random trees, and trees drawn from the noise itself."""
    gen = torch.Generator().manual_seed(3)
    vocab, depth = 6, 5
    for trial in range(300):
        # a toy target Markov in the last token: p[t] = p(. | t); a sharp one, so drafts get accepted
        p = torch.softmax(3 * torch.randn(vocab, vocab, generator=gen), dim=-1)
        noise = noise_of(trial, depth + 1, vocab)
        root = trial % vocab
        plain, last = [], root
        for d in range(depth + 1):  # the plain sampler: one race per position
            last = race(p[last], noise[d])
            plain.append(last)
        tokens, parents = [root], [-1]
        for _ in range(int(torch.randint(0, 12, (), generator=gen))):  # a random tree
            parent = int(torch.randint(0, len(tokens), (), generator=gen))
            if tree_depth(parents, parent) < depth:
                tokens.append(int(torch.randint(0, vocab, (), generator=gen)))
                parents.append(parent)
        tree = DraftTree(tokens, parents)
        acc = verify_sampling(tree, lambda n: p[tree.tokens[n]], noise.__getitem__)
        assert acc.tokens == plain[: len(acc.tokens)], trial


def tree_depth(parents: list[int], node: int) -> int:
    return 0 if parents[node] < 0 else 1 + tree_depth(parents, parents[node])


def test_commit_moves_the_accepted_path_and_frees_the_rest():
    kv = PagedKVCache(KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=8, block_size=4))
    table = BlockTable()
    slots = kv.append(table, 5 + 6)  # a 5-token prefix, then the 6 tree nodes
    for layer in range(2):  # key of token i = (layer, i)
        values = torch.tensor([[[layer, i]] for i in range(11)], dtype=torch.float32)
        kv.write(layer, slots, values, -values)
    kv.compact(table, 5, [0, 2, 5])  # path r, b, e
    assert table.num_tokens == 8 and len(table.blocks) == 2
    kept = kv.slots(table, 0, 8)
    for layer in range(2):
        assert kv.k[layer, kept, 0, 1].tolist() == [0, 1, 2, 3, 4, 5, 7, 10]
        assert kv.v[layer, kept, 0, 1].tolist() == [0, -1, -2, -3, -4, -5, -7, -10]
    assert kv.allocator.num_free == 6
