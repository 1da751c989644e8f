"""fla's one-token decode step on our kernel: ``fused_recurrent_*`` calls with T == 1 on a GPU go to
:func:`harness.kernels.delta_decode.delta_rule_step`, everything else to fla.

fla 0.6's DeltaNet and Gated DeltaNet layers decode through ``fused_recurrent_delta_rule`` /
``fused_recurrent_gated_delta_rule``; our step streams the state once and is 1.10x-1.49x faster
(op level, docs/benchmarks.md). :mod:`harness.kernels.fla_cpu` (where every patch of fla lives) hands each
non-CPU call of those two ops to :func:`delta_rule_decode` / :func:`gated_delta_rule_decode`
here, which take fla's arguments unchanged, keep the calls :func:`refusal` accepts and pass every
other call to fla's original function untouched.

A call takes our kernel when (:func:`refusal` returns None):

* ``HARNESS_FLA_DECODE`` is ``auto`` (the default) or ``ours``; ``fla`` forces fla's kernel. It is
  read at every call, so a benchmark can time both in one process (:func:`decode_backend`).
  ``auto`` and ``ours`` take the same calls: every kind of call our kernel serves (DeltaNet's,
  and the Gated DeltaNet layer's with its own arguments) passed its GPU parity tests against fla,
  and it spends less GPU time per model decode step than fla's (docs/benchmarks.md);
* every tensor is on one CUDA device, and no input needs a gradient (our step has no backward);
* one token per sequence: ``q`` is ``[B, 1, H, K]`` without ``cu_seqlens``, or ``[1, N, H, K]``
  with ``N + 1`` ``cu_seqlens`` (fla's layers build these at a padded batch's decode step from the
  last mask column, lengths 0 or 1, so N tokens for N sequences means one each; the values are not
  read, as that would sync the device at every layer and token);
* ``output_final_state=True``, and ``initial_state`` is None (zeros) or a contiguous float32
  ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``);
* arguments the kernel implements: beta per head (not per channel), no ``gk`` / ``gv`` or unknown
  keywords; the gated op's ``use_gate_in_kernel`` (``A_log``, ``dt_bias``),
  ``use_beta_sigmoid_in_kernel``, ``allow_neg_eigval``, ``state_v_first`` and value heads grouped
  over fewer key heads are implemented (they are what GatedDeltaNet passes).

It returns what fla returns: ``o`` shaped like ``v`` (``q``'s dtype for the plain op, ``v``'s for
the gated one, as fla) and the final state. The state is updated IN PLACE and returned: the
returned tensor *is* ``initial_state``. That is safe for fla's layers: each one reads the state
from its cache, passes it here and stores the returned tensor back under the same key
(``FLALayer.update`` replaces ``state['recurrent_state']``), and nothing else keeps the old tensor;
fla's own decode step already updates the conv cache in place (``causal_conv1d_update``), so a
cache is not a snapshot under fla either. Beam search reorders caches with ``index_select`` (new
tensors). A caller that must keep the state from before a step clones it first (the state-rank
suite's recorder does).

Numerics differ from fla's only by rounding: fla's plain op l2-normalizes q and k into their dtype
(bf16) before its kernel, ours in float32 inside it; the gated op matches fla's to float32 rounding.
"""

from __future__ import annotations

import os

import torch

from .delta_decode import delta_rule_step

__all__ = [
    "BACKENDS",
    "ENV",
    "decode_backend",
    "decode_rows",
    "delta_rule_decode",
    "gated_delta_rule_decode",
    "refusal",
]

ENV = "HARNESS_FLA_DECODE"
BACKENDS = ("auto", "ours", "fla")
KERNEL_DEVICES = ("cuda",)  # where delta_rule_step runs Triton (CPU tests add "cpu" to run its twin)


