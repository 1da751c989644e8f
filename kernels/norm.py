"""RMSNorm / LayerNorm with fla's fused-residual semantics, and the gated variants, in plain torch.

Same signatures as the fla functions the module classes call, so ``fla.modules.RMSNorm`` and
``fla.modules.FusedRMSNormGated`` keep their own ``forward`` and only the functional underneath
is swapped (see :mod:`harness.kernels.fla_cpu`):

* ``rms_norm`` / ``layer_norm``   for ``fla.modules.norm.layernorm.rms_norm`` / ``layer_norm``
* ``rms_norm_gated`` / ``layer_norm_gated``  for ``fla.modules.norm.fused_norm_gate.*``

Semantics copied from fla's kernels:

* with ``residual``, the normalised input is ``x + residual`` (summed in float32) and, when
  ``prenorm=True``, that sum is returned as well, in the residual's dtype;
* without ``residual``, ``prenorm=True`` returns ``x`` itself as the new residual, or a float32
  copy when ``residual_in_fp32=True`` and ``x`` is not float32;
* statistics, weight, bias and the gate are applied in float32 and the output has ``x``'s dtype,
  whatever the weight's dtype (DeltaNet keeps a float32 ``o_norm`` weight for bf16 activations);
* the gate multiplies the normalised output: ``swish``/``silu`` -> ``y * g * sigmoid(g)``,
  ``sigmoid`` -> ``y * sigmoid(g)``.
"""

from __future__ import annotations

import torch

__all__ = ["layer_norm", "layer_norm_gated", "rms_norm", "rms_norm_gated"]

GATE_ACTIVATIONS = ("swish", "silu", "sigmoid")


def _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, g=None, activation=None):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.to(dtype)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        s = s + residual.to(dtype)
        residual_out = s.to(residual.dtype)
    elif residual_in_fp32 and x.dtype != torch.float32:
        residual_out = s.to(torch.float32)
    else:
        residual_out = x

    if is_rms_norm:
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    else:
        centred = s - s.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    if g is not None:
        gate = g.to(dtype)
        if activation in ("swish", "silu"):
            y = y * gate * torch.sigmoid(gate)
        elif activation == "sigmoid":
            y = y * torch.sigmoid(gate)
        else:
            raise ValueError(f"gate activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")
    y = y.to(x.dtype)
    return (y, residual_out) if prenorm else y


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
):
    """``y = (x [+ residual]) / rms * weight + bias``; ``(y, new_residual)`` when ``prenorm``."""
    return _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    is_rms_norm: bool = False,
):
    """LayerNorm (or RMSNorm with ``is_rms_norm``) with fla's residual handling."""
    return _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm)


def rms_norm_gated(
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str = "swish",
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    eps: float = 1e-6,
):
    """RMSNorm followed by an output gate: ``rms_norm(x) * act(g)``. Note fla's argument order."""
    return _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True, g, activation)


def layer_norm_gated(
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str = "swish",
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    eps: float = 1e-6,
):
    """LayerNorm followed by an output gate."""
    return _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, False, g, activation)
