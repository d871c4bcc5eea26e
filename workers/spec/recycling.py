"""Token Recycling (Luo et al., arXiv 2408.08696): recycle the target's own candidate tokens.

An adjacency matrix M [V, k] holds, for every token x, the k tokens the target ranked
highest right after x the last time x was in a verified tree. It lives as long as the
engine (hot start across requests). A draft tree is read from M breadth-first along a
static template; after each verification, for every tree node x (rejected branches too),
M[x] = topk(target logits at x, k) in one scatter.
"""

from importlib import resources
from pathlib import Path

import torch

from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.tree_template import TemplateError, TreeTemplate, load_template
from specserve.workers.spec.verify import Acceptance

TOP_K = 8


DEFAULT_TEMPLATE = "token_recycling_2.2.2"  # the paper's default tree: 80 nodes over 6 levels


def shipped_templates() -> list[str]:
    folder = resources.files("specserve.workers.spec") / "templates"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def find_template(name_or_path: str = DEFAULT_TEMPLATE) -> TreeTemplate:
    """A shipped template by name (token_recycling_2.2.2, _32, _16) or a JSON file's path."""
    if name_or_path in shipped_templates():
        path = Path(str(resources.files("specserve.workers.spec") / "templates" / f"{name_or_path}.json"))
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise TemplateError(f"tree template {name_or_path!r} is neither shipped ({', '.join(shipped_templates())}) nor a file")
    return load_template(path, TOP_K)


def default_template() -> TreeTemplate:
    return find_template(DEFAULT_TEMPLATE)


class RecyclingDrafter(Drafter):
    name = "recycling"

    def __init__(self, vocab_size: int, template: TreeTemplate | None = None, k: int = TOP_K):
        self.template = template or default_template()
        if max(self.template.ranks) >= k:
            raise ValueError(f"template {self.template.name} uses candidate rank {max(self.template.ranks)} >= k={k}")
        self.k = k
        self.adjacency = torch.zeros(vocab_size, k, dtype=torch.long)  # M [V, k]
        self.known = torch.zeros(vocab_size, dtype=torch.bool)  # rows of M written at least once

    def propose(self, seq: Sequence, max_nodes: int) -> DraftTree:
        root = seq.token_ids[-1]
        t = self.template
        tokens, parents = [root], [-1]
        where = [0] + [-1] * t.num_nodes  # template node -> tree node (-1: not drafted)
        rows: dict[int, list[int] | None] = {}
        for node in range(1, min(t.num_nodes + 1, max_nodes)):
            parent = where[t.parents[node]]
            if parent < 0:
                continue
            row = self._row(tokens[parent], rows)
            if row is None:
                continue
            where[node] = len(tokens)
            tokens.append(row[t.ranks[node]])
            parents.append(parent)
        return DraftTree(tokens, parents)

    def observe(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, acceptance: Acceptance) -> None:
        nodes = torch.tensor(tree.tokens, dtype=torch.long)  # (n,)
        self.adjacency[nodes] = logits.topk(self.k, dim=-1).indices  # (n, k)
        self.known[nodes] = True

    def _row(self, token: int, cache: dict[int, list[int] | None]) -> list[int] | None:
        if token not in cache:
            cache[token] = self.adjacency[token].tolist() if self.known[token] else None
        return cache[token]
