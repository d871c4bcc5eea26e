"""Static draft-tree templates (Token Recycling's imbalanced trees), as validated data.

A template is a list of paths; a path lists, for each level, which candidate of the parent
to take (0 = the parent's most likely next token). The root is implicit. Example:
    [[0], [1], [0, 0]]  ->  root ─ c0 ─ c0c0
                                 └ c1
"""

import json
from dataclasses import dataclass
from pathlib import Path


class TemplateError(ValueError):
    """A tree template is malformed; str() says which path and why."""


@dataclass(frozen=True)
class TreeTemplate:
    name: str
    paths: tuple[tuple[int, ...], ...]  # in an order where every path's parent comes first
    parents: tuple[int, ...]  # node i + 1 is paths[i]; parents[i + 1] is its parent node (0 = root)
    ranks: tuple[int, ...]  # ranks[i + 1] = paths[i][-1], the candidate index taken at the parent

    @property
    def num_nodes(self) -> int:
        """Draft nodes (the root not counted)."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(map(len, self.paths), default=0)

    def prefix(self, num_nodes: int) -> "TreeTemplate":
        """The first num_nodes paths (still a tree: parents come first)."""
        return make_template(f"{self.name}[:{num_nodes}]", self.paths[:num_nodes], max(self.ranks, default=0) + 1)


def make_template(name: str, paths, top_k: int) -> TreeTemplate:
    """Validates: paths non-empty lists of ranks in [0, top_k), unique, each parent listed before."""
    index: dict[tuple[int, ...], int] = {(): 0}
    parents, ranks = [-1], [0]
    for i, path in enumerate(paths):
        path = tuple(path) if isinstance(path, (list, tuple)) else None
        if not path or not all(isinstance(r, int) and 0 <= r < top_k for r in path):
            raise TemplateError(f"{name}: path {i} must be a non-empty list of ranks in [0, {top_k}), got {paths[i]!r}")
        if path in index:
            raise TemplateError(f"{name}: path {i} {list(path)} is listed twice")
        if path[:-1] not in index:
            raise TemplateError(f"{name}: path {i} {list(path)} comes before its parent {list(path[:-1])}")
        index[path] = len(parents)
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
    return TreeTemplate(name, tuple(tuple(p) for p in paths), tuple(parents), tuple(ranks))


def load_template(path: Path, top_k: int) -> TreeTemplate:
    """Reads {"name": ..., "paths": [[0], [1], [0, 0], ...]} and validates it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TemplateError(f"cannot read tree template {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("paths"), list) or not data["paths"]:
        raise TemplateError(f"{path}: expected an object with a non-empty 'paths' list")
    return make_template(str(data.get("name", Path(path).stem)), data["paths"], top_k)
