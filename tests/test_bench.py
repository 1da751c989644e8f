"""`harness bench` on CPU: `--quick` runs the end-to-end table on the zoo models, skips the GPU
tables with a reason and writes markdown and JSON. No timed assertions (timings are benchmarks)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from harness.bench import Table
from harness.bench.report import table_markdown
from harness.cli import app


@pytest.fixture
def no_gpu(monkeypatch):
    """The CPU path, even on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_bench_quick_on_cpu(tmp_path, no_gpu):
    result = CliRunner().invoke(app, ["bench", "--quick", "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "Device: cpu" in markdown and "Command: `harness bench" in markdown and "--quick" in markdown
    assert {"torch", "triton", "fla", "transformers", "date", "command"} <= set(data["header"])
    tables = {t["name"]: t for t in data["tables"]}
    assert list(tables) == [
        "pruned",
        "linear",
        "prefill",
        "e2e-llama",
        "capacity",
        "e2e-deltanet",
        "e2e-gated-deltanet",
        "e2e-qwen35",
    ]
    for name in ("pruned", "linear", "prefill", "capacity"):
        assert "CUDA" in tables[name]["skipped"] and not tables[name]["rows"]
        assert f"Skipped: {tables[name]['skipped']}" in markdown
    rows = tables["e2e-llama"]["rows"] + tables["e2e-deltanet"]["rows"]
    for model in ("llama-tiny (zoo)", "deltanet-tiny (zoo)"):
        variants = [r for r in rows if r["model"] == model]
        assert variants[0]["variant"] == "dense" and len(variants) >= 2  # dense and compressed, same run
        for r in variants:
            assert "error" not in r, r
            assert r["prefill_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0 and r["cache_bytes"] > 0
        assert all(r["decode_vs_dense"] > 0 for r in variants[1:])
    pruned = next(r for r in rows if r["variant"].startswith("pruned"))
    assert pruned["cache_vs_dense"] < 1  # the pruned DeltaNet state is smaller
    llama = {r["variant"]: r for r in tables["e2e-llama"]["rows"]}
    assert [r["engine"] for r in llama.values()] == ["generate", "static", "static"]
    masked = llama["random mask (kept 0.5), static loop"]
    assert masked["twin"] == "dense, static loop" and masked["decode_vs_twin"] > 0
    assert masked["cache_bytes"] < llama["dense, static loop"]["cache_bytes"]  # same loop, fewer bytes
    assert "Random weights" in markdown and "| llama-tiny (zoo) | dense |" in markdown
    log = (tmp_path / "bench.log").read_text()  # a timestamped line per measurement, with its figures
    assert "llama-tiny (zoo) | dense | 2 x 128: prefill " in log and " ms/token, cache " in log
    assert "deltanet-tiny (zoo): built with variants dense, dense, static loop, pruned" in log
    assert "table e2e-deltanet written" in log
    for name in ("e2e-deltanet", "e2e-gated-deltanet", "e2e-qwen35"):  # stock generate, dense and pruned in the loop
        linear = tables[name]["rows"]
        assert [r["engine"] for r in linear] == ["generate", "static", "static"], name
        assert linear[2]["decode_vs_twin"] > 0 and linear[2]["cache_bytes"] < linear[1]["cache_bytes"], name


def test_bench_without_gpu_needs_quick(tmp_path, no_gpu):
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "CUDA is not available" in result.output and "--quick" in result.output
    result = CliRunner().invoke(app, ["bench", "--quick", "--only", "e2e-llama,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown table 'nope'" in result.output
    result = CliRunner().invoke(app, ["bench", "--tune", "--sweep", "pruned-wide,wider", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown sweep 'wider'" in result.output
    result = CliRunner().invoke(app, ["bench", "--quick", "--sweep", "pruned-wide", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "add --tune" in result.output
    assert not (tmp_path / "benchmarks.md").exists()


def test_tune_cases_and_winner(tmp_path, monkeypatch):
    """The sweep's shapes per part, and per case the least summed time over its layers wins and is
    cached under the case's class (layer timings faked: the selection, not the GPU, is tested)."""
    from harness.bench import pruned_decode
    from harness.kernels import launch_settings as ls
    from harness.kernels import pruned_decode as kernel

    mask = torch.ones(pruned_decode.LAYERS, pruned_decode.HKV, pruned_decode.D)
    cases = pruned_decode.tune_cases(mask, ("pruned-wide",))
    assert [(c.shape, c.shape_class, len(c.kepts)) for c in cases] == [("64 x 2048", "short, head dim 256", 2)]
    assert [len(k[0]) for k in cases[0].kepts] == [256, 128] and len(cases[0].grid) == 24
    assert [c.shape_class for c in pruned_decode.tune_cases(mask, ("pruned",))] == ["long", "short"]

    def fake_times(kept, batch, context, geometry):  # fastest at 64-token blocks, 8 warps, 8 items per SM
        s = ls.OVERRIDE[kernel.KERNEL]
        us = len(kept[0]) * (1 + abs(s["BLOCK_N"] - 64) + abs(s["NUM_WARPS"] - 8) + abs(s["ITEMS_PER_SM"] - 8))
        return {"graph_ms": us / 1e3, "eager_ms": us / 1e3, "bytes": 1e6}

    monkeypatch.setattr(pruned_decode, "layer_times", fake_times)
    monkeypatch.setattr(kernel, "device_name", lambda device: "Fake GPU")
    monkeypatch.setenv(ls.ENV, str(tmp_path / "user.json"))
    ls.forget()
    try:
        rows = pruned_decode.tune(cases)
        best = [r for r in rows if r.get("best")]
        assert len(rows) == 24 and len(best) == 1 and best[0]["graph_us"] == (256 + 128) * 1.0
        chosen = ls.settings(kernel.KERNEL, "Fake GPU", "short, head dim 256")
        assert (chosen["BLOCK_N"], chosen["NUM_WARPS"], chosen["ITEMS_PER_SM"]) == (64, 8, 8)
        assert ls.settings(kernel.KERNEL, "Fake GPU", "short") == ls.DEFAULTS[kernel.KERNEL]  # other classes untouched
        assert kernel.KERNEL not in ls.OVERRIDE
    finally:
        ls.forget()


def test_report_escapes_cells():
    table = Table(
        title="t",
        columns=["op", "ms", "ratio"],
        labels={"ratio": "a | b"},
        rows=[{"op": "x | y\nz", "ms": 1.23456, "ratio": 0.5}, {"op": None, "ms": 2, "ratio": None}],
        notes=["a note"],
        formats={"ratio": "{:.0%}"},
    )
    text = table_markdown(table)
    assert "| op | ms | a \\| b |" in text
    assert "| x \\| y z | 1.235 | 50% |" in text
    assert "|  | 2 |  |" in text and "a note" in text
    assert "Skipped: no GPU" in table_markdown(Table("t", [], skipped="no GPU"))


def test_pruned_table_plumbing_without_a_gpu(monkeypatch):
    """The pruned-decode table's wrapper (mask, progress, targets, columns) around its GPU
    measurement, with the measurement replaced by fixed rows: no timing is asserted."""
    from harness.bench import pruned_decode
    from harness.progress import bars

    seen = {}

    def fake_measure(mask, shapes, layers, advance=None):
        seen.update(mask=mask, shapes=shapes, layers=list(layers))
        for _ in range(len(shapes) * len(seen["layers"])):
            advance()
        row = {"shape": "2 x 4096", "speedup": 1.5, "pruned_of_copy": 0.9}
        return [row, {**row, "speedup": 1.2}], 3000.0

    monkeypatch.setattr(pruned_decode, "measure", fake_measure)
    with bars(False) as bar:
        table = pruned_decode.run(mask_path=None, quick=True, bars=bar)
    assert tuple(seen["mask"].shape) == (32, 8, 128) and seen["layers"] == [0, 1, 2, 3]
    assert [r["target_met"] for r in table.rows] == [True, False]
    assert any("met at 1 of 2 shapes" in n for n in table.notes) and any("SYNTHETIC" in n for n in table.notes)
    assert set(table.columns) - {
        "layers",
        "bytes_ratio",
        "dense_us_per_layer",
        "pruned_us_per_layer",
        "eager_speedup",
        "pruned_gbps",
        "copy_gbps",
        "slowest_layer_us",
        "rel_error",
        "host_us_per_call",
        "append_us",
    } == {"shape", "speedup", "pruned_of_copy"}


def test_decode_profile_runs_on_cpu(tmp_path, no_gpu, capsys):
    """`python -m harness.bench.profile` on the zoo model: host figures per decode step (GPU ones are CUDA-only)."""
    from harness.bench import profile

    out = tmp_path / "profile.json"
    profile.main(
        ["--model", "llama", "--batch", "2", "--context", "96", "--steps", "3", "--top", "40", "--json", str(out)]
    )
    results = json.loads(out.read_text())
    # each model once, through generate (the table's static-loop run of the dense model is left out)
    assert set(results) == {"dense", "random mask (kept 0.5), static loop"}
    for r in results.values():
        # a wide top: which ops lead by host time varies with the machine's load (a CI run under load
        # once ranked unsqueeze and new_empty above the projections' mm)
        assert r["step_ms"] > 0 and r["gpu_busy_ms"] == 0 and len(r["top_host"]) == 40
        assert any(name == "aten::mm" and calls >= 1 for name, calls, _ in r["top_host"])  # the projections, per step
    assert "ms/step wall" in capsys.readouterr().out


def test_static_cache_generate_sizes_each_shape_on_its_own(no_gpu):
    """transformers keeps a StaticCache as long as the longest earlier one; SpeedSuite.measure resets
    that per measurement, so a short shape after a long one is measured with its own cache."""
    from harness.bench import end_to_end
    from harness.suites.speed import SpeedSuite

    case = end_to_end.llama_case("cpu", None, ((1, 160), (1, 40)))
    dense = case.variants["dense"].model
    static = end_to_end.shared_copy(dense)
    static.generation_config.cache_implementation = "static"
    static.generation_config.disable_compile = True
    case.variants = {"dense": end_to_end.Variant(dense), "dense, StaticCache": end_to_end.Variant(static)}
    rows = end_to_end.measure_case(case, SpeedSuite(new_tokens=2, warmup=0, repeats=1), None, "cpu")
    sizes = {(r["variant"], r["context"]): r["cache_bytes"] for r in rows}
    assert sizes["dense, StaticCache", 40] < sizes["dense, StaticCache", 160]
    assert sizes["dense, StaticCache", 40] <= 1.1 * sizes["dense", 40]  # not 160 + 2 slots


def test_capacity_search_bisects_to_the_largest_batch(monkeypatch):
    """The largest-batch search over a fake probe that fits up to 37 rows (no GPU involved)."""
    from harness.bench import capacity

    monkeypatch.setattr(capacity, "free_bytes", lambda: int(capacity.PREFILL_RESERVE + 50e6))
    monkeypatch.setattr(capacity, "row_bytes", lambda model, cap: int(1e6))  # estimate: 50 rows
    monkeypatch.setattr(capacity, "probe", lambda model, b, *a: 1000 + b if b <= 37 else None)
    model = type("M", (), {"config": type("C", (), {"vocab_size": 10})()})()
    found = capacity.largest_batch(model, context=8, new_tokens=2)
    assert found["batch"] == 37 and found["peak_bytes"] == 1037 and found["estimate"] == 50
    tried = [p["batch"] for p in found["probes"]]
    assert tried[0] == 50 and 37 in tried and 38 in tried and len(tried) < 12
    monkeypatch.setattr(capacity, "probe", lambda model, b, *a: 1 if b <= 80 else None)
    assert capacity.largest_batch(model, context=8, new_tokens=2)["batch"] == 80  # grows past the estimate


def test_tune_table_plumbing_without_a_gpu(monkeypatch):
    """`harness bench --tune`'s table around its two sweeps, the sweeps replaced by fixed rows."""
    from harness.bench import linear_decode, pruned_decode
    from harness.kernels import pruned_decode as kernel
    from harness.progress import bars

    monkeypatch.setattr(kernel, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(
        pruned_decode,
        "tune",
        lambda cases, advance=None: [
            {"shape": "2 x 4096", "class": "short", "BLOCK_N": 128, "graph_us": 10.0, "best": True}
        ],
    )
    monkeypatch.setattr(
        linear_decode,
        "tune_decode",
        lambda quick, advance=None: [
            {"d_k": 128, "BLOCK_V": 32, "NUM_WARPS": 4, "delta_us": 50.0, "gated_us": 51.0, "best": True},
            {"d_k": 128, "BLOCK_V": 64, "NUM_WARPS": 4, "delta_us": 60.0, "gated_us": 61.0},
        ],
    )
    with bars(False) as bar:
        table = pruned_decode.tune_table(None, quick=True, bars=bar)
    assert [r["kernel"] for r in table.rows] == ["pruned_decode", "delta_decode", "delta_decode"]
    assert "Fake GPU" in table.title and {"kernel", "d_k", "BLOCK_V", "delta_us"} <= set(table.columns)
    assert any("d_k 128: BLOCK_V 32, 4 warps, 50.0 + 51.0 us" in n for n in table.notes)


def test_static_loop_profile_runs_on_cpu(tmp_path, no_gpu, capsys):
    """`--engine static`: wall and GPU-busy time per step of each static-loop variant (no kernels on CPU: busy 0)."""
    from harness.bench import profile

    out = tmp_path / "static.json"
    profile.main(
        [
            "--model",
            "deltanet",
            "--batch",
            "2",
            "--context",
            "40",
            "--steps",
            "3",
            "--engine",
            "static",
            "--json",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert set(results) == {"dense, static loop", "pruned (d_k 32 -> 16), static loop"}
    for r in results.values():
        assert r["step_ms"] > 0 and r["gpu_busy_ms"] == 0 and r["busy_share"] == 0
    assert "GPU busy 0.00 ms/step (0%)" in capsys.readouterr().out
