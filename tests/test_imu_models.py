"""IMU models: loaders, BioDeep CNN, int8 export parity, shipped models on real held-out windows.

Real data only: tests/fixtures/imu_models/data holds short excerpts of SisFall and HuGaDB in
the shared/data format (see the README there); the shipped models are daemon/models/imu_*.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemon.dsp.imu import ACF_VARIANTS, acf_feature_size
from daemon.dsp.imu_pipeline import imu_windows_from_record
from daemon.inference.manifest import load_manifest, sha256_file
from daemon.inference.runtime import load_model
from training.data.imu import (
    FINE_CLASSES,
    TOP_LEVEL,
    _known_issue_patterns,
    hugadb_conversion,
    load_hugadb,
    load_sisfall,
    sisfall_conversion,
    top_level_index,
    window_set,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "fixtures" / "imu_models" / "data"
MODELS = ROOT / "daemon" / "models"
SHIPPED = ("imu_gender", "imu_age", "imu_activity")


@pytest.fixture(scope="module")
def hugadb():
    return load_hugadb(DATA / "hugadb", "thigh")


@pytest.fixture(scope="module")
def sisfall():
    return load_sisfall(DATA / "sisfall")


def _tf():
    from training.models import imu as M

    M.limit_threads(1)
    return M


# ------------------------------------------------------------------------------- data
def test_conversions_are_read_from_metadata():
    sis = json.loads((DATA / "sisfall" / "metadata.json").read_text())
    hug = json.loads((DATA / "hugadb" / "metadata.json").read_text())
    assert sisfall_conversion(sis["units"]) == pytest.approx((1 / 256, 1 / 16.384))
    assert hugadb_conversion(hug["column_units"]) == (16384.0, 16.4, 2000.0)
    with pytest.raises(ValueError, match="ADXL345"):
        sisfall_conversion("counts, unknown sensor")


def test_known_issue_text_becomes_file_patterns():
    pats = _known_issue_patterns("corrupted, e.g. HuGaDB_v1_various_03_* and _04_* ; see README")
    names = ["HuGaDB_v1_various_03_11.txt", "HuGaDB_v1_various_04_00.txt",
             "HuGaDB_v1_various_05_00.txt", "HuGaDB_v1_walking_03_00.txt"]
    assert [any(p.match(n) for p in pats) for n in names] == [True, True, False, False]


def test_hugadb_clipped_gyroscope_is_excluded_and_rest_resampled(hugadb):
    records, excluded = hugadb
    assert excluded == ["HuGaDB_v1_running_03_00.txt"]  # thigh gyro on the ±2000 °/s rails
    meta = json.loads((DATA / "hugadb" / "metadata.json").read_text())
    n_src = {r["file"]: r["n_samples"] for r in meta["recordings"]}
    for r in records:
        assert r.si.dtype == np.float32 and r.si.shape[1] == 6
        assert abs(r.si.shape[0] - n_src[r.file] * 100 / 58.82) < 3  # 58.8 Hz -> 100 Hz
        assert np.abs(r.si[:, 3:]).max() < np.deg2rad(2000) * 0.98
        assert r.placement == "right thigh"
    walking = next(r for r in records if set(r.labels.tolist()) == {1})
    assert 8 < np.abs(np.linalg.norm(walking.si[:, :3], axis=1)).mean() < 12  # ~1 g in m/s²


def test_window_features_equal_the_daemon_streaming_pipeline(sisfall):
    """Training featurises exactly as the hub: same resampler, windows and ACF."""
    rec = sisfall[0]
    ws = window_set([rec], "stride", 10)
    acc_g, gyro_dps = rec.si[:, :3] / 9.80665, np.rad2deg(rec.si[:, 3:])
    t = np.arange(len(rec.si)) / 100.0
    wins = imu_windows_from_record(t, acc_g, gyro_dps, chunk=37, variant="stride")
    assert len(wins) == len(ws)
    np.testing.assert_allclose(np.stack([w.features for w in wins]), ws.features,
                               rtol=1e-3, atol=1e-5)


def test_hugadb_windows_have_one_trained_label(hugadb):
    ws = window_set(hugadb[0], "biodeep", 10)
    assert set(np.unique(ws.subject)) == {"8", "11", "16"}
    assert set(ws.activity.tolist()) <= {1, 2, 5, 8, 10}
    assert (top_level_index(ws.activity) >= 0).all()


# ------------------------------------------------------------------------------ models
@pytest.mark.parametrize("variant", ["biodeep", "magnitude"])
def test_model_shapes(variant):
    M = _tf()
    f = acf_feature_size(10, variant)
    cfg = M.CnnConfig(n_axes=f // 11)
    x = np.zeros((3, f), np.float32)
    assert M.build_gender(cfg)(x)["p_female"].shape == (3, 1)
    out = M.build_age(40.0, 20.0, cfg)(x)["age_years"]
    assert out.shape == (3, 1)
    act = M.build_activity(len(TOP_LEVEL), len(FINE_CLASSES), cfg)(x)
    assert act["top_level"].shape == (3, 3) and act["fine"].shape == (3, len(FINE_CLASSES))
    np.testing.assert_allclose(np.asarray(act["top_level"]).sum(1), 1, atol=1e-5)
    names = [layer.name for layer in M.build_gender(cfg).layers]
    assert {"conv1", "conv2", "fc"} <= set(names)


def test_gait_variant_models_and_seed_ensemble():
    """Gender sees ACF + gait statistics, age the statistics only; an ensemble is the mean."""
    M = _tf()
    from training.train_imu import cnn_config

    f = acf_feature_size(10, "gait")
    x = np.random.default_rng(0).normal(size=(4, f)).astype(np.float32)
    g_cfg, a_cfg = cnn_config("gait", "gender"), cnn_config("gait", "age")
    assert g_cfg.use_acf and not a_cfg.use_acf and g_cfg.n_axes == 6 and g_cfg.n_extra == f - 66
    gender = M.build_gender(g_cfg)
    assert gender(x)["p_female"].shape == (4, 1)
    age = M.build_age_groups(22.0, 66.0, a_cfg, sharpness=4.0)
    out = age(x)
    p = np.asarray(out["p_elderly"])[:, 0]
    assert out["age_years"].shape == (4, 1) and np.all((p > 0) & (p < 1))
    logit = np.log(p / (1 - p))
    np.testing.assert_allclose(np.asarray(out["age_years"])[:, 0],
                               22.0 + 44.0 / (1 + np.exp(-4.0 * logit)), rtol=1e-4)
    x2 = x.copy()
    x2[:, :66] += 100.0  # the age model must not read the ACF block
    np.testing.assert_allclose(np.asarray(age(x2)["age_years"]), np.asarray(out["age_years"]))
    members = [M.build_gender(g_cfg) for _ in range(3)]
    ens = M.average_models(members, "imu_gender")
    mean = np.mean([np.asarray(m(x)["p_female"]) for m in members], axis=0)
    np.testing.assert_allclose(np.asarray(ens(x)["p_female"]), mean, rtol=1e-5)


def test_int8_export_matches_keras_on_real_windows(tmp_path, hugadb):
    M = _tf()
    from training.export import export_int8
    from training.train_imu import fit_activity, manifest_fields, zscore_of

    ws = window_set(hugadb[0], "biodeep", 10)
    norm = zscore_of(ws.features)
    model = M.build_activity(len(TOP_LEVEL), len(FINE_CLASSES))
    fit_activity(model, norm.apply(ws.features), ws.activity, epochs=3)
    fields = manifest_fields("activity", "biodeep", norm, {"hugadb": ["8", "11", "16"]}, {})
    path = export_int8(model, ws.features, tmp_path, "act", fields)
    out = load_model(path).run(features=ws.features)
    ref = M.predict(model, norm.apply(ws.features))
    assert np.abs(out["top_level"] - ref["top_level"]).max() < 0.1
    assert (out["top_level"].argmax(1) == ref["top_level"].argmax(1)).mean() > 0.95
    assert (out["fine"].argmax(1) == ref["fine"].argmax(1)).mean() > 0.9


# ---------------------------------------------------------------------------- shipped
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_manifest_valid_and_hash_correct(name):
    for path in (MODELS / f"{name}.tflite", MODELS / "float" / f"{name}.tflite"):
        m = load_manifest(path.with_suffix(".json"))
        assert m.sha256 == sha256_file(path) and m.size_bytes == path.stat().st_size
        spec = m.inputs[0]
        assert spec.features.kind == "acf" and spec.features.params["variant"] in ACF_VARIANTS
        assert spec.shape == [acf_feature_size(int(spec.features.params["max_lag"]),
                                               str(spec.features.params["variant"]))]
        assert spec.rate_hz == 100.0 and spec.window_s == 2.0 and spec.placement
        ds = m.training.datasets[0]
        assert m.training.persons[ds] and m.training.held_out[ds]
        assert not set(m.training.persons[ds]) & set(m.training.held_out[ds])
        assert {"int8", "float", "rf_baseline"} <= set(m.metrics)
        load_model(path)
    assert (MODELS / f"{name}.tflite").stat().st_size <= 150 * 1024
    assert load_manifest(MODELS / f"{name}.json").inputs[0].dtype == "int8"


def _predict(name: str, ws) -> dict[str, np.ndarray]:
    return load_model(MODELS / f"{name}.tflite").run(features=ws.features)


def test_shipped_activity_on_held_out_persons(hugadb):
    model = load_model(MODELS / "imu_activity.tflite")
    assert model.manifest.inputs[0].placement.startswith("right thigh")
    params = model.manifest.inputs[0].features.params
    ws = window_set(hugadb[0], str(params["variant"]), int(params["max_lag"]))
    assert not set(ws.subject) & set(model.manifest.training.persons["hugadb"])
    top = model.run(features=ws.features)["top_level"].argmax(1)
    truth = top_level_index(ws.activity)
    for k, label in enumerate(TOP_LEVEL):
        sel = truth == k
        assert sel.any(), label
        assert (top[sel] == k).mean() >= 0.7, f"{label}: {(top[sel] == k).mean():.2f}"
    single = model.run(features=ws.features[0])
    assert single["top_level"].shape == (3,) and single["fine"].shape == (len(FINE_CLASSES),)


def test_shipped_gender_and_age_on_real_walking(sisfall):
    m = load_manifest(MODELS / "imu_gender.json")
    params = m.inputs[0].features.params
    ws = window_set(sisfall, str(params["variant"]), int(params["max_lag"]))
    p = _predict("imu_gender", ws)["p_female"].reshape(-1)
    age = _predict("imu_age", ws)["age_years"].reshape(-1)
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.isfinite(age))
    mean_age = {s: age[ws.subject == s].mean() for s in np.unique(ws.subject)}
    assert all(5 < a < 100 for a in mean_age.values())
    assert mean_age["SE07"] > mean_age["SA03"]  # 65-year-old vs 19-year-old, both unseen


def test_evaluate_imu_only_unseen_persons(tmp_path):
    from training.eval.imu import evaluate_imu

    res = evaluate_imu(DATA, MODELS, figures=tmp_path)
    assert "SA01" not in res["gender"]["persons"]  # SA01 trained the shipped model
    assert set(res["gender"]["persons"]) == {"SA03", "SA10", "SE07"}
    assert set(res["activity"]["persons"]) == {"8", "11", "16"}
    for task in ("gender", "age", "activity"):
        assert {"int8", "float"} <= set(res[task])
    assert 0 <= res["activity"]["int8"]["top_macro_f1"] <= 100
    assert (tmp_path / "imu_activity_confusion.png").stat().st_size > 5000
    motion = res["activity_from_motion"]  # the rule a waist IMU uses, on the same unseen persons
    assert set(motion["sisfall_persons"]) == {"SA03", "SA10", "SE07"} and motion["windows"] > 50
    assert motion["motion_rule_on_waist_accuracy"] > motion["thigh_model_on_waist_accuracy"] + 30
    assert motion["per_class"]["rest"]["recall"] > 90


def test_finetune_head_only(tmp_path):
    _tf()
    import keras

    from training.finetune_imu import finetune, keras_base

    base = keras.models.load_model(keras_base(MODELS / "imu_activity.tflite"))
    res = finetune(MODELS / "imu_activity.tflite", DATA, tmp_path, epochs=1, allow_missing_classes=True)  # short excerpts
    tuned = keras.models.load_model(keras_base(Path(res["model"])))
    for frozen in ("conv1", "conv2"):
        np.testing.assert_array_equal(base.get_layer(frozen).get_weights()[0],
                                      tuned.get_layer(frozen).get_weights()[0])
    assert not np.array_equal(base.get_layer("fc").get_weights()[0],
                              tuned.get_layer("fc").get_weights()[0])
    model = load_model(Path(res["model"]))
    # HuGaDB persons fine-tuned on are HuGaDB training persons now, and the IMU evaluation
    # leaves them out (listed under "household", persons 8, 11, 16 were evaluated as unseen)
    from training.eval.imu import Skip, _windows

    persons = model.manifest.training.persons
    assert "household" not in persons and set(res["persons"]) <= set(persons["hugadb"])
    assert set(load_model(MODELS / "imu_activity.tflite").manifest.training.persons["hugadb"]) <= set(persons["hugadb"])
    with pytest.raises(Skip, match="every person"):
        _windows(DATA, model.manifest)


def test_models_are_used_only_at_the_placement_they_were_trained_for() -> None:
    from daemon.biometrics import ImuModelSet, placement_of

    assert placement_of("right thigh (HuGaDB: sensor strapped to the front of the thigh)") == "thigh"
    assert placement_of("waist (SisFall: device on the belt, front)") == "waist"
    assert placement_of(None) is None and placement_of("ankle") is None
    waist = ImuModelSet.load_dir(MODELS, "waist")
    assert sorted(waist.models) == ["age", "gender"] and list(waist.skipped) == ["activity"]
    assert "trained for an IMU at the thigh" in waist.skipped["activity"]
    thigh = ImuModelSet.load_dir(MODELS, "thigh")
    assert sorted(thigh.models) == ["activity"] and sorted(thigh.skipped) == ["age", "gender"]
    assert sorted(ImuModelSet.load_dir(MODELS).models) == ["activity", "age", "gender"]  # no placement: all


def test_biod_record_to_finetune_on_the_households_own_data(tmp_path):
    """`biod record` on a hub with a thigh IMU (both emulators, real SisFall/LUDB excerpts) ->
    WFDB records -> `training.finetune_imu --data` reads them back in SI units and adapts the
    activity model; a record made at another placement is refused for this model."""
    import subprocess
    import sys

    from training.data.imu import load_biod_imu

    cfg = tmp_path / "hub.yaml"
    body = (f"hub:\n  id: rec\nstate_dir: {tmp_path / 'state'}\n"
            "ecg:\n  source: emulator\n  emulator:\n    recording: ludb-16\n    speed: 4\n"
            "imu:\n  enabled: true\n  source: emulator\n  placement: {place}\n  emulator:\n    speed: 4\n")
    cfg.write_text(body.format(place="thigh"))
    out = tmp_path / "rec"
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "record", "--config", str(cfg), "--out", str(out),
                          "--seconds", "12", "--label", "walking", "--person", "ann"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "of ECG" in res.stdout and "of IMU" in res.stdout
    (rec,) = load_biod_imu(out)
    assert rec.subject == "ann" and rec.placement == "thigh" and set(rec.labels.tolist()) == {1}  # walking
    assert 1195 <= len(rec.si) <= 1210
    # the stored samples are the emulated board's (SisFall SA01 walking, waist belt), in SI units
    from firmware_protocol.emulators.imu_recordings import load_imu_recording

    src = load_imu_recording("SA01_D01_walking")
    acc = rec.si[:, :3]
    assert abs(np.linalg.norm(acc, axis=1).mean() - np.linalg.norm(src.acc_ms2, axis=1).mean()) < 0.3
    _tf()
    from training.finetune_imu import finetune

    # 12 s of walking only: refused, since a head tuned on walking alone forgets rest and vigorous
    with pytest.raises(ValueError, match=r"too few windows of rest, walking, vigorous \(rest 0, walking 1\d, vigorous 0; need 20"):
        finetune(MODELS / "imu_activity.tflite", out, tmp_path / "refused", epochs=1)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="--compare needs at least two recordings"):  # was an error inside Keras
        finetune(MODELS / "imu_activity.tflite", out, tmp_path / "refused", epochs=1, compare=True,
                 allow_missing_classes=True)
    res = finetune(MODELS / "imu_activity.tflite", out, tmp_path / "tuned", epochs=1, allow_missing_classes=True)
    assert res["windows"] >= 10 and res["persons"] == ["ann"]
    # calibrated on the base model's own calibration windows too, not the 12 s of walking alone
    assert res["calibration"].startswith("500 base calibration windows + ")
    base_q = load_model(MODELS / "imu_activity.tflite").manifest.inputs[0].quantisation
    tuned_q = load_model(Path(res["model"])).manifest.inputs[0].quantisation
    assert tuned_q.scale >= base_q.scale * 0.99  # the input range did not shrink to the household's
    model = load_model(Path(res["model"]))
    assert model.manifest.training.persons["household"] == ["ann"]
    cfg.write_text(body.format(place="waist"))
    other = tmp_path / "waist"
    subprocess.run([sys.executable, "-m", "daemon.cli", "record", "--config", str(cfg), "--out", str(other),
                    "--seconds", "4", "--label", "walking"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    with pytest.raises(ValueError, match="made at the waist.*trained for the thigh"):
        finetune(MODELS / "imu_activity.tflite", other, tmp_path / "no", epochs=1)


def test_household_labels_that_do_not_fit_the_record_are_refused_with_the_line(tmp_path):
    """A labels.csv with other columns was a KeyError; a negative start labelled the record's
    end, and an end before the start labelled nothing, silently."""
    from daemon.record import WfdbWriter, imu_signals
    from training.data.ecg import DataError
    from training.data.imu import load_biod_imu

    with WfdbWriter(tmp_path, "imu_a", 100.0, imu_signals(8, 1000), comments=["person ann", "placement thigh"]) as w:
        w.write_physical(np.tile([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], (500, 1)))
    labels = tmp_path / "imu_a.labels.csv"
    for text, message in (("start,end,kind,value\n0,500,activity,walking\n", "expected start_sample"),
                          ("start_sample,end_sample,kind,value\n-100,500,activity,walking\n", r"labels.csv:2: samples '-100'"),
                          ("start_sample,end_sample,kind,value\n0,100,activity,walking\n400,300,activity,sitting\n",
                           r"labels.csv:3: samples '400'..'300' are not a span within the record's 500 samples")):
        labels.write_text(text)
        with pytest.raises(DataError, match=message):
            load_biod_imu(tmp_path)
    labels.write_text("start_sample,end_sample,kind,value\n0,500,activity,walking\n")
    (rec,) = load_biod_imu(tmp_path)
    assert set(rec.labels.tolist()) == {1}


def test_a_faster_household_recording_is_filtered_as_the_daemon_filters_that_sensor(tmp_path):
    """`biod record` at imu.odr_hz 400: the fine-tuning windows were resampled without the
    daemon's anti-alias low-pass, so a 130 Hz vibration on the accelerometer folded into the
    training features and not into the served ones. Real walking (the emulator's SisFall excerpt), resampled
    to 400 Hz, plus such a vibration: training's features equal the daemon's."""
    from daemon.dsp.imu import acf_features
    from daemon.dsp.imu_pipeline import imu_windows_from_record
    from daemon.record import WfdbWriter, imu_signals
    from firmware_protocol.emulators.imu_recordings import load_imu_recording
    from training.data.imu import load_biod_imu, window_set

    src = load_imu_recording("SA01_D01_walking")
    si = np.concatenate([src.acc_ms2, np.deg2rad(src.gyro_dps)], axis=1)[:2000]
    t100 = np.arange(len(si)) / 100.0
    t = np.arange(4 * len(si)) / 400.0
    x = np.stack([np.interp(t, t100, si[:, c]) for c in range(6)], axis=1)
    x[:, :3] += 0.3 * 9.80665 * np.sin(2 * np.pi * 130.0 * t)[:, None]
    acc_g, gyro_dps = x[:, :3] / 9.80665, np.rad2deg(x[:, 3:])
    with WfdbWriter(tmp_path, "imu_a", 400.0, imu_signals(8, 1000), comments=["person ann", "placement thigh"]) as w:
        w.label("activity", "walking")
        w.write_physical(np.concatenate([acc_g, gyro_dps], axis=1))
    trained = window_set(load_biod_imu(tmp_path), "stride", 10).features
    wins = imu_windows_from_record(t, acc_g, gyro_dps, acc_range_g=8, gyro_range_dps=1000, input_hz=400.0)
    served = np.stack([acf_features(w.data.astype(np.float32), max_lag=10, variant="stride") for w in wins])
    k = min(len(served), len(trained))
    assert k >= 15
    np.testing.assert_allclose(trained[:k], served[:k], rtol=1e-3, atol=1e-4)


def test_one_damaged_imu_model_costs_that_model_only(tmp_path, caplog):
    """A truncated imu_age.tflite made ImuModelSet.load_dir raise, and the daemon then ran with
    no IMU path at all: no activity, gender, gait identity, walking or cadence."""
    import logging
    import shutil

    from daemon.app import load_imu_models
    from daemon.biometrics import MODELS_DIR
    from daemon.config import BiodConfig

    for f in MODELS_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    age = tmp_path / "imu_age.tflite"
    age.write_bytes(age.read_bytes()[:-100])
    cfg = BiodConfig.model_validate({"models_dir": str(tmp_path), "imu": {"enabled": True, "source": "emulator", "placement": "waist"}})
    with caplog.at_level(logging.ERROR):
        models = load_imu_models(cfg)
    assert models is not None
    assert "age" not in models.models and "gender" in models.models
    assert "imu_age.tflite" in models.failed["age"]
    assert models.gait, "gait identity projections still load"
    assert any("the age model cannot be used" in r.getMessage() for r in caplog.records)


def test_the_k_fold_never_sees_the_held_out_persons(sisfall, hugadb):
    """Variants, seeds and the age mode are chosen by `train_imu --cv`; its folds held the five
    held-out SisFall persons (and HuGaDB 8, 11, 16) until 2026-11-23, so those choices had seen
    the persons the shipped models are reported on."""
    from training.train_imu import HELD_OUT, cv_windows

    gait = window_set(sisfall, "biodeep", 10)
    assert set(HELD_OUT["sisfall"]) & set(gait.subject.tolist())  # the fixture has some
    kept = cv_windows(gait, "gender")
    assert not set(HELD_OUT["sisfall"]) & set(kept.subject.tolist()) and len(kept)
    assert len(cv_windows(gait, "age", include_held_out=True)) == len(gait)
    act = window_set(hugadb[0], "biodeep", 10)  # the fixture's HuGaDB persons are all held out
    assert len(act) and len(cv_windows(act, "activity")) == 0


def test_the_shipped_calibration_windows_are_those_of_the_shipped_int8_model(tmp_path):
    """float/imu_activity.representative.npz (what a fine-tune calibrates on beside the
    household's windows) re-exports the float twin into the shipped int8 file, byte for byte."""
    _tf()
    import hashlib

    import keras

    from daemon.inference.manifest import load_manifest
    from training.export import export_int8, reexport_fields

    manifest = load_manifest(MODELS / "imu_activity.json")
    fields = reexport_fields(manifest)
    with np.load(MODELS / "float" / "imu_activity.representative.npz") as z:
        rep = z["features"]
    model = keras.models.load_model(MODELS / "float" / "imu_activity.keras")
    path = export_int8(model, rep, tmp_path, "imu_activity", fields)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.sha256
