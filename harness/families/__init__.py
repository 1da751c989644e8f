"""Family adapters, and the lookup from a loaded model to its adapter."""

from __future__ import annotations

from harness.errors import HarnessError
from harness.families.base import FamilyAdapter
from harness.families.fla_kda import KDAAdapter
from harness.families.fla_linear import DeltaNetAdapter, GatedDeltaNetAdapter
from harness.families.hf_softmax import Qwen2Adapter, SoftmaxAdapter
from harness.families.hybrid import HybridAdapter
from harness.method import HYBRID_FAMILIES

ADAPTERS: tuple[type[FamilyAdapter], ...] = (
    GatedDeltaNetAdapter,
    DeltaNetAdapter,
    KDAAdapter,
    SoftmaxAdapter,
    Qwen2Adapter,
)
FAMILIES = tuple(a.family for a in ADAPTERS) + HYBRID_FAMILIES


def adapter_for(model, kind: str | None = None) -> FamilyAdapter:
    """The model's adapter; with `kind` ("linear" or "softmax"), the adapter of that kind of layer
    (a hybrid model's part, or the model's own adapter if it is of that kind)."""
    if HybridAdapter.matches(model):
        adapter = HybridAdapter.for_model(model)
        return adapter if kind is None else adapter.part(kind)
    arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for cls in ADAPTERS:
        if cls.matches(model):
            if kind is not None and cls.kind != kind:
                raise HarnessError(f"model type {arch!r} has no {kind} attention layers")
            return cls()
    raise HarnessError(f"no key-channel adapter for model type {arch!r}; supported families: {', '.join(FAMILIES)}")


__all__ = ["ADAPTERS", "FAMILIES", "FamilyAdapter", "adapter_for"]
