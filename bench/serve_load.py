"""`specserve bench serve`: ShareGPT prompts at rising concurrency against a gRPC server.

Per concurrency level, `concurrency` client threads share a list of requests (each takes the
next when its last one ends) with speculation off (request spec.method "none") and on (the
server's default), side by side on the same server: aggregate tokens/s, TTFT and inter-token
latency p50/p99. Without --server, a server is started in this process on a free loopback port.
"""

import json
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from specserve.scheduler.client import Client

from specserve.bench.prompt_sets import sharegpt_prompts

MODES = ("off", "on")  # speculation per request: "none" vs the server's default


@dataclass
class LevelResult:
    concurrency: int
    mode: str
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)  # per token: chunk gap / tokens in the chunk

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "spec": self.mode, "requests": self.requests, "tokens": self.tokens,
                "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
                "ttft_p50_s": percentile(self.ttft_s, 50), "ttft_p99_s": percentile(self.ttft_s, 99),
                "itl_p50_s": percentile(self.itl_s, 50), "itl_p99_s": percentile(self.itl_s, 99)}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_level(client: Client, requests: list[dict], concurrency: int, mode: str) -> LevelResult:
    result, lock, todo = LevelResult(concurrency, mode), threading.Lock(), list(reversed(requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                fields = todo.pop()
            start = last = time.perf_counter()
            ttft, itl, n = None, [], 0
            for chunk in client.generate(**fields, spec_method="none" if mode == "off" else ""):
                now = time.perf_counter()
                if chunk.token_ids:
                    if ttft is None:
                        ttft = now - start
                    else:
                        itl += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                    last, n = now, n + len(chunk.token_ids)
            with lock:
                result.requests += 1
                result.tokens += n
                result.ttft_s.append(ttft)
                result.itl_s += itl

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - start
    return result


def run_serve_bench(args) -> dict:
    levels = [int(c) for c in args.concurrency.split(",")]
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency must list positive integers, got {args.concurrency!r}")
    prompts = sharegpt_prompts(max(args.requests_per_level, 2 * max(levels)), args.seed)
    server = None
    target = args.server
    if target is None:
        server, target = _start_server(args)
    try:
        with Client(target) as client:
            info = client.model_info()
            print(f"{info.model} at {target}: speculation '{info.default_spec_method}' vs none; "
                  f"levels {levels}, {args.max_new_tokens} tokens per request, ShareGPT seed {args.seed}")
            # warm-up: the first request of a fresh process pays one-time costs
            list(client.generate(messages=[{"role": "user", "content": "Hello"}], max_tokens=8))
            results = []
            for c in levels:
                n = max(args.requests_per_level, 2 * c)
                requests = [{"messages": list(p.messages), "max_tokens": args.max_new_tokens, "ignore_eos": True}
                            for p in prompts[:n]]
                for mode in MODES:
                    results.append(run_level(client, requests, c, mode))
                    print(_row(results[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    report = _report(results, levels, info, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "serve_load.png")
    print(f"results: {out / 'serve_load.json'}, plot: {out / 'serve_load.png'}")
    return report


def _start_server(args):
    from specserve.scheduler.cli.main import engine_options
    from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
    from specserve.workers.model.loader import load_engine
    from specserve.workers.spec.methods import SpecConfig, default_method

    options = engine_options(args)  # the model arguments; speculation as `specserve serve` defaults it
    options["config"] = replace(options["config"], spec=SpecConfig(default_method(None), args.spec_tokens))
    server = ServerThread(ServerConfig(port=0, metrics_port=None, max_queued=max(64, 4 * args.requests_per_level)))
    server.attach(load_engine(args.model, **options), args.model)
    return server, f"127.0.0.1:{server.port}"


def _row(r: LevelResult) -> str:
    s = r.summary()
    return (f"c={r.concurrency:<3} spec {r.mode:<3} {s['tokens_per_s']:7.1f} tok/s  TTFT p50 {s['ttft_p50_s']:.3f} "
            f"p99 {s['ttft_p99_s']:.3f} s  ITL p50 {1e3 * s['itl_p50_s']:.1f} p99 {1e3 * s['itl_p99_s']:.1f} ms")


def _report(results: list[LevelResult], levels: list[int], info, args) -> dict:
    by = {(r.concurrency, r.mode): r.tokens_per_s for r in results}
    lo, hi = min(levels), max(levels)
    checks = {
        f"on_c{hi}_over_c{lo}": by[hi, "on"] / by[lo, "on"],
        f"off_c{hi}_over_c{lo}": by[hi, "off"] / by[lo, "off"],
        "on_over_off_min": min(by[c, "on"] / by[c, "off"] for c in levels),
        "on_over_off": {c: by[c, "on"] / by[c, "off"] for c in levels},
    }
    print(f"throughput c={hi} / c={lo}: spec on {checks[f'on_c{hi}_over_c{lo}']:.2f}x, "
          f"off {checks[f'off_c{hi}_over_c{lo}']:.2f}x (target >= 3); spec on / off at each level: "
          + ", ".join(f"c={c} {v:.2f}" for c, v in checks["on_over_off"].items()) + " (target >= 1)")
    return {"suite": "serve", "model": info.model, "spec_method": info.default_spec_method,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "statistics": checks,
            "levels": [r.summary() for r in results]}


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rows = [r for r in report["levels"] if r["spec"] == mode]
        xs = [r["concurrency"] for r in rows]
        thr.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=f"spec {mode}")
        lat.plot(xs, [1e3 * r["itl_p50_s"] for r in rows], marker="o", label=f"ITL p50, spec {mode}")
        lat.plot(xs, [1e3 * r["ttft_p50_s"] for r in rows], marker="x", linestyle="--", label=f"TTFT p50, spec {mode}")
    thr.set(xscale="log", xlabel="concurrent streams", ylabel="aggregate tokens/s", title=report["model"])
    lat.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="latency")
    for ax in (thr, lat):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
