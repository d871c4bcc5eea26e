"""load_engine from model folders on disk: a draft model must share the target's tokenizer; the
loading runs on a thread that has ended when it returns."""

import threading

import pytest

from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.model import loader
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.model.passing_thread import on_passing_thread
from specserve.workers.model.model_source import ModelError
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_folder import save_tiny_model


def save(folder, seed: int, tokenizer_vocab: int = 97):
    return save_tiny_model(folder, max_position_embeddings=256, seed=seed, tokenizer_vocab=tokenizer_vocab)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))


def generate(folder: str, spec: SpecConfig) -> list[int]:
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=spec)
    engine = load_engine(folder, LoadOptions(config=config, progress=False)).engine
    seq = engine.add_request([5, 7, 9, 11, 3, 5, 7], SamplingParams(max_new_tokens=20, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return seq.output_ids


def test_draft_model_with_the_same_tokenizer_is_loaded_and_lossless(tmp_path):
    target, draft = save(tmp_path / "target", seed=0), save(tmp_path / "draft", seed=1)
    reference = generate(target, SpecConfig("none"))
    assert generate(target, SpecConfig("model", 6, draft_model=draft)) == reference


def test_draft_model_with_another_tokenizer_is_refused(tmp_path):
    target, draft = save(tmp_path / "target", seed=0), save(tmp_path / "draft", seed=1, tokenizer_vocab=50)
    with pytest.raises(ModelError, match="another tokenizer"):
        load_engine(target, LoadOptions(config=EngineConfig(spec=SpecConfig("model", 6, draft_model=draft)),
                                        progress=False))


def test_on_passing_thread_returns_or_raises_from_a_thread_that_ended():
    ran_on = []

    def work(x):
        ran_on.append(threading.current_thread())
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x * 2

    assert on_passing_thread(work, 21) == 42
    with pytest.raises(ValueError, match="negative: -1"):
        on_passing_thread(work, -1)
    assert all(t is not threading.current_thread() and not t.is_alive() for t in ran_on)


def test_load_engine_loads_on_a_thread_that_ends(monkeypatch):
    """The thread that will run the engine must be the only live one that ran the model's
    parallel ops (see workers/model/passing_thread.py): load_engine loads on a thread that has
    ended once it returns, and sets the caller's torch threads."""
    import torch

    loaded_on = []
    monkeypatch.setattr(loader, "_load_engine", lambda *args: loaded_on.append(threading.current_thread()) or "x")
    before = torch.get_num_threads()
    try:
        assert loader.load_engine("tiny", loader.LoadOptions(threads=1, progress=False)) == "x"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert len(loaded_on) == 1 and not loaded_on[0].is_alive() and loaded_on[0] is not threading.current_thread()
