"""The results table: stable columns and number formats."""
from harness.report import _fmt, pivot


def test_report_table_is_stable_whatever_the_source():
    fresh = [{"model": "m", "method": "x", "ratio": 0.5, "suite": "ppl", "metric": "ppl", "value": 3},
             {"model": "m", "method": "x", "ratio": 0.5, "suite": "compression", "metric": "kept_ratio", "value": 0.5}]
    columns, rows = pivot(fresh)
    assert columns == sorted(columns) == ["compression.kept_ratio", "ppl.ppl"]
    assert columns == pivot(list(reversed(fresh)))[0]
    assert _fmt(65536) == _fmt(65536.0) == "65536" and _fmt(56.8312) == "56.83" and _fmt(0.5) == "0.5"
