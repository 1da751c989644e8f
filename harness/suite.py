"""The Suite contract: evaluate a (possibly compressed) model, return metrics.

A suite is a dataclass whose fields are its parameters. It sees the model, its tokenizer and a
`SuiteContext`; it never sees which method compressed the model (suites never branch on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

ALL_FAMILIES = "*"


def model_device(model):
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Headline:
    """A metric a suite puts in the short summary table: its name, how it reads, which way is
    better ("higher", "lower" or "" when neither is), and how to show the value ("" a number,
    "bytes", "percent" for a 0-100 value, "fraction" for a 0-1 value shown as a percentage)."""

    metric: str
    label: str
    better: str = ""
    kind: str = ""


@dataclass
class SuiteContext:
    family: str
    device: str
    seed: int
    artifacts: Path  # this run's artifact folder
    progress: Callable[[str, int], Any]  # progress(description, total) -> advance(n=1) callable
    # the uncompressed model, in a compressed cell (None in the dense cell): for suites that measure
    # both side by side (speed); a suite still never learns which method compressed the model
    reference: Any = None


@dataclass
class Suite:
    name: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = (ALL_FAMILIES,)
    description: ClassVar[str] = ""
    headlines: ClassVar[tuple[Headline, ...]] = ()  # the few metrics the summary table shows

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a clear message for bad parameter values."""

    def applies_to(self, family: str) -> bool:
        return ALL_FAMILIES in self.families or family in self.families

    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        raise NotImplementedError
