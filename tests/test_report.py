"""The results table: stable columns and number formats."""
from harness.report import _fmt, pivot


def test_report_table_is_stable_whatever_the_source():
    fresh = [{"model": "m", "method": "x", "ratio": 0.5, "suite": "ppl", "metric": "ppl", "value": 3},
             {"model": "m", "method": "x", "ratio": 0.5, "suite": "compression", "metric": "kept_ratio", "value": 0.5}]
    columns, rows = pivot(fresh)
    assert columns == sorted(columns) == ["compression.kept_ratio", "ppl.ppl"]
    assert columns == pivot(list(reversed(fresh)))[0]
    assert _fmt(65536) == _fmt(65536.0) == "65536" and _fmt(56.8312) == "56.83" and _fmt(0.5) == "0.5"


def test_breakdown_metrics_show_only_when_asked():
    rows = [{"model": "m", "method": "x", "ratio": 0.5, "suite": "state-rank", "metric": "u_final_mean", "value": 0.2},
            {"model": "m", "method": "x", "ratio": 0.5, "suite": "state-rank", "metric": "u_final/L0H1", "value": 0.3}]
    assert pivot(rows)[0] == ["state-rank.u_final_mean"]
    assert pivot(rows, detail=True)[0] == ["state-rank.u_final/L0H1", "state-rank.u_final_mean"]
