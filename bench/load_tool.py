"""A real OpenAI-speaking load tool from PyPI (GuideLLM) against `specserve serve`.

    .venv/bin/python -m specserve.bench.load_tool          # about 7 minutes on 2 shared CPU cores

Contract:
- GuideLLM (pinned GUIDELLM_VERSION) lives in its own virtual environment `.venv-loadtool/` at the
  repository root, created on first use, so its dependencies never change the project's pinned
  ones. Its torch is pinned to this environment's build (`2.13.0+cpu` here: pip finds it where
  this one came from, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
- GuideLLM counts tokens with the served model's own tokenizer: the local Hugging Face folder
  that `--model` resolves to (for the embedded GGUF, the folder converted once into the cache).
  Nothing is fetched from a hub.
- The server is `specserve serve --no-ray` on 127.0.0.1 (a free HTTP port, gRPC port 0, no
  metrics port); readiness is GET /health == 200, polled. It is stopped with SIGTERM (its graceful
  shutdown); an exit code other than 0, or no exit within STOP_TIMEOUT_S, is an error.
- The profile is fixed (PROFILE): GuideLLM's synthetic prompts, streamed /v1/completions with
  `ignore_eos`, concurrency 1 then 8, GuideLLM's warm-up (WARMUP_REQUESTS) left out. Into `--out`
  (bench/results/load_tool/) go GuideLLM's own reports (benchmarks.json, benchmarks.csv) and
  console output (guidellm.txt), the scenario it ran (scenario.json), the server's log
  (server.log) and run.json (machine, versions, commands, headline numbers).
"""

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from specserve.workers.model.cpu_info import cpu_info
from specserve.workers.model.model_source import resolve_model

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-loadtool"
GUIDELLM_VERSION = "0.8.1"
READY_TIMEOUT_S = 300.0  # model load (first run: the GGUF conversion) and the latency profile
POLL_S = 0.2  # interval between readiness checks
STOP_TIMEOUT_S = 60.0  # the server's graceful shutdown
RUN_TIMEOUT_S = 1200.0  # the whole GuideLLM run


@dataclass(frozen=True)
class Profile:
    """What GuideLLM sends: `requests[i]` requests at `streams[i]` concurrent streams."""

    streams: tuple[int, ...]
    requests: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    seed: int

    def __post_init__(self):
        if not self.streams or len(self.streams) != len(self.requests):
            raise ValueError(f"streams and requests must be equally long and not empty, got {self.streams}, "
                             f"{self.requests}")
        for name, values in (("streams", self.streams), ("requests", self.requests),
                             ("prompt_tokens", (self.prompt_tokens,)), ("output_tokens", (self.output_tokens,))):
            if min(values) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


PROFILE = Profile(streams=(1, 8), requests=(24, 40), prompt_tokens=128, output_tokens=128, seed=0)
WARMUP_REQUESTS = 2  # per stream count: the first requests (cold caches) stay out of the statistics


def ensure_venv() -> Path:
    """The guidellm executable of .venv-loadtool, installing it there first if missing."""
    guidellm = VENV / "bin" / "guidellm"
    if guidellm.exists():
        return guidellm
    print(f"creating {VENV} with guidellm=={GUIDELLM_VERSION}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    constraints = VENV / "constraints.txt"
    constraints.write_text(f"torch=={importlib.metadata.version('torch')}\n")  # the same build as ours
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "-c", str(constraints), f"guidellm=={GUIDELLM_VERSION}"], check=True)
    return guidellm


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base: str) -> int | None:
    """GET /health's status, or None when nothing answers yet."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_ready(server: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (status := health(base)) != 200:
        try:
            code = server.wait(timeout=POLL_S)  # the poll interval; returns early if the server died
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            raise RuntimeError(f"specserve serve exited {code} before it was ready:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"GET {base}/health not 200 after {READY_TIMEOUT_S:.0f}s (last: {status})")


def stop(server: subprocess.Popen) -> int:
    """SIGTERM, then the exit code; kills it and raises if it does not exit in time."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        return server.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        raise RuntimeError(f"specserve serve still running {STOP_TIMEOUT_S:.0f}s after SIGTERM; killed") from None


def served_model(base: str) -> str:
    """The one model GET /v1/models lists."""
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
        [model] = [m["id"] for m in json.load(response)["data"]]
    return model


