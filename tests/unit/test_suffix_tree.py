"""The depth-bounded suffix trie on hand-drawn texts: counts, matches, draft trees, eviction."""

import random

import pytest

from specserve.workers.spec.suffix_tree import SharedSuffixTrees, SuffixConfig, SuffixTree


def tree_of(tokens, max_depth=4) -> SuffixTree:
    tree = SuffixTree(max_depth)
    tree.extend(tokens)
    return tree


def test_counts_of_a_hand_drawn_trie():
    # text "1 2 1 3", max_depth 2:      s       count  total
    #   root ─ 1 ─ 2                    (1,)      2      2
    #        │   └ 3                    (1, 2)    1      0
    #        ├ 2 ─ 1                    (1, 3)    1      0
    #        └ 3                        (2,)      1      1
    #                                   (2, 1)    1      0
    #                                   (3,)      1      0
    tree = tree_of([1, 2, 1, 3], max_depth=2)
    assert list(tree.items()) == [((1,), 2, 2), ((1, 2), 1, 0), ((1, 3), 1, 0),
                                  ((2,), 1, 1), ((2, 1), 1, 0), ((3,), 1, 0)]
    assert tree.root.total == 4 and tree.num_nodes == 7  # root + 6


def test_longest_followed_suffix_is_matched():
    # text 5 1 2 3 | 9 2 3 | 7 1 2 3: "1 2 3" occurred before (followed by 9), "7 1 2 3" did not
    tree = tree_of([5, 1, 2, 3, 9, 2, 3, 7, 1, 2, 3], max_depth=6)
    length, node = tree.match([7, 1, 2, 3], max_match=5)
    assert length == 3 and node.count == 2 and node.total == 1  # the open occurrence is not followed yet
    assert tree.match([7, 1, 2, 3], max_match=2)[0] == 2  # capped
    assert tree.match([4], max_match=5) == (0, None)


def test_draft_tree_is_grown_best_first_by_count_ratio():
    # text 1 2 3 5 | 1 2 3 5 | 1 2 4 | 1 2, context "1 2" (followed 3 times), depth <= 1 * 2:
    #   "1 2" ─ 3 (2/3) ─ 5 (2/3 * 2/2)
    #         └ 4 (1/3) ─ 1 (1/3 * 1/1)
    tree = tree_of([1, 2, 3, 5, 1, 2, 3, 5, 1, 2, 4, 1, 2], max_depth=8)
    config = SuffixConfig(max_depth=8, max_match=2, spec_factor=1.0, min_prob=0.1)
    spec = tree.speculate([1, 2], max_nodes=10, config=config)
    assert spec.match_len == 2
    assert spec.tree.tokens == [2, 3, 5, 4, 1]
    assert spec.tree.parents == [-1, 0, 1, 0, 3]
    assert spec.chances == pytest.approx([1, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert spec.score == pytest.approx(2.0)
    assert tree.speculate([1, 2], max_nodes=3, config=config).tree.tokens == [2, 3, 5]


def test_unlikely_children_are_not_drafted():
    tree = tree_of([1, 2, 3, 5, 1, 2, 3, 5, 1, 2, 4, 1, 2], max_depth=8)
    config = SuffixConfig(max_depth=8, max_match=2, spec_factor=1.0, min_prob=0.5)
    assert tree.speculate([1, 2], 10, config).tree.tokens == [2, 3, 5]  # 4 (1/3) is below 0.5


def test_draft_depth_follows_the_match_length():
    text = list(range(10, 40))  # no repeats: every match continues with one token at chance 1
    tree = tree_of(text + [0] + text[:6], max_depth=24)
    config = SuffixConfig(max_depth=24, max_match=6, max_spec=8, spec_factor=1.0)
    for k in range(1, 7):  # the last k tokens 10+6-k .. 15 matched: depth k
        spec = tree.speculate([0] + text[6 - k:6], 20, config)
        assert spec.match_len == k and max(spec.tree.depths) == k
        assert spec.tree.tokens[1:] == text[6:6 + k]
    deep = SuffixConfig(max_depth=24, max_match=6, max_spec=8, spec_factor=4.0)
    assert max(tree.speculate(text[:6], 20, deep).tree.depths) == 8  # max_spec caps it


def test_no_match_drafts_nothing():
    spec = tree_of([1, 2, 3]).speculate([7], 10, SuffixConfig(max_depth=4, max_match=2))
    assert spec.tree.tokens == [7] and spec.match_len == 0 and spec.score == 0


def test_extending_in_pieces_equals_building_at_once():
    rng = random.Random(0)
    text = [rng.randrange(5) for _ in range(200)]
    whole = tree_of(text, max_depth=6)
    pieces = SuffixTree(6)
    cut = 0
    while cut < len(text):
        step = rng.randrange(1, 9)
        pieces.extend(text[cut:cut + step])
        cut += step
    inserted = SuffixTree(6)
    inserted.insert(text)
    assert list(pieces.items()) == list(whole.items()) == list(inserted.items())
    assert pieces.num_nodes == whole.num_nodes


def test_remove_undoes_insert_exactly():
    rng = random.Random(1)
    a, b = [rng.randrange(4) for _ in range(60)], [rng.randrange(4) for _ in range(50)]
    both = SuffixTree(5)
    both.insert(a)
    both.insert(b)
    both.remove(a)
    only_b = SuffixTree(5)
    only_b.insert(b)
    assert sorted(both.items()) == sorted(only_b.items()) and both.num_nodes == only_b.num_nodes  # child order aside
    with pytest.raises(ValueError, match="not inserted"):
        only_b.remove([99])


def test_shared_trees_evict_oldest_texts_within_the_node_cap():
    shared = SharedSuffixTrees(max_depth=4, max_nodes=100)
    texts = [[100 * i + j for j in range(10)] for i in range(8)]  # distinct tokens: 4*10 - 6 = 34 nodes each
    for text in texts:
        shared.add("", text)
        assert shared.num_nodes <= 100
    tree = shared.tree("")
    assert shared.num_texts == 2 and tree.count(texts[-1][:4]) == 1 and tree.count(texts[-2][:4]) == 1
    assert tree.count(texts[0][:1]) == 0  # evicted whole
    shared.add("", list(range(1000, 1100)))  # longer than 100 // 4 tokens: only its last 25 are kept
    assert shared.num_texts == 1 and shared.tree("").count([1074]) == 0 and shared.tree("").count([1075]) == 1


def test_shared_trees_are_separate_per_salt():
    shared = SharedSuffixTrees(max_depth=4, max_nodes=1000)
    shared.add("tenant-a", [1, 2, 3])
    assert shared.tree("tenant-b") is None and shared.tree("tenant-a").count([1, 2, 3]) == 1
    shared.add("tenant-b", [1, 2, 4])
    assert shared.tree("tenant-a").count([1, 2, 4]) == 0


@pytest.mark.parametrize("fields,message", [
    ({"max_match": 24}, "max_match < max_depth"), ({"max_spec": 0}, "max_spec"),
    ({"min_prob": 0}, "min_prob"), ({"shared_max_nodes": 3}, "shared_max_nodes"),
])
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SuffixConfig(**fields)
