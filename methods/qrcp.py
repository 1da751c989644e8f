"""QRCP: key-channel selection by plain QR with column pivoting of the Q/K activations.

The ablation of DRRQR without its swap phase (Nazari & Rusch, "The Key to State Reduction in
Linear Attention: A Rank-based Perspective", arXiv 2602.04852, 2026): it shows what the strong
rank-revealing condition buys. QR with column pivoting is Businger & Golub, "Linear least squares
solutions by Householder transformations" (Numer. Math. 7, 1965).
Per head, the calibration queries and keys are stacked row-wise into M exactly as in DRRQR (their
Gram-exact factors: the pivots are those over every calibration token); the kept channels are
the first `n_keep` QRCP pivots of M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import ACTIVATIONS, LINEAR_FAMILIES, SOFTMAX_FAMILIES, WEIGHTS, LayerData, Method
from harness.methods.rrqr import qrcp_order


@dataclass
class QRCP(Method):
    name = "qrcp"
    families = LINEAR_FAMILIES + SOFTMAX_FAMILIES
    paper = "Nazari & Rusch 2026, arXiv 2602.04852 (ablation of DRRQR; QRCP: Businger & Golub 1965)"
    needs = frozenset({ACTIVATIONS, WEIGHTS})

    permute: bool = False  # random column permutation before QRCP, to break ties

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        m = np.concatenate([layer.q[:, head].numpy(), layer.k[:, head].numpy()], axis=0).astype(np.float64)
        order = qrcp_order(m, permute_seed=int(rng.integers(2**31)) if self.permute else None)
        return order[:n_keep]
