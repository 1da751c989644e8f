"""The one-token decode step of transformers' Gated DeltaNet layers (the linear layers of the
Qwen3.5, Qwen3-Next and OLMo-hybrid models) on our kernels, in transformers' signatures, for the
static decode loop to swap in while it steps (`harness.families.hf_linear.decode_ops`).

Those layers call two functions of their modeling module at a cached one-token step:

- ``causal_conv1d_update(hidden_states [B, D, 1], conv_state [B, D, W], weight [D, W], bias,
  activation)``. Without the ``causal_conv1d`` package, transformers runs it as five torch ops (a
  concatenation, a copy into the state, a grouped conv1d, the activation, a cast). Here it is one
  launch of :func:`harness.kernels.conv_decode.conv_step` (fixed block size) on CUDA, its torch
  twin (:mod:`harness.kernels.conv`) elsewhere.
  Both keep transformers' layout: the state holds the last W inputs, oldest first, and shifts left
  by one in place. The output is computed in float32 and cast to the input's dtype.
- ``torch_recurrent_gated_delta_rule(query, key, value, g, beta, initial_state, ...)``, which
  transformers resolves to fla's ``fused_recurrent_gated_delta_rule`` or its own torch loop. Here,
  every call :func:`harness.kernels.fla_decode.refusal` accepts (one token a row, a contiguous
  float32 state, no gradient, on CUDA; ``HARNESS_FLA_DECODE=fla`` refuses all) goes to
  :func:`harness.kernels.delta_decode.delta_rule_step`, which updates ``initial_state`` in place
  and returns it; the layer's ``update_recurrent_state`` then copies the tensor onto itself, which
  torch skips. A refused call runs transformers' own op, whose new state the layer copies into
  place: slower, but still a fixed set of tensors that a CUDA graph can replay.

The layers pass ``g`` as the log decay already (``-exp(A_log) softplus(a + dt_bias)``) and
``beta`` already squashed (sigmoid, times 2 for OLMo-hybrid's negative eigenvalues), so neither is
computed in the kernel.
"""

from __future__ import annotations

from typing import Callable

from .conv_decode import conv_step
from .fla_decode import decode_backend, decode_rows, refusal

__all__ = ["causal_conv1d_update", "recurrent_gated_delta_rule"]


def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None):
    """transformers' one-token conv step: ``hidden_states`` [B, D, 1]; ``conv_state`` [B, D, W]
    updated in place; returns [B, D, 1] in ``hidden_states``' dtype."""
    if hidden_states.shape[-1] != 1:
        raise ValueError(f"a decode step takes one token a row, got {hidden_states.shape[-1]}")
    if not conv_state.is_contiguous():
        raise ValueError("the conv state must be contiguous (it is updated in place)")
    y = conv_step(hidden_states[..., 0], conv_state, weight, bias, activation)  # [B, D] rows (views)
    return y.unsqueeze(-1)


def recurrent_gated_delta_rule(original: Callable) -> Callable:
    """transformers' ``torch_recurrent_gated_delta_rule`` on our in-place step where it applies,
    ``original`` (the modeling module's function) otherwise."""

    def step(
        query,
        key,
        value,
        g=None,
        beta=None,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=None,
        **kwargs,
    ):
        # transformers' wrapper hands fla only the arguments fla names (the layers also pass use_cache)
        unsupported = [name for name in ("gk", "gv") if kwargs.get(name) is not None]
        scale = kwargs.get("scale")
        refused = decode_backend() == "fla" or refusal(
            query,
            key,
            value,
            beta,
            initial_state,
            output_final_state,
            cu_seqlens,
            g=g,
            gated=True,
            scale=scale,
            unsupported=unsupported,
        )
        if refused:
            return original(
                query,
                key,
                value,
                g=g,
                beta=beta,
                initial_state=initial_state,
                output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                cu_seqlens=cu_seqlens,
                **kwargs,
            )
        return decode_rows(query, key, value, beta, initial_state, g, scale=scale, l2norm=use_qk_l2norm_in_kernel)

    return step
