"""``python -m training.refresh_ecg_metrics --data DIR [--models daemon/models]``: measure the
shipped ECG models again with the current evaluation protocol and write the numbers into their
manifests, leaving every model file and threshold exactly as it is.

WHY: the ``metrics`` in a manifest are what a hub owner (and ``biod doctor``) reads about the
model, so they must come from the evaluation as it is now. When the protocol is corrected
(2026-11-23: 30 s tests pool only recordings of one date, ``training/eval/identity.py``) the
models stay right but their recorded numbers go stale; refitting to refresh them would give
other files (float rounding differs between hosts, docs/MODELS.md). This command only measures.

It first recomputes the fused open-set threshold from the calibration persons exactly as
training did and refuses to write anything if it differs from the manifest's: then the files are
not the ones the manifest describes, and the fix is ``training.requantize_ecg`` or a retrain.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from daemon.inference.manifest import load_manifest, manifest_path_for

THRESHOLD_TOLERANCE = 1e-6


class ThresholdMismatch(RuntimeError):
    """The models in the folder do not give the threshold their manifest states."""


def refresh(data_dir: Path, models: Path, progress=print) -> dict:
    """Check the threshold, evaluate, write the CNN's and the fusion's metrics; returns the
    evaluation (``training.eval.models.evaluate_ecg``)."""
    from training.data.ecg import fingerprints, load_training_records
    from training.eval.models import manifest_metrics
    from training.export import update_manifest
    from training.train_beats import NAME as BEATS, fused_metrics, fused_threshold
    from training.train_ecg import MODEL_NAME as CNN

    stated = load_manifest(manifest_path_for(models / f"{BEATS}.tflite")).thresholds["identity_cosine"]
    train, calib = load_training_records(data_dir)
    got = fused_threshold(models, calib)
    progress(f"refresh: fused threshold {got:.6f} from the calibration persons "
             f"(manifest {stated:.6f})")
    if abs(got - stated) > THRESHOLD_TOLERANCE:
        raise ThresholdMismatch(
            f"the models in {models} give the fused threshold {got:.6f}, their manifest states "
            f"{stated:.6f}: these are not the files the manifest was written for (or --data is "
            "not the data they were trained on); nothing written. Re-export with "
            "python -m training.requantize_ecg or retrain with python -m training.train")
    # The threshold reproduced, so these are the recordings the models were made from: a
    # manifest written before fingerprints existed gets theirs (training.data.ecg.fingerprint),
    # so that an evaluation recognises them under any number. Never replaced once there: a
    # folder holding only some training persons must not shrink the list training wrote.
    prints = fingerprints(train + calib)
    for name in (CNN, BEATS):
        for p in (models / f"{name}.tflite", models / "float" / f"{name}.tflite"):
            training = load_manifest(manifest_path_for(p)).training if p.exists() else None
            if training is not None and not training.fingerprints:
                update_manifest(p, training={**training.model_dump(mode="json"), "fingerprints": prints})
                progress(f"refresh: {len(prints)} recording fingerprints written into {manifest_path_for(p)}")
    evaluation = fused_metrics(data_dir, models, progress)
    cnn, _ = manifest_metrics(evaluation)
    for p in (models / f"{CNN}.tflite", models / "float" / f"{CNN}.tflite"):
        update_manifest(p, metrics=cnn)
    progress(f"refresh: metrics written into the {CNN} and {BEATS} manifests (int8 and float)")
    return evaluation


def main(argv: list[str] | None = None) -> int:
    from training.requantize_ecg import folders_exist
    from training.train import _progress

    ap = argparse.ArgumentParser(prog="python -m training.refresh_ecg_metrics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True,
                    help="the folder the models were trained on (shared/data format)")
    ap.add_argument("--models", type=Path, default=Path("daemon/models"))
    args = ap.parse_args(argv)
    if not folders_exist(args.data, args.models):
        return 2
    try:
        refresh(args.data, args.models, _progress(time.time()))
    except ThresholdMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
