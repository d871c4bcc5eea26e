"""`specserve bench engine`: our engine (speculation off) vs transformers generate(), in one run.

Both get the same weights, dtype, thread count and prompts (HumanEval code, ShareGPT chat; see
BENCH.md) and make exactly N greedy tokens each: ours with ignore_eos, transformers with no
end-of-sequence id (so, like ours, it may emit the eos token and go on) and min_new_tokens=N.
Per prompt the two alternate which runs first, so drift on a shared machine hits both alike.

Also measured: memory bandwidth, and the floor it sets on a decode step (weight bytes / bandwidth);
our mean decode step is reported against it.
"""

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.workers.model.loader import LoadOptions, load_engine

from specserve.bench.harness import BenchConfig, first_difference, geomean, hf_model_like, run_ours
from specserve.bench.membw import decode_floor, measure_bandwidth
from specserve.workers.model.cpu_info import cpu_info
from specserve.bench.prompt_sets import BenchPrompt, humaneval_prompts, sharegpt_prompts

DEFAULT_THREADS = 2  # the machines have 2 cores
WARMUP_TOKENS = 8
# Runs of each side per prompt, alternating which goes first; the fastest of each side counts.
# Noise on a shared machine only ever adds time, so the best run is the least disturbed one.
REPEATS = 2


@dataclass(frozen=True)
class Timed:
    """One generation: its tokens and wall times (prefill + decode, model load excluded)."""

    token_ids: list[int]  # completion only
    elapsed_s: float
    ttft_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s

    @property
    def decode_step_s(self) -> float:
        """Mean time per token after the first (the first comes with prefill)."""
        return (self.elapsed_s - self.ttft_s) / max(1, len(self.token_ids) - 1)


@dataclass(frozen=True)
class PromptResult:
    prompt_id: str
    category: str  # "code" or "chat"
    prompt_tokens: int
    ours: Timed  # the fastest of our runs
    hf: Timed  # the fastest of transformers' runs
    ours_runs_s: list[float]  # elapsed of every run, in run order
    hf_runs_s: list[float]
    repeatable: bool  # every run of a side made the same tokens

    @property
    def ratio(self) -> float:
        """Our tokens/s over transformers' (> 1: ours is faster)."""
        return self.ours.tokens_per_s / self.hf.tokens_per_s

    @property
    def first_difference(self) -> int | None:
        return first_difference(self.ours.token_ids, self.hf.token_ids)

    @property
    def agreement(self) -> float:
        """Fraction of positions where both made the same token."""
        n = max(len(self.ours.token_ids), len(self.hf.token_ids), 1)
        return sum(a == b for a, b in zip(self.ours.token_ids, self.hf.token_ids)) / n

    def to_json(self) -> dict:
        def side(t: Timed) -> dict:
            return {"completion_tokens": len(t.token_ids), "elapsed_s": t.elapsed_s, "ttft_s": t.ttft_s,
                    "tokens_per_s": t.tokens_per_s, "decode_step_s": t.decode_step_s}

        return {
            "prompt": self.prompt_id, "category": self.category, "prompt_tokens": self.prompt_tokens,
            "ours": side(self.ours), "hf": side(self.hf), "ratio": self.ratio,
            "agreement": self.agreement, "first_difference": self.first_difference,
            "ours_runs_s": self.ours_runs_s, "hf_runs_s": self.hf_runs_s, "repeatable": self.repeatable,
        }


