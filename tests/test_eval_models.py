"""`python -m training.eval models` on the tiny real-data fixture folder."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from training.eval.__main__ import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
MINIDATA = ROOT / "tests" / "fixtures" / "minidata"


def test_eval_models_on_fixture_prints_metrics(tmp_path, capsys):
    out_json = tmp_path / "m.json"
    rc = eval_main(["models", "--data", str(MINIDATA), "--json", str(out_json),
                    "--out-figures", str(tmp_path / "fig")])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("id10s_rank1", "id10s_eer", "id10s_frr_at_far1", "id3s_rank1", "id30s_never_enrolled_far_at_thr",
                 "id10s_cross_rank1", "id10s_never_enrolled_far_at_thr", "activity_accuracy",
                 "activity_macro_f1", "ms_per_window_1core", "float", "int8", "IMU"):
        assert name in text, name
    res = json.loads(out_json.read_text())
    ecg = res["ecg"]
    # all 3 ECG-ID + 2 LUDB + 1 MIT-BIH persons of the fixture are held out, none excluded
    assert ecg["persons_evaluated"] == 6
    for kind in ("float", "int8"):
        assert ecg[kind]["id10s_n_gallery"] == 3
        # each fixture person's two test recordings are of different dates: no 30 s test pools them
        assert "id30s_rank1" not in ecg[kind] and ecg[kind]["id30s_never_enrolled_n"] > 0
        assert 0.0 <= ecg[kind]["id10s_rank1"] <= 100.0
        assert ecg[kind]["activity_n"] > 0
    assert ecg["int8"]["ms_per_window_1core"] > 0  # measured and reported (its size is the benchmark's business)
    # The daemon enrols and identifies only from windows that pass quality for identity (the
    # full gate but EMG and template mismatch): the eval scores that too. The fixture's noisy
    # stretches lose some windows, and with them some of the 3 s tests.
    assert 0 < ecg["windows_identity_rejected"] <= ecg["windows_quality_rejected"] < ecg["windows"]
    for kind in ("float", "int8"):
        assert ecg[kind]["gated_id3s_n_tests"] < ecg[kind]["id3s_n_tests"]
        assert 0.0 <= ecg[kind]["gated_id10s_rank1"] <= 100.0
    # person-bootstrap intervals (default 2000 draws): the paired int8 - float difference's
    # point is the difference of the two columns, and every interval is ordered
    boot = ecg["bootstrap"]
    assert boot["id10s_int8_minus_float_rank1"] == pytest.approx(
        ecg["int8"]["id10s_rank1"] - ecg["float"]["id10s_rank1"])
    assert boot["id10s_int8_rank1_lo"] <= boot["id10s_int8_rank1_hi"]
    assert "95 % intervals over test persons" in text
    assert (tmp_path / "fig" / "ecg_identity_det.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "ecg_activity_confusion.png").stat().st_size > 1000


def test_eval_models_bad_folder_is_a_clear_error(tmp_path, capsys):
    rc = eval_main(["models", "--data", str(tmp_path / "nope")])
    assert rc == 2
    assert "not a folder" in capsys.readouterr().err


def test_eval_models_excludes_training_persons_by_their_recordings(tmp_path):
    """A recording the model trained on is left out under any number; a new person who happens
    to carry a training person's number is evaluated (found by review: a folder of other persons
    numbered from 1 lost every one of them, and with them every identity metric)."""
    from training.eval.models import DEFAULT_MODELS, ECG_MODEL, evaluate_ecg, training_persons
    from daemon.inference.manifest import load_manifest

    seen = training_persons(load_manifest(DEFAULT_MODELS / f"{ECG_MODEL}.json"))
    assert "ecgid:01" in seen and "ecgid:02" not in seen
    for number in (1, 40):  # person 1's own recording, under its number and under another
        with pytest.raises(ValueError, match="no ECG persons left"):
            evaluate_ecg(_one_recording(tmp_path / f"train{number}", number, training=True), DEFAULT_MODELS, None,
                         progress=lambda m: None)
    out = evaluate_ecg(_one_recording(tmp_path / "new1", 1, training=False), DEFAULT_MODELS, None,
                       progress=lambda m: None)
    assert out["persons_evaluated"] == 1 and out["persons_excluded_as_training"] == 0
    assert any("carry a training person's number but none of their recordings" in n for n in out["notes"])


def _one_recording(tmp: Path, number: int, training: bool) -> Path:
    """A folder holding one ECG-ID recording labelled person ``number``: ECG-ID person 1's first
    recording (a training recording, tests/fixtures/ecg) or held-out person 2's (minidata)."""
    d = tmp / "ecgid"
    d.mkdir(parents=True)
    meta = json.loads((MINIDATA / "ecgid" / "metadata.json").read_text())
    if training:
        z = np.load(ROOT / "tests" / "fixtures" / "ecg" / "ecgid_training_p01.npz")
        signals, rec = z["signals"][None], json.loads(str(z["record"]))
    else:
        signals, rec = np.load(MINIDATA / "ecgid" / "ecgid.npz")["signals"][:1], meta["records"][0]
    np.savez(d / "ecgid.npz", signals=signals, person=np.array([number], np.int16),
             ann_record=np.zeros(0, np.int16), ann_sample=np.zeros(0, np.int32), ann_symbol=np.zeros(0, "<U1"))
    (d / "metadata.json").write_text(json.dumps({**meta, "records": [dict(rec, person=number, index=0)]}))
    return tmp


