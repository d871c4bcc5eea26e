"""Sequence-parallel prefill: every rank of a group runs every layer on its shard of the prompt.

Each rank holds the tokens of its shard (kernels/sequence_shards.py): embeddings, norms, q/k/v,
MLP run on those rows only; attention crosses the shards with ring attention (zigzag layout, K/V
blocks travel the ring) or Ulysses (contiguous layout, all-to-all to heads and back). Each rank
keeps the K/V (after RoPE) it computed; at the end rank 0 receives every rank's K/V and returns
the whole prompt's as a `PrefixKV`, the engine's admission contract (workers/engine/kv_prefix.py).

Used in a Ray `PrefillWorker` actor (one per rank) or in a local process (`PrefillProgram` for
cluster/prefill_group.py). Per rank, memory for activations is O(T/W): attention is tiled, never
[T, T]; the gathered K/V lives on rank 0 only.
"""

from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist

from specserve.kernels.norm import rms_norm, silu_and_mul
from specserve.kernels.ring_attention import ring_attention
from specserve.kernels.rope import apply_rope
from specserve.kernels.sequence_shards import ShardLayout, contiguous_layout, zigzag_layout
from specserve.kernels.ulysses_attention import kv_heads_for_ranks, ulysses_attention

from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.model.llama import LlamaModel


class SequenceParallelMode(str, Enum):
    RING = "ring"  # K/V blocks around the ring; any head count; W-1 exchanges per layer
    ULYSSES = "ulysses"  # two all-to-alls per layer; query heads must divide by the world size

    def layout(self, seq_len: int, world_size: int) -> ShardLayout:
        # Ring needs zigzag to balance causal work; Ulysses attends all tokens per head anyway.
        return zigzag_layout(seq_len, world_size) if self is SequenceParallelMode.RING else contiguous_layout(seq_len, world_size)


class SequenceParallelPrefill:
    """One rank's part of a prefill group. Every rank calls `prefill` with the same token ids."""

    def __init__(self, model: LlamaModel, rank: int, world_size: int, group: dist.ProcessGroup,
                 mode: SequenceParallelMode = SequenceParallelMode.RING):
        cfg = model.config
        if mode is SequenceParallelMode.ULYSSES:
            kv_heads_for_ranks(cfg.num_heads, cfg.num_kv_heads, world_size)  # raises a clear ValueError
        if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
            raise ValueError(f"group has rank {dist.get_rank(group)} of {dist.get_world_size(group)}, "
                             f"expected {rank} of {world_size}")
        self.model, self.rank, self.world_size, self.group, self.mode = model, rank, world_size, group, mode

    @torch.inference_mode()
    def prefill(self, token_ids: list[int]) -> PrefixKV | None:
        """K/V of every prompt token, every layer, in token order (on rank 0; None elsewhere)."""
        m, cfg = self.model, self.model.config
        n = len(token_ids)
        if not 0 < n <= cfg.max_position_embeddings:
            raise ValueError(f"prompt has {n} tokens; the model's positions are 1..{cfg.max_position_embeddings}")
        if cfg.sliding_window is not None and n > cfg.sliding_window:
            raise ValueError(f"sequence-parallel prefill does not implement sliding windows ({cfg.sliding_window})")
        layout = self.mode.layout(n, self.world_size)
        positions = layout.positions(self.rank, m.device)  # (Tr,) global positions of this rank's rows
        tokens = positions.numel()
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        splits = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        kv = torch.empty(2, cfg.num_layers, tokens, kv_heads, head_dim, dtype=m.dtype, device=m.device)  # this rank's K/V
        cos, sin = m.cos[positions], m.sin[positions]  # (Tr, D)
        h = m.embed[torch.tensor(token_ids, device=m.device)[positions]]  # (Tr, hidden)
        for i, w in enumerate(m.layers):
            x = rms_norm(h, w.input_norm, cfg.rms_norm_eps)
            q, k, v = w.qkv(x).split(splits, dim=-1)
            q = apply_rope(q.view(tokens, heads, head_dim), cos, sin)  # (Tr, H, D)
            kv[0, i] = apply_rope(k.view(tokens, kv_heads, head_dim), cos, sin)  # (Tr, Hkv, D)
            kv[1, i] = v.view(tokens, kv_heads, head_dim)
            attn = self._attention(q, kv[0, i], kv[1, i], layout).to(m.dtype)  # (Tr, H, D)
            h = h + w.o(attn.reshape(tokens, heads * head_dim))
            x = rms_norm(h, w.post_norm, cfg.rms_norm_eps)
            h = h + w.down(silu_and_mul(w.gate_up(x)))
        return self._gather(kv, layout)

    def _attention(self, q, k, v, layout: ShardLayout) -> torch.Tensor:
        if self.mode is SequenceParallelMode.RING:
            return ring_attention(q, k, v, layout, self.group, causal=True, scale=self.model.scale).out
        return ulysses_attention(q, k, v, layout, self.group, causal=True, scale=self.model.scale)

    def _gather(self, kv: torch.Tensor, layout: ShardLayout) -> PrefixKV | None:
        """Rank 0 receives each rank's [2, L, Tr, Hkv, D] in turn (peak: the result + one shard)
        and scatters it to its positions."""
        if self.rank != 0:
            dist.send(kv, dist.get_global_rank(self.group, 0), group=self.group)
            return None
        shape = list(kv.shape)
        shape[2] = layout.seq_len
        full = torch.empty(shape, dtype=kv.dtype, device=kv.device)  # (2, L, T, Hkv, D)
        full[:, :, layout.positions(0, kv.device)] = kv
        for src in range(1, self.world_size):
            shard_shape = list(kv.shape)
            shard_shape[2] = layout.shard_len(src)
            part = torch.empty(shard_shape, dtype=kv.dtype, device=kv.device)
            dist.recv(part, dist.get_global_rank(self.group, src), group=self.group)
            full[:, :, layout.positions(src, kv.device)] = part
        return PrefixKV(0, full[0], full[1])


@dataclass(frozen=True)
class CheckpointModel:
    """A picklable recipe for the model a worker process loads: a --model argument.

    max_position_embeddings / num_layers override the checkpoint's config (benchmarks: RoPE
    tables past the trained context for timing, or fewer layers); None keeps it.
    """

    model: str
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    max_position_embeddings: int | None = None
    num_layers: int | None = None

    def __call__(self) -> LlamaModel:
        from specserve.workers.model.model_config import ModelConfig
        from specserve.workers.model.model_source import load_config, load_state_dict, resolve_model

        source = resolve_model(self.model, progress=False)
        hf_config = load_config(source)
        if self.max_position_embeddings is not None:
            hf_config.max_position_embeddings = self.max_position_embeddings
        if self.num_layers is not None:
            hf_config.num_hidden_layers = self.num_layers
        return LlamaModel(ModelConfig.from_hf(hf_config), load_state_dict(source), self.dtype, self.device)


@dataclass
class PrefillProgram:
    """cluster.prefill_group.RankProgram for local processes: loads the model, then prefills.

    model_factory: a picklable callable returning the LlamaModel (CheckpointModel, or a test's
    tiny model). Requests are token id lists; rank 0's result is the PrefixKV.
    """

    model_factory: object
    mode: SequenceParallelMode = SequenceParallelMode.RING
    threads: int | None = 1  # torch threads per rank (N ranks share the machine's cores)

    def setup(self, rank: int, world_size: int, group) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self._runner = SequenceParallelPrefill(self.model_factory(), rank, world_size, group, self.mode)

    def run(self, token_ids: list[int]) -> PrefixKV | None:
        return self._runner.prefill(token_ids)
