"""Times every kernel path of each kind on this machine, with weights of a model's shapes.

Per kind (`Kind`), every candidate path runs at ROW_COUNTS rows, in ROUNDS rounds that each go
over every row count and every candidate once: a burst of load from a neighbour then slows one
sample of many paths and sizes, not every sample of one, and the best run of each counts (noise
only adds time). The choice is cached for good, so it is never cut short: a measurement cut to
one sample per size on a loaded 2-core box (the old time budget) once chose `mm`, whose 16-node
verify step is 1.6x onednn's there. A path's score is the ROW_WEIGHTS-weighted total of its
times, weighted toward decode (1 row per sequence) and verify (a draft tree of a few to a few
dozen nodes). A path whose first-round time at some row count is over DROP_FACTOR x the fastest
and over DROP_MIN_S is not timed at larger ones (bf16 `mm` on an AVX2 CPU takes seconds at 64
rows) and cannot win; a slow sample of a few milliseconds never drops a path.

The weights are random, of the model's shapes: one layer's projections repeated until
STREAM_BYTES are read per run (as in a decode step, the reads then come from memory, not
cache) and a slice of the LM head of at most STREAM_BYTES. Attention runs ATTENTION_CALLS times
over CONTEXT_KEYS keys, with a causal draft-tree mask for more than one row.
"""

import math
import time
from dataclasses import dataclass
from enum import Enum

import torch
from tqdm import tqdm

from specserve.kernels.attention import AttentionKernel, batched_paged_attention
from specserve.kernels.linear import Projection, available_kernels
from specserve.kernels.paged_layout import build_batch_layout

from specserve.workers.model.model_config import ModelConfig

ROW_COUNTS = (1, 4, 16, 64)
ROW_WEIGHTS = (4.0, 2.0, 2.0, 1.0)  # per ROW_COUNTS entry
STREAM_BYTES = 32 << 20  # weight bytes read per timed matmul run: past the last-level caches seen here
CONTEXT_KEYS = 512  # keys each attention query row sees
ATTENTION_CALLS = 8  # attention calls per timed run (a step makes one per layer)
ROUNDS = 5  # timed runs per path and row count, one per round, after one warm-up
DROP_FACTOR = 4.0  # a path this many times slower than the fastest at a row count is not timed further...
DROP_MIN_S = 0.05  # ...when it also took this long (a real cost, not a scheduling hiccup)


class Kind(Enum):
    PROJECTIONS = "projections"
    LM_HEAD = "lm_head"
    ATTENTION = "attention"


@dataclass(frozen=True)
class PathTimes:
    kind: Kind
    path: str  # a MatmulKernel or AttentionKernel value
    seconds: tuple[float, ...]  # best per ROW_COUNTS entry; inf where dropped

    @property
    def score(self) -> float:
        return sum(w * s for w, s in zip(ROW_WEIGHTS, self.seconds))

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "path": self.path,
                "seconds": [s if math.isfinite(s) else None for s in self.seconds],
                "score": self.score if math.isfinite(self.score) else None}


@dataclass(frozen=True)
class KernelTimes:
    paths: tuple[PathTimes, ...]
    dtype: str
    threads: int
    elapsed_s: float  # the whole measurement, weights made and laid out included

    def fastest(self, kind: Kind) -> str:
        return min((p for p in self.paths if p.kind is kind), key=lambda p: p.score).path

    def to_json(self) -> dict:
        return {"row_counts": list(ROW_COUNTS), "row_weights": list(ROW_WEIGHTS), "dtype": self.dtype,
                "threads": self.threads, "elapsed_s": self.elapsed_s, "paths": [p.to_json() for p in self.paths]}