def _unseen_folder(tmp: Path, renumber_gudb: dict[int, int], with_training_person: bool = False) -> Path:
    """ECG-ID persons 26 and 34 of the fixture (a gallery of two, and the beat donors), the
    fixture's gudb R-peak series of ``renumber_gudb``'s subjects under their new numbers, and,
    when asked, one recording labelled ECG-ID person 1 (a training person)."""
    d = tmp / "unseen"
    (d / "ecgid").mkdir(parents=True)
    meta = json.loads((MINIDATA / "ecgid" / "metadata.json").read_text())
    z = np.load(MINIDATA / "ecgid" / "ecgid.npz")
    keep = [i for i, r in enumerate(meta["records"]) if r["person"] in (26, 34)]
    recs = [dict(meta["records"][old], index=new) for new, old in enumerate(keep)]
    signals, person = z["signals"][keep], z["person"][keep]
    if with_training_person:  # ECG-ID person 1's own first recording (tests/fixtures/ecg)
        t = np.load(ROOT / "tests" / "fixtures" / "ecg" / "ecgid_training_p01.npz")
        signals, person = np.concatenate([signals, t["signals"][None]]), np.append(person, 1).astype(person.dtype)
        recs.append(dict(json.loads(str(t["record"])), index=len(recs)))
    np.savez(d / "ecgid" / "ecgid.npz", signals=signals, person=person)
    (d / "ecgid" / "metadata.json").write_text(json.dumps({**meta, "records": recs}))
    gmeta = json.loads((MINIDATA / "gudb_rpeaks" / "metadata.json").read_text())
    gz = np.load(MINIDATA / "gudb_rpeaks" / "gudb_rpeaks.npz")
    entries, arrays = [], {}
    for e in gmeta["entries"]:
        if e["subject"] in renumber_gudb:
            new = renumber_gudb[e["subject"]]
            kind = f"{e['experiment']}_{e['annotation']}"
            arrays[f"s{new:02d}_{kind}"] = gz[f"s{e['subject']:02d}_{kind}"]
            entries.append({**e, "subject": new})
    (d / "gudb_rpeaks").mkdir()
    np.savez(d / "gudb_rpeaks" / "gudb_rpeaks.npz", **arrays)
    (d / "gudb_rpeaks" / "metadata.json").write_text(json.dumps({**gmeta, "entries": entries}))
    return d


