"""One-token decode of the (gated) delta rule that streams the recurrent state once.

Decoding one token updates each head's fp32 state S (d_k x d_v) and reads it:
    S <- exp(g) S                       (gated only)
    S <- S + k (beta (v - k^T S))^T     (the delta rule)
    o  = (scale q)^T S
with q, k l2-normalized over d_k and scale = d_k ** -0.5 by default. The work is tiny; the step is
bound by moving S through memory (read once, written once). fla 0.6's
`fused_recurrent_delta_rule` streams it at about 38% of copy bandwidth at batch 64 (METHODS.md
section 6), so a pruned d_k barely speeds decoding up. `delta_rule_step` is one Triton program per
(sequence, head, block of d_v columns): it loads a d_k x BV tile of S once, does all three steps
in registers and writes the tile back, so the bytes moved are exactly 2 x |S| and the time
falls with d_k. `delta_rule_step_reference` is its torch twin (and the CPU path).

Layouts: q, k (B, H, d_k); v (B, H, d_v); beta, g (B, H); state (B, H, d_k, d_v) float32,
updated in place; returns o (B, H, d_v) in v's dtype.
"""

from __future__ import annotations

import torch

try:  # triton ships with torch on Linux; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_step_reference(q, k, v, beta, state, g=None, *, scale: float | None = None, l2norm: bool = True):
    """The torch twin: returns o and updates `state` in place (as the kernel does)."""
    q, k, v = q.float(), k.float(), v.float()
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = state
    if g is not None:
        s.mul_(g.float().exp()[..., None, None])
    remembered = torch.einsum("bhk,bhkv->bhv", k, s)
    delta = beta.float()[..., None] * (v - remembered)
    s.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q * scale, s)


if triton is not None:
    @triton.jit
    def _delta_step_kernel(Q, K, V, BETA, G, S, O, scale, eps,
                           DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           HAS_G: tl.constexpr, L2NORM: tl.constexpr):
        bh = tl.program_id(0)
        iv = tl.program_id(1)
        offs_k = tl.arange(0, BK)
        offs_v = iv * BV + tl.arange(0, BV)
        mk = offs_k < DK
        mv = offs_v < DV
        q = tl.load(Q + bh * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(K + bh * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
        if L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + eps)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + eps)
        v = tl.load(V + bh * DV + offs_v, mask=mv, other=0.0).to(tl.float32)
        beta = tl.load(BETA + bh).to(tl.float32)
        tile = S + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        mask = mk[:, None] & mv[None, :]
        s = tl.load(tile, mask=mask, other=0.0)
        if HAS_G:
            s = s * tl.exp(tl.load(G + bh).to(tl.float32))
        remembered = tl.sum(k[:, None] * s, axis=0)
        delta = beta * (v - remembered)
        s = s + k[:, None] * delta[None, :]
        o = tl.sum((q * scale)[:, None] * s, axis=0)
        tl.store(tile, s, mask=mask)
        tl.store(O + bh * DV + offs_v, o.to(O.dtype.element_ty), mask=mv)


def delta_rule_step(q, k, v, beta, state, g=None, *, scale: float | None = None, l2norm: bool = True,
                    block_v: int | None = None, num_warps: int = 4):
    """One decode step for every (sequence, head): Triton on CUDA (or under TRITON_INTERPRET),
    the torch twin otherwise. Returns o in v's dtype; `state` is updated in place. No autotuning:
    the kernel writes the state in place, so benchmarking configs would run it several times."""
    import os

    if triton is None or not (state.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return delta_rule_step_reference(q, k, v, beta, state, g, scale=scale, l2norm=l2norm).to(v.dtype)
    b, h, dk = k.shape
    dv = v.shape[-1]
    if state.dtype != torch.float32 or not state.is_contiguous() or state.shape != (b, h, dk, dv):
        raise ValueError(f"state must be a contiguous float32 tensor of shape {(b, h, dk, dv)}")
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    out = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    gate = g.contiguous() if g is not None else beta  # unused when HAS_G is False
    bv = block_v or min(triton.next_power_of_2(dv), 32 if dk > 64 else 64)  # a d_k x BV fp32 tile in registers
    _delta_step_kernel[(b * h, triton.cdiv(dv, bv))](
        q, k, v, beta, gate, state, out, dk ** -0.5 if scale is None else scale, 1e-6,
        DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=bv, HAS_G=g is not None, L2NORM=l2norm, num_warps=num_warps)
    return out
