"""What a worker actor loads, and how: the `--model` argument and load_engine's keywords.

Actors are given a WorkerModel (picklable) and build their own engine or weights from it on
their node, so the same class serves the embedded model, a local folder, or a tiny test model.
"""

import dataclasses
from dataclasses import dataclass, field

import torch

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine, default_dtype
from specserve.workers.model.llama import LlamaModel
from specserve.workers.model.loader import DTYPES, LoadedModel, load_engine
from specserve.workers.model.model_config import ModelConfig
from specserve.workers.model.model_source import ModelError, load_config, load_state_dict, resolve_model
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.latency_profile import measure_latency_curve
from specserve.workers.spec.methods import SpecConfig, SpecMethod, build_drafter, parse_method
from specserve.workers.spec.speculator import Speculator

DEFAULT_MAX_DRAFT_TOKENS = 79  # as the engine's default


@dataclass(frozen=True)
class WorkerModel:
    model: str  # an embedded name, a local Hugging Face folder, or a .gguf file (same path on every node)
    load_options: dict = field(default_factory=dict)  # load_engine keywords: device, dtype, threads, config, redis_url, ...

    @property
    def config(self) -> EngineConfig:
        return self.load_options.get("config", EngineConfig())

    @property
    def device(self) -> str:
        return self.load_options.get("device", "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = self.load_options.get("dtype", "auto")
        return default_dtype(self.device) if dtype == "auto" else DTYPES[dtype]

    @property
    def uses_model_drafter(self) -> bool:
        return SpecMethod.MODEL in parse_method(self.config.spec.method)

    def set_threads(self) -> None:
        threads = self.load_options.get("threads")
        if threads is not None:
            torch.set_num_threads(threads)


def load_weights(name: str, dtype: torch.dtype, device: str) -> LlamaModel:
    """A model's weights alone (no tokenizer, no KV pool): for prefill and draft workers."""
    source = resolve_model(name, progress=False)
    try:
        return LlamaModel(ModelConfig.from_hf(load_config(source)), load_state_dict(source), dtype, device)
    except ValueError as e:
        raise ModelError(f"{source.name}: {e}") from None


def load_verify_engine(wm: WorkerModel, model_drafter: Drafter | None = None) -> LoadedModel:
    """The verify worker's engine. With model_drafter (a DraftWorker proxy) the `model` part of
    the spec method is served by it and the draft weights are not loaded here."""
    if model_drafter is None or not wm.uses_model_drafter:
        return load_engine(wm.model, **{**wm.load_options, "progress": False})
    spec = wm.config.spec
    # Loaded with a train-free drafter in its place, so the loader brings the verify forward's
    # latency curve along (cached per model and machine, measured once), then swapped.
    stand_in = dataclasses.replace(wm.config, spec=SpecConfig("ngram", spec.max_draft_tokens))
    loaded = load_engine(wm.model, **{**wm.load_options, "config": stand_in, "progress": False})
    install_drafter(loaded.engine, spec, model_drafter)
    return loaded


def install_drafter(engine: LLMEngine, spec: SpecConfig, model_drafter: Drafter) -> None:
    """Gives an engine the speculator of `spec`, its `model` part served by model_drafter (the
    engine cannot load a drafter that lives in another process); keeps the engine's latency
    curve when it has one."""
    drafter = build_drafter(spec, engine.model.config.vocab_size, model_drafter)
    max_draft = spec.max_draft_tokens or DEFAULT_MAX_DRAFT_TOKENS
    curve = engine.speculator.curve if engine.speculator is not None else None
    if curve is None and not spec.max_draft_tokens:
        curve = measure_latency_curve(engine.model, engine.kv, max_slots=max_draft + 1)
    engine.config = dataclasses.replace(engine.config, spec=spec)
    engine.speculator = Speculator(drafter, engine.kv, max_draft, engine.max_model_len, curve)