class _TokenClock:
    """A transformers streamer that only notes when tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_ours(engine, ids: list[int], n: int) -> Timed:
    tokens, elapsed, seq = run_ours(engine, ids, n)
    return Timed(tokens, elapsed, seq.first_token_time - seq.arrival_time)


def time_hf(model, ids: list[int], n: int) -> Timed:
    """transformers generate(), greedy, exactly n tokens whatever they are."""
    x = torch.tensor([ids])  # [1, T]
    clock = _TokenClock()
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, streamer=clock)
    elapsed = time.perf_counter() - start
    first = clock.times[1] if len(clock.times) > 1 else start + elapsed
    return Timed(out[0, len(ids):].tolist(), elapsed, first - start)


@dataclass(frozen=True)
class EngineBenchConfig(BenchConfig):
    load: LoadOptions = field(default_factory=lambda: LoadOptions(threads=DEFAULT_THREADS))  # speculation off
    repeats: int = REPEATS  # runs per side and prompt; the best counts

    def __post_init__(self):
        super().__post_init__()
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        method = self.load.config.spec.method
        if method != "none":
            raise ValueError(f"the engine suite measures our engine with speculation off, got spec method {method!r}")


def run_engine_bench(config: EngineBenchConfig) -> dict:
    loaded = load_engine(config.model, config.load)
    engine = loaded.engine
    hf = hf_model_like(loaded)
    n = config.max_new_tokens
    repeats = config.repeats
    prompts = humaneval_prompts(config.num_prompts, config.seed) + sharegpt_prompts(config.num_prompts, config.seed)
    print(f"seed {config.seed}: {config.num_prompts} HumanEval + {config.num_prompts} ShareGPT prompts, "
          f"{n} new tokens, best of {repeats} runs per side; model {loaded.source.name}, {engine.model.dtype}, "
          f"torch.get_num_threads() = {torch.get_num_threads()}", flush=True)
    print(f"CPU {cpu_info().describe()}; kernel paths: {engine.model.kernels.describe()}", flush=True)

    warm = engine.tokenizer("def warm_up():")["input_ids"]
    time_ours(engine, warm, WARMUP_TOKENS)
    time_hf(hf, warm, WARMUP_TOKENS)
    results = [_run_pair(engine, hf, p, n, repeats, ours_first=i % 2 == 0)
               for i, p in enumerate(tqdm(prompts, desc="prompts", unit="prompt", file=sys.stderr))]

    bandwidth = measure_bandwidth(device=config.load.device)
    floor = decode_floor(engine.model.weight_bytes, bandwidth.copy_bytes_per_s)
    report = _report(config, loaded, results, repeats, bandwidth, floor)
    _print_table(report, results)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_vs_hf.json").write_text(json.dumps(report, indent=2))
    print(f"results: {out / 'engine_vs_hf.json'}")
    return report


def _run_pair(engine, hf, prompt: BenchPrompt, n: int, repeats: int, ours_first: bool) -> PromptResult:
    """Runs both sides `repeats` times on one prompt, swapping which goes first each time."""
    ids = prompt.token_ids(engine.tokenizer)
    ours, theirs = [], []
    for r in range(repeats):
        if ours_first == (r % 2 == 0):
            ours.append(time_ours(engine, ids, n))
            theirs.append(time_hf(hf, ids, n))
        else:
            theirs.append(time_hf(hf, ids, n))
            ours.append(time_ours(engine, ids, n))
    for name, runs in (("ours", ours), ("transformers", theirs)):
        for t in runs:
            if len(t.token_ids) != n:
                raise RuntimeError(f"{prompt.prompt_id}: {name} made {len(t.token_ids)} tokens, expected exactly {n}")
    repeatable = all(t.token_ids == runs[0].token_ids for runs in (ours, theirs) for t in runs)
    return PromptResult(prompt.prompt_id, prompt.category, len(ids), min(ours, key=lambda t: t.elapsed_s),
                        min(theirs, key=lambda t: t.elapsed_s), [t.elapsed_s for t in ours],
                        [t.elapsed_s for t in theirs], repeatable)


def _report(config: EngineBenchConfig, loaded, results: list[PromptResult], repeats: int, bandwidth, floor) -> dict:
    import transformers

    def ratio(category: str | None = None) -> float:
        return geomean([r.ratio for r in results if category in (None, r.category)])

    our_step = sum(r.ours.decode_step_s for r in results) / len(results)
    hf_step = sum(r.hf.decode_step_s for r in results) / len(results)
    return {
        "suite": "engine",
        "seed": config.seed,
        "num_prompts_per_category": config.num_prompts,
        "max_new_tokens": config.max_new_tokens,
        "repeats": repeats,
        "model": loaded.source.name,
        "cpu": cpu_info().model,
        "isa_flags": list(cpu_info().flags),
        "kernels": loaded.engine.model.kernels.to_json(),
        "model_fingerprint": loaded.source.fingerprint,
        "device": config.load.device,
        "dtype": str(loaded.engine.model.dtype),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "ratio_geomean": ratio(),
        "ratio_geomean_code": ratio("code"),
        "ratio_geomean_chat": ratio("chat"),
        "ratio_median": statistics.median(r.ratio for r in results),  # robust to one noisy prompt
        "ours_tokens_per_s_geomean": geomean([r.ours.tokens_per_s for r in results]),
        "hf_tokens_per_s_geomean": geomean([r.hf.tokens_per_s for r in results]),
        "identical_prompts": sum(r.first_difference is None for r in results),
        "repeatable_prompts": sum(r.repeatable for r in results),
        "token_agreement": sum(r.agreement for r in results) / len(results),
        "mismatches": [{"prompt": r.prompt_id, "first_difference": r.first_difference}
                       for r in results if r.first_difference is not None],
        "bandwidth": bandwidth.to_json(),
        "decode_floor": floor.to_json(),
        "ours_decode_step_mean_s": our_step,
        "hf_decode_step_mean_s": hf_step,
        "ours_step_over_floor": our_step / floor.floor_s,
        "hf_step_over_floor": hf_step / floor.floor_s,
        "prompts": [r.to_json() for r in results],
    }


def _print_table(r: dict, results: list[PromptResult]) -> None:
    print(f"\n{'prompt':16s} {'cat':4s} {'in':>5s} {'ours t/s':>8s} {'HF t/s':>7s} {'ratio':>6s} "
          f"{'TTFT ours':>9s} {'TTFT HF':>8s} {'step ours':>9s} {'step HF':>8s} {'agree':>6s}")
    for p in results:
        print(f"{p.prompt_id[:16]:16s} {p.category:4s} {p.prompt_tokens:5d} {p.ours.tokens_per_s:8.1f} "
              f"{p.hf.tokens_per_s:7.1f} {p.ratio:6.2f} {p.ours.ttft_s * 1e3:7.1f}ms {p.hf.ttft_s * 1e3:6.1f}ms "
              f"{p.ours.decode_step_s * 1e3:7.1f}ms {p.hf.decode_step_s * 1e3:6.1f}ms {p.agreement:6.1%}")
    print(f"\nours/HF tokens/s, geometric mean: {r['ratio_geomean']:.2f}x "
          f"(code {r['ratio_geomean_code']:.2f}x, chat {r['ratio_geomean_chat']:.2f}x; median {r['ratio_median']:.2f}x); "
          f"ours {r['ours_tokens_per_s_geomean']:.1f} tok/s, HF {r['hf_tokens_per_s_geomean']:.1f} tok/s")
    print(f"identical tokens on {r['identical_prompts']}/{len(results)} prompts, "
          f"token agreement {r['token_agreement']:.1%}; same tokens on every repeat: "
          f"{r['repeatable_prompts']}/{len(results)} prompts")
    for m in r["mismatches"]:
        print(f"  {m['prompt']}: first difference at token {m['first_difference']}")
    bw, fl = r["bandwidth"], r["decode_floor"]
    print(f"bandwidth: copy {bw['copy_GB_per_s']:.1f} GB/s (read+write), read {bw['read_GB_per_s']:.1f} GB/s; "
          f"floor {fl['weight_bytes'] / 1e6:.0f} MB / {fl['GB_per_s']:.1f} GB/s = {fl['floor_s'] * 1e3:.1f} ms per step")
    print(f"mean decode step: ours {r['ours_decode_step_mean_s'] * 1e3:.1f} ms = {r['ours_step_over_floor']:.2f}x the floor, "
          f"HF {r['hf_decode_step_mean_s'] * 1e3:.1f} ms = {r['hf_step_over_floor']:.2f}x")
