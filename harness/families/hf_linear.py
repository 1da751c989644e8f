"""Gated DeltaNet layers of transformers' own hybrid models: Qwen3.5 (dense and MoE),
Qwen3-Next and OLMo-hybrid.

All three run one depthwise `conv1d` over the concatenation q | k | v (key_dim, key_dim,
value_dim channels) and hand q, k (l2-normalized in the kernel), v, the gate g and beta to
`torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule` of their modeling module.
They differ only in where q and k come from:

- Qwen3.5: one fused `in_proj_qkv` whose rows are q | k | v, the same order as the conv;
- Qwen3-Next: one fused `in_proj_qkvz` grouped per key head: [q_h, k_h, v_h, z_h] for each h;
- OLMo-hybrid: separate `q_proj`, `k_proj`, `v_proj`.

Pruning key head h to the channels `kept_h` keeps those rows of q and of k in the projection and
those channels of the q and k segments of the conv; v, z, gates, norms and `out_proj` are
untouched (the state is d_k' x d_v per value head). A depthwise conv acts per channel, so slicing
is exact for what is kept. Config: `linear_key_head_dim` (one value for all linear layers).

Calibration records the q and k each layer passes to its delta-rule op (after conv and
activation, before the kernel's l2norm): the activations that feed the recurrence.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable

import torch
from torch import nn

from harness.families.base import (
    FamilyAdapter,
    decoder_layers,
    forward_batches,
    host,
    projection_gradients,
    stream_factor,
    uniform_keep_count,
    zero_rows,
)
from harness.method import ACTIVATIONS, GRADIENTS, INPUTS, LINEAR_PART, LayerData
from harness.selection import ChannelSelection

# layer class name -> where q/k rows sit ("qkv": one fused projection q|k|v; "qkvz": fused and
# grouped per key head; "separate": q_proj and k_proj)
LAYOUTS = {
    "Qwen3_5GatedDeltaNet": "qkv",
    "Qwen3_5MoeGatedDeltaNet": "qkv",
    "Qwen3NextGatedDeltaNet": "qkvz",
    "OlmoHybridGatedDeltaNet": "separate",
}
OPS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


def gdn_layers(model) -> list[tuple[int, nn.Module]]:
    """(model layer index, Gated DeltaNet module) of every linear-attention layer."""
    return [
        (i, b.linear_attn)
        for i, b in enumerate(decoder_layers(model))
        if type(getattr(b, "linear_attn", None)).__name__ in LAYOUTS
    ]


def text_config(config):
    return getattr(config, "text_config", None) or config


def _flat(kept: Iterable[Iterable[int]], d: int, device) -> torch.Tensor:
    return torch.tensor([h * d + c for h, idx in enumerate(kept) for c in idx], dtype=torch.long, device=device)


def rows_to_keep(attn, kept) -> dict[str, torch.Tensor]:
    """Module name -> output rows (channels) to keep, for per-head `kept` key channels (CPU indices)."""
    d, heads, key_dim, value_dim = attn.head_k_dim, attn.num_k_heads, attn.key_dim, attn.value_dim
    device = "cpu"
    flat = _flat(kept, d, device)
    rest = torch.arange(value_dim, device=device)
    out = {"conv1d": torch.cat([flat, key_dim + flat, 2 * key_dim + rest])}
    layout = LAYOUTS[type(attn).__name__]
    if layout == "qkv":
        out["in_proj_qkv"] = out["conv1d"]
    elif layout == "separate":
        out["q_proj"] = out["k_proj"] = flat
    else:  # qkvz: per key head [q_h (d), k_h (d), v_h and z_h (2 * value_dim / heads)]
        vz = 2 * value_dim // heads
        block = 2 * d + vz
        out["in_proj_qkvz"] = torch.cat(
            [
                torch.cat(
                    [
                        h * block + torch.tensor(idx, dtype=torch.long, device=device),
                        h * block + d + torch.tensor(idx, dtype=torch.long, device=device),
                        h * block + 2 * d + torch.arange(vz, device=device),
                    ]
                )
                for h, idx in enumerate(kept)
            ]
        )
    return out


def qk_rows(attn) -> tuple[tuple[nn.Linear, torch.Tensor], tuple[nn.Linear, torch.Tensor]]:
    """((projection, q rows), (projection, k rows)) of the full layer: the q/k weight rows."""
    full = [range(attn.head_k_dim)] * attn.num_k_heads
    layout = LAYOUTS[type(attn).__name__]
    if layout == "separate":
        return (attn.q_proj, _flat(full, attn.head_k_dim, "cpu")), (attn.k_proj, _flat(full, attn.head_k_dim, "cpu"))
    name = "in_proj_qkv" if layout == "qkv" else "in_proj_qkvz"
    rows = rows_to_keep(attn, full)[name]
    if layout == "qkv":
        return (attn.in_proj_qkv, rows[: attn.key_dim]), (attn.in_proj_qkv, rows[attn.key_dim : 2 * attn.key_dim])
    d, per = attn.head_k_dim, rows.numel() // attn.num_k_heads
    grouped = rows.view(attn.num_k_heads, per)
    return (attn.in_proj_qkvz, grouped[:, :d].reshape(-1)), (attn.in_proj_qkvz, grouped[:, d : 2 * d].reshape(-1))


def _slice(module: nn.Module, rows: torch.Tensor) -> None:
    rows = rows.to(module.weight.device)
    module.weight = nn.Parameter(
        module.weight.data.index_select(0, rows).clone(), requires_grad=module.weight.requires_grad
    )
    if module.bias is not None:
        module.bias = nn.Parameter(
            module.bias.data.index_select(0, rows).clone(), requires_grad=module.bias.requires_grad
        )
    if isinstance(module, nn.Linear):
        module.out_features = len(rows)
    else:
        module.in_channels = module.out_channels = module.groups = len(rows)


@contextlib.contextmanager
def replaced_ops(layers: list[tuple[int, nn.Module]], names: Iterable[str], make: Callable[[str, Callable], Callable]):
    """While active, each function of `names` in the layers' modeling modules is `make(name, the
    function)`; the originals are restored after. The layers look these names up at every call."""
    modules = {sys.modules[type(attn).__module__] for _, attn in layers}
    saved = [(mod, name, getattr(mod, name)) for mod in modules for name in names if hasattr(mod, name)]
    try:
        for mod, name, op in saved:
            setattr(mod, name, make(name, op))
        yield
    finally:
        for mod, name, op in saved:
            setattr(mod, name, op)


@contextlib.contextmanager
def recording_ops(layers: list[tuple[int, nn.Module]], on_call: Callable[[int, dict], None]):
    """While active, every delta-rule op call of these layers also reaches `on_call(layer index,
    arguments)` (query, key, value, g, beta, ... by name), then runs unchanged."""
    current: list[int | None] = [None]
    handles = [attn.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i)) for i, attn in layers]

    def wrap(name, op):
        names = ("query", "key", "value")

        def recorded(*args, **kwargs):
            on_call(current[0], {"op": name, **dict(zip(names, args)), **kwargs})
            return op(*args, **kwargs)

        return recorded

    try:
        with replaced_ops(layers, OPS, wrap):
            yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def decode_ops(layers: list[tuple[int, nn.Module]]):
    """While active, these layers' one-token decode step runs on our kernels
    (`harness.kernels.hf_gdn_decode`): the conv state and the recurrent state updated in place;
    layers of Qwen3.5's layout step through `hf_gdn_decode.fused_step` (the decay and beta
    computed in the delta-rule kernel)."""
    from harness.kernels import hf_gdn_decode

    ours = {
        "causal_conv1d_update": lambda _op: hf_gdn_decode.causal_conv1d_update,
        "torch_recurrent_gated_delta_rule": hf_gdn_decode.recurrent_gated_delta_rule,
    }
    stepped = [(attn, hf_gdn_decode.fused_step(attn)) for _, attn in layers]
    stepped = [(attn, forward) for attn, forward in stepped if forward is not None]
    prior = [(attn, attn.__dict__.get("forward")) for attn, _ in stepped]
    with replaced_ops(layers, ours, lambda name, op: ours[name](op)):
        for attn, forward in stepped:
            attn.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:
            for attn, forward in prior:
                if forward is None:
                    del attn.forward
                else:
                    attn.forward = forward


class HFGatedDeltaNetAdapter(FamilyAdapter):
    """The linear-attention layers of a transformers hybrid (methods see family gated_deltanet)."""

    family = LINEAR_PART
    kind = "linear"

    @classmethod
    def matches(cls, model) -> bool:
        return bool(gdn_layers(model))

    def layers(self, model) -> list[tuple[int, nn.Module]]:
        return gdn_layers(model)

    def geometry(self, model) -> dict[int, tuple[int, int, int]]:
        return {i: (a.num_k_heads, a.head_k_dim, a.value_dim // a.num_k_heads) for i, a in self.layers(model)}

    # --- calibration -----------------------------------------------------------------------
    def capture(
        self, model, batches: Iterable[torch.Tensor], needs: frozenset[str], advance: Callable[[], None] | None = None
    ) -> list[LayerData]:
        layers = self.layers(model)
        batches = list(batches)
        store: dict[tuple[int, str], torch.Tensor] = {}
        x_sq: dict[int, torch.Tensor] = {}

        def on_call(i, args):
            for name in ("query", "key"):  # (B, T, heads, d): stream per head into R (R^T R = M^T M)
                x = args[name].detach()
                rows = x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1).double().cpu()
                store[(i, name[0])] = stream_factor(store.get((i, name[0])), rows)

        handles = []
        if INPUTS in needs:
            for i, attn in layers:

                def pre_hook(_mod, args, i=i):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    x_sq[i] = x_sq.get(i, 0) + x.pow(2).sum(0).cpu()

                handles.append(qk_rows(attn)[0][0].register_forward_pre_hook(pre_hook))
        try:
            if needs & {ACTIVATIONS, INPUTS}:
                context = recording_ops(layers, on_call) if ACTIVATIONS in needs else contextlib.nullcontext()
                with context:
                    forward_batches(model, batches, advance)
        finally:
            for h in handles:
                h.remove()
        grads = {}
        if GRADIENTS in needs:
            weights = list({id(p.weight): p.weight for _, a in layers for p, _ in qk_rows(a)}.values())
            grads = projection_gradients(model, weights, batches, advance)
        out = []
        for i, attn in layers:
            (q_lin, q_idx), (k_lin, k_idx) = qk_rows(attn)
            data = LayerData(
                index=i,
                num_heads=attn.num_k_heads,
                head_dim=attn.head_k_dim,
                value_dim=attn.value_dim // attn.num_k_heads,
                q_weight=host(q_lin.weight[q_idx.to(q_lin.weight.device)]),
                k_weight=host(k_lin.weight[k_idx.to(k_lin.weight.device)]),
            )
            if ACTIVATIONS in needs:
                for name in "qk":
                    if (i, name) not in store:
                        raise RuntimeError(
                            f"layer {i}: no {name} activations were captured (did transformers change its forward?)"
                        )
                    setattr(data, name, store.pop((i, name)).transpose(0, 1).float())
            if INPUTS in needs:
                data.x_sq = x_sq[i]
            if GRADIENTS in needs:
                data.q_grad, data.k_grad = grads[id(q_lin.weight)][q_idx], grads[id(k_lin.weight)][k_idx]
            out.append(data)
        return out

    # --- realization -----------------------------------------------------------------------
    def check(self, model, selection: ChannelSelection) -> None:
        super().check(model, selection)
        for sel in selection.layers.values():
            if sel.projection is not None:
                raise ValueError(
                    "a projection (PCA) mixes channels, which the fused q|k|v conv cannot; "
                    "choose a channel-selecting method for transformers' Gated DeltaNet layers"
                )

    @torch.no_grad()
    def zero(self, model, selection: ChannelSelection) -> None:
        self.check(model, selection)
        for i, attn in self.layers(model):
            for name, rows in rows_to_keep(attn, selection.layers[i].kept).items():
                zero_rows(getattr(attn, name), rows)

    @torch.no_grad()
    def apply(self, model, selection: ChannelSelection) -> None:
        self.check(model, selection)
        n_keep = uniform_keep_count(selection, "linear_key_head_dim")
        for i, attn in self.layers(model):
            for name, rows in rows_to_keep(attn, selection.layers[i].kept).items():
                _slice(getattr(attn, name), rows)
            attn.head_k_dim = n_keep
            attn.key_dim = attn.num_k_heads * n_keep
            attn.conv_dim = 2 * attn.key_dim + attn.value_dim
        text_config(model.config).linear_key_head_dim = n_keep
