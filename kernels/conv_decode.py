"""The one-token causal conv step of decoding, in one Triton launch with a fixed block size.

DeltaNet and Gated DeltaNet layers run a short depthwise conv (width W, usually 4) over q, k and v
before the delta rule; at a decode step each sequence's conv cache ``[N, D, W]`` shifts left by
one, takes the new token at the end, and the output is ``sum_w weight[:, w] * cache[:, :, w]``
(+ bias, then silu, then an optional residual). fla 0.6's ``causal_conv1d_update`` does this in
one kernel too, but autotunes its block size on the first call of each channel count: on an H100
the pruned DeltaNet's 1,024-channel q/k convs came out 2.3x slower per step than the dense
model's 2,048-channel ones (0.35 vs 0.15 ms per model step, docs/benchmarks.md), and a fresh
machine may pick differently each time. `conv_step` uses one block of `BLOCK_D` channels per
program, the same for every width and machine, so the pruned model's convs move half the bytes
in half the programs; `conv_step_reference` (:func:`harness.kernels.conv.causal_conv1d_update`)
is its torch twin and the CPU path.

:func:`causal_conv1d_update_decode` takes fla's ``causal_conv1d_update`` arguments (after fla's
original, to fall back to) and runs `conv_step` for every call :func:`refusal` accepts;
:mod:`harness.kernels.fla_cpu` routes fla's CUDA calls there, and
:mod:`harness.kernels.hf_gdn_decode` uses `conv_step` for transformers' hybrids.
``HARNESS_FLA_DECODE=fla`` keeps fla's kernel (the same switch as the delta-rule step).

Numerics: float32 compute, the output rounded once to x's dtype and the cache stored in its own
dtype, as fla's kernel and the twin do.
"""

from __future__ import annotations

import os

import torch

from .conv import causal_conv1d_update as conv_step_reference
from . import fla_decode

__all__ = ["BLOCK_D", "causal_conv1d_update_decode", "conv_step", "conv_step_reference", "refusal"]

BLOCK_D = 256  # channels per program: 256 x W values of the cache, 4 warps
ACTIVATIONS = (None, "silu", "swish")

