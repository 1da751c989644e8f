"""Plain-torch delta rule and gated delta rule: references for fla's Triton kernels.

The four public functions take the same arguments, in the same order, as the fla entry points
they stand in for, so :mod:`harness.kernels.fla_cpu` can forward a call unchanged:

==================================  ===================================================
``delta_rule_recurrent``            ``fla.ops.delta_rule.fused_recurrent_delta_rule``
``delta_rule_chunk``                ``fla.ops.delta_rule.chunk_delta_rule``
``gated_delta_rule_recurrent``      ``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule``
``gated_delta_rule_chunk``          ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``
==================================  ===================================================

The recurrence (per head; the state ``S`` is ``[K, V]``, mapping keys to values)::

    S_t = exp(g_t) * S_{t-1}                      # gated rule only; g is a log decay
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T
    o_t = S_t^T (scale * q_t)

The *recurrent* form runs that loop token by token. The *chunked* form processes chunks of
``chunk_size`` tokens at once with the WY / UT representation: inside a chunk, with the
cumulative log decay ``G_i = g_1 + ... + g_i`` and ``D_ij = exp(G_i - G_j)`` for ``j <= i``,
the values actually written, ``delta = U - W S_0``, follow from one unit-lower-triangular solve

    (I + L) [U | W] = [beta * v | beta * exp(G) * k],   L_ij = beta_i D_ij (k_i . k_j)  (j < i)

after which the chunk output and the state handed to the next chunk are plain matmuls::

    O   = (exp(G) * q) S_0 + ((q k^T) * D)_{j <= i} delta
    S_C = exp(G_C) S_0 + (exp(G_C - G) * k)^T delta

Every chunk's triangular solve and intra-chunk matrices are computed in one batched call; only
the cheap state hand-off loops over chunks. Both forms are differentiated by plain autograd
(no hand-written backward), which is what LoRA and Taylor-score code needs on a CPU.

Conventions, as in fla:

* tensors are ``[B, T, H, D]``; ``v`` may have more heads than ``q``/``k`` (grouped value
  attention: value head ``i`` reads key head ``i // (HV // H)``); ``K`` and ``V`` are arbitrary
  (a pruned ``head_k_dim`` of 24 or 8 is fine);
* ``scale`` defaults to ``K ** -0.5`` with ``K`` the key head dim;
* states are ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first=True``); the final state
  is float32; with ``cu_seqlens`` the batch is 1 and ``N`` is the number of packed sequences;
* compute is float32 (float64 when any input is float64, so gradcheck can be used), outputs are
  cast back to the input dtype.

Variable-length batches (``cu_seqlens``) are unpacked into a right-padded ``[N, T_max]`` batch.
This is exact, not an approximation: padded tokens get ``beta = 0`` and log decay ``0`` (the gate
and the beta sigmoid are applied *before* padding), so they write nothing and decay nothing, and
the state after the padding is the state after each sequence's last real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "delta_rule_chunk",
    "delta_rule_recurrent",
    "gated_delta_rule_chunk",
    "gated_delta_rule_recurrent",
    "gdn_gate",
    "l2norm",
]

L2NORM_EPS = 1e-6  # fla.modules.norm.l2norm: x / sqrt(sum(x^2) + 1e-6)


# --------------------------------------------------------------------------------------------
# small pieces


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """fla's in-kernel q/k normalisation: ``x / sqrt(sum(x**2) + eps)`` over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gate(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gated DeltaNet's log decay from the raw gate input: ``-exp(A_log) * softplus(g + dt_bias)``.

    ``g`` is ``[..., HV]``, ``A_log`` and ``dt_bias`` are ``[HV]``. fla's kernel uses softplus with
    the threshold 20 (``x`` itself above it), which is ``F.softplus``'s default.
    """
    dtype = _compute_dtype(g, A_log, dt_bias)
    x = g.to(dtype)
    if dt_bias is not None:
        x = x + dt_bias.to(dtype)
    return -A_log.to(dtype).exp() * F.softplus(x)


def _check_unknown(kwargs: dict, allowed: tuple[str, ...], fn: str) -> None:
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{fn} (CPU reference) got unsupported argument(s): {', '.join(unknown)}")


def _check_varlen(q: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> None:
    if cu_seqlens is None:
        return
    if q.shape[0] != 1:
        raise ValueError(
            f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`. "
            "Please flatten variable-length inputs before processing."
        )
    if initial_state is not None and initial_state.shape[0] != len(cu_seqlens) - 1:
        raise ValueError(
            "The number of initial states is expected to be equal to the number of input sequences, "
            f"i.e., {len(cu_seqlens) - 1} rather than {initial_state.shape[0]}."
        )


def _pack(x: torch.Tensor | None, lens: list[int]) -> torch.Tensor | None:
    """[1, total, ...] -> [N, max(lens), ...], zero right-padding."""
    if x is None:
        return None
    segments = list(x[0].split(lens))
    return torch.nn.utils.rnn.pad_sequence(segments, batch_first=True) if segments else x[:, :0]


def _unpack(x: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """[N, T_max, ...] -> [1, total, ...]."""
    return torch.cat([x[i, :n] for i, n in enumerate(lens)], 0).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# the two cores: [B, H, T, D] layout, compute dtype, q already scaled, beta/g already activated


def _recurrent_core(q, k, v, beta, g, state):
    """Token loop. q, k [B,H,T,K]; v [B,H,T,V]; beta [B,H,T] or [B,H,T,V]; g [B,H,T] or None;
    state [B,H,K,V]. Returns o [B,H,T,V] and the final state."""
    T = q.shape[2]
    per_value_beta = beta.dim() == v.dim()
    outputs = []
    for t in range(T):
        if g is not None:
            state = state * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t].unsqueeze(-2)  # [B,H,1,K]
        b_t = beta[:, :, t] if per_value_beta else beta[:, :, t, None]
        delta = b_t * (v[:, :, t] - (k_t @ state).squeeze(-2))  # [B,H,V]
        state = state + k_t.transpose(-1, -2) * delta.unsqueeze(-2)  # rank-1 write
        outputs.append((q[:, :, t].unsqueeze(-2) @ state).squeeze(-2))
    o = torch.stack(outputs, 2) if outputs else v.new_zeros(v.shape)
    return o, state


def _chunk_core(q, k, v, beta, g, state, chunk_size: int):
    """WY / UT chunked form of the same recurrence (see the module docstring)."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # zero tokens with beta = 0 and log decay 0 leave the state untouched
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
        g = F.pad(g, (0, pad)) if g is not None else None
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(B, H, N, C)

    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    causal, strict = ones.tril(), ones.tril(-1)
    if g is not None:
        G = g.reshape(B, H, N, C).cumsum(-1)  # cumulative log decay in chunk
        D = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        decay_in = G.exp()[..., None]  # exp(G_i): S_0 seen at token i
        decay_out = (G[..., -1:] - G).exp()[..., None]  # exp(G_C - G_j): token j at chunk end
        decay_chunk = G[..., -1].exp()[..., None, None]  # exp(G_C)
    else:
        D = causal.to(q.dtype)
        decay_in = decay_out = decay_chunk = None

    kb = k * beta[..., None]
    L = ((kb @ k.transpose(-1, -2)) * D).masked_fill(~strict, 0)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb if decay_in is None else kb * decay_in], -1)
    U, W = torch.linalg.solve_triangular(L + eye, rhs, upper=False, unitriangular=True).split([V, K], -1)
    P = ((q @ k.transpose(-1, -2)) * D).masked_fill(~causal, 0)  # intra-chunk attention
    q_in = q if decay_in is None else q * decay_in
    k_out = (k if decay_out is None else k * decay_out).transpose(-1, -2)

    outputs = []
    for n in range(N):
        delta = U[:, :, n] - W[:, :, n] @ state  # values actually written
        outputs.append(q_in[:, :, n] @ state + P[:, :, n] @ delta)
        if decay_chunk is not None:
            state = decay_chunk[:, :, n] * state
        state = state + k_out[:, :, n] @ delta
    o = torch.stack(outputs, 2).reshape(B, H, N * C, V)[:, :, :T] if N else v.new_zeros(B, H, 0, V)
    return o, state


