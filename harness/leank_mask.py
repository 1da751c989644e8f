"""The LeanK mask format: a float tensor [layers, kv_heads, head_dim] of 0/1 saved with
`torch.save` (the masks released with LeanK, MInference's configs/leank), and its conversion to and
from a `ChannelSelection`.

The leank method loads and writes it (`-p mask=...`), and so do `harness bench` and the CLI's
early check of `--mask`: a format, not a method, so it lives in the core.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.selection import ChannelSelection, LayerSelection


def load_mask(path: str | Path) -> torch.Tensor:
    """A published LeanK mask: float [layers, kv_heads, head_dim] of 0/1 (tensors only, no code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(
            f"LeanK mask {path} not found; pass the .pth file released with LeanK (MInference's configs/leank)"
        )
    try:
        mask = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HarnessError(
            f"{path} is not a LeanK mask ({type(exc).__name__}); expected a tensor saved with torch.save"
        ) from None
    if not torch.is_tensor(mask) or mask.dim() != 3 or not torch.all((mask == 0) | (mask == 1)):
        raise HarnessError(
            f"{path}: expected a 0/1 tensor [layers, kv_heads, head_dim], got "
            f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}"
        )
    if not bool(mask.any()):
        raise HarnessError(f"{path} keeps no key channel at all (every entry is 0); a mask must keep some")
    return mask.float()


def mask_selection(mask: torch.Tensor, family: str, method: str, meta: dict) -> ChannelSelection:
    layers = {
        i: LayerSelection(
            mask.shape[2], mask.shape[2], tuple(tuple(torch.nonzero(head).flatten().tolist()) for head in mask[i])
        )
        for i in range(mask.shape[0])
    }
    return ChannelSelection(family, layers, method, round(1.0 - float(mask.mean()), 6), meta=meta)


def selection_mask(selection: ChannelSelection) -> torch.Tensor:
    """The inverse of `mask_selection`: a 0/1 tensor [layers, kv_heads, head_dim]."""
    first = selection.layers[min(selection.layers)]
    mask = torch.zeros(len(selection.layers), first.num_heads, first.head_dim)
    for i, sel in selection.layers.items():
        for h, kept in enumerate(sel.kept):
            mask[i, h, list(kept)] = 1.0
    return mask
