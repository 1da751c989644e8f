"""Causal depthwise conv1d (fla's ShortConvolution) in plain torch, with fla's cache layout.

``causal_conv1d`` stands in for ``fla.modules.causal_conv1d.causal_conv1d`` (whole sequences,
autograd through everything including the initial cache) and ``causal_conv1d_update`` for
``fla.modules.causal_conv1d.causal_conv1d_update`` (one token per sequence, the decode step
``ShortConvolution.step`` takes when autograd is off).

Layouts, as in fla: ``x`` is ``[B, T, D]`` (``[1, total, D]`` with ``cu_seqlens``), ``weight`` is
``[D, W]`` and the cache is ``[N, D, W]``: the last ``W`` *inputs* of each sequence, oldest first,
so ``cache[..., -1]`` is the most recent token. The output at ``t`` is
``sum_w weight[:, w] * x[t - W + 1 + w]`` (+ bias, then the activation, then the residual), with
the inputs before ``t = 0`` read from the cache (zeros without one). Only the last ``W - 1``
cache columns enter a whole-sequence output; the decode step shifts the cache left by one, writes
the new token at the end and uses all ``W`` columns. Compute is float32 (float64 for float64
input); ``y`` and the returned cache have ``x``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")


def _dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def _conv_dense(x, weight, bias, initial_state, activation, W):
    """x [B, T, D] in the compute dtype; returns pre-residual y [B, T, D]."""
    B, T, D = x.shape
    if initial_state is None:
        history = x.new_zeros(B, W - 1, D)
    else:
        history = initial_state[..., 1:].to(x.dtype).transpose(1, 2)  # [B, W-1, D], oldest first
    full = torch.cat([history, x], 1)  # [B, T+W-1, D]
    if weight is None:
        y = sum(full[:, w : w + T] for w in range(W))
    else:
        weight = weight.to(x.dtype)
        y = sum(full[:, w : w + T] * weight[:, w] for w in range(W))
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation is not None:
        y = F.silu(y)
    return y


def _final_state(x, initial_state, W):
    """Last W inputs of [initial_state | x] per sequence: [B, D, W]."""
    B, T, D = x.shape
    past = x.new_zeros(B, D, W) if initial_state is None else initial_state.to(x.dtype)
    return torch.cat([past, x.transpose(1, 2)], 2)[..., -W:]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool | None = False,
    activation: str | None = None,
    backend: str | None = "triton",
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Whole-sequence causal depthwise conv; returns ``(y, final_state or None)``.

    ``backend`` is accepted and ignored (there is one CPU implementation). ``weight=None`` sums
    the window, as fla's kernel does. ``x`` may be ``[B, T, H, d]`` with ``H * d == D``.
    """
    if cp_context is not None:
        raise NotImplementedError("context parallelism has no CPU reference")
    _check_activation(activation)
    if weight is None and initial_state is None:
        raise ValueError("without weight the kernel width comes from the cache; pass one of them")
    W = weight.shape[1] if weight is not None else initial_state.shape[-1]
    shape = x.shape
    if weight is not None and x.shape[-1] != weight.shape[0]:
        x = x.reshape(*x.shape[:2], -1)
    dtype = _dtype(x)
    xc = x.to(dtype)

    if cu_seqlens is None:
        y = _conv_dense(xc, weight, bias, initial_state, activation, W)
        final = _final_state(xc, initial_state, W) if output_final_state else None
    else:
        if x.shape[0] != 1:
            raise ValueError("the batch size must be 1 when cu_seqlens is given")
        bounds = [int(b) for b in torch.as_tensor(cu_seqlens).tolist()]
        ys, finals = [], []
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = xc[:, bos:eos]
            h0 = initial_state[i : i + 1] if initial_state is not None else None
            ys.append(_conv_dense(seg, weight, bias, h0, activation, W))
            if output_final_state:
                finals.append(_final_state(seg, h0, W))
        y = torch.cat(ys, 1)
        final = torch.cat(finals, 0) if output_final_state else None

    if residual is not None:
        y = y + residual.reshape(y.shape).to(dtype)
    y = y.to(x.dtype).reshape(shape)
    return y, (final.to(x.dtype) if final is not None else None)


def causal_conv1d_update(
    x: torch.Tensor,
    cache: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step per sequence; ``x`` is ``[N, D]``, ``[1, N, D]`` or ``[N, 1, D]``.

    Updates ``cache`` ``[N, D, W]`` **in place** (as fla's kernel does) and returns ``(y, cache)``.
    """
    _check_activation(activation)
    shape = x.shape
    if weight is not None and x.shape[-1] != weight.shape[0]:
        x = x.reshape(*x.shape[:2], -1)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # [N, D]
    dtype = _dtype(x)
    window = torch.cat([cache[..., 1:].to(dtype), x2.to(dtype).unsqueeze(-1)], -1)  # [N, D, W]
    y = (window * weight.to(dtype)).sum(-1) if weight is not None else window.sum(-1)
    if bias is not None:
        y = y + bias.to(dtype)
    if activation is not None:
        y = F.silu(y)
    if residual is not None:
        y = y + residual.reshape(y.shape).to(dtype)
    with torch.no_grad():
        cache.copy_(window)
    return y.to(x.dtype).reshape(shape), cache
