"""Builds an engine from a `--model` argument: resolve, read config and weights, tokenizer.

`LoadOptions` is how to load (device, dtype, threads, engine config, shared cache); the same
frozen value travels to Ray worker actors inside a WorkerModel. `load_weights` is the one way
to read a model's weights (the engine's target and draft, prefill and draft workers).
"""

import logging
from dataclasses import dataclass, field

import torch

from specserve.cluster.prefix_cache.cache import SharedPrefixCache
from specserve.cluster.prefix_cache.redis_store import RedisBlockStore

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine
from specserve.workers.model.cpu_info import busy_reason, cpu_info
from specserve.workers.model.kernel_choice import AUTO, check_mode, choose_kernels
from specserve.workers.model.llama import LlamaModel, MissingWeightError
from specserve.workers.model.passing_thread import on_passing_thread
from specserve.workers.model.model_config import ModelConfig, UnsupportedConfigError
from specserve.workers.spec.drafter import Drafter
from specserve.workers.model.model_source import (
    ModelError,
    ModelSource,
    cache_root,
    load_config,
    load_state_dict,
    load_tokenizer,
    resolve_model,
)
from specserve.workers.spec.tree_size import LatencyCurve, curve_key

log = logging.getLogger("specserve.loader")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that have it, else fp16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"  # cpu, cuda or cuda:N
    dtype: str = "auto"  # weights and KV: "auto" (fp32 on CPU, bf16/fp16 on GPU) or a DTYPES key
    config: EngineConfig = field(default_factory=EngineConfig)
    threads: int | None = None  # torch CPU threads (None leaves torch's choice)
    progress: bool = True  # show download / conversion progress
    redis_url: str | None = None  # the shared prefix cache (L2): redis://[:password@]host:port/db
    cache_ttl_s: int | None = None  # its values' lifetime (None: only LRU eviction)
    kernels: str = AUTO  # matmul paths: "auto" (measured on this machine, cached) or forced: onednn, mm, mm_t, linear

    def __post_init__(self):
        check_mode(self.kernels)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.cache_ttl_s is not None and self.cache_ttl_s < 1:
            raise ValueError(f"cache_ttl_s must be >= 1, got {self.cache_ttl_s}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return default_dtype(self.device) if self.dtype == "auto" else DTYPES[self.dtype]


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    engine: LLMEngine


def eos_token_ids(source: ModelSource, tokenizer) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    from transformers import GenerationConfig

    ids = set()
    try:
        gen = GenerationConfig.from_pretrained(source.folder, local_files_only=True)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass  # no generation_config.json
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_weights(model: str | ModelSource, dtype: torch.dtype, device: str, kernels: str = AUTO,
                 progress: bool = False) -> LlamaModel:
    """A model's weights alone (no tokenizer, no KV pool). model: a `--model` argument (resolved
    here, without progress output) or a source already resolved. kernels: as LoadOptions.kernels;
    "auto" measures the paths at the first load on this machine (progress: show it) and caches them."""
    source = model if isinstance(model, ModelSource) else resolve_model(model, progress=False)
    try:
        config = ModelConfig.from_hf(load_config(source))
        choice = choose_kernels(config, dtype, device, kernels, cache_root() / "profiles", progress)
        return LlamaModel(config, load_state_dict(source), dtype, device, choice)
    except (UnsupportedConfigError, MissingWeightError) as e:
        raise ModelError(f"{source.name}: {e}") from None


def _shared_cache(store: RedisBlockStore, source: ModelSource, model: LlamaModel, block_size: int,
                  ttl_s: int | None) -> SharedPrefixCache:
    mc = model.config
    return SharedPrefixCache(store, source.fingerprint, (mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim),
                             model.dtype, ttl_s=ttl_s)


def load_engine(model: str, options: LoadOptions = LoadOptions(), model_drafter: Drafter | None = None) -> LoadedModel:
    """The engine of `model` (an embedded name, a Hugging Face folder or a .gguf file).
    model_drafter: serves the `model` part of the spec method instead of a draft model loaded
    here (a verify worker's RemoteDrafter); the draft model is then not loaded.

    The loading (conversion, kernel timing, latency profile) runs on a passing thread, so that
    the thread that runs the engine, this one or an EngineLoop's, is the only one left holding an
    OpenMP pool (see workers/model/passing_thread.py).

    Raises ModelError with a one-line message when the model cannot be used.
    """
    if options.threads is not None:
        torch.set_num_threads(options.threads)  # this thread's, and the default of threads started later
    return on_passing_thread(_load_engine, model, options, model_drafter)


def _load_engine(model: str, options: LoadOptions, model_drafter: Drafter | None) -> LoadedModel:
    config = options.config
    torch_dtype, device = options.torch_dtype, options.device
    source = resolve_model(model, progress=options.progress)
    weights = load_weights(source, torch_dtype, device, options.kernels, options.progress)
    tokenizer = load_tokenizer(source)
    draft, draft_source = None, None
    if config.spec.draft_model and model_drafter is None:
        draft_source = resolve_model(config.spec.draft_model, progress=options.progress)
        if load_tokenizer(draft_source).get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"draft model {draft_source.name} has another tokenizer than {source.name}; "
                             "a draft model must share the target's vocabulary")
        draft = load_weights(draft_source, torch_dtype, device, options.kernels, options.progress)
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_info().identity
    key = curve_key(source.fingerprint, machine, device, str(torch_dtype), torch.get_num_threads(), weights.kernels.tag)
    curve_path = cache_root() / "profiles" / f"{key}.json"
    curve = LatencyCurve.load(curve_path) if not config.spec.max_draft_tokens else None  # fixed trees: unused
    shared, draft_shared = None, None
    if options.redis_url:
        store = RedisBlockStore(options.redis_url)
        shared = _shared_cache(store, source, weights, config.block_size, options.cache_ttl_s)
        if draft is not None:
            draft_shared = _shared_cache(store, draft_source, draft, config.block_size, options.cache_ttl_s)
    busy_before = busy_reason()
    engine = LLMEngine(weights, tokenizer, config, eos_token_ids(source, tokenizer), latency_curve=curve,
                       draft_model=draft, model_drafter=model_drafter, shared_cache=shared,
                       model_fingerprint=source.fingerprint,
                       draft_shared_cache=draft_shared,
                       draft_fingerprint=draft_source.fingerprint if draft_source else "")
    if curve is None and engine.speculator is not None and engine.speculator.curve is not None:
        busy = busy_before or busy_reason()
        if busy:  # a curve measured while others hold the cores is too steep: it would prune every tree, for good
            log.warning("verify latency curve measured while the machine is busy (%s): used now, not cached", busy)
        else:
            engine.speculator.curve.save(curve_path)  # measured once per model, machine, dtype, threads, kernels
    return LoadedModel(source, engine)
