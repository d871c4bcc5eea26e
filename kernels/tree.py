"""Draft-tree attention masks and positions, from a parent array.

Node 0 is the root (the last committed token); node i > 0 has parents[i] < i. Example:
    0 ─ 1 ─ 3          parents = [-1, 0, 0, 1]
      └ 2              depths  = [ 0, 1, 1, 2]
A node attends to itself and its ancestors: row 3 of the mask is [1, 1, 0, 1].
"""

import torch


def check_parents(parents: list[int]) -> None:
    """Raises ValueError unless parents describes a tree rooted at node 0 in topological order."""
    if not parents or parents[0] != -1:
        raise ValueError("node 0 must be the root (parent -1)")
    for i, p in enumerate(parents[1:], 1):
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}; a parent must come before its child")


def tree_depths(parents: list[int]) -> list[int]:
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    return depths


def tree_attention_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: mask[i, j] is True iff j is i or an ancestor of i."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if i:
            mask[i] = mask[parents[i]]
        mask[i, i] = True
    return mask
