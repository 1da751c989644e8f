"""L1 magnitude: data-free key-channel selection by the L1 norm of the projection rows.

A standard magnitude baseline (as in Li et al., "Pruning Filters for Efficient ConvNets",
ICLR 2017, applied to the rows of the query/key projections). The score of key channel i of a
head is ||Wq_i||_1 + ||Wk_i||_1, the sum of the absolute weights of output row i of q_proj and
of k_proj; each head keeps its `n_keep` highest-scoring channels (ties: lower index first).
No calibration run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import LINEAR_FAMILIES, WEIGHTS, LayerData, Method, head_rows, top_channels


@dataclass
class L1Magnitude(Method):
    name = "l1"
    families = LINEAR_FAMILIES
    paper = "magnitude baseline: L1 norm of q_proj/k_proj rows (Li et al. 2017, arXiv 1608.08710)"
    needs = frozenset({WEIGHTS})

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        rows = head_rows(layer, head)
        score = layer.q_weight[rows].double().abs().sum(1) + layer.k_weight[rows].double().abs().sum(1)
        return top_channels(score, n_keep)
