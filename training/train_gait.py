"""Fit the gait identity projections (LDA on TRAINING persons only) and ship them as .npz + .json.

``python -m training.train_gait --data ../shared/data --out daemon/models``   (about a minute)

Writes ``gait_waist.npz`` and ``gait_thigh.npz`` (arrays + ``meta_json``, see daemon.identity.gait).

One model per placement, because a waist belt and a thigh strap see different signals:
``gait_waist`` from SisFall (D01/D02 walking, waist) and ``gait_thigh`` from HuGaDB (walking,
right thigh, corrupt-gyro files excluded by the loader). The held-out persons of
``training.train_imu.HELD_OUT`` are never seen here; the persons used are written into the
model's metadata (``info.training.persons``) so ``python -m training.eval.gait_identity`` evaluates only the
others.

Why LDA (docs/identity.md, "Gait identity"): on training persons, cross-validated by person,
z-normalised ACF features scored by cosine were near chance (EER 34-47 %), an LDA projection
fitted on other persons brought it to 11-22 %. The projection is linear: a (F, k) float32
matrix applied in numpy on the hub. The score z-norm shipped with the model (impostor mean /
std of pooled cosines) comes from the same person-grouped cross-validation, never from the
persons it is applied to.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from daemon.identity.fusion import ScoreNorm
from daemon.identity.gait import GaitModel, gait_features
from training.eval.gait_identity import (
    DATASET_OF,
    GaitWindows,
    cross_trial_splits,
    eer_and_frr,
    evaluate_model,
    load_gait_windows,
    score_split,
)
from training.train_imu import HELD_OUT

VERSION = "1.0.0"
# Chosen by person-grouped CV on training persons (docs/identity.md): features and LDA size.
SETTINGS = {"waist": {"features": "stride_lognorm", "dims": 16},
            "thigh": {"features": "stride", "dims": 8}}
POOL = 5
CV_FOLDS = 4


def fit(w: GaitWindows, placement: str, features: str, dims: int, score_norm: ScoreNorm | None = None) -> GaitModel:
    """z-norm + shrinkage LDA (persons as classes) on the rows of ``w``.

    The z-norm already centres the features on the training mean, which is the origin the
    cosine scores are measured from (``center`` stays zero)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    f = gait_features(w.data, features).astype(np.float64)
    mean, scale = f.mean(axis=0), f.std(axis=0) + 1e-6
    x = (f - mean) / scale
    k = min(dims, len(np.unique(w.person)) - 1)
    lda = LinearDiscriminantAnalysis(n_components=k, solver="eigen", shrinkage="auto").fit(x, w.person)
    return GaitModel(name=f"gait_{placement}", version=VERSION, placement=placement, features=features,
                     fs_hz=100.0, window_s=2.0, mean=mean.astype(np.float32), scale=scale.astype(np.float32),
                     center=np.zeros(x.shape[1], np.float32), projection=lda.scalings_[:, :k].astype(np.float32),
                     score_norm=score_norm or ScoreNorm("znorm", 0.0, 1.0), pool=POOL)


def cross_validate(w: GaitWindows, placement: str, features: str, dims: int, seed: int = 0) -> dict:
    """Person-grouped k-fold on training persons: pooled genuine/impostor scores of unseen persons."""
    dataset = DATASET_OF[placement]
    persons = np.random.default_rng(seed).permutation(np.unique(w.person))
    gen, imp, hit = [], [], []
    for i in range(CV_FOLDS):
        test_p = persons[i::CV_FOLDS]
        model = fit(w.select(~np.isin(w.person, test_p)), placement, features, dims)
        part = w.select(np.isin(w.person, test_p))
        emb = model.embed(part.data)
        for _, enrol, test in cross_trial_splits(part, dataset, model.min_enrol_windows):
            g, im, h = score_split(emb, part, enrol, test, model, POOL)
            gen += g
            imp += im
            hit += h
    g, i = np.concatenate(gen), np.concatenate(imp)
    eer, frr, _ = eer_and_frr(g, i)
    return {"eer": eer, "frr_at_far1": frr, "rank1": float(100 * np.concatenate(hit).mean()),
            "impostor_mean": float(i.mean()), "impostor_std": float(i.std()), "genuine_mean": float(g.mean()),
            "genuine_scores": int(g.size), "impostor_scores": int(i.size), "folds": CV_FOLDS, "windows_pooled": POOL}


def train(data_dir: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for placement, dataset in DATASET_OF.items():
        s = SETTINGS[placement]
        all_w = load_gait_windows(data_dir, dataset)
        held = np.isin(all_w.person, HELD_OUT[dataset])
        w = all_w.select(~held)
        cv = cross_validate(w, placement, s["features"], s["dims"])
        model = fit(w, placement, s["features"], s["dims"],
                    ScoreNorm("znorm", cv["impostor_mean"], max(cv["impostor_std"], 1e-3)))
        persons = sorted(set(w.person.tolist()), key=lambda p: (len(p), p))
        held_res = evaluate_model(model, all_w, dataset, set(persons))
        extra = {
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "description": f"gait identity projection ({s['features']} ACF features, shrinkage LDA) for an IMU worn at the {placement}",
            "training": {"dataset": dataset, "persons": persons, "held_out": list(HELD_OUT[dataset]),
                         "description": "subject-disjoint: held_out persons never seen in fitting",
                         "cv_on_training_persons": cv},
            "held_out_metrics": {k: v for k, v in held_res.items() if k.startswith("pool_")},
        }
        model = replace(model, info=extra)
        model.save(out_dir / f"{model.name}.npz")
        report[placement] = {"cv": cv, "held_out": extra["held_out_metrics"]}
        print(f"{model.name}: {len(w.data)} training windows, {len(persons)} persons, dim {model.ref.dim}; "
              f"CV EER {cv['eer']:.1f} % rank-1 {cv['rank1']:.1f} %; held-out "
              f"{json.dumps({k: round(v['eer'], 1) for k, v in extra['held_out_metrics'].items() if 'eer' in v})}",
              flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train_gait", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "daemon" / "models")
    args = ap.parse_args(argv)
    train(args.data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
