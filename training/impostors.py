"""The built-in impostor set: embeddings of never-enrolled persons, shipped with the ECG model.

``biod calibrate`` sets a new person's open-set threshold for a target false-accept rate, and
reports the expected rate, against persons who are neither enrolled nor in the model's training
data. This command computes those embeddings with the shipped int8 model and the daemon's own
pipeline, from the LUDB persons the model's manifest lists as held out, once with lead I only
(a one-lead wearable, ECG-ID-like) and once with leads I, II, III, so that an enrolment is
compared with impostors seen through the same leads. The lead-I set also holds the ECG-ID
threshold-calibration persons (never fitted on by any model): LUDB's clinical 12-lead recorder
alone is another domain than a one-lead wearable, and its lead-I windows score so low against
ECG-ID persons that thresholds set from it let wearable-recorded strangers through (the demo's
stranger was accepted as alice at 0.35). Only embeddings leave the data folder.

    python -m training.impostors --data ../shared/data [--models daemon/models]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from daemon.biometrics import MODELS_DIR, EcgModelRunner
from daemon.dsp.ecg_pipeline import windows_from_record
from daemon.enrol import IMPOSTORS_FILE
from training.data.ecg import load_ludb, load_training_records


def ludb_leads_mv(data: Path) -> dict[str, tuple[np.ndarray, float]]:
    """LUDB person id -> (leads I, II, III in mV, rate Hz), through the training loader (its
    checks, its rate from metadata.json); empty when the folder has no ludb/."""
    return {r.person.split(":", 1)[1]: (r.x_mv, r.fs) for r in load_ludb(data)}


def build(data: Path, models: Path) -> Path:
    runner = EcgModelRunner.load(models / "ecg_dualtask.tflite")
    manifest = runner.model.manifest
    held = set(manifest.training.held_out.get("ludb", []))
    trained = set(manifest.training.persons.get("ludb", []))
    records = {pid: xf for pid, xf in ludb_leads_mv(data).items() if pid in held and pid not in trained}
    if not records:
        raise SystemExit(f"no held-out LUDB person in {data}: the manifest holds out {sorted(held)[:5]}...")
    sets: dict[str, tuple[list[np.ndarray], list[str]]] = {"I": ([], []), "I_II_III": ([], [])}

    def add(key: str, label: str, x: np.ndarray, fs: float, valid: np.ndarray) -> None:
        xv = np.where(valid[None, :], x, 0.0).astype(np.float32)
        rw = windows_from_record(xv, fs, valid, **runner.pipeline_kwargs())
        for i in np.flatnonzero(rw.identity_ok):  # the windows the daemon would use
            e, _ = runner.infer(rw.windows[i])  # exactly the daemon's identity embedding
            sets[key][0].append(e.astype(np.float32))
            sets[key][1].append(label)

    for pid, (x, fs) in sorted(records.items()):
        add("I", f"ludb-{pid}", x, fs, np.array([True, False, False]))
        add("I_II_III", f"ludb-{pid}", x, fs, np.ones(3, bool))
    _, calib = load_training_records(data)
    for r in sorted(calib, key=lambda r: (r.person, r.record)):  # one label per person, all its dates
        add("I", r.person.replace(":", "-"), r.x_mv, r.fs, np.asarray(r.lead_valid, bool))
    path = models / IMPOSTORS_FILE
    np.savez_compressed(
        path,
        embeddings=np.stack(sets["I"][0]), labels=np.array(sets["I"][1]),
        embeddings_3lead=np.stack(sets["I_II_III"][0]), labels_3lead=np.array(sets["I_II_III"][1]),
        model_version=np.array(f"{runner.ref.name} {runner.ref.version} {runner.ref.weights}"),
        source=np.array("PhysioNet LUDB v1.0.1 (Kalyakulina et al., ODC-By 1.0), persons held out of the model's "
                        "training; lead-I set also PhysioNet ECG-ID (Lugovaya 2005, ODC-By 1.0) threshold-calibration "
                        "persons, never fitted on; embeddings only"),
    )
    print(f"wrote {path}: {len(sets['I'][0])} lead-I windows of {len(set(sets['I'][1]))} persons and "
          f"{len(sets['I_II_III'][0])} 3-lead windows of {len(records)} persons, all never enrolled or fitted on")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.impostors", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--models", type=Path, default=MODELS_DIR)
    args = ap.parse_args(argv)
    build(args.data, args.models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
