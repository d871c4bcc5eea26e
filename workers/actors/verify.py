"""VerifyWorker: the target model's engine on its own node, streaming accepted tokens.

A thin actor class (asyncio; the scheduler wraps it with ray.remote). Its LLMEngine runs on an
EngineLoop thread as in-process: continuous batching, one tree-verify forward per step.
Train-free drafters (ngram, recycling) run inside the engine; the `model` drafter is a
RemoteDrafter calling a DraftWorker once per step for all sequences.

`generate` is a streaming generator: each item is a list of StreamChunks, everything that was
ready since the last item (all tokens a step accepted, several steps when the consumer lags),
so a stream costs one Ray round trip per step at most, not per token.
"""

import asyncio
import logging

from specserve.workers.actors.messages import StreamChunk, VerifyRequest, WorkerInfo
from specserve.workers.engine.llm_engine import RequestOutput
from specserve.workers.engine.engine_loop import EngineLoop, LoopStats, LoopStoppedError, QueueFullError
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.actors.remote_drafter import RemoteDrafter
from specserve.workers.engine.sequence import FinishReason
from specserve.workers.actors.base import WorkerActor
from specserve.workers.actors.worker_model import WorkerModel

log = logging.getLogger("specserve.verify_worker")
PREFIX_TIMEOUT_S = 60.0  # how long to wait for a prefill worker's K/V before prefilling here


class VerifyWorker(WorkerActor):
    def __init__(self, worker_model: WorkerModel, max_queued: int = 64, draft_worker=None,
                 draft_timeout_s: float = 30.0, name: str = ""):
        """draft_worker: a DraftWorker actor handle serving the `model` part of the spec method
        (None: a model drafter, if any, is loaded and run here)."""
        worker_model.set_threads()
        self.worker_model, self.name = worker_model, name
        self.remote_drafter = None
        if draft_worker is not None and worker_model.uses_model_drafter:
            self.remote_drafter = RemoteDrafter(draft_worker, draft_timeout_s)
        self.loaded = worker_model.load_engine(self.remote_drafter)
        self.loop = EngineLoop(self.loaded.engine, max_queued).start()
        self._waiting: set[str] = set()  # requests resolving their prefill K/V, not yet submitted
        self._cancelled: set[str] = set()  # of those, cancelled
        self.prefix_tokens = 0  # prompt tokens whose K/V a prefill worker handed over

    def ready(self) -> WorkerInfo:
        import ray

        engine = self.loaded.engine
        speculator = engine.speculator
        return WorkerInfo(
            model=self.worker_model.model, node_id=ray.get_runtime_context().get_node_id(),
            tokenizer=engine.tokenizer, fingerprint=self.loaded.source.fingerprint,
            context_length=engine.max_model_len, vocab_size=engine.model.config.vocab_size,
            block_size=engine.config.block_size,
            spec_method=engine.config.spec.method if speculator is not None else "none",
            max_draft_tokens=speculator.max_draft_tokens if speculator is not None else 0,
            draft_remote=self.remote_drafter is not None,
        )

    async def generate(self, request: VerifyRequest, prefix: list | None = None, draft_prefix: list | None = None):
        """Yields lists of StreamChunks until one is final. prefix / draft_prefix: [ObjectRef]
        of a prefill worker's PrefixKV for the target / draft model (nested in a list so this
        worker fetches them itself, and falls back to prefilling here when that fails)."""
        rid = request.request_id
        outputs: asyncio.Queue = asyncio.Queue()
        event_loop = asyncio.get_running_loop()

        def receive(item) -> None:  # on the engine loop thread
            event_loop.call_soon_threadsafe(outputs.put_nowait, item)

        self._waiting.add(rid)
        try:
            prefix_kv = await self._fetch_prefix(prefix)
            if self.remote_drafter is not None and draft_prefix:
                self.remote_drafter.expect_prefix(rid, draft_prefix)
        finally:
            self._waiting.discard(rid)
        if rid in self._cancelled:
            self._cancelled.discard(rid)
            yield [StreamChunk(rid, [], "", finished=True, finish_reason=FinishReason.ABORT)]
            return
        try:
            self.loop.submit(request.prompt_ids, request.params, rid, receive, request.cache_salt, prefix_kv,
                             request.resumed)
        except (QueueFullError, LoopStoppedError, ValueError) as e:
            yield [StreamChunk(rid, [], "", error=str(e), invalid=isinstance(e, ValueError))]
            return
        if prefix_kv is not None:
            self.prefix_tokens += prefix_kv.num_tokens
        final = False
        try:
            while not final:
                items = [await outputs.get()]
                while not outputs.empty():
                    items.append(outputs.get_nowait())
                chunks = [_chunk(rid, item) for item in items]
                final = chunks[-1].final
                yield chunks
        finally:
            if not final:  # the consumer went away (the scheduler cancelled or died): free the request
                self.loop.cancel(rid)

    async def _fetch_prefix(self, prefix: list | None) -> PrefixKV | None:
        if not prefix:
            return None
        try:
            return await asyncio.wait_for(prefix[0], PREFIX_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - prefill worker dead or slow: prefill here instead
            log.warning("prefill K/V unavailable (%s: %s); prefilling on the verify worker", type(e).__name__, e)
            return None

    def cancel(self, request_id: str) -> None:
        if request_id in self._waiting:
            self._cancelled.add(request_id)
        self.loop.cancel(request_id)

    def stats(self) -> LoopStats:
        return self.loop.stats()

    def drafter_stats(self) -> dict:
        """The model drafter's calls: count, total seconds, failures (zeros without a remote drafter)."""
        d = self.remote_drafter
        if d is None:
            return {"calls": 0, "seconds": 0.0, "failures": 0}
        return {"calls": d.calls, "seconds": d.call_seconds, "failures": d.failures}

    def breakdown(self) -> dict:
        """Where this worker's time went: engine steps (draft calls included) and prompt K/V handed over."""
        return {"steps": self.loop.steps, "step_seconds": self.loop.step_seconds, "prefix_tokens": self.prefix_tokens,
                "draft": self.drafter_stats()}

    def stop(self) -> None:
        self.loop.stop(timeout=10)


def _chunk(request_id: str, item: RequestOutput | Exception) -> StreamChunk:
    if isinstance(item, Exception):
        return StreamChunk(request_id, [], "", error=str(item), invalid=isinstance(item, ValueError))
    seq = item.seq
    return StreamChunk(request_id, list(item.new_token_ids), item.new_text, item.finished, item.finish_reason,
                       new_logprobs=item.new_logprobs, cached_tokens=seq.cached_tokens, spec=seq.spec)
