"""``python -m training.refresh_ecg_metrics``: re-measures the shipped ECG manifests' metrics and
never writes them for files that are not the ones the manifest describes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MINIDATA = ROOT / "tests" / "fixtures" / "minidata"
MODELS = ROOT / "daemon" / "models"
ECG_FILES = ("ecg_dualtask", "ecg_beats")


def _models_copy(tmp: Path) -> Path:
    out = tmp / "models"
    (out / "float").mkdir(parents=True)
    for name in ECG_FILES:
        for sub in ("", "float"):
            for ext in (".tflite", ".json"):
                shutil.copy(MODELS / sub / f"{name}{ext}", out / sub / f"{name}{ext}")
    return out


def _with_calibration_persons(tmp: Path) -> Path:
    """The fixture folder with ECG-ID persons 2 and 26 renamed to calibration persons 11 and 16
    (training partition, used only to set the threshold), 34 kept as a held-out person."""
    data = tmp / "data"
    shutil.copytree(MINIDATA, data)
    rename = {2: 11, 26: 16}
    meta = json.loads((data / "ecgid" / "metadata.json").read_text())
    for r in meta["records"]:
        r["person"] = rename.get(r["person"], r["person"])
    (data / "ecgid" / "metadata.json").write_text(json.dumps(meta))
    z = dict(np.load(data / "ecgid" / "ecgid.npz"))
    z["person"] = np.array([rename.get(int(p), int(p)) for p in z["person"]], z["person"].dtype)
    np.savez(data / "ecgid" / "ecgid.npz", **z)
    return data


def _manifests(models: Path) -> dict[str, str]:
    return {str(p.relative_to(models)): p.read_text() for p in sorted(models.rglob("*.json"))}


def test_other_threshold_writes_nothing(tmp_path: Path) -> None:
    """The shipped threshold came from the real calibration persons; on this folder the models
    give another one, so the files and --data are not what the manifests were written from."""
    from training.refresh_ecg_metrics import ThresholdMismatch, main, refresh

    models = _models_copy(tmp_path)
    data = _with_calibration_persons(tmp_path)
    before = _manifests(models)
    with pytest.raises(ThresholdMismatch, match="nothing written"):
        refresh(data, models, progress=lambda m: None)
    assert _manifests(models) == before
    assert main(["--data", str(data), "--models", str(models)]) == 1
    assert _manifests(models) == before


def test_matching_threshold_rewrites_only_the_metrics(tmp_path: Path) -> None:
    from daemon.inference.manifest import load_manifest
    from training.data.ecg import fingerprints, load_training_records
    from training.export import update_manifest
    from training.refresh_ecg_metrics import refresh
    from training.train_beats import fused_threshold

    models = _models_copy(tmp_path)
    data = _with_calibration_persons(tmp_path)
    thr = fused_threshold(models, load_training_records(data)[1])
    for p in (models / "ecg_beats.tflite", models / "float" / "ecg_beats.tflite"):
        m = load_manifest(p.with_suffix(".json"))
        update_manifest(p, thresholds={**m.thresholds, "identity_cosine": thr},
                        metrics={"int8": {"stale": 1.0}})
    # a CNN manifest from before recording fingerprints: refresh adds them; the beat model's
    # (already there) are kept as training wrote them, whatever this folder holds
    cnn_path = models / "ecg_dualtask.tflite"
    training = load_manifest(cnn_path.with_suffix(".json")).training.model_dump(mode="json")
    update_manifest(cnn_path, training={**training, "fingerprints": []})
    before = {n: load_manifest(models / f"{n}.json") for n in ECG_FILES}

    evaluation = refresh(data, models, progress=lambda m: None)

    train, calib = load_training_records(data)
    for n in ECG_FILES:
        after = load_manifest(models / f"{n}.json")
        # the file, its checksum and thresholds are untouched; only the metrics are new
        assert after.model_dump(exclude={"metrics", "training"}) == before[n].model_dump(exclude={"metrics", "training"})
        assert after.training.persons == before[n].training.persons
        if n == "ecg_dualtask":
            assert after.training.fingerprints == fingerprints(train + calib) and len(calib) > 0
        else:
            assert after.training.fingerprints == before[n].training.fingerprints and len(before[n].training.fingerprints) == 488
        assert "stale" not in after.metrics["int8"]
    beats = load_manifest(models / "ecg_beats.json").metrics["int8"]
    cnn = load_manifest(models / "ecg_dualtask.json").metrics["int8"]
    # one held-out ECG-ID person: a gallery of one, scored at the threshold
    assert beats["id10s_n_tests"] > 0
    for key in ("id10s_n_tests", "id10s_frr_at_thr", "id3s_never_enrolled_far_at_thr"):
        assert beats[key] == pytest.approx(evaluation["int8"][key])
        assert cnn[key] == pytest.approx(evaluation["int8"][f"cnn_only_{key}"])
