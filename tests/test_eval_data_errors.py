"""Malformed, short or oddly spelt dataset folders (review findings 3 and 4): every error names the
file and what is wrong with it, records that cannot be used are left out with a note instead of
crashing or being cut into overlapping pieces, a broken IMU folder costs only the IMU part, and
person ids and recording dates are compared in one spelling.

Folders are cut in tmp_path from the committed real-data fixtures (tests/fixtures/minidata,
tests/fixtures/imu_models/data); nothing here needs ../shared.
"""
from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from training.data.ecg import DataError, WindowSet, load_all, load_ecgid, load_ludb, load_mitdb

ROOT = Path(__file__).resolve().parents[1]
MINIDATA = ROOT / "tests" / "fixtures" / "minidata"
IMU_DATA = ROOT / "tests" / "fixtures" / "imu_models" / "data"
MODELS = ROOT / "daemon" / "models"


def _ecgid(dst: Path, persons: tuple[int, ...] = (26, 34),
           edit: Callable[[dict, dict], None] | None = None) -> Path:
    """``dst/ecgid/`` holding the fixture's recordings of ``persons``; ``edit(meta, arrays)`` may
    break them before they are written. Returns ``dst``."""
    meta = json.loads((MINIDATA / "ecgid" / "metadata.json").read_text())
    z = np.load(MINIDATA / "ecgid" / "ecgid.npz")
    keep = [i for i, r in enumerate(meta["records"]) if int(r["person"]) in persons]
    meta = {**meta, "records": [dict(meta["records"][old], index=new) for new, old in enumerate(keep)]}
    arrays = {"signals": z["signals"][keep], "person": z["person"][keep]}
    if edit is not None:
        edit(meta, arrays)
    (dst / "ecgid").mkdir(parents=True, exist_ok=True)
    np.savez(dst / "ecgid" / "ecgid.npz", **arrays)
    (dst / "ecgid" / "metadata.json").write_text(json.dumps(meta))
    return dst


def _mitdb(dst: Path, seconds: float) -> Path:
    """``dst/mitdb/``: the fixture's record 208 cut to its first ``seconds``."""
    meta = json.loads((MINIDATA / "mitdb" / "metadata.json").read_text())
    z = np.load(MINIDATA / "mitdb" / "mitdb.npz")
    n = int(seconds * meta["records"][0]["fs"])
    (dst / "mitdb").mkdir(parents=True, exist_ok=True)
    np.savez(dst / "mitdb" / "mitdb.npz", sig_208=z["sig_208"][:n])
    (dst / "mitdb" / "metadata.json").write_text(json.dumps(
        {**meta, "records": [{**meta["records"][0], "n_samples": n}]}))
    return dst


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------- finding 3: ECG loaders
def _no_fs(meta: dict, arrays: dict) -> None:
    del meta["fs_hz"]


def _no_signals(meta: dict, arrays: dict) -> None:
    arrays["sig"] = arrays.pop("signals")


def _one_signal_short(meta: dict, arrays: dict) -> None:
    arrays["signals"] = arrays["signals"][:-1]


def _index_beyond(meta: dict, arrays: dict) -> None:
    meta["records"][1]["index"] = 99


@pytest.mark.parametrize("edit, file, what", [
    (_no_fs, "metadata.json", "'fs_hz'"),
    (_no_signals, "ecgid.npz", "'signals'"),
    (_one_signal_short, "metadata.json", "lists 6 records but"),
    (_index_beyond, "metadata.json", "index 99"),
])
def test_malformed_ecgid_folder_is_a_data_error_naming_file_and_problem(tmp_path, edit, file, what):
    folder = _ecgid(tmp_path, edit=edit)
    with pytest.raises(DataError) as err:
        load_all(folder)
    assert str(tmp_path / "ecgid" / file) in str(err.value) and what in str(err.value)


