"""The gRPC server over loopback: a real grpc.aio server, real clients, a tiny random model."""

import shutil
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from specserve.scheduler.client import Client, build_request
from specserve.scheduler.server.grpc_server import ServerConfig
from specserve.v1 import generation_pb2 as pb
from specserve.workers.engine.sequence import SamplingParams

from tests.helpers.tls import self_signed_cert
from tests.helpers.tiny_server import load_tiny, start_server
from tests.helpers.tiny_folder import save_tiny_model

PROMPTS = [" ".join(f"w{(7 * i + j * j) % 90 + 2}" for j in range(5 + i)) for i in range(10)]
POLL_S = 10.0


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def load(folder, spec="ngram", max_num_seqs=32):
    return load_tiny(folder, spec, max_num_seqs)


start = start_server


@pytest.fixture(scope="module")
def server(model_folder):
    server = start(model_folder)
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}") as client:
        yield client


def poll(condition, what: str):
    deadline = time.monotonic() + POLL_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def tokens(client, prompt, **kwargs) -> tuple[list[int], pb.GenerateResponse]:
    chunks = list(client.generate(prompt=prompt, **kwargs))
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def test_stream_equals_the_in_process_engine(model_folder, client):
    engine = load(model_folder, spec="none").engine
    for prompt in PROMPTS[:3]:
        ids = engine.tokenizer(prompt)["input_ids"]
        expected = [t for out in engine.generate(ids, SamplingParams(max_new_tokens=40, ignore_eos=True))
                    for t in out.new_token_ids]
        got, last = tokens(client, prompt, max_tokens=40, ignore_eos=True)
        assert got == expected
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == 40
        assert last.spec.method == "ngram" and last.spec.accepted_tokens <= last.spec.drafted_tokens


def test_concurrent_streams_each_equal_their_solo_run(client):
    solo = [tokens(client, p, max_tokens=48, ignore_eos=True)[0] for p in PROMPTS]
    results = [None] * len(PROMPTS)

    def run(i):
        results[i] = tokens(client, PROMPTS[i], max_tokens=48, ignore_eos=True)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_spec_off_per_request_gives_the_same_tokens(client):
    on, last_on = tokens(client, PROMPTS[4], max_tokens=40, ignore_eos=True)
    off, last_off = tokens(client, PROMPTS[4], max_tokens=40, ignore_eos=True, spec_method="none")
    assert on == off
    assert last_off.spec.method == "none" and last_off.spec.drafted_tokens == 0


