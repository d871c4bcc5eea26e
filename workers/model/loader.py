"""Builds an engine from a `--model` argument: resolve, read config and weights, tokenizer."""

import socket
from dataclasses import dataclass

import torch

from specserve.cluster.prefix_cache.cache import SharedPrefixCache
from specserve.cluster.prefix_cache.redis_store import RedisBlockStore

from specserve.workers.engine.llm_engine import EngineConfig, LLMEngine, default_dtype
from specserve.workers.model.llama import LlamaModel, MissingWeightError
from specserve.workers.model.model_config import ModelConfig, UnsupportedConfigError
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _load_weights(source: ModelSource, dtype: torch.dtype, device: str) -> LlamaModel:
    try:
        return LlamaModel(ModelConfig.from_hf(load_config(source)), load_state_dict(source), dtype, device)
    except (UnsupportedConfigError, MissingWeightError) as e:
        raise ModelError(f"{source.name}: {e}") from None


def _shared_cache(store: RedisBlockStore, source: ModelSource, model: LlamaModel, block_size: int,
                  ttl_s: int | None) -> SharedPrefixCache:
    mc = model.config
    return SharedPrefixCache(store, source.fingerprint, (mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim),
                             model.dtype, ttl_s=ttl_s)


def load_engine(
    model: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    config: EngineConfig = EngineConfig(),
    threads: int | None = None,
    progress: bool = True,
    redis_url: str | None = None,
    cache_ttl_s: int | None = None,
) -> LoadedModel:
    """threads: torch CPU threads (None leaves torch's choice). dtype: "auto" (fp32 on CPU, bf16/fp16 on GPU) or a DTYPES key.
    redis_url: the shared prefix cache (L2), redis://[:password@]host:port/db; cache_ttl_s: its values' lifetime.

    Raises ModelError with a one-line message when the model cannot be used.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    torch_dtype = default_dtype(device) if dtype == "auto" else DTYPES[dtype]
    source = resolve_model(model, progress=progress)
    weights = _load_weights(source, torch_dtype, device)
    tokenizer = load_tokenizer(source)
    draft, draft_source = None, None
    if config.spec.draft_model:
        draft_source = resolve_model(config.spec.draft_model, progress=progress)
        if load_tokenizer(draft_source).get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"draft model {draft_source.name} has another tokenizer than {source.name}; "
                             "a draft model must share the target's vocabulary")
        draft = _load_weights(draft_source, torch_dtype, device)
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else socket.gethostname()
    key = curve_key(source.fingerprint, machine, device, str(torch_dtype), torch.get_num_threads())
    curve_path = cache_root() / "profiles" / f"{key}.json"
    curve = LatencyCurve.load(curve_path)
    shared, draft_shared = None, None
    if redis_url:
        store = RedisBlockStore(redis_url)
        shared = _shared_cache(store, source, weights, config.block_size, cache_ttl_s)
        if draft is not None:
            draft_shared = _shared_cache(store, draft_source, draft, config.block_size, cache_ttl_s)
    engine = LLMEngine(weights, tokenizer, config, eos_token_ids(source, tokenizer), latency_curve=curve,
                       draft_model=draft, shared_cache=shared, model_fingerprint=source.fingerprint,
                       draft_shared_cache=draft_shared,
                       draft_fingerprint=draft_source.fingerprint if draft_source else "")
    if curve is None and engine.speculator is not None and engine.speculator.curve is not None:
        engine.speculator.curve.save(curve_path)  # measured once per model, machine, dtype, threads
    return LoadedModel(source, engine)
