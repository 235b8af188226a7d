"""Gait identity, open set, subject-disjoint and cross-trial (never trains anything).

``python -m training.eval.gait_identity --data ../shared/data [--models daemon/models] [--json F]``

For each shipped gait model (``daemon/models/gait_<placement>.npz``) only the persons NOT
listed in its ``info.training.persons`` are evaluated (on ``../shared/data``: the held-out
persons of ``training.train_imu.HELD_OUT``; on an independent folder in the same format: all).
Windows are the daemon's own: ``ImuPipeline`` 2 s windows, 1 s hop, kept only while its gait
gate says walking, embedded by ``GaitModel.embed``.

Protocols (enrol from one trial, test on ANOTHER trial of the same person):

* waist / SisFall: enrol on D01 (walking slowly, 100 s), test on D02 (walking quickly), and
  the reverse. The only two walking trials per person; the speed differs, so this is a hard,
  realistic case (nobody walks at the enrolment pace all day).
* thigh / HuGaDB: rounds; in round k every person enrols from their k-th recording with
  >= ``min_enrol_windows`` walking windows (cycling through them) and is tested on all their
  other recordings (activity id 1 = walking only); the gallery is everybody evaluated.

Scores: cosine of the mean of ``pool`` consecutive test windows to each enrolled person's
template (``build_gait_template``), exactly the daemon's scoring. Genuine = own template,
impostor = every other enrolled person's template. EER, FRR at FAR 1 %, rank-1 over the
gallery of the evaluated persons; also for single windows (pool 1).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.dsp.imu import DEG2RAD, G
from daemon.dsp.imu_pipeline import imu_windows_from_record
from daemon.identity.gait import GaitModel, build_gait_template, load_gait_models
from training.data.imu import ImuRecord, load_hugadb, load_sisfall

MODELS_DIR = Path(__file__).resolve().parents[2] / "daemon" / "models"
DATASET_OF = {"waist": "sisfall", "thigh": "hugadb"}
HUGADB_WALKING = 1


@dataclass(frozen=True)
class GaitWindows:
    """Walking windows of one dataset: data (m, n, 6) SI float32, person / trial per row."""

    data: np.ndarray
    person: np.ndarray
    trial: np.ndarray
    code: np.ndarray

    def select(self, mask: np.ndarray) -> "GaitWindows":
        return GaitWindows(self.data[mask], self.person[mask], self.trial[mask], self.code[mask])


def walking_windows(records: list[ImuRecord], hugadb_activity: int = HUGADB_WALKING) -> GaitWindows:
    """The daemon's windows of each record, kept where the gait gate says walking (and, for
    HuGaDB, the whole window carries ``hugadb_activity``)."""
    data, person, trial, code = [], [], [], []
    for r in records:
        t = np.arange(r.si.shape[0], dtype=np.float64) / 100.0
        wins = imu_windows_from_record(t, r.si[:, :3] / G, r.si[:, 3:] / DEG2RAD)
        if not wins:
            continue
        keep = np.array([w.gait.walking and not w.clipped for w in wins])
        if r.labels is not None:
            n = wins[0].data.shape[0]
            ends = np.array([int(round(w.t_end_s * 100.0)) for w in wins])
            lab = np.stack([r.labels[e - n + 1:e + 1] for e in ends])
            keep &= (lab == hugadb_activity).all(axis=1)
        if not keep.any():
            continue
        data.append(np.stack([w.data for w, k in zip(wins, keep) if k]))
        m = int(keep.sum())
        person += [r.subject] * m
        trial += [r.file] * m
        code += [r.code] * m
    if not data:
        return GaitWindows(np.zeros((0, 200, 6), np.float32), np.array([]), np.array([]), np.array([]))
    return GaitWindows(np.concatenate(data).astype(np.float32), np.array(person), np.array(trial), np.array(code))


def load_gait_windows(data_dir: Path, dataset: str) -> GaitWindows:
    data_dir = Path(data_dir)
    if dataset == "sisfall":
        return walking_windows(load_sisfall(data_dir / "sisfall" if (data_dir / "sisfall").is_dir() else data_dir,
                                            codes=("D01", "D02")))
    records, _ = load_hugadb(data_dir / "hugadb" if (data_dir / "hugadb").is_dir() else data_dir, "thigh")
    return walking_windows(records)


# ------------------------------------------------------------------------------ protocols
def cross_trial_splits(w: GaitWindows, dataset: str, min_enrol: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, enrol rows, test rows) splits; every split = one trial enrolled, others tested."""
    out: list[tuple[str, np.ndarray, np.ndarray]] = []
    if dataset == "sisfall":
        for a, b in (("D01", "D02"), ("D02", "D01")):
            out += [(f"{a}->{b}", np.flatnonzero(w.code == a), np.flatnonzero(w.code == b))]
        return out
    eligible = {p: [t for t in np.unique(w.trial[w.person == p]) if (w.trial == t).sum() >= min_enrol]
                for p in np.unique(w.person)}
    eligible = {p: ts for p, ts in eligible.items() if ts}
    for k in range(max((len(ts) for ts in eligible.values()), default=0)):
        chosen = [ts[k % len(ts)] for ts in eligible.values()]
        enrol = np.isin(w.trial, chosen)
        test = ~enrol & np.isin(w.person, list(eligible))
        out.append((f"round {k}", np.flatnonzero(enrol), np.flatnonzero(test)))
    return out


