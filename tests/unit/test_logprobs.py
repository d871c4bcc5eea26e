"""Log-probabilities of emitted tokens (workers/engine/logprobs.py): the target's log-softmax of its
raw logits at the position that chose each token. They must equal one plain transformers forward
over prompt + output, with speculation off and on (ngram and model drafters, gate off, greedy and
sampled), and travel unchanged through the Ray seam, the gRPC response and OpenAI's shapes."""

import dataclasses
import math
import pickle

import pytest
import torch

from specserve.scheduler.client import build_request
from specserve.scheduler.ray.remote_request import RemoteRequest
from specserve.scheduler.server.openai_logprobs import TokenTexts, chat_logprobs, completion_logprobs
from specserve.scheduler.server.servicer import GenerationServicer
from specserve.scheduler.server.validation import InvalidRequest, ServedModel, validate
from specserve.workers.actors.verify import _chunk
from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from specserve.workers.engine.logprobs import MAX_TOP_LOGPROBS, TokenLogprobs, TopLogprob, token_logprobs
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

PROMPTS = [[5, 7, 9, 11, 3, 5, 7, 9, 11, 3, 5, 7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [40, 41, 42]]
K = 5  # alternatives asked for per token
TOLERANCE = 1e-4  # our paged / tree-attention forward against transformers', both float32
GREEDY = SamplingParams(max_new_tokens=24, logprobs=K)
SAMPLED = SamplingParams(max_new_tokens=24, temperature=0.7, top_k=30, top_p=0.95, seed=3, logprobs=K)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf("llama", initializer_range=0.3)


@pytest.fixture(scope="module")
def model(hf):
    return ours_from_hf(hf)


def generate(model, method: str, params: SamplingParams):
    """Runs PROMPTS together; returns the sequences and every output's new_logprobs per request."""
    draft = model if method == "model" else None
    spec = SpecConfig(method, 8 if method != "none" else 0, draft_model="self" if draft else None, gate=False)
    engine = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=spec),
                       draft_model=draft)
    seqs = [engine.add_request(p, params) for p in PROMPTS]
    logprobs = {s.request_id: [] for s in seqs}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            if params.logprobs is None:
                assert out.new_logprobs is None
            else:
                assert len(out.new_logprobs) == len(out.new_token_ids)
                logprobs[out.request_id] += out.new_logprobs
    return seqs, logprobs


def plain_forward(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V]: row i is the log-softmax of the logits that predict output[i]."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0]  # (P + n, V)
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]


@pytest.mark.parametrize("method", ["none", "ngram", "model"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_logprobs_equal_one_plain_forward_over_prompt_and_output(hf, model, method, params):
    seqs, got = generate(model, method, params)
    for seq in seqs:
        expected = plain_forward(hf, seq.prompt_ids, seq.output_ids)  # (n, V)
        lps = got[seq.request_id]
        assert [t.token_id for t in lps] == seq.output_ids
        chosen = expected.gather(1, torch.tensor(seq.output_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor([t.logprob for t in lps]), chosen, atol=TOLERANCE, rtol=0)
        top = torch.topk(expected, K, dim=-1)
        assert [[a.token_id for a in t.top] for t in lps] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[a.logprob for a in t.top] for t in lps]), top.values,
                                   atol=TOLERANCE, rtol=0)
    if method != "none":  # rows of accepted draft nodes were checked, not only bonus rows
        assert sum(s.spec.accepted_tokens for s in seqs) > 0


@pytest.mark.parametrize("method", ["ngram", "model"])
def test_asking_for_logprobs_changes_no_token(model, method):
    without, _ = generate(model, method, dataclasses.replace(SAMPLED, logprobs=None))
    with_, only_chosen = generate(model, method, dataclasses.replace(SAMPLED, logprobs=0))
    assert [s.output_ids for s in with_] == [s.output_ids for s in without]
    assert all(t.top == () for lps in only_chosen.values() for t in lps)


