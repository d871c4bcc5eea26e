"""What CPU this is, as far as kernel speed goes: its model name and the ISA flags that matter.

Kernel choices and latency profiles are cached per `CpuInfo.identity`, because the fastest
matmul path differs between CPUs (AMD EPYC AVX2 and Intel Xeon AVX-512/AMX both seen here).
"""

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags (as /proc/cpuinfo spells them) that change which matmul path is fastest.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str  # e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8488C"
    flags: tuple[str, ...]  # those of ISA_FLAGS the CPU has, in ISA_FLAGS order

    def __post_init__(self):
        unknown = set(self.flags) - set(ISA_FLAGS)
        if unknown:
            raise ValueError(f"flags must be among {ISA_FLAGS}, got {sorted(unknown)}")

    @property
    def identity(self) -> str:
        """Model and flags in one string, e.g. "AMD EPYC+avx2"."""
        return "+".join((self.model, *self.flags))

    def describe(self) -> str:
        """For printing: the model and every ISA flag that matters, with yes/no."""
        marks = ", ".join(f"{f} {'yes' if f in self.flags else 'no'}" for f in ISA_FLAGS)
        return f"{self.model} ({marks})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """Reads the first processor's "model name" and "flags" lines of /proc/cpuinfo."""
    model, flags = "", set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and not model:
            model = value.strip()
        elif name == "flags" and not flags:
            flags = set(value.split())
    return CpuInfo(model or platform.processor() or "unknown", tuple(f for f in ISA_FLAGS if f in flags))


def cpu_info() -> CpuInfo:
    """This machine's CPU (from /proc/cpuinfo; elsewhere the platform's name and no flags)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo(platform.processor() or "unknown", ())


# Runnable tasks per core (the 1-minute load average) above which this machine is too busy to
# measure anything worth keeping: a kernel timing or verify latency curve measured while others
# held the cores came out 10-15x too slow and, cached, switched speculation off for good.
BUSY_LOAD_PER_CORE = 1.5


def busy_reason() -> str | None:
    """Why measurements taken now should not be cached (the machine is busy), or None."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
    cores = os.cpu_count() or 1
    if load > BUSY_LOAD_PER_CORE * cores:
        return f"load average {load:.1f} on {cores} cores (> {BUSY_LOAD_PER_CORE} per core)"
    return None
