"""Rotary position embedding (the rotate-half convention of Hugging Face Llama checkpoints)."""

import torch


def rope_tables(
    inv_freq: torch.Tensor,  # [D/2] inverse frequencies (any RoPE scaling already applied)
    max_positions: int,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, each [max_positions, D], float32."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())  # (P, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (P, D)
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_rope(
    x: torch.Tensor,  # [T, heads, D]
    cos: torch.Tensor,  # [T, D] rows of rope_tables at each slot's position
    sin: torch.Tensor,  # [T, D]
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half([a, b]) = [-b, a] on the last dim."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (T, heads, D)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
