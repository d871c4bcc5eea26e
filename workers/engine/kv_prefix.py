"""K/V of a run of a sequence's prompt tokens, every layer, in one contiguous tensor pair.

This is what crosses a process boundary into an engine's paged cache: a prefill worker's or a
prefill group's output, blocks read back from the shared prefix cache. The engine places it at
admission and computes only the rest of the prompt.
"""

from dataclasses import dataclass

import torch


@dataclass
class PrefixKV:
    start: int  # first token covered: a multiple of the engine's block size
    k: torch.Tensor  # [num_layers, num_tokens, num_kv_heads, head_dim], keys after RoPE
    v: torch.Tensor  # [num_layers, num_tokens, num_kv_heads, head_dim]
    cached: bool = False  # read from a prefix cache (counts as cached tokens), not computed for this request

    def __post_init__(self):
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(f"k and v must share one [layers, tokens, kv_heads, head_dim] shape, "
                             f"got {tuple(self.k.shape)} and {tuple(self.v.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @classmethod
    def empty(cls, num_layers: int = 1, num_kv_heads: int = 1, head_dim: int = 1) -> "PrefixKV":
        none = torch.empty(num_layers, 0, num_kv_heads, head_dim)
        return cls(0, none, none.clone())
