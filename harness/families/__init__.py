"""Family adapters, and the lookup from a loaded model to its adapter."""

from __future__ import annotations

from harness.errors import HarnessError
from harness.families.base import FamilyAdapter
from harness.families.fla_linear import DeltaNetAdapter, GatedDeltaNetAdapter
from harness.families.hf_softmax import Qwen2Adapter, SoftmaxAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (GatedDeltaNetAdapter, DeltaNetAdapter, SoftmaxAdapter, Qwen2Adapter)
FAMILIES = tuple(a.family for a in ADAPTERS)


def adapter_for(model) -> FamilyAdapter:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise HarnessError(
        f"no key-channel adapter for model type {arch!r}; supported families: {', '.join(FAMILIES)}"
    )


__all__ = ["ADAPTERS", "FAMILIES", "FamilyAdapter", "adapter_for"]
