"""Hybrid models of transformers: Gated DeltaNet layers and softmax-attention layers in one stack
(Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-hybrid).

Each kind of layer is compressed by its own part adapter with a method of its family: the linear
layers by `HFGatedDeltaNetAdapter` (sliced to a smaller `linear_key_head_dim`, methods see family
`gated_deltanet`), the attention layers by `HybridAttentionAdapter` (a pruned K cache, methods see
family `attention`). One `ChannelSelection` holds both, keyed by model layer index; its
`meta["parts"]` records which layers each part covers and which method made it, so the selection
saved beside a result says everything about the compressed model. A part left out stays dense.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from harness.families.base import FamilyAdapter
from harness.families.hf_linear import HFGatedDeltaNetAdapter
from harness.families.hf_softmax import HybridAttentionAdapter, attention_modules
from harness.family_names import FAMILY_OF_MODEL_TYPE
from harness.method import ATTENTION_PART, HYBRID_FAMILIES, LINEAR_PART, LayerData
from harness.selection import ChannelSelection
from harness.suite import Metric

# transformers model_type -> harness family of the whole model
MODEL_TYPES = {t: f for t, f in FAMILY_OF_MODEL_TYPE.items() if f in HYBRID_FAMILIES}


class HybridAdapter(FamilyAdapter):
    kind = "hybrid"
    family = "hybrid"

    def __init__(self, family: str = "hybrid"):
        self.family = family
        self.parts: dict[str, FamilyAdapter] = {"linear": HFGatedDeltaNetAdapter(), "softmax": HybridAttentionAdapter()}

    @classmethod
    def matches(cls, model) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPES

    @classmethod
    def for_model(cls, model) -> "HybridAdapter":
        return cls(MODEL_TYPES[model.config.model_type])

    def part(self, kind: str) -> FamilyAdapter:
        return self.parts[kind]

    @staticmethod
    def attention_ids(model) -> list[int]:
        return [m.layer_idx for m in attention_modules(model)]

    def geometry(self, model) -> dict[int, tuple[int, int, int]]:
        ids = self.attention_ids(model)
        return {
            **self.parts["linear"].geometry(model),
            **{ids[j]: g for j, g in self.parts["softmax"].geometry(model).items()},
        }

    def capture(
        self, model, batches: Iterable[torch.Tensor], needs: frozenset[str], advance: Callable[[], None] | None = None
    ) -> list[LayerData]:
        raise NotImplementedError("a hybrid model is calibrated part by part: use part('linear') / part('softmax')")

    # --- one selection for both parts -------------------------------------------------------
    def combine(self, model, linear: ChannelSelection | None, softmax: ChannelSelection | None) -> ChannelSelection:
        """One selection over all layers; a missing part keeps all its channels."""
        lin = linear or self.parts["linear"].full_selection(model)
        att = softmax or self.parts["softmax"].full_selection(model)
        ids = self.attention_ids(model)
        used = [s for s in (linear, softmax) if s is not None]
        return ChannelSelection(
            family=self.family,
            layers={**lin.layers, **{ids[j]: s for j, s in att.layers.items()}},
            method="+".join(s.method for s in used) or "dense",
            ratio=max((s.ratio for s in used), default=0.0),
            # the attention part's realization keys (cache window, prefill chooser) stay at the top,
            # where the selection digest reads them
            meta={
                **att.meta,
                "linear_meta": lin.meta,
                "parts": {
                    "linear": {"method": lin.method, "ratio": lin.ratio, "layers": sorted(lin.layers)},
                    "softmax": {
                        "method": att.method,
                        "ratio": att.ratio,
                        "layers": [ids[j] for j in sorted(att.layers)],
                    },
                },
            },
        )

    def split(self, model, selection: ChannelSelection) -> dict[str, ChannelSelection]:
        """The part selections, keyed as each part adapter expects."""
        parts = selection.meta.get("parts")
        if parts is None:
            raise ValueError("not a hybrid selection (no meta['parts']); build it with HybridAdapter.combine")
        position = {layer: j for j, layer in enumerate(self.attention_ids(model))}
        meta = {k: v for k, v in selection.meta.items() if k not in ("parts", "linear_meta")}
        return {
            "linear": ChannelSelection(
                LINEAR_PART,
                {i: selection.layers[i] for i in parts["linear"]["layers"]},
                parts["linear"]["method"],
                parts["linear"]["ratio"],
                dict(selection.meta.get("linear_meta", {})),
            ),
            "softmax": ChannelSelection(
                ATTENTION_PART,
                {position[i]: selection.layers[i] for i in parts["softmax"]["layers"]},
                parts["softmax"]["method"],
                parts["softmax"]["ratio"],
                meta,
            ),
        }

    def full_selection(self, model) -> ChannelSelection:
        return self.combine(model, None, None)

    # --- realization -----------------------------------------------------------------------
    def apply(self, model, selection: ChannelSelection) -> None:
        for kind, part in self.split(model, selection).items():
            self.parts[kind].apply(model, part)

    def zero(self, model, selection: ChannelSelection) -> None:
        for kind, part in self.split(model, selection).items():
            self.parts[kind].zero(model, part)

    def bytes_metrics(self, model, selection: ChannelSelection) -> list[Metric]:
        """Both parts' rows (state bytes of the linear layers, KV bytes of the attention layers,
        each part's kept ratio) and their sum: what one sequence holds, dense vs compressed."""
        parts = self.split(model, selection)
        rows = {kind: {m.name: m for m in self.parts[kind].bytes_metrics(model, part)} for kind, part in parts.items()}
        lin, att = rows["linear"], rows["softmax"]
        dense = lin["state_bytes_dense"].value + att["kv_bytes_dense"].value
        held = lin["state_bytes"].value + att["kv_bytes"].value
        context = att["kv_bytes"].unit.removeprefix("bytes, ")
        return [
            Metric("kept_ratio", selection.kept_ratio, "fraction of key channels, both kinds of layer"),
            Metric("linear_kept_ratio", lin["kept_ratio"].value, "fraction of key channels, linear layers"),
            Metric("attention_kept_ratio", att["kept_ratio"].value, "fraction of key channels, attention layers"),
            *(m for name, m in lin.items() if name != "kept_ratio"),
            *(m for name, m in att.items() if name != "kept_ratio"),
            Metric("bytes_dense", dense, f"bytes: fp32 linear state + KV cache at {context}"),
            Metric("bytes", held, f"bytes: fp32 linear state + KV cache at {context}"),
            Metric("bytes_reduction", 1 - held / dense if dense else 0.0, "fraction"),
        ]
