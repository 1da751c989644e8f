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
from harness import registry
from harness.calibration import CalibrationSpec, calibration_batches
from harness.errors import HarnessError
from harness.method import ACTIVATIONS, CALIBRATED, GRADIENTS, INPUTS, MODEL, LayerData, Method, keep_count
from harness.progress import Bars, bars
from harness.selection import ChannelSelection


def check_ratios(ratios: Sequence[float]) -> list[float]:
    out = []
    for ratio in ratios:
        if not 0.0 <= float(ratio) < 1.0:
            raise HarnessError(f"ratio must be in [0, 1) (the fraction of key channels removed), got {ratio}")
        out.append(float(ratio))
    return out


def build_method(method: str, method_params: dict[str, Any] | None, seed: int) -> Method:
    cls = registry.get_method(method)
    values = {**(method_params or {})}
    values.setdefault("seed", seed)
    return params_mod.build(cls, values, what=f"method {method}")


@dataclass
class Plan:
    """A loaded model and a validated method, ready to compress at any of `ratios`."""

    loaded: Any  # harness.loader.LoadedModel
    adapter: Any  # harness.families.FamilyAdapter
    selector: Method
    ratios: list[float]
    calibration: CalibrationSpec

    @property
    def calibrated(self) -> bool:
        return bool(self.selector.needs & CALIBRATED)

    def capture(self, bar: Bars) -> list[LayerData]:
        needs = self.selector.needs
        if MODEL in needs:
            self.selector.fit(self.loaded.model, self.loaded.tokenizer, bar.task)
        if not self.calibrated:
            return self.adapter.capture(self.loaded.model, [], needs)
        batches = calibration_batches(self.loaded.tokenizer, self.calibration)
        passes = bool(needs & {ACTIVATIONS, INPUTS}) + (GRADIENTS in needs)
        return self.adapter.capture(self.loaded.model, batches, needs,
                                    advance=bar.task("calibrate", passes * len(batches)))

    def compress(self, layer_data: list[LayerData], ratio: float, bar: Bars):
        """A pruned deep copy of the model and the selection that made it."""
        selection = self.selector.select(layer_data, ratio, self.loaded.family,
                                         progress=bar.task(f"select {self.selector.name} {ratio:g}", len(layer_data)))
        pruned = copy.deepcopy(self.loaded.model)
        self.adapter.apply(pruned, selection)
        return pruned, selection

    def save(self, pruned, selection: ChannelSelection, out: str | Path, suffix: str = "") -> str:
        folder = Path(out) / f"{Path(self.loaded.name).name}-{self.selector.name}-{selection.ratio:g}{suffix}"
        pruned.save_pretrained(folder)
        self.loaded.tokenizer.save_pretrained(folder)
        selection.save(folder / "selection.json")
        return str(folder)


def plan(model: str | None, method: str, ratios: Sequence[float], *, method_params=None, seed: int = 0,
         calibration: CalibrationSpec | None = None, device: str = "auto", dtype: str = "float32",
         trust_remote_code: bool = False) -> Plan:
    """Validate the inputs (cheap checks first), load the model, check family and ratios."""
    from harness.families import adapter_for
    from harness.loader import load_model

    selector = build_method(method, method_params, seed)
    ratios = check_ratios(ratios)
    loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if loaded.family not in selector.families:
        raise HarnessError(
            f"method {method!r} supports {', '.join(selector.families)} models; {loaded.name} is {loaded.family}"
        )
    adapter = adapter_for(loaded.model)
    implied = selector.implied_ratio()
    if implied is not None:  # a loaded mask fixes what is kept
        ratios = [implied]
    for ratio in ratios:
        for _heads, head_dim, _dv in adapter.geometry(loaded.model).values():
            keep_count(head_dim, ratio)
    return Plan(loaded, adapter, selector, ratios, calibration or CalibrationSpec(seed=seed))


def prune(model: str | None, method: str, ratios: Sequence[float], out: str | Path, *, progress: bool = True,
          **kwargs) -> list[str]:
    """Write one compressed `save_pretrained` folder per ratio under `out`; see `harness prune --help`."""
    p = plan(model, method, ratios, **kwargs)
    written = []
    with bars(progress) as bar:
        layer_data = p.capture(bar)
        for ratio in p.ratios:
            pruned, selection = p.compress(layer_data, ratio, bar)
            written.append(p.save(pruned, selection, out))
    return written
