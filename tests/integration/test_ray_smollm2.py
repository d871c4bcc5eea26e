"""The real SmolLM2-135M through the Ray worker actors on the multi-node test cluster: greedy
output identical to the in-process engine with `--spec model --draft-model smollm2-135m` (the
draft model's prompt K/V handed over from the prefill worker, acceptance not collapsed) and
with recycling."""

import uuid

import pytest
import ray

from specserve.cluster.placement import RoleSpec
from specserve.cluster.ray_cluster import connect
from specserve.scheduler.ray.backend import RayBackend
from specserve.scheduler.ray.config import RayBackendConfig
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig
from specserve.workers.actors.worker_model import WorkerModel

from .ray_cluster_fixture import run

MODEL = "smollm2-135m"
THRESHOLD = 64
N = 48
CODE = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
'''
LONG = CODE + "".join(f"\n\ndef helper_{i}(values: list[int]) -> int:\n    return sum(v * {i} for v in values)"
                      for i in range(8)) + "\n\ndef main():\n"


def config(spec: SpecConfig) -> EngineConfig:
    return EngineConfig(kv_cache_bytes=1 << 26, spec=spec)


@pytest.fixture(scope="module")
def in_process():
    """Engines in this process: speculation off (the reference) and the same model drafter."""
    none = load_engine(MODEL, LoadOptions(config=config(SpecConfig("none")), threads=1, progress=False)).engine
    model = load_engine(MODEL, LoadOptions(config=config(SpecConfig("model", 8, draft_model=MODEL)), threads=1,
                                           progress=False)).engine
    return none, model


def greedy(engine, ids):
    from specserve.workers.engine.sequence import SamplingParams

    seq = engine.add_request(ids, SamplingParams(max_new_tokens=N, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return seq


def backend_for(spec: SpecConfig, **roles) -> RayBackend:
    small = RoleSpec(replicas=1, num_cpus=0.1)
    cfg = RayBackendConfig(**{"name": f"s{uuid.uuid4().hex[:8]}", "verify": small, "prefill": small, "draft": small,
                              "prefill_threshold": THRESHOLD, **roles})
    backend = RayBackend(cfg, WorkerModel(MODEL, LoadOptions(config=config(spec), threads=1)), connect())
    backend.start()
    return backend


def test_model_drafter_through_actors_equals_in_process(ray_cluster, in_process):
    none, model = in_process
    backend = backend_for(SpecConfig("model", 8, draft_model=MODEL))
    try:
        for text in (CODE, LONG):
            ids = none.tokenizer(text)["input_ids"]
            reference = greedy(none, ids).output_ids
            local = greedy(model, ids)
            tokens, last = run(backend, ids, N)
            assert tokens == reference, f"prompt of {len(ids)} tokens"
            in_proc = local.spec.accepted_tokens / local.spec.spec_steps
            actors = last.seq.spec.accepted_tokens / last.seq.spec.spec_steps
            assert actors >= 0.8 * in_proc, (len(ids), actors, in_proc)
        long_ids = none.tokenizer(LONG)["input_ids"]
        assert len(long_ids) >= THRESHOLD
        draft = ray.get(backend.pool.draft_handles[0].stats.remote())
        assert draft.handed_tokens == len(long_ids) - 1  # the draft model's prompt K/V came from the prefill worker
        assert ray.get(backend.loops[0].handle.breakdown.remote())["prefix_tokens"] == len(long_ids) - 1
    finally:
        backend.shutdown()


def test_recycling_through_actors_equals_in_process(ray_cluster, in_process):
    none, _ = in_process
    backend = backend_for(SpecConfig("recycling", 16), prefill=RoleSpec(replicas=0))
    try:
        ids = none.tokenizer(CODE)["input_ids"]
        tokens, last = run(backend, ids, N)
        assert tokens == greedy(none, ids).output_ids
        assert last.seq.spec.spec_steps > 0
    finally:
        backend.shutdown()
