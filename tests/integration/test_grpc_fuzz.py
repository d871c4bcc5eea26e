"""Property-based: random request mixes against the in-process gRPC server over loopback.

Each example sends a burst of requests on concurrent streams — valid and hostile fields (NaN,
inf, negative, empty, out of range, float32's smallest and largest temperatures), duplicate
request ids, cancels after the first chunk, tiny deadlines — to one server with a tiny KV pool
(preemption) and a short admission queue (RESOURCE_EXHAUSTED). After each: only documented
status codes, every OK stream's usage matches what it streamed, nothing left running or queued,
every KV block free, the rejection count adds up, health SERVING, and a greedy probe gives the
same tokens as before the first example."""

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import given, strategies as st

from specserve.scheduler.client import Client, build_request
from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.step_planner import PlannerConfig
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.fuzz import MAX_DRAFT, STOPS, TOP_K, fuzz_settings
from tests.helpers.tiny_folder import save_tiny_model

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}
CONTEXT = 128  # with kv_cache_bytes=1 the pool keeps one context: 32 blocks of 4 slots
METHOD = "ngram+recycling"
STREAM_S = 60.0  # generous client timeout: a stream open longer than this is a stall
PROBE = dict(prompt="w5 w6 w7 w8", max_tokens=8, ignore_eos=True)

NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Call:
    kwargs: dict
    action: str  # "read" (to the end), "cancel" (after the first chunk) or "deadline" (a tiny timeout)


@dataclass(frozen=True)
class Outcome:
    code: str
    tokens: int = 0  # streamed
    last: object = None  # the final GenerateResponse of an OK stream


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), max_position_embeddings=CONTEXT)
    config = EngineConfig(block_size=4, kv_cache_bytes=1, spec=SpecConfig(METHOD, 8),
                          planner=PlannerConfig(max_num_seqs=4))
    server = ServerThread(ServerConfig(port=0, metrics_port=None, max_queued=3, health_poll_s=0.05))
    server.attach(load_engine(folder, LoadOptions(config=config, progress=False)), "tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}") as client:
        yield client


@pytest.fixture(scope="module")
def probe(client):
    return [t for c in client.generate(**PROBE) for t in c.token_ids]


def optional(values) -> st.SearchStrategy:
    """Unset (None: the server's default), or one of values."""
    return st.one_of(st.none(), st.sampled_from(values))


words = st.lists(st.integers(2, 20).map(lambda i: f"w{i}"), min_size=1, max_size=20).map(" ".join)
calls = st.builds(
    Call,
    kwargs=st.fixed_dictionaries({
        "prompt": st.one_of(words, st.just(""), st.just(" ".join(["w5"] * CONTEXT))),
        "max_tokens": optional([1, 2, 7, 20, 0, -3, 5000]),
        "temperature": optional([0.0, 1.4e-45, 1e-40, 1e-6, 0.7, 1.3, 100.0, 3.4e38, NAN, INF, -0.5]),
        "top_p": optional([1.0, 1e-9, 0.5, 0.0, 1.5, NAN]),
        "top_k": st.sampled_from(TOP_K),
        "seed": optional([0, 7, 2**64 - 1]),
        "stop": st.sampled_from(STOPS + (("",),)),
        "spec_method": st.sampled_from(["", "none", METHOD, "ngram", "model", "bogus"]),
        "max_draft_tokens": st.sampled_from(MAX_DRAFT + (8,)),
        "cache_salt": st.sampled_from(["", "tenant-a"]),
        "request_id": st.sampled_from(["", "", "dup-1", "dup-2"]),
        "ignore_eos": st.booleans(),
    }),
    action=st.sampled_from(["read", "read", "read", "cancel", "deadline"]),
)


def send(client: Client, call: Call) -> Outcome:
    kwargs = {k: v for k, v in call.kwargs.items() if v is not None}
    timeout = 0.05 if call.action == "deadline" else STREAM_S
    stream = client.stub.Generate(build_request(**kwargs), timeout=timeout)
    tokens, last = 0, None
    try:
        for chunk in stream:
            tokens, last = tokens + len(chunk.token_ids), chunk
            if call.action == "cancel":
                stream.cancel()
    except grpc.RpcError as e:
        return Outcome(e.code().name, tokens)
    return Outcome("OK", tokens, last)


def settled(client: Client) -> bool:
    s = client.stats()
    return s.running_requests == s.queued_requests == 0 and s.kv_blocks_free == s.kv_blocks_total


def poll(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@fuzz_settings()
@given(burst=st.lists(calls, min_size=1, max_size=10))
def test_every_answer_is_documented_and_the_server_ends_clean(client, probe, burst):
    before = client.stats()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda c: send(client, c), burst))
    assert {o.code for o in outcomes} <= DOCUMENTED, [(o.code, c.kwargs) for o, c in zip(outcomes, burst)]
    for o, c in zip(outcomes, burst):
        if o.code == "OK" and c.action == "read":
            usage = o.last.usage
            assert usage.completion_tokens == o.tokens and o.tokens <= (c.kwargs["max_tokens"] or CONTEXT)
            assert o.last.spec.accepted_tokens <= o.last.spec.drafted_tokens
        temperature = c.kwargs["temperature"]
        if temperature is not None and (math.isnan(temperature) or temperature < 0 or math.isinf(temperature)):
            assert o.code in ("INVALID_ARGUMENT", "DEADLINE_EXCEEDED")
    poll(lambda: settled(client), "every request to end and free its blocks")
    after = client.stats()
    assert after.rejected_requests - before.rejected_requests == sum(o.code == "RESOURCE_EXHAUSTED" for o in outcomes)
    assert after.finished_requests - before.finished_requests >= sum(o.code == "OK" for o in outcomes)
    assert client.health() == "SERVING"
    assert [t for c in client.generate(**PROBE) for t in c.token_ids] == probe
