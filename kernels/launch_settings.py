"""Launch settings of the decode kernels, per GPU and shape class.

Settings tuned on one GPU do not carry to the next (the pruned decode kernel's H100 settings gave
91% of copy bandwidth at 8 x 32k on an H200 but 79% at 52 x 4k). So the kernels look their
settings up by (kernel, device name, shape class), in this order:

1. `OVERRIDE` (a module-level dict a sweep sets while it times candidates);
2. the user's cache, written by a sweep on this machine (`harness bench --tune`):
   `$HARNESS_LAUNCH_SETTINGS`, else `~/.cache/kc-harness/launch-settings.json`;
3. the table shipped beside this file (`launch_settings.json`: sweep winners measured on the GPUs
   named in it, with the command that produced them);
4. `DEFAULTS`.

A shape class names the regime a setting was tuned for: for the pruned decode kernel, how many
middle tokens one (row, KV head) streams and, past 128, the head's width (`shape_class`: a 256-wide
head's key and value tiles are twice the registers of the Llama-shaped ones the defaults were tuned
on); for the linear decode step, its key dim (`key_dim_class`). Lookups are cached per process; a
sweep that writes the user cache calls `forget()`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

ENV = "HARNESS_LAUNCH_SETTINGS"
SHIPPED = Path(__file__).with_name("launch_settings.json")
DEFAULTS: dict[str, dict[str, int]] = {
    # tuned on an H100 at Llama-3.1-8B shapes, bf16 (docs/benchmarks.md): 128-token blocks, 4 warps,
    # 2 stages, about 8 middle work items per SM, each at least 4 blocks long
    "pruned_decode": {"BLOCK_N": 128, "NUM_WARPS": 4, "NUM_STAGES": 2, "ITEMS_PER_SM": 8, "MIN_BLOCKS_PER_SPLIT": 4},
    # the linear decode step: BLOCK_V d_v columns per program (0: 32 for d_k > 64, else 64), warps,
    # and whether the state's loads and stores are marked evict-first (1) in L2: the H100's sweep
    # chose evict-first at every d_k (docs/benchmarks.md)
    "delta_decode": {"BLOCK_V": 0, "NUM_WARPS": 4, "EVICT_FIRST": 1},
}
OVERRIDE: dict[str, dict[str, int]] = {}
LONG_CONTEXT = 16384  # middle tokens per (row, head) from which the "long" class applies
NARROW_HEAD = 128  # head widths up to this share the plain classes


def shape_class(middle_tokens: int, head_dim: int = NARROW_HEAD) -> str:
    """The pruned decode kernel's regime: "long" (>= 16k middle tokens per row and head: few
    rows, long streams) or "short" (many rows, short streams); for heads wider than 128 (Qwen3.5's
    and Qwen3-Next's 256) the width is part of the class: "short, head dim 256"."""
    base = "long" if middle_tokens >= LONG_CONTEXT else "short"
    return base if head_dim <= NARROW_HEAD else f"{base}, head dim {head_dim}"


def key_dim_class(d_k: int) -> str:
    """The linear decode step's regime: its key dim (the state tile's height)."""
    return f"d_k {d_k}"


def user_cache() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "kc-harness" / "launch-settings.json")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entry(table: dict[str, Any], kernel: str, device: str, cls: str) -> dict[str, int]:
    found = table.get(kernel, {}).get(device, {}).get(cls, {})
    settings = found.get("settings", found) if isinstance(found, dict) else {}
    return {k: int(v) for k, v in settings.items() if k in DEFAULTS.get(kernel, {})}


@functools.lru_cache(maxsize=None)
def _stored(kernel: str, device: str, cls: str) -> tuple[tuple[str, int], ...]:
    merged = {
        **DEFAULTS.get(kernel, {}),
        **_entry(_read(SHIPPED), kernel, device, cls),
        **_entry(_read(user_cache()), kernel, device, cls),
    }
    return tuple(merged.items())


def settings(kernel: str, device: str, cls: str) -> dict[str, int]:
    """The launch settings of `kernel` on the GPU named `device` for shape class `cls`."""
    return {**dict(_stored(kernel, device, cls)), **OVERRIDE.get(kernel, {})}


def source(kernel: str, device: str, cls: str) -> str:
    """Where `settings` found its values (for tables and logs)."""
    if OVERRIDE.get(kernel):
        return "override"
    if _entry(_read(user_cache()), kernel, device, cls):
        return f"user cache {user_cache()}"
    if _entry(_read(SHIPPED), kernel, device, cls):
        return "shipped table"
    return "defaults"


def save(kernel: str, device: str, cls: str, values: dict[str, int], note: str = "", path: Path | None = None) -> Path:
    """Record a sweep's winner in the user cache (or `path`, e.g. the shipped table)."""
    path = path or user_cache()
    table = _read(path)
    entry = {"settings": {k: int(v) for k, v in values.items()}, **({"note": note} if note else {})}
    table.setdefault(kernel, {}).setdefault(device, {})[cls] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    forget()
    return path


def forget() -> None:
    _stored.cache_clear()
