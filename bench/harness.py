"""What every benchmark shares: timed runs of our engine and of transformers, and summaries."""

import math
import statistics
import time

import torch

from specserve.workers.engine.llm_engine import LLMEngine
from specserve.workers.engine.sequence import SamplingParams, Sequence


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First position where two token lists differ (a length difference counts); None if equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run_ours(engine: LLMEngine, ids: list[int], n: int) -> tuple[list[int], float, Sequence]:
    """Exactly n new greedy tokens (end-of-sequence ignored); returns tokens, seconds, sequence."""
    start = time.perf_counter()
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))
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
