"""The specserve.v1.Generation service: validate, admit, stream. Thin: the engine loop does the work."""

import asyncio
import time

import grpc

from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc
from specserve.workers.engine.engine_loop import (EngineLoopLike, LoopStats, LoopStoppedError, QueueFullError,
                                                  combine_stats)
from specserve.workers.engine.sequence import FinishReason

from specserve.scheduler.server.metrics import ServerMetrics
from specserve.scheduler.server.router import Router
from specserve.scheduler.server.validation import InvalidRequest, ServedModel, validate

FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


class GenerationServicer(pb_grpc.GenerationServicer):
    """Answers UNAVAILABLE until `attach` gives it running engine loops (one per replica)."""

    def __init__(self):
        self.loops: list[EngineLoopLike] = []
        self._request_ids: set[str] = set()  # in flight on any replica

    def attach(self, loops: list[EngineLoopLike], model: ServedModel, fingerprint: str, metrics: ServerMetrics,
               router: Router) -> None:
        self.model, self.fingerprint, self.metrics, self.router = model, fingerprint, metrics, router
        self.loops = loops

    def stats(self) -> LoopStats:
        return combine_stats([loop.stats() for loop in self.loops])

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if not self.loops:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting: the model is loading")

    def _pick(self, prompt_ids: list[int], cache_salt: str) -> EngineLoopLike:
        """The router's replica if it has room, else the least loaded one that has."""
        loads = [loop.in_flight() for loop in self.loops]
        chosen = self.router.choose(prompt_ids, loads, cache_salt)
        order = [chosen] + sorted((r for r in range(len(self.loops)) if r != chosen), key=lambda r: loads[r])
        return next((self.loops[r] for r in order if self.loops[r].has_room()), self.loops[chosen])

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        arrival = time.perf_counter()
        await self._require_ready(context)
        try:
            req = validate(request, self.model)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if req.request_id in self._request_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id: {req.request_id!r} is already in flight (must be unique among them)")
        outputs: asyncio.Queue = asyncio.Queue()
        event_loop = asyncio.get_running_loop()

        def receive(item) -> None:  # on the engine thread
            if not event_loop.is_closed():
                event_loop.call_soon_threadsafe(outputs.put_nowait, item)

        loop = self._pick(req.prompt_ids, req.cache_salt)
        try:
            loop.submit(req.prompt_ids, req.params, req.request_id, receive, req.cache_salt)
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {e}; retry later")
        except LoopStoppedError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError:  # an earlier request of this id was cancelled; the loop has not ended it yet
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id: {req.request_id!r} is still in flight (must be unique among them)")
        self._request_ids.add(req.request_id)
        finished = False
        try:
            last = None
            while not finished:
                item = await outputs.get()
                if isinstance(item, ValueError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, Exception):
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
                finished = item.finished
                now = time.perf_counter()
                self._observe_latency(item, arrival, last, now)
                if item.new_token_ids:
                    last = now
                yield self._response(item, req.spec_method)
        finally:
            self._request_ids.discard(req.request_id)
            if not finished:  # client cancelled, deadline passed or the stream broke: free the request
                loop.cancel(req.request_id)

    def _observe_latency(self, item, arrival: float, last: float | None, now: float) -> None:
        n = len(item.new_token_ids)
        if n and last is None:
            self.metrics.ttft.observe(now - arrival)
        elif n:
            for _ in range(n):
                self.metrics.inter_token.observe((now - last) / n)
        if item.finished:
            self.metrics.e2e.observe(now - arrival)

    @staticmethod
    def _response(item, spec_method: str) -> pb.GenerateResponse:
        response = pb.GenerateResponse(request_id=item.request_id, token_ids=item.new_token_ids, text=item.new_text)
        for t in item.new_logprobs or ():
            response.logprobs.add(token_id=t.token_id, logprob=t.logprob,
                                  top=[pb.TopLogprob(token_id=a.token_id, logprob=a.logprob) for a in t.top])
        if item.finished:
            seq = item.seq
            response.finish_reason = FINISH_REASONS[item.finish_reason]
            response.usage.CopyFrom(pb.Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                                             cached_tokens=seq.cached_tokens))
            response.spec.CopyFrom(pb.SpecStats(method=spec_method, steps=seq.spec.decode_steps,
                                                drafted_tokens=seq.spec.drafted_tokens,
                                                accepted_tokens=seq.spec.accepted_tokens))
        return response

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        await self._require_ready(context)
        m = self.model
        return pb.ModelInfo(model=m.name, fingerprint=self.fingerprint, context_length=m.context_length,
                            vocab_size=m.vocab_size, spec_methods=m.spec_methods, default_spec_method=m.spec_method,
                            max_draft_tokens=m.max_draft_tokens,
                            has_chat_template=bool(getattr(m.tokenizer, "chat_template", None)))

    async def GetStats(self, request, context) -> pb.Stats:
        await self._require_ready(context)
        s = self.stats()
        return pb.Stats(queued_requests=s.queued, running_requests=s.running, max_queued_requests=s.max_queued,
                        finished_requests=s.finished, rejected_requests=s.rejected, prompt_tokens=s.prompt_tokens,
                        generation_tokens=s.generation_tokens, prefix_cache_queries=s.prompt_tokens,
                        prefix_cache_hits=s.cached_tokens, spec_steps=s.spec.spec_steps,
                        spec_drafted_tokens=s.spec.drafted_tokens, spec_accepted_tokens=s.spec.accepted_tokens,
                        kv_blocks_total=s.kv_blocks_total, kv_blocks_free=s.kv_blocks_free)
