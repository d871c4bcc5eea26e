"""The slice of a Hugging Face config that the Llama-family forward needs, validated."""

from dataclasses import dataclass

import torch

# RoPE variants whose frequencies do not depend on the running sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something this forward does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    mlp_bias: bool
    sliding_window: int | None  # keys further back than this many positions are not attended
    inv_freq: torch.Tensor  # [head_dim / 2] RoPE inverse frequencies, scaling applied
    rope_attention_scaling: float

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.inv_freq.shape != (self.head_dim // 2,):
            raise UnsupportedConfigError(f"RoPE has {self.inv_freq.numel()} frequencies for head_dim={self.head_dim}")

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        """Reads a transformers Llama / Qwen2 / Mistral config."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
        rope = getattr(hf_config, "rope_parameters", None) or {"rope_type": "default"}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedConfigError(f"rope_type={rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
        window = getattr(hf_config, "sliding_window", None)
        if getattr(hf_config, "use_sliding_window", True) is False:
            window = None
        return cls(
            architecture=(hf_config.architectures or ["LlamaForCausalLM"])[0],
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", hf_config.model_type == "qwen2")),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            sliding_window=window,
            inv_freq=inv_freq.float(),
            rope_attention_scaling=float(scaling),
        )