def pooled_segments(emb: np.ndarray, trial: np.ndarray, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of ``pool`` consecutive windows of one trial (stride pool//2), unit length; and
    the row each segment starts at."""
    segs, starts = [], []
    for t in np.unique(trial):
        rows = np.flatnonzero(trial == t)
        step = max(1, pool // 2)
        for s in range(0, len(rows) - pool + 1, step):
            segs.append(emb[rows[s:s + pool]].mean(axis=0))
            starts.append(rows[s])
    if not segs:
        return np.zeros((0, emb.shape[1]), np.float32), np.zeros(0, np.intp)
    x = np.stack(segs).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), np.asarray(starts)


def eer_and_frr(genuine: np.ndarray, impostor: np.ndarray, far: float = 0.01) -> tuple[float, float, float]:
    """(EER %, FRR % at FAR = ``far``, threshold at that FAR) from score samples."""
    g, i = np.sort(np.asarray(genuine, np.float64)), np.sort(np.asarray(impostor, np.float64))
    th = np.unique(np.concatenate([g, i]))
    frr = np.searchsorted(g, th, side="left") / len(g)
    fa = 1.0 - np.searchsorted(i, th, side="left") / len(i)
    k = int(np.argmin(np.abs(fa - frr)))
    thr = float(np.quantile(i, 1.0 - far, method="higher"))
    return float(100 * (fa[k] + frr[k]) / 2), float(100 * np.mean(g <= thr)), thr


def score_split(emb: np.ndarray, w: GaitWindows, enrol: np.ndarray, test: np.ndarray, model: GaitModel,
                pool: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Genuine, impostor scores and rank-1 hits of every person who has both enrol and test rows."""
    names = [p for p in np.unique(w.person[enrol]) if np.any(w.person[test] == p)]
    templates, kept = [], []
    for p in names:
        tpl = build_gait_template(emb[enrol[w.person[enrol] == p]], model)
        if tpl is not None:
            templates.append(tpl.prototype)
            kept.append(p)
    gen, imp, hit = [], [], []
    if len(kept) < 2:
        return gen, imp, hit
    T = np.stack(templates)
    for j, p in enumerate(kept):
        rows = test[w.person[test] == p]
        segs, _ = pooled_segments(emb[rows], w.trial[rows], pool)
        if not len(segs):
            continue
        s = segs @ T.T
        gen.append(s[:, j])
        imp.append(np.delete(s, j, axis=1).ravel())
        hit.append(s.argmax(axis=1) == j)
    return gen, imp, hit


def evaluate_model(model: GaitModel, w: GaitWindows, dataset: str, exclude: set[str]) -> dict:
    w = w.select(~np.isin(w.person, sorted(exclude)))
    emb = model.embed(w.data) if len(w.data) else np.zeros((0, model.ref.dim), np.float32)
    splits = cross_trial_splits(w, dataset, model.min_enrol_windows)
    result: dict = {"model": f"{model.name} {model.version}", "dataset": dataset,
                    "persons": sorted(set(w.person.tolist())), "walking_windows": int(len(w.data))}
    for pool in sorted({1, model.pool}):
        gen, imp, hit = [], [], []
        for _, enrol, test in splits:
            g, i, h = score_split(emb, w, enrol, test, model, pool)
            gen += g
            imp += i
            hit += h
        if not gen:
            result[f"pool_{pool}"] = {"error": "fewer than two persons with an enrolment and a test trial"}
            continue
        g, i = np.concatenate(gen), np.concatenate(imp)
        eer, frr, _ = eer_and_frr(g, i)
        result[f"pool_{pool}"] = {"windows_pooled": pool, "eer": eer, "frr_at_far1": frr,
                                  "rank1": float(100 * np.concatenate(hit).mean()),
                                  "genuine_scores": int(g.size), "impostor_scores": int(i.size),
                                  "impostor_mean": float(i.mean()), "impostor_std": float(i.std()),
                                  "genuine_mean": float(g.mean())}
    result["splits"] = [s[0] for s in splits]
    return result


def evaluate_gait_identity(data_dir: Path, models_dir: Path = MODELS_DIR) -> dict:
    """Every shipped gait model on the persons it never saw (see the module docstring)."""
    models = load_gait_models(models_dir)
    if not models:
        raise SystemExit(f"{models_dir}: no gait_*.npz model; run python -m training.train_gait --data DIR first")
    out = {}
    for placement, model in models.items():
        dataset = DATASET_OF.get(placement)
        if dataset is None:
            continue
        if not ((Path(data_dir) / dataset).is_dir() or (Path(data_dir) / f"{dataset}.npz").is_file()):
            out[placement] = {"skipped": f"no {dataset}/ folder in {data_dir}"}
            continue
        training = model.info.get("training", {})
        trained_on = set(str(p) for p in training.get("persons", [])) if isinstance(training, dict) else set()
        out[placement] = evaluate_model(model, load_gait_windows(data_dir, dataset), dataset, trained_on)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval.gait_identity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with sisfall/ and hugadb/ (e.g. ../shared/data)")
    ap.add_argument("--models", type=Path, default=MODELS_DIR)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder (expected e.g. ../shared/data)", file=sys.stderr)
        return 2
    try:
        res = evaluate_gait_identity(args.data, args.models)
    except (OSError, ValueError, KeyError) as exc:  # DataError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res and all("skipped" in r for r in res.values()):
        print(f"error: {args.data}: nothing to evaluate: " + "; ".join(r["skipped"] for r in res.values()),
              file=sys.stderr)
        return 2
    for placement, r in res.items():
        if "skipped" in r:
            print(f"skipped: {placement}: {r['skipped']}")
            continue
        print(f"{placement} ({r['dataset']}, {len(r['persons'])} persons {', '.join(r['persons'])}; {r['walking_windows']} walking windows)")
        for key in sorted(k for k in r if k.startswith("pool_")):
            m = r[key]
            if "error" in m:
                print(f"  {key}: {m['error']}")
                continue
            print(f"  {m['windows_pooled']:2d} window(s): EER {m['eer']:.1f} %  FRR@FAR1% {m['frr_at_far1']:.1f} %  "
                  f"rank-1 {m['rank1']:.1f} %  ({m['genuine_scores']} genuine / {m['impostor_scores']} impostor scores)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
