"""`specserve bench spec`: speculative decoding vs transformers, side by side in one run.

Per prompt, every contender runs back to back on the same tokens (greedy, a fixed number of
new tokens, end-of-sequence ignored): transformers `generate()`, transformers prompt lookup
(`prompt_lookup_num_tokens=10`), our engine with speculation off, and each drafter. Ratios
are geometric means of per-prompt tokens/s ratios. Outputs must be identical to ours with
speculation off; any mismatch is reported with its first differing position.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.scheduler.prompts import Prompt
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig

from specserve.bench.harness import BenchConfig, first_difference, geomean, hf_model_like, run_hf, run_ours
from specserve.bench.prompt_sets import humaneval_prompts, sharegpt_prompts

HF_GREEDY, HF_LOOKUP, OURS_NONE = "hf-generate", "hf-prompt-lookup", "none"


@dataclass
class Contender:
    name: str
    tokens_per_s: list[float] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    steps: int = 0
    accepted: int = 0
    drafted: int = 0
    mismatches: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class SpecBenchConfig(BenchConfig):
    methods: tuple[str, ...] = ("ngram", "recycling", "ngram+recycling")  # beside speculation off ("none")
    spec_tokens: int = 0  # most draft tokens per step (0: sized from the measured latency)
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 2

    def __post_init__(self):
        super().__post_init__()
        for m in self.methods:
            SpecConfig(m, self.spec_tokens)  # a bad method name or spec_tokens is an error before any load
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def run_spec_bench(config: SpecBenchConfig) -> dict:
    methods = [OURS_NONE, *[m for m in config.methods if m != OURS_NONE]]
    specs = [SpecConfig(m, config.spec_tokens) for m in methods]
    # Loaded with a drafter so the cached latency curve (or a fresh measurement) comes along.
    options = LoadOptions(device=config.device, dtype=config.dtype, threads=config.threads,
                          config=EngineConfig(spec=specs[-1]))
    loaded = load_engine(config.model, options)
    base = loaded.engine
    tokenizer = base.tokenizer
    curve = base.speculator.curve if base.speculator else None
    hf = hf_model_like(loaded)
    engines = {
        s.method: LLMEngine(base.model, tokenizer, EngineConfig(spec=s), base.eos_token_ids, latency_curve=curve)
        for s in specs
    }
    prompts = humaneval_prompts(config.num_prompts, config.seed) + sharegpt_prompts(config.num_prompts, config.seed)
    print(f"seed {config.seed}: {config.num_prompts} HumanEval + {config.num_prompts} ShareGPT prompts, "
          f"{config.max_new_tokens} new tokens, {torch.get_num_threads()} threads, {base.model.dtype}")
    contenders = {name: Contender(name) for name in [HF_GREEDY, HF_LOOKUP, *methods]}
    warm = tokenizer("def warm_up():")["input_ids"]
    for engine in engines.values():
        run_ours(engine, warm, 8)
    run_hf(hf, warm, 8, lookup=False)
    for p in tqdm(prompts, desc="prompts", unit="prompt"):
        ids = Prompt(text=p.text, messages=p.messages).token_ids(tokenizer)
        n = config.max_new_tokens
        ref, elapsed, _ = run_ours(engines[OURS_NONE], ids, n)
        _record(contenders[OURS_NONE], p.category, n, elapsed, ref, ref, p.prompt_id)
        for name, lookup in ((HF_GREEDY, False), (HF_LOOKUP, True)):
            out, elapsed = run_hf(hf, ids, n, lookup)
            _record(contenders[name], p.category, n, elapsed, out, ref, p.prompt_id)
        for m in methods[1:]:
            out, elapsed, seq = run_ours(engines[m], ids, n)
            c = contenders[m]
            _record(c, p.category, n, elapsed, out, ref, p.prompt_id)
            c.steps, c.accepted, c.drafted = c.steps + seq.spec.decode_steps, c.accepted + seq.spec.accepted_tokens, c.drafted + seq.spec.drafted_tokens
    report = _report(contenders, curve, config)
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec_vs_hf.json").write_text(json.dumps(report, indent=2))
    if curve is not None:
        _plot_curve(curve, out_dir / "verify_latency_vs_tree_size.png")
    print(f"results: {out_dir / 'spec_vs_hf.json'}")
    return report


def _record(c: Contender, category: str, n: int, elapsed: float, out: list[int], ref: list[int], prompt_id: str):
    c.tokens_per_s.append(n / elapsed)
    c.categories.append(category)
    diff = first_difference(out, ref)
    if diff is not None:
        c.mismatches.append({"prompt": prompt_id, "first_difference": diff})


def _ratio(a: Contender, b: Contender, category: str | None = None) -> float:
    pairs = [(x, y) for x, y, cat in zip(a.tokens_per_s, b.tokens_per_s, a.categories) if category in (None, cat)]
    return geomean([x / y for x, y in pairs])


def _report(contenders: dict[str, Contender], curve, config: SpecBenchConfig) -> dict:
    hf, lookup = contenders[HF_GREEDY], contenders[HF_LOOKUP]
    rows = {}
    print(f"\n{'contender':22s} {'tok/s':>7s} {'x HF gen':>9s} {'x HF PLD':>9s} {'code':>6s} {'chat':>6s} {'acc/step':>9s} mismatches")
    for name, c in contenders.items():
        row = {
            "tokens_per_s_geomean": geomean(c.tokens_per_s),
            "vs_hf_generate": _ratio(c, hf),
            "vs_hf_prompt_lookup": _ratio(c, lookup),
            "vs_hf_generate_code": _ratio(c, hf, "code"),
            "vs_hf_generate_chat": _ratio(c, hf, "chat"),
            "mean_accepted_per_step": c.accepted / c.steps if c.steps else None,
            "drafted_tokens": c.drafted,
            "accepted_tokens": c.accepted,
            "mismatches": c.mismatches,
        }
        rows[name] = row
        acc = f"{row['mean_accepted_per_step']:.2f}" if c.steps else "-"
        print(f"{name:22s} {row['tokens_per_s_geomean']:7.1f} {row['vs_hf_generate']:9.2f} {row['vs_hf_prompt_lookup']:9.2f} "
              f"{row['vs_hf_generate_code']:6.2f} {row['vs_hf_generate_chat']:6.2f} {acc:>9s} {len(c.mismatches)}")
    return {
        "seed": config.seed,
        "num_prompts_per_category": config.num_prompts,
        "max_new_tokens": config.max_new_tokens,
        "threads": torch.get_num_threads(),
        "contenders": rows,
        "verify_latency_curve": None if curve is None else {"slots": curve.slots, "seconds": curve.seconds},
    }


def _plot_curve(curve, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve.slots, [s * 1000 for s in curve.seconds], marker="o")
    ax.set_xlabel("tokens in the verify forward (tree size + root)")
    ax.set_ylabel("forward time (ms)")
    ax.set_title("Verify latency vs tree size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