@pytest.mark.parametrize("k", [-1, MAX_TOP_LOGPROBS + 1])
def test_logprobs_out_of_range_is_an_error_naming_the_field_and_limit(k):
    with pytest.raises(ValueError, match=rf"logprobs must be None or in \[0, {MAX_TOP_LOGPROBS}\], got {k}"):
        SamplingParams(logprobs=k)
    assert SamplingParams(logprobs=MAX_TOP_LOGPROBS).logprobs == MAX_TOP_LOGPROBS


def test_token_logprobs_of_hand_built_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]])) + 7.0  # any shift
    a, b = token_logprobs(logits, [2, 0], 2)
    assert a.token_id == 2 and math.isclose(a.logprob, math.log(0.125), abs_tol=1e-6)
    assert [t.token_id for t in a.top] == [0, 1] and math.isclose(a.top[1].logprob, math.log(0.25), abs_tol=1e-6)
    assert [t.token_id for t in b.top] == [3, 2] and math.isclose(b.logprob, math.log(0.1), abs_tol=1e-6)
    assert token_logprobs(logits, [2, 0], 0)[0].top == ()
    with pytest.raises(ValueError, match="2 logits rows for 1 tokens"):
        token_logprobs(logits, [2], 1)


LOGPROBS = [TokenLogprobs(8, -0.5, (TopLogprob(8, -0.5), TopLogprob(3, -1.5))),
            TokenLogprobs(12, -2.0, (TopLogprob(4, -0.25), TopLogprob(12, -2.0)))]


def test_logprobs_cross_the_ray_seam_and_the_grpc_response():
    request = RemoteRequest("r", [1, 2], SamplingParams(logprobs=2), "", lambda item: None, replica=None)
    out = RequestOutput("r", [8, 12], "w8 w12", False, None, request.seq, new_logprobs=LOGPROBS)
    chunk = pickle.loads(pickle.dumps(_chunk("r", out)))  # as Ray carries it
    assert chunk.new_logprobs == LOGPROBS
    delivered = request.absorb(chunk)
    assert delivered.new_logprobs == LOGPROBS and delivered.new_token_ids == [8, 12]
    response = GenerationServicer._response(delivered, "ngram")
    assert [(t.token_id, t.logprob, [(a.token_id, a.logprob) for a in t.top]) for t in response.logprobs] == \
        [(8, -0.5, [(8, -0.5), (3, -1.5)]), (12, -2.0, [(4, -0.25), (12, -2.0)])]
    plain = RequestOutput("r", [8], "w8", False, None, request.seq)
    assert len(GenerationServicer._response(plain, "ngram").logprobs) == 0


MODEL = ServedModel(name="tiny", tokenizer=tiny_tokenizer(), context_length=128, vocab_size=97, spec_method="ngram",
                    known_spec_methods=("none", "ngram"), max_draft_tokens=8)


def test_grpc_logprobs_field_reaches_the_engine_and_is_bounded():
    assert validate(build_request("w5 w6"), MODEL).params.logprobs is None
    assert validate(build_request("w5 w6", logprobs=0), MODEL).params.logprobs == 0
    assert validate(build_request("w5 w6", logprobs=20), MODEL).params.logprobs == 20
    with pytest.raises(InvalidRequest, match="logprobs: at most 20, got 21"):
        validate(build_request("w5 w6", logprobs=21), MODEL)


def test_openai_shapes():
    response = GenerationServicer._response(RequestOutput("r", [8, 12], "", False, None, None,
                                                          new_logprobs=LOGPROBS), "none")
    texts = TokenTexts(tiny_tokenizer())
    legacy = completion_logprobs(response.logprobs, texts, offset=4)
    assert legacy.tokens == ["w8", "w12"] and legacy.token_logprobs == [-0.5, -2.0]
    assert legacy.top_logprobs == [{"w8": -0.5, "w3": -1.5}, {"w4": -0.25, "w12": -2.0}]
    assert legacy.text_offset == [4, 6]
    chat = chat_logprobs(response.logprobs, texts).content
    assert [(c.token, c.logprob, c.bytes) for c in chat] == [("w8", -0.5, [119, 56]), ("w12", -2.0, [119, 49, 50])]
    assert [(a.token, a.logprob) for a in chat[1].top_logprobs] == [("w4", -0.25), ("w12", -2.0)]
