"""A draft tree: node 0 is the root (the last committed token), other nodes are draft tokens.

    root ─ a ─ c        tokens  = [root, a, b, c]
         └ b            parents = [  -1, 0, 0, 1]

Nodes are in topological order (a parent before its children).
"""

from dataclasses import dataclass, field

from specserve.kernels.tree import check_parents, tree_depths


@dataclass(frozen=True)
class DraftTree:
    tokens: list[int]  # [n] token of each node; tokens[0] is the root
    parents: list[int]  # [n] parent node of each node; parents[0] == -1
    depths: list[int] = field(init=False)  # [n] distance from the root

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        check_parents(self.parents)
        object.__setattr__(self, "depths", tree_depths(self.parents))

    @classmethod
    def root_only(cls, root: int) -> "DraftTree":
        return cls([root], [-1])

    @property
    def size(self) -> int:
        """Nodes including the root: the slots this tree takes in a verify forward."""
        return len(self.tokens)

    @property
    def num_drafted(self) -> int:
        return len(self.tokens) - 1

    def limit_depth(self, max_depth: int) -> "DraftTree":
        """The nodes at most max_depth levels below the root."""
        if max(self.depths) <= max_depth:
            return self
        return self.select([i for i, d in enumerate(self.depths) if d <= max_depth])

    def select(self, keep: list[int]) -> "DraftTree":
        """The subtree of the nodes in keep (increasing, root included, parents kept)."""
        new_index = {old: new for new, old in enumerate(keep)}
        if keep[:1] != [0] or any(self.parents[i] not in new_index for i in keep[1:]):
            raise ValueError("a selection must keep the root and every kept node's parent")
        parents = [-1] + [new_index[self.parents[i]] for i in keep[1:]]
        return DraftTree([self.tokens[i] for i in keep], parents)

    def children(self) -> list[list[int]]:
        """children()[i] = the child nodes of node i, in node order."""
        kids: list[list[int]] = [[] for _ in self.tokens]
        for i, p in enumerate(self.parents[1:], 1):
            kids[p].append(i)
        return kids

    def sibling_ranks(self) -> list[int]:
        """Each node's place among its parent's children (0 = first); the root has 0."""
        ranks = [0] * self.size
        for kids in self.children():
            for r, c in enumerate(kids):
                ranks[c] = r
        return ranks


def merge_trees(trees: list[DraftTree], max_nodes: int | None = None) -> DraftTree:
    """Union of trees with the same root, as a trie: siblings with the same token become one.

    Nodes are taken tree by tree in each tree's order, stopping at max_nodes (root included).
    """
    root = trees[0].tokens[0]
    if any(t.tokens[0] != root for t in trees):
        raise ValueError("merged trees must share their root token")
    tokens, parents = [root], [-1]
    child_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node in the merged tree
    for tree in trees:
        where = [0] * tree.size  # node of `tree` -> node of the merge
        for i in range(1, tree.size):
            parent = where[tree.parents[i]]
            key = (parent, tree.tokens[i])
            if parent < 0 or (key not in child_of and max_nodes is not None and len(tokens) >= max_nodes):
                where[i] = -1  # cut off, and so is its subtree
                continue
            if key not in child_of:
                child_of[key] = len(tokens)
                tokens.append(tree.tokens[i])
                parents.append(parent)
            where[i] = child_of[key]
    return DraftTree(tokens, parents)
