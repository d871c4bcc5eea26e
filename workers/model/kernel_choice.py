"""Which kernel path the model runs for each kind of work, chosen by measurement and cached.

Kinds: the few-row projections of every layer (q/k/v, o, gate/up, down), the LM head (the
biggest matmul, vocab x hidden) and attention. `choose_kernels` with mode "auto" times every
path of each kind on this machine (`kernel_timing.py`, a few seconds for SmolLM2) and keeps
the fastest; the result is cached under `$SPECSERVE_CACHE/profiles/`, beside the verify latency
curves, keyed by the CPU model and ISA flags, torch version and threads, device, dtype and the
model's shapes (delete the file to measure again) - unless the machine was busy while it was
measured (`cpu_info.busy_reason`): then it is used by this process only. A mode naming a matmul path
("onednn", "mm", "mm_t", "linear") forces it for the projections and the LM head, with
attention in its default path, and measures nothing.

A `torch.compile`d decode step is not a candidate: compiling the paged forward on a 2-core CPU
takes far longer than the whole measurement (a few seconds), and its shapes change every step.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.kernels.attention import AttentionKernel
from specserve.kernels.linear import MatmulKernel, available_kernels, default_kernel

from specserve.workers.model.cpu_info import CpuInfo, busy_reason, cpu_info
from specserve.workers.model.kernel_timing import Kind, KernelTimes, measure_kernels
from specserve.workers.model.model_config import ModelConfig

log = logging.getLogger("specserve.kernels")

AUTO = "auto"
# Part of the cache key: bumped when the measurement changes, so choices made the old way are
# measured again (2: rounds over every size, no time budget; see kernel_timing.py).
MEASUREMENT_VERSION = 2
KERNEL_MODES = (AUTO, *(k.value for k in MatmulKernel))


@dataclass(frozen=True)
class KernelChoice:
    projections: MatmulKernel  # every layer's q/k/v, o, gate/up and down
    lm_head: MatmulKernel
    attention: AttentionKernel

    @classmethod
    def default(cls, device: torch.device, dtype: torch.dtype) -> "KernelChoice":
        """The paths used without a measurement."""
        kernel = default_kernel(device, dtype)
        return cls(kernel, kernel, AttentionKernel.SDPA)

    @property
    def tag(self) -> str:
        """Short and file-name safe, e.g. "onednn-linear-sdpa" (projections, LM head, attention)."""
        return f"{self.projections.value}-{self.lm_head.value}-{self.attention.value}"

    def describe(self) -> str:
        return f"projections {self.projections.value}, LM head {self.lm_head.value}, attention {self.attention.value}"

    def to_json(self) -> dict:
        return {"projections": self.projections.value, "lm_head": self.lm_head.value, "attention": self.attention.value}

    @classmethod
    def from_json(cls, data: dict) -> "KernelChoice":
        return cls(MatmulKernel(data["projections"]), MatmulKernel(data["lm_head"]), AttentionKernel(data["attention"]))

    @classmethod
    def fastest(cls, times: KernelTimes) -> "KernelChoice":
        return cls(MatmulKernel(times.fastest(Kind.PROJECTIONS)), MatmulKernel(times.fastest(Kind.LM_HEAD)),
                   AttentionKernel(times.fastest(Kind.ATTENTION)))


def check_mode(mode: str) -> None:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")


def forced_choice(mode: str, device: torch.device, dtype: torch.dtype) -> KernelChoice:
    """The choice a mode other than auto names; ValueError when that path cannot run here."""
    check_mode(mode)
    kernel = MatmulKernel(mode)
    if kernel not in available_kernels(device, dtype):
        raise ValueError(f"kernels={mode} cannot run with {dtype} on {device} "
                         f"(available: {', '.join(k.value for k in available_kernels(device, dtype))})")
    return KernelChoice(kernel, kernel, AttentionKernel.SDPA)


def kernel_key(cpu: CpuInfo, device: torch.device, dtype: torch.dtype, threads: int, config: ModelConfig) -> str:
    """File name stem of a cached choice: a hash of everything that changes which path wins."""
    parts = {
        "measurement": MEASUREMENT_VERSION, "cpu": cpu.identity, "torch": torch.__version__, "threads": threads, "device": str(device), "dtype": str(dtype),
        "shapes": [config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
                   config.num_heads, config.num_kv_heads, config.head_dim, config.attention_bias, config.mlp_bias],
    }
    return "kernels-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def load_choice(path: Path) -> KernelChoice | None:
    """None when the file is absent or unreadable (it is then measured again)."""
    try:
        return KernelChoice.from_json(json.loads(path.read_text())["choice"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def choose_kernels(
    config: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    mode: str = AUTO,
    cache_dir: Path | None = None,  # where choices are cached; None: measure every time
    progress: bool = True,
) -> KernelChoice:
    """The paths the model should run (see the module docstring). Off the CPU, auto keeps the
    default paths: the candidates are CPU libraries."""
    device = torch.device(device)
    if mode != AUTO:
        return forced_choice(mode, device, dtype)
    if device.type != "cpu":
        return KernelChoice.default(device, dtype)
    key = kernel_key(cpu_info(), device, dtype, torch.get_num_threads(), config)
    path = None if cache_dir is None else cache_dir / f"{key}.json"
    cached = None if path is None else load_choice(path)
    if cached is not None:
        return cached
    busy = busy_reason()
    times = measure_kernels(config, dtype, progress=progress)
    choice = KernelChoice.fastest(times)
    busy = busy or busy_reason()
    if busy and path is not None:
        log.warning("kernel choice %s measured while the machine is busy (%s): used now, not cached",
                    choice.tag, busy)
    elif path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"choice": choice.to_json(), "cpu": cpu_info().describe(), **times.to_json()}, indent=1))
        tmp.replace(path)  # readers never see half a file
    return choice
