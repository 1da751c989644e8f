"""Run a test module as a script under the Triton CPU interpreter, in a subprocess (so that
TRITON_INTERPRET=1 reaches no other test), for kernels' tests on machines without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_script(path: str, expected_ok: int, timeout: int = 900) -> None:
    """Run `path` with TRITON_INTERPRET=1: it prints "ok ..." per case that agrees and exits 0,
    or exits 77 when the interpreter cannot run here (the test then skips with the reason)."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.abspath(path)),
    )
    log = proc.stdout + proc.stderr
    if proc.returncode == 77:
        pytest.skip(f"the Triton CPU interpreter cannot run here: {log.strip().splitlines()[-1]}")
    assert proc.returncode == 0, log
    assert sum(line.startswith("ok ") for line in log.splitlines()) == expected_ok, log


def max_difference(code: str, drop_env: tuple[str, ...] = (), timeout: int = 300) -> float:
    """Run `code` (which prints "max difference X" last) with TRITON_INTERPRET=1 in a subprocess and
    return X; skips the test where Triton's interpreter cannot run here."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0 and "interpret" in result.stderr.lower() and "not supported" in result.stderr.lower():
        pytest.skip(f"Triton's interpreter cannot run here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().split()[-1])


def unavailable() -> str | None:
    """In the script: why the interpreter cannot run the kernels here (None when it can)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"triton unavailable: {exc!r}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1"
    return None