# --------------------------------------------------------------------------------------------
# shared driver


def _run(
    core: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    state_v_first: bool,
    cu_seqlens: torch.Tensor | None,
    out_dtype: torch.dtype,
    chunk_size: int = 64,
):
    """Inputs in fla's layout, beta / g already in their final (post-activation) form."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}")
    H, HV = q.shape[2], v.shape[2]
    if HV % H != 0:
        raise ValueError(f"num_v_heads (HV={HV}) must be divisible by num_heads (H={H})")
    _check_varlen(q, initial_state, cu_seqlens)
    q, k, v, (beta, g), state, lens = prepared(
        q, k, v, (beta, g), scale, initial_state, use_qk_l2norm_in_kernel, state_v_first, cu_seqlens
    )
    if core == "chunk":
        if beta.dim() == v.dim():
            raise ValueError("the chunked delta rule takes one beta per head and token ([B, T, H])")
        o, state = _chunk_core(q, k, v, beta, g, state, chunk_size)
    else:
        o, state = _recurrent_core(q, k, v, beta, g, state)
    o = o.transpose(1, 2)
    if lens is not None:
        o = _unpack(o, lens)

    final_state = None
    if output_final_state:
        final_state = state.transpose(-1, -2).contiguous() if state_v_first else state
    return o.to(out_dtype), final_state


def prepared(q, k, v, gates, scale, initial_state, use_qk_l2norm_in_kernel, state_v_first, cu_seqlens):
    """What every reference runner does before its core (the delta rule's and KDA's): one compute
    dtype, the in-kernel q/k norm and scale, q/k repeated for grouped value heads, packed
    sequences padded into a batch, the initial state in [N, HV, K, V], and every tensor moved to
    [B, H, T, ...]. `gates` (beta, g, ...; None stays None) follow the values. Returns (q, k, v,
    gates, state, lens) with lens the packed sequences' lengths (None when not packed)."""
    H, HV = q.shape[2], v.shape[2]
    if scale is None:
        scale = k.shape[-1] ** -0.5
    dtype = _compute_dtype(q, k, v, *gates, initial_state)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    gates = [None if x is None else x.to(dtype) for x in gates]
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    if HV != H:
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    lens = None
    if cu_seqlens is not None:
        lens = [int(n) for n in torch.as_tensor(cu_seqlens).diff().tolist()]
        q, k, v = (_pack(x, lens) for x in (q, k, v))
        gates = [_pack(x, lens) for x in gates]
    B, _, _, K = k.shape
    V = v.shape[-1]
    if initial_state is None:
        state = q.new_zeros(B, HV, K, V)
    else:
        state = initial_state.to(dtype)
        if state_v_first:
            state = state.transpose(-1, -2)
        if tuple(state.shape) != (B, HV, K, V):
            layout = "[N, HV, V, K]" if state_v_first else "[N, HV, K, V]"
            raise ValueError(f"initial_state must be {layout} = {(B, HV, K, V)}, got {tuple(initial_state.shape)}")
    # [B, T, H, ...] -> [B, H, T, ...]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    gates = tuple(None if x is None else x.transpose(1, 2) for x in gates)
    return q, k, v, gates, state, lens


