"""Suffix tries bounded by depth: how often every short substring of some texts occurred and
what followed it, and draft trees grown from them (SuffixDecoding, Oliaro et al., arXiv 2411.04975).

For texts T1, T2, ... a `SuffixTree` holds every substring s with |s| <= max_depth:
    count(s) = occurrences of s in the texts;
    total(s) = occurrences of s followed by a token, = the sum of its children's counts
               (0 at depth max_depth, whose children are not kept);
so count(s + x) / total(s) estimates P(next token = x | the text ends in s).

    text "1 2 1 3", max_depth 2:        s      count  total
        root ─ 1 ─ 2                    (1,)     2      2
             │   └ 3                    (1, 2)   1      0   (depth 2: not extended)
             ├ 2 ─ 1                    (2,)     1      1
             └ 3                        (3,)     1      0   (the text ends)
                                        root: total 4, one per token

A text is either inserted whole (`insert`, undone exactly by `remove`: the shared trees evict
whole texts) or grows token by token (`extend`: one request's prompt + output so far). Adding a
token costs max_depth dictionary steps, so a tree has at most max_depth nodes per token.

`speculate(context)` matches the longest suffix of the context (at most max_match tokens) that
was followed before, then grows a draft tree best-first from that node: a candidate's chance is
the product of count ratios along its path, nodes below min_prob are not drafted, and the
depth is at most spec_factor * match length (a longer match is more trustworthy, so drafts
go deeper), max_spec, and what the trie holds below the match.
"""

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from specserve.workers.spec.draft_tree import DraftTree


@dataclass(frozen=True)
class SuffixConfig:
    max_depth: int = 24  # longest substring counted
    max_match: int = 8  # longest context suffix matched (< max_depth leaves room to draft below it)
    max_spec: int = 16  # deepest draft
    spec_factor: float = 2.0  # draft depth <= spec_factor * match length
    min_prob: float = 0.1  # nodes with a smaller estimated chance are not drafted
    shared_max_nodes: int = 1 << 18  # all shared trees together (about 60 MB of Python objects)

    def __post_init__(self):
        if not 1 <= self.max_match < self.max_depth:
            raise ValueError(f"need 1 <= max_match < max_depth, got max_match={self.max_match}, "
                             f"max_depth={self.max_depth}")
        if self.max_spec < 1 or self.spec_factor <= 0:
            raise ValueError(f"max_spec must be >= 1 and spec_factor > 0, got {self.max_spec}, {self.spec_factor}")
        if not 0 < self.min_prob <= 1:
            raise ValueError(f"min_prob must be in (0, 1], got {self.min_prob}")
        if self.shared_max_nodes < self.max_depth:
            raise ValueError(f"shared_max_nodes must be >= max_depth ({self.max_depth}), got {self.shared_max_nodes}")


class _Node:
    __slots__ = ("children", "count", "total", "last")

    def __init__(self):
        self.children: dict[int, _Node] | None = None  # token -> node; None until the first child
        self.count = 0
        self.total = 0
        self.last = 0  # clock of the latest occurrence: ties go to the more recent continuation


@dataclass(frozen=True)
class Speculation:
    tree: DraftTree  # rooted at the context's last token
    chances: list[float]  # [tree.size] estimated chance of each node to be accepted (root: 1)
    match_len: int  # length of the matched context suffix; 0 = no match, root-only tree

    @property
    def score(self) -> float:
        """Expected accepted draft tokens, by the tree's own estimate."""
        return sum(self.chances) - 1.0


