"""Rank programs for the sequence-parallel kernel tests: each rank takes its shard of the same
seeded full-sequence inputs, runs the distributed kernel, and returns its output shard; the
test compares it with a single-process reference."""

from dataclasses import dataclass

import torch

from specserve.kernels.ring_attention import ring_attention
from specserve.kernels.sequence_shards import contiguous_layout, zigzag_layout
from specserve.kernels.ulysses_attention import ulysses_attention


@dataclass(frozen=True)
class AttentionCase:
    kernel: str  # "ring" or "ulysses"
    seq_len: int
    heads: int
    kv_heads: int
    causal: bool
    layout: str = "zigzag"  # or "contiguous"
    head_dim: int = 16
    seed: int = 0

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same q [T, H, D], k, v [T, Hkv, D] on every rank."""
        g = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.seq_len, self.heads, self.head_dim, generator=g)
        k = torch.randn(self.seq_len, self.kv_heads, self.head_dim, generator=g)
        v = torch.randn(self.seq_len, self.kv_heads, self.head_dim, generator=g)
        return q, k, v

    def shard_layout(self, world_size: int):
        return (zigzag_layout if self.layout == "zigzag" else contiguous_layout)(self.seq_len, world_size)


class AttentionProgram:
    """Runs AttentionCase requests; returns (out [Tr, H, D], lse [Tr, H] or None)."""

    def setup(self, rank: int, world_size: int, group) -> None:
        torch.set_num_threads(1)
        self.rank, self.world_size, self.group = rank, world_size, group

    def run(self, case: AttentionCase):
        q, k, v = case.inputs()
        layout = case.shard_layout(self.world_size)
        shard = [layout.shard(x, self.rank) for x in (q, k, v)]
        if case.kernel == "ring":
            state = ring_attention(*shard, layout, self.group, causal=case.causal)
            return state.out, state.lse
        try:
            return ulysses_attention(*shard, layout, self.group, causal=case.causal), None
        except ValueError as e:  # the clear error for heads that do not divide, raised on every rank
            return str(e), None


@dataclass(frozen=True)
class InMemoryModel:
    """A model shipped to the ranks as its config and weights (pickled through shared memory,
    so the rank processes need not import transformers)."""

    config: object  # workers.model_config.ModelConfig
    state_dict: dict

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> "InMemoryModel":
        from specserve.workers.model.model_config import ModelConfig

        from tests.helpers.tiny_models import tiny_hf

        hf = tiny_hf("llama", seed=seed, **overrides)
        return cls(ModelConfig.from_hf(hf.config), {k: v.detach().clone() for k, v in hf.state_dict().items()})

    def __call__(self):
        from specserve.workers.model.llama import LlamaModel

        return LlamaModel(self.config, self.state_dict, torch.float32)


class BothModesProgram:
    """Prefill requests (mode, token_ids) with ring or Ulysses over one group."""

    def __init__(self, model_factory):
        self.model_factory = model_factory

    def setup(self, rank: int, world_size: int, group) -> None:
        from specserve.workers.model.sequence_parallel import SequenceParallelMode, SequenceParallelPrefill

        torch.set_num_threads(1)
        model = self.model_factory()
        self.runners = {mode: SequenceParallelPrefill(model, rank, world_size, group, mode)
                        for mode in SequenceParallelMode}

    def run(self, request):
        mode, token_ids = request
        return self.runners[mode].prefill(token_ids)


class DyingPrefillProgram(BothModesProgram):
    """Like BothModesProgram, but a member exits abruptly inside layer 1 of a prefill: in the
    k-th formation of the group, rank die_ranks[k] (none once they are used up). Deaths are
    counted in the file `marker`, so the processes of a re-formed group know how many came before."""

    def __init__(self, model_factory, die_ranks: tuple[int, ...], marker: str):
        super().__init__(model_factory)
        self.die_ranks, self.marker = die_ranks, marker

    def setup(self, rank: int, world_size: int, group) -> None:
        import os

        super().setup(rank, world_size, group)
        deaths = len(open(self.marker).read()) if os.path.exists(self.marker) else 0  # in earlier formations
        if deaths >= len(self.die_ranks) or self.die_ranks[deaths] != rank:
            return

        def dying_o(x):
            with open(self.marker, "a") as f:
                f.write("x")
            os._exit(17)  # no cleanup, like a killed process

        next(iter(self.runners.values())).model.layers[1].o = dying_o  # the runners share one model
