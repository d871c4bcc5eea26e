"""Attention of one block of queries over one block of keys, with the log-sum-exp, in memory
linear in the block sizes.

`kernels.attention.attention_with_lse` materialises the [H, Tq, Tk] scores: fine for a draft
tree, 9.6 GB for one SmolLM2 layer at 16K tokens. Here the CPU uses torch's fused flash-attention
kernel (it tiles the keys and returns the lse); other devices fall back to query tiles of
`QUERY_TILE` rows through attention_with_lse, so the scores held at once are [H, QUERY_TILE, Tk].
"""

import torch

from .attention import attention_with_lse
from .attention_merge import AttentionState

QUERY_TILE = 1024


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return None
    out, lse = op(q, k, v, 0.0, causal, scale=scale)  # (1, H, Tq, D), (1, H, Tq)
    return out, lse


def block_attention(
    q: torch.Tensor,  # [Tq, H, D]
    k: torch.Tensor,  # [Tk, Hkv, D]
    v: torch.Tensor,  # [Tk, Hkv, D]
    causal: bool,
    scale: float | None = None,
) -> AttentionState:
    """Exact attention of q over k/v. causal: query i sees keys 0..i (the block on the diagonal,
    so Tq == Tk); otherwise every query sees every key. Returns float32 out [Tq, H, D], lse [Tq, H]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(f"a causal block is square; got {q.shape[0]} queries and {k.shape[0]} keys")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0 or k.shape[0] == 0:
        return AttentionState.empty(q.shape[0], heads, q.shape[-1], q.device)
    group = heads // kv_heads
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)  # (1, H, Tk, D)
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H, Tq, D)
    fused = _cpu_flash(qh, kh.to(q.dtype), vh.to(q.dtype), causal, scale)
    if fused is not None:
        out, lse = fused
        return AttentionState(out[0].transpose(0, 1).float(), lse[0].transpose(0, 1).float())
    outs, lses = [], []
    for start in range(0, q.shape[0], QUERY_TILE):
        rows = slice(start, min(start + QUERY_TILE, q.shape[0]))
        mask = None
        if causal:  # query start + i sees keys 0..start + i
            qi = torch.arange(rows.start, rows.stop, device=q.device).unsqueeze(1)  # (tile, 1)
            mask = torch.arange(k.shape[0], device=q.device).unsqueeze(0) <= qi  # (tile, Tk)
        out, lse = attention_with_lse(qh[:, :, rows], kh, vh, mask, scale)  # (1, H, tile, D), (1, H, tile)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return AttentionState(torch.cat(outs), torch.cat(lses))
