"""Plain-torch Kimi Delta Attention (KDA): references for fla's ``chunk_kda`` and
``fused_recurrent_kda``, with the same arguments in the same order, so
:mod:`harness.kernels.fla_cpu` can forward a call unchanged.

KDA is the gated delta rule with a decay per *key channel* (fla: ``g`` of ``[B, T, HV, K]``,
against Gated DeltaNet's one decay per head). Per value head, with the state ``S`` ``[K, V]``::

    S_t = diag(exp(g_t)) S_{t-1}                  # g_t: one log decay per key channel
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T
    o_t = S_t^T (scale * q_t)

Options, as fla 0.6 applies them (in this order):

* ``use_qk_l2norm_in_kernel``: ``q, k <- x / sqrt(sum(x^2) + 1e-6)`` over the key dim;
* ``use_gate_in_kernel``: ``g`` is the raw gate input. Without ``lower_bound`` the decay is
  ``-exp(A_log[h]) * softplus(g + dt_bias[h, c])``; with ``lower_bound`` (with or without
  ``safe_gate``) it is ``lower_bound * sigmoid(exp(A_log[h]) * (g + dt_bias[h, c]))``, in
  ``(lower_bound, 0)``; ``A_log`` may then be ``None`` (factor 1). ``A_log`` is ``[HV]``,
  ``dt_bias`` ``[HV * K]``. ``safe_gate`` only selects a faster fla kernel: it requires
  ``lower_bound`` in ``[-5, 0)`` and changes nothing here;
* ``use_beta_sigmoid_in_kernel``: ``beta <- sigmoid(beta)`` (``2 * sigmoid`` with ``allow_neg_eigval``);
* ``scale`` defaults to ``K ** -0.5`` with ``K`` the key head dim of the tensors given (a sliced
  layer runs at its own, larger scale);
* grouped values: value head ``i`` reads key head ``i // (HV // H)``; states are ``[N, HV, K, V]``
  (``[N, HV, V, K]`` with ``state_v_first``), final states float32.

The chunked form uses the same WY / UT representation as :mod:`harness.kernels.delta_rule`, with
the decay inside a chunk now a per-channel cumulative ``G`` ``[C, K]``: every intra-chunk
product is taken channel-wise, ``A_ij = sum_c a_ic b_jc exp(G_ic - G_jc)`` for ``j <= i``, from
the exact pairwise exponent (never ``exp(G_i) * exp(-G_j)``, which overflows for strong decays).
That pairwise tensor is ``C x C x K`` per chunk, so the reference works on chunks of
``REFERENCE_CHUNK`` tokens whatever ``chunk_size`` fla was asked for: the recurrence is the same
at any chunk size, only rounding differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .delta_rule import _beta_in_kernel, _check_unknown, _check_varlen, _compute_dtype, _unpack, prepared

__all__ = ["REFERENCE_CHUNK", "chunk_kda", "fused_recurrent_kda", "kda_gate"]

REFERENCE_CHUNK = 8


def kda_gate(
    g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None = None, lower_bound: float | None = None
) -> torch.Tensor:
    """fla's in-kernel KDA decay from the raw gate ``g`` ``[..., HV, K]`` (log space, <= 0)."""
    HV, K = g.shape[-2:]
    dtype = _compute_dtype(g, A_log, dt_bias)
    x = g.to(dtype)
    if dt_bias is not None:
        x = x + dt_bias.to(dtype).reshape(HV, K)
    if lower_bound is None:
        if A_log is None:
            raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True` and `lower_bound` is not set.")
        return -A_log.to(dtype).exp().reshape(HV, 1) * F.softplus(x)
    if A_log is not None:
        x = A_log.to(dtype).exp().reshape(HV, 1) * x
    return lower_bound * torch.sigmoid(x)


# --------------------------------------------------------------------------------------------
# cores: [B, H, T, D] layout, compute dtype, q already scaled, beta / g already activated


def _recurrent_core(q, k, v, beta, g, state):
    """Token loop. q, k, g [B,H,T,K]; v [B,H,T,V]; beta [B,H,T]; state [B,H,K,V]."""
    outputs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None]
        k_t = k[:, :, t].unsqueeze(-2)  # [B,H,1,K]
        delta = beta[:, :, t, None] * (v[:, :, t] - (k_t @ state).squeeze(-2))
        state = state + k_t.transpose(-1, -2) * delta.unsqueeze(-2)
        outputs.append((q[:, :, t].unsqueeze(-2) @ state).squeeze(-2))
    o = torch.stack(outputs, 2) if outputs else v.new_zeros(v.shape)
    return o, state


def _chunk_core(q, k, v, beta, g, state, chunk_size: int = REFERENCE_CHUNK):
    """WY / UT chunked form with a per-channel decay (see the module docstring)."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:  # zero tokens with beta = 0 and log decay 0 leave the state untouched
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = F.pad(beta, (0, pad))
    N = (T + pad) // C
    q, k, v, g = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v, g))
    beta = beta.reshape(B, H, N, C)

    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    causal, strict = ones.tril(), ones.tril(-1)
    G = g.cumsum(-2)  # [B,H,N,C,K]
    D = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], float("-inf")).exp()
    Dk = D * k[..., None, :, :]  # D_ijc k_jc: [B,H,N,C,C,K]
    kb = k * beta[..., None]
    L = (kb[..., :, None, :] * Dk).sum(-1).masked_fill(~strict, 0)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb * G.exp()], -1)
    U, W = torch.linalg.solve_triangular(L + eye, rhs, upper=False, unitriangular=True).split([V, K], -1)
    P = (q[..., :, None, :] * Dk).sum(-1)  # causal already: D is 0 above
    q_in = q * G.exp()
    k_out = (k * (G[..., -1:, :] - G).exp()).transpose(-1, -2)  # [B,H,N,K,C]
    decay_chunk = G[..., -1, :].exp()[..., None]  # [B,H,N,K,1]

    outputs = []
    # unbind, not indexing: the backward of one unbind is one stack, of N selects N full-size zeros
    for U_n, W_n, P_n, q_n, k_n, d_n in zip(*(x.unbind(2) for x in (U, W, P, q_in, k_out, decay_chunk))):
        delta = U_n - W_n @ state
        outputs.append(q_n @ state + P_n @ delta)
        state = d_n * state + k_n @ delta
    o = torch.stack(outputs, 2).reshape(B, H, N * C, V)[:, :, :T] if N else v.new_zeros(B, H, 0, V)
    return o, state


def _run(
    core, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, state_v_first, cu_seqlens
):
    """Inputs in fla's layout, g and beta already activated."""
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q={tuple(q.shape)} vs k={tuple(k.shape)}")
    B, T, H, K = q.shape
    HV = v.shape[2]
    if HV % H != 0:
        raise ValueError(f"num_v_heads (HV={HV}) must be divisible by num_heads (H={H})")
    if tuple(g.shape) != (B, T, HV, K):
        raise ValueError(f"g must have shape [B, T, HV, K]={[B, T, HV, K]}, got {list(g.shape)}")
    if tuple(beta.shape) != (B, T, HV):
        raise ValueError(f"beta must have shape [B, T, HV]={[B, T, HV]}, got {list(beta.shape)}")
    _check_varlen(q, initial_state, cu_seqlens)
    out_dtype = v.dtype
    q, k, v, (g, beta), state, lens = prepared(
        q, k, v, (g, beta), scale, initial_state, use_qk_l2norm_in_kernel, state_v_first, cu_seqlens
    )
    o, state = core(q, k, v, beta, g, state)
    o = o.transpose(1, 2)
    if lens is not None:
        o = _unpack(o, lens)
    final_state = None
    if output_final_state:
        final_state = (state.transpose(-1, -2).contiguous() if state_v_first else state).float()
    return o.to(out_dtype), final_state


def _activate(
    g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, safe_gate
):
    if safe_gate and use_gate_in_kernel:
        if lower_bound is None:
            raise ValueError("`lower_bound` must be specified when `safe_gate=True` and `use_gate_in_kernel=True`.")
        if not -5 <= lower_bound < 0:
            raise ValueError(f"`lower_bound` must be in the safe range [-5, 0), got {lower_bound}.")
    if use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    return g, _beta_in_kernel(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)


# --------------------------------------------------------------------------------------------
# public entry points (same signatures as fla's)


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-loop KDA; stands in for ``fla.ops.kda.fused_recurrent_kda`` (and, unlike it, is
    differentiable)."""
    if "transpose_state_layout" in kwargs:
        state_v_first = state_v_first or kwargs.pop("transpose_state_layout")
    _check_unknown(kwargs, (), "fused_recurrent_kda")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    g, beta = _activate(
        g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, False
    )
    return _run(
        _recurrent_core,
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        state_v_first,
        cu_seqlens,
    )


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    cp_context=None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA; stands in for ``fla.ops.kda.chunk_kda``. Keyword extras as in fla: ``A_log``,
    ``dt_bias`` (read with ``use_gate_in_kernel``), ``chunk_size`` (32 or 64; checked, then the
    reference uses its own chunk, see the module docstring). ``disable_recompute`` and
    ``use_graph`` are GPU scheduling choices and change nothing here."""
    if "transpose_state_layout" in kwargs:
        state_v_first = state_v_first or kwargs.pop("transpose_state_layout")
    _check_unknown(kwargs, ("A_log", "dt_bias", "chunk_size"), "chunk_kda")
    if cp_context is not None:
        raise NotImplementedError("context parallelism has no CPU reference")
    if return_intermediate_states:
        raise NotImplementedError("return_intermediate_states (per-chunk states) has no CPU reference")
    if kwargs.get("chunk_size", 64) not in (32, 64):
        raise ValueError(f"`chunk_size` must be either 32 or 64 for KDA, got {kwargs['chunk_size']}.")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    g, beta = _activate(
        g,
        beta,
        kwargs.get("A_log"),
        kwargs.get("dt_bias"),
        use_gate_in_kernel,
        use_beta_sigmoid_in_kernel,
        allow_neg_eigval,
        lower_bound,
        safe_gate,
    )
    return _run(
        _chunk_core,
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        state_v_first,
        cu_seqlens,
    )