def test_truncated_metadata_and_the_command_line_give_one_line_naming_the_file(tmp_path, capsys):
    from training.eval.__main__ import main as eval_main

    folder = _ecgid(tmp_path)
    meta_path = folder / "ecgid" / "metadata.json"
    meta_path.write_text(meta_path.read_text()[:100])
    with pytest.raises(DataError, match="metadata.json: not valid JSON"):
        load_ecgid(folder)
    assert eval_main(["models", "--data", str(folder), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and str(meta_path) in err and "not valid JSON" in err


def test_ludb_gain_and_mitdb_fields_are_checked_against_the_files(tmp_path):
    shutil.copytree(MINIDATA / "ludb", tmp_path / "ludb")
    z = dict(np.load(tmp_path / "ludb" / "ludb.npz"))
    z["adc_gain"] = z["adc_gain"][:1]  # one gain row for two records
    np.savez(tmp_path / "ludb" / "ludb.npz", **z)
    with pytest.raises(DataError, match=r"ludb[/\\]metadata.json: record #1 .*index 1"):
        load_ludb(tmp_path)
    _mitdb(tmp_path / "m", 60.0)
    _edit_json(tmp_path / "m" / "mitdb" / "metadata.json", lambda m: m["records"][0].pop("fs"))
    with pytest.raises(DataError, match=r"mitdb[/\\]metadata.json: record 208: no 'fs' field"):
        load_mitdb(tmp_path / "m")


def test_mitdb_record_too_short_is_skipped_and_a_short_one_never_cut_into_overlaps(tmp_path):
    with warnings.catch_warnings(record=True) as said:  # without a notes list: a warning
        warnings.simplefilter("always")
        assert load_mitdb(_mitdb(tmp_path / "five", 5.0)) == []
    assert [str(w.message) for w in said if "208 is 5.0 s, shorter than one 10 s segment: skipped" in str(w.message)]
    notes: list[str] = []
    recs = load_mitdb(_mitdb(tmp_path / "twelve", 12.0), notes=notes)  # room for one piece, not 6
    assert [r.record for r in recs] == ["208@0"] and recs[0].duration_s == 10.0
    assert "1 non-overlapping 10 s segments instead of 6" in notes[0]
    notes.clear()
    recs = load_mitdb(MINIDATA, notes=notes)  # 60 s: the 6 pieces fit side by side, no note
    starts = [int(r.record.split("@")[1]) for r in recs]
    assert len(recs) == 6 and np.all(np.diff(starts) >= 3600) and notes == []


# ---------------------------------------------------------------- finding 3: IMU part
def _hugadb_with_one_recording_too_many(dst: Path) -> Path:
    shutil.copytree(IMU_DATA / "hugadb", dst / "hugadb")
    _edit_json(dst / "hugadb" / "metadata.json",
               lambda m: m["recordings"].append(dict(m["recordings"][-1])))
    return dst


def test_hugadb_metadata_not_matching_its_npz_is_a_data_error_naming_both(tmp_path):
    from training.data.imu import load_hugadb

    folder = _hugadb_with_one_recording_too_many(tmp_path) / "hugadb"
    with pytest.raises(DataError) as err:
        load_hugadb(folder)
    msg = str(err.value)
    assert str(folder / "metadata.json") in msg and str(folder / "hugadb.npz") in msg
    assert "lists 15 recordings" in msg


def test_broken_imu_folder_keeps_the_finished_ecg_results_and_notes(tmp_path, capsys):
    """The ECG part is printed and written to the JSON; the IMU part reports what is wrong;
    the MIT-BIH record too short for a test is left out with a note, not a crash."""
    from training.eval.__main__ import main as eval_main

    folder = _hugadb_with_one_recording_too_many(_mitdb(_ecgid(tmp_path / "d"), 5.0))
    out_json = tmp_path / "r.json"
    assert eval_main(["models", "--data", str(folder), "--bootstrap", "0", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "ECG identity (2 persons evaluated" in out and "id10s_rank1" in out
    assert "error: IMU part:" in out and "hugadb.npz" in out
    assert out.index("id10s_rank1") < out.index("error: IMU part:")
    res = json.loads(out_json.read_text())
    assert res["ecg"]["int8"]["id10s_n_gallery"] == 2
    assert "lists 15 recordings" in res["imu"]["error"]
    assert any("208 is 5.0 s" in n for n in res["ecg"]["notes"])
    assert "id10s_never_enrolled_n" not in res["ecg"]["int8"]  # nobody left to be never-enrolled


def test_sisfall_subject_missing_from_subjects_costs_only_that_subject(tmp_path):
    from training.data.imu import load_sisfall
    from training.eval.imu import evaluate_imu

    shutil.copytree(IMU_DATA, tmp_path / "d")
    meta_path = tmp_path / "d" / "sisfall" / "metadata.json"
    _edit_json(meta_path, lambda m: m["subjects"].pop("SA03"))
    res = evaluate_imu(tmp_path / "d", MODELS)
    assert res["gender"]["persons"] == ["SA10", "SE07"] and "int8" in res["age"]
    assert "int8" in res["activity"] and res["activity"]["persons"] == ["11", "16", "8"]
    said = f"{meta_path}: subject SA03 is not in 'subjects' (no age/sex): its recordings are skipped"
    assert res["notes"] == [said]  # said once, although three evaluations read the folder
    notes: list[str] = []
    assert "SA03" not in {r.subject for r in load_sisfall(tmp_path / "d" / "sisfall", notes=notes)}
    assert notes == [said]


# ---------------------------------------------------------------- finding 4: ids and dates
def test_person_ids_are_spelt_one_way_by_loaders_and_manifest(tmp_path):
    from daemon.inference.manifest import load_manifest
    from training.data.imu import load_hugadb
    from training.eval.models import ECG_MODEL, training_persons

    shutil.copytree(MINIDATA / "ludb", tmp_path / "ludb")
    _edit_json(tmp_path / "ludb" / "metadata.json",
               lambda m: m["records"][0].update(record="data/05"))  # LUDB 5 trained the model
    seen = training_persons(load_manifest(MODELS / f"{ECG_MODEL}.json"))
    persons = [r.person for r in load_ludb(tmp_path)]
    assert persons == ["ludb:5", "ludb:80"]
    assert {"ludb:5", "ecgid:01", "gudb_rpeaks:3"} <= seen
    assert set(persons) & seen == {"ludb:5"}  # excluded by the evaluation, not scored as unseen

    def zero_padded(meta: dict) -> None:  # HuGaDB person 8 written "08"
        for r in meta["recordings"]:
            if str(r["subject"]) == "8":
                r["subject"] = "08"
        meta["subjects"]["08"] = meta["subjects"].pop("8")

    shutil.copytree(IMU_DATA / "hugadb", tmp_path / "imu" / "hugadb")
    _edit_json(tmp_path / "imu" / "hugadb" / "metadata.json", zero_padded)
    recs, _ = load_hugadb(tmp_path / "imu" / "hugadb")
    assert {r.subject for r in recs} == {"8", "11", "16"}  # as the activity manifest spells them


def test_recording_dates_are_parsed_and_an_unknown_date_is_never_cross_date(tmp_path):
    from training.eval.identity import gallery_and_tests

    def dates(meta: dict, arrays: dict) -> None:
        by = {r["record"]: r for r in meta["records"]}
        by["Person_02/rec_2"]["ecg_date"] = "7.12.2004"  # the enrolment's date, spelt otherwise
        by["Person_02/rec_4"]["ecg_date"] = "unknown"
        del by["Person_26/rec_2"]["ecg_date"]
        by["Person_26/rec_3"]["ecg_date"] = ""

    with warnings.catch_warnings(record=True) as said:  # without a notes list: warnings
        warnings.simplefilter("always")
        recs = load_ecgid(_ecgid(tmp_path, (2, 26), dates))
    assert [r.session for r in recs] == ["07.12.2004", "07.12.2004", "", "12.05.2005", "", ""]
    assert sum("no readable ecg_date" in str(w.message) for w in said) == 3
    rec = np.repeat(np.arange(len(recs)), 18)
    ends = np.tile(np.arange(3.0, 21.0), len(recs))
    ws = WindowSet(np.zeros((len(rec), 1, 3), np.float32), np.ones((len(rec), 3), bool), rec, ends,
                   tuple(recs))
    emb = np.random.default_rng(0).normal(size=(len(rec), 4)).astype(np.float32)
    _, _, short = gallery_and_tests(ws, emb, 10)
    assert len(short.cross) == 8 and not short.cross.any()
    _, _, long = gallery_and_tests(ws, emb, 30)
    assert len(long.person) == 0  # two recordings of unknown date are never pooled as one date