try:  # triton ships with torch on Linux; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _conv_step_kernel(
        X,
        CACHE,
        WEIGHT,
        BIAS,
        RESIDUAL,
        Y,
        stride_xn,
        stride_xd,
        D,
        W: tl.constexpr,
        BW: tl.constexpr,
        BD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        SILU: tl.constexpr,
    ):
        n = tl.program_id(1).to(tl.int64)
        d = tl.program_id(0) * BD + tl.arange(0, BD)
        w = tl.arange(0, BW)
        md = d < D
        x = tl.load(X + n * stride_xn + d * stride_xd, mask=md, other=0.0).to(tl.float32)
        # the window after the shift: cache columns 1..W-1, then the new token
        row = CACHE + n * D * W + d[:, None] * W
        shifted = tl.load(row + (w + 1)[None, :], mask=md[:, None] & (w + 1 < W)[None, :], other=0.0)
        window = tl.where((w == W - 1)[None, :], x[:, None], shifted.to(tl.float32))
        weight = tl.load(WEIGHT + d[:, None] * W + w[None, :], mask=md[:, None] & (w < W)[None, :], other=0.0)
        y = tl.sum(window * weight.to(tl.float32), axis=1)
        if HAS_BIAS:
            y += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)
        if SILU:
            y = y * tl.sigmoid(y)
        if HAS_RESIDUAL:
            y += tl.load(RESIDUAL + n * D + d, mask=md, other=0.0).to(tl.float32)
        tl.store(Y + n * D + d, y.to(Y.dtype.element_ty), mask=md)
        tl.store(row + w[None, :], window.to(CACHE.dtype.element_ty), mask=md[:, None] & (w < W)[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def conv_step(x, cache, weight, bias=None, activation=None, residual=None):
    """One decode step for N rows: ``x`` [N, D] (any strides), ``cache`` [N, D, W] contiguous,
    updated in place, ``weight`` [D, W]; returns y [N, D] in x's dtype (a new contiguous tensor).
    One Triton launch on CUDA (or under TRITON_INTERPRET), the torch twin elsewhere."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    n, d = x.shape
    width = weight.shape[-1]
    if cache.shape != (n, d, width) or not cache.is_contiguous() or weight.shape != (d, width):
        raise ValueError(
            f"cache {tuple(cache.shape)} (contiguous: {cache.is_contiguous()}) and weight "
            f"{tuple(weight.shape)} do not fit x {tuple(x.shape)} with width {width}"
        )
    if triton is None or not (x.is_cuda or _interpreted()):
        y, _ = conv_step_reference(x, cache, residual=residual, weight=weight, bias=bias, activation=activation)
        return y
    weight = weight.contiguous()
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    residual = residual.reshape(n, d).contiguous() if residual is not None else None
    _conv_step_kernel[(triton.cdiv(d, BLOCK_D), n)](
        x,
        cache,
        weight,
        bias if bias is not None else weight,  # a valid pointer, never read without HAS_BIAS
        residual if residual is not None else y,
        y,
        x.stride(0),
        x.stride(1),
        d,
        W=width,
        BW=triton.next_power_of_2(width),
        BD=BLOCK_D,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        SILU=activation is not None,
        num_warps=4,
    )
    return y


def _rows(x: torch.Tensor, d: int) -> torch.Tensor | None:
    """fla's one-token layouts [N, D], [1, N, D], [N, 1, D] (or [B, 1, H, d]) as [N, D] (a view), else None."""
    if x.ndim == 2:
        return x
    if x.ndim >= 3 and (x.shape[0] == 1 or x.shape[1] == 1) and x.shape[2:].numel() == d:
        try:
            return x.view(-1, d)
        except RuntimeError:  # strides that do not flatten: let fla handle it
            return None
    return None


def refusal(x, cache, residual=None, weight=None, bias=None, activation=None) -> str | None:
    """Why a ``causal_conv1d_update`` call cannot take `conv_step`, or None when it can (reads shapes,
    devices and flags only, never values)."""
    if weight is None:
        return "no weight (fla sums the window; not a layer's call)"
    if cache is None:
        return "no cache"
    if activation not in ACTIVATIONS:
        return f"activation {activation!r}"
    tensors = [t for t in (x, cache, residual, weight, bias) if t is not None]
    devices = fla_decode.KERNEL_DEVICES  # looked up per call: tests widen it to run the twin on CPU
    if x.device.type not in devices or any(t.device != x.device for t in tensors):
        return f"tensors on {sorted({str(t.device) for t in tensors})}; the kernel runs on {'/'.join(devices)}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "an input needs a gradient (fla's op has the backward)"
    d, width = weight.shape[0], weight.shape[-1]
    rows = _rows(x, d)
    if rows is None:
        return f"x {tuple(x.shape)} is not one token per sequence over {d} channels"
    if cache.shape != (rows.shape[0], d, width) or not cache.is_contiguous():
        return f"cache {tuple(cache.shape)} is not a contiguous {(rows.shape[0], d, width)}"
    if residual is not None and residual.numel() != rows.numel():
        return f"residual {tuple(residual.shape)} does not fit {tuple(rows.shape)}"
    if cache.is_inference() and not torch.is_inference_mode_enabled():
        return "the cache is an inference tensor outside inference mode (cannot be updated in place)"
    return None


@torch.compiler.disable
def causal_conv1d_update_decode(original, x, cache, residual=None, weight=None, bias=None, activation=None):
    """``fla.modules.causal_conv1d.causal_conv1d_update`` (fla's signature after ``original``): returns
    ``(y shaped like x, cache)``, the cache updated in place, as fla's."""
    args = dict(x=x, cache=cache, residual=residual, weight=weight, bias=bias, activation=activation)
    if fla_decode.decode_backend() == "fla" or refusal(**args) is not None:
        return original(**args)
    weight = weight.reshape(weight.shape[0], -1)
    y = conv_step(_rows(x, weight.shape[0]), cache, weight, bias, activation, residual)
    return y.view(x.shape), cache
