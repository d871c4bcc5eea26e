"""`specserve generate --server HOST:PORT`: the same prompts and output, served by a running server."""

import time
from pathlib import Path

from specserve.v1 import generation_pb2 as pb
from specserve.workers.engine.sequence import SamplingParams

from specserve.scheduler.client import Client
from specserve.scheduler.cli.generate import GenerationResult, emit_all
from specserve.scheduler.prompts import Prompt

FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


def request_fields(prompt: Prompt, params: SamplingParams, spec_method: str | None) -> dict:
    """Client.generate keywords for one prompt."""
    fields = {"messages": [dict(m) for m in prompt.messages]} if prompt.messages else {"prompt": prompt.text}
    return fields | {
        "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k, "seed": params.seed, "stop": params.stop, "ignore_eos": params.ignore_eos,
        "spec_method": spec_method or "",
    }


def run_remote(client: Client, fields: dict, on_text=None) -> GenerationResult:
    start = time.perf_counter()
    token_ids, text, first, last = [], [], None, None
    for chunk in client.generate(**fields):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        token_ids.extend(chunk.token_ids)
        if chunk.text:
            text.append(chunk.text)
            if on_text:
                on_text(chunk.text)
        last = chunk
    elapsed = time.perf_counter() - start
    return GenerationResult(
        token_ids=token_ids, text="".join(text), prompt_tokens=last.usage.prompt_tokens,
        completion_tokens=last.usage.completion_tokens, cached_tokens=last.usage.cached_tokens,
        ttft_s=(first or time.perf_counter()) - start, elapsed_s=elapsed,
        finish_reason=FINISH_NAMES[last.finish_reason], spec_method=last.spec.method, spec_steps=last.spec.steps,
        drafted_tokens=last.spec.drafted_tokens, accepted_tokens=last.spec.accepted_tokens,
    )


def generate_all_remote(target: str, prompts: list[Prompt], params: SamplingParams, spec_method: str | None,
                        as_json: bool, token: str | None = None, tls_ca: Path | None = None) -> None:
    """Like cli.generate.generate_all; gRPC errors become ValueError (one line, exit 2)."""
    import grpc

    with Client(target, token=token, root_certificates=tls_ca) as client:
        try:
            emit_all(prompts, lambda prompt, on_text: run_remote(
                client, request_fields(prompt, params, spec_method), on_text), as_json)
        except grpc.RpcError as e:
            raise ValueError(f"server {target}: {e.code().name}: {e.details()}") from None
