"""The OpenAI-compatible HTTP API (FastAPI), a second front door onto the gRPC servicer.

Routes: GET /v1/models (and /v1/models/{id}), POST /v1/completions, POST /v1/chat/completions,
GET /health (200 only while serving), GET /metrics (the server's Prometheus registry).

A request is translated into the gRPC `GenerateRequest` (openai_types.py) and run by the same
`GenerationServicer.Generate` a gRPC call runs: the same validation, admission, routing across
replicas, cancellation and latency metrics. The servicer refuses a request by aborting its
context; here the context is `_RaisingContext`, whose abort raises, and the gRPC status becomes
the HTTP one (INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, INTERNAL 500).
Every refusal is OpenAI's error JSON; a 400 names the field in `param` and in the message.
A stream's headers go out only after the first chunk, so a refusal is a status, never a broken
stream; an error after that is an SSE `error` event before `data: [DONE]`. A client that
disconnects cancels its request (its KV is freed within one engine step).

Auth: with a token, /v1/* needs `Authorization: Bearer <token>` (401 otherwise); /health and
/metrics stay open for probes and scrapers, as gRPC health and the metrics port do.
"""

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from specserve.v1 import generation_pb2 as pb

from specserve.scheduler.server import openai_types as oa
from specserve.scheduler.server.openai_logprobs import TokenTexts, chat_logprobs, completion_logprobs
from specserve.scheduler.server.servicer import GenerationServicer
from specserve.scheduler.server.validation import InvalidRequest, ServedModel

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
STARTING = "the server is starting: the model is loading"
log = logging.getLogger("specserve.http")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        detail = oa.ErrorDetail(message=self.message, type=ERROR_TYPES.get(self.status, "error"), param=self.param)
        return oa.ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _RaisingContext:
    """The part of grpc.aio.ServicerContext that Generate uses: abort, which here raises."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Refused(code, details)


def _api_error(refusal: _Refused, field_names: dict[str, str]) -> ApiError:
    """The HTTP error of a servicer refusal; a 400's field renamed to the name the request used."""
    status = HTTP_STATUS.get(refusal.code, 500)
    if status != 400:
        return ApiError(status, refusal.details)
    field, _, rest = refusal.details.partition(":")
    base, bracket, index = field.partition("[")
    field = field_names.get(base, base) + bracket + index
    return ApiError(400, f"{field}:{rest}", field)


class _Generation:
    """One request running on the servicer, opened up to its first chunk (so refusals are statuses)."""

    def __init__(self, chunks: AsyncIterator[pb.GenerateResponse], first: pb.GenerateResponse,
                 field_names: dict[str, str]):
        self._chunks, self._first, self._field_names = chunks, first, field_names

    @classmethod
    async def open(cls, servicer: GenerationServicer, request: pb.GenerateRequest,
                   field_names: dict[str, str]) -> "_Generation":
        chunks = servicer.Generate(request, _RaisingContext())
        try:
            first = await anext(chunks)
        except _Refused as e:
            raise _api_error(e, field_names) from None
        return cls(chunks, first, field_names)

    async def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        """Every chunk; a refusal after the first raises ApiError. Leaving early cancels the request."""
        try:
            yield self._first
            async for chunk in self._chunks:
                yield chunk
        except _Refused as e:
            raise _api_error(e, self._field_names) from None
        finally:
            await self._chunks.aclose()


def _usage(last: pb.GenerateResponse) -> oa.Usage:
    u, s = last.usage, last.spec
    return oa.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    total_tokens=u.prompt_tokens + u.completion_tokens,
                    prompt_tokens_details=oa.PromptTokensDetails(cached_tokens=u.cached_tokens),
                    spec=oa.SpecUsage(method=s.method, steps=s.steps, drafted_tokens=s.drafted_tokens,
                                      accepted_tokens=s.accepted_tokens))


def _finish_reason(chunk: pb.GenerateResponse) -> str | None:
    return FINISH_REASONS.get(chunk.finish_reason)


def _sse(payload: BaseModel | dict | str) -> bytes:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n".encode()


def _parse(model_cls: type[oa._Strict], body: bytes):
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        field, message = _field_error(e.errors())
        raise ApiError(400, message, field) from None


def _field_error(errors: list[dict]) -> tuple[str, str]:
    """(field, message) of pydantic's first error. A union's failure is reported once, listing
    the accepted types (pydantic's loc carries a type tag such as 'list[int]' after the field)."""
    paths = [_path(e["loc"]) for e in errors]
    path, tag = paths[0]
    if not path:
        return "body", f"body: {errors[0]['msg']}"
    if tag is None:
        return path, f"{path}: {errors[0]['msg']}"
    expected = list(dict.fromkeys(t for p, t in paths if p == path and t))
    return path, f"{path}: wrong type (expected {' or '.join(expected)})"


