"""`specserve bench ray`: one stream's tokens/s in-process vs through the Ray worker actors.

Both paths run side by side in one process on the same prompts, model, dtype and threads, and
alternate prompt by prompt (so machine noise hits both): the in-process engine on an
EngineLoop thread, and a RayBackend (embedded local Ray: a VerifyWorker, a PrefillWorker, and a
DraftWorker for spec method `model`) through the same submit/callback interface. One request at
a time. Tokens must be identical (greedy); the ratio is the geometric mean of per-prompt
tokens/s ratios. The actor path's engine step is broken down into verify, draft (the
DraftWorker call: compute and round trip) and the rest of the wall time (streaming the tokens
back, Ray and the scheduler: "transfer + scheduling").
"""

import json
import queue
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from specserve.cluster.placement import RoleSpec
from specserve.cluster.ray_cluster import RayConnectConfig, connect, disconnect
from specserve.scheduler.prompts import Prompt
from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.engine_loop import EngineLoop
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.spec.methods import SpecConfig
from specserve.workers.actors.worker_model import WorkerModel

from specserve.bench.harness import BenchConfig, first_difference, geomean
from specserve.bench.prompt_sets import humaneval_prompts, sharegpt_prompts

TIMEOUT_S = 600.0


@dataclass
class PathResult:
    tokens_per_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0
    accepted: int = 0
    spec_steps: int = 0


def _run(loop, ids: list[int], n: int):
    """One request through an engine loop (in-process or remote); tokens, seconds, last output."""
    outputs: queue.Queue = queue.Queue()
    tokens = []
    start = time.perf_counter()
    loop.submit(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), uuid.uuid4().hex, outputs.put)
    while True:
        item = outputs.get(timeout=TIMEOUT_S)
        if isinstance(item, Exception):
            raise item
        tokens.extend(item.new_token_ids)
        if item.finished:
            return tokens, time.perf_counter() - start, item


@dataclass(frozen=True)
class RayBenchConfig(BenchConfig):
    methods: tuple[str, ...] = ("ngram", "recycling", "ngram+recycling")  # spec methods, each in-process vs actors
    spec_tokens: int = 0  # most draft tokens per step (0: sized from the measured latency)
    draft_model: str | None = None  # also run spec method model with this draft model
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 2

    def __post_init__(self):
        super().__post_init__()
        for m in self.methods:
            SpecConfig(m, self.spec_tokens, self.draft_model if "model" in m else None)  # errors before any load
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def run_ray_bench(config: RayBenchConfig) -> dict:
    methods = list(config.methods)
    if config.draft_model and "model" not in methods:
        methods.append("model")
    threads = config.threads
    prompts = humaneval_prompts(config.num_prompts, config.seed) + sharegpt_prompts(config.num_prompts, config.seed)
    connect(RayConnectConfig(num_cpus=max(4, threads)))
    print(f"seed {config.seed}: {config.num_prompts} HumanEval + {config.num_prompts} ShareGPT prompts, "
          f"{config.max_new_tokens} new tokens, {threads} threads; one stream at a time")
    report = {"seed": config.seed, "max_new_tokens": config.max_new_tokens, "threads": threads, "methods": {}}
    try:
        for method in methods:
            report["methods"][method] = _bench_method(config, method, threads, prompts)
    finally:
        disconnect()
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ray_vs_inprocess.json").write_text(json.dumps(report, indent=2))
    _print_table(report)
    print(f"results: {out_dir / 'ray_vs_inprocess.json'}")
    return report


