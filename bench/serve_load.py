"""`specserve bench serve`: ShareGPT prompts at rising concurrency against a specserve server.

Per concurrency level, `concurrency` client threads share a list of requests (each takes the
next when its last one ends) with speculation off (request spec.method "none") and on (the
server's default), side by side on the same server: aggregate tokens/s, TTFT and inter-token
latency p50/p99. Without --server, a server is started in a child process (server_process.py: never
in the clients' process, whose GIL it would share) on free loopback ports.

`api` picks the front door: gRPC (specserve's client) or the OpenAI HTTP API (chat completions
streamed with the `return_token_ids` extension so tokens per chunk are counted as over gRPC,
read as server-sent events with the standard library, as load tools such as `vllm bench serve`
read them). Not the `openai` package: its per-chunk models cost the client ~0.4 ms more CPU per
token than gRPC's client (measured), which on a 2-core box is taken from the server's engine
and showed as 5-10% fewer tokens/s over HTTP with the server doing the same work. Given both,
each level runs over both APIs on the same server, alternating which goes first, and the report
gives openai/grpc ratios (HTTP's overhead). Each level starts with an unmeasured warm-up (2 x
concurrency requests, speculation on). With `rounds` > 1 a level's sides take turns that many
times and each side's rounds are summed, so drift on a shared machine falls on every side
alike. CPU per token is reported for the server process and for the clients' (on a small
machine the clients' CPU is taken from the server).
"""

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from specserve.scheduler.client import Client

from specserve.workers.model.loader import LoadOptions

from specserve.bench.harness import BenchConfig
from specserve.bench.prompt_sets import sharegpt_prompts
from specserve.bench.server_process import ServerProcess, ServerSpec

MODES = ("off", "on")  # speculation per request: "none" vs the server's default


class Api(str, Enum):
    GRPC = "grpc"
    OPENAI = "openai"


# One streamed request: (request fields, spec method) -> the number of new tokens of each chunk.
Stream = Callable[[dict, str], Iterator[int]]


@dataclass(frozen=True)
class Served:
    model: str
    spec_method: str  # the server's default method


