"""Evaluate the shipped IMU models on persons they never saw (never trains anything).

``evaluate_imu(data_dir, models_dir, figures=None) -> dict`` is called by
``python -m training.eval models``. For each of ``imu_gender``, ``imu_age``, ``imu_activity``
it reads the manifest, excludes every person listed in ``training.persons`` (so on
``../shared/data`` only the held-out persons count, and on an independent folder in the same
format all persons count), computes the features the manifest names with the daemon's DSP, and
runs the int8 model and its float twin (``<models>/float/``) through the daemon runtime.
Subject-level metrics: gender by vote over a person's windows, age as the median of a person's
window estimates, activity macro-F1 over windows (top-level and fine).

A model whose dataset folder (``sisfall/`` or ``hugadb/``) is not in ``data_dir``, or whose
persons there all trained it, is skipped with the reason (``{"skipped": ...}``; printed as a
``skipped:`` line by ``main``); the confusion figure is drawn only into a folder that is given
(``--figures DIR``; the committed one: ``--figures docs/models``). Recordings the loaders leave
out (a subject without age/sex in ``subjects``) are listed under ``"notes"``; person ids are
compared with the manifests' in one spelling (:func:`training.data.ecg.person_id`).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from daemon.inference.manifest import Manifest
from daemon.inference.runtime import Model, load_model
from training.data.ecg import person_id
from training.data.imu import (
    FINE_CLASSES,
    SISFALL_GAIT_CODES,
    TOP_LEVEL,
    DataError,
    WindowSet,
    fine_index,
    load_hugadb,
    load_sisfall,
    top_level_index,
    window_set,
)

MODELS = {"gender": "imu_gender", "age": "imu_age", "activity": "imu_activity"}
IMU_DATASETS = ("sisfall", "hugadb")


class Skip(Exception):
    """This model or measurement cannot be evaluated on the folder (the message says why)."""


def _need_dataset(data_dir: Path, dataset: str) -> None:
    if not (Path(data_dir) / dataset).is_dir():
        raise Skip(f"no {dataset}/ folder in {data_dir}")


# ------------------------------------------------------------------------------- metrics
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial interval, percent, for k successes in n: with 5
    held-out persons, "5 of 5 right" only says the rate is probably above 48 %, and the report
    should say so."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


def person_bootstrap_mean(per_person: np.ndarray, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-person values, persons drawn with replacement."""
    draws = np.random.default_rng(seed).integers(0, len(per_person), (n_boot, len(per_person)))
    a = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(np.asarray(per_person, float)[draws].mean(1), [a, 100.0 - a])
    return float(lo), float(hi)


