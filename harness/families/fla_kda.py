"""Kimi Delta Attention (fla 0.6 `KimiDeltaAttention`, model type "kda") family adapter.

KDA is the gated delta rule with one decay per key channel: the forget gate
`g = -exp(A_log[h]) * softplus(f_proj(x) + dt_bias)` (or, with `lower_bound`,
`lower_bound * sigmoid(exp(A_log[h]) * (f_proj(x) + dt_bias))`) has a row of `f_proj[1]` and an
entry of `dt_bias` per (value head, key channel). Keeping m of d_k key channels therefore keeps,
besides the rows of `q_proj` / `k_proj` and the channels of `q_conv1d` / `k_conv1d` (as for
DeltaNet), the gate rows `f_proj[1][hv * d_k + c]` and `dt_bias[hv * d_k + c]` of every value head
hv reading key head hv // (HV / H): a pruned channel takes its decay with it. `A_log` is per value
head and stays. Values, beta, the output gate and norm and `o_proj` are untouched.

Slicing equals zero-masking: a channel whose q and k are zero at every token never enters the
state (its state row stays zero whatever its decay), and the in-kernel L2 norm of q and k sums
zeros for it. Only the kernel's default scale differs (d_k ** -0.5 of the tensors it is given), as
for DeltaNet (docs/design-notes.md).

Config: fla derives `head_k_dim = head_dim` and `head_v_dim = int(head_dim * expand_v)`, so the
pruned config has `head_dim = m` and `expand_v` re-derived to keep `head_v_dim` (exactly
head_v_dim / m, rounded up by ulps where fla's truncation needs it; fla's isclose checks pass).

PCA (a projection) mixes channels, and the gate is diagonal in the channels: each new channel
gets the P^2-weighted average of the old channels' gate rows and biases (like the conv filters,
harness.families.fla_linear), an approximation by construction.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.families.fla_linear import FlaLinearAdapter, _expand_v_for, _slice_rows


def _layer_class():
    from fla.layers.kda import KimiDeltaAttention

    return KimiDeltaAttention


def gate_rows(attn, kept: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Rows of `f_proj[1]` (entries of `dt_bias`) that carry the kept channels' decays: value head
    hv keeps the channels of its key head hv // (HV / H)."""
    group = attn.num_v_heads // attn.num_heads
    d = attn.head_k_dim
    return torch.tensor([hv * d + c for hv in range(attn.num_v_heads) for c in kept[hv // group]], dtype=torch.long)


class KDAAdapter(FlaLinearAdapter):
    family = "kda"

    @classmethod
    def matches(cls, model) -> bool:
        layer_cls = _layer_class()
        return any(isinstance(m, layer_cls) for m in model.modules())

    def layers(self, model) -> list[tuple[int, nn.Module]]:
        layer_cls = _layer_class()
        return [(i, block.attn) for i, block in enumerate(model.model.layers) if isinstance(block.attn, layer_cls)]

    def _fed(self, attn, y: torch.Tensor) -> torch.Tensor:
        # without short convs KDA feeds silu(q_proj(x)), silu(k_proj(x)) to the kernel
        return y if attn.use_short_conv else torch.nn.functional.silu(y)

    @torch.no_grad()
    def apply(self, model, selection) -> None:
        self.check(model, selection)
        # the gate first: gate_rows reads the layer's unpruned head_k_dim
        for i, attn in self.layers(model):
            sel = selection.layers[i]
            if sel.projection is not None:
                _project_gate(attn, sel)
            else:
                rows = gate_rows(attn, sel.kept).to(attn.dt_bias.device)
                _slice_rows(attn.f_proj[1], rows)
                attn.dt_bias = nn.Parameter(
                    attn.dt_bias.data.index_select(0, rows).clone(), requires_grad=attn.dt_bias.requires_grad
                )
        super().apply(model, selection)  # q/k projections and convs, head_k_dim, key_dim, config

    def _update_layer(self, attn, n_keep: int) -> None:
        attn.expand_v = _expand_v_for(attn.head_v_dim, n_keep)
        attn.head_dim = n_keep
        attn.gate_dim = attn.num_v_heads * n_keep

    def _update_config(self, config, n_keep: int) -> None:
        value_head_dim = int(config.head_dim * config.expand_v)
        config.expand_v = _expand_v_for(value_head_dim, n_keep)
        config.head_dim = n_keep


def _project_gate(attn, sel) -> None:
    """Per value head, new channel j's gate row and bias: sum_i P_ij^2 (row_i, bias_i) of its key head's P."""
    device, dtype = attn.f_proj[1].weight.device, attn.f_proj[1].weight.dtype
    blocks = [torch.tensor(m, dtype=torch.float64) for m in sel.projection]  # per key head (d, n_keep)
    d, n_keep = blocks[0].shape
    group = attn.num_v_heads // attn.num_heads
    weight = attn.f_proj[1].weight.data.double().reshape(attn.num_v_heads, d, -1)
    bias = attn.dt_bias.data.double().reshape(attn.num_v_heads, d)
    mix = [(blocks[hv // group] ** 2).T for hv in range(attn.num_v_heads)]  # (n_keep, d)
    new_weight = torch.cat([m @ w for m, w in zip(mix, weight)])
    new_bias = torch.cat([m @ b for m, b in zip(mix, bias)])
    linear = attn.f_proj[1]
    linear.weight = nn.Parameter(new_weight.to(device, dtype), requires_grad=linear.weight.requires_grad)
    linear.out_features = new_weight.shape[0]
    attn.dt_bias = nn.Parameter(new_bias.to(device, attn.dt_bias.dtype), requires_grad=attn.dt_bias.requires_grad)


__all__ = ["KDAAdapter", "gate_rows"]