def _beta_in_kernel(beta: torch.Tensor, use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool) -> torch.Tensor:
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if not use_beta_sigmoid_in_kernel:
        return beta
    beta = beta.to(_compute_dtype(beta)).sigmoid()
    return beta * 2.0 if allow_neg_eigval else beta


# --------------------------------------------------------------------------------------------
# public entry points (same signatures as fla's)


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-loop delta rule; stands in for ``fused_recurrent_delta_rule``.

    ``beta`` is ``[B, T, H]`` or per value channel ``[B, T, H, V]``; ``None`` means ones.
    """
    if scale is not None and scale <= 0:
        raise ValueError("scale must be positive")
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    return _run(
        "recurrent",
        q,
        k,
        v,
        beta,
        None,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        False,
        cu_seqlens,
        q.dtype,
    )


def delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) delta rule; stands in for ``chunk_delta_rule``.

    Unlike fla's kernel, float32 inputs are accepted (fla asserts bf16/fp16 here).
    """
    _check_unknown(kwargs, ("chunk_size",), "chunk_delta_rule")
    if beta.dim() != 3:
        raise ValueError("beta must be of shape [B, T, H]")
    return _run(
        "chunk",
        q,
        k,
        v,
        beta,
        None,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        False,
        cu_seqlens,
        q.dtype,
        kwargs.get("chunk_size", 64),
    )


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-loop gated delta rule; stands in for ``fused_recurrent_gated_delta_rule``.

    ``g`` is the log decay ``[B, T, HV]``, or with ``use_gate_in_kernel`` the raw gate input turned
    into ``-exp(A_log) * softplus(g + dt_bias)``. Per-key / per-value decays (``gk``, ``gv``) are
    not implemented. Unlike fla's kernel this one is differentiable.
    """
    if "transpose_state_layout" in kwargs:
        state_v_first = state_v_first or kwargs.pop("transpose_state_layout")
    _check_unknown(kwargs, (), "fused_recurrent_gated_delta_rule")
    if gk is not None or gv is not None:
        raise NotImplementedError("per-channel decays gk / gv have no CPU reference")
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    if use_gate_in_kernel:
        if A_log is None or g is None:
            raise ValueError("`A_log` and the raw `g` must be provided when `use_gate_in_kernel=True`.")
        g = gdn_gate(g, A_log, dt_bias)
    beta = _beta_in_kernel(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _run(
        "recurrent",
        q,
        k,
        v,
        beta,
        g,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        state_v_first,
        cu_seqlens,
        v.dtype,
    )


def gated_delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) gated delta rule; stands in for ``chunk_gated_delta_rule``.

    Keyword-only extras as in fla: ``use_gate_in_kernel``, ``A_log``, ``dt_bias``, ``chunk_size``.
    """
    if "transpose_state_layout" in kwargs:
        state_v_first = state_v_first or kwargs.pop("transpose_state_layout")
    _check_unknown(kwargs, ("use_gate_in_kernel", "A_log", "dt_bias", "chunk_size"), "chunk_gated_delta_rule")
    if cp_context is not None:
        raise NotImplementedError("context parallelism has no CPU reference")
    if kwargs.get("use_gate_in_kernel", False):
        if kwargs.get("A_log") is None or g is None:
            raise ValueError("`A_log` and the raw `g` must be provided when `use_gate_in_kernel=True`.")
        g = gdn_gate(g, kwargs["A_log"], kwargs.get("dt_bias"))
    beta = _beta_in_kernel(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _run(
        "chunk",
        q,
        k,
        v,
        beta,
        g,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        state_v_first,
        cu_seqlens,
        q.dtype,
        kwargs.get("chunk_size", 64),
    )
