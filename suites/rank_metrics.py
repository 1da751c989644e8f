"""Rank metrics of states and key matrices (docs/methods.md section 4); pure functions of tensors.

Every function takes a batch of matrices `[..., d, d']` (or their singular values `[..., r]`)
and returns one value per matrix, computed in float64:

- stable rank `sr(S) = ||S||_F^2 / ||S||_2^2 = sum s_i^2 / max s_i^2`, in [1, min(d, d')];
- rank utilization `u(S) = sr(S) / min(d, d')`, in (0, 1];
- effective rank (Roy & Vetterli 2007) `exp(H(p))`, `p_i = s_i / sum s`, in [1, rank(S)].

A zero matrix has no direction at all: all three are 0 for it (not nan), so that a head whose
state has not been written yet, or whose key channels were all masked, averages in as "empty".
For keys: the channel-energy spectrum (mean `k_c^2` per channel, sorted descending, summing to 1)
and the number of channels that hold a given fraction of the energy.
"""

from __future__ import annotations

import torch

__all__ = [
    "channel_energy_spectrum",
    "channels_for_energy",
    "effective_rank",
    "effective_rank_from_singular_values",
    "normalized_spectrum",
    "rank_utilization",
    "singular_values",
    "singular_values_from_gram",
    "stable_rank",
    "stable_rank_from_singular_values",
]


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """`[..., d, d']` -> `[..., min(d, d')]`, float64, descending."""
    return torch.linalg.svdvals(matrices.double())


def singular_values_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Singular values of `M` from its Gram matrix `M^T M` (`[..., d, d]`), descending, float64.

    Cheaper than an SVD for tall matrices (and for prefixes, whose Grams are running sums).
    Eigenvalues under `d * eps * max` are rounding noise of zero directions and are set to 0.
    """
    eig = torch.linalg.eigvalsh(gram.double()).flip(-1)
    floor = eig[..., :1].clamp_min(0) * gram.shape[-1] * torch.finfo(torch.float64).eps
    return torch.where(eig > floor, eig, torch.zeros_like(eig)).sqrt()


def stable_rank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    top = s.amax(-1)
    energy = (s * s).sum(-1)
    return torch.where(top > 0, energy / top.clamp_min(torch.finfo(s.dtype).tiny) ** 2, torch.zeros_like(top))


def effective_rank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)  # 0 log 0 = 0
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def stable_rank(matrices: torch.Tensor) -> torch.Tensor:
    return stable_rank_from_singular_values(singular_values(matrices))


def rank_utilization(matrices: torch.Tensor) -> torch.Tensor:
    """`sr(S) / min(d, d')` per matrix of `[..., d, d']`."""
    return stable_rank(matrices) / min(matrices.shape[-2:])


def effective_rank(matrices: torch.Tensor) -> torch.Tensor:
    return effective_rank_from_singular_values(singular_values(matrices))


def channel_energy_spectrum(keys: torch.Tensor) -> torch.Tensor:
    """Keys `[..., n, d]` -> the sorted (descending) per-channel mean of `k_c^2`, normalized to
    sum 1 over the `d` channels (all zeros when the keys are all zero): `[..., d]`."""
    return normalized_spectrum(keys.double().pow(2).mean(-2))


def normalized_spectrum(energy: torch.Tensor) -> torch.Tensor:
    """Per-channel energies `[..., d]` (any order) -> sorted descending, summing to 1."""
    energy = energy.double().sort(-1, descending=True).values
    total = energy.sum(-1, keepdim=True)
    return torch.where(total > 0, energy / total.clamp_min(torch.finfo(energy.dtype).tiny), torch.zeros_like(energy))


def channels_for_energy(spectrum: torch.Tensor, fraction: float = 0.9) -> torch.Tensor:
    """Fewest channels of a sorted, normalized spectrum `[..., d]` whose energy reaches `fraction`
    (0 for an all-zero spectrum)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    cumulative = spectrum.double().cumsum(-1)
    # a tolerance keeps a spectrum that sums to 1 - 1e-16 from needing one channel more
    reached = cumulative >= fraction * cumulative[..., -1:] - 1e-12
    count = reached.int().argmax(-1) + 1
    return torch.where(cumulative[..., -1] > 0, count, torch.zeros_like(count))
