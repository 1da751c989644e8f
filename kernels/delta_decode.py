"""One-token decode of the (gated) delta rule that streams the recurrent state once.

Decoding one token updates each head's fp32 state S (d_k x d_v) and reads it:
    S <- exp(g) S                       (gated only)
    S <- S + k (beta (v - k^T S))^T     (the delta rule)
    o  = (scale q)^T S
with q, k l2-normalized over d_k and scale = d_k ** -0.5 by default. The work is tiny; the step is
bound by moving S through memory (read once, written once). fla 0.6's
`fused_recurrent_delta_rule` streams it at about 38% of copy bandwidth at batch 64 (docs/methods.md
section 6), so a pruned d_k barely speeds decoding up. `delta_rule_step` is one Triton program per
(sequence, head, block of d_v columns): it loads a d_k x BV tile of S once, does all three steps
in registers and writes the tile back, so the bytes moved are exactly 2 x |S| and the time
falls with d_k. `delta_rule_step_reference` is its torch twin (and the CPU path).

Layouts: q, k (B, H, d_k); v (B, HV, d_v); beta, g (B, HV); state (B, HV, d_k, d_v) float32
((B, HV, d_v, d_k) with `state_v_first`), updated in place; returns o (B, HV, d_v) in v's dtype.
HV = H except with grouped value heads (value head i reads key head i // (HV // H), as in fla).
Options that fla's Gated DeltaNet layer asks its kernel for, with fla's meaning, so that
`harness.kernels.fla_decode` can hand that layer's decode step over unchanged: `A_log` (HV,) and
`dt_bias` (HV,) make g the raw gate, turned into -exp(A_log) softplus(g + dt_bias) per step;
`beta_sigmoid` applies sigmoid to beta (times 2 with `allow_neg_eigval`); `state_v_first` is the
(d_v, d_k) state layout.
"""

from __future__ import annotations

import torch

from . import launch_settings
from .delta_rule import gdn_gate

KERNEL = "delta_decode"

try:  # triton ships with torch on Linux; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_step_reference(
    q,
    k,
    v,
    beta,
    state,
    g=None,
    *,
    scale: float | None = None,
    l2norm: bool = True,
    A_log=None,
    dt_bias=None,
    beta_sigmoid: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
):
    """The torch twin: returns o and updates `state` in place (as the kernel does)."""
    q, k, v, beta = q.float(), k.float(), v.float(), beta.float()
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    group = v.shape[1] // q.shape[1]
    q, k = q.repeat_interleave(group, 1), k.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if beta_sigmoid:
        beta = beta.sigmoid() * (2 if allow_neg_eigval else 1)
    s = state.transpose(-1, -2) if state_v_first else state  # a view: updates land in `state`
    if g is not None:
        g = g.float() if A_log is None else gdn_gate(g, A_log, dt_bias)
        s.mul_(g.exp()[..., None, None])
    remembered = torch.einsum("bhk,bhkv->bhv", k, s)
    delta = beta[..., None] * (v - remembered)
    s.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q * scale, s)