def decode_backend() -> str:
    """``auto``, ``ours`` or ``fla``: which kernel runs fla's one-token decode step, from
    ``$HARNESS_FLA_DECODE`` at call time. ``auto`` (the default) is the harness's choice, today ours
    wherever :func:`refusal` allows (as ``ours``: a kind of call that has not passed the GPU parity
    tests would stay on fla under ``auto``); ``fla`` is fla's everywhere. An unknown value is an
    error: a typo must not time the wrong kernel."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(BACKENDS)}")
    return value


def refusal(
    q,
    k,
    v,
    beta=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    *,
    g=None,
    A_log=None,
    dt_bias=None,
    gated=False,
    state_v_first=False,
    use_gate_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    scale=None,
    unsupported=(),
    devices: tuple[str, ...] | None = None,
) -> str | None:
    """Why a ``fused_recurrent_*`` call cannot take our step, or None when it can.

    Reads shapes, dtypes, devices and flags only (never tensor values, which would sync the device).
    ``unsupported`` names the arguments the call sets that we do not implement (``gk``, ...).
    """
    devices = KERNEL_DEVICES if devices is None else devices  # looked up per call: tests widen it
    if unsupported:
        return f"unsupported arguments: {', '.join(unsupported)}"
    tensors = [t for t in (q, k, v, beta, g, initial_state, A_log, dt_bias) if t is not None]
    if q.device.type not in devices or any(t.device != q.device for t in tensors):
        return f"tensors on {sorted({str(t.device) for t in tensors})}; the kernel runs on {'/'.join(devices)}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "an input needs a gradient (fla's op has the backward)"
    if not all(t.is_floating_point() for t in tensors):
        return "non-floating-point inputs"
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not [B, T, H, K] / [B, T, HV, V]"
    if cu_seqlens is None:
        if q.shape[1] != 1:
            return f"{q.shape[1]} tokens per sequence (decode is 1)"
        n = q.shape[0]
    elif q.shape[0] != 1 or cu_seqlens.ndim != 1 or cu_seqlens.numel() != q.shape[1] + 1:
        return "packed sequences that are not one token each"
    else:
        n = q.shape[1]
    heads, hv = q.shape[2], v.shape[2]
    if (hv % heads != 0) if gated else (hv != heads):  # only the gated op groups value heads
        return f"{hv} value heads over {heads} key heads"
    if beta is not None and beta.shape != v.shape[:3]:
        return f"beta {tuple(beta.shape)} is not one value per head {tuple(v.shape[:3])}"
    if gated and g is not None and g.shape != v.shape[:3]:
        return f"g {tuple(g.shape)} is not one value per head {tuple(v.shape[:3])}"
    if gated and use_gate_in_kernel and (g is None or A_log is None):
        return "use_gate_in_kernel without g or A_log (fla raises)"
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        return "allow_neg_eigval without use_beta_sigmoid_in_kernel (fla raises)"
    if not gated and scale is not None and scale <= 0:
        return "scale <= 0 (fla raises)"
    if not output_final_state:
        return "output_final_state=False (fla leaves initial_state untouched; not a cached decode step)"
    if initial_state is not None:
        kk, vv = q.shape[3], v.shape[3]
        shape = (n, hv, vv, kk) if state_v_first else (n, hv, kk, vv)
        if initial_state.shape != shape or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            return f"initial_state {initial_state.dtype} {tuple(initial_state.shape)} is not contiguous float32 {shape}"
        if initial_state.is_inference() and not torch.is_inference_mode_enabled():
            return "initial_state is an inference tensor outside inference mode (cannot be updated in place)"
    return None


def decode_rows(q, k, v, beta, initial_state, g=None, *, state_v_first=False, **options):
    """Run delta_rule_step on fla's [B, 1, ...] or [1, N, ...] tensors (a call `refusal` accepted);
    return (o like v, the state, updated in place: ``initial_state`` unless that is None)."""
    n, hv, kk, vv = q.shape[0] * q.shape[1], v.shape[2], q.shape[3], v.shape[3]
    state = initial_state
    if state is None:
        state = q.new_zeros((n, hv, vv, kk) if state_v_first else (n, hv, kk, vv), dtype=torch.float32)
    if beta is None:  # fla: ones
        beta = q.new_ones(v.shape[:3])
    rows = [x.flatten(0, 1) if x is not None else None for x in (q, k, v, beta, g)]  # one token per sequence
    o = delta_rule_step(*rows[:4], state, rows[4], state_v_first=state_v_first, **options)
    return o.view(v.shape), state


@torch.compiler.disable
def delta_rule_decode(
    original,
    q,
    k,
    v,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
):
    """``fla.ops.delta_rule.fused_recurrent_delta_rule`` (fla's signature after ``original``)."""
    args = dict(
        q=q,
        k=k,
        v=v,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        cu_seqlens=cu_seqlens,
    )
    if (
        decode_backend() == "fla"
        or refusal(q, k, v, beta, initial_state, output_final_state, cu_seqlens, scale=scale) is not None
    ):
        return original(**args)
    o, state = decode_rows(q, k, v, beta, initial_state, scale=scale, l2norm=use_qk_l2norm_in_kernel)
    return o.to(q.dtype), state  # fla's plain op returns o in q's dtype


@torch.compiler.disable
def gated_delta_rule_decode(
    original,
    q,
    k,
    v,
    g=None,
    gk=None,
    gv=None,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`` (fla's signature after ``original``)."""
    args = dict(
        q=q,
        k=k,
        v=v,
        g=g,
        gk=gk,
        gv=gv,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        **kwargs,
    )
    if not use_gate_in_kernel:  # fla ignores them then
        A_log = dt_bias = None
    unsupported = [name for name, value in (("gk", gk), ("gv", gv), *kwargs.items()) if value is not None]
    if (
        decode_backend() == "fla"
        or refusal(
            q,
            k,
            v,
            beta,
            initial_state,
            output_final_state,
            cu_seqlens,
            g=g,
            A_log=A_log,
            dt_bias=dt_bias,
            gated=True,
            state_v_first=state_v_first,
            use_gate_in_kernel=use_gate_in_kernel,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            allow_neg_eigval=allow_neg_eigval,
            unsupported=unsupported,
        )
        is not None
    ):
        return original(**args)
    return decode_rows(
        q,
        k,
        v,
        beta,
        initial_state,
        g,
        state_v_first=state_v_first,
        scale=scale,
        l2norm=use_qk_l2norm_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        beta_sigmoid=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
    )
