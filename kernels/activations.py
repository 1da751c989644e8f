"""SwiGLU, alone and followed by a linear layer (fla's GatedMLP), in plain torch.

``swiglu(x, y) = silu(x) * y``, computed in float32 and returned in ``x``'s dtype like fla's
kernel; ``swiglu_linear(x, y, weight, bias) = F.linear(swiglu(x, y), weight, bias)``. fla's
versions only save memory (they recompute the product in backward); autograd gives the same
gradients here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu", "swiglu_linear"]


def swiglu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.shape != y.shape:
        raise ValueError(f"swiglu: shape mismatch x={tuple(x.shape)} y={tuple(y.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (F.silu(x.to(dtype)) * y.to(dtype)).to(x.dtype)


def swiglu_linear(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(swiglu(x, y), weight, bias)
