"""Wanda: key-channel selection by weight magnitude times input activation norm.

Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language Models"
(arXiv 2306.11695, 2023), whose per-weight score is |W_ij| * ||X_j||_2, applied here to whole
output rows. The score of key channel i of a head is

    sum_j |Wq_ij| * ||X_j||_2  +  sum_j |Wk_ij| * ||X_j||_2

over the input features j of q_proj and k_proj, with X the calibration inputs of the projections
(both read the same normed hidden states, so ||X_j||_2 = sqrt(x_sq[j])). Each head keeps its
`n_keep` highest-scoring channels (ties: lower index first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import INPUTS, LINEAR_FAMILIES, WEIGHTS, LayerData, Method, head_rows, top_channels


@dataclass
class Wanda(Method):
    name = "wanda"
    families = LINEAR_FAMILIES
    paper = "Sun et al. 2023, arXiv 2306.11695 (per-row sum of |W| * ||X||, q_proj + k_proj)"
    needs = frozenset({INPUTS, WEIGHTS})

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        rows = head_rows(layer, head)
        x_norm = layer.x_sq.double().clamp_min(0).sqrt()
        score = (layer.q_weight[rows].double().abs() + layer.k_weight[rows].double().abs()) @ x_norm
        return top_channels(score, n_keep)
