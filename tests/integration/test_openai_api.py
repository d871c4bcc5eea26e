"""The OpenAI-compatible HTTP API over loopback, driven by the official `openai` package: a real
server (gRPC and HTTP side by side, one servicer), a tiny random model with a chat template."""

import asyncio
import json
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from specserve.scheduler.cli.main import build_parser
from specserve.scheduler.cli.serve import server_config
from specserve.scheduler.client import Client, build_request
from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread

from tests.helpers.tls import self_signed_cert
from tests.helpers.tiny_server import load_tiny, start_server
from tests.helpers.tiny_folder import save_tiny_chat_model

PROMPTS = [" ".join(f"w{(7 * i + j * j) % 90 + 2}" for j in range(5 + i)) for i in range(6)]
CHAT = [{"role": "system", "content": "w9 w8"}, {"role": "user", "content": "w3 w4 w5 w6"}]
POLL_S = 10.0


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def load(folder, max_num_seqs=32):
    return load_tiny(folder, max_num_seqs=max_num_seqs)


def start(folder, attach=True, max_num_seqs=32, **config) -> ServerThread:
    return start_server(folder, attach, max_num_seqs, **{"metrics_port": None, "http_port": 0, **config})


@pytest.fixture(scope="module")
def server(model_folder):
    server = start(model_folder)
    yield server
    server.stop()


def api(server, key="unused", scheme="http", host="127.0.0.1", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scheme}://{host}:{server.http_port}/v1", api_key=key, max_retries=0, **kwargs)


@pytest.fixture
def client(server):
    with api(server) as client:
        yield client


@pytest.fixture
def grpc_client(server):
    with Client(f"127.0.0.1:{server.port}") as client:
        yield client


def grpc_run(client, **kwargs) -> tuple[list[int], str]:
    chunks = list(client.generate(**kwargs))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def grpc_prompt_tokens(client, prompt: str) -> int:
    return list(client.generate(prompt=prompt, max_tokens=1))[-1].usage.prompt_tokens


def poll(condition, what: str):
    deadline = time.monotonic() + POLL_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def all_free(grpc_client) -> bool:
    s = grpc_client.stats()
    return s.running_requests == 0 and s.queued_requests == 0 and s.kv_blocks_free == s.kv_blocks_total


def get(server, path: str, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_completion_is_token_identical_to_grpc(client, grpc_client):
    for prompt in PROMPTS[:3]:
        ids, text = grpc_run(grpc_client, prompt=prompt, max_tokens=40, ignore_eos=True)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert got.choices[0].text == text and got.choices[0].model_extra["token_ids"] == ids
        assert got.choices[0].finish_reason == "length" and got.object == "text_completion"
        assert got.id.startswith("cmpl-") and got.created > 0 and got.model == "tiny"
        u = got.usage
        n = grpc_prompt_tokens(grpc_client, prompt)
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (n, len(ids), n + 40)


def test_token_id_prompt_and_one_element_list(client, grpc_client):
    ids, text = grpc_run(grpc_client, prompt_token_ids=[3, 4, 5, 6, 7], max_tokens=12, ignore_eos=True)
    for prompt in ([3, 4, 5, 6, 7], [[3, 4, 5, 6, 7]], ["w3 w4 w5 w6 w7"]):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True})
        assert got.choices[0].text == text


def test_chat_is_token_identical_to_grpc(client, grpc_client):
    ids, text = grpc_run(grpc_client, messages=CHAT, max_tokens=30, ignore_eos=True)
    for limit in ({"max_tokens": 30}, {"max_completion_tokens": 30}):
        got = client.chat.completions.create(model="tiny", messages=CHAT, extra_body={"ignore_eos": True}, **limit)
        assert got.choices[0].message.content == text and got.choices[0].message.role == "assistant"
        assert "token_ids" not in got.choices[0].model_extra  # only when asked for
        assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
        assert got.usage.completion_tokens == len(ids) == 30
    split = [{"type": "text", "text": "w3 w4"}, {"type": "text", "text": " w5 w6"}]
    parts = [CHAT[0], {"role": "user", "content": split}]
    got = client.chat.completions.create(model="tiny", messages=parts, max_tokens=30, extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == text


def test_streamed_completion_ends_with_usage_and_done(server, client, grpc_client):
    _, text = grpc_run(grpc_client, prompt=PROMPTS[3], max_tokens=24, ignore_eos=True)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    spec = chunks[-1].usage.model_extra["spec"]
    assert spec["method"] == "ngram" and spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    raw = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/completions", method="POST",
                                 data=json.dumps({"model": "tiny", "prompt": "w3 w4", "max_tokens": 3,
                                                  "stream": True}).encode())
    with urllib.request.urlopen(raw, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_streamed_chat_without_usage(client, grpc_client):
    ids, text = grpc_run(grpc_client, messages=CHAT, max_tokens=20, ignore_eos=True)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, stream=True,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == ids
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    assert chunks[-1].object == "chat.completion.chunk"


def test_async_client(server, grpc_client):
    _, text = grpc_run(grpc_client, prompt=PROMPTS[4], max_tokens=16, ignore_eos=True)

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused",
                                      max_retries=0) as aclient:
            whole = await aclient.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=16,
                                                     extra_body={"ignore_eos": True})
            stream = await aclient.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=16, stream=True,
                                                      extra_body={"ignore_eos": True})
            return whole.choices[0].text, "".join([c.choices[0].text async for c in stream])

    assert asyncio.run(run()) == (text, text)


