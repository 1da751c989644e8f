"""PCA: project each head's keys (and queries) onto the top eigenvectors of their second moment.

The projection baseline of Nazari & Rusch 2026 (arXiv 2602.04852): per head, the eigenvectors of
E[k k^T] (optionally of Q and K stacked) with the largest eigenvalues; q_proj and k_proj rows are
rotated onto them (W' = P^T W), so q'.k' = q^T P P^T k keeps the dominant subspace of q.k. Not
axis-aligned: the depthwise short convolutions and the silu after them do not commute with a
rotation, so the adapter can only approximate the convs (each new channel gets the P^2-weighted
mean of the old filters). The uncentered second moment is used because q.k, not q - mean, is what
the recurrence reads (and it is all the streamed calibration keeps: a factor with M^T M exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.method import ACTIVATIONS, LINEAR_FAMILIES, WEIGHTS, LayerData, Method


@dataclass
class PCA(Method):
    name = "pca"
    families = LINEAR_FAMILIES
    paper = "PCA projection baseline (Nazari & Rusch 2026, arXiv 2602.04852)"
    needs = frozenset({ACTIVATIONS, WEIGHTS})
    projects = True

    use_queries: bool = True  # stack Q with K (False: keys only)

    def select_head(self, layer: LayerData, head: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
        parts = [layer.k[:, head]] + ([layer.q[:, head]] if self.use_queries else [])
        x = np.concatenate([p.numpy() for p in parts]).astype(np.float64)
        moment = x.T @ x / len(x)
        eigvals, eigvecs = np.linalg.eigh(moment)  # ascending
        top = eigvecs[:, np.argsort(-eigvals, kind="stable")[:n_keep]]
        # a deterministic sign per column (eigenvectors are defined up to sign)
        signs = np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(n_keep)])
        self.record(
            "explained_energy",
            {
                "layer": layer.index,
                "head": head,
                "fraction": float(eigvals[::-1][:n_keep].sum() / max(eigvals.sum(), 1e-30)),
            },
        )
        return top * signs
