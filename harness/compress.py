"""Compression without evaluation: validate -> load -> calibrate -> select -> apply -> save.

`harness.pipeline.run` evaluates what this produces; `prune(...)` (the twin of `harness prune`)
only writes the compressed checkpoints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from harness import params as params_mod
from harness.calibration import CalibrationSpec, calibration_batches
from harness.errors import HarnessError
from harness.method import (
    ACTIVATIONS,
    ATTENTION_PART,
    CALIBRATED,
    GRADIENTS,
    HYBRID_FAMILIES,
    INPUTS,
    LINEAR_PART,
    MODEL,
    LayerData,
    Method,
    check_ratio,
    keep_count,
)
from harness.progress import Bars, bars
from harness.registry import build_method
from harness.selection import ChannelSelection


def check_ratios(ratios: Sequence[float]) -> list[float]:
    return [check_ratio(ratio) for ratio in ratios]


@dataclass
class Part:
    """One method on one kind of layer: the whole model, or one part of a hybrid model."""

    kind: str | None  # None: the whole model; "linear" / "softmax": that part of a hybrid model
    adapter: Any  # the part's FamilyAdapter (methods see its family)
    selector: Method

    def ratio(self, ratio: float) -> float:
        implied = self.selector.implied_ratio()  # a loaded mask fixes what is kept
        return ratio if implied is None else implied


@dataclass
class Plan:
    """A loaded model and its validated method(s), ready to compress at any of `ratios`.
    A hybrid model has one part per method (`--method` and `--attn-method`), others one part."""

    loaded: Any  # harness.loader.LoadedModel
    adapter: Any  # harness.families.FamilyAdapter of the whole model
    parts: list[Part]
    ratios: list[float]
    calibration: CalibrationSpec

    @property
    def selector(self) -> Method:
        """The method of a single-part plan (a hybrid plan's first part)."""
        return self.parts[0].selector

    @property
    def calibrated(self) -> bool:
        return any(p.selector.needs & CALIBRATED for p in self.parts)

    @property
    def method_name(self) -> str:
        """As stored: the method, or "linear+attention" methods of a hybrid model ("drrqr+leank")."""
        return identity([(p.kind, p.selector) for p in self.parts])[0]

    def method_key(self) -> dict[str, Any]:
        """The parameters a run key holds: the method's, or per part for a hybrid model."""
        return identity([(p.kind, p.selector) for p in self.parts])[1]

    def capture(self, bar: Bars) -> list[list[LayerData]]:
        """Per part, what its method needs (calibration batches are drawn once)."""
        batches = calibration_batches(self.loaded.tokenizer, self.calibration) if self.calibrated else []
        out = []
        for part in self.parts:
            needs = part.selector.needs
            if MODEL in needs:
                part.selector.fit(self.loaded.model, self.loaded.tokenizer, bar.task)
            if not needs & CALIBRATED:
                out.append(part.adapter.capture(self.loaded.model, [], needs))
                continue
            passes = bool(needs & {ACTIVATIONS, INPUTS}) + (GRADIENTS in needs)
            label = "calibrate" if part.kind is None else f"calibrate {part.kind}"
            out.append(
                part.adapter.capture(self.loaded.model, batches, needs, advance=bar.task(label, passes * len(batches)))
            )
        return out

    def select(self, layer_data: list[list[LayerData]], ratio: float, bar: Bars) -> ChannelSelection:
        chosen = {}
        for part, data in zip(self.parts, layer_data):
            family = self.loaded.family if part.kind is None else part.adapter.family
            chosen[part.kind] = part.selector.select(
                data,
                part.ratio(ratio),
                family,
                progress=bar.task(f"select {part.selector.name} {part.ratio(ratio):g}", len(data)),
            )
        if None in chosen:
            return chosen[None]
        return self.adapter.combine(self.loaded.model, chosen.get("linear"), chosen.get("softmax"))

    def compress(self, layer_data: list[list[LayerData]], ratio: float, bar: Bars):
        """A pruned deep copy of the model and the selection that made it."""
        selection = self.select(layer_data, ratio, bar)
        pruned = copy.deepcopy(self.loaded.model)
        self.adapter.apply(pruned, selection)
        return pruned, selection

    def save(self, pruned, selection: ChannelSelection, out: str | Path, suffix: str = "") -> str:
        from harness import graph_decode

        folder = Path(out) / f"{Path(self.loaded.name).name}-{self.method_name}-{selection.ratio:g}{suffix}"
        graph_decode.release(pruned)  # a held decoder's grouped projections share storage: save_pretrained refuses them
        pruned.save_pretrained(folder)
        self.loaded.tokenizer.save_pretrained(folder)
        selection.save(folder / "selection.json")
        return str(folder)


def assign(
    name: str,
    family: str,
    method: str,
    selector: Method,
    attn_method: str | None = None,
    attn_selector: Method | None = None,
) -> list[tuple[str | None, Method]]:
    """Which method compresses which layers, from families alone (no model needed):
    [(None, method)] for a single-kind model; on a hybrid model `method` goes to the linear layers
    when it supports them (family gated_deltanet), else to the attention layers (family
    attention), and `attn_method` always to the attention layers."""
    if family not in HYBRID_FAMILIES:
        if attn_method is not None:
            raise HarnessError(
                f"--attn-method applies to hybrid models (linear and attention layers); {name} is {family}"
            )
        if family not in selector.families:
            raise HarnessError(f"method {method!r} supports {', '.join(selector.families)} models; {name} is {family}")
        return [(None, selector)]
    if attn_method is not None and LINEAR_PART not in selector.families:
        raise HarnessError(
            f"--method {method} goes to the linear layers of {name} ({LINEAR_PART}) and supports "
            f"{', '.join(selector.families)}; give a linear method, or only --method {method}"
        )
    first = "linear" if LINEAR_PART in selector.families else "softmax"
    if first == "softmax" and ATTENTION_PART not in selector.families:
        raise HarnessError(
            f"method {method!r} supports {', '.join(selector.families)}; {name} is a hybrid "
            f"of {LINEAR_PART} and {ATTENTION_PART} layers"
        )
    if first == "linear" and selector.projects:
        raise HarnessError(
            f"{method} projects key channels, which transformers' fused q|k|v conv cannot realize; "
            "choose a channel-selecting method for the Gated DeltaNet layers of hybrid models"
        )
    out: list[tuple[str | None, Method]] = [(first, selector)]
    if attn_selector is not None:
        if ATTENTION_PART not in attn_selector.families:
            raise HarnessError(
                f"--attn-method {attn_method} supports {', '.join(attn_selector.families)}, "
                "not attention layers; pick a softmax-family method (see `harness list methods`)"
            )
        out.append(("softmax", attn_selector))
    return out


def identity(assigned: list[tuple[str | None, Method]]) -> tuple[str, dict[str, Any]]:
    """(method name, method parameters) as a run key holds them: the method's own, or for a hybrid
    "<linear>+<attention>" with the parameters per part."""
    if len(assigned) == 1 and assigned[0][0] is None:
        return assigned[0][1].name, params_mod.as_dict(assigned[0][1])
    return (
        "+".join(sel.name for _, sel in assigned),
        {kind: {"method": sel.name, **params_mod.as_dict(sel)} for kind, sel in assigned},
    )


def run_ratios(assigned: list[tuple[str | None, Method]], ratios: Sequence[float]) -> list[float]:
    """The ratios a run evaluates: a loaded mask on every part fixes the one ratio it keeps."""
    implied = {sel.implied_ratio() for _, sel in assigned}
    return list(ratios) if None in implied else [max(implied)]


def plan(
    model: str | None,
    method: str,
    ratios: Sequence[float],
    *,
    method_params=None,
    seed: int = 0,
    calibration: CalibrationSpec | None = None,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_method: str | None = None,
    attn_method_params=None,
) -> Plan:
    """Validate the inputs (cheap checks first), load the model, check family and ratios."""
    from harness.families import adapter_for
    from harness.loader import load_model

    selector = build_method(method, method_params, seed)
    attn_selector = build_method(attn_method, attn_method_params, seed) if attn_method is not None else None
    ratios = check_ratios(ratios)
    loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = adapter_for(loaded.model)
    assigned = assign(loaded.name, loaded.family, method, selector, attn_method, attn_selector)
    parts = [Part(kind, adapter if kind is None else adapter.part(kind), sel) for kind, sel in assigned]
    ratios = run_ratios(assigned, ratios)
    for part in parts:
        part.selector.check_geometry(part.adapter.geometry(loaded.model))
    for ratio in ratios:
        for part in parts:
            for _heads, head_dim, _dv in part.adapter.geometry(loaded.model).values():
                keep_count(head_dim, part.ratio(ratio))
    return Plan(loaded, adapter, parts, ratios, calibration or CalibrationSpec(seed=seed))


def prune(
    model: str | None, method: str, ratios: Sequence[float], out: str | Path, *, progress: bool = True, **kwargs
) -> list[str]:
    """Write one compressed `save_pretrained` folder per ratio under `out`; see `harness prune --help`."""
    p = plan(model, method, ratios, **kwargs)
    written = []
    with bars(progress) as bar:
        layer_data = p.capture(bar)
        for ratio in p.ratios:
            pruned, selection = p.compress(layer_data, ratio, bar)
            written.append(p.save(pruned, selection, out))
    return written
