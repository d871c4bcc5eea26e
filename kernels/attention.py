"""Softmax attention: the exact form with log-sum-exp, and the paged form the model runs.

Shapes: T flat query slots, B sequences, H query heads, Hkv key/value heads (GQA when
H > Hkv), D head dim, Q / K the padded per-sequence query / key counts of a layout.
"""

import torch
import torch.nn.functional as F

from .paged_layout import BatchLayout, PagedAttentionLayout


def attention_with_lse(
    q: torch.Tensor,  # [B, H, Tq, D]
    k: torch.Tensor,  # [B, Hkv, Tk, D]
    v: torch.Tensor,  # [B, Hkv, Tk, D]
    mask: torch.Tensor | None = None,  # bool, broadcastable to [B, H, Tq, Tk]; True = may attend
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention that also returns the log-sum-exp of each query row's scores.

    Returns (out [B, H, Tq, D], lse [B, H, Tq]) in float32. A row with nothing to attend
    has out = 0 and lse = -inf, so merging it with another partial result is a no-op.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Tq)
    # softmax = exp(s - lse); rows with lse = -inf would give nan, so they weigh 0 instead.
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num_(0.0)
    out = torch.matmul(probs, v.float())  # (B, H, Tq, D)
    return out, lse


def paged_attention(
    q: torch.Tensor,  # [T, H, D] new query slots of every sequence in the batch
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] one layer's paged keys, slot = block * block_size + offset
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    layout: PagedAttentionLayout,
    scale: float,
) -> torch.Tensor:
    """Attention of each query slot over its own sequence's keys, as the layout's mask allows.

    The new slots' keys must already be written to the cache. Returns [T, H, D] in q's dtype.
    """
    num_seqs, max_q = layout.q_index.shape
    if num_seqs == 1 and layout.is_dense_single:
        # One sequence whose keys sit in order in the cache: slice, do not gather.
        start, length = layout.dense_kv_start, layout.kv_slots.shape[1]
        k = k_cache[start : start + length].unsqueeze(0)  # (1, K, Hkv, D)
        v = v_cache[start : start + length].unsqueeze(0)
        qb = q.unsqueeze(0)  # (1, T, H, D)
    else:
        k = k_cache[layout.kv_slots]  # (B, K, Hkv, D)
        v = v_cache[layout.kv_slots]
        qb = q[layout.q_index]  # (B, Q, H, D)
    out = F.scaled_dot_product_attention(
        qb.transpose(1, 2),  # (B, H, Q, D)
        k.transpose(1, 2),  # (B, Hkv, K, D)
        v.transpose(1, 2),
        attn_mask=layout.mask,
        is_causal=layout.causal,
        scale=scale,
        enable_gqa=True,
    )  # (B, H, Q, D)
    out = out.transpose(1, 2).reshape(num_seqs * max_q, q.shape[1], q.shape[2])  # (B*Q, H, D)
    if layout.out_index is None:
        return out
    return out[layout.out_index]  # (T, H, D)


def batched_paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: BatchLayout,
    scale: float,
) -> torch.Tensor:
    """paged_attention over each group of the layout; returns [T, H, D] in slot order."""
    if len(layout.groups) == 1 and layout.groups[0].slots is None:
        return paged_attention(q, k_cache, v_cache, layout.groups[0].layout, scale)
    out = torch.empty_like(q)
    for group in layout.groups:
        out[group.slots] = paged_attention(q[group.slots], k_cache, v_cache, group.layout, scale)
    return out
