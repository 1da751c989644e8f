"""Where a result came from: package versions, git commit, device, time."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_PACKAGES = ("kc-harness", "torch", "flash-linear-attention", "transformers", "triton", "numpy")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@cache
def git_commit() -> str | None:
    """The harness checkout's commit (with '+dirty' for uncommitted changes), if it is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@cache
def versions() -> dict[str, str | None]:
    out = {name: _version(name) for name in _PACKAGES}
    out["python"] = platform.python_version()
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def collect(device: str) -> dict:
    return {
        "versions": versions(),
        "git_commit": git_commit(),
        "device": device_name(device),
        "host": platform.node(),
        "timestamp": now(),
    }
