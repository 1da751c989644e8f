"""DRRQR: key-channel selection by strong rank-revealing QR of the Q/K activations.

Nazari & Rusch, "The Key to State Reduction in Linear Attention: A Rank-based Perspective"
(arXiv 2602.04852, 2026); strong RRQR of Gu & Eisenstat (SIAM J. Sci. Comput. 1996).
Per head, the calibration queries and keys that feed the delta rule are stacked row-wise into
M; the kept channels are the first `n_keep` columns of a strong RRQR of M with factor `f`. The
harness hands the method Gram-exact factors of the queries and keys (R with R^T R = X^T X over
every calibration token, d_k rows each), and column-pivoted QR depends on M only through M^T M:
the selection is the one over all calibration tokens, with no subsample (`--calib-samples` sets
how many tokens there are).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import ACTIVATIONS, LINEAR_FAMILIES, SOFTMAX_FAMILIES, WEIGHTS, LayerData, Method
from harness.methods.rrqr import strong_rrqr


@dataclass
class DRRQR(Method):
    name = "drrqr"
    families = LINEAR_FAMILIES + SOFTMAX_FAMILIES
    paper = "Nazari & Rusch 2026, arXiv 2602.04852 (strong RRQR: Gu & Eisenstat 1996)"
    needs = frozenset({ACTIVATIONS, WEIGHTS})

    f: float = 1.5  # strong-RRQR factor: every swap must grow |det A| by more than f
    max_swaps: int = 0  # swap cap; 0 = 10 * d_k
    permute: bool = False  # random column permutation before QRCP, to break ties

    def validate(self) -> None:
        if self.f < 1.0:
            raise ValueError(f"f must be >= 1 (strong RRQR factor), got {self.f}")
        if self.max_swaps < 0:
            raise ValueError(f"max_swaps must be >= 0, got {self.max_swaps}")

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        m = np.concatenate([layer.q[:, head].numpy(), layer.k[:, head].numpy()], axis=0).astype(np.float64)
        result = strong_rrqr(
            m,
            n_keep,
            f=self.f,
            max_swaps=self.max_swaps or 10 * layer.head_dim,
            permute_seed=int(rng.integers(2**31)) if self.permute else None,
        )
        self.record(
            "certificate",
            {
                "layer": layer.index,
                "head": head,
                "max_rho": result.max_rho,
                "swaps": result.swaps,
                "hit_swap_cap": result.hit_swap_cap,
            },
        )
        return result.kept