def test_seeded_sampling_is_reproducible(client):
    a, _ = tokens(client, PROMPTS[1], max_tokens=30, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    b, _ = tokens(client, PROMPTS[1], max_tokens=30, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    assert a == b


def all_free(client) -> bool:
    stats = client.stats()
    return stats.running_requests == 0 and stats.queued_requests == 0 and stats.kv_blocks_free == stats.kv_blocks_total


def test_client_cancellation_frees_the_request(client):
    stream = client.generate(prompt=PROMPTS[2], max_tokens=3000, ignore_eos=True)
    next(stream)
    assert client.stats().running_requests == 1
    stream.close()  # cancels the call
    poll(lambda: all_free(client), "the cancelled request's KV to be freed")


def test_deadline_frees_the_request(client):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate(prompt=PROMPTS[3], max_tokens=3000, ignore_eos=True, timeout=0.3))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    poll(lambda: all_free(client), "the expired request's KV to be freed")


@pytest.mark.parametrize("kwargs,field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt_token_ids": []}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, 500]}, "prompt_token_ids[1]"),
    ({"messages": []}, "messages"),
    ({"prompt": "w3", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "w3", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "w3", "temperature": -0.5}, "temperature"),
    ({"prompt": "w3", "top_p": 0.0}, "top_p"),
    ({"prompt": "w3", "top_p": 1.5}, "top_p"),
    ({"prompt": "w3", "stop": ["ok", ""]}, "stop[1]"),
    ({"prompt": "w3", "spec_method": "magic"}, "spec.method"),
    ({"prompt": "w3", "spec_method": "recycling"}, "spec.method"),
    ({"prompt": "w3", "max_draft_tokens": 999}, "spec.max_draft_tokens"),
    ({"prompt": " ".join(["w5"] * 4100)}, "prompt"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(client, kwargs, field):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate(**kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:")
    assert tokens(client, "w3 w4", max_tokens=3, ignore_eos=True)[1].usage.completion_tokens == 3  # still serving


def test_queue_full_is_resource_exhausted_at_once(model_folder):
    server = start(model_folder, max_queued=1, max_num_seqs=1)
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            first = client.generate(prompt=PROMPTS[0], max_tokens=3000, ignore_eos=True)
            next(first)
            second = client.stub.Generate(build_request(PROMPTS[1], max_tokens=3000, ignore_eos=True))  # starts now
            poll(lambda: client.stats().queued_requests == 1, "the second request to queue")
            with pytest.raises(grpc.RpcError) as e:
                list(client.generate(prompt=PROMPTS[2], max_tokens=5))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert client.stats().rejected_requests == 1
            first.close()
            second.cancel()
            poll(lambda: all_free(client), "both requests to be freed")
            assert tokens(client, PROMPTS[2], max_tokens=5, ignore_eos=True)[1].usage.completion_tokens == 5
    finally:
        server.stop()


def test_bearer_token(model_folder):
    server = start(model_folder, token="s3cret")
    target = f"127.0.0.1:{server.port}"
    try:
        for token in (None, "wrong"):
            with Client(target, token=token) as client, pytest.raises(grpc.RpcError) as e:
                client.model_info()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with Client(target, token=token) as client, pytest.raises(grpc.RpcError) as e:
                list(client.generate(prompt="w3", max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, token="s3cret") as client:
            assert client.model_info().model == "tiny"
            assert tokens(client, "w3", max_tokens=2, ignore_eos=True)[1].usage.completion_tokens == 2
        with Client(target) as client:
            assert client.health() == "SERVING"  # probes need no secret
    finally:
        server.stop()


def test_auth_is_required_beyond_loopback():
    with pytest.raises(ValueError, match="--token"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", token="t").token == "t"
    assert ServerConfig(host="0.0.0.0", allow_unauthenticated=True).allow_unauthenticated


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls(model_folder, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    server = start(model_folder, tls_cert=cert, tls_key=key)
    try:
        with Client(f"localhost:{server.port}", root_certificates=cert) as client:
            assert tokens(client, "w3", max_tokens=2, ignore_eos=True)[1].usage.completion_tokens == 2
        with Client(f"localhost:{server.port}") as plain, pytest.raises(grpc.RpcError) as e:
            plain.model_info(timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_health_turns_serving_only_when_the_engine_is_ready(model_folder):
    server = start(model_folder, attach=False)
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("specserve.v1.Generation") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                list(client.generate(prompt="w3", max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            server.attach(load(model_folder), "tiny")
            assert client.health() == "SERVING"
            assert client.health("specserve.v1.Generation") == "SERVING"
    finally:
        server.stop()


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"specserve.v1.Generation", "grpc.health.v1.Health"} <= set(services)


def test_model_info_and_metrics(server, client):
    info = client.model_info()
    assert (info.model, info.context_length, info.vocab_size) == ("tiny", 4096, 97)
    assert list(info.spec_methods) == ["none", "ngram"] and info.default_spec_method == "ngram"
    before = client.stats().generation_tokens
    tokens(client, PROMPTS[5], max_tokens=12, ignore_eos=True)
    assert client.stats().generation_tokens == before + 12
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    for name in ("specserve:time_to_first_token_seconds_count", "specserve:inter_token_latency_seconds_count",
                 "specserve:e2e_request_latency_seconds_count", "specserve:num_requests_waiting",
                 "specserve:num_requests_running", "specserve:prefix_cache_queries_total",
                 "specserve:prefix_cache_hits_total", "specserve:spec_decode_num_draft_tokens_total",
                 "specserve:spec_decode_num_accepted_tokens_total"):
        assert f"\n{name}" in text, name
    generated = next(line for line in text.splitlines() if line.startswith("specserve:generation_tokens_total"))
    assert float(generated.split()[-1]) >= before + 12


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(model_folder):
    server = start(model_folder, shutdown_grace_s=60)
    client = Client(f"127.0.0.1:{server.port}")
    try:
        stream = client.generate(prompt=PROMPTS[6], max_tokens=400, ignore_eos=True)
        first = next(stream)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        poll(lambda: client.health() == "NOT_SERVING", "health to turn NOT_SERVING")
        with pytest.raises(grpc.RpcError) as e:
            list(client.generate(prompt="w3", max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 400
        stopper.join(timeout=30)
        assert not stopper.is_alive()
    finally:
        client.close()


def test_replicas_share_the_load_and_keep_prefixes_together(model_folder):
    server = start(model_folder, replicas=2)
    loops = server.server.loops
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            shared = " ".join(f"w{i}" for i in range(10, 30))  # 5 full blocks of 4 tokens
            for suffix in ("w3", "w4", "w5"):
                tokens(client, f"{shared} {suffix}", max_tokens=4, ignore_eos=True)
            assert sorted(loop.stats().finished for loop in loops) == [0, 3]  # all on one replica
            busy = next(i for i, loop in enumerate(loops) if loop.stats().finished == 3)
            long = client.generate(prompt=f"{shared} w6", max_tokens=3000, ignore_eos=True)
            next(long)  # in flight on the busy replica (affinity)
            assert loops[busy].in_flight() == 1
            other = 1 - busy
            stream = client.generate(prompt=" ".join(f"w{i}" for i in range(40, 60)), max_tokens=4000,
                                     ignore_eos=True)
            next(stream)  # a new prefix goes to the idle replica
            assert loops[other].in_flight() == 1
            long.close()
            stream.close()
            poll(lambda: all_free(client), "both replicas to be free")
            assert client.stats().kv_blocks_total == sum(loop.stats().kv_blocks_total for loop in loops)
    finally:
        server.stop()


def test_async_client_streams_the_same_tokens(server, client):
    import asyncio

    from specserve.scheduler.client import AsyncClient

    async def run() -> tuple[list[int], str]:
        async with AsyncClient(f"127.0.0.1:{server.port}") as aclient:
            chunks = [c async for c in aclient.generate(prompt=PROMPTS[7], max_tokens=24, ignore_eos=True)]
            return [t for c in chunks for t in c.token_ids], (await aclient.model_info()).model

    got, model = asyncio.run(run())
    assert got == tokens(client, PROMPTS[7], max_tokens=24, ignore_eos=True)[0]
    assert model == "tiny"
