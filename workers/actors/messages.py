"""What crosses the process boundary between the scheduler and the worker actors.

A request is sent in full once (VerifyRequest, DraftSync with full=True), then only diffs (the
tokens committed since the last DraftSync). Token lists are plain Python lists; tensors only
travel inside PrefixKV (contiguous CPU tensors in the Ray object store).
"""

from dataclasses import dataclass, field

from specserve.workers.engine.logprobs import TokenLogprobs
from specserve.workers.engine.sequence import FinishReason, Resumed, SamplingParams, SpecCounters
from specserve.workers.spec.draft_tree import DraftTree


@dataclass(frozen=True)
class VerifyRequest:
    request_id: str
    prompt_ids: list[int]  # [P] the prompt; on a resubmission, the prompt + every token already emitted
    params: SamplingParams  # on a resubmission, max_new_tokens is what is left
    cache_salt: str = ""
    resumed: Resumed | None = None  # on a resubmission: how much of prompt_ids is delivered output

    @classmethod
    def empty(cls) -> "VerifyRequest":
        return cls("", [0], SamplingParams())


@dataclass(frozen=True)
class StreamChunk:
    """What one engine step produced for a request, as the verify worker streams it.

    The counters are cumulative over this attempt (a resubmitted request starts them again)."""

    request_id: str
    new_token_ids: list[int]  # [n] tokens accepted this step (several with speculation)
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set on the last chunk when the request failed
    invalid: bool = False  # with error: the request itself was bad (never retry it)
    cached_tokens: int = 0
    spec: SpecCounters = SpecCounters()
    new_logprobs: list[TokenLogprobs] | None = None  # [n] one per new token if params.logprobs is set

    @property
    def final(self) -> bool:
        return self.finished or self.error is not None


@dataclass(frozen=True)
class DraftSync:
    """One sequence's part of a batched DraftWorker.propose call."""

    key: str  # the request id
    max_nodes: int  # the tree's size limit, root included
    new_tokens: list[int]  # [n] committed tokens since the last sync (every token when full)
    full: bool = False  # new_tokens is the whole sequence: start (or restart) the worker's copy
    params: SamplingParams | None = None  # with full
    draft_prefix: list | None = None  # with full: [ObjectRef of PrefixKV], the draft model's prompt K/V


@dataclass(frozen=True)
class DraftStats:
    sequences: int  # sequences the worker keeps state for
    kv_blocks_total: int
    kv_blocks_free: int
    handed_tokens: int  # prompt tokens whose draft K/V came from a prefill worker
    proposals: int
    propose_seconds: float = 0.0  # compute time in propose calls


@dataclass(frozen=True)
class WorkerInfo:
    """A verify worker's description of what it serves (the scheduler builds ServedModel from it)."""

    model: str
    node_id: str
    tokenizer: object  # a transformers tokenizer (picklable)
    fingerprint: str
    context_length: int
    vocab_size: int
    block_size: int
    spec_method: str  # "none" when speculation is off
    max_draft_tokens: int
    draft_remote: bool = False  # the model drafter runs in a DraftWorker
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DraftedTrees:
    trees: list[DraftTree | None]  # per DraftSync; None: the worker lacks the sequence, send it full
