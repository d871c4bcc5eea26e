"""The in-process engine: requests in, tokens and text out, one forward per step.

Every step makes progress or fails the request that blocks it: the planner names sequences it can
never schedule, and a request whose logits are not finite, or whose sampling or verification
raises, ends alone (finish_reason ABORT with RequestOutput.error set); the others in the step go on.
A drafter that raises costs the step its draft trees (plain decoding is exact), no request.
"""

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from specserve.cluster.prefix_cache.block_hash import prefix_block_hashes
from specserve.cluster.prefix_cache.cache import SharedPrefixCache

from specserve.workers.engine.detokenizer import IncrementalDetokenizer
from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import KVCacheConfig, PagedKVCache
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.engine.logprobs import TokenLogprobs, token_logprobs
from specserve.workers.model.llama import LlamaModel
from specserve.workers.engine.sampler import sample_tokens, usable_rows
from specserve.workers.engine.sequence import (FinishReason, Resumed, SamplingParams, Sequence, SequenceStatus,
                                               SequenceView, SpecCounters)
from specserve.workers.spec.draft_tree import DraftTree
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.methods import SpecConfig, build_drafter
from specserve.workers.spec.draft_prefix import DraftPrefixCache
from specserve.workers.spec.model_drafter import ModelDrafter
from specserve.workers.spec.latency_profile import measure_latency_curve
from specserve.workers.spec.speculator import Speculator
from specserve.workers.spec.tree_size import LatencyCurve

log = logging.getLogger("specserve.engine")

# Draft nodes per sequence and step when the latency model decides (it prunes from here).
DEFAULT_MAX_DRAFT_TOKENS = 79
from specserve.workers.engine.step_planner import PlannerConfig, StepPlanner


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30  # the KV pool's size; at least one full context is always kept
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    prefix_caching: bool = True  # full prompt blocks stay findable by content (see kv_cache.BlockAllocator)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    seq: SequenceView  # the engine's Sequence here; a Ray request's summary in the scheduler
    error: str | None = None  # set when the engine failed this request alone (finish_reason ABORT): why
    new_logprobs: list[TokenLogprobs] | None = None  # [n] one per new token if params.logprobs is set