def test_activity_uses_the_gudb_persons_the_manifest_does_not_list_and_counts_exclusions(tmp_path, capsys):
    """Review findings 2 and 5: gudb subject 10's series numbered 15 (as the independent set
    numbers its persons) is evaluated, not dropped for not being 10-14; the folder's one
    training person is what "training persons excluded" counts, not the manifest's 138."""
    out_json = tmp_path / "r.json"
    folder = _unseen_folder(tmp_path, {10: 15}, with_training_person=True)
    assert eval_main(["models", "--data", str(folder), "--bootstrap", "0", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    ecg = json.loads(out_json.read_text())["ecg"]
    assert ecg["int8"]["activity_n"] > 0 and "activity_accuracy" in ecg["float"]
    assert "notes" not in ecg
    assert "ECG identity (2 persons evaluated, 1 training persons excluded" in out
    assert ecg["persons_excluded_as_training"] == 1


def test_no_unseen_gudb_person_is_a_note_not_silence(tmp_path):
    from training.eval.models import DEFAULT_MODELS, evaluate_ecg

    # the same series numbered 3: a subject the shipped model trained on, never evaluated
    res = evaluate_ecg(_unseen_folder(tmp_path, {10: 3}), DEFAULT_MODELS, None, progress=lambda m: None)
    assert "activity_n" not in res["int8"] and res["int8"]["id10s_n_gallery"] == 2
    assert any("no gudb persons the model was not trained on" in n and "3" in n for n in res["notes"])


def test_empty_folder_says_no_ecg_records_were_found(tmp_path):
    from training.eval.models import DEFAULT_MODELS, NoEcgPersons, evaluate_ecg

    (tmp_path / "empty").mkdir()
    with pytest.raises(NoEcgPersons, match="no ECG records found"):
        evaluate_ecg(tmp_path / "empty", DEFAULT_MODELS, None, progress=lambda m: None)


def test_manifest_lists_the_gudb_subjects_training_used() -> None:
    """Evaluation excludes the gudb subjects a manifest lists: training must list the ones it
    used, whatever their numbers, not a fixed 0-9."""
    from training.data.ecg import WindowSet
    from training.train_ecg import EcgTrainingData, TrainConfig, manifest_fields

    none = WindowSet(np.zeros((0, 300, 3), np.float32), np.zeros((0, 3), bool), np.zeros(0, int),
                     np.zeros(0, np.float32), ())
    data = EcgTrainingData(none, np.zeros(0, int), ("ecgid:01",), none.x, none.lead_mask,
                           np.zeros(0, int), none, np.zeros(0, str), ("3", "16", "21"))
    persons = manifest_fields(data, 0.5, TrainConfig())["training"]["persons"]
    assert persons == {"ecgid": ["01"], "gudb_rpeaks": ["3", "16", "21"]}


def test_int8_fidelity_compares_each_window_with_its_float_twin() -> None:
    from training.eval.models import int8_fidelity

    rng = np.random.default_rng(0)
    cnn = rng.normal(size=(20, 4))
    beats = rng.normal(size=(20, 6))
    emb = np.concatenate([cnn, beats], axis=1)
    same = int8_fidelity(cnn, emb, cnn, emb)
    assert same["cnn_cos_median"] == pytest.approx(1.0) and same["beats_cos_median"] == pytest.approx(1.0)
    flipped = emb.copy()
    flipped[:, 4:] *= -1  # int8 beat part pointing the other way: cosine -1
    flipped[:3, 4:] = 0.0  # windows without beats are left out, not counted as 0
    res = int8_fidelity(cnn, flipped, cnn, emb)
    assert res["beats_cos_median"] == pytest.approx(-1.0) and res["beats_cos_p5"] == pytest.approx(-1.0)
    assert res["cnn_cos_median"] == pytest.approx(1.0)
    assert set(int8_fidelity(cnn, cnn, cnn, cnn)) == {"cnn_cos_median", "cnn_cos_p5"}  # CNN alone


def test_window_set_keeps_the_quality_verdict_aligned_when_cut() -> None:
    """record_windows carries the pipeline's per-window quality verdict, and select() cuts it,
    the beats and every other per-window field alike (the gated evaluation relies on it)."""
    from daemon.dsp.ecg_pipeline import windows_from_record
    from training.data.ecg import load_ecgid, record_windows
    from training.eval.models import DEFAULT_MODELS, ECG_MODEL, pipeline_kwargs
    from daemon.biometrics import EcgModelRunner
    from daemon.inference.manifest import load_manifest

    path = DEFAULT_MODELS / f"{ECG_MODEL}.tflite"
    kw = pipeline_kwargs(load_manifest(path.with_suffix(".json")))
    kw.update(EcgModelRunner.load(path).pipeline_kwargs())
    rec = load_ecgid(MINIDATA)[0]
    x = rec.x_mv.copy()
    x[2000:4500] += 3.0 * np.random.default_rng(0).standard_normal((2500, x.shape[1]))  # a burst
    rec = dataclasses.replace(rec, x_mv=x)
    ws = record_windows([rec], kw)
    rw = windows_from_record(rec.x_mv, rec.fs, lead_valid=rec.lead_valid, **kw)
    assert ws.ok.tolist() == [bool(o) for o in rw.ok]
    assert ws.ok.any() and not ws.ok.all()
    sub = ws.select(ws.ok)
    kept = np.flatnonzero(ws.ok)
    assert sub.ok.all() and len(sub.x) == len(sub.morph) == len(sub.rec) == kept.size
    np.testing.assert_array_equal(sub.x, ws.x[kept])
    np.testing.assert_array_equal(sub.t_end_s, ws.t_end_s[kept])
    assert all(a is ws.morph[k] for a, k in zip(sub.morph, kept))
    # the quality sub-scores travel with the windows: the identity verdict is the daemon's own
    np.testing.assert_array_equal(sub.qscores, ws.qscores[kept])
    assert ws.identity_ok.tolist() == [bool(o) for o in rw.identity_ok]
    assert ws.identity_ok[ws.ok].all()  # identity asks less than the full gate, never more


def test_long_cross_date_tests_hold_no_window_of_the_enrolment_date() -> None:
    """A 30 s test is longer than an ECG-ID recording (20 s) and pools two test recordings; a
    cross-date test must not be topped up with a recording from the enrolment date (it was, for
    five held-out persons), nor a same-date test with one from another date."""
    from training.data.ecg import EcgRecord, WindowSet
    from training.eval.identity import gallery_and_tests

    dates = ["A", "A", "B", "B", "C"]  # recording 0 enrols; C has a single recording
    recs = tuple(EcgRecord("ecgid", "ecgid:1", f"rec_{i}", d, 500.0, np.zeros((10_000, 3), np.float32),
                           np.array([True, False, False])) for i, d in enumerate(dates))
    rec = np.repeat(np.arange(len(recs)), 18)
    ends = np.tile(np.arange(3.0, 21.0), len(recs))
    ws = WindowSet(np.zeros((len(rec), 300, 3), np.float32), np.ones((len(rec), 3), bool), rec, ends, recs)
    emb = np.eye(3, dtype=np.float32)[["ABC".index(recs[i].session) for i in rec]]  # one-hot date of each window
    _, _, tests = gallery_and_tests(ws, emb, 30)
    dates_in = tests.emb > 1e-6  # which dates each test's windows come from
    assert dates_in.sum(1).max() == 1, "a test mixes dates"
    assert not dates_in[tests.cross, 0].any(), "a cross-date test holds enrolment-date windows"
    assert tests.cross.sum() == 2 and (~tests.cross).sum() == 0  # B+B twice; A and C have no partner
    _, _, short = gallery_and_tests(ws, emb, 10)
    assert len(short.cross) == 8 and short.cross.sum() == 6  # 10 s pieces are unchanged: 2 per recording
