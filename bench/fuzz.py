"""`specserve bench fuzz`: many hostile and ordinary requests at once against a running server.

Each request is a short valid prompt with one edge field (temperatures from 1e-45 to 3.4e38, top_p
and top_k edges, every speculation method and draft budget, stop strings, salts, duplicate request
ids), or an invalid one (NaN, negative, empty, out of range), sent over `streams` concurrent
streams. Some are cancelled after their first chunk, some carry a tiny deadline. Nothing here
waits on a fixed sleep: the end state is polled.

The server passes when every answer is one of the documented codes (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED), no request outlived its generous client timeout
(a stall), the server is SERVING afterwards with nothing queued or running and every KV block
free, and a greedy probe gives the same tokens before and after.
"""

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from specserve.scheduler.client import Client

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}
PROMPTS = ("def add(a, b):", "Hello", "The quick brown fox", "1, 2, 3, 4, 5, 6,", "a a a a a a a a", "x")
METHODS = ("", "none", "ngram", "recycling", "suffix", "model", "ngram+recycling", "model+ngram", "bogus")
PROBE = dict(prompt="def fibonacci(n):", max_tokens=16, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class FuzzBenchConfig:
    server: str  # host:port of a running `specserve serve`
    requests: int = 10_000
    streams: int = 8
    seed: int = 0
    stall_timeout_s: float = 120.0  # a request still open after this is a stall
    token: str | None = None
    out: Path | None = None  # JSON report

    def __post_init__(self):
        if self.requests < 1 or self.streams < 1:
            raise ValueError(f"requests and streams must be >= 1, got {self.requests}, {self.streams}")


@dataclass(frozen=True)
class FuzzCase:
    kwargs: dict
    cancel_after_first: bool = False
    deadline_s: float | None = None


@dataclass
class FuzzReport:
    sent: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    stalls: int = 0
    undocumented: list[str] = field(default_factory=list)  # first few "CODE: message"
    serving_after: bool = False
    running_after: int = -1
    kv_blocks_leaked: int = -1
    probe_identical: bool = False
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (not self.undocumented and self.stalls == 0 and self.serving_after and self.running_after == 0
                and self.kv_blocks_leaked == 0 and self.probe_identical)


def _edge_field(rng: random.Random) -> dict:
    """One field set to an edge value (valid or not)."""
    choice = rng.randrange(9)
    if choice == 0:
        return {"temperature": rng.choice((1e-45, 1e-40, 1e-8, 0.5, 1.3, 100.0, 3.4e38, float("inf"),
                                           float("nan"), -1.0))}
    if choice == 1:
        return {"top_p": rng.choice((1e-45, 1e-8, 0.5, 1.0, 0.0, 1.5, float("nan"))), "temperature": 1.0}
    if choice == 2:
        return {"top_k": rng.choice((1, 2, 96, 10**6, 2**32 - 1)), "temperature": 0.8}
    if choice == 3:
        return {"spec_method": rng.choice(METHODS), "max_draft_tokens": rng.choice((0, 1, 2, 79, 80, 1000))}
    if choice == 4:
        return {"stop": rng.choice(([""], ["\n"], ["a"], ["the", "("], ["x" * 1000]))}
    if choice == 5:
        return {"max_tokens": rng.choice((0, 1, 2, 16, -1, 10**6))}
    if choice == 6:
        return {"prompt_token_ids": rng.choice(([], [1], [10**9], [2**32 - 1], list(range(1, 40))))}
    if choice == 7:
        return {"messages": rng.choice(([{"role": "user", "content": "hi"}], [{"role": "wizard", "content": "x"}], []))}
    return {"cache_salt": rng.choice(("", "tenant-a", "tenant-b", "x" * 300))}


def fuzz_case(rng: random.Random, index: int, recent_ids: list[str]) -> FuzzCase:
    kwargs = {"max_tokens": rng.choice((1, 4, 8, 16)), "seed": rng.randrange(2**32)}
    kwargs.update(_edge_field(rng))
    if "prompt_token_ids" not in kwargs and "messages" not in kwargs:
        kwargs["prompt"] = rng.choice(PROMPTS)
    # Duplicate ids: reuse an id that may still be in flight.
    kwargs["request_id"] = rng.choice(recent_ids) if recent_ids and rng.random() < 0.05 else f"fuzz-{index}"
    roll = rng.random()
    return FuzzCase(kwargs, cancel_after_first=roll < 0.05, deadline_s=rng.choice((0.001, 0.05, 0.5)) if roll > 0.95 else None)


def _send(client: Client, case: FuzzCase, stall_timeout_s: float) -> str:
    timeout = case.deadline_s if case.deadline_s is not None else stall_timeout_s
    try:
        last = None
        for last in client.generate(timeout=timeout, **case.kwargs):
            if case.cancel_after_first:
                return "CANCELLED"  # leaving the loop cancels the call
        if last is None or last.finish_reason == 0:
            return "INCOMPLETE"
        return "OK"
    except grpc.RpcError as e:
        code = e.code().name
        if code == "DEADLINE_EXCEEDED" and case.deadline_s is None:
            return "STALL"
        return code if code in DOCUMENTED else f"{code}: {e.details()}"


def _probe(client: Client) -> list[int]:
    return [t for chunk in client.generate(timeout=120, **PROBE) for t in chunk.token_ids]


def _settled(client: Client, timeout_s: float = 60.0):
    """Polls stats until nothing is queued or running (or the timeout); returns the last stats."""
    end = time.monotonic() + timeout_s
    while True:
        stats = client.stats(timeout=10)
        if stats.running_requests == 0 and stats.queued_requests == 0 or time.monotonic() > end:
            return stats
        time.sleep(0.1)


def run_fuzz(config: FuzzBenchConfig, progress: bool = True) -> FuzzReport:
    from tqdm import tqdm

    rng = random.Random(config.seed)
    recent: list[str] = []
    cases = []
    for i in range(config.requests):
        cases.append(fuzz_case(rng, i, recent[-16:]))
        recent.append(cases[-1].kwargs["request_id"])
    report = FuzzReport(sent=len(cases))
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.perf_counter()
    with Client(config.server, token=config.token) as client:
        before = _probe(client)
        bar = tqdm(total=len(cases), desc="fuzz", unit="req", disable=not progress)

        def one(case: FuzzCase) -> None:
            outcome = _send(client, case, config.stall_timeout_s)
            with lock:
                if outcome == "STALL":
                    report.stalls += 1
                elif outcome not in DOCUMENTED and len(report.undocumented) < 20:
                    report.undocumented.append(outcome)
                counts[outcome.split(":")[0]] += 1
                bar.update()

        with ThreadPoolExecutor(config.streams) as pool:
            list(pool.map(one, cases))
        bar.close()
        report.seconds = time.perf_counter() - start
        stats = _settled(client)
        report.running_after = stats.running_requests + stats.queued_requests
        report.kv_blocks_leaked = stats.kv_blocks_total - stats.kv_blocks_free
        report.serving_after = client.health() == "SERVING"
        report.probe_identical = _probe(client) == before
    report.codes = dict(sorted(counts.items()))
    if config.out is not None:
        config.out.write_text(json.dumps({**asdict(report), "passed": report.passed, "config": {
            **asdict(config), "out": str(config.out)}}, indent=2))
    return report


def format_report(report: FuzzReport) -> str:
    lines = [f"sent {report.sent} requests in {report.seconds:.1f} s"]
    lines += [f"  {code:<20} {n}" for code, n in report.codes.items()]
    lines += [f"stalls {report.stalls}, undocumented {len(report.undocumented)}, running after {report.running_after},",
              f"KV blocks leaked {report.kv_blocks_leaked}, SERVING after {report.serving_after}, "
              f"greedy probe identical {report.probe_identical}", "PASS" if report.passed else "FAIL"]
    lines += [f"  undocumented: {u}" for u in report.undocumented]
    return "\n".join(lines)
