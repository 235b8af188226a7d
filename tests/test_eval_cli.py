"""The evaluation commands' command lines: nothing under docs/ is written unless a flag asks for
it, partial data folders are evaluated as far as they go (the rest skipped with a printed line),
and broken ones end in a one-line error with exit code 2, never a traceback.

Inputs are the committed fixtures (tests/fixtures/minidata, tests/fixtures/imu_models/data) or
folders cut from them in tmp_path; nothing here needs ../shared.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from training.eval.__main__ import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
MINIDATA = ROOT / "tests" / "fixtures" / "minidata"
IMU_DATA = ROOT / "tests" / "fixtures" / "imu_models" / "data"
MODELS = ROOT / "daemon" / "models"


def _generated_docs() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every committed file an evaluation command can generate."""
    files = [*(ROOT / "docs" / "models").glob("*.png"), *(ROOT / "docs" / "benchmarks").iterdir()]
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.is_file()}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty working folder; afterwards neither it nor the repo's docs/ got a file."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _generated_docs()
    yield work
    assert not (work / "docs").exists()
    assert _generated_docs() == before, "an evaluation command rewrote a committed docs/ file"


def _imu_folder(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / ("data_" + "_".join(names))
    for name in names:
        shutil.copytree(IMU_DATA / name, d / name)
    return d


# ---------------------------------------------------------------- no writes by default
def test_rpeaks_prints_and_writes_only_what_is_asked(in_tmp, tmp_path, capsys):
    args = ["rpeaks", "--data", str(MINIDATA), "--detectors", "biod", "--workers", "1",
            "--records", "208"]
    assert eval_main(args) == 0
    out = capsys.readouterr().out
    assert "# R-peak detection benchmark" in out and "| mitdb |" in out
    assert list(in_tmp.iterdir()) == []
    # asked for: the page, its figure (linked relative to the page) and the command that made it
    md, png = tmp_path / "pages" / "rpeaks.md", tmp_path / "pages" / "rpeaks_example.png"
    assert eval_main(args + ["--md", str(md), "--plot", str(png)]) == 0
    page = md.read_text()
    assert f"--md {md} --plot {png}" in page.split("Command: ", 1)[1].splitlines()[0]
    assert "![example](rpeaks_example.png)" in page
    assert png.stat().st_size > 1000


def test_models_on_imu_only_folder_skips_ecg_and_writes_no_figure(in_tmp, tmp_path, capsys):
    data = _imu_folder(tmp_path, "hugadb", "sisfall")
    assert eval_main(["models", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    # no ECG record at all: said so, not "no persons left after excluding training persons"
    assert "skipped: ECG part" in out and "no ECG records found" in out
    assert "activity.int8.top_macro_f1" in out and "gender.int8.subject_accuracy" in out
    assert list(in_tmp.iterdir()) == []


def test_imu_with_one_dataset_evaluates_it_and_skips_the_rest(in_tmp, tmp_path, capsys):
    from training.eval.imu import main as imu_main

    out_json = tmp_path / "imu.json"
    assert imu_main(["--data", str(_imu_folder(tmp_path, "hugadb")), "--models", str(MODELS),
                     "--json", str(out_json)]) == 0
    err = capsys.readouterr().err
    assert "skipped: gender: no sisfall/ folder" in err and "skipped: age:" in err
    assert "skipped: activity_from_motion:" in err
    res = json.loads(out_json.read_text())
    assert set(res["activity"]["persons"]) == {"8", "11", "16"} and "int8" in res["activity"]
    assert "skipped" in res["gender"]
    # and the other way round
    assert imu_main(["--data", str(_imu_folder(tmp_path, "sisfall")), "--models", str(MODELS)]) == 0
    captured = capsys.readouterr()
    assert "skipped: activity: no hugadb/ folder" in captured.err
    assert json.loads(captured.out)["gender"]["persons"] == ["SA03", "SA10", "SE07"]


def test_throughput_writes_its_page_only_with_md(in_tmp, tmp_path, monkeypatch, capsys):
    import training.eval.throughput as tp

    row = {"signal_s": 60.0, "wall_s": 0.1, "x_realtime": 600.0, "cpu_s": 0.1,
           "tracemalloc_peak_mib": 1.0, "ru_maxrss_mib": 50.0}
    monkeypatch.setattr(tp, "_spawn", lambda spec: dict(row))  # no timed worker processes
    assert tp.main(["--no-neurokit", "--minutes", "1"]) == 0
    assert list(in_tmp.iterdir()) == []
    md = tmp_path / "t" / "throughput.md"
    assert tp.main(["--no-neurokit", "--minutes", "1", "--md", str(md)]) == 0
    assert f"--md {md}`" in md.read_text()
    # a folder with SisFall but no LUDB: the IMU rows only, the ECG ones skipped with a line
    assert tp.main(["--data", str(_imu_folder(tmp_path, "sisfall")), "--no-neurokit"]) == 0
    out = capsys.readouterr().out
    assert "skipped: ECG path" in out and "IMU path" in out
    assert tp.main(["--data", str(tmp_path / "nope")]) == 2


def test_soak_and_latency_pages_only_with_md_and_their_command_regenerates_them(
        in_tmp, tmp_path, monkeypatch):
    import training.eval.soak as soak
    from training.eval.latency import command as latency_command

    r = {"speed": 20.0, "wall_minutes": 0.1, "signal_hours": 0.03, "wearing_sessions": 2,
         "rss_mb_after_warmup": 100.0, "rss_mb_end": 100.0, "rss_mb_max": 100.0,
         "rss_growth_mb_per_signal_hour": 0.0, "rss_growth_mb_per_signal_hour_second_half": 0.0,
         "cpu_percent_of_one_core": 10.0, "events_new": 1, "error_lines": []}
    monkeypatch.setattr(soak, "soak", lambda minutes, speed, tmp: dict(r))
    assert soak.main(["--minutes", "0.1", "--speed", "20"]) == 0
    assert list(in_tmp.iterdir()) == []
    md = tmp_path / "s" / "soak.md"
    assert soak.main(["--minutes", "10", "--speed", "20", "--md", str(md)]) == 0
    assert f"Command: `python -m training.eval soak --minutes 10 --speed 20 --md {md}`" in md.read_text()
    ns = argparse.Namespace(speeds=[1.0, 20.0], cycles=2, json=Path("docs/benchmarks/latency.json"),
                            md=Path("docs/benchmarks/latency.md"))
    assert latency_command(ns) == ("python -m training.eval latency --speeds 1 20 --cycles 2 "
                                   "--json docs/benchmarks/latency.json --md docs/benchmarks/latency.md")


# ---------------------------------------------------------------- broken folders: exit 2
def test_rpeaks_metadata_without_npz_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "ludb").mkdir()
    shutil.copy(MINIDATA / "ludb" / "metadata.json", tmp_path / "ludb" / "metadata.json")
    assert eval_main(["rpeaks", "--data", str(tmp_path), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "ludb.npz is missing" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_models_incomplete_ecg_folder_and_nothing_to_evaluate_exit_2(tmp_path, capsys):
    (tmp_path / "a" / "ludb").mkdir(parents=True)
    shutil.copy(MINIDATA / "ludb" / "metadata.json", tmp_path / "a" / "ludb" / "metadata.json")
    assert eval_main(["models", "--data", str(tmp_path / "a")]) == 2
    assert "ludb.npz is missing" in capsys.readouterr().err
    shutil.copytree(MINIDATA / "gudb_rpeaks", tmp_path / "b" / "gudb_rpeaks")  # no ECG, no IMU
    assert eval_main(["models", "--data", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "nothing to evaluate" in err and "Traceback" not in err


def test_imu_and_gait_without_any_imu_data_exit_2(tmp_path, capsys):
    from training.eval.gait_identity import main as gait_main
    from training.eval.imu import main as imu_main

    assert imu_main(["--data", str(tmp_path), "--models", str(MODELS)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert gait_main(["--data", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------- one enrolled person
def _one_ecg_person(tmp: Path, person: int = 2) -> Path:
    """ECG-ID records of one held-out person of the fixture (3 recordings: 10 s and 3 s tests)."""
    d = tmp / "one" / "ecgid"
    d.mkdir(parents=True)
    meta = json.loads((MINIDATA / "ecgid" / "metadata.json").read_text())
    z = np.load(MINIDATA / "ecgid" / "ecgid.npz")
    keep = [i for i, r in enumerate(meta["records"]) if int(r["person"]) == person]
    assert len(keep) >= 2
    recs = [dict(meta["records"][old], index=new) for new, old in enumerate(keep)]
    m = np.isin(z["ann_record"], keep)
    remap = {old: new for new, old in enumerate(keep)}
    np.savez(d / "ecgid.npz", signals=z["signals"][keep], person=z["person"][keep],
             ann_record=np.array([remap[int(x)] for x in z["ann_record"][m]], np.int16),
             ann_sample=z["ann_sample"][m], ann_symbol=z["ann_symbol"][m])
    (d / "metadata.json").write_text(json.dumps({**meta, "records": recs}))
    return tmp / "one"


def test_models_with_one_enrolled_person_reports_no_impostor_metrics(in_tmp, tmp_path, capsys):
    out_json = tmp_path / "m.json"
    # the default person bootstrap must not crash on it either
    assert eval_main(["models", "--data", str(_one_ecg_person(tmp_path)), "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "note: only 1 enrolled person" in captured.out
    assert "skipped: IMU part" in captured.out
    ecg = json.loads(out_json.read_text())["ecg"]
    for kind in ("int8", "float"):
        m = ecg[kind]
        assert m["id10s_n_gallery"] == 1 and m["id10s_n_tests"] > 0
        for key in ("id10s_eer", "id10s_frr_at_far1", "id10s_far_at_thr", "id10s_rank1",
                    "id3s_eer", "gated_id10s_eer", "cnn_only_id10s_eer"):
            assert key not in m, key
    assert ecg.get("bootstrap", {}) == {}
    assert any("fewer than 2" in n for n in ecg["notes"])


def test_identity_metrics_and_bootstrap_on_degenerate_galleries():
    from training.eval.identity import Tests, identity_metrics, person_bootstrap

    rng = np.random.default_rng(0)
    tmpl = rng.normal(size=(1, 4))
    tests = Tests(rng.normal(size=(3, 4)), np.array(["a"] * 3), np.array([False, True, True]))
    m = identity_metrics(["a"], tmpl, tests, threshold=0.5)
    assert m["n_tests"] == 3 and m["n_gallery"] == 1 and "frr_at_thr" in m
    assert not {"rank1", "eer", "frr_at_far1", "far_at_thr", "cross_eer"} & set(m)
    assert person_bootstrap(["a"], {"int8": (tmpl, tests)}, n_boot=10) == {}
    # a gallery of two with no test of this length (e.g. no 30 s test): nothing, no crash
    none = Tests(np.zeros((0, 4)), np.zeros(0, str), np.zeros(0, bool))
    two = rng.normal(size=(2, 4))
    assert identity_metrics(["a", "b"], two, none) == {}
    assert person_bootstrap(["a", "b"], {"int8": (two, none), "float": (two, none)},
                            (("int8", "float"),), n_boot=10) == {}
