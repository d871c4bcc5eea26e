"""Draft trees as data: masks, depths, merging, pruning."""

import pytest
import torch

from specserve.kernels.tree import check_parents, tree_attention_mask, tree_depths
from specserve.workers.spec.draft_tree import DraftTree, merge_trees

#   0 ─ 1 ─ 3
#     └ 2 ─ 4 ─ 5
PARENTS = [-1, 0, 0, 1, 2, 4]


def test_depths_and_mask_of_a_drawn_tree():
    assert tree_depths(PARENTS) == [0, 1, 1, 2, 2, 3]
    mask = tree_attention_mask(PARENTS).int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 1],
    ]


@pytest.mark.parametrize("parents", [[], [0], [-1, 1], [-1, 0, 3, 0]])
def test_parents_must_form_a_rooted_topological_tree(parents):
    with pytest.raises(ValueError):
        check_parents(parents)


def test_children_and_sibling_ranks():
    tree = DraftTree([10, 11, 12, 13, 14, 15], PARENTS)
    assert tree.children() == [[1, 2], [3], [4], [], [5], []]
    assert tree.sibling_ranks() == [0, 0, 1, 0, 0, 0]
    assert tree.num_drafted == 5 and tree.size == 6


def test_tokens_and_parents_must_agree():
    with pytest.raises(ValueError, match="2 tokens but 3 parents"):
        DraftTree([1, 2], [-1, 0, 0])


def test_merge_dedups_siblings_as_a_trie():
    # a: r ─ 5 ─ 6        b: r ─ 5 ─ 7        merged: r ─ 5 ─ 6
    #                        └ 8                         │   └ 7
    #                                                    └ 8
    a = DraftTree([1, 5, 6], [-1, 0, 1])
    b = DraftTree([1, 5, 7, 8], [-1, 0, 1, 0])
    merged = merge_trees([a, b])
    assert merged.tokens == [1, 5, 6, 7, 8]
    assert merged.parents == [-1, 0, 1, 1, 0]


def test_merge_respects_max_nodes_and_drops_orphans():
    a = DraftTree([1, 5, 6], [-1, 0, 1])
    b = DraftTree([1, 9, 10], [-1, 0, 1])
    merged = merge_trees([a, b], max_nodes=4)
    assert merged.tokens == [1, 5, 6, 9]  # 10 would be the 5th node
    assert merge_trees([a, b], max_nodes=2).tokens == [1, 5]  # 6's subtree and 9's cut


def test_merge_needs_a_common_root():
    with pytest.raises(ValueError, match="root"):
        merge_trees([DraftTree([1], [-1]), DraftTree([2], [-1])])


def test_limit_depth_and_select():
    tree = DraftTree([10, 11, 12, 13, 14, 15], PARENTS)
    shallow = tree.limit_depth(1)
    assert shallow.tokens == [10, 11, 12] and shallow.parents == [-1, 0, 0]
    picked = tree.select([0, 2, 4])
    assert picked.tokens == [10, 12, 14] and picked.parents == [-1, 0, 1]
    with pytest.raises(ValueError, match="parent"):
        tree.select([0, 4])  # 4's parent 2 dropped
