"""Memory bandwidth and the decode-step floor it sets.

A decode step of one sequence reads every weight once, and at batch 1 does too little math per
byte to hide it, so no step can be faster than `weight bytes / bandwidth`: the floor. The
bandwidth is measured here with large copies under the current torch thread count.
"""

import time
from dataclasses import dataclass

import torch

DEFAULT_BUFFER_BYTES = 512 << 20  # far past any last-level cache


@dataclass(frozen=True)
class Bandwidth:
    copy_bytes_per_s: float  # dst.copy_(src): bytes read + bytes written, best of repeats
    read_bytes_per_s: float  # src.sum(): bytes read, best of repeats
    buffer_bytes: int
    repeats: int
    threads: int

    def to_json(self) -> dict:
        return {
            "copy_GB_per_s": self.copy_bytes_per_s / 1e9,
            "read_GB_per_s": self.read_bytes_per_s / 1e9,
            "buffer_bytes": self.buffer_bytes,
            "repeats": self.repeats,
            "threads": self.threads,
        }


@dataclass(frozen=True)
class DecodeFloor:
    weight_bytes: int  # bytes of weights one decode step reads
    bytes_per_s: float  # the bandwidth the floor assumes
    floor_s: float  # weight_bytes / bytes_per_s

    def to_json(self) -> dict:
        return {"weight_bytes": self.weight_bytes, "GB_per_s": self.bytes_per_s / 1e9, "floor_s": self.floor_s}


def time_step(fn, repeats: int) -> float:
    """Best of `repeats` timed calls of fn after one untimed call (first touch, warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(buffer_bytes: int = DEFAULT_BUFFER_BYTES, repeats: int = 5, device: str = "cpu") -> Bandwidth:
    """Copy and read bandwidth of `device` memory with buffers of buffer_bytes (best of repeats)."""
    if buffer_bytes < 4 or repeats < 1:
        raise ValueError(f"need buffer_bytes >= 4 and repeats >= 1, got {buffer_bytes}, {repeats}")
    numel = buffer_bytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)

    def copy():
        dst.copy_(src)
        sync()

    def read():
        src.sum()
        sync()

    nbytes = numel * 4
    copy_s, read_s = time_step(copy, repeats), time_step(read, repeats)
    return Bandwidth(2 * nbytes / copy_s, nbytes / read_s, nbytes, repeats, torch.get_num_threads())


def decode_floor(weight_bytes: int, bytes_per_s: float) -> DecodeFloor:
    """The fastest a batch-1 decode step can be when it streams weight_bytes at bytes_per_s."""
    if weight_bytes < 1 or bytes_per_s <= 0:
        raise ValueError(f"need weight_bytes >= 1 and bytes_per_s > 0, got {weight_bytes}, {bytes_per_s}")
    return DecodeFloor(weight_bytes, bytes_per_s, weight_bytes / bytes_per_s)