def _time_candidates(kind: Kind, runs: dict, bar) -> list[PathTimes]:
    """runs: path -> fn(rows) that runs the path once at that row count."""
    best = {path: [math.inf] * len(ROW_COUNTS) for path in runs}
    largest = {path: len(ROW_COUNTS) for path in runs}  # row counts timed: a dropped path stops early
    for i, rows in enumerate(ROW_COUNTS):  # warm-up (first-touch allocations), then the first round
        alive = [p for p in runs if largest[p] > i]
        for path in alive:
            runs[path](rows)
        for path in alive:
            start = time.perf_counter()
            runs[path](rows)
            best[path][i] = time.perf_counter() - start
        fastest = min(best[p][i] for p in alive)
        for path in alive:
            if best[path][i] > max(DROP_FACTOR * fastest, DROP_MIN_S):
                largest[path] = i + 1
    bar.update(1)
    for _ in range(ROUNDS - 1):
        for i, rows in enumerate(ROW_COUNTS):
            for path in runs:
                if largest[path] > i:
                    start = time.perf_counter()
                    runs[path](rows)
                    best[path][i] = min(best[path][i], time.perf_counter() - start)
        bar.update(1)
    return [PathTimes(kind, path, tuple(best[path])) for path in runs]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).mul_(0.02).to(dtype)


def _matmul_runs(weights: list[torch.Tensor], dtype: torch.dtype, gen: torch.Generator) -> dict:
    """path -> fn(rows): x [rows, in] through every weight [out, in], laid out for that path."""
    inputs = {rows: {w.shape[1]: _random((rows, w.shape[1]), dtype, gen) for w in weights} for rows in ROW_COUNTS}
    runs = {}
    for kernel in available_kernels(torch.device("cpu"), dtype):
        projections = [Projection(w, None, kernel) for w in weights]
        runs[kernel.value] = lambda rows, ps=projections: [p(inputs[rows][p.in_features]) for p in ps]
    return runs


def _attention_runs(config: ModelConfig, dtype: torch.dtype, gen: torch.Generator) -> dict:
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    keys = CONTEXT_KEYS + ROW_COUNTS[-1]
    k_cache, v_cache = _random((keys, kv_heads, dim), dtype, gen), _random((keys, kv_heads, dim), dtype, gen)
    layouts, queries = {}, {}
    for rows in ROW_COUNTS:
        tree = torch.ones(rows, rows, dtype=torch.bool).tril() if rows > 1 else None  # a chain of draft nodes
        layouts[rows] = build_batch_layout([torch.arange(CONTEXT_KEYS + rows)], [rows], [tree])
        queries[rows] = _random((rows, heads, dim), dtype, gen)
    scale = dim**-0.5

    def run(kernel: AttentionKernel):
        return lambda rows: [batched_paged_attention(queries[rows], k_cache, v_cache, layouts[rows], scale, kernel)
                             for _ in range(ATTENTION_CALLS)]

    return {kernel.value: run(kernel) for kernel in AttentionKernel}


@torch.inference_mode()
def measure_kernels(config: ModelConfig, dtype: torch.dtype, progress: bool = True) -> KernelTimes:
    """Every path of every kind on this CPU with torch's current thread count."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    hidden, inter = config.hidden_size, config.intermediate_size
    qkv_out = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    layer = [(qkv_out, hidden), (hidden, config.num_heads * config.head_dim), (2 * inter, hidden), (hidden, inter)]
    layer_bytes = sum(o * i for o, i in layer) * dtype.itemsize
    copies = max(1, min(config.num_layers, STREAM_BYTES // layer_bytes))
    vocab_rows = max(1, min(config.vocab_size, STREAM_BYTES // (hidden * dtype.itemsize)))
    paths = []
    with tqdm(total=3 * ROUNDS, desc="choosing kernels", unit="round", disable=not progress, leave=False) as bar:
        projections = [_random(shape, dtype, gen) for _ in range(copies) for shape in layer]
        paths += _time_candidates(Kind.PROJECTIONS, _matmul_runs(projections, dtype, gen), bar)
        del projections
        lm_head = [_random((vocab_rows, hidden), dtype, gen)]
        paths += _time_candidates(Kind.LM_HEAD, _matmul_runs(lm_head, dtype, gen), bar)
        del lm_head
        paths += _time_candidates(Kind.ATTENTION, _attention_runs(config, dtype, gen), bar)
    return KernelTimes(tuple(paths), str(dtype), torch.get_num_threads(), time.perf_counter() - start)
