"""``python -m training.requantize_ecg --data DIR --models daemon/models``: re-export the shipped
ECG CNN's int8 file from the same float network, then refresh what depends on its embeddings.

WHY: the int8 file is a function of the float network *and* of how its activations were
calibrated. A better calibration (``training.export``'s ``clip_percentile``) should reach the
hubs without retraining: a retrain here gives another network than the shipped one, which an
earlier machine trained (docs/MODELS.md), so the network, its float twin and the threshold
chosen in float stay exactly as they are.

Steps, each printed:
1. the Keras model: ``float/ecg_dualtask.keras`` if it is there, else rebuilt from the float
   twin (``keras_from_float_twin``) and checked against it on the calibration windows, then
   saved beside it so the next re-export needs no rebuild;
2. the int8 export with the same 500 calibration windows as training
   (``train_ecg.representative_windows``) and the manifest of the file it replaces (persons,
   thresholds, training description), version ``train_ecg.VERSION``;
3. what is computed from the int8 CNN's embeddings: the fused threshold and metrics in the beat
   model's manifests (``train_beats.fused_threshold_and_metrics``; the beat model itself is not
   refitted), the never-enrolled impostor set (``impostors.build``) and the CNN's own held-out
   metrics.
Templates enrolled with the previous CNN are refused by the template store (version check):
re-enrol with ``biod calibrate``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from daemon.inference.manifest import load_manifest, manifest_path_for

_NOTE = "int8 re-exported"
TWIN_TOLERANCE = 1e-4  # max |embedding difference| between the rebuilt model and its float twin


def keras_model(float_dir: Path, check_windows: np.ndarray, progress=print):
    """The trained Keras CNN: the saved one, or rebuilt from the float twin and verified."""
    import keras

    import training.models.ecg_dualtask as arch  # registers the SCA layer for loading
    from daemon.inference.runtime import load_model
    from training.eval.models import run_batches

    saved = float_dir / "ecg_dualtask.keras"
    if saved.exists():
        progress(f"requantize: Keras model {saved}")
        return keras.models.load_model(saved)
    twin = float_dir / "ecg_dualtask.tflite"
    model = arch.keras_from_float_twin(twin)
    want = run_batches(load_model(twin), check_windows)["embedding"]
    got = model.predict(check_windows, batch_size=256, verbose=0)["embedding"]
    err = float(np.abs(got - want).max())
    if not err < TWIN_TOLERANCE:
        raise RuntimeError(f"the model rebuilt from {twin} differs from it by {err:.2e} "
                           f"(tolerance {TWIN_TOLERANCE}): not the same network, not re-exported")
    model.save(saved)
    progress(f"requantize: rebuilt the Keras model from {twin} (max |embedding difference| "
             f"{err:.1e} on {len(check_windows)} windows), saved {saved}")
    return model


def int8_fields(int8_path: Path, version: str, clip_percentile: float) -> dict:
    """The replaced file's manifest, minus what export fills in, with the new version."""
    from training.export import RESERVED_FIELDS

    m = load_manifest(manifest_path_for(int8_path)).model_dump(mode="json", exclude_none=True)
    fields = {k: v for k, v in m.items() if k not in RESERVED_FIELDS}
    fields["inputs"] = [{k: v for k, v in s.items() if k not in RESERVED_FIELDS - {"name"}}
                        for s in m["inputs"]]
    fields["outputs"] = [{"name": o["name"], "meaning": o["meaning"]} for o in m["outputs"]]
    fields["version"] = version
    note = (f"{_NOTE} from the {m['version']} float network by training.requantize_ecg "
            f"(activation ranges: {clip_percentile}th percentiles of the calibration windows)")
    # a second re-export replaces the first one's note instead of adding to it
    kept = m.get("notes", "").split(f"; {_NOTE}")[0]
    fields["notes"] = f"{kept}; {note}".lstrip("; ")
    return fields


def requantize(data_dir: Path, models: Path, clip_percentile: float, progress=print) -> Path:
    from training.eval.models import manifest_metrics
    from training.export import export_int8, update_manifest
    from training.impostors import build as build_impostors
    from training.data.ecg import load_training_records
    from training.train_beats import fused_threshold_and_metrics
    from training.train_ecg import MODEL_NAME, VERSION, prepare, representative_windows

    int8_path = models / f"{MODEL_NAME}.tflite"
    fields = int8_fields(int8_path, VERSION, clip_percentile)
    data = prepare(data_dir, progress)
    rep = representative_windows(data)
    model = keras_model(models / "float", rep, progress)
    p8 = export_int8(model, rep, models, MODEL_NAME, fields, clip_percentile=clip_percentile)
    update_manifest(models / "float" / f"{MODEL_NAME}.tflite", version=VERSION)
    progress(f"requantize: wrote {p8} ({p8.stat().st_size} bytes), version {VERSION}")
    threshold, evaluation = fused_threshold_and_metrics(
        data_dir, models, load_training_records(data_dir)[1], progress)
    progress(f"requantize: fused threshold {threshold:.3f} (FAR 1 % on the calibration persons)")
    build_impostors(data_dir, models)
    progress("requantize: impostor set rebuilt")
    metrics, _ = manifest_metrics(evaluation) if evaluation else ({}, None)  # the CNN alone, same held-out run
    update_manifest(p8, metrics=metrics)
    update_manifest(models / "float" / f"{MODEL_NAME}.tflite", metrics=metrics)
    return p8


def folders_exist(data: Path, models: Path) -> bool:
    """``--data`` and ``--models``' float twins are folders; else an error line on stderr."""
    for folder, what in ((data, "--data"), (models / "float", "--models DIR/float")):
        if not folder.is_dir():
            print(f"error: {what} {folder} is not a folder", file=sys.stderr)
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    from training.train import _progress  # the same elapsed-time progress lines as training.train
    from training.train_ecg import CLIP_PERCENTILE

    ap = argparse.ArgumentParser(prog="python -m training.requantize_ecg", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder in the shared/data format")
    ap.add_argument("--models", type=Path, default=Path("daemon/models"))
    ap.add_argument("--clip-percentile", type=float, default=CLIP_PERCENTILE)
    args = ap.parse_args(argv)
    if not folders_exist(args.data, args.models):
        return 2
    requantize(args.data, args.models, args.clip_percentile, _progress(time.time()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
