"""Softmax attention: the exact form with log-sum-exp, and the paged form the model runs.

Shapes: T flat query slots, B sequences, H query heads, Hkv key/value heads (GQA when
H > Hkv), D head dim, Q / K the padded per-sequence query / key counts of a layout.

The paged form runs in one of three `AttentionKernel`s (all exact; which is fastest depends on
the CPU and torch build, so `workers/model/kernel_choice.py` times them).
"""

from enum import Enum

import torch
import torch.nn.functional as F

from .paged_layout import BatchLayout, PagedAttentionLayout


class AttentionKernel(Enum):
    SDPA = "sdpa"  # F.scaled_dot_product_attention with enable_gqa (each K/V head shared by its query group)
    SDPA_EXPANDED = "sdpa_expanded"  # the same over K/V copied out to every query head
    GROUPED = "grouped"  # two matmuls, each K/V head's query group folded into the rows: no K/V copy


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
    kernel: AttentionKernel = AttentionKernel.SDPA,
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
    qb, k, v = qb.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, Q, D), (B, Hkv, K, D)
    if kernel is AttentionKernel.GROUPED:
        out = _grouped_attention(qb, k, v, layout.mask, layout.causal, scale)
    else:
        if kernel is AttentionKernel.SDPA_EXPANDED:
            group = qb.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, K, D)
        out = F.scaled_dot_product_attention(qb, k, v, attn_mask=layout.mask, is_causal=layout.causal, scale=scale,
                                             enable_gqa=kernel is AttentionKernel.SDPA)  # (B, H, Q, D)
    out = out.transpose(1, 2).reshape(num_seqs * max_q, q.shape[1], q.shape[2])  # (B*Q, H, D)
    if layout.out_index is None:
        return out
    return out[layout.out_index]  # (T, H, D)


def _grouped_attention(
    q: torch.Tensor,  # [B, H, Q, D]
    k: torch.Tensor,  # [B, Hkv, K, D]
    v: torch.Tensor,  # [B, Hkv, K, D]
    mask: torch.Tensor | None,  # [B, 1, Q, K] bool, True = may attend
    causal: bool,  # only with mask None: causal over Q == K keys
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with query head h reading K/V head h // G (G = H / Hkv), the G
    heads of a group stacked as rows of one matmul. Returns [B, H, Q, D] in q's dtype."""
    batch, heads, num_q, dim = q.shape
    kv_heads, num_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = q.reshape(batch, kv_heads, group * num_q, dim)  # (B, Hkv, G*Q, D): head h = kv_head * G + g
    scores = torch.matmul(rows, k.transpose(-1, -2)).float().view(batch, kv_heads, group, num_q, num_k)
    scores *= scale  # (B, Hkv, G, Q, K)
    if mask is None and causal:
        mask = torch.ones(1, 1, num_q, num_k, dtype=torch.bool, device=q.device).tril()  # (1, 1, Q, K)
    if mask is not None:
        scores.masked_fill_(~mask.unsqueeze(2), float("-inf"))  # mask (B, 1, 1, Q, K)
    probs = scores.softmax(dim=-1).to(v.dtype).view(batch, kv_heads, group * num_q, num_k)
    return torch.matmul(probs, v).view(batch, heads, num_q, dim)  # (B, H, Q, D)


def batched_paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: BatchLayout,
    scale: float,
    kernel: AttentionKernel = AttentionKernel.SDPA,
) -> torch.Tensor:
    """paged_attention over each group of the layout; returns [T, H, D] in slot order."""
    if len(layout.groups) == 1 and layout.groups[0].slots is None:
        return paged_attention(q, k_cache, v_cache, layout.groups[0].layout, scale, kernel)
    out = torch.empty_like(q)
    for group in layout.groups:
        out[group.slots] = paged_attention(q[group.slots], k_cache, v_cache, group.layout, scale, kernel)
    return out
