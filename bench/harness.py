"""What every benchmark shares: its base config, timed runs of our engine and of transformers,
and summaries. Each suite's `run_*` takes its own frozen config (a BenchConfig); the CLI
(scheduler/cli/bench.py) builds them from flags, and nothing here imports the CLI."""

import math
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.workers.engine.llm_engine import LLMEngine
from specserve.workers.engine.sequence import SamplingParams, Sequence


@dataclass(frozen=True)
class BenchConfig:
    """What every suite takes: the model, the prompts (per category, picked with `seed`), the
    tokens to generate per prompt, and the folder for the JSON results."""

    model: str = "smollm2-135m"
    num_prompts: int = 8  # per category (HumanEval code, ShareGPT chat)
    max_new_tokens: int = 128
    seed: int = 0  # prompt selection
    out: Path = Path("bench/results")

    def __post_init__(self):
        for name in ("num_prompts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First position where two token lists differ (a length difference counts); None if equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run_ours(engine: LLMEngine, ids: list[int], n: int, cache_salt: str | None = None) -> tuple[list[int], float, Sequence]:
    """Exactly n new greedy tokens (end-of-sequence ignored); returns tokens, seconds, sequence.
    By default each run has a fresh cache salt: like transformers, it recomputes the whole prompt,
    never reusing what an earlier run left in our prefix cache. A given cache_salt shares what
    earlier runs with that salt cached (multi-turn traces, where that reuse is the point)."""
    start = time.perf_counter()
    salt = uuid.uuid4().hex if cache_salt is None else cache_salt
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), cache_salt=salt)
    while engine.has_unfinished():
        engine.step()
    return seq.output_ids, time.perf_counter() - start, seq


def run_hf(model, ids: list[int], n: int, lookup: bool = False) -> tuple[list[int], float]:
    """transformers generate(): exactly n greedy tokens, optionally with prompt lookup (10 tokens)."""
    x = torch.tensor([ids])
    extra = {"prompt_lookup_num_tokens": 10} if lookup else {}
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **extra)
    return out[0, len(ids):].tolist(), time.perf_counter() - start


def hf_model_like(loaded):
    """The same weights in transformers, same dtype, from the same local folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(loaded.source.folder, dtype=loaded.engine.model.dtype,
                                                local_files_only=True).eval()
