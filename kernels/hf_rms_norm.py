"""transformers' RMSNorm modules in one launch each, for the static decode loop's hybrid step.

transformers writes each RMSNorm as torch ops: a cast to float32, a square, a mean, an add, a
reciprocal square root, products with the weight (and a gate), casts back; about nine kernels per
norm. A decode step of the Qwen3.5-0.8B geometry runs 79 norms (two per layer, a gated one in each
Gated DeltaNet layer, q and k norms in each attention layer), about 700 tiny kernels that took
more GPU time than the state's delta-rule step on an H100 (docs/benchmarks.md). `rms_norm_rows`
does one norm in one Triton launch (one program per row), with the rounding of the module it
replaces; `rms_norm_rows_reference` is its torch twin (and the CPU path).

The modules differ in three ways (`CONVENTIONS`, by class name):

- `offset`: the weight is used as `offset + weight` (Qwen3.5 and Qwen3-Next store weight - 1);
- `cast_first`: the normalized row is cast to the input's dtype before the weight multiplies it,
  and that product is rounded to the input's dtype (Llama, Qwen2, every gated norm); otherwise the
  product is taken in float32 and cast once (Qwen3.5, Qwen3-Next, OLMo-hybrid);
- gated norms (a second input, `gate`) multiply by silu(gate) in float32 afterwards.

Every output has the input's dtype (a module whose weight has another dtype is not taken).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

__all__ = ["CONVENTIONS", "fused_forward", "rms_norm_rows", "rms_norm_rows_reference"]

try:  # triton ships with torch on Linux; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

CONVENTIONS: dict[str, dict] = {
    **{
        name: dict(offset=1.0, cast_first=False) for name in ("Qwen3_5RMSNorm", "Qwen3_5MoeRMSNorm", "Qwen3NextRMSNorm")
    },
    "OlmoHybridRMSNorm": dict(offset=0.0, cast_first=False),
    **{name: dict(offset=0.0, cast_first=True) for name in ("LlamaRMSNorm", "Qwen2RMSNorm")},
    **{
        name: dict(offset=0.0, cast_first=True, gated=True)
        for name in ("Qwen3_5RMSNormGated", "Qwen3_5MoeRMSNormGated", "Qwen3NextRMSNormGated", "OlmoHybridRMSNormGated")
    },
}


def rms_norm_rows_reference(x, weight, eps: float, *, offset: float = 0.0, cast_first: bool = False, gate=None):
    """The torch twin: the modules' own arithmetic, one row per vector of x's last dim."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + offset
    if cast_first:
        h = (w * h.to(x.dtype).float()).to(x.dtype).float()
    else:
        h = h * w
    if gate is not None:
        h = h * torch.nn.functional.silu(gate.float())
    return h.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        X, W, G, Y, D, eps, offset, BLOCK: tl.constexpr, CAST_FIRST: tl.constexpr, GATED: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32) + offset
        dtype = Y.dtype.element_ty
        if CAST_FIRST:
            h = (w * h.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        else:
            h = h * w
        if GATED:
            g = tl.load(G + row * D + cols, mask=m, other=0.0).to(tl.float32)
            h = h * (g * tl.sigmoid(g))
        tl.store(Y + row * D + cols, h.to(dtype), mask=m)


def rms_norm_rows(x, weight, eps: float, *, offset: float = 0.0, cast_first: bool = False, gate=None):
    """RMS-normalize each vector of x's last dim (one Triton launch on CUDA or under
    TRITON_INTERPRET, the torch twin otherwise); returns a new tensor of x's shape and dtype."""
    options = dict(offset=offset, cast_first=cast_first, gate=gate)
    if triton is None or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return rms_norm_rows_reference(x, weight, eps, **options)
    d = x.shape[-1]
    if weight.shape != (d,) or (gate is not None and gate.shape != x.shape):
        raise ValueError(f"weight {tuple(weight.shape)} / gate do not fit rows of {d}")
    gated = gate is not None
    x = x.contiguous()
    gate = gate.contiguous() if gated else x  # a valid pointer, never read without GATED
    y = torch.empty_like(x)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(x.numel() // d,)](
        x,
        weight,
        gate,
        y,
        d,
        eps,
        offset,
        BLOCK=block,
        CAST_FIRST=cast_first,
        GATED=gated,
        num_warps=min(8, max(1, block // 256)),
    )
    return y


def fused_forward(module) -> Callable | None:
    """A forward for `module` (a transformers RMSNorm of `CONVENTIONS`) that runs `rms_norm_rows`,
    or None where it does not apply (another class, or a weight of another dtype than the input's)."""
    convention = CONVENTIONS.get(type(module).__name__)
    if convention is None:
        return None
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps")
    options = dict(offset=convention["offset"], cast_first=convention["cast_first"])
    original = module.forward

    if convention.get("gated"):

        def forward(hidden_states, gate):
            if module.weight.dtype != hidden_states.dtype:
                return original(hidden_states, gate)
            return rms_norm_rows(hidden_states, module.weight, eps, gate=gate, **options)

    else:

        def forward(hidden_states):
            if module.weight.dtype != hidden_states.dtype:
                return original(hidden_states)
            return rms_norm_rows(hidden_states, module.weight, eps, **options)

    return forward
