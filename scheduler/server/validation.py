"""GenerateRequest -> what the engine runs, or an InvalidRequest naming the field and the limit.

Sampling fields, edges included (what the engine gets):
- temperature: a finite number >= 0 (NaN and inf are INVALID_ARGUMENT); 0 or unset is greedy.
  At or below MIN_TEMPERATURE (1e-5) the request is served greedy (temperature 0), as vLLM does: such
  a temperature only tells apart logits closer than about 1e-4, and greedy decoding is
  deterministic and verifies drafts by argmax. Any larger finite value is sampled as given: a
  huge one (up to 3.4e38, float's largest) is uniform over the tokens top_k / top_p keep.
- top_p: in (0, 1] (NaN is INVALID_ARGUMENT); a tiny one keeps the single likeliest token.
- top_k: 0 (unset) or any value >= the vocabulary size means no limit.
- seed: any uint64.
- logprobs: unset (none) or 0..MAX_TOP_LOGPROBS (20) alternatives per emitted token.
The engine itself stays safe past these rules (workers/engine/sampler.py): any finite temperature
> 0 gives a distribution, and a request whose logits are not finite fails alone.
"""

import math
import uuid
from dataclasses import dataclass

from specserve.v1 import generation_pb2 as pb
from specserve.workers.engine.logprobs import MAX_TOP_LOGPROBS
from specserve.workers.engine.sequence import SamplingParams

from specserve.scheduler.prompts import Prompt, PromptError

DEFAULT_MAX_TOKENS = 128
MAX_STOP_STRINGS = 16
MAX_ID_CHARS = 128  # request_id and cache_salt
MIN_TEMPERATURE = 1e-5  # this temperature or a lower one is served greedy


class InvalidRequest(ValueError):
    """str() is '<field>: <what is wrong and the limit>'."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ServedModel:
    """What validation needs to know of the server."""

    name: str
    tokenizer: object  # transformers tokenizer
    context_length: int
    vocab_size: int
    spec_method: str  # the server's method, "none" if it does not speculate
    known_spec_methods: tuple[str, ...]  # every method name specserve knows
    max_draft_tokens: int  # 0 if the server does not speculate

    @property
    def spec_methods(self) -> tuple[str, ...]:
        """The values a request's spec.method may take."""
        return ("none",) if self.spec_method == "none" else ("none", self.spec_method)


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    spec_method: str
    cache_salt: str


def validate(request: pb.GenerateRequest, model: ServedModel) -> ValidRequest:
    prompt_ids = _prompt_ids(request, model)
    room = model.context_length - len(prompt_ids)
    if room < 1:
        field = request.WhichOneof("input")
        raise InvalidRequest(field, f"{len(prompt_ids)} prompt tokens leave no room for a new token in the "
                                    f"context length {model.context_length}")
    if request.HasField("max_tokens"):
        if request.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be >= 1, got {request.max_tokens}")
        if request.max_tokens > room:
            raise InvalidRequest("max_tokens", f"{request.max_tokens} new + {len(prompt_ids)} prompt tokens exceed "
                                               f"the context length {model.context_length} (at most {room})")
    max_tokens = request.max_tokens if request.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, room)
    temperature = request.temperature if request.HasField("temperature") else 0.0
    if not temperature >= 0 or math.isinf(temperature):
        raise InvalidRequest("temperature", f"must be a finite number >= 0, got {temperature}")
    if temperature <= MIN_TEMPERATURE:  # float32's 1e-5 is a little below 1e-5
        temperature = 0.0  # greedy (module docstring)
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} strings, got {len(request.stop)}")
    for i, s in enumerate(request.stop):
        if not s:
            raise InvalidRequest(f"stop[{i}]", "must not be empty")
    if request.HasField("logprobs") and request.logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest("logprobs", f"at most {MAX_TOP_LOGPROBS}, got {request.logprobs}")
    spec_method, max_draft = _spec(request.spec, model)
    for field in ("request_id", "cache_salt"):
        if len(getattr(request, field)) > MAX_ID_CHARS:
            raise InvalidRequest(field, f"at most {MAX_ID_CHARS} characters, got {len(getattr(request, field))}")
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
        ignore_eos=request.ignore_eos, max_draft_tokens=max_draft,
        logprobs=request.logprobs if request.HasField("logprobs") else None,
    )
    return ValidRequest(request.request_id or f"req-{uuid.uuid4().hex}", prompt_ids, params, spec_method,
                        request.cache_salt)


def _prompt_ids(request: pb.GenerateRequest, model: ServedModel) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("prompt", "one of prompt, messages or prompt_token_ids is required")
    if kind == "prompt_token_ids":
        ids = list(request.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequest("prompt_token_ids", "must hold at least one token id")
        bad = next((i for i, t in enumerate(ids) if t >= model.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt_token_ids[{bad}]", f"{ids[bad]} is not below the vocabulary size "
                                                              f"{model.vocab_size}")
        return ids
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt", "must not be empty")
        prompt = Prompt(text=request.prompt)
    else:
        messages = request.messages.messages
        if not messages:
            raise InvalidRequest("messages", "must hold at least one message")
        for i, m in enumerate(messages):
            if not m.role:
                raise InvalidRequest(f"messages[{i}].role", "must not be empty")
        prompt = Prompt(messages=tuple({"role": m.role, "content": m.content} for m in messages))
    try:
        ids = prompt.token_ids(model.tokenizer)
    except PromptError as e:
        raise InvalidRequest(kind, str(e)) from None
    if not ids:
        raise InvalidRequest(kind, "tokenizes to no tokens")
    return ids


def _spec(spec: pb.SpecOptions, model: ServedModel) -> tuple[str, int | None]:
    """(method name, the request's max_draft_tokens for SamplingParams: None = the engine's)."""
    method = spec.method or model.spec_method
    if method not in model.spec_methods:
        known = method in model.known_spec_methods or all(p in model.known_spec_methods for p in method.split("+"))
        why = "is not served here" if known else "is unknown"
        raise InvalidRequest("spec.method", f"{method!r} {why} (allowed: {', '.join(model.spec_methods)})")
    if method == "none":
        return "none", 0
    if spec.max_draft_tokens > model.max_draft_tokens:
        raise InvalidRequest("spec.max_draft_tokens", f"at most {model.max_draft_tokens}, got {spec.max_draft_tokens}")
    return method, spec.max_draft_tokens or None
