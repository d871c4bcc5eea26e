"""One request streamed from a VerifyWorker, across resubmissions after worker deaths.

Everything delivered is kept (`seq.output_ids`): a resubmission sends the prompt + those tokens
and asks for what is left, so nothing is lost or delivered twice. The step counters of each
attempt are summed into what the servicer reports.
"""

import asyncio
import dataclasses
from dataclasses import dataclass, field

from specserve.workers.actors.messages import StreamChunk, VerifyRequest
from specserve.workers.engine.llm_engine import RequestOutput
from specserve.workers.engine.engine_loop import OutputCallback
from specserve.workers.engine.sequence import SamplingParams

MAX_UNSTARTED_RETRIES = 10  # submissions to a worker that was restarting, per request


@dataclass
class SeqView:
    """What the servicer reads of a finished request's `seq`, summed over its attempts."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    decode_steps: int = 0
    spec_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class RemoteRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str
    on_output: OutputCallback
    seq: SeqView
    base: dict = field(default_factory=dict)  # counters of finished attempts
    last: StreamChunk | None = None  # the last chunk of this attempt
    attempts: int = 0  # resubmissions after a worker was lost mid-request
    unstarted: int = 0  # submissions to a worker that was unavailable (restarting)
    cancelled: bool = False
    done: bool = False
    task: asyncio.Task | None = None

    def next_request(self) -> VerifyRequest:
        """The prompt and every token delivered so far; the tokens still to generate."""
        left = self.params.max_new_tokens - len(self.seq.output_ids)
        params = dataclasses.replace(self.params, max_new_tokens=left)
        return VerifyRequest(self.request_id, self.prompt_ids + self.seq.output_ids, params, self.cache_salt)

    def end_attempt(self) -> None:
        if self.last is not None:
            for f in ("decode_steps", "spec_steps", "drafted_tokens", "accepted_tokens"):
                self.base[f] = self.base.get(f, 0) + getattr(self.last, f)
            self.base.setdefault("cached_tokens", self.last.cached_tokens)
        self.last = None

    def absorb(self, chunk: StreamChunk) -> RequestOutput:
        self.last = chunk
        self.seq.output_ids.extend(chunk.new_token_ids)
        s, b = self.seq, self.base
        s.cached_tokens = b.get("cached_tokens", chunk.cached_tokens)
        for f in ("decode_steps", "spec_steps", "drafted_tokens", "accepted_tokens"):
            setattr(s, f, b.get(f, 0) + getattr(chunk, f))
        return RequestOutput(self.request_id, chunk.new_token_ids, chunk.new_text, chunk.finished,
                             chunk.finish_reason, s)


class WorkerLost(RuntimeError):
    """The verify worker serving a request died or stopped answering. started: it had taken the
    request (sent a chunk); a worker that was unavailable before that emitted nothing for it."""

    def __init__(self, message: str, started: bool = True):
        super().__init__(message)
        self.started = started
