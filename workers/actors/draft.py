"""DraftWorker: the `model` drafter's small LM on its own node, with its own paged KV.

A thin actor class (no Ray import at module level; the scheduler wraps it with ray.remote). It
keeps a copy of each sequence's committed tokens (sent in full once, then diffs) and the draft
model's KV for them; `propose` answers a batch of sequences in one call.

The draft KV of a prompt is either handed over (a prefill worker's PrefixKV, placed before the
first proposal) or computed here from the tokens on the first proposal. It is never missing:
drafting on an empty draft KV is the disaggregation bug that collapses acceptance.

Sampled drafts use the request's own noise (Sequence.noise, keyed by its seed, which the
scheduler always sets): they guess the very tokens the verifier's draws will pick (verify.py).
"""

import time

from specserve.workers.actors.messages import DraftedTrees, DraftStats, DraftSync
from specserve.workers.engine.kv_cache import KVCacheConfig, PagedKVCache
from specserve.workers.model.llama import LlamaModel
from specserve.workers.engine.sequence import Sequence
from specserve.workers.spec.model_drafter import ModelDrafter
from specserve.workers.actors.base import WorkerActor
from specserve.workers.actors.worker_model import WorkerModel

IDLE_DROP_S = 600.0  # a sequence not proposed for this long is dropped (its verify worker died)
PREFIX_TIMEOUT_S = 30.0  # how long to wait for a handed-over draft prefix before computing it here


class DraftWorker(WorkerActor):
    def __init__(self, worker_model: WorkerModel, kv_cache_bytes: int | None = None,
                 model: LlamaModel | None = None):
        """model: the draft weights (tests pass them in); by default loaded from
        worker_model.config.spec.draft_model."""
        worker_model.set_threads()
        self.worker_model = worker_model
        config = worker_model.config
        if model is None:
            if not config.spec.draft_model:
                raise ValueError("a DraftWorker needs a spec config with a draft model")
            model = worker_model.load_weights(config.spec.draft_model)
        mc = model.config
        probe = KVCacheConfig(mc.num_layers, mc.num_kv_heads, mc.head_dim, 1, config.block_size, model.dtype)
        min_blocks = -(-mc.max_position_embeddings // config.block_size) + 2 * ModelDrafter.max_tree_slots()
        blocks = max(min_blocks, (kv_cache_bytes or config.kv_cache_bytes) // probe.bytes_per_block)
        self.kv = PagedKVCache(KVCacheConfig(mc.num_layers, mc.num_kv_heads, mc.head_dim, blocks, config.block_size,
                                             model.dtype, str(model.device)))
        self.drafter = ModelDrafter(model, self.kv)
        self._seqs: dict[str, Sequence] = {}
        self._last_used: dict[str, float] = {}
        self._handed_tokens = self._proposals = 0
        self._propose_seconds = 0.0

    def propose(self, syncs: list[DraftSync]) -> DraftedTrees:
        """A tree per sequence (None for a diff of a sequence this worker does not hold)."""
        now, start = time.monotonic(), time.perf_counter()
        trees = []
        for sync in syncs:
            seq = self._update(sync)
            if seq is None:
                trees.append(None)
                continue
            self._last_used[sync.key] = now
            trees.append(self.drafter.propose(seq, sync.max_nodes))
            self._proposals += 1
        self._drop_idle(now)
        self._propose_seconds += time.perf_counter() - start
        return DraftedTrees(trees)

    def release(self, keys: list[str]) -> None:
        for key in keys:
            seq = self._seqs.pop(key, None)
            self._last_used.pop(key, None)
            if seq is not None:
                self.drafter.release(seq)

    def stats(self) -> DraftStats:
        return DraftStats(len(self._seqs), self.kv.config.num_blocks, self.kv.allocator.num_free,
                          self._handed_tokens, self._proposals, self._propose_seconds)

    def _update(self, sync: DraftSync) -> Sequence | None:
        if sync.full:
            self.release([sync.key])
            seq = Sequence(list(sync.new_tokens), sync.params, request_id=sync.key)
            self._seqs[sync.key] = seq
            if sync.draft_prefix:
                self._place_prefix(seq, sync.draft_prefix)
            return seq
        seq = self._seqs.get(sync.key)
        if seq is not None:
            seq.output_ids.extend(sync.new_tokens)
        return seq

    def _place_prefix(self, seq: Sequence, draft_prefix: list) -> None:
        """Places the prefill worker's draft K/V; when it cannot be had, the first proposal
        computes the prompt's draft K/V here instead (slower, same trees)."""
        import ray

        try:
            prefix = ray.get(draft_prefix[0], timeout=PREFIX_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the prefill worker died or is slow: compute it here
            return
        n = min(prefix.end, seq.num_tokens - 1)
        if prefix.start != 0 or n <= 0:
            return
        self.drafter.place_prefix(seq, prefix.k[:, :n], prefix.v[:, :n])
        self._handed_tokens += n

    def _drop_idle(self, now: float) -> None:
        stale = [key for key, used in self._last_used.items() if now - used > IDLE_DROP_S]
        if stale:
            self.release(stale)
