"""The Method contract: a small selector that scores key channels and keeps the best.

A method is a dataclass whose fields are its parameters (typed, validated in `validate`).
It never touches the model: the family adapter captures what the method `needs` into one
`LayerData` per layer, and applies the resulting `ChannelSelection`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from harness.errors import HarnessError

# the family vocabulary: methods import it from here, with the rest of the contract
from harness.family_names import ATTENTION_PART, HYBRID_FAMILIES, LINEAR_FAMILIES, LINEAR_PART, SOFTMAX_FAMILIES  # noqa: F401
from harness.selection import DEFAULT_RECENT, DEFAULT_SINK, ChannelSelection, LayerSelection

# What a method can ask the adapter to capture during calibration.
ACTIVATIONS = "activations"  # q/k activations that feed the recurrence (as a Gram-equivalent factor)
WEIGHTS = "weights"  # q_proj/k_proj weights, always available
INPUTS = "inputs"  # sum over calibration tokens of squared q_proj/k_proj input features, (hidden,)
GRADIENTS = "gradients"  # dL/dW of q_proj/k_proj summed over calibration batches (L = LM loss)
MODEL = "model"  # the model itself: the method trains on it (LeanK); `fit` is called before `select`
CALIBRATED = frozenset({ACTIVATIONS, INPUTS, GRADIENTS})  # needs that require running the model


@dataclass
class LayerData:
    """Everything a selector may look at for one layer."""

    index: int
    num_heads: int
    head_dim: int
    value_dim: int
    q_weight: torch.Tensor  # (num_heads * head_dim, hidden): output rows of q_proj
    k_weight: torch.Tensor
    # (rows, num_heads, head_dim), float32 on CPU: rows whose Gram matrix equals that of all
    # calibration activations (the adapter streams them into a triangular factor, so rows <= head_dim);
    # any method that depends on the activations only through M^T M (QR, pivots, PCA) sees them exactly
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    x_sq: torch.Tensor | None = None  # (hidden,): ||X_j||^2 of the projections' inputs
    q_grad: torch.Tensor | None = None  # like q_weight: accumulated dL/dW
    k_grad: torch.Tensor | None = None


def check_ratio(ratio: float) -> float:
    """`ratio` as a float, or a HarnessError unless it is in [0, 1)."""
    if not 0.0 <= float(ratio) < 1.0:
        raise HarnessError(f"ratio must be in [0, 1) (the fraction of key channels removed), got {ratio}")
    return float(ratio)


def keep_count(head_dim: int, ratio: float) -> int:
    """Channels kept per head at a pruning ratio: floor(d_k * (1 - ratio))."""
    check_ratio(ratio)
    n_keep = math.floor(head_dim * (1.0 - ratio) + 1e-9)
    if n_keep < 1:
        raise HarnessError(
            f"ratio {ratio} keeps 0 of {head_dim} key channels per head; use a ratio of at most {1 - 1 / head_dim:.4f}"
        )
    return n_keep


@dataclass
class CacheWindow:
    """Softmax methods: the K-cache window their selection is realized with. The first `sink`
    tokens of each sequence and the last `recent` ones keep all key channels; with
    `full_prefill`, the prompt itself attends with all channels and only generated tokens read
    the pruned cache (LeanK's deployment); without it, every query reads middle keys through the
    kept channels, so a teacher-forced forward equals step-by-step decoding."""

    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT
    full_prefill: bool = False

    def validate_window(self) -> None:
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"need sink >= 0 and recent >= 1, got sink={self.sink}, recent={self.recent}")

    def window_meta(self) -> dict:
        return {"cache": {"sink": self.sink, "recent": self.recent, "full_prefill": self.full_prefill}}

    def select(self, layers, ratio, family, progress=None):
        selection = super().select(layers, ratio, family, progress)
        return dataclasses.replace(selection, meta={**selection.meta, **self.window_meta()})


def head_rows(layer: LayerData, head: int) -> slice:
    """The rows of `q_weight`/`k_weight` (and their gradients) that belong to one head."""
    return slice(head * layer.head_dim, (head + 1) * layer.head_dim)


def top_channels(score: torch.Tensor, n_keep: int) -> np.ndarray:
    """The `n_keep` highest-scoring channels; ties go to the lower index (stable sort)."""
    return np.argsort(-score.numpy(), kind="stable")[:n_keep]


@dataclass
class Method:
    """Base of every selector. Subclasses set the class variables and `select_head`."""

    name: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({WEIGHTS})
    projects: ClassVar[bool] = False  # selections are projections (new channels mixing old ones), not subsets

    seed: int = 0
    _meta: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a clear message for bad parameter values."""

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        """Indices (any order) of the `n_keep` channels this head keeps, or, for a projection
        method, a float `head_dim x n_keep` matrix with orthonormal columns (the new channels)."""
        raise NotImplementedError

    def select(self, layers: list[LayerData], ratio: float, family: str, progress=None) -> ChannelSelection:
        rng = np.random.default_rng(self.seed)
        self._meta = {}
        chosen: dict[int, LayerSelection] = {}
        for layer in layers:
            n_keep = keep_count(layer.head_dim, ratio)
            heads, projections = [], []
            for h in range(layer.num_heads):
                choice = np.asarray(self.select_head(layer, h, n_keep, rng))
                if choice.ndim == 2:  # a projection
                    if choice.shape != (layer.head_dim, n_keep):
                        raise RuntimeError(
                            f"{self.name} returned a {choice.shape} projection, expected {(layer.head_dim, n_keep)}"
                        )
                    projections.append(tuple(tuple(float(v) for v in row) for row in choice))
                    heads.append(tuple(range(n_keep)))
                    continue
                idx = choice.astype(np.int64)
                if idx.shape != (n_keep,) or len(set(idx.tolist())) != n_keep:
                    raise RuntimeError(f"{self.name} returned {idx.tolist()} for head {h}, expected {n_keep} distinct")
                heads.append(tuple(sorted(int(i) for i in idx)))
            if projections and len(projections) != layer.num_heads:
                raise RuntimeError(f"{self.name} mixed projections and index selections in layer {layer.index}")
            chosen[layer.index] = LayerSelection(
                layer.head_dim, layer.value_dim, tuple(heads), tuple(projections) if projections else None
            )
            if progress is not None:
                progress()
        return ChannelSelection(family=family, layers=chosen, method=self.name, ratio=ratio, meta=dict(self._meta))

    def fit(self, model, tokenizer, progress) -> None:
        """Methods that need MODEL train here, once per run, before `select` is called per ratio."""

    def implied_ratio(self) -> float | None:
        """A ratio fixed by the method's parameters (a loaded mask), overriding the requested ones."""
        return None

    def check_geometry(self, geometry: dict[int, tuple[int, int, int]]) -> None:
        """Raise HarnessError when the method's parameters cannot fit the loaded model, whose
        prunable layers are `geometry` (layer -> (key heads, head dim, value dim)): called once
        the model is loaded, before any cell runs."""

    def record(self, key: str, value) -> None:
        """Keep a diagnostic (for example a certificate) in the selection's meta."""
        self._meta.setdefault(key, []).append(value)