def _path(loc: tuple) -> tuple[str, str | None]:
    """('messages', 0, 'content', 'str') -> ('messages[0].content', 'str'). Our field names are
    lower_snake_case; any other string in loc is a union member's type tag."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in ("str", "int", "float", "bool"):
            path += f".{part}" if path else part
        else:
            return path, part
    return path, None


def create_app(servicer: GenerationServicer, serving: Callable[[], bool], token: str | None) -> FastAPI:
    """The API over `servicer`; serving() says whether health is SERVING."""
    app = FastAPI(title="specserve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()

    def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if token and not hmac.compare_digest(given, f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token in 'Authorization'")

    def model(name: str | None = None) -> ServedModel:
        if not servicer.loops:
            raise ApiError(503, STARTING)
        if name is not None and name != servicer.model.name:
            raise ApiError(404, f"model: {name!r} is not served here (GET /v1/models lists {servicer.model.name!r})",
                           "model")
        return servicer.model

    @app.get("/health")
    async def health() -> Response:
        up = serving()
        return JSONResponse({"status": "serving" if up else "not serving"}, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if not servicer.loops:
            raise ApiError(503, STARTING)
        return Response(generate_latest(servicer.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    started = int(time.time())

    def card(m: ServedModel) -> oa.ModelCard:
        return oa.ModelCard(id=m.name, created=started, max_model_len=m.context_length)

    @v1.get("/models")
    async def models() -> oa.ModelList:
        return oa.ModelList(data=[card(model())])

    @v1.get("/models/{name:path}")
    async def model_card(name: str) -> oa.ModelCard:
        return card(model(name))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body = _parse(oa.CompletionRequest, await request.body())
        return await run(body, f"cmpl-{uuid.uuid4().hex}", {"prompt_token_ids": "prompt"}, _completion_events)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _parse(oa.ChatCompletionRequest, await request.body())
        return await run(body, f"chatcmpl-{uuid.uuid4().hex}", {"max_tokens": body.max_tokens_field,
                                                                 "logprobs": "top_logprobs"}, _chat_events)

    known_texts = None  # TokenTexts of the served model's tokenizer, made when first needed

    def token_texts(m: ServedModel) -> TokenTexts:
        nonlocal known_texts
        if known_texts is None or known_texts.tokenizer is not m.tokenizer:
            known_texts = TokenTexts(m.tokenizer)
        return known_texts

    async def run(body, request_id: str, field_names: dict[str, str], events) -> Response:
        """Validates and admits the request (refusals are statuses), then answers it whole or streamed."""
        texts = token_texts(model(body.model))
        try:
            grpc_request = body.generate_request(request_id)
        except InvalidRequest as e:
            raise ApiError(400, str(e), e.field) from None
        generation = await _Generation.open(servicer, grpc_request, field_names)
        head = dict(id=request_id, created=int(time.time()), model=body.model)
        if body.stream:
            return StreamingResponse(_stream(events(generation, head, body, texts)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        chunks = [c async for c in generation]
        return Response(_whole(body, head, chunks, texts).model_dump_json(), media_type="application/json")

    app.include_router(v1)
    return app


def _token_ids(body, chunks: list[pb.GenerateResponse]) -> list[int] | None:
    return [t for c in chunks for t in c.token_ids] if body.return_token_ids else None


def _whole(body, head: dict, chunks: list[pb.GenerateResponse],
           texts: TokenTexts) -> oa.Completion | oa.ChatCompletion:
    text, last, ids = "".join(c.text for c in chunks), chunks[-1], _token_ids(body, chunks)
    logprobs = [t for c in chunks for t in c.logprobs]
    if isinstance(body, oa.ChatCompletionRequest):
        choice = oa.ChatChoice(message=oa.AssistantMessage(content=text), token_ids=ids,
                               logprobs=chat_logprobs(logprobs, texts) if body.returns_logprobs else None,
                               finish_reason=_finish_reason(last))
        return oa.ChatCompletion(**head, choices=[choice], usage=_usage(last))
    choice = oa.CompletionChoice(text=text, token_ids=ids,
                                 logprobs=completion_logprobs(logprobs, texts) if body.returns_logprobs else None,
                                 finish_reason=_finish_reason(last))
    return oa.Completion(**head, choices=[choice], usage=_usage(last))


async def _stream(events: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield _sse(event)
    except ApiError as e:
        yield _sse(e.body())
    yield _sse("[DONE]")


async def _completion_events(generation: _Generation, head: dict, body: oa.CompletionRequest, texts: TokenTexts):
    offset = 0  # where this chunk's first token starts in the whole text (text_offset)
    async for chunk in generation:
        logprobs = None
        if body.returns_logprobs:
            logprobs = completion_logprobs(chunk.logprobs, texts, offset)
            offset += sum(map(len, logprobs.tokens))
        choice = oa.CompletionChoice(text=chunk.text, token_ids=_token_ids(body, [chunk]), logprobs=logprobs,
                                     finish_reason=_finish_reason(chunk))
        yield oa.Completion(**head, choices=[choice])
        if chunk.finish_reason and body.include_usage:
            yield oa.Completion(**head, choices=[], usage=_usage(chunk))


async def _chat_events(generation: _Generation, head: dict, body: oa.ChatCompletionRequest, texts: TokenTexts):
    role = "assistant"
    async for chunk in generation:
        choice = oa.ChatChunkChoice(delta=oa.Delta(role=role, content=chunk.text), token_ids=_token_ids(body, [chunk]),
                                    logprobs=chat_logprobs(chunk.logprobs, texts) if body.returns_logprobs else None,
                                    finish_reason=_finish_reason(chunk))
        role = None
        yield oa.ChatCompletionChunk(**head, choices=[choice])
        if chunk.finish_reason and body.include_usage:
            yield oa.ChatCompletionChunk(**head, choices=[], usage=_usage(chunk))