class SuffixTree:
    def __init__(self, max_depth: int):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self.root = _Node()
        self.num_nodes = 1
        self._open = [self.root]  # nodes of the extended text's suffixes of length 0, 1, ... < max_depth
        self._clock = 0

    def extend(self, tokens: list[int]) -> None:
        """Appends tokens to the one growing text of this tree."""
        self._open = self._walk(tokens, self._open, +1)

    def insert(self, tokens: list[int]) -> None:
        """Adds a whole text (separate from the growing one and from other inserted texts)."""
        self._walk(tokens, [self.root], +1)

    def remove(self, tokens: list[int]) -> None:
        """Undoes insert(tokens): counts drop back and nodes left with none are freed."""
        self._walk(tokens, [self.root], -1)

    def _walk(self, tokens: list[int], open_nodes: list[_Node], sign: int) -> list[_Node]:
        """For each token x: every open suffix s gets count(s + x) += sign; returns the open suffixes after."""
        for x in tokens:
            self._clock += 1
            after = [self.root]
            for depth, node in enumerate(open_nodes):
                child = self._child(node, x, sign)
                child.count += sign
                node.total += sign
                if sign > 0:
                    child.last = self._clock
                elif child.count == 0:  # no occurrence left; still walked while this text ends below it
                    del node.children[x]
                    self.num_nodes -= 1
                if depth + 1 < self.max_depth:
                    after.append(child)
            open_nodes = after
        return open_nodes

    def _child(self, node: _Node, token: int, sign: int) -> _Node:
        if node.children is None:
            node.children = {}
        child = node.children.get(token)
        if child is None:
            if sign < 0:
                raise ValueError(f"remove: token {token} never followed this suffix (the text was not inserted)")
            child = node.children[token] = _Node()
            self.num_nodes += 1
        return child

    def find(self, tokens: list[int]) -> _Node | None:
        node = self.root
        for x in tokens:
            node = node.children.get(x) if node.children else None
            if node is None:
                return None
        return node

    def count(self, tokens: list[int]) -> int:
        """Occurrences of tokens as a substring (at most max_depth long)."""
        node = self.find(tokens)
        return 0 if node is None else node.count

    def items(self) -> Iterator[tuple[tuple[int, ...], int, int]]:
        """(substring, count, total) of every node but the root, depth first in child order."""
        stack = [((), self.root)]
        while stack:
            prefix, node = stack.pop()
            if prefix:
                yield prefix, node.count, node.total
            for x, child in reversed(list((node.children or {}).items())):
                stack.append(((*prefix, x), child))

    def match(self, context: list[int], max_match: int) -> tuple[int, _Node | None]:
        """(k, node of the last k context tokens): the longest such suffix, k <= max_match, that
        was followed by some token; (0, None) when none was. Binary search: if a suffix was
        followed, so was each shorter suffix of it."""
        lo, hi, best = 1, min(max_match, len(context), self.max_depth - 1), (0, None)
        while lo <= hi:
            k = (lo + hi) // 2
            node = self.find(context[-k:])
            if node is not None and node.total > 0:
                best, lo = (k, node), k + 1
            else:
                hi = k - 1
        return best

    def speculate(self, context: list[int], max_nodes: int, config: SuffixConfig) -> Speculation:
        """A draft tree of at most max_nodes nodes (root included) after the context."""
        root = context[-1]
        match_len, node = self.match(context, config.max_match)
        if node is None or max_nodes < 2:
            return Speculation(DraftTree.root_only(root), [1.0], 0)
        max_depth = min(config.max_spec, math.ceil(config.spec_factor * match_len), self.max_depth - match_len)
        tokens, parents, chances = [root], [-1], [1.0]
        tie = itertools.count()
        heap: list = []  # (-chance, -last, tie, trie node, token, parent in the tree, depth)

        def push_children(trie_node: _Node, chance: float, parent: int, depth: int) -> None:
            for x, child in (trie_node.children or {}).items():
                p = chance * child.count / trie_node.total
                if p >= config.min_prob:
                    heapq.heappush(heap, (-p, -child.last, next(tie), child, x, parent, depth))

        push_children(node, 1.0, 0, 1)
        while heap and len(tokens) < max_nodes:
            neg_p, _, _, trie_node, x, parent, depth = heapq.heappop(heap)
            tokens.append(x)
            parents.append(parent)
            chances.append(-neg_p)
            if depth < max_depth and trie_node.total > 0:
                push_children(trie_node, -neg_p, len(tokens) - 1, depth + 1)
        return Speculation(DraftTree(tokens, parents), chances, match_len)


class SharedSuffixTrees:
    """Suffix trees over finished requests' texts, one per cache salt (tenants never share
    drafts), with at most max_nodes nodes in all: the oldest texts are removed whole until the
    newest fits. A text keeps only its last max_nodes // max_depth tokens, so it always fits."""

    def __init__(self, max_depth: int, max_nodes: int):
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self._trees: dict[str, SuffixTree] = {}
        self._texts: deque[tuple[str, list[int]]] = deque()  # (salt, text), oldest first

    @property
    def num_nodes(self) -> int:
        """Nodes of all trees, roots not counted."""
        return sum(t.num_nodes - 1 for t in self._trees.values())

    @property
    def num_texts(self) -> int:
        return len(self._texts)

    def tree(self, salt: str) -> SuffixTree | None:
        return self._trees.get(salt)

    def add(self, salt: str, tokens: list[int]) -> None:
        tokens = tokens[-(self.max_nodes // self.max_depth):]
        if not tokens:
            return
        self._trees.setdefault(salt, SuffixTree(self.max_depth)).insert(tokens)
        self._texts.append((salt, tokens))
        while self.num_nodes > self.max_nodes:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        salt, tokens = self._texts.popleft()
        tree = self._trees[salt]
        tree.remove(tokens)
        if tree.num_nodes == 1:
            del self._trees[salt]
