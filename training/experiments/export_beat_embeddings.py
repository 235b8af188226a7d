"""Per development fold, the beat-morphology half of the served identity embedding, for
``ecg_recipe_sweep`` to score the FUSED embedding (CNN + beats) on development folds.

    python -m training.experiments.export_beat_embeddings --data ../shared/data \
        --windows .gpu/win.npz --out .gpu/beats.npz

For each fold of ``ecg_recipe_sweep.folds_of`` the per-lead PCA + LDA projections are fitted
exactly as ``training/train_beats.py`` fits the shipped ones (``fit_projections``), on the
training records WITHOUT that fold's persons, and every exported window (training identity
windows, then calibration windows, in the order of ``--windows``) gets the beat vector of
``daemon/inference/beatmorph.py``'s ``embed`` (float projections, not int8). Writes ``beats``
of shape (folds, windows, 3 * K), float16.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from daemon.inference.beatmorph import beat_features, pool_beats
from training.data.ecg import load_training_records, record_windows
from training.experiments.ecg_recipe_sweep import folds_of
from training.train_beats import PIPELINE_KW, distinct_beats, fit_projections


def window_vectors(ws, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``BeatMorphModel.embed`` with the float projection (W, b) for every window of ``ws``
    (the same ``pool_beats``; the shipped model runs the int8 projection instead)."""
    out = np.zeros((len(ws.rec), W.shape[0] * W.shape[2]), np.float32)
    for i, (m, mask) in enumerate(zip(ws.morph, ws.lead_mask)):
        if m.ndim != 3 or m.shape[0] == 0 or not mask.any():
            continue
        # a projection twice as wide as the beats reads each beat with its slope (beat model 3.x)
        feats = beat_features(m[:, :, :3], slope=W.shape[1] == 2 * m.shape[1])
        out[i] = pool_beats(np.einsum("bld,ldk->blk", feats, W) + b, mask)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.export_beat_embeddings")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--windows", type=Path, required=True, help="export_ecg_windows output")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    z = np.load(args.windows)
    meta = json.loads(Path(f"{args.windows}.json").read_text())
    recs, calib = load_training_records(args.data)
    ws = record_windows(recs, PIPELINE_KW)
    cws = record_windows(calib, PIPELINE_KW)
    # the same windows as the exported CNN windows (the beat outputs change nothing else)
    if not (np.array_equal(ws.x.astype(np.float16), z["ix"]) and np.array_equal(cws.x.astype(np.float16), z["cx"])):
        raise RuntimeError("windows differ from --windows: export both from the same data")
    beats, brec = distinct_beats(ws)
    person = np.array([ws.records[r].person for r in brec])
    vecs = []
    for k, fold in enumerate(folds_of(meta)):
        keep = ~np.isin(person, fold)
        W, b = fit_projections(beats[keep], brec[keep], ws.records,
                               progress=lambda m, k=k: print(f"fold {k}: {m}", flush=True))
        vecs.append(np.concatenate([window_vectors(ws, W, b), window_vectors(cws, W, b)]))
    np.savez_compressed(args.out, beats=np.stack(vecs).astype(np.float16))
    print(f"{args.out}: {np.stack(vecs).shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
