"""`specserve bench longctx`: sequence-parallel prefill across 1, 2 and 4 local workers, and
decode with speculation at long contexts.

Prefill (per prompt length and worker count, the same real prompt cut to length): wall time,
each worker's peak memory growth during the prefill (resident set sampled every millisecond,
minus its level just before), and bytes each worker sends per layer (ring: W-1 K/V blocks;
Ulysses: two all-to-alls) plus the K/V gathered to rank 0 once. SmolLM2-135M's context is 8192
positions, so the prefill rows use its weights with the RoPE table extended to the longest
length (positions past 8192 are untrained: the numbers are timing and memory, not quality),
and only the first --layers layers (time and memory per layer are what scale).

Long decode: verify-forward latency against context length (1..64 new tokens after a context of
1K..16K tokens in the paged cache), and on a real 8000-token prompt the decode tokens/s of the
engine with speculation (ngram) against without, measured side by side.
"""

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specserve.cluster.prefill_group import LocalPrefillGroup
from specserve.kernels.ring_attention import ring_bytes_sent
from specserve.kernels.ulysses_attention import ulysses_bytes_sent
from specserve.workers.model.sequence_parallel import CheckpointModel, PrefillProgram, SequenceParallelMode

from specserve.bench.harness import BenchConfig
from specserve.bench.long_decode import run_long_decode
from specserve.bench.long_prompts import long_prompt_ids

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Highest resident set seen by a thread sampling every `interval_s` (torch ops release the GIL)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak = interval_s, resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


@dataclass(frozen=True)
class RankMeasure:
    rank: int
    seconds: float
    peak_growth_bytes: int  # peak resident set during the prefill minus just before it
    kv_bytes: int  # of that, the K/V it must hold: its shard's, plus on rank 0 the gathered whole
    bytes_sent_per_layer: int  # attention communication of this rank, one layer
    gather_bytes_sent: int  # this rank's K/V sent to rank 0 once (0 on rank 0)


class MeasuredPrefillProgram(PrefillProgram):
    """PrefillProgram that returns each rank's measurements instead of the K/V."""

    def setup(self, rank: int, world_size: int, group) -> None:
        super().setup(rank, world_size, group)
        self.rank, self.world_size = rank, world_size
        self._runner.prefill(list(range(64)))  # warm-up: first-call allocations and kernel choices

    def run(self, token_ids: list[int]) -> RankMeasure:
        cfg, elem = self._runner.model.config, self._runner.model.dtype.itemsize
        layout = self.mode.layout(len(token_ids), self.world_size)
        if self.mode is SequenceParallelMode.RING:
            per_layer = ring_bytes_sent(layout, cfg.num_kv_heads, cfg.head_dim, elem)
        else:
            per_layer = ulysses_bytes_sent(layout, self.rank, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, elem)
        gather = 0 if self.rank == 0 else 2 * cfg.num_layers * layout.shard_len(self.rank) * cfg.num_kv_heads * cfg.head_dim * elem
        kv_bytes = 2 * cfg.num_layers * layout.shard_len(self.rank) * cfg.num_kv_heads * cfg.head_dim * elem
        if self.rank == 0:
            kv_bytes += 2 * cfg.num_layers * len(token_ids) * cfg.num_kv_heads * cfg.head_dim * elem
        before = resident_bytes()
        start = time.perf_counter()
        with PeakSampler() as sampler:
            kv = self._runner.prefill(token_ids)
        seconds = time.perf_counter() - start
        del kv
        return RankMeasure(self.rank, seconds, sampler.peak - before, kv_bytes, per_layer, gather)


def run_prefill_scaling(model: str, lengths: list[int], workers: list[int], layers: int, mode: SequenceParallelMode,
                        threads: int, tokenizer, seed: int) -> list[dict]:
    # Allocations over 64 KiB get their own mappings in the workers (glibc), returned on free, so
    # the resident set follows live tensors rather than what the allocator kept from earlier rows.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 10))
    ids = long_prompt_ids(tokenizer, max(lengths), seed)
    factory = CheckpointModel(model, max_position_embeddings=max(lengths), num_layers=layers)
    rows = []
    for w in workers:
        program = MeasuredPrefillProgram(factory, mode, threads=max(1, threads // w))
        with LocalPrefillGroup(program, w, timeout_s=3600) as group:
            for n in lengths:
                ranks = group.run(ids[:n])
                row = {"tokens": n, "workers": w, "mode": mode.value, "layers": layers,
                       "seconds": max(r.seconds for r in ranks),
                       "peak_growth_mib_rank0": ranks[0].peak_growth_bytes / 2**20,
                       "peak_growth_mib_max_other": max((r.peak_growth_bytes for r in ranks[1:]), default=0) / 2**20,
                       # peak growth less the K/V held: activations and communication buffers
                       "activations_mib_max_rank": max(r.peak_growth_bytes - r.kv_bytes for r in ranks) / 2**20,
                       "attention_mib_sent_per_layer_per_rank": max(r.bytes_sent_per_layer for r in ranks) / 2**20,
                       "gather_mib_to_rank0": sum(r.gather_bytes_sent for r in ranks) / 2**20,
                       "ranks": [asdict(r) for r in ranks]}
                rows.append(row)
                print(f"prefill {n:>6} tokens  {w} worker(s): {row['seconds']:7.2f} s  peak growth rank0 "
                      f"{row['peak_growth_mib_rank0']:7.1f} MiB, others {row['peak_growth_mib_max_other']:7.1f} MiB, "
                      f"activations (max rank) {row['activations_mib_max_rank']:7.1f} MiB, "
                      f"sent/layer/rank {row['attention_mib_sent_per_layer_per_rank']:6.1f} MiB", flush=True)
    return rows


@dataclass(frozen=True)
class LongContextBenchConfig(BenchConfig):
    lengths: tuple[int, ...] = (4096, 8192, 16384)  # prompt lengths to prefill
    group_sizes: tuple[int, ...] = (1, 2, 4)  # prefill workers per row
    mode: SequenceParallelMode = SequenceParallelMode.RING
    layers: int = 4  # prefill with the model's first N layers
    skip_decode: bool = False  # prefill rows only
    threads: int = 2  # shared by the workers

    def __post_init__(self):
        super().__post_init__()
        for name in ("lengths", "group_sizes"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name} must list positive integers, got {values!r}")
        if self.layers < 1 or self.threads < 1:
            raise ValueError(f"layers and threads must be >= 1, got {self.layers}, {self.threads}")


def run_longctx_bench(config: LongContextBenchConfig) -> None:
    from specserve.workers.model.model_source import load_tokenizer, resolve_model

    lengths, workers, threads = list(config.lengths), list(config.group_sizes), config.threads
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(resolve_model(config.model, progress=False))
    print(f"model {config.model} (first {config.layers} layers, RoPE to {max(lengths)} positions), seed {config.seed}, "
          f"{threads} threads shared by the workers", flush=True)
    result = {"seed": config.seed, "threads": threads, "model": config.model,
              "prefill": run_prefill_scaling(config.model, lengths, workers, config.layers,
                                             config.mode, threads, tokenizer, config.seed)}
    if not config.skip_decode:
        result["decode"] = run_long_decode(config.model, tokenizer, threads, config.seed, config.max_new_tokens)
    config.out.mkdir(parents=True, exist_ok=True)
    path = Path(config.out) / "long_context.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
