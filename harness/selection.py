"""ChannelSelection: which key channels each head of each layer keeps.

Methods produce it, family adapters consume it. It carries enough of the model's geometry
(heads, key and value dims per layer) to report kept ratio and state bytes on its own, and
it serializes to canonical JSON so that its digest identifies it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "harness.channel_selection/1"
# meta entries that change how a selection is realized (K-cache window, query-dependent chooser)
REALIZATION_META = ("cache", "prefill_chooser")
# the K-cache window (full-channel sink and recent tokens) of a softmax selection whose "cache"
# meta does not say: ours, sized for the tiny zoo models; methods take others as parameters
DEFAULT_SINK, DEFAULT_RECENT = 16, 64


@dataclass(frozen=True)
class LayerSelection:
    """Kept key channels of one layer: one sorted index tuple per (key) head.

    The one generalization is a projection (PCA): per head a `head_dim x n_keep` matrix whose
    columns are the new key channels; `kept` is then `range(n_keep)` per head, which keeps counts,
    ratio and bytes meaningful.
    """

    head_dim: int  # key channels per head before pruning
    value_dim: int  # value channels per head (the other side of the state)
    kept: tuple[tuple[int, ...], ...]  # per head, sorted, unique
    projection: tuple[tuple[tuple[float, ...], ...], ...] | None = None  # per head, head_dim rows of n_keep

    def __post_init__(self) -> None:
        if self.projection is not None:
            for head, (idx, matrix) in enumerate(zip(self.kept, self.projection)):
                if len(matrix) != self.head_dim or any(len(row) != len(idx) for row in matrix):
                    raise ValueError(f"head {head}: projection must be {self.head_dim} x {len(idx)}")
        for head, idx in enumerate(self.kept):
            if list(idx) != sorted(set(idx)):
                raise ValueError(f"head {head}: kept indices must be sorted and unique, got {idx}")
            if idx and (idx[0] < 0 or idx[-1] >= self.head_dim):
                raise ValueError(f"head {head}: kept index out of range [0, {self.head_dim})")

    @property
    def num_heads(self) -> int:
        return len(self.kept)

    @property
    def kept_counts(self) -> list[int]:
        return [len(idx) for idx in self.kept]

    @property
    def uniform_count(self) -> int:
        counts = set(self.kept_counts)
        if len(counts) != 1:
            raise ValueError(f"heads keep different channel counts {sorted(counts)}; this layer needs one count")
        return counts.pop()

    def flat_indices(self) -> np.ndarray:
        """Indices into the layer's concatenated (head, channel) key dimension."""
        return (
            np.concatenate([np.asarray(idx, dtype=np.int64) + h * self.head_dim for h, idx in enumerate(self.kept)])
            if self.kept
            else np.zeros(0, dtype=np.int64)
        )


@dataclass(frozen=True)
class ChannelSelection:
    """Per layer, per head kept key channels, plus what produced them."""

    family: str
    layers: dict[int, LayerSelection]
    method: str = ""
    ratio: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    # --- sizes -----------------------------------------------------------------------------
    @property
    def kept_ratio(self) -> float:
        total = sum(sel.head_dim * sel.num_heads for sel in self.layers.values())
        kept = sum(sum(sel.kept_counts) for sel in self.layers.values())
        return kept / total if total else 1.0

    def state_bytes(self, *, batch: int = 1, bytes_per_elem: int = 4) -> tuple[int, int]:
        """Recurrent-state bytes (dense, pruned): sum over layers of heads * d_k * d_v."""
        dense = sum(sel.num_heads * sel.head_dim * sel.value_dim for sel in self.layers.values())
        pruned = sum(sum(sel.kept_counts) * sel.value_dim for sel in self.layers.values())
        return dense * batch * bytes_per_elem, pruned * batch * bytes_per_elem

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def full(cls, family: str, geometry: dict[int, tuple[int, int, int]]) -> "ChannelSelection":
        """Keep everything. geometry: layer -> (num_heads, head_dim, value_dim)."""
        return cls(
            family=family,
            layers={
                i: LayerSelection(d, dv, tuple(tuple(range(d)) for _ in range(h))) for i, (h, d, dv) in geometry.items()
            },
            method="dense",
        )

    # --- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "family": self.family,
            "method": self.method,
            "ratio": self.ratio,
            "meta": self.meta,
            "layers": {
                str(i): {
                    "head_dim": s.head_dim,
                    "value_dim": s.value_dim,
                    "kept": [list(k) for k in s.kept],
                    **({"projection": [[list(r) for r in m] for m in s.projection]} if s.projection else {}),
                }
                for i, s in sorted(self.layers.items())
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChannelSelection":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a channel selection (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        layers = {
            int(i): LayerSelection(
                int(s["head_dim"]),
                int(s["value_dim"]),
                tuple(tuple(int(c) for c in k) for k in s["kept"]),
                tuple(tuple(tuple(float(v) for v in r) for r in m) for m in s["projection"])
                if "projection" in s
                else None,
            )
            for i, s in data["layers"].items()
        }
        return cls(
            family=data["family"],
            layers=layers,
            method=data.get("method", ""),
            ratio=float(data.get("ratio", 0.0)),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> "ChannelSelection":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ChannelSelection":
        return cls.from_json(Path(path).read_text())

    @property
    def digest(self) -> str:
        body = self.to_dict()
        # diagnostics (timings, certificates) do not change the realized model; these keys do
        body["meta"] = {k: v for k, v in self.meta.items() if k in REALIZATION_META}
        if not body["meta"]:
            body.pop("meta")
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def __hash__(self) -> int:
        return hash(self.digest)
