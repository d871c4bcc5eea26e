"""Partial attention results and their numerically stable merge.

Attention over keys split into blocks can be computed block by block: each block gives a
normalised output and the log-sum-exp (lse) of its scores, and two such partial results over
disjoint key sets combine exactly into the result over their union. Ring attention merges one
block per ring step; a cached prefix's attention merges with a new suffix's the same way.
"""

from dataclasses import dataclass

import torch


@dataclass
class AttentionState:
    """Softmax attention of some queries over the keys seen so far."""

    out: torch.Tensor  # [T, H, D] float32, normalised over the keys seen; 0 where none attended
    lse: torch.Tensor  # [T, H] float32, log-sum-exp of the scores; -inf where none attended

    @classmethod
    def empty(cls, num_tokens: int, num_heads: int, head_dim: int, device: torch.device | str = "cpu") -> "AttentionState":
        """The state before any key: merging anything into it gives that thing."""
        out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=device)
        lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=device)
        return cls(out, lse)

    def merge_(self, part: "AttentionState", rows: slice = slice(None)) -> None:
        """Folds `part` (attention of queries self[rows] over other keys) into self, in place."""
        merged = merge_attention(AttentionState(self.out[rows], self.lse[rows]), part)
        self.out[rows] = merged.out
        self.lse[rows] = merged.lse


def merge_attention(a: AttentionState, b: AttentionState) -> AttentionState:
    """Attention over the union of two disjoint key sets, from the attention over each.

    Naive formula (overflows for large scores, 0/0 when both sides are empty):
        lse = log(exp(lse_a) + exp(lse_b))
        out = (exp(lse_a) * out_a + exp(lse_b) * out_b) / exp(lse)
    Stable form used here: shift by m = max(lse_a, lse_b) so every exponent is <= 0,
        w_a = exp(lse_a - m), w_b = exp(lse_b - m), lse = m + log(w_a + w_b),
        out = (w_a * out_a + w_b * out_b) / (w_a + w_b),
    with m taken as 0 where both are -inf (nothing attended: the result stays out = 0, lse = -inf).
    """
    m = torch.maximum(a.lse, b.lse)  # (T, H)
    m = m.masked_fill(torch.isinf(m) & (m < 0), 0.0)
    w_a, w_b = torch.exp(a.lse - m), torch.exp(b.lse - m)  # (T, H), each in [0, 1]
    total = w_a + w_b  # 0 only where both sides attended nothing
    lse = m + torch.log(total)  # log(0) = -inf where nothing was attended
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (w_a.unsqueeze(-1) * a.out + w_b.unsqueeze(-1) * b.out) / safe.unsqueeze(-1)  # (T, H, D)
    return AttentionState(out, lse)
