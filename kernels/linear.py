"""Projections x @ W^T in one of several matmul paths, chosen per machine by measurement.

Decode runs 1 token per sequence and draft-tree verification a few dozen, so the matmuls that
matter have few rows, and which library is fastest there depends on the CPU:
- on an AMD EPYC (AVX2, 2 cores) MKL's sgemm for a [3072, 576] weight took 347 us at 1 row
  but 1501 us at 4 rows, while oneDNN with the weight prepacked took 342 / 450 / 743 us at
  1 / 4 / 16 rows;
- on an Intel Xeon (AVX-512 + AMX, 2 cores) the same prepacked path left the decode step at
  2.05x the bandwidth floor.
So every path is kept here, and `workers/model/kernel_choice.py` times them on the machine.
A path lays the weight out once, when the `Projection` is built; it cannot be changed after.
"""

from enum import Enum
from functools import cache

import torch
import torch.nn.functional as F

# Row count oneDNN tunes the packed layout for; measured best across 1..64 rows.
PACKING_ROWS_HINT = 16


class MatmulKernel(Enum):
    ONEDNN = "onednn"  # oneDNN, weight prepacked for PACKING_ROWS_HINT rows (AMX in bf16 where the CPU has it)
    MM = "mm"  # torch.mm / addmm (MKL on CPU) on the weight stored [in, out]
    MM_T = "mm_t"  # torch.mm / addmm on the weight stored [out, in], passed transposed
    LINEAR = "linear"  # torch.nn.functional.linear on the weight stored [out, in]


@cache
def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch and CPU can prepack a `dtype` weight for oneDNN (bf16 needs
    avx512bw/vl/dq or avx_ne_convert: an AVX2-only CPU refuses it)."""
    if not (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), PACKING_ROWS_HINT)
    except RuntimeError:
        return False
    return True


def available_kernels(device: torch.device, dtype: torch.dtype) -> list[MatmulKernel]:
    """The paths that run on this device and dtype, in MatmulKernel order."""
    return [k for k in MatmulKernel if k is not MatmulKernel.ONEDNN or onednn_available(device, dtype)]


def default_kernel(device: torch.device, dtype: torch.dtype) -> MatmulKernel:
    """The path used without a measurement: prepacked oneDNN on a CPU that has it, else mm."""
    return MatmulKernel.ONEDNN if onednn_available(device, dtype) else MatmulKernel.MM


class Projection:
    """y [T, out] = x [T, in] @ weight[out, in]^T + bias [out], through `kernel`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: MatmulKernel | None = None):
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.bias = bias
        self.kernel = default_kernel(weight.device, weight.dtype) if kernel is None else kernel
        if self.kernel is MatmulKernel.ONEDNN:
            if not onednn_available(weight.device, weight.dtype):
                raise ValueError(f"kernel onednn is not available for {weight.dtype} on {weight.device}")
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKING_ROWS_HINT)
        elif self.kernel is MatmulKernel.MM:
            self.weight = weight.t().contiguous()  # [in, out]
        else:
            self.weight = weight.contiguous()  # [out, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel, w, b = self.kernel, self.weight, self.bias
        if kernel is MatmulKernel.ONEDNN:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        if kernel is MatmulKernel.LINEAR:
            return F.linear(x, w, b)
        w = w if kernel is MatmulKernel.MM else w.t()  # [in, out]
        return torch.mm(x, w) if b is None else torch.addmm(b, x, w)