class LLMEngine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        eos_token_ids=(),
        latency_curve: LatencyCurve | None = None,
        draft_model: LlamaModel | None = None,
        shared_cache: SharedPrefixCache | None = None,
        model_fingerprint: str = "",
        draft_shared_cache: SharedPrefixCache | None = None,
        draft_fingerprint: str = "",
        model_drafter: Drafter | None = None,
    ):
        """latency_curve: the verify forward's measured t(S), which sizes every step's trees;
        with speculation on and no max_draft_tokens it is measured here when not given (pass a
        cached one). A fixed max_draft_tokens means fixed trees: no curve is used then.
        draft_model: the `model` drafter's LM (same vocabulary); it gets its own KV pool.
        shared_cache: the prefix cache shared across workers (L2); the KV pool is L1.
        model_fingerprint: names the weights in prefix cache keys (two models never share a block).
        draft_shared_cache, draft_fingerprint: the same for the draft model's KV.
        model_drafter: serves the `model` part of the spec method from elsewhere (a verify
        worker's RemoteDrafter), instead of a draft_model here."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.draft_model = draft_model
        self.shared_cache, self.model_fingerprint = shared_cache, model_fingerprint
        self.draft_shared_cache, self.draft_fingerprint = draft_shared_cache, draft_fingerprint
        self.eos_token_ids = frozenset(eos_token_ids)
        mc = model.config
        self.max_model_len = mc.max_position_embeddings
        kv_probe = KVCacheConfig(mc.num_layers, mc.num_kv_heads, mc.head_dim, 1, config.block_size, model.dtype)
        min_blocks = -(-self.max_model_len // config.block_size)
        num_blocks = max(min_blocks, config.kv_cache_bytes // kv_probe.bytes_per_block)
        self.kv = PagedKVCache(
            KVCacheConfig(mc.num_layers, mc.num_kv_heads, mc.head_dim, num_blocks, config.block_size,
                          model.dtype, str(model.device))
        )
        self.planner = StepPlanner(config.planner, self.kv, self._attach_prefix)
        self.speculator = None
        if draft_model is not None and model_drafter is not None:
            raise ValueError("give draft_model or model_drafter, not both")
        if model_drafter is None:
            model_drafter = self._model_drafter(draft_model)
        drafter = build_drafter(config.spec, mc.vocab_size, model_drafter)
        if drafter is not None:
            max_draft = config.spec.max_draft_tokens or DEFAULT_MAX_DRAFT_TOKENS
            if config.spec.max_draft_tokens:
                latency_curve = None  # the trees the drafter proposes, up to that cap, whatever timing says
            elif latency_curve is None:
                latency_curve = measure_latency_curve(model, self.kv, max_slots=max_draft + 1)
            self.speculator = Speculator(drafter, self.kv, max_draft, self.max_model_len, latency_curve,
                                         gate=config.spec.gate)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._requests: dict[str, Sequence] = {}
        self.slots_computed = 0  # K/V slots written by forwards since start: grows with every step that runs one
        self._prefix_keys: dict[str, list[bytes]] = {}  # request -> keys of its full prompt blocks
        self._given_kv: dict[str, PrefixKV] = {}  # request -> prompt K/V computed or fetched elsewhere

    def block_keys(self, prompt_ids: list[int], cache_salt: str = "") -> list[bytes]:
        """Prefix cache keys of the prompt's full blocks (cluster/prefix_cache/block_hash.py)."""
        extra = (self.model_fingerprint, str(self.model.dtype), cache_salt)
        return [h.digest for h in prefix_block_hashes(prompt_ids, self.config.block_size, extra)]

    def lookup_shared_prefix(self, prompt_ids: list[int], cache_salt: str = "") -> PrefixKV | None:
        """The prompt's blocks found in the shared cache (L2) after the leading ones this engine
        holds (L1), short of the block with the last prompt token; None when there are none.
        Reads no engine state but the L1 key index, so another thread may call it."""
        if self.shared_cache is None or not self.config.prefix_caching:
            return None
        keys = self.block_keys(prompt_ids, cache_salt)[: (len(prompt_ids) - 1) // self.config.block_size]
        held = 0
        while held < len(keys) and self.kv.allocator.is_cached(keys[held]):
            held += 1
        blocks = self.shared_cache.fetch(keys[held:])
        if not blocks:
            return None
        bs = self.config.block_size
        layers, _, kv_heads, head_dim = blocks[0].k.shape
        k = torch.empty(layers, len(blocks) * bs, kv_heads, head_dim, dtype=blocks[0].k.dtype)  # (L, n * bs, Hkv, D)
        v = torch.empty_like(k)
        for i, block in enumerate(blocks):
            k[:, i * bs : (i + 1) * bs], v[:, i * bs : (i + 1) * bs] = block.k, block.v
        return PrefixKV(held * bs, k, v, cached=True)

    def _attach_prefix(self, seq: Sequence) -> None:
        """Gives a sequence about to prefill the KV it need not compute: the longest run of its
        prompt blocks held in the pool (L1), then what was handed in with it (the shared cache's
        blocks, or a prefill worker's output), always leaving its last prompt token to compute
        (its logits are needed). Takes what the pool can give; the rest is computed."""
        limit = len(seq.prompt_ids) - 1
        for key in self._prefix_keys.get(seq.request_id, [])[: limit // self.config.block_size]:
            block = self.kv.allocator.take_cached(key)
            if block is None:
                break
            seq.table.blocks.append(block)
        seq.table.num_tokens = len(seq.table.blocks) * self.config.block_size
        cached = seq.table.num_tokens
        given = self._given_kv.get(seq.request_id)
        if given is not None and given.start <= seq.table.num_tokens < min(given.end, limit):
            first, end = seq.table.num_tokens - given.start, min(given.end, limit) - given.start
            if self.kv.blocks_needed(seq.table, end - first) <= self.kv.allocator.num_free:
                self.kv.extend(seq.table, given.k[:, first:end], given.v[:, first:end])
                cached = seq.table.num_tokens if given.cached else cached
        if seq.first_token_time is None:
            seq.cached_tokens = cached

    def _prefill_done(self, seq: Sequence) -> None:
        """Its full prompt blocks become findable by key here (L1), and those no cache gave it are
        written to the shared cache (L2, off this thread)."""
        self._given_kv.pop(seq.request_id, None)
        keys = self._prefix_keys.get(seq.request_id, [])
        for block, key in zip(seq.table.blocks, keys):
            self.kv.allocator.register(block, key)
        first = seq.cached_tokens // self.config.block_size
        if self.shared_cache is not None and len(keys) > first:
            k, v = self.kv.read(seq.table, first * self.config.block_size, len(keys) * self.config.block_size)
            self.shared_cache.publish(keys[first:], k, v)

    def replica(self) -> "LLMEngine":
        """Another engine over the same weights, with its own KV pool, requests and drafter state."""
        curve = self.speculator.curve if self.speculator is not None else None
        return LLMEngine(self.model, self.tokenizer, self.config, self.eos_token_ids, curve, self.draft_model,
                         self.shared_cache, self.model_fingerprint, self.draft_shared_cache, self.draft_fingerprint)

    def _model_drafter(self, draft_model: LlamaModel | None) -> ModelDrafter | None:
        if draft_model is None:
            return None
        dc = draft_model.config
        if dc.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"draft model vocabulary ({dc.vocab_size}) differs from the target's ({self.model.config.vocab_size})")
        # Every sequence's committed tokens, plus room for the tree slots of a proposal each.
        tree_blocks = -(-ModelDrafter.max_tree_slots() // self.config.block_size) + 1
        blocks = self.kv.config.num_blocks + self.config.planner.max_num_seqs * tree_blocks
        kv = PagedKVCache(KVCacheConfig(dc.num_layers, dc.num_kv_heads, dc.head_dim, blocks, self.config.block_size,
                                        draft_model.dtype, str(draft_model.device)))
        cache = None
        if self.config.prefix_caching:
            cache = DraftPrefixCache(kv, self.draft_fingerprint or "draft:" + self.model_fingerprint,
                                     self.draft_shared_cache)
        return ModelDrafter(draft_model, kv, prefix_cache=cache)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    cache_salt: str = "", prefix_kv: PrefixKV | None = None, resumed: Resumed | None = None) -> Sequence:
        """Queues a request. Raises ValueError naming the limit when it cannot ever run.
        cache_salt: requests with different salts never share cached prefix blocks.
        prefix_kv: K/V of some of its prompt tokens computed or fetched elsewhere (see _attach_prefix).
        resumed: the prompt ends with output an earlier attempt delivered: its text goes on from
        what was delivered, and stop strings see it."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} "
                "(prompt + at least one new token)"
            )
        vocab = self.model.config.vocab_size
        bad = next((i for i, t in enumerate(prompt_ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad} is {prompt_ids[bad]}, not in the vocabulary [0, {vocab})")
        if prefix_kv is not None and prefix_kv.start % self.config.block_size:
            raise ValueError(f"prefix_kv.start must be a multiple of the block size "
                             f"{self.config.block_size}, got {prefix_kv.start}")
        detok = IncrementalDetokenizer.for_prompt(self.tokenizer, prompt_ids, params.stop, resumed)
        seq = Sequence(list(prompt_ids), params, cache_salt=cache_salt, **({"request_id": request_id} if request_id else {}))
        if seq.request_id in self._requests:
            raise ValueError(f"request_id {seq.request_id!r} is already running")
        self._requests[seq.request_id] = seq
        self._detokenizers[seq.request_id] = detok
        if self.config.prefix_caching:
            self._prefix_keys[seq.request_id] = self.block_keys(seq.prompt_ids, cache_salt)
        if prefix_kv is not None:
            self._given_kv[seq.request_id] = prefix_kv
        self.planner.add(seq)
        return seq

    def running_sequence(self, request_id: str) -> Sequence | None:
        """The unfinished request with this id, if any."""
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> None:
        seq = self._requests.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.ABORT)

    def spec_method(self, seq: Sequence) -> str:
        """The speculation method seq runs with: the engine's, or "none" when off for it."""
        return "none" if self.speculator is None or seq.params.max_draft_tokens == 0 else self.config.spec.method

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        """The unfinished requests: every one is waiting or running in the planner."""
        return list(self._requests)

    def step(self) -> list[RequestOutput]:
        """Runs one forward over the planned sequences; returns what each produced."""
        step_start = time.perf_counter()
        trees = self._draft_trees()
        plan = self.planner.plan({seq: tree.size for seq, tree in trees.items()})
        outputs = [self._fail(s.seq, f"internal error: the step planner cannot schedule it: {s.reason}")
                   for s in plan.stuck]
        planned = plan.scheduled
        if not planned:
            return outputs
        spans, ready = [], []
        for p in planned:
            seq, tree = p.seq, trees.get(p.seq)
            # the tree's root is its only token without K/V (a sequence preempted and re-admitted
            # this step prefills instead, whatever its num_new)
            if tree is not None and p.num_new == tree.size and seq.num_tokens - seq.num_computed == 1:
                spans.append(self.speculator.slots(seq, tree))
                ready.append((seq, tree))
            else:
                start = seq.num_computed
                spans.append(SequenceSlots(seq.table, seq.token_ids[start : start + p.num_new],
                                           logits_rows=[p.num_new - 1] if p.completes else []))
                if p.completes:
                    ready.append((seq, None))
        batch = build_forward_batch(spans, self.kv, self.model.config.sliding_window, self.model.device)
        logits = self.model.forward(batch, self.kv)  # (L, V): tree seqs have one row per node
        self.slots_computed += batch.num_slots
        for seq, tree in ready:
            if tree is None and not seq.output_ids:  # this step computed the rest of its prompt
                self._prefill_done(seq)
        counts = [c for c in batch.logits_counts if c]
        for (seq, tree), row, usable in zip(ready, logits.split(counts), usable_rows(logits).split(counts)):
            if not usable.all():
                outputs.append(self._fail(seq, "the model's logits for this request hold NaN or inf"))
            else:
                outputs.append(self._advance(seq, tree, row))
        if self.speculator is not None:
            decode = [p.seq for p in planned if p.num_new == (trees[p.seq].size if p.seq in trees else 1)
                      and p.seq.output_ids]  # decoding sequences (the rest prefilled a prompt chunk)
            if decode:
                tokens = sum(len(out.new_token_ids) for out in outputs if out.seq in decode)
                self.speculator.record_step(len(decode), bool(trees), tokens, time.perf_counter() - step_start,
                                            mixed=len(decode) < len(planned))
        return outputs

    def _advance(self, seq: Sequence, tree: DraftTree | None, logits: torch.Tensor) -> RequestOutput:
        """Appends seq's next tokens, chosen from its logits [n, V]: one sampled token (n = 1), or
        its draft tree verified (n = tree.size). An error here fails seq only."""
        try:
            if tree is None:
                noise = None if seq.params.greedy else seq.noise(seq.num_tokens, logits.shape[-1])
                new, rows = sample_tokens(logits, [seq.params], [noise]), [0]
            else:
                acceptance = self.speculator.verify_and_commit(seq, tree, logits)
                new, rows = acceptance.tokens, acceptance.path  # the logits rows that chose them (logprobs.py)
            k = seq.params.logprobs
            return self._append(seq, new, None if k is None else token_logprobs(logits[rows], new, k))
        except Exception as e:  # noqa: BLE001 - one request's failure must not fail the others in the step
            log.exception("request %s failed in a step", seq.request_id)
            return self._fail(seq, f"internal error: {type(e).__name__}: {e}")

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        """Ends seq alone (finish_reason ABORT, its blocks freed); the output carries the error."""
        self._finish(seq, FinishReason.ABORT)
        return RequestOutput(seq.request_id, [], "", True, FinishReason.ABORT, seq, error=error)

    def _draft_trees(self) -> dict[Sequence, DraftTree]:
        """Draft trees for the running sequences that are decoding (not mid-prefill), or none
        when speculation does not pay at this load. A root-only tree still goes through
        verification so the drafter observes the logits."""
        if self.speculator is None:
            return {}
        decoding = [s for s in self.planner.running if s.num_tokens - s.num_computed == 1]
        drafting = [s for s in decoding if s.params.max_draft_tokens != 0]  # 0: the request turned it off
        mixed = bool(self.planner.waiting) or len(decoding) < len(self.planner.running)  # a prefill chunk joins
        if not drafting or not self.speculator.speculate(len(decoding), mixed):
            return {}
        # Trees are sized as if the step decoded only: a prefill chunk in the same step makes the
        # step long, but a draft node still costs its own time and must pay for it at the decode
        # rate (sized against the whole step, trees grew to hundreds of nodes and delayed prefill).
        try:
            trees = self.speculator.propose(drafting, len(decoding) - len(drafting))
        except Exception:  # noqa: BLE001 - a drafter's failure costs this step its drafts, never a request
            log.exception("drafting failed: this step decodes without draft trees")
            return {}
        return dict(zip(drafting, trees))

    def generate(self, prompt_ids: list[int], params: SamplingParams, cache_salt: str = "",
                 prefix_kv: PrefixKV | None = None) -> Iterator[RequestOutput]:
        """Runs one request to the end, yielding each step's output (for in-process use).
        Without prefix_kv, the shared prefix cache is asked for the prompt's blocks first."""
        if prefix_kv is None:
            prefix_kv = self.lookup_shared_prefix(prompt_ids, cache_salt)
        seq = self.add_request(prompt_ids, params, cache_salt=cache_salt, prefix_kv=prefix_kv)
        while not seq.is_finished:
            for out in self.step():
                if out.seq is seq:
                    yield out

    def _append(self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprobs] | None) -> RequestOutput:
        """Appends tokens one by one until one of them finishes the sequence (logprobs: one per token)."""
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.spec += SpecCounters(decode_steps=1)
        detok = self._detokenizers[seq.request_id]
        taken, text, reason = [], "", None
        for token in new_tokens:
            seq.output_ids.append(token)
            taken.append(token)
            text += detok.add([token])
            if detok.stopped or (token in self.eos_token_ids and not seq.params.ignore_eos):
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                text += detok.flush()
                self._finish(seq, reason)
                break
        logprobs = None if logprobs is None else logprobs[: len(taken)]
        return RequestOutput(seq.request_id, taken, text, reason is not None, reason, seq, new_logprobs=logprobs)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status, seq.finish_reason, seq.finish_time = SequenceStatus.FINISHED, reason, time.perf_counter()
        self.planner.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        self._requests.pop(seq.request_id, None)
        self._detokenizers.pop(seq.request_id, None)
        self._prefix_keys.pop(seq.request_id, None)
        self._given_kv.pop(seq.request_id, None)

