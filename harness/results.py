"""Run keys and result rows.

A run key names one evaluation cell: (model digest, method + params, ratio, recovery,
suite + params, seed). Its digest is the primary key in the store, so a repeated or resumed
command finds its finished cells and does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

KEY_VERSION = 1  # bump when the meaning of a cell changes (invalidates cached results)


@dataclass(frozen=True)
class RunKey:
    model: str  # as the user named it (display)
    model_digest: str  # identifies the weights
    family: str
    method: str  # "dense" for the uncompressed reference
    method_params: dict[str, Any]
    ratio: float
    suite: str
    suite_params: dict[str, Any]
    seed: int
    recovery: str = "none"  # "none", or the recovery applied after pruning ("lora")
    calibration: dict[str, Any] = field(default_factory=dict)
    recovery_params: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        body = asdict(self)
        body.pop("model")  # the same weights under another path are the same cell
        body["key_version"] = KEY_VERSION
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ResultRow:
    """One metric of one cell, with its provenance: what the store holds and `show` prints."""

    key: RunKey
    metric: str
    value: float
    unit: str
    details: dict[str, Any]
    provenance: dict[str, Any]
