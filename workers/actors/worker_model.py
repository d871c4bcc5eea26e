"""What a worker actor loads, and how: the `--model` argument and its LoadOptions.

Actors are given a WorkerModel (picklable) and build their own engine or weights from it on
their node, so the same class serves the embedded model, a local folder, or a tiny test model.
"""

import dataclasses
from dataclasses import dataclass, field

import torch

from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.model.llama import LlamaModel
from specserve.workers.model.loader import LoadedModel, LoadOptions, load_engine, load_weights
from specserve.workers.spec.drafter import Drafter
from specserve.workers.spec.methods import SpecMethod, parse_method


@dataclass(frozen=True)
class WorkerModel:
    model: str  # an embedded name, a local Hugging Face folder, or a .gguf file (same path on every node)
    options: LoadOptions = field(default_factory=LoadOptions)  # how every worker loads it

    @property
    def config(self) -> EngineConfig:
        return self.options.config

    @property
    def device(self) -> str:
        return self.options.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.options.torch_dtype

    @property
    def uses_model_drafter(self) -> bool:
        return SpecMethod.MODEL in parse_method(self.config.spec.method)

    def set_threads(self) -> None:
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)

    def load_weights(self, name: str) -> LlamaModel:
        """The weights alone of `name` (the target or the draft model): prefill and draft workers."""
        return load_weights(name, self.torch_dtype, self.device, self.options.kernels)

    def load_engine(self, model_drafter: Drafter | None = None) -> LoadedModel:
        """The verify worker's engine. With model_drafter (a DraftWorker proxy) the `model` part
        of the spec method is served by it and the draft weights are not loaded here."""
        drafter = model_drafter if self.uses_model_drafter else None
        return load_engine(self.model, dataclasses.replace(self.options, progress=False), drafter)
