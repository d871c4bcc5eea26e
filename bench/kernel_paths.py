"""`bench kernels`: one decode step (and one 16-node verify step) of the model per kernel path,
against the memory-bandwidth floor, in one run.

For each matmul path (projections and LM head alike, attention in its default path), each
attention path (with the measured choice's matmul paths), and the choice `kernels=auto` makes
on this machine, the same weights are laid out and a step over CONTEXT_LEN tokens of context
is timed: the best of `repeats` runs per round, rounds going over every path in turn, the best
round kept (the machine is shared; noise only adds time). Printed with the CPU model and the
ISA flags that matter, threads and dtype; ratios to the floor are what compare across machines.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.kernels.attention import AttentionKernel
from specserve.kernels.linear import available_kernels
from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, KVCacheConfig, PagedKVCache
from specserve.workers.model.cpu_info import cpu_info
from specserve.workers.model.kernel_choice import KernelChoice, choose_kernels
from specserve.workers.model.llama import LlamaModel
from specserve.workers.model.loader import DTYPES
from specserve.workers.model.model_config import ModelConfig
from specserve.workers.model.model_source import load_config, load_state_dict, resolve_model

from specserve.bench.membw import decode_floor, measure_bandwidth, time_step

CONTEXT_LEN = 256
VERIFY_NODES = 16


@dataclass(frozen=True)
class KernelPathsConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"  # a DTYPES key
    threads: int = 2
    rounds: int = 3  # passes over every path; the best counts
    repeats: int = 5  # timed steps per path and round
    out: Path = field(default_factory=lambda: Path("bench/results"))

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("threads", "rounds", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _candidates(auto: KernelChoice, dtype: torch.dtype) -> dict[str, KernelChoice]:
    paths = {f"matmul {k.value}": KernelChoice(k, k, AttentionKernel.SDPA) for k in available_kernels(torch.device("cpu"), dtype)}
    for a in AttentionKernel:
        paths[f"attention {a.value}"] = KernelChoice(auto.projections, auto.lm_head, a)
    paths[f"auto ({auto.tag})"] = auto
    return paths


def _step_runner(model: LlamaModel):
    """fn(nodes) -> seconds of one forward of `nodes` new slots (a chain) after CONTEXT_LEN tokens."""
    cfg = model.config
    kv = PagedKVCache(KVCacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, 16, dtype=model.dtype))
    table = BlockTable()
    tokens = torch.randint(0, cfg.vocab_size, (CONTEXT_LEN + VERIFY_NODES,), generator=torch.Generator().manual_seed(0)).tolist()
    model.forward(build_forward_batch([SequenceSlots(table, tokens[:CONTEXT_LEN])], kv), kv)

    def step(nodes: int) -> None:
        chain = torch.ones(nodes, nodes, dtype=torch.bool).tril() if nodes > 1 else None
        span = SequenceSlots(table, tokens[CONTEXT_LEN : CONTEXT_LEN + nodes], tree_mask=chain, logits_rows=list(range(nodes)))
        model.forward(build_forward_batch([span], kv), kv)
        kv.truncate(table, CONTEXT_LEN)

    return step


def run_kernel_paths_bench(config: KernelPathsConfig = KernelPathsConfig()) -> dict:
    torch.set_num_threads(config.threads)
    dtype = DTYPES[config.dtype]
    source = resolve_model(config.model, progress=True)
    model_config = ModelConfig.from_hf(load_config(source))
    state = load_state_dict(source)
    auto = choose_kernels(model_config, dtype, mode="auto", cache_dir=None)
    paths = _candidates(auto, dtype)
    runners = {name: _step_runner(LlamaModel(model_config, state, dtype, kernels=choice)) for name, choice in paths.items()}
    weight_bytes = LlamaModel(model_config, state, dtype, kernels=auto).weight_bytes
    best = {name: {1: float("inf"), VERIFY_NODES: float("inf")} for name in paths}
    bandwidth = float("inf")
    for _ in tqdm(range(config.rounds), desc="rounds", unit="round"):
        for name, step in runners.items():
            for nodes in best[name]:
                best[name][nodes] = min(best[name][nodes], time_step(lambda: step(nodes), config.repeats))
        bandwidth = min(bandwidth, 1 / measure_bandwidth(repeats=2).copy_bytes_per_s)  # best = fewest s per byte
    floor = decode_floor(weight_bytes, 1 / bandwidth)
    cpu = cpu_info()
    report = {
        "suite": "kernels", "model": source.name, "cpu": cpu.model, "isa_flags": list(cpu.flags), "dtype": str(dtype),
        "threads": torch.get_num_threads(), "rounds": config.rounds, "repeats": config.repeats,
        "context_len": CONTEXT_LEN, "auto_choice": auto.to_json(), "decode_floor": floor.to_json(),
        "paths": {name: {"decode_step_s": t[1], "decode_over_floor": t[1] / floor.floor_s,
                         f"verify_{VERIFY_NODES}_step_s": t[VERIFY_NODES]} for name, t in best.items()},
    }
    print(f"{cpu.describe()}; {dtype}, {torch.get_num_threads()} threads, {source.name}, context {CONTEXT_LEN}")
    print(f"floor {floor.weight_bytes / 1e6:.0f} MB / {floor.bytes_per_s / 1e9:.1f} GB/s = {floor.floor_s * 1e3:.1f} ms; "
          f"best of {config.rounds} rounds x {config.repeats} steps")
    print(f"{'path':28s} {'decode':>9s} {'/floor':>7s} {f'verify {VERIFY_NODES}':>10s}")
    for name, t in best.items():
        print(f"{name:28s} {t[1] * 1e3:7.1f}ms {t[1] / floor.floor_s:6.2f}x {t[VERIFY_NODES] * 1e3:8.1f}ms")
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / f"kernel_paths_{config.dtype}.json").write_text(json.dumps(report, indent=2))
    return report