def gender_metrics(subject: np.ndarray, female: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Subject-level: a person is called female when most of their windows have p > 0.5;
    ``subject_accuracy_lo`` / ``_hi``: its exact 95 % interval over the persons."""
    subs = np.unique(subject)
    votes = np.array([(p[subject == s] > 0.5).mean() > 0.5 for s in subs])
    truth = np.array([female[subject == s][0] == 1 for s in subs])
    lo, hi = clopper_pearson(int((votes == truth).sum()), len(subs))
    return {"subject_accuracy": float((votes == truth).mean() * 100),
            "subject_accuracy_lo": lo, "subject_accuracy_hi": hi,
            "window_accuracy": float(((p > 0.5) == (female == 1)).mean() * 100),
            "persons": float(len(subs))}


def age_metrics(subject: np.ndarray, age: np.ndarray, pred: np.ndarray,
                split_years: float = 45.0) -> dict[str, float]:
    """Subject-level MAE: |median of the person's window estimates - their age|.

    Why the median: a few windows (a stumble, a turn) must not move a person's age; the mean is
    reported beside it (``subject_mae_years_mean``, the protocol of the first models).
    ``subject_group_accuracy``: young/elderly (``split_years``) called right, per person;
    ``subject_mae_years_lo`` / ``_hi``: 95 % person-bootstrap interval of the subject MAE.
    """
    subs = np.unique(subject)
    truth = np.array([age[subject == s][0] for s in subs])
    med = np.array([np.median(pred[subject == s]) for s in subs])
    mean = np.array([pred[subject == s].mean() for s in subs])
    lo, hi = person_bootstrap_mean(np.abs(med - truth))
    return {"subject_mae_years": float(np.abs(med - truth).mean()),
            "subject_mae_years_lo": lo, "subject_mae_years_hi": hi,
            "subject_mae_years_mean": float(np.abs(mean - truth).mean()),
            "subject_group_accuracy": float(((med >= split_years) == (truth >= split_years)).mean()
                                            * 100),
            "window_mae_years": float(np.abs(pred - age).mean()),
            "persons": float(len(subs))}


def activity_metrics(activity: np.ndarray, top_prob: np.ndarray, fine_prob: np.ndarray
                     ) -> dict[str, float]:
    """Window-level macro-F1 / accuracy, top-level over all windows, fine over fine classes."""
    from sklearn.metrics import accuracy_score, f1_score

    top, fine = top_level_index(activity), fine_index(activity)
    tp, fp = top_prob.argmax(1), fine_prob.argmax(1)
    has = fine >= 0
    present_top = sorted(set(top.tolist()))
    present_fine = sorted(set(fine[has].tolist()))
    # Top-level over the activities recorded by >= 2 persons only (bicycling and sitting in a
    # car come from one person: unseen in any subject-disjoint test of that person).
    multi_top = sorted(set(top[has].tolist()))
    return {
        "top_macro_f1": float(f1_score(top, tp, average="macro", labels=present_top) * 100),
        "top_macro_f1_multi_person_activities": float(
            f1_score(top[has], tp[has], average="macro", labels=multi_top) * 100),
        "top_accuracy": float(accuracy_score(top, tp) * 100),
        "fine_macro_f1": float(f1_score(fine[has], fp[has], average="macro",
                                        labels=present_fine) * 100),
        "fine_accuracy": float(accuracy_score(fine[has], fp[has]) * 100),
        "windows": float(len(activity)),
    }


def task_metrics(task: str, ws: WindowSet, out: dict[str, np.ndarray]) -> dict[str, float]:
    if task == "gender":
        return gender_metrics(ws.subject, ws.female, out["p_female"].reshape(-1))
    if task == "age":
        return age_metrics(ws.subject, ws.age, out["age_years"].reshape(-1))
    return activity_metrics(ws.activity, out["top_level"], out["fine"])


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (y, pred), 1)
    return m


# ---------------------------------------------------------------------------- evaluation
def run_batches(model: Model, x: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(x), batch):
        for k, v in model.run(features=x[s:s + batch]).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def _seen(manifest: Manifest, dataset: str) -> set[str]:
    """The ``dataset`` persons ``manifest`` was trained on, spelt as the loaders spell them."""
    return {person_id(dataset, p) for p in manifest.training.persons.get(dataset, [])}


def _windows(data_dir: Path, manifest: Manifest, notes: list[str] | None = None
             ) -> tuple[str, WindowSet]:
    """The windows of every person the model was not trained on, featurised as it states."""
    spec = manifest.inputs[0]
    if spec.features is None or spec.features.kind != "acf":
        raise ValueError(f"{manifest.name}: manifest states no ACF feature spec")
    params = spec.features.params
    dataset = manifest.training.datasets[0]
    if dataset in IMU_DATASETS:
        _need_dataset(data_dir, dataset)
    if dataset == "sisfall":
        recs = load_sisfall(data_dir / "sisfall", SISFALL_GAIT_CODES, notes=notes)
    elif dataset == "hugadb":
        m = re.search(r"right (foot|shin|thigh)", spec.placement or "")
        if not m:
            raise ValueError(f"{manifest.name}: placement {spec.placement!r} names no HuGaDB sensor")
        recs, _ = load_hugadb(data_dir / "hugadb", m.group(1), notes=notes)
    else:
        raise ValueError(f"{manifest.name}: unknown training dataset {dataset!r}")
    seen = _seen(manifest, dataset)
    recs = [r for r in recs if r.subject not in seen]
    if not recs:
        raise Skip(f"every person in {data_dir / dataset} was used for training "
                   f"{manifest.name}; evaluate on a folder with other persons")
    ws = window_set(recs, str(params["variant"]), int(params["max_lag"]),
                    window_s=float(spec.window_s or 2.0))
    return dataset, ws


def evaluate_imu(data_dir: Path, models_dir: Path, figures: Path | None = None) -> dict:
    """Metrics of the shipped IMU models (int8 and float twin) on unseen persons.

    Writes ``imu_activity_confusion.png`` (int8, top-level and fine) into ``figures`` unless
    it is None. Raises :class:`~training.data.imu.DataError` when neither dataset is there.
    """
    data_dir, models_dir = Path(data_dir), Path(models_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir} is not a folder")
    if not any((data_dir / d).is_dir() for d in IMU_DATASETS):
        raise DataError(f"{data_dir}: no {' or '.join(d + '/' for d in IMU_DATASETS)} folder: "
                        "nothing to evaluate (the format of ../shared/data)")
    res: dict = {}
    notes: list[str] = []
    for task, name in MODELS.items():
        path = models_dir / f"{name}.tflite"
        if not path.exists():
            res[task] = {"error": f"{path} not found; run `python -m training.train_imu "
                                  f"--data DIR --out {models_dir}`"}
            continue
        model = load_model(path)
        try:
            dataset, ws = _windows(data_dir, model.manifest, notes)
        except Skip as exc:
            res[task] = {"skipped": str(exc)}
            continue
        entry: dict = {"dataset": dataset, "persons": sorted(set(ws.subject.tolist())),
                       "placement": model.manifest.inputs[0].placement}
        outs = {"int8": run_batches(model, ws.features)}
        twin = models_dir / "float" / f"{name}.tflite"
        if twin.exists():
            outs["float"] = run_batches(load_model(twin), ws.features)
        for kind, out in outs.items():
            entry[kind] = task_metrics(task, ws, out)
        if task == "activity" and figures is not None:
            entry["confusion_png"] = str(_confusion_figure(ws, outs["int8"], Path(figures)))
        res[task] = entry
    try:
        res["activity_from_motion"] = evaluate_motion_rule(data_dir, models_dir, notes)
    except Skip as exc:
        res["activity_from_motion"] = {"skipped": str(exc)}
    if notes:  # each once (several models read the same folder); absent on a complete folder
        res["notes"] = list(dict.fromkeys(notes))
    return res


def skipped_lines(res: dict) -> list[str]:
    """``skipped: <what>: <why>`` for every part of an :func:`evaluate_imu` result left out."""
    return [f"skipped: {task}: {entry['skipped']}" for task, entry in res.items()
            if isinstance(entry, dict) and "skipped" in entry]


def _pipeline_windows(rec) -> list:
    """The daemon's ImuPipeline windows of one record (what the hub computes, gait included)."""
    from daemon.dsp.imu_pipeline import imu_windows_from_record

    t = np.arange(len(rec.si)) / 100.0
    return imu_windows_from_record(t, rec.si[:, :3] / 9.80665, np.degrees(rec.si[:, 3:]))


def evaluate_motion_rule(data_dir: Path, models_dir: Path, notes: list[str] | None = None) -> dict:
    """``daemon.dsp.imu.motion_activity`` (activity for an IMU worn where no activity model was
    trained) on persons its thresholds were not chosen on: SisFall waist walking (D01, D02) and
    jogging (D03, D04) trials of the persons the waist models did not train on, and, as the
    stillness proxy (SisFall has no long rest trials), HuGaDB sitting/standing windows of the
    persons the activity model did not train on. Also the thigh activity model on the same
    waist windows, which is what a waist-worn IMU got before the placement check."""
    from daemon.dsp.imu import MOTION_CLASSES, acf_features_batch, motion_activity

    data_dir, models_dir = Path(data_dir), Path(models_dir)
    for dataset in IMU_DATASETS:  # walking/jogging from SisFall, rest from HuGaDB: both needed
        _need_dataset(data_dir, dataset)
    age = load_model(models_dir / "imu_age.tflite").manifest
    seen = _seen(age, "sisfall")
    act_model = load_model(models_dir / "imu_activity.tflite")
    act = act_model.manifest
    spec = act.inputs[0]
    params = spec.features.params
    truth, pred, data, persons = [], [], [], set()
    for r in load_sisfall(data_dir / "sisfall", ("D01", "D02", "D03", "D04"), notes=notes):
        if r.subject in seen:
            continue
        persons.add(r.subject)
        for w in _pipeline_windows(r):
            truth.append(2 if r.code in ("D03", "D04") else 1)
            pred.append(motion_activity(w.data[:, :3], w.gait))
            data.append(w.data)
    if not data:
        raise Skip(f"no SisFall D01-D04 windows of persons the waist models did not train on "
                   f"in {data_dir / 'sisfall'}")
    waist = np.array(truth)
    feats = acf_features_batch(np.stack(data), int(params["max_lag"]), str(params["variant"]))
    thigh_model = run_batches(act_model, feats.reshape((-1, *spec.shape)))["top_level"].argmax(axis=1)
    thigh_acc = 100.0 * float(np.mean(thigh_model == waist))
    hseen = _seen(act, "hugadb")
    recs, _ = load_hugadb(data_dir / "hugadb", "thigh", notes=notes)
    for r in (r for r in recs if r.subject not in hseen):
        for w in _pipeline_windows(r):
            e = int(round(w.t_end_s * 100))
            lab = r.labels[max(0, e - len(w.data) + 1):e + 1]
            if len(lab) and (lab == lab[0]).all() and lab[0] in (5, 8):  # sitting, standing
                truth.append(0)
                pred.append(motion_activity(w.data[:, :3], w.gait))
    y = np.array(truth)
    decided = np.array([p is not None for p in pred])
    p = np.array([MOTION_CLASSES.index(q) if q is not None else -1 for q in pred])
    f1s, per_class = [], {}
    for c, name in enumerate(MOTION_CLASSES):
        tp = np.sum((p == c) & (y == c))
        prec, rec = tp / max(np.sum(p == c), 1), tp / max(np.sum(y == c), 1)
        f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
        per_class[name] = {"windows": int(np.sum(y == c)), "recall": 100.0 * float(rec)}
    return {"windows": int(len(y)), "decided_pct": 100.0 * float(decided.mean()),
            "accuracy": 100.0 * float(np.mean(p == y)), "macro_f1": 100.0 * float(np.mean(f1s)),
            "per_class": per_class, "sisfall_persons": sorted(persons),
            "thigh_model_on_waist_accuracy": thigh_acc,
            "motion_rule_on_waist_accuracy": 100.0 * float(np.mean(p[: len(waist)] == waist)),
            "note": "walking/vigorous: SisFall waist D01-D04; rest: HuGaDB thigh sitting/standing (proxy)"}


def main(argv: list[str] | None = None) -> int:
    """``python -m training.eval.imu --data DIR [--models DIR] [--figures DIR] [--json FILE]``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m training.eval.imu", description=__doc__)
    ap.add_argument("--data", type=Path, required=True, help="folder in the shared/data format")
    ap.add_argument("--models", type=Path, default=Path("daemon/models"))
    ap.add_argument("--figures", type=Path, default=None, metavar="DIR",
                    help="also draw imu_activity_confusion.png into DIR (the committed one: "
                    "docs/models); default: no figure")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        res = evaluate_imu(args.data, args.models, args.figures)
    except (OSError, ValueError, KeyError) as exc:  # DataError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=2, default=float)
    print(text)
    for line in skipped_lines(res) + [f"note: {n}" for n in res.get("notes", [])]:
        print(line, file=sys.stderr)  # stderr: stdout stays one JSON document
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


def _confusion_figure(ws: WindowSet, out: dict[str, np.ndarray], folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    top, fine = top_level_index(ws.activity), fine_index(ws.activity)
    has = fine >= 0
    mats = [(confusion(top, out["top_level"].argmax(1), len(TOP_LEVEL)), TOP_LEVEL, "top-level"),
            (confusion(fine[has], out["fine"][has].argmax(1), len(FINE_CLASSES)), FINE_CLASSES,
             "fine")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 2]})
    for ax, (m, labels, title) in zip(axes, mats):
        ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"IMU activity {title} (int8, persons {', '.join(np.unique(ws.subject))})",
                     fontsize=9)
    fig.tight_layout()
    path = folder / "imu_activity_confusion.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
