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
computed in the kernel: at batch 64 those eight small torch ops, and the copies that make q, k and
v contiguous, cost a Qwen3.5-0.8B step more than its delta-rule kernels do. So for layers of
Qwen3.5's layout (four input projections ``in_proj_qkv`` / ``z`` / ``b`` / ``a``: Qwen3.5 and its
MoE) :func:`fused_step` gives the loop a whole one-token step of its own: the same projections,
conv step and output norm as transformers' forward, but the raw ``a`` and ``b`` go to the kernel,
which computes the decay and beta's sigmoid in its registers (as for fla's Gated DeltaNet layers),
and q, k, v, a and b are read where the projections wrote them. A call our kernel refuses takes
transformers' ops instead; every other step (the prefill, no cache) runs the layer's own forward.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from .conv_decode import conv_step
from .delta_rule import gdn_gate
from .fla_decode import decode_backend, decode_rows, refusal

__all__ = ["causal_conv1d_update", "fused_step", "recurrent_gated_delta_rule"]

# what a layer of Qwen3.5's layout holds (transformers' Qwen3_5GatedDeltaNet, Qwen3_5MoeGatedDeltaNet)
QWEN35_LAYOUT = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias", "norm", "out_proj")


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


def fused_step(layer) -> Callable | None:
    """A forward for `layer` whose one-token cached steps hand the raw gate inputs to our kernel
    (module docstring); None for a layer of another layout."""
    if not all(hasattr(layer, name) for name in QWEN35_LAYOUT):
        return None
    module = sys.modules[type(layer).__module__]
    original = layer.forward

    def forward(hidden_states, cache_params=None, attention_mask=None, **kwargs):
        i = layer.layer_idx
        stepping = cache_params is not None and hidden_states.shape[1] == 1 and not cache_params.is_recording_past(i)
        conv_state = cache_params.get_conv_state(i, state_idx=0) if stepping else None
        state = cache_params.get_recurrent_state(i, state_idx=0) if stepping else None
        if conv_state is None or state is None:
            return original(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        x = module.apply_mask_to_padding_states(hidden_states, attention_mask)
        batch = x.shape[0]
        # [B, 1, D] -> [B, D, 1], transformers' conv layout (the loop's conv step, or the module's own)
        mixed = module.causal_conv1d_update(
            layer.in_proj_qkv(x).transpose(1, 2),
            conv_state,
            layer.conv1d.weight.squeeze(1),
            layer.conv1d.bias,
            layer.activation,
        )
        query, key, value = torch.split(mixed.transpose(1, 2), [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
        query = query.reshape(batch, 1, -1, layer.head_k_dim)
        key = key.reshape(batch, 1, -1, layer.head_k_dim)
        value = value.reshape(batch, 1, -1, layer.head_v_dim)
        z = layer.in_proj_z(x)
        b, a = layer.in_proj_b(x), layer.in_proj_a(x)  # [B, 1, HV]: beta's logit, the decay's input
        gates = dict(A_log=layer.A_log, dt_bias=layer.dt_bias)
        why = refusal(
            query, key, value, b, state, True, None, g=a, gated=True, use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True, **gates,
        )  # fmt: skip
        if decode_backend() != "fla" and why is None:
            out, _ = decode_rows(query, key, value, b, state, a, l2norm=True, beta_sigmoid=True, **gates)
        else:  # transformers' own ops
            g = gdn_gate(a, layer.A_log, layer.dt_bias)  # transformers' -exp(A_log) softplus(a + dt_bias), fp32
            out, new_state = module.torch_recurrent_gated_delta_rule(
                query, key, value, g=g, beta=b.sigmoid(), initial_state=state, output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )  # fmt: skip
            cache_params.update_recurrent_state(new_state, i)
        out = layer.norm(out.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
        return layer.out_proj(out.reshape(batch, 1, -1))

    return forward