def _bench_method(bench: RayBenchConfig, method: str, threads: int, prompts) -> dict:
    draft = bench.draft_model if "model" in method else None
    config = EngineConfig(spec=SpecConfig(method, bench.spec_tokens, draft))
    options = LoadOptions(device=bench.device, dtype=bench.dtype, threads=threads, config=config, progress=False)
    loaded = load_engine(bench.model, options)
    engine = loaded.engine
    local = EngineLoop(engine, 4).start()
    backend = RayBackend(RayBackendConfig(name=f"bench-{uuid.uuid4().hex[:6]}",
                                          verify=RoleSpec(1, num_cpus=1), prefill=RoleSpec(1, num_cpus=0.5),
                                          draft=RoleSpec(1 if draft else 0, num_cpus=0.5)),
                         WorkerModel(bench.model, options), connect())
    try:
        remote = backend.start()[0]
        warm = engine.tokenizer("def warm_up():")["input_ids"]
        _run(local, warm, 8)
        _run(remote, warm, 8)
        before = _worker_breakdown(backend)
        ours, actors = PathResult(), PathResult()
        mismatches, long_prompts = [], 0
        for p in prompts:
            ids = Prompt(text=p.text, messages=p.messages).token_ids(engine.tokenizer)
            long_prompts += len(ids) >= backend.config.prefill_threshold
            steps_before = local.steps
            ref, t_local, last_local = _run(local, ids, bench.max_new_tokens)
            _record(ours, len(ref), t_local, local.steps - steps_before, last_local.seq)
            out, t_remote, last_remote = _run(remote, ids, bench.max_new_tokens)
            _record(actors, len(out), t_remote, 0, last_remote.seq)
            diff = first_difference(out, ref)
            if diff is not None:
                mismatches.append({"prompt_id": p.prompt_id, "first_difference": diff})
        after = _worker_breakdown(backend)
    finally:
        backend.shutdown()
        local.stop(timeout=10)
    actors.steps = after["steps"] - before["steps"]
    ratios = [a / b for a, b in zip(actors.tokens_per_s, ours.tokens_per_s)]
    per_step = lambda seconds, steps: 1000 * seconds / max(steps, 1)  # noqa: E731 - ms
    draft_s = after["draft_seconds"] - before["draft_seconds"]
    draft_compute_s = after["draft_compute_seconds"] - before["draft_compute_seconds"]
    step_s = after["step_seconds"] - before["step_seconds"]
    return {
        "ratio_actors_vs_in_process": geomean(ratios),
        "in_process": {"tokens_per_s": geomean(ours.tokens_per_s), "ms_per_step": per_step(ours.seconds, ours.steps),
                       "steps": ours.steps, "spec_steps": ours.spec_steps,
                       "mean_accepted_per_spec_step": ours.accepted / max(ours.spec_steps, 1)},
        "actors": {"tokens_per_s": geomean(actors.tokens_per_s), "ms_per_step": per_step(actors.seconds, actors.steps),
                   "steps": actors.steps, "spec_steps": actors.spec_steps,
                   "draft_calls": after["draft_calls"] - before["draft_calls"],
                   "mean_accepted_per_spec_step": actors.accepted / max(actors.spec_steps, 1)},
        "actor_step_breakdown_ms": {
            "verify": per_step(step_s - draft_s, actors.steps),
            "draft_compute": per_step(draft_compute_s, actors.steps),
            "draft_call_overhead": per_step(draft_s - draft_compute_s, actors.steps),
            "transfer_and_scheduling": per_step(actors.seconds - step_s, actors.steps),
        },
        "prompts": len(prompts), "prompts_prefilled_by_prefill_worker": long_prompts,
        "prefix_tokens_handed_over": after["prefix_tokens"] - before["prefix_tokens"],
        "mismatches": mismatches,
    }


def _record(r: PathResult, n: int, seconds: float, steps: int, seq) -> None:
    r.tokens_per_s.append(n / seconds)
    r.seconds += seconds
    r.tokens += n
    r.steps += steps
    r.accepted += seq.spec.accepted_tokens
    r.spec_steps += seq.spec.spec_steps


def _worker_breakdown(backend: RayBackend) -> dict:
    import ray

    b = ray.get(backend.loops[0].handle.breakdown.remote())
    compute = 0.0
    if backend.pool.draft_handles:
        compute = ray.get(backend.pool.draft_handles[0].stats.remote()).propose_seconds
    return {"steps": b["steps"], "step_seconds": b["step_seconds"], "prefix_tokens": b["prefix_tokens"],
            "draft_seconds": b["draft"]["seconds"], "draft_compute_seconds": compute, "draft_calls": b["draft"]["calls"]}


def _print_table(report: dict) -> None:
    print(f"{'method':<18}{'in-proc tok/s':>14}{'actors tok/s':>14}{'ratio':>8}{'ms/step in':>12}{'ms/step act':>12}"
          f"{'verify':>8}{'draft':>8}{'d.rpc':>8}{'xfer+sch':>9}{'mismatch':>9}")
    for method, r in report["methods"].items():
        b = r["actor_step_breakdown_ms"]
        print(f"{method:<18}{r['in_process']['tokens_per_s']:>14.1f}{r['actors']['tokens_per_s']:>14.1f}"
              f"{r['ratio_actors_vs_in_process']:>8.3f}{r['in_process']['ms_per_step']:>12.1f}"
              f"{r['actors']['ms_per_step']:>12.1f}{b['verify']:>8.1f}{b['draft_compute']:>8.1f}"
              f"{b['draft_call_overhead']:>8.1f}{b['transfer_and_scheduling']:>9.1f}{len(r['mismatches']):>9}")
