"""Sampling through the gRPC API keeps the target's distribution for every speculation method.

The engine-level test (tests/unit/test_engine_distribution.py) drives LLMEngine directly; this one
goes through what a user runs: a server started with the speculation gate off (it drafts on
every step, as `serve --spec-gate off`), requests with temperature 1.3 and seeds 0..N-1 over
gRPC from concurrent streams, and the first two tokens compared with the exact distribution
computed from the target's logits (transformers, not our engine) by a chi-square test:

    cells: every 2-token outcome expected >= 5 times; the rest pooled into one cell
    fails when the p-value < 1e-3 (a correct server fails one method in 1000; seeds are fixed,
    so a given run always gives the same answer)

N is 600 per method in CI; SPECSERVE_GRPC_DIST_SAMPLES raises it (1500 for the issue's bench size).
"""

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from specserve.scheduler.client import Client
from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.sampler import target_probs
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.chi_square import chi_square_p_value
from tests.helpers.tiny_models import tiny_hf, tiny_tokenizer

V = 12
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3]  # every token recurs
TEMPERATURE = 1.3
SAMPLES = int(os.environ.get("SPECSERVE_GRPC_DIST_SAMPLES", "600"))
STREAMS = 16
SHAPE = dict(vocab_size=V, initializer_range=0.2, max_position_embeddings=256)
METHODS = ["none", "ngram", "recycling", "suffix", "auto", "model", "model+ngram", "ngram+recycling"]


def save(folder, seed: int, **overrides) -> str:
    model = tiny_hf("llama", seed=seed, **SHAPE, **overrides)
    model.save_pretrained(folder)
    tiny_tokenizer(V).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    target = save(tmp_path_factory.mktemp("dist-target"), seed=0)
    draft = save(tmp_path_factory.mktemp("dist-draft"), seed=1, num_hidden_layers=1)  # a genuinely other model
    return target, draft


@pytest.fixture(scope="module")
def expected(folders) -> dict[tuple[int, int], float]:
    """Exact probability of every first two tokens, from the target's logits."""
    hf = tiny_hf("llama", seed=0, **SHAPE)
    params = SamplingParams(temperature=TEMPERATURE)
    with torch.no_grad():
        first = target_probs(hf(torch.tensor([PROMPT])).logits[:, -1], params).double()[0]
        second = target_probs(hf(torch.tensor([PROMPT + [a] for a in range(V)])).logits[:, -1], params).double()
    joint = first[:, None] * second  # [V, V]
    return {(a, b): float(joint[a, b]) for a in range(V) for b in range(V)}


def serve(target: str, draft: str, method: str) -> ServerThread:
    spec = SpecConfig(method, 0, draft if "model" in method else None, gate=False)  # latency-sized, no gate
    config = EngineConfig(block_size=4, kv_cache_bytes=8 << 20, spec=spec)
    server = ServerThread(ServerConfig(port=0, metrics_port=None))
    server.attach(load_engine(target, LoadOptions(config=config, progress=False)), "tiny")
    return server


@pytest.mark.parametrize("method", METHODS)
def test_first_tokens_over_grpc_follow_the_target(folders, expected, method):
    server = serve(*folders, method)
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            def first_two(seed: int) -> tuple[tuple[int, ...], int, int]:
                chunks = list(client.generate(prompt_token_ids=PROMPT, max_tokens=3, temperature=TEMPERATURE,
                                              seed=seed, ignore_eos=True, timeout=120))
                ids = [t for c in chunks for t in c.token_ids]
                return tuple(ids[:2]), chunks[-1].spec.drafted_tokens, chunks[-1].spec.accepted_tokens

            with ThreadPoolExecutor(STREAMS) as pool:
                results = list(pool.map(first_two, range(SAMPLES)))
    finally:
        server.stop()
    counts = Counter(r[0] for r in results)
    drafted, accepted = sum(r[1] for r in results), sum(r[2] for r in results)
    if method != "none":
        assert drafted > SAMPLES // 2 and accepted > 0, (drafted, accepted)  # the drafter really ran
    p_value = chi_square_p_value(counts, expected, SAMPLES)
    assert p_value >= 1e-3, f"{method}: p = {p_value:.2e}, drafted {drafted}, accepted {accepted}"