def scenario(base: str, model: str, tokenizer: Path, profile: Profile) -> dict:
    """A GuideLLM scenario file (the shape of its built-in ones): one sub-benchmark per stream count,
    the first WARMUP_REQUESTS requests of each left out of its statistics; reports go to its
    working folder."""
    return {
        "metadata": {"name": "specserve-load-tool", "description": "specserve serve --no-ray, concurrent streams"},
        "spec": {
            "backend": {"kind": "openai_http", "target": base, "model": model, "request_format": "/v1/completions"},
            "profile": {"kind": "concurrent", "streams": profile.streams[0],
                        "warmup": {"value": WARMUP_REQUESTS, "mode": "requests"}},
            "constraints": [{"kind": "max_requests", "count": profile.requests[0]}],
            "tokenizer": {"kind": "hf_auto", "model": str(tokenizer)},
            "data": [{"kind": "synthetic_text", "prompt_tokens": profile.prompt_tokens,
                      "output_tokens": profile.output_tokens}],
            "seed": {"kind": "static", "value": profile.seed},
            "metrics": {"kind": "generative", "sample_size": 0},  # no prompt/output text in the report
            "outputs": [{"kind": "json", "path": "benchmarks.json"}, {"kind": "csv", "path": "benchmarks.csv"},
                        {"kind": "console"}],
        },
        "benchmarks": [{"profile.streams": streams, "constraints[0].count": requests}
                       for streams, requests in zip(profile.streams, profile.requests, strict=True)],
    }


def _stat(metrics: dict, name: str, key: str) -> float:
    """One statistic of a GuideLLM metric over successful requests: "mean", "median", "p95", ..."""
    value = metrics[name]["successful"]
    return round(value["percentiles"][key] if key.startswith("p") else value[key], 2)


def summary(report: dict) -> list[dict]:
    """Headline numbers per sub-benchmark of GuideLLM's benchmarks.json (successful requests)."""
    rows = []
    for benchmark in report["benchmarks"]:
        m = benchmark["metrics"]
        rows.append({"streams": benchmark["config"]["strategy"]["streams"], **m["request_totals"],
                     "output_tok_s": _stat(m, "output_tokens_per_second", "mean"),
                     "ttft_ms_p50": _stat(m, "time_to_first_token_ms", "p50"),
                     "ttft_ms_p95": _stat(m, "time_to_first_token_ms", "p95"),
                     "itl_ms_p50": _stat(m, "inter_token_latency_ms", "p50"),
                     "itl_ms_p95": _stat(m, "inter_token_latency_ms", "p95"),
                     "latency_s_p50": _stat(m, "request_latency", "p50")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specserve.bench.load_tool", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="served model (name or path)")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_tool")
    parser.add_argument("--serve-args", default="", help="more `specserve serve` flags, word-split")
    args = parser.parse_args(argv)

    guidellm = ensure_venv()
    source = resolve_model(args.model, progress=False)  # the tokenizer GuideLLM counts with
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [str(Path(sys.executable).parent / "specserve"), "serve", "--no-ray", "--host", "127.0.0.1",
             "--port", "0", "--http-port", str(port), "--no-metrics", "--model", args.model,
             "--threads", str(args.threads), *args.serve_args.split()]
    tool = [str(guidellm), "run", "--scenario", "scenario.json", "--disable-console-interactive"]
    tool_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "GUIDELLM__LOGGING__CONSOLE_COLORIZE": "false"}
    cpu = cpu_info()
    print(f"CPU {cpu.describe()}; server: {' '.join(serve)}", flush=True)

    started, load_before = time.monotonic(), os.getloadavg()[0]
    with open(args.out / "server.log", "wb") as server_log:
        server = subprocess.Popen(serve, stdin=subprocess.DEVNULL, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        wait_ready(server, base, args.out / "server.log")
        model = served_model(base)
        (args.out / "scenario.json").write_text(json.dumps(scenario(base, model, source.folder, PROFILE), indent=2))
        print(f"ready after {time.monotonic() - started:.1f}s; {' '.join(tool)}", flush=True)
        with open(args.out / "guidellm.txt", "wb") as tool_log:
            tool_rc = subprocess.run(tool, check=False, env=tool_env, cwd=args.out, stdin=subprocess.DEVNULL,
                                     stdout=tool_log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S).returncode
    finally:
        server_rc = stop(server)
    print((args.out / "guidellm.txt").read_text(errors="replace")[-6000:])

    run = {"cpu": cpu.describe(), "cores": os.cpu_count(), "python": platform.python_version(),
           "guidellm": GUIDELLM_VERSION, "specserve_serve": serve, "guidellm_command": tool,
           "profile": asdict(PROFILE), "model": model, "tokenizer": str(source.folder),
           "wall_s": round(time.monotonic() - started, 1), "load_average_1min": [load_before, os.getloadavg()[0]],
           "guidellm_exit": tool_rc, "server_exit": server_rc}
    if tool_rc == 0:
        run["summary"] = summary(json.loads((args.out / "benchmarks.json").read_text()))
        for row in run["summary"]:
            print(", ".join(f"{k} {v}" for k, v in row.items()))
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"reports in {args.out}; guidellm exited {tool_rc}, the server {server_rc}")
    return 0 if tool_rc == 0 and server_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
