"""End to end on a shipped DeltaNet (deltanet-tiny: every layer linear, so kept ratios are exact): run,
reuse, crash safety, save."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import harness
from harness.store import COMPLETE, FAILED, ResultStore
from harness.suites.ppl import PerplexitySuite

FAST = {"ppl": {"limit": 2048}}
MODEL = "deltanet-tiny"


def ppl_of(report, method):
    return next(r["value"] for r in report.rows if r["method"] == method and r["metric"] == "ppl")


def test_run_then_rerun_reuses(tmp_path):
    store = tmp_path / "r.sqlite"
    first = harness.run(
        model=MODEL, method="random", ratios=[0.5], suites=["ppl"], suite_params=FAST, store=store, progress=False
    )
    assert first.computed == 4 and first.reused == 0  # dense + pruned, each: compression + ppl
    dense, pruned = ppl_of(first, "dense"), ppl_of(first, "random")
    assert 1 < dense < pruned
    kept = next(r["value"] for r in first.rows if r["method"] == "random" and r["metric"] == "kept_ratio")
    assert kept == 0.5
    again = harness.run(
        model=MODEL, method="random", ratios=[0.5], suites=["ppl"], suite_params=FAST, store=store, progress=False
    )
    assert again.computed == 0 and again.reused == 4
    assert ppl_of(again, "random") == pruned


def test_crash_keeps_finished_cells_and_marks_incomplete(tmp_path, monkeypatch):
    store = tmp_path / "r.sqlite"
    real_run = PerplexitySuite.run
    calls = []

    def flaky(self, model, tokenizer, ctx):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the second cell")
        return real_run(self, model, tokenizer, ctx)

    monkeypatch.setattr(PerplexitySuite, "run", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        harness.run(
            model=MODEL, method="random", ratios=[0.5], suites=["ppl"], suite_params=FAST, store=store, progress=False
        )
    rows = ResultStore(store).table()
    status = {(r["method"], r["suite"]): r["status"] for r in rows}
    assert status[("dense", "ppl")] == COMPLETE and status[("random", "compression")] == COMPLETE
    assert status[("random", "ppl")] == FAILED
    assert "simulated crash" in next(r["error"] for r in rows if r["status"] == FAILED)

    monkeypatch.setattr(PerplexitySuite, "run", real_run)
    rerun = harness.run(
        model=MODEL, method="random", ratios=[0.5], suites=["ppl"], suite_params=FAST, store=store, progress=False
    )
    assert rerun.computed == 1 and rerun.reused == 3


def test_save_writes_a_plain_checkpoint(tmp_path):
    report = harness.run(
        model=MODEL,
        method="drrqr",
        ratios=[0.75],
        suites=["ppl"],
        suite_params=FAST,
        store=tmp_path / "r.sqlite",
        save=tmp_path / "out",
        progress=False,
    )
    (folder,) = report.saved
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.expand_k * model.config.hidden_size / model.config.num_heads == 8
    loaded = harness.load_model(folder)
    ids = torch.randint(0, 2000, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    # the saved model scores the same held-out ppl as the in-pipeline pruned model
    suite = PerplexitySuite(limit=2048)
    from harness.suite import SuiteContext

    ctx = SuiteContext("deltanet", "cpu", 0, tmp_path, lambda d, t: lambda n=1: None)
    (ppl, _nll) = suite.run(loaded.model, loaded.tokenizer, ctx)
    assert ppl.value == pytest.approx(ppl_of(report, "drrqr"), rel=1e-5)


@pytest.mark.parametrize("model", ["deltanet-tiny", "gated-deltanet-tiny"])
def test_drrqr_beats_random_on_the_trained_models(model, tmp_path):
    """The calibration path end to end: if capture broke (wrong tensors, no hooks fired), DRRQR
    would select blindly and lose its clear lead over Random at half the key channels."""
    store = tmp_path / "r.sqlite"
    fast = {"ppl": {"limit": 4096}}
    drrqr = harness.run(
        model=model, method="drrqr", ratios=[0.5], suites=["ppl"], suite_params=fast, store=store, progress=False
    )
    rand = harness.run(
        model=model, method="random", ratios=[0.5], suites=["ppl"], suite_params=fast, store=store, progress=False
    )
    assert ppl_of(drrqr, "dense") < ppl_of(drrqr, "drrqr") < 0.9 * ppl_of(rand, "random")


def test_lora_recovery_rows_beside_pruned_rows(tmp_path):
    from harness.recovery import LoraSpec

    store = tmp_path / "r.sqlite"
    lora = LoraSpec(steps=3, batch_size=2, seq_len=64)
    cell = dict(model=MODEL, method="random", ratios=[0.5], suites=["ppl"], suite_params=FAST, store=store, lora=lora)
    first = harness.run(**cell, progress=False, save=tmp_path / "out")
    stages = {(r["method"], r["recovery"]) for r in first.rows if r["metric"] == "ppl"}
    assert stages == {("dense", "none"), ("random", "none"), ("random", "lora")}
    assert first.computed == 6
    assert sorted(p.rsplit("/", 1)[-1] for p in first.saved) == [
        "deltanet-tiny-random-0.5",
        "deltanet-tiny-random-0.5-lora",
    ]
    again = harness.run(**cell, progress=False)
    assert again.computed == 0 and again.reused == 6
    rows = ResultStore(store).table(recovery="lora")
    assert rows and all(r["status"] == COMPLETE for r in rows)
