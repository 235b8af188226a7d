"""Export the training partition's ECG model windows for ``ecg_recipe_sweep`` (a GPU machine
without TensorFlow cannot run the daemon-DSP data preparation of training/train_ecg.py).

    python -m training.experiments.export_ecg_windows --data ../shared/data --out .gpu/win.npz

Writes ``OUT`` (float16 windows, lead masks, record index, window end, class labels of the
identity windows; the calibration persons' windows; the constructed activity windows with
their donor person) and ``OUT.json`` (classes, per-record dataset/person/session/duration).
Only training and calibration persons are exported (asserted), never a held-out one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.data.ecg import is_training_person
from training.train_ecg import prepare


def records_meta(ws) -> list[dict]:
    """Per record of ``ws`` what ``ecg_recipe_sweep.DevScorer`` needs to know of it."""
    return [{"dataset": r.dataset, "person": r.person, "session": r.session, "dur": r.duration_s}
            for r in ws.records]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.export_ecg_windows")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    data = prepare(args.data, print)
    assert all(is_training_person(r.person) for r in data.ident.records + data.calib.records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, ix=data.ident.x.astype(np.float16), imask=data.ident.lead_mask,
        irec=data.ident.rec, iend=data.ident.t_end_s, ilab=data.ident_labels,
        cx=data.calib.x.astype(np.float16), cmask=data.calib.lead_mask, crec=data.calib.rec,
        cend=data.calib.t_end_s, ax=data.act_x.astype(np.float16), amask=data.act_mask,
        ay=data.act_y, aperson=data.act_person)
    Path(f"{args.out}.json").write_text(json.dumps({
        "classes": list(data.classes), "irecs": records_meta(data.ident),
        "crecs": records_meta(data.calib)}))
    print(f"{args.out}: {len(data.ident.x)} identity, {len(data.calib.x)} calibration, "
          f"{len(data.act_x)} activity windows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
