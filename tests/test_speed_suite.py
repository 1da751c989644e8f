"""The speed suite on CPU: rows for the model and, in a compressed cell, its reference measured in
the same cell; cache bytes follow the compression. No timed assertions (timings are benchmarks)."""

from __future__ import annotations

import pytest

from harness.pipeline import run
from harness.suites.speed import SpeedSuite, cache_bytes, stats

SMALL = {"contexts": "32,96", "batches": "1,2", "new_tokens": 3, "warmup": 0, "repeats": 2}


def values(report, method):
    return {r["metric"]: r["value"] for r in report.rows if r["suite"] == "speed" and r["method"] == method}


@pytest.mark.parametrize("model", ["deltanet-tiny", "llama-tiny", "qwen35-hybrid-tiny"])
def test_speed_rows_for_model_and_reference(model, tmp_path):
    method = "random"
    report = run(
        model=model,
        method=method,
        ratios=[0.5],
        suites=["speed"],
        suite_params={"speed": SMALL},
        store=tmp_path / "r.sqlite",
        progress=False,
    )
    dense, ours = values(report, "dense"), values(report, method)
    where = ["c32b1", "c32b2", "c96b1", "c96b2"]
    for w in where:
        for q in ("prefill_tokens_per_s", "decode_ms_per_token", "cache_bytes"):
            assert dense[f"{q}/{w}"] > 0 and ours[f"{q}/{w}"] > 0 and ours[f"dense_{q}/{w}"] > 0
        assert ours[f"decode_speedup/{w}"] > 0 and ours[f"prefill_speedup/{w}"] > 0
        # the compressed model never holds more cache bytes than its reference, measured in the same
        # cell, and fewer once there are middle tokens (a K cache keeps sink 16 + recent 64 tokens whole)
        assert ours[f"cache_bytes/{w}"] <= ours[f"dense_cache_bytes/{w}"]
        if w.startswith("c96"):
            assert ours[f"cache_bytes/{w}"] < ours[f"dense_cache_bytes/{w}"]
        assert ours[f"dense_cache_bytes/{w}"] == dense[f"cache_bytes/{w}"]
    assert not any(k.startswith(("dense_", "decode_speedup")) for k in dense)  # the dense cell has no reference
    assert ours["decode_speedup"] == ours["decode_speedup/c96b2"]  # summary = largest context and batch
    from harness.store import ResultStore

    rows = ResultStore(tmp_path / "r.sqlite").table(method=method, suite="speed")
    assert rows and all(r["status"] == "complete" for r in rows)


def test_statistics_and_cache_bytes():
    import torch

    assert stats([3.0, 1.0, 2.0, 4.0]) == {"median": 2.5, "min": 1.0, "iqr": pytest.approx(2.5), "rounds": 4}
    assert stats([5.0])["iqr"] == 0
    x = torch.zeros(4, 8)
    holder = type("Cache", (), {})()
    holder.layers = [{"k": x, "v": torch.zeros(2, dtype=torch.float16)}, {"k": x}]  # shared tensor counted once
    assert cache_bytes(holder) == 4 * 8 * 4 + 2 * 2
    with pytest.raises(ValueError, match="contexts"):
        SpeedSuite(contexts="a,b")


def test_bytes_a_step_moves_count_rewritten_states_twice():
    """A recurrent or conv state is read and rewritten whole each step; keys and values are read once."""
    import torch
    from conftest import tiny_model
    from harness.kernels import fla_cpu

    fla_cpu.install()
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        state = tiny_model("deltanet")(ids, use_cache=True).past_key_values
    assert cache_bytes(state) > 0 and cache_bytes(state, moved=True) == 2 * cache_bytes(state)
    holder = type("Cache", (), {})()
    holder.layers = [{"keys": torch.zeros(4, 8), "recurrent_state": torch.zeros(2, 8)}]
    assert cache_bytes(holder) == (32 + 16) * 4 and cache_bytes(holder, moved=True) == (32 + 2 * 16) * 4
