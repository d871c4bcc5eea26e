"""PrefillWorker: computes a prompt's K/V on its own node and hands it to a verify worker.

A thin actor class. `prefill` returns the target's and the draft model's PrefixKV (contiguous CPU
tensors) as two results; called through Ray with num_returns=2 they live in this node's object
store and the scheduler passes only their ObjectRefs on, so the verify worker fetches the
target's and the draft worker the draft model's K/V from here directly, never through the
scheduler.

What computes the K/V is a `PrefillRunner`: `LocalPrefillRunner` runs one model on this worker.
A sequence-parallel prefill group (cluster/prefill_group.py, workers/model/sequence_parallel.py) is
another runner with the same contract; the worker does not change when one is plugged in.
"""

from typing import Protocol

import torch

from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, KVCacheConfig, PagedKVCache
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.model.llama import LlamaModel
from specserve.workers.actors.base import WorkerActor
from specserve.workers.actors.worker_model import WorkerModel


class PrefillRunner(Protocol):
    def run(self, token_ids: list[int]) -> PrefixKV:
        """K/V of every token of token_ids (start 0), contiguous, on the CPU."""


class LocalPrefillRunner:
    """One model on this worker, the whole prompt in chunks of `chunk` tokens through its own
    scratch KV pool (one context's worth), which is emptied after every prompt."""

    def __init__(self, model: LlamaModel, block_size: int, chunk: int = 2048):
        mc = model.config
        blocks = -(-mc.max_position_embeddings // block_size)
        self.model, self.chunk = model, chunk
        self.kv = PagedKVCache(KVCacheConfig(mc.num_layers, mc.num_kv_heads, mc.head_dim, blocks, block_size,
                                             model.dtype, str(model.device)))

    @torch.inference_mode()
    def run(self, token_ids: list[int]) -> PrefixKV:
        table = BlockTable()
        try:
            for start in range(0, len(token_ids), self.chunk):
                piece = token_ids[start : start + self.chunk]
                batch = build_forward_batch([SequenceSlots(table, piece)], self.kv, self.model.config.sliding_window,
                                            self.model.device)
                self.model.forward(batch, self.kv)  # fills the K/V; the logits are not needed
            k, v = self.kv.read(table, 0, table.num_tokens)  # [L, n, Hkv, D] each
            return PrefixKV(0, k.cpu().contiguous(), v.cpu().contiguous())
        finally:
            self.kv.free(table)


class PrefillWorker(WorkerActor):
    def __init__(self, worker_model: WorkerModel, target: PrefillRunner | None = None,
                 draft: PrefillRunner | None = None):
        """target / draft: runners for the target and draft models (tests pass them in); by
        default one model each, loaded from worker_model (the draft only for spec method model)."""
        worker_model.set_threads()
        self.worker_model = worker_model
        block_size = worker_model.config.block_size
        if target is None:
            target = LocalPrefillRunner(worker_model.load_weights(worker_model.model), block_size)
        if draft is None and worker_model.uses_model_drafter:
            draft = LocalPrefillRunner(worker_model.load_weights(worker_model.config.spec.draft_model), block_size)
        self.target, self.draft = target, draft
        self.prompts = 0

    def prefill(self, prompt_ids: list[int], with_draft: bool = True) -> tuple[PrefixKV, PrefixKV | None]:
        """K/V of every prompt token but the last (whose logits the verify worker computes),
        for the target and, with a draft runner, the draft model."""
        if len(prompt_ids) < 2:
            raise ValueError(f"prefill needs a prompt of at least 2 tokens, got {len(prompt_ids)}")
        tokens = list(prompt_ids[:-1])
        target = self.target.run(tokens)
        draft = self.draft.run(tokens) if with_draft and self.draft is not None else None
        self.prompts += 1
        return target, draft