def test_usage_counts_cached_prompt_tokens(client):
    prompt = " ".join(f"w{i}" for i in range(10, 50))  # 10 full blocks of 4 tokens
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"cache_salt": "u1"})
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"cache_salt": "u1"})
    other = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"cache_salt": "u2"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= 36
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # salts never share


def test_stop_and_sampling_fields(client, grpc_client):
    _, text = grpc_run(grpc_client, prompt=PROMPTS[5], max_tokens=20, ignore_eos=True)
    words = text.split()
    got = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=20, stop=[words[3]],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop" and words[3] not in got.choices[0].text.split()
    sampled = [client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=20, temperature=0.9, top_p=0.9,
                                         seed=7, user="u", extra_body={"top_k": 20, "ignore_eos": True,
                                                                       "frobnicate": 1}).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1] == grpc_run(grpc_client, prompt=PROMPTS[5], max_tokens=20, temperature=0.9,
                                                top_p=0.9, seed=7, top_k=20, ignore_eos=True)[1]
    off = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=20,
                                    extra_body={"ignore_eos": True, "spec": {"method": "none"}})
    assert off.choices[0].text == text and off.usage.model_extra["spec"]["drafted_tokens"] == 0


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.response.json()["error"]


@pytest.mark.parametrize("kwargs,field", [
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 500]}, "prompt[1]"),
    ({"prompt": ["w3", "w4"]}, "prompt"),
    ({"stop": ["ok", ""]}, "stop[1]"),
    ({"seed": -1}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"stream": "yes"}, "stream"),
    ({"extra_body": {"spec": {"method": "magic"}}}, "spec.method"),
    ({"extra_body": {"spec": {"max_draft_tokens": 999}}}, "spec.max_draft_tokens"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
])
def test_bad_completion_fields_are_400_naming_the_field(client, kwargs, field):
    status, error = error_of(lambda: client.completions.create(**{"model": "tiny", "prompt": "w3", **kwargs}))
    assert status == 400 and error["param"] == field and error["message"].startswith(f"{field}:")
    assert error["type"] == "invalid_request_error"
    assert client.completions.create(model="tiny", prompt="w3", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("kwargs,field", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "w3"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_chat_fields_are_400_naming_the_field(client, kwargs, field):
    status, error = error_of(lambda: client.chat.completions.create(**{"model": "tiny", "messages": CHAT, **kwargs}))
    assert status == 400 and error["param"] == field and error["message"].startswith(f"{field}:")


def test_malformed_json_is_400(server):
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/completions", data=b"{not json",
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "body"


def test_models_and_unknown_model_404(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").model_extra["max_model_len"] == 4096
    for call in (lambda: client.models.retrieve("gpt-4"),
                 lambda: client.completions.create(model="gpt-4", prompt="w3"),
                 lambda: client.chat.completions.create(model="gpt-4", messages=CHAT)):
        status, error = error_of(call)
        assert status == 404 and error["param"] == "model"


def test_health_and_metrics_share_the_server(server, client):
    assert get(server, "/health")[0] == 200
    client.completions.create(model="tiny", prompt="w3 w4", max_tokens=3)
    status, text = get(server, "/metrics")
    assert status == 200
    count = next(line for line in text.splitlines() if line.startswith("specserve:e2e_request_latency_seconds_count"))
    assert float(count.split()[-1]) >= 1  # requests of both front doors land in one registry


def test_client_disconnect_cancels_the_request(client, grpc_client):
    before = grpc_client.stats().generation_tokens
    with client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=3000, stream=True,
                                   extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
        assert grpc_client.stats().running_requests == 1
    poll(lambda: all_free(grpc_client), "the abandoned request's KV to be freed")
    assert grpc_client.stats().generation_tokens - before < 3000


def test_queue_full_is_429(model_folder):
    server = start(model_folder, max_queued=1, max_num_seqs=1)
    try:
        with Client(f"127.0.0.1:{server.port}") as grpc_client, api(server) as client:
            first = grpc_client.generate(prompt=PROMPTS[0], max_tokens=3000, ignore_eos=True)
            next(first)
            second = grpc_client.stub.Generate(build_request(PROMPTS[1], max_tokens=3000, ignore_eos=True))
            poll(lambda: grpc_client.stats().queued_requests == 1, "the second request to queue")
            status, error = error_of(lambda: client.completions.create(model="tiny", prompt="w3", max_tokens=2))
            assert status == 429 and error["type"] == "rate_limit_error"
            first.close()
            second.cancel()
            poll(lambda: all_free(grpc_client), "both requests to be freed")
            assert client.completions.create(model="tiny", prompt="w3", max_tokens=2).choices[0].text
    finally:
        server.stop()


def test_503_while_loading_then_200(model_folder):
    server = start(model_folder, attach=False)
    try:
        with api(server) as client:
            assert get(server, "/health")[0] == 503
            for call in (client.models.list, lambda: client.completions.create(model="tiny", prompt="w3")):
                assert error_of(call)[0] == 503
            server.attach(load(model_folder), "tiny")
            assert get(server, "/health")[0] == 200
            assert client.completions.create(model="tiny", prompt="w3", max_tokens=2).choices[0].text
    finally:
        server.stop()


def test_503_while_shutting_down_and_in_flight_streams_finish(model_folder):
    server = start(model_folder, shutdown_grace_s=60)
    client = api(server)
    try:
        stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=300, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)  # the stream has started before shutdown begins
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        poll(lambda: get(server, "/health")[0] == 503, "health to turn 503")
        assert error_of(lambda: client.completions.create(model="tiny", prompt="w3", max_tokens=2))[0] == 503
        rest = list(chunks)
        assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 300
        stopper.join(timeout=30)
        assert not stopper.is_alive()
    finally:
        client.close()


def test_bearer_token(model_folder):
    server = start(model_folder, token="s3cret")
    try:
        with api(server, key="wrong") as client:
            status, error = error_of(lambda: client.completions.create(model="tiny", prompt="w3", max_tokens=2))
            assert status == 401 and error["type"] == "authentication_error"
            assert error_of(client.models.list)[0] == 401
        assert get(server, "/v1/models")[0] == 401  # no Authorization header
        with api(server, key="s3cret") as client:
            assert client.completions.create(model="tiny", prompt="w3", max_tokens=2).usage.completion_tokens >= 1
        assert get(server, "/health")[0] == 200  # probes and scrapers need no secret
        assert get(server, "/metrics")[0] == 200
        assert get(server, "/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls(model_folder, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    server = start(model_folder, tls_cert=cert, tls_key=key)
    try:
        trusting = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert)))
        with api(server, scheme="https", host="localhost", http_client=trusting) as client:
            assert client.completions.create(model="tiny", prompt="w3", max_tokens=2).usage.completion_tokens >= 1
        with api(server) as plain:
            with pytest.raises(openai.APIConnectionError):
                plain.models.list()
    finally:
        server.stop()


def test_config_and_flags():
    with pytest.raises(ValueError, match="http_port"):
        ServerConfig(http_port=70000)
    with pytest.raises(ValueError, match="--token"):
        ServerConfig(host="0.0.0.0", http_port=8000)
    parser = build_parser()
    assert server_config(parser.parse_args(["serve"])).http_port == 8000
    assert server_config(parser.parse_args(["serve", "--http-port", "0"])).http_port == 0
    assert server_config(parser.parse_args(["serve", "--no-http"])).http_port is None


def test_http_port_in_use_is_a_clear_error(server):
    with pytest.raises(ValueError, match=f"127.0.0.1:{server.http_port} for HTTP"):
        ServerThread(ServerConfig(port=0, metrics_port=None, http_port=server.http_port))


def test_bench_serve_api_flag(monkeypatch, capsys):
    from specserve.bench import serve_load
    from specserve.scheduler.cli.main import main

    built = []
    monkeypatch.setattr(serve_load, "run_serve_bench", built.append)
    assert main(["bench", "serve", "--api", "grpc,openai", "--concurrency", "1,16"]) == 0
    assert built[0].apis == (serve_load.Api.GRPC, serve_load.Api.OPENAI) and built[0].concurrency == (1, 16)
    assert main(["bench", "serve", "--api", "http"]) == 2
    assert "--api must list grpc and/or openai, got 'http'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--server takes one --api"):
        serve_load.ServeBenchConfig(server="127.0.0.1:8000", apis=(serve_load.Api.GRPC, serve_load.Api.OPENAI))
