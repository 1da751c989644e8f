"""Which LeanK mask the bench uses: the published one when it can be found, else a synthetic
mask with the published mask's per-head kept-count distribution (the table then says so).

Llama-3.1-8B-Instruct's published mask ([32 layers, 8 KV heads, 128] of 0/1, kept fraction
0.3125) keeps 0, 32, 64 or 96 channels per head: 47, 120, 67 and 22 of its 256 heads. Decode
speed depends on those counts, not on which channels they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "HARNESS_LEANK_MASK"
# kept channels as a fraction of head_dim -> fraction of heads, in the published Llama-3.1-8B mask
PUBLISHED_COUNTS = {0.0: 47 / 256, 0.25: 120 / 256, 0.5: 67 / 256, 0.75: 22 / 256}


def default_mask_path(given: str | Path | None = None) -> Path | None:
    """`given`, else $HARNESS_LEANK_MASK, else None (a synthetic mask)."""
    if given:
        return Path(given).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return None


def synthetic_mask(layers: int, heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """A 0/1 mask [layers, heads, head_dim] whose per-head kept counts follow PUBLISHED_COUNTS
    (randomly placed heads and channels, seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = layers * heads
    counts: list[int] = []
    for fraction, share in PUBLISHED_COUNTS.items():
        counts += [round(fraction * head_dim)] * round(share * n)
    counts = (counts + [round(0.25 * head_dim)] * n)[:n]  # rounding slack: the commonest count
    mask = torch.zeros(n, head_dim)
    for i, c in zip(torch.randperm(n, generator=g).tolist(), counts):
        mask[i, torch.randperm(head_dim, generator=g)[:c]] = 1.0
    return mask.view(layers, heads, head_dim)


def random_mask(layers: int, heads: int, head_dim: int, kept: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Every head keeps round(kept * head_dim) random channels."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(layers * heads, head_dim)
    for row in mask:
        row[torch.randperm(head_dim, generator=g)[: round(kept * head_dim)]] = 1.0
    return mask.view(layers, heads, head_dim)


def leank_mask(path: str | Path | None, shape: tuple[int, int, int]) -> tuple[torch.Tensor, str, bool]:
    """(mask, where it came from, synthetic?) for a model of `shape` = (layers, KV heads, head_dim).
    A path that is given but missing or malformed is an error (HarnessError), never a silent fallback."""
    from harness.leank_mask import load_mask

    if path is None:
        mask = synthetic_mask(*shape)
        return (
            mask,
            (
                f"SYNTHETIC mask (no published mask found: pass --mask or set {ENV}); per-head kept "
                f"counts drawn like the published Llama-3.1-8B mask's, kept fraction {mask.mean():.4f}"
            ),
            True,
        )
    mask = load_mask(path)
    if tuple(mask.shape) != tuple(shape):
        from harness.errors import HarnessError

        raise HarnessError(
            f"LeanK mask {path} is {list(mask.shape)}, the model is {list(shape)} "
            "[layers, kv_heads, head_dim]; pass the Llama-3.1-8B mask"
        )
    return mask, f"published LeanK mask {path} (kept fraction {mask.mean():.4f})", False
