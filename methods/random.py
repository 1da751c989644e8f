"""Random: uniformly random key channels per head, seeded. The floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import LINEAR_FAMILIES, SOFTMAX_FAMILIES, LayerData, Method


@dataclass
class RandomChannels(Method):
    name = "random"
    families = LINEAR_FAMILIES + SOFTMAX_FAMILIES
    paper = "baseline (Nazari & Rusch 2026, arXiv 2602.04852, section 5)"
    needs = frozenset()

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(layer.head_dim, size=n_keep, replace=False)
