"""`specserve bench rayserve`: a verify worker reached through a Ray Serve deployment handle vs a
direct Ray actor handle, at rising stream counts (the question Ray Serve role pools stand on).

Two VerifyWorkers of the same model, dtype, threads and speculation run in one embedded local
Ray: one as a plain actor (today's pools) and one as the single replica of a Serve deployment
(`serve.deployment(VerifyWorker)`, application `specserve`, no Serve proxies: the gRPC/HTTP edge
stays in the scheduler). The bench process streams the same requests (ShareGPT chat prompts,
greedy, exactly `max_new_tokens`) to each: `generate` with `num_returns="streaming"` on the
actor, `.options(stream=True)` on the handle; both yield one list of StreamChunks per engine
step. The paths take turns (the first one alternating) for `rounds` rounds per level, with a
cache salt per path, level and round so no side finds what another cached. Reported: tokens/s
per path and the serve/actor ratio per level, inter-token p50/p99, greedy outputs compared at
one stream (where batching cannot change them), and the CPU time and memory of Serve's
controller while it ran.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from specserve.cluster.ray_cluster import RayConnectConfig, connect, disconnect
from specserve.scheduler.prompts import Prompt
from specserve.scheduler.ray.actor_pool import WORKER_ENV
from specserve.workers.actors.messages import VerifyRequest
from specserve.workers.actors.verify import VerifyWorker
from specserve.workers.actors.worker_model import WorkerModel
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.loader import LoadOptions
from specserve.workers.spec.methods import SpecConfig, default_method

from specserve.bench.harness import BenchConfig, first_difference
from specserve.bench.prompt_sets import sharegpt_prompts
from specserve.bench.serve_load import percentile

PATHS = ("actor", "serve")
APP = "specserve"
MAX_QUEUED = 64


@dataclass(frozen=True)
class RayServeBenchConfig(BenchConfig):
    concurrency: tuple[int, ...] = (1, 16)  # stream counts, one level each
    requests_per_level: int = 16  # per path and round; at least the concurrency are sent
    rounds: int = 2  # the paths take turns this many times per level
    threads: int = 2
    dtype: str = "auto"
    spec_tokens: int = 0  # `specserve serve`'s default method, at most this many draft tokens (0: sized)

    def __post_init__(self):
        super().__post_init__()
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency must list positive integers, got {self.concurrency!r}")
        for name in ("requests_per_level", "rounds", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class PathLevel:
    tokens: int = 0
    wall_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    outputs: dict[int, list[int]] = field(default_factory=dict)  # prompt index -> greedy tokens (last round)

    def summary(self) -> dict:
        return {"tokens": self.tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens / self.wall_s,
                "itl_p50_ms": 1e3 * percentile(self.itl_s, 50), "itl_p99_ms": 1e3 * percentile(self.itl_s, 99)}


def run_rayserve_bench(config: RayServeBenchConfig) -> dict:
    import ray
    from ray import serve

    spec = SpecConfig(default_method(None), config.spec_tokens)
    options = LoadOptions(dtype=config.dtype, threads=config.threads, config=EngineConfig(spec=spec), progress=False)
    worker_model = WorkerModel(config.model, options)
    connect(RayConnectConfig(num_cpus=max(4, config.threads)))
    common = {"num_cpus": 1, "runtime_env": {"env_vars": WORKER_ENV}}
    try:
        actor = ray.remote(VerifyWorker).options(**common, max_task_retries=0).remote(worker_model, MAX_QUEUED)
        info = ray.get(actor.ready.remote())
        serve.start(proxy_location="Disabled")
        deployment = serve.deployment(VerifyWorker, name="verify", num_replicas=1, max_ongoing_requests=MAX_QUEUED,
                                      ray_actor_options=common)
        handle = serve.run(deployment.bind(worker_model, MAX_QUEUED), name=APP, route_prefix=None,
                           logging_config={"enable_access_log": False, "log_level": "WARNING"})
        controller = _controller_process()
        print(f"{config.model}: speculation {info.spec_method} (<= {info.max_draft_tokens} draft tokens), "
              f"{config.threads} threads; levels {list(config.concurrency)}, {config.rounds} rounds of "
              f"{config.requests_per_level} requests per path, {config.max_new_tokens} tokens each")
        prompts = sharegpt_prompts(max(config.requests_per_level, max(config.concurrency)), config.seed)
        ids = [Prompt(text=p.text, messages=p.messages).token_ids(info.tokenizer) for p in prompts]
        streams = {"actor": lambda r: _actor_stream(actor, r), "serve": lambda r: _serve_stream(handle, r)}
        cpu_before, controller_wall = _cpu_seconds(controller), time.perf_counter()
        levels = asyncio.run(_measure(config, streams, ids))
        controller_wall = time.perf_counter() - controller_wall
        report = {"suite": "rayserve", "model": config.model, "spec_method": info.spec_method,
                  "threads": config.threads, "max_new_tokens": config.max_new_tokens, "rounds": config.rounds,
                  "requests_per_level": config.requests_per_level, "levels": levels,
                  "serve_controller": {"cpu_percent": 100 * (_cpu_seconds(controller) - cpu_before) / controller_wall,
                                       "rss_mb": controller.memory_info().rss / 2**20 if controller else None},
                  "serve_proxies": "none (proxy_location Disabled)"}
    finally:
        try:
            serve.shutdown()
        finally:
            disconnect()
    _print(report)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rayserve_vs_actors.json").write_text(json.dumps(report, indent=2))
    print(f"results: {out / 'rayserve_vs_actors.json'}")
    return report


async def _measure(config: RayServeBenchConfig, streams: dict, ids: list[list[int]]) -> list[dict]:
    for path in PATHS:  # warm-up: one-time costs of each path
        await _level(streams[path], ids[:1], 1, 8, "warm-up")
    levels = []
    for i, c in enumerate(config.concurrency):
        n = max(config.requests_per_level, c)
        sides = {path: PathLevel() for path in PATHS}
        for k in range(config.rounds):
            for path in PATHS if (i + k) % 2 == 0 else tuple(reversed(PATHS)):  # alternate who goes first
                got = await _level(streams[path], ids[:n], c, config.max_new_tokens, f"{path}-{c}-{k}")
                _add(sides[path], got)
                print(f"  c={c:<3} round {k + 1}/{config.rounds} {path:<6} {got.tokens / got.wall_s:7.1f} tok/s",
                      flush=True)
        levels.append(_level_report(c, sides))
    return levels


async def _actor_stream(actor, request: VerifyRequest):
    async for ref in actor.generate.options(num_returns="streaming").remote(request):
        yield await ref


async def _serve_stream(handle, request: VerifyRequest):
    async for chunks in handle.options(stream=True).generate.remote(request):
        yield chunks


async def _level(stream, ids: list[list[int]], concurrency: int, max_new_tokens: int, salt: str) -> PathLevel:
    """len(ids) requests over `concurrency` streams (each takes the next prompt when its last ends)."""
    result, todo = PathLevel(), list(enumerate(ids))
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)

    async def worker():
        while todo:
            index, prompt = todo.pop(0)
            request = VerifyRequest(uuid.uuid4().hex, prompt, params, cache_salt=f"bench-{salt}")
            tokens, last = [], time.perf_counter()
            async for chunks in stream(request):
                new = [t for chunk in chunks for t in chunk.new_token_ids]
                if any(chunk.error for chunk in chunks):
                    raise RuntimeError(f"request failed: {next(c.error for c in chunks if c.error)}")
                now = time.perf_counter()
                if new and tokens:
                    result.itl_s += [(now - last) / len(new)] * len(new)
                if new:
                    last = now
                tokens += new
            result.tokens += len(tokens)
            result.outputs[index] = tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    return result


def _add(total: PathLevel, part: PathLevel) -> None:
    total.tokens += part.tokens
    total.wall_s += part.wall_s
    total.itl_s += part.itl_s
    total.outputs = part.outputs


def _level_report(concurrency: int, sides: dict[str, PathLevel]) -> dict:
    summaries = {path: side.summary() for path, side in sides.items()}
    mismatches = None
    if concurrency == 1:  # one stream: no batching, so greedy tokens must be identical
        a, s = sides["actor"].outputs, sides["serve"].outputs
        mismatches = sum(first_difference(a[i], s[i]) is not None for i in a)
    return {"concurrency": concurrency, **summaries,
            "serve_over_actor": summaries["serve"]["tokens_per_s"] / summaries["actor"]["tokens_per_s"],
            "greedy_mismatches": mismatches}


def _controller_process():
    """Serve's controller process on this machine (psutil), or None."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any("ServeController" in part for part in p.info["cmdline"] or ()):
            return p
    return None


def _cpu_seconds(process) -> float:
    if process is None:
        return 0.0
    t = process.cpu_times()
    return t.user + t.system


def _print(report: dict) -> None:
    print(f"\n{'streams':>8}{'actor tok/s':>13}{'serve tok/s':>13}{'serve/actor':>13}"
          f"{'ITL p99 actor':>15}{'ITL p99 serve':>15}{'mismatches':>12}")
    for r in report["levels"]:
        print(f"{r['concurrency']:>8}{r['actor']['tokens_per_s']:>13.1f}{r['serve']['tokens_per_s']:>13.1f}"
              f"{r['serve_over_actor']:>13.3f}{r['actor']['itl_p99_ms']:>13.0f}ms{r['serve']['itl_p99_ms']:>13.0f}ms"
              f"{'-' if r['greedy_mismatches'] is None else r['greedy_mismatches']:>12}")
    c = report["serve_controller"]
    rss = "?" if c["rss_mb"] is None else f"{c['rss_mb']:.0f} MB"
    print(f"Serve controller: {c['cpu_percent']:.1f}% of a core, {rss} resident; proxies: {report['serve_proxies']}")
