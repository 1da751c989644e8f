"""DeltaNet and Gated DeltaNet (fla 0.6) family adapter.

Prunable tensors per layer: the rows of `q_proj` and `k_proj` and the channels of their
depthwise short convolutions `q_conv1d` / `k_conv1d`. A depthwise conv acts per channel, so
keeping a subset of channels commutes with it exactly: slicing is lossless for what is kept.
Values, beta, gates, output norm and `o_proj` are untouched.

Config: DeltaNet derives the key dim from `expand_k * hidden_size`; Gated DeltaNet from
`head_dim`, and derives the value head dim as `int(head_dim * expand_v)`, so `expand_v` is
re-derived to keep the value side exactly as it was.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from harness.families.base import (
    FamilyAdapter,
    forward_batches,
    projection_gradients,
    stream_factor,
    uniform_keep_count,
    zero_rows,
)
from harness.method import ACTIVATIONS, GRADIENTS, INPUTS, LayerData
from harness.selection import ChannelSelection


def _layer_classes():
    from fla.layers.delta_net import DeltaNet
    from fla.layers.gated_deltanet import GatedDeltaNet

    return DeltaNet, GatedDeltaNet


def _expand_v_for(value_head_dim: int, head_dim: int) -> float:
    """The float e with int(head_dim * e) == value_head_dim (fla truncates, so round up ulps)."""
    e = value_head_dim / head_dim
    while int(head_dim * e) < value_head_dim:
        e = float(np.nextafter(e, math.inf))
    return e


def _slice_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(
        linear.weight.data.index_select(0, rows).clone(), requires_grad=linear.weight.requires_grad
    )
    if linear.bias is not None:
        linear.bias = nn.Parameter(
            linear.bias.data.index_select(0, rows).clone(), requires_grad=linear.bias.requires_grad
        )
    linear.out_features = len(rows)


def _slice_conv(conv: nn.Conv1d, channels: torch.Tensor) -> None:
    conv.weight = nn.Parameter(
        conv.weight.data.index_select(0, channels).clone(), requires_grad=conv.weight.requires_grad
    )
    if conv.bias is not None:
        conv.bias = nn.Parameter(
            conv.bias.data.index_select(0, channels).clone(), requires_grad=conv.bias.requires_grad
        )
    conv.in_channels = conv.out_channels = conv.groups = len(channels)
    if hasattr(conv, "hidden_size"):
        conv.hidden_size = len(channels)


def _project(attn, sel) -> None:
    """Rotate each head's key channels onto its projection's columns: W' = P^T W for q_proj and
    k_proj. Exact for the projections; the depthwise convs cannot mix channels, so each new
    channel gets the P^2-weighted average of the old channels' filters (exact only when the mixed
    channels share a filter), and silu after the conv does not commute with P either: PCA on
    these layers is an approximation, by construction (see docs/design-notes.md)."""
    device, dtype = attn.q_proj.weight.device, attn.q_proj.weight.dtype
    blocks = [torch.tensor(m, dtype=torch.float64) for m in sel.projection]  # per head (d, n_keep)
    d, n_keep = blocks[0].shape

    def rotate_rows(weight: torch.Tensor) -> torch.Tensor:  # (H*d, ...) -> (H*n_keep, ...)
        heads = weight.double().reshape(len(blocks), d, -1)
        return torch.cat([p.T @ w for p, w in zip(blocks, heads)]).reshape(len(blocks) * n_keep, *weight.shape[1:])

    for linear in (attn.q_proj, attn.k_proj):
        linear.weight = nn.Parameter(
            rotate_rows(linear.weight.data).to(device, dtype), requires_grad=linear.weight.requires_grad
        )
        linear.out_features = linear.weight.shape[0]
    if attn.use_short_conv:
        for conv in (attn.q_conv1d, attn.k_conv1d):
            filters = conv.weight.data.double().reshape(len(blocks), d, -1)  # (H, d, K)
            mixed = torch.cat([(p**2).T @ f for p, f in zip(blocks, filters)])  # (H*n_keep, K)
            conv.weight = nn.Parameter(mixed.unsqueeze(1).to(device, dtype), requires_grad=conv.weight.requires_grad)
            if conv.bias is not None:
                conv.bias = nn.Parameter(
                    rotate_rows(conv.bias.data).to(device, dtype), requires_grad=conv.bias.requires_grad
                )
            conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]
            if hasattr(conv, "hidden_size"):
                conv.hidden_size = conv.weight.shape[0]


class FlaLinearAdapter(FamilyAdapter):
    """Shared surgery for fla's DeltaNet and GatedDeltaNet layers."""

    kind = "linear"
    projections = True
    layer_class_index = 0  # which of _layer_classes() this adapter handles

    @classmethod
    def matches(cls, model) -> bool:
        layer_cls = _layer_classes()[cls.layer_class_index]
        return any(isinstance(m, layer_cls) for m in model.modules())

    def layers(self, model) -> list[tuple[int, nn.Module]]:
        layer_cls = _layer_classes()[self.layer_class_index]
        return [(i, block.attn) for i, block in enumerate(model.model.layers) if isinstance(block.attn, layer_cls)]

    def geometry(self, model) -> dict[int, tuple[int, int, int]]:
        out = {}
        for i, attn in self.layers(model):
            per_key_head_v = attn.value_dim // attn.num_heads  # value channels sharing one key head
            out[i] = (attn.num_heads, attn.head_k_dim, per_key_head_v)
        return out

    # --- calibration -----------------------------------------------------------------------
    def _qk_modules(self, attn) -> tuple[nn.Module, nn.Module]:
        # the activations that feed the delta rule: conv outputs, or projections without conv
        return (attn.q_conv1d, attn.k_conv1d) if attn.use_short_conv else (attn.q_proj, attn.k_proj)

    def _fed(self, attn, y: torch.Tensor) -> torch.Tensor:
        """What the kernel is fed, from the output of a `_qk_modules` module (the same, here)."""
        return y

    def capture(
        self, model, batches: Iterable[torch.Tensor], needs: frozenset[str], advance: Callable[[], None] | None = None
    ) -> list[LayerData]:
        layers = self.layers(model)
        batches = list(batches)
        # streamed: per head only the triangular factor R of all activation rows seen so far
        # (R^T R = M^T M), updated batch by batch; memory is heads * d_k^2 whatever the token count
        store: dict[tuple[int, str], torch.Tensor] = {}
        x_sq: dict[int, torch.Tensor] = {}
        handles = []
        if ACTIVATIONS in needs:
            for i, attn in layers:
                for name, module in zip("qk", self._qk_modules(attn)):

                    def hook(_mod, _inp, out, key=(i, name), heads=attn.num_heads, d=attn.head_k_dim, attn=attn):
                        y = self._fed(attn, out[0] if isinstance(out, tuple) else out)
                        rows = y.detach().reshape(-1, heads, d).transpose(0, 1).double().cpu()  # (H, N, d)
                        store[key] = stream_factor(store.get(key), rows)

                    handles.append(module.register_forward_hook(hook))
        if INPUTS in needs:
            for i, attn in layers:  # q_proj and k_proj read the same normed hidden states

                def pre_hook(_mod, args, i=i):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    x_sq[i] = x_sq.get(i, 0) + x.pow(2).sum(0).cpu()

                handles.append(attn.q_proj.register_forward_pre_hook(pre_hook))
        try:
            if needs & {ACTIVATIONS, INPUTS}:
                # use_cache=True: without a cache, GatedDeltaNet fuses q/k/v into one conv call
                # that bypasses the q_conv1d/k_conv1d modules (and so these hooks)
                forward_batches(model, batches, advance, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        grads = self._gradients(model, layers, batches, advance) if GRADIENTS in needs else {}
        out = []
        for i, attn in layers:
            data = LayerData(
                index=i,
                num_heads=attn.num_heads,
                head_dim=attn.head_k_dim,
                value_dim=attn.value_dim // attn.num_heads,
                q_weight=attn.q_proj.weight.detach().float().cpu(),
                k_weight=attn.k_proj.weight.detach().float().cpu(),
            )
            if ACTIVATIONS in needs:
                for name in "qk":
                    if (i, name) not in store:
                        raise RuntimeError(
                            f"layer {i}: no {name} activations were captured (did fla change its forward?)"
                        )
                    setattr(data, name, store.pop((i, name)).transpose(0, 1).float())  # (rows <= d, H, d)
            if INPUTS in needs:
                data.x_sq = x_sq[i]
            if GRADIENTS in needs:
                data.q_grad, data.k_grad = grads[i]
            out.append(data)
        return out

    @staticmethod
    def _gradients(model, layers, batches, advance) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """dL/dW of every q_proj/k_proj, summed over batches."""
        weights = [w for _, attn in layers for w in (attn.q_proj.weight, attn.k_proj.weight)]
        sums = projection_gradients(model, weights, batches, advance)
        return {i: (sums[id(attn.q_proj.weight)], sums[id(attn.k_proj.weight)]) for i, attn in layers}

    # --- realization -----------------------------------------------------------------------
    @torch.no_grad()
    def zero(self, model, selection: ChannelSelection) -> None:
        self.check(model, selection)
        if any(sel.projection is not None for sel in selection.layers.values()):
            raise ValueError("a projection mixes channels: it has no zero-masked twin")
        for i, attn in self.layers(model):
            keep = torch.from_numpy(selection.layers[i].flat_indices())
            for module in (attn.q_proj, attn.k_proj, *((attn.q_conv1d, attn.k_conv1d) if attn.use_short_conv else ())):
                zero_rows(module, keep)

    @torch.no_grad()
    def apply(self, model, selection: ChannelSelection) -> None:
        self.check(model, selection)
        n_keep = uniform_keep_count(selection, "key head dim")
        for i, attn in self.layers(model):
            sel = selection.layers[i]
            if sel.projection is not None:
                _project(attn, sel)
            else:
                rows = torch.from_numpy(sel.flat_indices()).to(attn.q_proj.weight.device)
                _slice_rows(attn.q_proj, rows)
                _slice_rows(attn.k_proj, rows)
                if attn.use_short_conv:
                    _slice_conv(attn.q_conv1d, rows)
                    _slice_conv(attn.k_conv1d, rows)
            attn.head_k_dim = n_keep
            attn.key_dim = attn.num_heads * n_keep
            self._update_layer(attn, n_keep)
        self._update_config(model.config, n_keep)

    def _update_layer(self, attn, n_keep: int) -> None: ...

    def _update_config(self, config, n_keep: int) -> None: ...


class DeltaNetAdapter(FlaLinearAdapter):
    family = "deltanet"
    layer_class_index = 0

    def _update_layer(self, attn, n_keep: int) -> None:
        attn.expand_k = attn.key_dim / attn.hidden_size

    def _update_config(self, config, n_keep: int) -> None:
        config.expand_k = config.num_heads * n_keep / config.hidden_size


class GatedDeltaNetAdapter(FlaLinearAdapter):
    family = "gated_deltanet"
    layer_class_index = 1

    def _update_layer(self, attn, n_keep: int) -> None:
        attn.expand_v = _expand_v_for(attn.head_v_dim, n_keep)
        attn.head_dim = n_keep

    def _update_config(self, config, n_keep: int) -> None:
        value_head_dim = int(config.head_dim * config.expand_v)
        config.expand_v = _expand_v_for(value_head_dim, n_keep)
        config.head_dim = n_keep
