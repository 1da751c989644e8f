"""Grad: key-channel selection by first-order Taylor importance of the projection rows.

Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance Estimation for Neural Network Pruning"
(CVPR 2019, arXiv 1906.10771). The score of key channel i of a head is

    sum_j |Wq_ij * dL/dWq_ij|  +  sum_j |Wk_ij * dL/dWk_ij|

with L the LM loss on the calibration data and the gradients summed over calibration batches.
Each head keeps its `n_keep` highest-scoring channels (ties: lower index first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import GRADIENTS, LINEAR_FAMILIES, WEIGHTS, LayerData, Method, head_rows, top_channels


@dataclass
class TaylorGrad(Method):
    name = "grad"
    families = LINEAR_FAMILIES
    paper = "Molchanov et al. 2019, Importance Estimation for Neural Network Pruning (CVPR): |W * dL/dW|"
    needs = frozenset({GRADIENTS, WEIGHTS})

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        rows = head_rows(layer, head)
        score = (layer.q_weight[rows].double() * layer.q_grad[rows].double()).abs().sum(1) + (
            layer.k_weight[rows].double() * layer.k_grad[rows].double()
        ).abs().sum(1)
        return top_channels(score, n_keep)
