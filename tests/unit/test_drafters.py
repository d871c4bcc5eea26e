"""Drafters on hand-made state: Token Recycling's matrix, prompt lookup, combinations."""

import json

import pytest
import torch

from specserve.workers.engine.sequence import SamplingParams, Sequence
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.methods import SpecConfig, build_drafter, parse_method
from specserve.workers.spec.ngram import NgramDrafter
from specserve.workers.spec.recycling import RecyclingDrafter, default_template, find_template, shipped_templates
from specserve.workers.spec.tree_template import TemplateError, load_template, make_template
from specserve.workers.spec.verify import Acceptance


def seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def recycling_with(rows: dict[int, list[int]], paths) -> RecyclingDrafter:
    drafter = RecyclingDrafter(vocab_size=20, template=make_template("t", paths, top_k=3), k=3)
    for token, row in rows.items():
        drafter.adjacency[token] = torch.tensor(row)
        drafter.known[token] = True
    return drafter


def test_recycling_reads_the_tree_from_the_matrix_along_the_template():
    # M[1] = [2, 3, 4], M[2] = [5, 6, 7]; template [[0], [1], [0, 0], [0, 1]]:
    #   1 ─ 2 ─ 5
    #     │   └ 6
    #     └ 3
    drafter = recycling_with({1: [2, 3, 4], 2: [5, 6, 7]}, [[0], [1], [0, 0], [0, 1]])
    tree = drafter.propose(seq([9, 1]), max_nodes=10)
    assert tree.tokens == [1, 2, 3, 5, 6]
    assert tree.parents == [-1, 0, 0, 1, 1]


def test_recycling_does_not_expand_unseen_tokens():
    drafter = recycling_with({1: [2, 3, 4]}, [[0], [1], [0, 0]])  # M[2] never written
    assert drafter.propose(seq([1]), 10).tokens == [1, 2, 3]
    assert drafter.propose(seq([7]), 10).tokens == [7]  # unseen root: nothing to draft


def test_recycling_respects_max_nodes():
    drafter = recycling_with({1: [2, 3, 4], 2: [5, 6, 7]}, [[0], [1], [0, 0], [0, 1]])
    assert drafter.propose(seq([1]), max_nodes=3).tokens == [1, 2, 3]


def test_observe_writes_every_node_rejected_ones_too():
    drafter = recycling_with({}, [[0]])
    tree = DraftTree([1, 2, 3], [-1, 0, 0])
    logits = torch.zeros(3, 20)
    logits[0, [4, 5, 6]] = torch.tensor([3.0, 2.0, 1.0])
    logits[1, [7, 8, 9]] = torch.tensor([3.0, 2.0, 1.0])
    logits[2, [10, 11, 12]] = torch.tensor([3.0, 2.0, 1.0])  # node 2 was rejected
    drafter.observe(seq([1]), tree, logits, Acceptance([0, 1], [2, 7]))
    assert drafter.adjacency[[1, 2, 3]].tolist() == [[4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert drafter.known[[1, 2, 3]].all()


def test_default_template_is_the_papers_tree():
    template = default_template()
    assert template.num_nodes == 80 and template.depth == 6
    assert {"token_recycling_2.2.2", "token_recycling_32", "token_recycling_16"} <= set(shipped_templates())
    assert find_template("token_recycling_16").num_nodes == 16


@pytest.mark.parametrize(
    "paths,message",
    [
        ([[0], [0]], "listed twice"),
        ([[0, 0], [0]], "before its parent"),
        ([[8]], r"ranks in \[0, 8\)"),
        ([[]], "non-empty"),
    ],
)
def test_malformed_templates_are_rejected(tmp_path, paths, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"paths": paths}))
    with pytest.raises(TemplateError, match=message):
        load_template(path, top_k=8)


def test_template_file_that_is_not_json(tmp_path):
    (tmp_path / "t.json").write_text("{oops")
    with pytest.raises(TemplateError, match="cannot read"):
        load_template(tmp_path / "t.json", top_k=8)
    with pytest.raises(ValueError, match="neither shipped"):
        SpecConfig("recycling", template=str(tmp_path / "missing.json"))


def test_ngram_longest_match_most_recent_first():
    # history: 1 2 3 9 | 2 3 8 | 5 2 3   suffix "2 3" occurs twice; most recent continuation first
    drafter = NgramDrafter(max_ngram=3, branch_len=2, max_branches=2)
    tree = drafter.propose(seq([1, 2, 3, 9, 2, 3, 8, 5, 2, 3]), max_nodes=10)
    assert tree.tokens == [3, 8, 5, 9, 2]
    assert tree.parents == [-1, 0, 1, 0, 3]


def test_ngram_without_a_match_drafts_nothing():
    assert NgramDrafter().propose(seq([1, 2, 3, 4]), 10).tokens == [4]


def test_ngram_never_matches_the_suffix_itself():
    assert NgramDrafter(min_ngram=2).propose(seq([5, 6]), 10).tokens == [6]


def test_combined_drafter_merges_both_trees():
    drafter = build_drafter(SpecConfig("ngram+recycling"), vocab_size=20)
    assert drafter.name == "ngram+recycling"
    recycler = drafter.drafters[1]
    recycler.adjacency[3] = torch.tensor([7, 8, 9, 0, 0, 0, 0, 0])
    recycler.known[3] = True
    tree = drafter.propose(seq([1, 2, 3, 4, 2, 3]), max_nodes=5)
    # ngram continues "2 3" with "4 2 3"; recycling adds M[3]'s best, 7, as a sibling of 4
    assert tree.tokens == [3, 4, 2, 3, 7]
    assert tree.parents == [-1, 0, 1, 2, 0]


@pytest.mark.parametrize("method,message", [("foo", "unknown spec method"), ("none+ngram", "cannot be combined"),
                                            ("ngram+ngram", "twice")])
def test_bad_method_names(method, message):
    with pytest.raises(ValueError, match=message):
        parse_method(method)


def test_model_method_needs_a_draft_model():
    with pytest.raises(ValueError, match="--draft-model"):
        SpecConfig("model")
    with pytest.raises(ValueError, match="only used by"):
        SpecConfig("ngram", draft_model="x")
