"""What a household fine-tune's int8 calibration does to persons outside the household.

    python -m training.experiments.finetune_int8_range --data ../shared/data [--household 8] [--test 11,16]

A household is played by one HuGaDB person's walking sessions only (default 8, a person the
shipped activity model never trained on). ``training.finetune_imu`` adapts the shipped model to
them twice: as it does now (int8 calibrated on the base model's own calibration windows plus the
household's) and as it did before 2026-11-23 (the household's windows alone: the base
calibration file is left out of a copy of the base). Each int8 model, and the shipped one, is
then run on every window of other held-out persons (default 11 and 16) and compared with its own
float Keras twin: the int8 input range, the share of windows with an input feature outside it
(saturated), and the largest difference of a top-level probability between int8 and float.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from daemon.biometrics import MODELS_DIR
from daemon.inference.runtime import load_model
from training.data.imu import load_hugadb, window_set


def hugadb_subset(src: Path, out: Path, keep) -> None:
    """A HuGaDB-format folder of the recordings ``keep(metadata record)`` selects."""
    meta = json.loads((src / "metadata.json").read_text())
    z = np.load(src / "hugadb.npz")
    data, act, starts, lens, subj, recs, pos = [], [], [], [], [], [], 0
    for i, r in enumerate(meta["recordings"]):
        if not keep(r):
            continue
        s, n = int(z["rec_start"][i]), int(z["rec_len"][i])
        data.append(z["data"][s:s + n])
        act.append(z["activity"][s:s + n])
        starts.append(pos)
        lens.append(n)
        subj.append(z["rec_subject"][i])
        recs.append(r)
        pos += n
    if not recs:
        raise SystemExit(f"{src}: no recording selected")
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "hugadb.npz", data=np.concatenate(data), activity=np.concatenate(act),
             rec_start=np.array(starts), rec_len=np.array(lens), rec_subject=np.array(subj))
    (out / "metadata.json").write_text(json.dumps({**meta, "recordings": recs}))


def fidelity(models: Path, test: Path) -> dict:
    """int8 vs its float Keras twin on every window of the HuGaDB folder ``test``."""
    import keras

    m8 = load_model(models / "imu_activity.tflite")
    spec = m8.manifest.inputs[0]
    recs, _ = load_hugadb(test, "thigh")
    ws = window_set(recs, str(spec.features.params["variant"]), int(spec.features.params["max_lag"]))
    xf = spec.normalisation.apply(ws.features)
    pf = keras.models.load_model(models / "float" / "imu_activity.keras").predict(xf, verbose=0, batch_size=1024)
    p8 = m8.run(features=ws.features)
    q = spec.quantisation
    lo, hi = (-128 - q.zero_point) * q.scale, (127 - q.zero_point) * q.scale
    return {"input_range": [round(lo, 2), round(hi, 2)], "windows": len(xf),
            "saturated_pct": round(100 * float(((xf < lo) | (xf > hi)).any(axis=1).mean()), 1),
            "max_top_level_diff": round(float(np.abs(pf["top_level"] - p8["top_level"]).max()), 3)}


def main(argv: list[str] | None = None) -> int:
    from training.finetune_imu import finetune

    ap = argparse.ArgumentParser(prog="python -m training.experiments.finetune_int8_range",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder in the shared/data format (its hugadb/)")
    ap.add_argument("--household", type=int, default=8, help="HuGaDB subject whose walking plays the household")
    ap.add_argument("--test", default="11,16", help="HuGaDB subjects to compare int8 and float on")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args(argv)
    src = args.data / "hugadb"
    test_ids = {int(s) for s in args.test.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        hugadb_subset(src, t / "household" / "hugadb",
                      lambda r: r["subject"] == args.household and r["session_type"] == "walking")
        hugadb_subset(src, t / "test", lambda r: r["subject"] in test_ids)
        bare = t / "base_without_calibration"  # the base as it was before its calibration file
        (bare / "float").mkdir(parents=True)
        for f in ("imu_activity.tflite", "imu_activity.json"):
            shutil.copy(MODELS_DIR / f, bare / f)
        shutil.copy(MODELS_DIR / "float" / "imu_activity.keras", bare / "float" / "imu_activity.keras")
        out = {"shipped": fidelity(MODELS_DIR, t / "test")}
        for name, base in (("finetuned_household_only", bare), ("finetuned_with_base", MODELS_DIR)):
            finetune(base / "imu_activity.tflite", t / "household", t / name, epochs=args.epochs,
                     allow_missing_classes=True)
            out[name] = fidelity(t / name, t / "test")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
