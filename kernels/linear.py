"""Projections x @ W^T, laid out once for the device's fastest few-token matmul.

Decode runs 1 token per sequence and draft-tree verification a few dozen, so the matmuls
that matter have few rows. On the 2-core CPU we measured (AMD EPYC, AVX2) MKL's sgemm
for a [3072, 576] weight took 347 us at 1 row but 1501 us at 4 rows and 1687 us at 16,
while oneDNN with the weight prepacked took 342 / 450 / 743 us: prepacking is what lets
a tree of 16 tokens cost about twice one token instead of five times. Elsewhere (GPU, or
a torch without oneDNN) the weight is kept as [in, out] for a plain `x @ w`.
"""

import torch

# Row count oneDNN tunes the packed layout for; measured best across 1..64 rows.
PACKING_ROWS_HINT = 16


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class Projection:
    """y [T, out] = x [T, in] @ weight[out, in]^T + bias [out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.bias = bias
        self.packed = onednn_available(weight.device, weight.dtype)
        if self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKING_ROWS_HINT)
        else:
            self.weight = weight.t().contiguous()  # [in, out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)
