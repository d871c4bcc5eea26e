"""The OpenAI HTTP API's wire types (pydantic) and their mapping onto the gRPC GenerateRequest.

Requests are parsed strictly from JSON (a string where a number belongs is an error, not a
conversion); fields this server does not know are ignored, as OpenAI does. A request becomes the
same `GenerateRequest` a gRPC client would send, so `validation.validate` checks it and the
servicer runs it: one validator, one submission path, token-identical greedy output.
Fields that ask for something specserve cannot give (n > 1, echo) are refused with
InvalidRequest naming the field rather than silently ignored.

Log-probabilities (completions `logprobs: k`; chat `logprobs: true` with `top_logprobs: k`,
0 <= k <= 20) are the target model's, of its raw logits (workers/engine/logprobs.py), in OpenAI's
legacy and chat shapes (openai_logprobs.py builds them).

Extensions beyond OpenAI: `top_k`, `ignore_eos`, `cache_salt`, `spec`, `return_token_ids` (as
vLLM names it) in requests; `usage.spec` (the request's speculation counters) and, when asked
for, `choices[].token_ids` (the new tokens) in responses.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from specserve.v1 import generation_pb2 as pb
from specserve.workers.engine.logprobs import MAX_TOP_LOGPROBS

from specserve.scheduler.server.validation import InvalidRequest

INT32_MAX, UINT32_MAX, UINT64_MAX = 2**31 - 1, 2**32 - 1, 2**64 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class SpecOptions(_Strict):
    method: str = Field("", description="'' = the server's method, 'none' = no speculation, or the server's method")
    max_draft_tokens: int = Field(0, ge=0, le=UINT32_MAX, description="most draft tokens per step; 0 = server's choice")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with usage (and no choices) before [DONE]")


class _GenerationRequest(_Strict):
    """The fields both endpoints share."""

    model: str = Field(description="the served model's name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="most new tokens; unset = server's default")
    temperature: float | None = Field(None, description="0 or unset = greedy")
    top_p: float | None = Field(None, description="nucleus mass in (0, 1]")
    seed: int | None = Field(None, ge=0, le=UINT64_MAX, description="seed for reproducible sampling")
    stop: str | list[str] | None = Field(None, description="stop string(s); the output ends before the first")
    n: int | None = Field(None, description="choices per request; only 1 is supported")
    stream: bool | None = Field(None, description="stream server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="the caller's end-user id (accepted, not used)")
    top_k: int | None = Field(None, ge=0, le=UINT32_MAX, description="extension: sample among the k likeliest")
    ignore_eos: bool | None = Field(None, description="extension: keep generating past end-of-sequence")
    cache_salt: str | None = Field(None, description="extension: tenant key; different salts share no cached KV")
    spec: SpecOptions | None = Field(None, description="extension: speculative decoding options")
    return_token_ids: bool | None = Field(None, description="extension: each choice also carries its token_ids")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _generate_request(self, request_id: str, max_tokens: int | None) -> pb.GenerateRequest:
        if self.n not in (None, 1):
            raise InvalidRequest("n", f"only 1 choice per request is supported, got {self.n}")
        request = pb.GenerateRequest(request_id=request_id, top_k=self.top_k or 0, ignore_eos=bool(self.ignore_eos),
                                     cache_salt=self.cache_salt or "")
        if self.stop is not None:
            request.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.spec is not None:
            request.spec.CopyFrom(pb.SpecOptions(method=self.spec.method, max_draft_tokens=self.spec.max_draft_tokens))
        for name, value in (("max_tokens", max_tokens), ("temperature", self.temperature), ("top_p", self.top_p),
                            ("seed", self.seed)):
            if value is not None:
                setattr(request, name, value)
        return request


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(description="text or token ids (one prompt)")
    echo: bool | None = Field(None, description="not supported: must be false")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="log-probability of each new token and of this many likeliest ones")

    @property
    def returns_logprobs(self) -> bool:
        return self.logprobs is not None

    def generate_request(self, request_id: str) -> pb.GenerateRequest:
        if self.echo:
            raise InvalidRequest("echo", "not supported")
        request = self._generate_request(request_id, self.max_tokens)
        if self.logprobs is not None:
            request.logprobs = self.logprobs
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequest("prompt", f"one prompt per request is supported, got a list of {len(prompt)}")
            prompt = prompt[0]
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.CopyFrom(pb.TokenIds(ids=[_token_id(t, i) for i, t in enumerate(prompt)]))
        return request


def _token_id(token: int, index: int) -> int:
    if not 0 <= token <= UINT32_MAX:
        raise InvalidRequest(f"prompt[{index}]", f"token ids are >= 0, got {token}")
    return token


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The content as one string: text parts joined; other parts are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"messages[{index}].content[{j}]", f"only text parts are supported, got "
                                                                         f"type {part.type!r}")
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(description="the conversation, rendered with the model's chat template")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX,
                                              description="most new tokens (wins over max_tokens)")
    logprobs: bool | None = Field(None, description="return the log-probability of each new token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: also this many likeliest tokens' log-probabilities")

    @property
    def max_tokens_field(self) -> str:
        """The name under which the request gave its token limit."""
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    @property
    def returns_logprobs(self) -> bool:
        return bool(self.logprobs)

    def generate_request(self, request_id: str) -> pb.GenerateRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        limit = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        request = self._generate_request(request_id, limit)
        if self.logprobs:
            request.logprobs = self.top_logprobs or 0
        messages = [pb.ChatMessage(role=m.role, content=m.text(i)) for i, m in enumerate(self.messages)]
        request.messages.CopyFrom(pb.ChatMessages(messages=messages))
        return request


# ---- responses ----

FinishReason = Literal["stop", "length", "abort"]


class SpecUsage(BaseModel):
    method: str
    steps: int
    drafted_tokens: int
    accepted_tokens: int


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    spec: SpecUsage  # extension


TokenIds = Field(None, exclude_if=lambda ids: ids is None)  # extension: only with return_token_ids


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per new token in each list."""

    tokens: list[str]  # each token's text (decoded alone)
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # the k likeliest tokens and the emitted one: text -> log-probability
    text_offset: list[int]  # where each token starts in the choice's text (the lengths of the tokens before it)


class TopLogprob(BaseModel):
    token: str  # the token's text (decoded alone)
    logprob: float
    bytes: list[int] | None  # the UTF-8 bytes of token


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the k likeliest tokens, likeliest first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None  # one per new token


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    token_ids: list[int] | None = TokenIds
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A whole completion, and (object "text_completion" too, as OpenAI does) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    token_ids: list[int] | None = TokenIds
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None  # on the first chunk only
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    token_ids: list[int] | None = TokenIds
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]  # empty in the usage chunk
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specserve"
    max_model_len: int  # extension: most tokens of prompt + completion


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
