"""An engine built with its `model` drafter passed in (a verify worker's RemoteDrafter): built
whole by the constructor, never patched afterwards; and the engine loop's step counters that
the verify worker reports."""

import pytest

from specserve.workers.engine.engine_loop import EngineLoop
from specserve.workers.engine.llm_engine import DEFAULT_MAX_DRAFT_TOKENS, EngineConfig, LLMEngine
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig
from specserve.workers.spec.model_drafter import ModelDrafter
from specserve.workers.actors.worker_model import WorkerModel

from tests.helpers.tiny_folder import save_tiny_model, tiny_engine_config
from tests.helpers.tiny_models import ours_from_hf, tiny_hf, tiny_tokenizer

PROMPT = [5, 7, 9, 11, 3, 5, 7, 9, 11, 3]


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf("llama", initializer_range=0.3))


def greedy(engine: LLMEngine) -> list[int]:
    seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=20))
    while engine.has_unfinished():
        engine.step()
    return seq.output_ids


def self_drafter(engine: LLMEngine) -> ModelDrafter:
    """A model drafter built as an engine would (what a DraftWorker runs), to pass in."""
    return engine._model_drafter(engine.model)


def test_a_passed_in_model_drafter_serves_the_model_method_losslessly(model):
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=SpecConfig("model", 6, draft_model="remote"))
    reference = greedy(LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20)))
    drafter = self_drafter(LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20)))
    engine = LLMEngine(model, tiny_tokenizer(), config, model_drafter=drafter)
    assert engine.speculator.drafter is drafter and engine.speculator.max_draft_tokens == 6
    assert greedy(engine) == reference


def test_the_default_draft_budget_is_the_engines(model):
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=SpecConfig("ngram"))
    assert LLMEngine(model, tiny_tokenizer(), config).speculator.max_draft_tokens == DEFAULT_MAX_DRAFT_TOKENS


def test_a_draft_model_and_a_model_drafter_together_are_refused(model):
    drafter = self_drafter(LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20)))
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=SpecConfig("model", 6, draft_model="x"))
    with pytest.raises(ValueError, match="draft_model or model_drafter"):
        LLMEngine(model, tiny_tokenizer(), config, draft_model=model, model_drafter=drafter)


def test_a_verify_workers_engine_does_not_load_the_draft_model(tmp_path, model):
    folder = save_tiny_model(tmp_path / "tiny", max_position_embeddings=256)
    spec = SpecConfig("model", 6, draft_model=str(tmp_path / "not-on-this-node"))  # loading it would fail
    worker_model = WorkerModel(folder, LoadOptions(config=tiny_engine_config(spec, 1 << 20)))
    helper = load_engine(folder, LoadOptions(config=tiny_engine_config(kv_cache_bytes=1 << 20), progress=False))
    drafter = self_drafter(helper.engine)
    engine = worker_model.load_engine(drafter).engine
    assert engine.draft_model is None and engine.speculator.drafter is drafter
    assert engine.config.spec == spec


def test_the_loop_counts_its_engine_steps(model):
    engine = LLMEngine(model, tiny_tokenizer(), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    loop = EngineLoop(engine, 2).start()
    try:
        done = []
        loop.submit(PROMPT, SamplingParams(max_new_tokens=5, ignore_eos=True), "r", done.append)
        while not (done and done[-1].finished):
            loop._thread.join(0.01)  # poll until the last output arrives
    finally:
        loop.stop(timeout=10)
    assert loop.steps == 5 and loop.step_seconds > 0  # one prefill step, then one token per step
