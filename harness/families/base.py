"""The FamilyAdapter contract: the only code that knows a model family's module names.

An adapter finds the layers whose key channels can be pruned, captures what a method needs
during calibration, and realizes a ChannelSelection on the model (real, smaller tensors and
an updated config, so that `save_pretrained` then `from_pretrained` gives the same model).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable

import torch

from harness.method import LayerData
from harness.selection import ChannelSelection
from harness.suite import Metric


class FamilyAdapter(ABC):
    family: str = ""
    kind: str = ""  # "linear" (recurrent state) or "softmax" (K cache)
    projections: bool = False  # can realize a projection (PCA), not only a channel subset

    @classmethod
    @abstractmethod
    def matches(cls, model: torch.nn.Module) -> bool: ...

    @abstractmethod
    def geometry(self, model) -> dict[int, tuple[int, int, int]]:
        """layer index -> (key heads, key head dim, value channels per key head)."""

    @abstractmethod
    def capture(
        self, model, batches: Iterable[torch.Tensor], needs: frozenset[str], advance: Callable[[], None] | None = None
    ) -> list[LayerData]:
        """Run calibration batches and return one LayerData per prunable layer."""

    @abstractmethod
    def apply(self, model, selection: ChannelSelection) -> None:
        """Slice the dropped channels out of the model, in place, and update its config."""

    @abstractmethod
    def zero(self, model, selection: ChannelSelection) -> None:
        """Zero the dropped channels in place (same function as `apply`, full-size tensors)."""

    def check(self, model, selection: ChannelSelection) -> None:
        """The selection covers exactly this model's prunable layers, with their head geometry."""
        geometry = self.geometry(model)
        if set(selection.layers) != set(geometry):
            raise ValueError(f"selection covers layers {sorted(selection.layers)}, model has {sorted(geometry)}")
        for i, sel in selection.layers.items():
            if (sel.num_heads, sel.head_dim) != geometry[i][:2]:
                raise ValueError(
                    f"layer {i}: selection is for {sel.num_heads}x{sel.head_dim}, model has {geometry[i][:2]}"
                )

    def full_selection(self, model) -> ChannelSelection:
        return ChannelSelection.full(self.family, self.geometry(model))

    def bytes_metrics(self, model, selection: ChannelSelection) -> list[Metric]:
        """What the selection saves, as result rows (recurrent-state bytes; softmax adapters
        override this with the bytes their K cache really allocates)."""
        dense, pruned = selection.state_bytes(bytes_per_elem=4)
        return [
            Metric("kept_ratio", selection.kept_ratio, "fraction of key channels"),
            Metric("state_bytes_dense", dense, "bytes per sequence, fp32"),
            Metric("state_bytes", pruned, "bytes per sequence, fp32"),
            Metric("state_reduction", 1 - pruned / dense if dense else 0.0, "fraction"),
        ]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM (`model.model.layers`, or a multimodal model's language model's)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    return list(layers) if layers is not None else []


@torch.no_grad()
def forward_batches(
    model, batches: Iterable[torch.Tensor], advance: Callable[[], None] | None = None, use_cache: bool = False
) -> None:
    """Run calibration batches through the model (hooks installed by the caller record what they need)."""
    for input_ids in batches:
        model(input_ids=input_ids.to(model.device), use_cache=use_cache)
        if advance is not None:
            advance()


def uniform_keep_count(selection: ChannelSelection, config_field: str) -> int:
    """The one key head dim a sliced model's config can hold (every layer and head must keep it)."""
    counts = {sel.uniform_count for sel in selection.layers.values()}
    if len(counts) != 1:
        raise ValueError(f"the config's {config_field} is one value for all layers; selection keeps {sorted(counts)}")
    return counts.pop()


@torch.no_grad()
def zero_rows(module: torch.nn.Module, keep: torch.Tensor) -> None:
    """Zero every output row (channel) of a Linear or depthwise conv except `keep`, in place."""
    drop = torch.ones(module.weight.shape[0], dtype=torch.bool)
    drop[keep.cpu()] = False
    drop = drop.to(module.weight.device)
    module.weight[drop] = 0
    if module.bias is not None:
        module.bias[drop] = 0


def host(weight: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of a weight; a meta tensor (real geometry, no data: byte counts) stays as is."""
    return weight.detach() if weight.is_meta else weight.detach().float().cpu()


def stream_factor(previous: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Triangular R with R^T R = previous^T previous + rows^T rows, per leading batch index:
    calibration activations are streamed into it, so memory stays heads * d^2 whatever the token count."""
    if previous is not None:
        rows = torch.cat([previous, rows], dim=-2)
    return torch.linalg.qr(rows, mode="r").R


def projection_gradients(model, weights: list[torch.Tensor], batches, advance=None) -> dict[int, torch.Tensor]:
    """dL/dW (L: the LM loss) of each of `weights`, summed over calibration batches, keyed by
    id(weight); no other parameter gets a gradient and every requires_grad flag is restored."""
    saved = {p: p.requires_grad for p in model.parameters()}
    sums = {id(w): torch.zeros_like(w, dtype=torch.float32) for w in weights}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for input_ids in batches:
                ids = input_ids.to(model.device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                for w, g in zip(weights, torch.autograd.grad(loss, weights)):
                    sums[id(w)] += g.float()
                if advance is not None:
                    advance()
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return {k: v.cpu() for k, v in sums.items()}
