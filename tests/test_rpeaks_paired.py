"""The record-bootstrap F1 differences of ``python -m training.eval rpeaks``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.eval.__main__ import main as eval_main
from training.eval.rpeaks import paired_f1

MINIDATA = Path(__file__).resolve().parent / "fixtures" / "minidata"


def _rec(tp: int, fn: int, fp: int) -> dict:
    return {"tp": tp, "fn": fn, "fp": fp}


def test_paired_f1_point_is_the_pooled_difference_and_the_interval_resamples_records() -> None:
    # detector a loses 50 beats in record r0 only; everywhere else both are perfect
    a = {"r0": _rec(50, 50, 0), "r1": _rec(100, 0, 0), "r2": _rec(100, 0, 0), "r3": _rec(100, 0, 0)}
    b = {k: _rec(100, 0, 0) for k in a}
    out = paired_f1({"a": a, "b": b}, "a", "b", n_boot=2000, seed=0)
    f1_a = 100.0 * 2 * 350 / (2 * 350 + 50)
    assert out["diff"] == pytest.approx(f1_a - 100.0)
    assert out["records"] == 4
    # a draw without r0 (p = (3/4)^4 = 0.32) shows no difference: the interval reaches 0 ...
    assert out["hi"] == pytest.approx(0.0)
    # ... and one with r0 several times a larger loss than the pooled one
    assert out["lo"] < out["diff"] < 0.0
    assert paired_f1({"a": a, "b": a}, "a", "b") == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "records": 4}
    # a record missing for one detector: no comparison rather than a biased one
    assert paired_f1({"a": a, "b": {"r0": _rec(1, 0, 0)}}, "a", "b") is None


def test_eval_rpeaks_reports_the_paired_differences(tmp_path: Path, capsys) -> None:
    out_json, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = eval_main(["rpeaks", "--data", str(MINIDATA), "--detectors", "biod", "neurokit2",
                    "--workers", "1", "--md", str(md), "--plot", "", "--json", str(out_json)])
    assert rc == 0
    assert "biod minus each peer: F1 difference" in md.read_text()
    res = json.loads(out_json.read_text())
    cell = res["paired_f1_biod_minus_peer"]["ludb_I"]["neurokit2"]
    summ = res["summary"]["ludb_I"]
    assert cell["records"] == 2
    assert cell["diff"] == pytest.approx(summ["biod"]["raw"]["f1"] - summ["neurokit2"]["raw"]["f1"], abs=2e-3)
    assert cell["lo"] <= cell["diff"] <= cell["hi"]
