"""Log-probabilities over the OpenAI HTTP API with the official `openai` client: completions
(`logprobs: k`, the legacy shape) and chat (`logprobs` + `top_logprobs`, the chat shape), whole
and streamed, sync and async, with speculation on (the tiny server runs ngram with up to 8 draft
tokens and no gate), in-process and through Ray verify workers. The values must be the target's
log-softmax of its raw logits: one plain transformers forward over prompt + output."""

import asyncio
import uuid

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specserve.cluster.placement import RoleSpec
from specserve.cluster.ray_cluster import connect
from specserve.scheduler.client import Client
from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.scheduler.ray.start import served_model_from
from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
from specserve.workers.actors.worker_model import WorkerModel
from specserve.workers.model.loader import LoadOptions
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_folder import save_tiny_chat_model, tiny_engine_config
from tests.helpers.tiny_server import start_server

PROMPTS = ["w5 w7 w9 w11 w3 w5 w7 w9 w11 w3 w5 w7", "w1 w2 w3 w4 w1 w2 w3 w4 w1 w2", "w40 w41 w42"]
CHAT = [{"role": "user", "content": "w3 w4 w5 w3 w4 w5"}]
TOLERANCE = 1e-4  # our paged / tree-attention forward against transformers', both float32
NEW = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-logprobs"))


@pytest.fixture(scope="module")
def reference(model_folder):
    """(prompt text, output ids) -> [n, V] log-softmax of one plain forward's logits that predict them."""
    hf = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)

    def logprobs(prompt: str, output: list[int]) -> torch.Tensor:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ids + output])).logits[0]  # (P + n, V)
        return torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1 : -1]

    logprobs.tokenizer = tokenizer
    return logprobs


@pytest.fixture(scope="module")
def server(model_folder):
    server = start_server(model_folder, metrics_port=None, http_port=0)
    yield server
    server.stop()


def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)


def check_completion(choice, prompt: str, k: int, reference) -> None:
    """The legacy logprobs of a whole completion choice equal the plain forward's."""
    ids, lp = choice.model_extra["token_ids"], choice.logprobs
    expected = reference(prompt, ids)  # (n, V)
    texts = [reference.tokenizer.decode([t]) for t in ids]
    assert lp.tokens == texts and len(lp.token_logprobs) == len(ids) == len(lp.top_logprobs)
    chosen = expected.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), chosen, atol=TOLERANCE, rtol=0)
    top = torch.topk(expected, k, dim=-1)
    for i, given in enumerate(lp.top_logprobs):  # the k likeliest and the emitted token
        want = {reference.tokenizer.decode([t]): v for t, v in zip(top.indices[i].tolist(), top.values[i].tolist())}
        assert given.keys() == want.keys() | {texts[i]}
        assert all(abs(given[t] - v) <= TOLERANCE for t, v in want.items())
    assert lp.text_offset == [sum(map(len, texts[:i])) for i in range(len(texts))]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.3, "seed": 5, "top_p": 0.9}], ids=["greedy", "sampled"])
def test_completion_logprobs_equal_a_plain_forward(server, reference, sampling):
    accepted = 0
    with api(server) as client:
        for prompt in PROMPTS:
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, logprobs=3, extra_body=NEW,
                                            **sampling)
            check_completion(got.choices[0], prompt, 3, reference)
            accepted += got.usage.model_extra["spec"]["accepted_tokens"]
    assert accepted > 0  # tokens accepted from draft trees were among those checked


def test_streamed_completion_logprobs_join_to_the_whole(server):
    with api(server) as client:
        whole = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, logprobs=2,
                                          extra_body=NEW).choices[0].logprobs
        chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, logprobs=2,
                                                stream=True, extra_body=NEW))
        plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, extra_body=NEW)
    parts = [c.choices[0].logprobs for c in chunks]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [o for p in parts for o in p.text_offset] == whole.text_offset  # offsets continue across chunks
    tops = [d for p in parts for d in p.top_logprobs]
    assert [d.keys() for d in tops] == [d.keys() for d in whole.top_logprobs]
    assert all(abs(d[t] - w[t]) <= TOLERANCE for d, w in zip(tops, whole.top_logprobs) for t in d)
    assert plain.choices[0].logprobs is None  # only when asked for


def test_chat_logprobs_whole_and_streamed_equal_grpcs(server, model_folder):
    with Client(f"127.0.0.1:{server.port}") as grpc_client:
        expected = [t for c in grpc_client.generate(messages=CHAT, max_tokens=16, ignore_eos=True, logprobs=2)
                    for t in c.logprobs]
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    with api(server) as client:
        whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, logprobs=True,
                                               top_logprobs=2, extra_body=NEW).choices[0].logprobs.content
        chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, logprobs=True,
                                                     top_logprobs=2, stream=True, extra_body=NEW))
        chosen_only = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, logprobs=True,
                                                     extra_body=NEW).choices[0].logprobs.content
    assert [(c.token, c.bytes) for c in whole] == [(t, list(t.encode())) for t in
                                                  (tokenizer.decode([e.token_id]) for e in expected)]
    assert [c.logprob for c in whole] == pytest.approx([e.logprob for e in expected], abs=TOLERANCE)
    for c, e in zip(whole, expected):
        assert [a.token for a in c.top_logprobs] == [tokenizer.decode([a.token_id]) for a in e.top]
        assert [a.logprob for a in c.top_logprobs] == pytest.approx([a.logprob for a in e.top], abs=TOLERANCE)
    streamed = [t for c in chunks if c.choices for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=TOLERANCE)
    assert len(chosen_only) == 4 and all(c.top_logprobs == [] for c in chosen_only)


def test_async_streamed_completion_logprobs(server, reference):
    async def run() -> tuple[list[int], list[float]]:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused",
                                      max_retries=0) as client:
            stream = await client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, logprobs=0,
                                                     stream=True, extra_body=NEW)
            chunks = [c.choices[0] async for c in stream]
        return [t for c in chunks for t in c.model_extra["token_ids"]], \
            [v for c in chunks for v in c.logprobs.token_logprobs]

    ids, logprobs = asyncio.run(run())
    chosen = reference(PROMPTS[1], ids).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(logprobs), chosen, atol=TOLERANCE, rtol=0)


def test_completion_logprobs_through_ray_verify_workers(ray_cluster, model_folder, reference):
    none = RoleSpec(replicas=0)
    config = RayBackendConfig(name=f"lp{uuid.uuid4().hex[:8]}", verify=RoleSpec(replicas=1, num_cpus=0.1),
                              prefill=none, draft=none, stall_timeout_s=60.0)
    worker_model = WorkerModel(model_folder, LoadOptions(config=tiny_engine_config(SpecConfig("ngram", 8)), threads=1))
    backend = RayBackend(config, worker_model, connect())
    server = ServerThread(ServerConfig(port=0, metrics_port=None, http_port=0))
    try:
        backend.start()
        info = backend.info
        server.attach_loops(backend.loops, served_model_from(info, "tiny"), info.fingerprint, info.block_size)
        with api(server) as client:
            got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, logprobs=3, extra_body=NEW)
        check_completion(got.choices[0], PROMPTS[0], 3, reference)
        assert got.usage.model_extra["spec"]["accepted_tokens"] > 0
    finally:
        server.server.loops = []  # the backend is shut down here, not by the server
        server.stop()
        backend.shutdown()
