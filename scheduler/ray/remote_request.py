"""One request streamed from VerifyWorkers, across resubmissions after worker deaths.

Everything delivered is kept (`seq.output_ids`, and the text): a resubmission sends the prompt +
those tokens and asks for what is left, so nothing is lost or delivered twice; the worker replays
the delivered tokens into its detokenizer, so text held back at the loss (a character split
across tokens, a possible stop string) is delivered, and a stop string spanning the resubmission
point still ends the request. A sampled request always has a seed (one is drawn when the caller
gave none): every attempt draws the same per-position noise (Sequence.noise). The counters of
each attempt are summed into what the servicer reports; the cache hit is the first attempt's.
"""

import asyncio
import dataclasses
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from specserve.workers.actors.messages import StreamChunk, VerifyRequest
from specserve.workers.engine.engine_loop import OutputCallback
from specserve.workers.engine.llm_engine import RequestOutput
from specserve.workers.engine.sequence import FinishReason, Resumed, SamplingParams, SpecCounters

if TYPE_CHECKING:
    from specserve.scheduler.ray.actor_pool import VerifyReplica

log = logging.getLogger("specserve.remote_request")


@dataclass
class RemoteSequence:
    """A remote request's SequenceView (RequestOutput.seq): summed over its attempts."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)  # every token delivered
    cached_tokens: int = 0
    spec: SpecCounters = SpecCounters()


@dataclass(eq=False)
class RemoteRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str
    on_output: OutputCallback
    replica: "VerifyReplica"  # the one serving the current attempt
    seq: RemoteSequence = field(init=False)  # what the outputs carry: the prompt, every token delivered
    done_spec: SpecCounters = SpecCounters()  # counters of finished attempts
    text_chars: int = 0  # characters of text delivered
    first_cached: int | None = None  # cached prompt tokens of the first attempt that sent a chunk
    last: StreamChunk | None = None  # the last chunk of this attempt
    attempts: int = 0  # resubmissions after a worker was lost mid-request
    unstarted: int = 0  # submissions to a worker that was unavailable (restarting)
    cancelled: bool = False
    done: bool = False  # the last output was delivered
    task: asyncio.Task | None = None  # driving it, on the backend's event loop

    def __post_init__(self):
        self.seq = RemoteSequence(list(self.prompt_ids))
        if not self.params.greedy and self.params.seed is None:
            # every attempt draws the same noise (Sequence.noise): a resubmission samples on
            # where the lost worker left off, as it would have without the fault
            self.params = dataclasses.replace(self.params, seed=secrets.randbits(63))

    def next_request(self) -> VerifyRequest:
        """The prompt and every token delivered so far; the tokens still to generate."""
        left = self.params.max_new_tokens - len(self.seq.output_ids)
        params = dataclasses.replace(self.params, max_new_tokens=left)
        out = self.seq.output_ids
        return VerifyRequest(self.request_id, self.prompt_ids + out, params, self.cache_salt,
                             Resumed(len(out), self.text_chars) if out else None)

    def end_attempt(self, started: bool) -> None:
        """The worker was lost; started: it had taken the request (sent a chunk)."""
        if self.last is not None:
            self.done_spec += self.last.spec
            if self.first_cached is None:
                self.first_cached = self.last.cached_tokens
        self.last = None
        if started:
            self.attempts += 1
        else:
            self.unstarted += 1

    def absorb(self, chunk: StreamChunk) -> RequestOutput:
        self.last = chunk
        s = self.seq
        s.output_ids.extend(chunk.new_token_ids)
        self.text_chars += len(chunk.new_text)
        s.cached_tokens = chunk.cached_tokens if self.first_cached is None else self.first_cached
        s.spec = self.done_spec + chunk.spec
        return RequestOutput(self.request_id, chunk.new_token_ids, chunk.new_text, chunk.finished,
                             chunk.finish_reason, s, new_logprobs=chunk.new_logprobs)

    def deliver(self, item: RequestOutput | Exception) -> None:
        """Hands an output to the receiver; nothing after the last one."""
        if self.done:
            return
        self.done = isinstance(item, Exception) or item.finished
        try:
            self.on_output(item)
        except Exception:  # noqa: BLE001 - a broken receiver must not stop the backend
            log.exception("output callback of request %s failed", self.request_id)

    def finish(self, reason: FinishReason) -> None:
        """Ends the request with what it has (ABORT: cancelled; LENGTH: every token delivered)."""
        self.deliver(RequestOutput(self.request_id, [], "", True, reason, self.seq))


class WorkerLost(RuntimeError):
    """The verify worker serving a request died or stopped answering. started: it had taken the
    request (sent a chunk); a worker that was unavailable before that emitted nothing for it."""

    def __init__(self, message: str, started: bool = True):
        super().__init__(message)
        self.started = started
