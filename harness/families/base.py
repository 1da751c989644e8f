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


class FamilyAdapter(ABC):
    family: str = ""
    kind: str = ""  # "linear" (recurrent state) or "softmax" (K cache)

    @classmethod
    @abstractmethod
    def matches(cls, model: torch.nn.Module) -> bool: ...

    @abstractmethod
    def geometry(self, model) -> dict[int, tuple[int, int, int]]:
        """layer index -> (key heads, key head dim, value channels per key head)."""

    @abstractmethod
    def capture(self, model, batches: Iterable[torch.Tensor], needs: frozenset[str],
                advance: Callable[[], None] | None = None) -> list[LayerData]:
        """Run calibration batches and return one LayerData per prunable layer."""

    @abstractmethod
    def apply(self, model, selection: ChannelSelection) -> None:
        """Slice the dropped channels out of the model, in place, and update its config."""

    @abstractmethod
    def zero(self, model, selection: ChannelSelection) -> None:
        """Zero the dropped channels in place (same function as `apply`, full-size tensors)."""

    def full_selection(self, model) -> ChannelSelection:
        return ChannelSelection.full(self.family, self.geometry(model))
