"""state-rank's acceptance on deltanet-tiny: pruning half of the key channels with DRRQR
raises the rank utilization of the recurrent state (the same information in a smaller d_k)."""

from __future__ import annotations

import pytest

from harness.compress import plan
from harness.progress import bars
from harness.suite import SuiteContext
from harness.suites.state_rank import StateRankSuite
from harness.zoo.train import fixed_threads


@pytest.mark.slow
def test_drrqr_half_pruned_deltanet_uses_more_of_its_state(tmp_path):
    suite = StateRankSuite(num_sequences=4, seq_len=128, plots=False)
    with fixed_threads(1):  # tiny model: extra threads only add hand-off cost on a shared machine
        p = plan("deltanet-tiny", "drrqr", [0.5])
        with bars(False) as bar:
            pruned, _ = p.compress(p.capture(bar), 0.5, bar)
        summaries = {}
        for label, model in (("dense", p.loaded.model), ("pruned", pruned)):
            ctx = SuiteContext(p.loaded.family, "cpu", 0, tmp_path / label, lambda _d, _t: lambda n=1: None)
            summaries[label] = {r.name: r for r in suite.run(model, p.loaded.tokenizer, ctx)}["u_final_mean"]
    assert [d[0] for d in summaries["dense"].details["dims"]] == [32] * 4  # d_k per layer
    assert [d[0] for d in summaries["pruned"].details["dims"]] == [16] * 4
    assert summaries["pruned"].value > summaries["dense"].value
