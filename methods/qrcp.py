"""QRCP: key-channel selection by plain QR with column pivoting of the Q/K activations.

The ablation of DRRQR without its swap phase (Nazari & Rusch, "The Key to State Reduction in
Linear Attention: A Rank-based Perspective", arXiv 2602.04852, 2026): it shows what the strong
rank-revealing condition buys. QR with column pivoting is Businger & Golub, "Linear least squares
solutions by Householder transformations" (Numer. Math. 7, 1965).
Per head, the calibration queries and keys are stacked row-wise into M exactly as in DRRQR
(2 * tokens x d_k, rows subsampled to `max_rows` with the method's seed); the kept channels are
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

    max_rows: int = 4096  # rows of M kept per head (seeded subsample)
    permute: bool = False  # random column permutation before QRCP, to break ties

    def validate(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        m = np.concatenate([layer.q[:, head].numpy(), layer.k[:, head].numpy()], axis=0).astype(np.float64)
        if m.shape[0] > self.max_rows:
            m = m[np.sort(rng.choice(m.shape[0], size=self.max_rows, replace=False))]
        order = qrcp_order(m, permute_seed=int(rng.integers(2**31)) if self.permute else None)
        return order[:n_keep]
