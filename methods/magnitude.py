"""Magnitude: keep the key channels with the most energy (mean k_c^2 over calibration tokens).

The static baseline of the K-cache papers (LeanK, Zhang et al., arXiv 2508.02215; ThinK,
arXiv 2407.21018, compare against per-channel key norms). On softmax models the keys are
post-RoPE, as the cache stores them; on linear attention, the keys that feed the delta rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import ACTIVATIONS, LINEAR_FAMILIES, SOFTMAX_FAMILIES, CacheWindow, LayerData, Method, top_channels


@dataclass
class KeyMagnitude(CacheWindow, Method):
    name = "magnitude"
    families = SOFTMAX_FAMILIES + LINEAR_FAMILIES
    paper = "baseline (Zhang et al. 2025, LeanK, arXiv 2508.02215)"
    needs = frozenset({ACTIVATIONS})

    def validate(self) -> None:
        self.validate_window()

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        # the streamed factor R has R^T R = K^T K, so column norms of R are the channel energies
        energy = layer.k[:, head].double().pow(2).sum(0)
        return top_channels(energy, n_keep)