if triton is not None:

    @triton.jit
    def _delta_step_kernel(
        Q,
        K,
        V,
        BETA,
        G,
        A_LOG,
        DT_BIAS,
        S,
        OUT,
        scale,
        eps,
        HV,
        GROUP,
        SQ,
        SK,
        SV,
        SBETA,
        SG,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_G: tl.constexpr,
        L2NORM: tl.constexpr,
        GATE_IN_KERNEL: tl.constexpr,
        HAS_DT_BIAS: tl.constexpr,
        BETA_SIGMOID: tl.constexpr,
        NEG_EIGVAL: tl.constexpr,
        V_FIRST: tl.constexpr,
        EVICT_FIRST: tl.constexpr,
    ):
        bh = tl.program_id(0)  # (sequence, value head)
        iv = tl.program_id(1)
        # q, k, v, beta and g are rows of a sequence's values (heads contiguous within a row), a
        # row starting S* elements after the last: slices of a wider projection need no copy
        seq = (bh // HV).to(tl.int64)
        hv = bh % HV
        head = hv // GROUP  # value head hv reads key head hv // GROUP, as HV = H * GROUP
        offs_k = tl.arange(0, BK)
        offs_v = iv * BV + tl.arange(0, BV)
        mk = offs_k < DK
        mv = offs_v < DV
        q = tl.load(Q + seq * SQ + head * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(K + seq * SK + head * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
        if L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + eps)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + eps)
        v = tl.load(V + seq * SV + hv * DV + offs_v, mask=mv, other=0.0).to(tl.float32)
        beta = tl.load(BETA + seq * SBETA + hv).to(tl.float32)
        if BETA_SIGMOID:
            beta = tl.sigmoid(beta)
            if NEG_EIGVAL:
                beta = beta * 2.0
        if V_FIRST:  # the same (BK, BV) tile, read from a (d_v, d_k) matrix
            tile = S + bh * DK * DV + offs_v[None, :] * DK + offs_k[:, None]
        else:
            tile = S + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        mask = mk[:, None] & mv[None, :]
        if EVICT_FIRST:  # the state is streamed once a step: keep it from displacing the rest of L2
            s = tl.load(tile, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            s = tl.load(tile, mask=mask, other=0.0)
        if HAS_G:
            g = tl.load(G + seq * SG + hv).to(tl.float32)
            if GATE_IN_KERNEL:  # fla: -exp(A_log) * softplus(g + dt_bias), softplus linear above 20
                if HAS_DT_BIAS:
                    g = g + tl.load(DT_BIAS + hv).to(tl.float32)
                softplus = tl.where(g > 20.0, g, tl.log(1.0 + tl.exp(tl.minimum(g, 20.0))))
                g = -tl.exp(tl.load(A_LOG + hv).to(tl.float32)) * softplus
            s = s * tl.exp(g)
        remembered = tl.sum(k[:, None] * s, axis=0)
        delta = beta * (v - remembered)
        s = s + k[:, None] * delta[None, :]
        o = tl.sum((q * scale)[:, None] * s, axis=0)
        if EVICT_FIRST:
            tl.store(tile, s, mask=mask, eviction_policy="evict_first")
        else:
            tl.store(tile, s, mask=mask)
        tl.store(OUT + bh * DV + offs_v, o.to(OUT.dtype.element_ty), mask=mv)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` (B, ...) as the kernel reads it: each sequence's values contiguous, sequences at any
    stride (a column slice of a wider projection's output is read in place); otherwise a copy."""
    if x.is_contiguous() or x[0].is_contiguous():
        return x
    return x.contiguous()


def launch(device, d_k: int) -> dict[str, int]:
    """The step's launch settings on `device` for key dim `d_k`."""
    from .pruned_decode import device_name

    return launch_settings.settings(KERNEL, device_name(device), launch_settings.key_dim_class(d_k))


def delta_rule_step(
    q,
    k,
    v,
    beta,
    state,
    g=None,
    *,
    scale: float | None = None,
    l2norm: bool = True,
    A_log=None,
    dt_bias=None,
    beta_sigmoid: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    block_v: int | None = None,
    num_warps: int | None = None,
):
    """One decode step for every (sequence, head): Triton on CUDA (or under TRITON_INTERPRET),
    the torch twin otherwise. Returns o in v's dtype; `state` is updated in place. No autotuning:
    the kernel writes the state in place, so benchmarking configs would run it several times;
    `block_v` and `num_warps` default to this GPU's tuned settings (`launch_settings`, by d_k), as
    does whether the state's loads and stores are marked evict-first in L2."""
    import os

    options = dict(
        scale=scale,
        l2norm=l2norm,
        A_log=A_log,
        dt_bias=dt_bias,
        beta_sigmoid=beta_sigmoid,
        allow_neg_eigval=allow_neg_eigval,
        state_v_first=state_v_first,
    )
    if triton is None or not (state.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return delta_rule_step_reference(q, k, v, beta, state, g, **options).to(v.dtype)
    b, h, dk = k.shape
    hv, dv = v.shape[1:]
    shape = (b, hv, dv, dk) if state_v_first else (b, hv, dk, dv)
    if state.dtype != torch.float32 or not state.is_contiguous() or state.shape != shape:
        raise ValueError(f"state must be a contiguous float32 tensor of shape {shape}")
    if hv % h:
        raise ValueError(f"{hv} value heads cannot share {h} key heads")
    if A_log is not None and g is None:
        raise ValueError("A_log (the gate computed in the kernel) needs the raw gate g")
    has_g, gate_in_kernel, has_dt_bias = g is not None, A_log is not None, dt_bias is not None
    q, k, v, beta = (_rows(x) for x in (q, k, v, beta))
    # beta stands in (a valid pointer, never read) for the optional tensors a constexpr switch leaves out
    g = _rows(g) if g is not None else beta
    A_log, dt_bias = (x.contiguous() if x is not None else beta for x in (A_log, dt_bias))
    out = torch.empty(b, hv, dv, dtype=v.dtype, device=v.device)
    tuned = launch(state.device, dk)
    # a d_k x BV fp32 tile in registers
    bv = block_v or tuned["BLOCK_V"] or min(triton.next_power_of_2(dv), 32 if dk > 64 else 64)
    num_warps = num_warps or tuned["NUM_WARPS"]
    _delta_step_kernel[(b * hv, triton.cdiv(dv, bv))](
        q,
        k,
        v,
        beta,
        g,
        A_log,
        dt_bias,
        state,
        out,
        dk**-0.5 if scale is None else scale,
        1e-6,
        hv,
        hv // h,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        beta.stride(0),
        g.stride(0),
        DK=dk,
        DV=dv,
        BK=triton.next_power_of_2(dk),
        BV=bv,
        HAS_G=has_g,
        L2NORM=l2norm,
        GATE_IN_KERNEL=gate_in_kernel,
        HAS_DT_BIAS=has_dt_bias,
        BETA_SIGMOID=beta_sigmoid,
        NEG_EIGVAL=allow_neg_eigval,
        V_FIRST=state_v_first,
        EVICT_FIRST=bool(tuned["EVICT_FIRST"]),
        num_warps=num_warps,
    )
    return out