@dataclass
class LevelResult:
    api: Api
    concurrency: int
    mode: str
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)  # per token: chunk gap / tokens in the chunk
    server_cpu_s: float | None = None  # CPU time the server process used meanwhile (a server of our own)
    client_cpu_s: float = 0.0  # CPU time this (the load clients') process used meanwhile

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def summary(self) -> dict:
        return {"api": self.api.value, "concurrency": self.concurrency, "spec": self.mode, "requests": self.requests,
                "tokens": self.tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
                "ttft_p50_s": percentile(self.ttft_s, 50), "ttft_p99_s": percentile(self.ttft_s, 99),
                "itl_p50_s": percentile(self.itl_s, 50), "itl_p99_s": percentile(self.itl_s, 99),
                "server_cpu_ms_per_token": None if self.server_cpu_s is None else 1e3 * self.server_cpu_s / self.tokens,
                "client_cpu_ms_per_token": 1e3 * self.client_cpu_s / self.tokens}

    def add(self, other: "LevelResult") -> None:
        """Sums another round of the same side into this one."""
        self.requests += other.requests
        self.tokens += other.tokens
        self.wall_s += other.wall_s
        self.ttft_s += other.ttft_s
        self.itl_s += other.itl_s
        self.client_cpu_s += other.client_cpu_s
        if self.server_cpu_s is not None and other.server_cpu_s is not None:
            self.server_cpu_s += other.server_cpu_s


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_level(api: Api, stream: Stream, requests: list[dict], concurrency: int, mode: str,
              server_cpu: Callable[[], float] | None = None) -> LevelResult:
    """server_cpu: the server process's CPU seconds so far (its use during the level is reported:
    unlike wall time, what the front door costs the server does not vary with other load)."""
    result, lock, todo = LevelResult(api, concurrency, mode), threading.Lock(), list(reversed(requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                fields = todo.pop()
            start = last = time.perf_counter()
            ttft, itl, n = None, [], 0
            for new in stream(fields, "none" if mode == "off" else ""):
                now = time.perf_counter()
                if new:
                    if ttft is None:
                        ttft = now - start
                    else:
                        itl += [(now - last) / new] * new
                    last, n = now, n + new
            with lock:
                result.requests += 1
                result.tokens += n
                result.ttft_s.append(ttft)
                result.itl_s += itl

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu_start = server_cpu() if server_cpu else None
    client_cpu_start = time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - start
    result.client_cpu_s = time.process_time() - client_cpu_start
    if server_cpu:
        result.server_cpu_s = server_cpu() - cpu_start
    return result


@dataclass(frozen=True)
class ServeBenchConfig(BenchConfig):
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)  # stream counts, one level each
    requests_per_level: int = 8  # at least 2x the concurrency are sent
    rounds: int = 1  # each level's sides run this many times, interleaved (first side alternating), and are summed
    server: str | None = None  # host:port of a running server (its HTTP port for api openai); None: start one here
    apis: tuple[Api, ...] = (Api.GRPC,)  # front doors to load, each level over each
    load: LoadOptions = field(default_factory=LoadOptions)  # how that server loads config.model
    spec_tokens: int = 0  # its speculation: `specserve serve`'s default method, at most this many draft tokens

    def __post_init__(self):
        super().__post_init__()
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency must list positive integers, got {self.concurrency!r}")
        if self.requests_per_level < 1:
            raise ValueError(f"requests_per_level must be >= 1, got {self.requests_per_level}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not self.apis or len(set(self.apis)) != len(self.apis):
            raise ValueError(f"apis must list grpc and/or openai once each, got {self.apis!r}")
        if self.server is not None and len(self.apis) != 1:
            raise ValueError("--server takes one --api (a running server's gRPC or HTTP address)")


def run_serve_bench(config: ServeBenchConfig) -> dict:
    levels = list(config.concurrency)
    prompts = sharegpt_prompts(max(config.requests_per_level, 2 * max(levels)), config.seed)
    with contextlib.ExitStack() as stack:
        targets, server_cpu = {config.apis[0]: config.server}, None
        if config.server is None:  # a server of our own, in its own process (server_process.py)
            server = stack.enter_context(ServerProcess(_server_spec(config)))
            targets = {Api.GRPC: f"127.0.0.1:{server.grpc_port}", Api.OPENAI: f"127.0.0.1:{server.http_port}"}
            server_cpu = server.cpu_seconds
        opened = {api: stack.enter_context(_connect(api, targets[api])) for api in config.apis}
        served = next(iter(opened.values()))[1]
        print(f"{served.model} over {', '.join(a.value for a in config.apis)}: speculation "
              f"'{served.spec_method}' vs none; levels {levels}, {config.max_new_tokens} tokens per request, "
              f"ShareGPT seed {config.seed}")
        for stream, _ in opened.values():  # warm-up: the first request of each pays one-time costs
            list(stream({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                         "ignore_eos": False}, ""))
        results = []
        for i, c in enumerate(levels):
            n = max(config.requests_per_level, 2 * c)
            requests = [{"messages": list(p.messages), "max_tokens": config.max_new_tokens, "ignore_eos": True}
                        for p in prompts[:n]]
            # Unmeasured warm-up at this level: the speculation gate learns its on/off rates per load
            # level, so the first side measured at a level would otherwise pay for the learning.
            warm = [{**r, "cache_salt": f"bench-warm-{c}"} for r in requests[:2 * c]]
            run_level(config.apis[0], opened[config.apis[0]][0], warm, c, "on")
            sides: dict[tuple[Api, str], LevelResult] = {}
            for k in range(config.rounds):
                first = i + k  # alternate who goes first, across levels and rounds
                for j, api in enumerate(config.apis if first % 2 == 0 else reversed(config.apis)):
                    for mode in MODES if (first + j) % 2 == 0 else reversed(MODES):
                        # A salt per level, API, mode and round: no side finds prompts another side cached.
                        salted = [{**r, "cache_salt": f"bench-{c}-{api.value}-{mode}-{k}"} for r in requests]
                        got = run_level(api, opened[api][0], salted, c, mode, server_cpu)
                        if config.rounds > 1:
                            print(f"  round {k + 1}/{config.rounds}: " + _row(got), flush=True)
                        if (api, mode) in sides:
                            sides[api, mode].add(got)
                        else:
                            sides[api, mode] = got
            for side in sides.values():
                results.append(side)
                print(_row(side), flush=True)
    report = _report(results, levels, served, config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "serve_load.png")
    print(f"results: {out / 'serve_load.json'}, plot: {out / 'serve_load.png'}")
    return report


@contextlib.contextmanager
def _connect(api: Api, target: str) -> Iterator[tuple[Stream, Served]]:
    if api == Api.GRPC:
        with Client(target) as client:
            info = client.model_info()

            def stream(fields: dict, spec_method: str) -> Iterator[int]:
                return (len(chunk.token_ids) for chunk in client.generate(**fields, spec_method=spec_method))

            yield stream, Served(info.model, info.default_spec_method)
        return
    host, port = target.rsplit(":", 1)
    local, opened = threading.local(), []  # one keep-alive connection per client thread

    def post(path: str, body: dict | None = None) -> http.client.HTTPResponse:
        if getattr(local, "connection", None) is None:
            local.connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=600)
            opened.append(local.connection)
        local.connection.request("GET" if body is None else "POST", path, None if body is None else json.dumps(body),
                                 {"Content-Type": "application/json"})
        response = local.connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {response.read()[:500]!r}")
        return response

    model = json.loads(post("/v1/models").read())["data"][0]["id"]

    def stream(fields: dict, spec_method: str) -> Iterator[int]:
        body = {"model": model, "messages": fields["messages"], "stream": True,
                "max_completion_tokens": fields["max_tokens"], "ignore_eos": fields["ignore_eos"],
                "return_token_ids": True, "spec": {"method": spec_method}, "cache_salt": fields.get("cache_salt", "")}
        response = post("/v1/chat/completions", body)
        for line in response:  # SSE: "data: {chunk}" lines, then "data: [DONE]"
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream failed: {chunk['error']}")
                if chunk["choices"]:
                    yield len(chunk["choices"][0]["token_ids"])

    try:
        yield stream, Served(model, "the server's default")
    finally:
        for connection in opened:
            connection.close()


def _server_spec(config: ServeBenchConfig) -> ServerSpec:
    from specserve.workers.spec.methods import SpecConfig, default_method

    spec = SpecConfig(default_method(None), config.spec_tokens)  # speculation as `specserve serve` defaults it
    return ServerSpec(config.model, replace(config.load, config=replace(config.load.config, spec=spec)),
                      max_queued=max(64, 4 * config.requests_per_level), http=Api.OPENAI in config.apis)


def _row(r: LevelResult) -> str:
    s = r.summary()
    return (f"{r.api.value:<6} c={r.concurrency:<3} spec {r.mode:<3} {s['tokens_per_s']:7.1f} tok/s  "
            f"TTFT p50 {s['ttft_p50_s']:.3f} p99 {s['ttft_p99_s']:.3f} s  "
            f"ITL p50 {1e3 * s['itl_p50_s']:.1f} p99 {1e3 * s['itl_p99_s']:.1f} ms  "
            f"client CPU {s['client_cpu_ms_per_token']:.2f} ms/token")


def _report(results: list[LevelResult], levels: list[int], served: Served, config: ServeBenchConfig) -> dict:
    first = config.apis[0]
    by = {(r.api, r.concurrency, r.mode): r.tokens_per_s for r in results}
    lo, hi = min(levels), max(levels)
    checks = {
        f"on_c{hi}_over_c{lo}": by[first, hi, "on"] / by[first, lo, "on"],
        f"off_c{hi}_over_c{lo}": by[first, hi, "off"] / by[first, lo, "off"],
        "on_over_off_min": min(by[first, c, "on"] / by[first, c, "off"] for c in levels),
        "on_over_off": {c: by[first, c, "on"] / by[first, c, "off"] for c in levels},
    }
    print(f"{first.value}: throughput c={hi} / c={lo}: spec on {checks[f'on_c{hi}_over_c{lo}']:.2f}x, "
          f"off {checks[f'off_c{hi}_over_c{lo}']:.2f}x (target >= 3); spec on / off at each level: "
          + ", ".join(f"c={c} {v:.2f}" for c, v in checks["on_over_off"].items()) + " (target >= 1)")
    if len(config.apis) == 2:
        ratio = {c: {m: by[Api.OPENAI, c, m] / by[Api.GRPC, c, m] for m in MODES} for c in levels}
        checks["openai_over_grpc_tokens_per_s"] = ratio
        print("tokens/s openai / grpc: " + ", ".join(f"c={c} spec {m} {v:.3f}" for c, r in ratio.items()
                                                    for m, v in r.items()) + " (target >= 0.95)")
        cpu = {key: row["server_cpu_ms_per_token"] for row in (r.summary() for r in results)
               if (key := (row["api"], row["concurrency"], row["spec"])) and row["server_cpu_ms_per_token"]}
        if cpu:
            extra = {c: {m: cpu[Api.OPENAI.value, c, m] / cpu[Api.GRPC.value, c, m] for m in MODES} for c in levels}
            checks["openai_over_grpc_server_cpu_per_token"] = extra
            print("server CPU per token openai / grpc: " + ", ".join(
                f"c={c} spec {m} {v:.3f}" for c, r in extra.items() for m, v in r.items()))
    return {"suite": "serve", "model": served.model, "spec_method": served.spec_method,
            "apis": [a.value for a in config.apis], "max_new_tokens": config.max_new_tokens, "seed": config.seed,
            "statistics": checks, "levels": [r.summary() for r in results]}


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(10, 4))
    for api in report["apis"]:
        for mode in MODES:
            rows = [r for r in report["levels"] if r["spec"] == mode and r["api"] == api]
            xs, name = [r["concurrency"] for r in rows], f"{api}, spec {mode}"
            thr.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=name)
            lat.plot(xs, [1e3 * r["itl_p50_s"] for r in rows], marker="o", label=f"ITL p50, {name}")
            lat.plot(xs, [1e3 * r["ttft_p50_s"] for r in rows], marker="x", linestyle="--", label=f"TTFT p50, {name}")
    thr.set(xscale="log", xlabel="concurrent streams", ylabel="aggregate tokens/s", title=report["model"])
    lat.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="latency")
    for ax in (thr, lat):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
