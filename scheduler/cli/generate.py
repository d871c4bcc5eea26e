"""`specserve generate`: run prompts through the in-process engine, stream text or print JSON."""

import json
import sys
import time
from dataclasses import dataclass

from specserve.workers.engine.llm_engine import LLMEngine
from specserve.workers.engine.sequence import SamplingParams

from specserve.scheduler.prompts import Prompt


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's outcome; `to_json` is the `--json` line."""

    token_ids: list[int]  # completion only
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    elapsed_s: float  # this prompt's prefill + decode wall time, model load excluded
    finish_reason: str
    spec_method: str
    spec_steps: int
    drafted_tokens: int
    accepted_tokens: int

    def to_json(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_s": round(self.ttft_s, 6),
            "elapsed_s": round(self.elapsed_s, 6),
            "finish_reason": self.finish_reason,
            "spec": {
                "method": self.spec_method,
                "steps": self.spec_steps,
                "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens,
            },
        }


def run_prompt(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, on_text=None,
               prefill=None) -> GenerationResult:
    """Generates for one prompt; on_text(delta) is called as text becomes final.
    prefill(prompt_ids) -> PrefixKV | None: K/V computed elsewhere (a prefill group), in the timing."""
    start = time.perf_counter()
    token_ids, text, last = [], [], None
    prefix_kv = prefill(prompt_ids) if prefill is not None else None
    for out in engine.generate(prompt_ids, params, prefix_kv=prefix_kv):
        token_ids.extend(out.new_token_ids)
        if out.new_text:
            text.append(out.new_text)
            if on_text:
                on_text(out.new_text)
        last = out
    seq = last.seq
    return GenerationResult(
        token_ids=token_ids,
        text="".join(text),
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(token_ids),
        cached_tokens=seq.cached_tokens,
        ttft_s=seq.first_token_time - start,
        elapsed_s=seq.finish_time - start,
        finish_reason=seq.finish_reason.value,
        spec_method=engine.spec_method(seq),
        spec_steps=seq.spec.decode_steps,
        drafted_tokens=seq.spec.drafted_tokens,
        accepted_tokens=seq.spec.accepted_tokens,
    )


def generate_all(engine: LLMEngine, prompts: list[Prompt], params: SamplingParams, as_json: bool,
                 prefill=None) -> None:
    """Runs each prompt in turn; streams text to stdout, or prints one JSON line per prompt.
    prefill: as in run_prompt (long prompts to a prefill group)."""
    emit_all(prompts, lambda prompt, on_text: run_prompt(engine, prompt.token_ids(engine.tokenizer), params, on_text,
                                                         prefill), as_json)


def emit_all(prompts: list[Prompt], run, as_json: bool) -> None:
    """run(prompt, on_text) -> GenerationResult for each prompt in turn; text streams to stdout
    as it comes, or one JSON line per prompt is printed."""
    for prompt in prompts:
        if as_json:
            print(json.dumps(run(prompt, None).to_json()), flush=True)
        else:
            run(prompt, lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            sys.stdout.write("\n")
            sys.stdout.flush()
