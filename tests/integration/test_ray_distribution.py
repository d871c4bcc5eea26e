"""Sampling through the Ray worker actors keeps the target's distribution for every speculation method.

The gRPC test (test_grpc_distribution.py) serves from an in-process engine; here the verify,
draft and prefill workers are Ray actors on the role nodes of the multi-node test cluster
(ray_cluster_fixture.py) and requests go through RayBackend's engine loops, what
`specserve serve --address` serves from. Speculation runs on every step: SpecConfig gate=False
and a fixed max_draft_tokens, so there is no latency curve and no gate. The `model` drafter runs
in a DraftWorker with a genuinely different draft model (tests/helpers/sampling_distribution.py);
with the long prompt a PrefillWorker computes the prompt's target and draft K/V and hands both over.

Requests: temperature 1.3, seeds 0..N-1, 3 new tokens, end-of-sequence ignored, WAVE in flight
at once (one engine batch). The first two tokens (the prefill's sample, then one verify step's
token) are compared with the exact distribution from the target's logits
(transformers, not our engine) by a chi-square test (tests/helpers/chi_square.py):

    cells: every 2-token outcome expected >= 5 times; the rest pooled into one cell
    fails when the p-value < ALPHA = 1e-3: a correct system fails one case in 1000 (the seeds are
    fixed, but drafters that learn across requests see them in an order set by timing)

N is 400 per case in CI (the file takes about 3 minutes on 2 cores); SPECSERVE_RAY_DIST_SAMPLES
raises it (1500 for the issue's bench size). Every case must have drafted and accepted drafts
through the actors, or it would prove nothing.
"""

import os
import uuid
from collections import Counter

import pytest
import ray

from specserve.cluster.placement import RoleSpec
from specserve.cluster.ray_cluster import connect
from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.workers.actors.worker_model import WorkerModel
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.engine.step_planner import PlannerConfig
from specserve.workers.model.loader import LoadOptions
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.chi_square import chi_square_p_value
from tests.helpers.sampling_distribution import PROMPT, SHAPE, TARGET_SEED, exact_first_tokens, save_target_and_draft
from tests.helpers.tiny_models import tiny_hf

from .ray_cluster_fixture import Collector

TEMPERATURE = 1.3
SAMPLES = int(os.environ.get("SPECSERVE_RAY_DIST_SAMPLES", "400"))
WAVE = 100  # requests in flight at once, all in one engine batch
ALPHA = 1e-3
MAX_DRAFT_TOKENS = 6
THRESHOLD = 32  # prompts this long go through the PrefillWorker
LONG_PROMPT = PROMPT * 2  # 46 tokens, as repetitive
CASES = [
    pytest.param("none", PROMPT, id="none"),
    pytest.param("ngram", PROMPT, id="ngram"),
    pytest.param("recycling", PROMPT, id="recycling"),
    pytest.param("suffix", PROMPT, id="suffix"),
    pytest.param("model", PROMPT, id="model"),
    pytest.param("model", LONG_PROMPT, id="model-prefill-worker"),
    pytest.param("model+ngram", LONG_PROMPT, id="model+ngram-prefill-worker"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[str, str]:
    return save_target_and_draft(tmp_path_factory)


@pytest.fixture(scope="module")
def expected() -> dict[tuple[int, ...], dict[tuple[int, int], float]]:
    """Per prompt, the exact probability of every first two tokens, from the target's logits."""
    hf = tiny_hf("llama", seed=TARGET_SEED, **SHAPE)
    params = SamplingParams(temperature=TEMPERATURE)
    return {tuple(p): exact_first_tokens(hf, p, params, 2) for p in (PROMPT, LONG_PROMPT)}


def start_backend(folders: tuple[str, str], method: str, prefill: bool) -> RayBackend:
    """One verify worker, a draft worker for `model`, and a PrefillWorker when prefill is set."""
    target, draft = folders
    spec = SpecConfig(method, MAX_DRAFT_TOKENS if method != "none" else 0,
                      draft if "model" in method else None, gate=False)
    config = EngineConfig(block_size=4, kv_cache_bytes=8 << 20, spec=spec,
                          planner=PlannerConfig(max_num_seqs=WAVE, max_num_batched_tokens=WAVE * len(LONG_PROMPT)))
    small = RoleSpec(replicas=1, num_cpus=0.1)
    backend = RayBackend(
        RayBackendConfig(name=f"dist{uuid.uuid4().hex[:8]}", verify=small, draft=small,
                         prefill=small if prefill else RoleSpec(replicas=0), prefill_threshold=THRESHOLD),
        WorkerModel(target, LoadOptions(config=config, threads=1)), connect())
    backend.start()
    return backend


def sample_through_actors(backend: RayBackend, prompt: list[int]) -> tuple[Counter, int, int]:
    """First two tokens of SAMPLES seeded requests, and the summed drafted and accepted counters."""
    counts, drafted, accepted = Counter(), 0, 0
    loop = backend.loops[0]
    for start in range(0, SAMPLES, WAVE):
        outs = []
        for seed in range(start, min(start + WAVE, SAMPLES)):
            out = Collector()
            params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=3, seed=seed, ignore_eos=True)
            loop.submit(prompt, params, uuid.uuid4().hex, out)
            outs.append(out)
        for out in outs:
            last = out.wait()
            assert not isinstance(last, Exception), last
            counts[tuple(out.tokens[:2])] += 1
            drafted += last.seq.spec.drafted_tokens
            accepted += last.seq.spec.accepted_tokens
    return counts, drafted, accepted


@pytest.mark.parametrize("method, prompt", CASES)
def test_first_tokens_through_actors_follow_the_target(ray_cluster, folders, expected, method, prompt):
    through_prefill_worker = len(prompt) >= THRESHOLD
    backend = start_backend(folders, method, through_prefill_worker)
    try:
        counts, drafted, accepted = sample_through_actors(backend, prompt)
        verify = ray.get(backend.loops[0].handle.breakdown.remote())
        draft = ray.get(backend.pool.draft_handles[0].stats.remote()) if "model" in method else None
    finally:
        backend.shutdown()
    if method != "none":
        assert drafted > SAMPLES // 2 and accepted > 0, (drafted, accepted)  # the drafter really ran
    if draft is not None:  # the model drafter ran in the DraftWorker
        assert draft.proposals >= SAMPLES and verify["draft"]["calls"] > 0 and verify["draft"]["failures"] == 0
    handed = SAMPLES * (len(prompt) - 1) if through_prefill_worker else 0  # all but the last prompt token
    assert verify["prefix_tokens"] == handed
    if draft is not None:
        assert draft.handed_tokens == handed
    p_value = chi_square_p_value(counts, expected[tuple(prompt)], SAMPLES)
    print(f"{method} ({len(prompt)}-token prompt): N = {SAMPLES}, p = {p_value:.3g}, drafted {drafted}, "
          f"accepted {accepted}")  # the bench size's figures (pytest -s)
    assert p_value >= ALPHA, f"{method}: p = {p_value:.2e}, drafted {drafted}, accepted {accepted}"
