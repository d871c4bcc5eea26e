"""A compact Llama-family forward (Llama, Qwen2, Mistral, SmolLM2) over a paged KV cache.

Reads the weights of a Hugging Face checkpoint; fuses q/k/v and gate/up into one matmul
each; every projection is a `kernels.linear.Projection`, laid out once for the matmul path of
its `KernelChoice` (measured on the machine by `kernel_choice.choose_kernels`; without one, the
device's default). Attention math lives in `specserve.kernels`.
"""

from dataclasses import dataclass

import torch

from specserve.kernels.attention import batched_paged_attention
from specserve.kernels.linear import Projection
from specserve.kernels.norm import rms_norm, silu_and_mul
from specserve.kernels.rope import apply_rope, rope_tables

from specserve.workers.engine.forward_batch import ForwardBatch
from specserve.workers.engine.kv_cache import PagedKVCache
from specserve.workers.model.kernel_choice import KernelChoice
from specserve.workers.model.model_config import ModelConfig


class MissingWeightError(ValueError):
    """The checkpoint lacks a tensor the architecture needs."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Projection  # hidden -> (H + 2 Hkv) * D
    o: Projection  # H * D -> hidden
    post_norm: torch.Tensor  # [hidden]
    gate_up: Projection  # hidden -> 2 * intermediate
    down: Projection  # intermediate -> hidden


class LlamaModel:
    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: str = "cpu",
                 kernels: KernelChoice | None = None):
        self.config = config
        self.dtype, self.device = dtype, torch.device(device)
        self.kernels = KernelChoice.default(self.device, dtype) if kernels is None else kernels

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            tensor = state_dict.get(name)
            if tensor is None:
                if required:
                    raise MissingWeightError(f"checkpoint has no tensor {name!r}")
                return None
            return tensor.to(device=self.device, dtype=dtype)

        def fused(names: list[str], required: bool = True) -> torch.Tensor | None:
            parts = [take(n, required) for n in names]
            return None if any(p is None for p in parts) else torch.cat(parts, dim=0)

        def project(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Projection:
            return Projection(weight, bias, self.kernels.projections)


        self.embed = take("model.embed_tokens.weight")  # [V, hidden]
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn = [p + f"self_attn.{x}_proj" for x in ("q", "k", "v")]
            mlp = [p + f"mlp.{x}_proj" for x in ("gate", "up")]
            self.layers.append(
                LayerWeights(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=project(fused([n + ".weight" for n in attn]), fused([n + ".bias" for n in attn], config.attention_bias)),
                    o=project(take(p + "self_attn.o_proj.weight")),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=project(fused([n + ".weight" for n in mlp]), fused([n + ".bias" for n in mlp], config.mlp_bias)),
                    down=project(take(p + "mlp.down_proj.weight"), take(p + "mlp.down_proj.bias", config.mlp_bias)),
                )
            )
        self.final_norm = take("model.norm.weight")
        lm_head = take("lm_head.weight", required=not config.tie_word_embeddings)
        self.lm_head = Projection(self.embed if lm_head is None else lm_head, None, self.kernels.lm_head)  # hidden -> V
        cos, sin = rope_tables(config.inv_freq, config.max_position_embeddings, config.rope_attention_scaling)
        self.cos, self.sin = cos.to(self.device, dtype), sin.to(self.device, dtype)  # [max_pos, D]
        self.scale = config.head_dim**-0.5

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (embedding rows aside)."""
        parts = [self.final_norm, self.lm_head]
        for layer in self.layers:
            parts += list(vars(layer).values())
        return sum(p.nbytes for p in parts if p is not None)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        """Runs the batch's new slots, writes their K/V, returns logits [L, V] (float32)."""
        cfg = self.config
        num_slots = batch.num_slots
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        splits = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]  # (T, D)
        h = self.embed[batch.token_ids]  # (T, hidden)
        for i, w in enumerate(self.layers):
            x = rms_norm(h, w.input_norm, cfg.rms_norm_eps)
            q, k, v = w.qkv(x).split(splits, dim=-1)
            q = apply_rope(q.view(num_slots, heads, head_dim), cos, sin)  # (T, H, D)
            k = apply_rope(k.view(num_slots, kv_heads, head_dim), cos, sin)  # (T, Hkv, D)
            kv.write(i, batch.slot_mapping, k, v.view(num_slots, kv_heads, head_dim))
            attn = batched_paged_attention(q, kv.k[i], kv.v[i], batch.layout, self.scale, self.kernels.attention)  # (T, H, D)
            h = h + w.o(attn.reshape(num_slots, heads * head_dim))
            x = rms_norm(h, w.post_norm, cfg.rms_norm_eps)
            h = h + w.down(silu_and_mul(w.gate_up(x)))
        h = rms_norm(h[batch.logits_index], self.final_norm, cfg.rms_norm_eps)  # (L, hidden)
        return self.lm_head(h).float()  # (L, V)
