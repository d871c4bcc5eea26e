"""A request inside the engine: its tokens, sampling parameters, blocks and state."""

import enum
import hashlib
import itertools
import math
import secrets
import time
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from specserve.workers.engine.kv_cache import BlockTable
from specserve.workers.engine.logprobs import MAX_TOP_LOGPROBS


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached, or the model's context is full
    ABORT = "abort"  # cancelled by the caller


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # same seed, same prompt -> same sampled tokens
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    ignore_eos: bool = False
    max_draft_tokens: int | None = None  # this request's cap on draft tokens per step; None = the engine's, 0 = off
    # Log-probabilities of every emitted token (RequestOutput.new_logprobs, see logprobs.py for the
    # distribution): None = none; k = the token's own and its position's k likeliest, 0..MAX_TOP_LOGPROBS.
    logprobs: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.max_draft_tokens is not None and self.max_draft_tokens < 0:
            raise ValueError(f"max_draft_tokens must be >= 0, got {self.max_draft_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be None or in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Resumed:
    """A request resubmitted after its worker was lost: the prompt's last `tokens` ids are output
    an earlier attempt delivered, `text_chars` characters of their text were delivered."""

    tokens: int
    text_chars: int

    def __post_init__(self):
        if self.tokens < 1 or self.text_chars < 0:
            raise ValueError(f"resumed tokens must be >= 1 and text_chars >= 0, got {self.tokens}, {self.text_chars}")


@dataclass(frozen=True)
class SpecCounters:
    """How a request's tokens were produced. Counted per sequence by the engine, summed over a
    loop's finished requests (LoopStats) and over a Ray request's attempts. Every field is a count
    that adds up: adding a counter here adds it everywhere (a field, nothing else)."""

    decode_steps: int = 0  # forwards that produced tokens for the sequence
    spec_steps: int = 0  # of those, verify steps over a draft tree
    drafted_tokens: int = 0  # draft tokens verified (the tree's nodes but its root)
    accepted_tokens: int = 0  # draft tokens accepted (bonus tokens not counted)

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")

    def __add__(self, other: "SpecCounters") -> "SpecCounters":
        return SpecCounters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


class SequenceView(Protocol):
    """What an output says about its request (RequestOutput.seq): an engine Sequence, or the
    scheduler's summary of a request streamed from a Ray verify worker."""

    prompt_ids: list[int]
    output_ids: list[int]  # every token delivered so far
    cached_tokens: int  # prompt tokens whose KV came from a prefix cache
    spec: SpecCounters


_ids = itertools.count()


def stream_seed(base: int, position: int) -> int:
    """The seed of one position's draw: (base, position) hashed, so the draws of a request's
    positions, and of requests with nearby seeds, never overlap (base + position would: seed s at
    position n + 1 is seed s + 1 at position n)."""
    digest = hashlib.blake2b(f"{base}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")  # any uint64 is a valid torch seed


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    table: BlockTable = field(default_factory=BlockTable)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache
    spec: SpecCounters = SpecCounters()  # replaced (frozen) as steps add to it
    cache_salt: str = ""  # requests with different salts never share cached prefix blocks
    stream_base: int | None = None  # sampling only: keys its random draws (noise); None: params.seed, else fresh entropy
    _noise: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # position -> noise

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("prompt must have at least one token")
        if not self.params.greedy and self.stream_base is None:
            self.stream_base = self.params.seed if self.params.seed is not None else secrets.randbits(63)

    def noise(self, position: int, vocab: int) -> torch.Tensor:
        """[vocab] the random draw that picks the token at index `position` of prompt + output
        (sampler.race): i.i.d. Exp(1) variables from (stream_base, position) alone. Nothing else
        moves it: not the step, the draft tree, nor a resubmission with the output as prompt."""
        if self.stream_base is None:
            raise ValueError("greedy requests draw no noise")
        if position not in self._noise:
            for old in [p for p in self._noise if p < self.num_tokens]:
                del self._noise[old]  # positions already decided
            generator = torch.Generator().manual_seed(stream_seed(self.stream_base, position))
            # clamped: an exact 0 would make p / noise infinite (or NaN where p is 0)
            self._noise[position] = torch.empty(vocab).exponential_(generator=generator).clamp_min_(1e-30)
        return self._noise[position]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        """Tokens whose K/V sit in the cache."""
        return self.table.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
