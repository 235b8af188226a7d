"""Train, evaluate and export the IMU models (gender, age: SisFall waist; activity: HuGaDB thigh).

``python -m training.train_imu --data DIR --out daemon/models``        train + export (minutes)
``python -m training.train_imu --data DIR --out daemon/models --tasks gender,age``   only those
``python -m training.train_imu --data DIR --cv --json FILE``           grouped k-fold report

WHY two modes: the shipped models are trained on a fixed subset of persons and the held-out
persons are written into each manifest (``training.held_out``), so ``python -m training.eval
models`` can evaluate exactly the persons a model never saw. The numbers worth reporting come
from grouped k-fold by person (every person tested once, by a model that never saw them), for
the CNN in float, the same CNN exported int8 and run through the daemon runtime, and the
random-forest baseline on the same features.

Subject-level metrics: gender by vote of the person's windows; age as the median of the person's
window predictions against their age (the mean is reported beside it); activity macro-F1 over
windows (top-level and fine).

Age is learned as young vs elderly (``AGE_MODE = "groups"``, ``build_age_groups``): SisFall's
ages are two clusters, and measured subject-disjoint this beats regression (``--age-mode
regression``, the BioDeep head with a Huber loss), see docs/models/imu.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.dsp.imu import GAIT_STAT_NAMES, GAIT_STATS_PER_SIGNAL, acf_feature_size
from daemon.inference.manifest import Normalisation
from training.eval.imu import MODELS, task_metrics
from training.seeding import seed_everything
from training.data.imu import (
    FINE_CLASSES,
    HOP_S,
    MODEL_RATE_HZ,
    TOP_LEVEL,
    WINDOW_S,
    WindowSet,
    fine_index,
    load_hugadb,
    load_sisfall,
    top_level_index,
    window_set,
)

Progress = Callable[[str], None]

TASKS = ("gender", "age", "activity")
MODEL_NAMES = MODELS  # one table of task -> model file name, shared with the evaluation
VERSION = "1.0.0"
MAX_LAG = 10
STRIDE_S = 1.2
ACTIVITY_SENSOR = "thigh"
# Chosen by `--cv` (docs/models/imu.md): the variant that measured better per task.
VARIANT = {"gender": "gait", "age": "gait", "activity": "stride"}
AGE_MODES = ("groups", "regression")
AGE_MODE = "groups"
AGE_SPLIT_YEARS = 45.0  # young < split <= elderly; SisFall has nobody aged 28-59
AGE_SHARPNESS = 4.0  # logit gain of the age_years path of the groups model (see build_age_groups)
EPOCHS = {"gender": 20, "age": 25, "activity": 15}
SEEDS = {"gender": 3, "age": 3, "activity": 1}  # seed ensemble, averaged in one model file
# Age from the gait statistics alone: measured subject-disjoint, the ACF branch made the age
# group worse (docs/models/imu.md); gender uses both.
USE_ACF = {"gender": True, "age": False, "activity": True}
# Persons the shipped models never see (a mix of ages and sexes / of recorded activities).
HELD_OUT = {"sisfall": ("SA03", "SA10", "SE03", "SE07", "SE10"), "hugadb": ("8", "11", "16")}
AGE_WARNING = (". Age is young vs elderly mapped to the two training groups' mean ages "
               "(SisFall has nobody aged 28-59): read it as an age group, not a measurement")
SI_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


def _quiet(msg: str) -> None:
    pass


# ------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class Trained:
    model: object  # keras.Model
    normalisation: Normalisation


def zscore_of(x: np.ndarray) -> Normalisation:
    return Normalisation(kind="zscore", mean=x.mean(0).tolist(),
                         std=np.maximum(x.std(0), 1e-6).tolist(),
                         description="per-feature mean/std of the training windows")


def cnn_config(variant: str, task: str = "gender"):
    """The CNN's input layout for a feature variant: (lags x axes) ACF [+ gait statistics]."""
    from training.models import imu as M

    n_extra = 2 * GAIT_STATS_PER_SIGNAL if variant == "gait" else 0
    n_axes = (acf_feature_size(MAX_LAG, variant) - n_extra) // (MAX_LAG + 1)
    return M.CnnConfig(n_axes=n_axes, n_extra=n_extra, use_acf=USE_ACF[task] or not n_extra)


def age_groups(ws: WindowSet) -> tuple[float, float]:
    """Mean age of the young and of the elderly training persons (one value per person)."""
    subs, first = np.unique(ws.subject, return_index=True)
    ages = ws.age[first]
    young, old = ages[ages < AGE_SPLIT_YEARS], ages[ages >= AGE_SPLIT_YEARS]
    if not len(young) or not len(old):
        raise ValueError(f"age groups need persons on both sides of {AGE_SPLIT_YEARS:g} years")
    return float(young.mean()), float(old.mean())


def fit_task(task: str, ws: WindowSet, variant: str, epochs: int | None = None,
             seed: int = 0, age_mode: str = AGE_MODE, seeds: int | None = None) -> Trained:
    """Train the BioDeep CNN for ``task`` on all windows of ``ws`` (``SEEDS[task]`` networks
    of seeds ``seed, seed+1, ...`` averaged into one model)."""
    from training.models import imu as M

    n = SEEDS[task] if seeds is None else seeds
    members = [_fit_one(task, ws, variant, epochs, seed + i, age_mode) for i in range(n)]
    return Trained(M.average_models([m.model for m in members], MODEL_NAMES[task]),
                   members[0].normalisation)


def _fit_one(task: str, ws: WindowSet, variant: str, epochs: int | None, seed: int,
             age_mode: str) -> Trained:
    from training.models import imu as M

    M.limit_threads(1)
    norm = zscore_of(ws.features)
    x = norm.apply(ws.features)
    cfg = cnn_config(variant, task)
    epochs = EPOCHS[task] if epochs is None else epochs
    seed_everything(seed)
    if task == "gender":
        model = M.build_gender(cfg)
        M.fit(model, x, {"p_female": ws.female.astype(np.float32)[:, None]}, epochs,
              M.class_weights(ws.female), seed=seed)
    elif task == "age" and age_mode == "groups":
        young, old = age_groups(ws)
        model = M.build_age_groups(young, old, cfg, AGE_SHARPNESS)
        elderly = (ws.age >= AGE_SPLIT_YEARS).astype(np.int64)
        M.fit(model, x, {"p_elderly": elderly.astype(np.float32)[:, None]}, epochs,
              M.class_weights(elderly), seed=seed)
    elif task == "age":
        model = M.build_age(float(ws.age.mean()), float(ws.age.std() + 1e-6), cfg)
        M.fit(model, x, {"age_years": ws.age[:, None]}, epochs, seed=seed)
    else:
        model = M.build_activity(len(TOP_LEVEL), len(FINE_CLASSES), cfg)
        fit_activity(model, x, ws.activity, epochs, seed)
    return Trained(model, norm)


def fit_activity(model, x: np.ndarray, activity: np.ndarray, epochs: int, seed: int = 0,
                 batch_size: int = 256) -> None:
    """Both heads; windows without a fine class (one-person activities) train only the top head.

    The top head is weighted per *activity* (not per top-level class): running is a small part
    of "vigorous" next to one person's long bicycling, and would otherwise be learned as walking.
    """
    from training.models import imu as M

    top, fine = top_level_index(activity), fine_index(activity)
    w_top = M.class_weights(activity)
    w_fine = np.where(fine >= 0, M.class_weights(np.where(fine >= 0, fine, -1)), 0.0)
    seed_everything(seed)
    model.fit(x, {"top_level": top, "fine": np.maximum(fine, 0)},
              sample_weight={"top_level": w_top, "fine": w_fine.astype(np.float32)},
              epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)


def keras_outputs(trained: Trained, features: np.ndarray) -> dict[str, np.ndarray]:
    from training.models import imu as M

    return M.predict(trained.model, trained.normalisation.apply(features))


def fit_forest(task: str, ws: WindowSet, seed: int = 0):
    from training.models import imu as M

    rf = M.random_forest(task, seed)
    if task == "gender":
        rf.fit(ws.features, ws.female)
    elif task == "age":
        rf.fit(ws.features, ws.age)
    else:
        rf.fit(ws.features, top_level_index(ws.activity))
        rf_fine = M.random_forest(task, seed)
        has = fine_index(ws.activity) >= 0
        rf_fine.fit(ws.features[has], fine_index(ws.activity[has]))
        return rf, rf_fine
    return rf


def forest_outputs(task: str, rf, features: np.ndarray) -> dict[str, np.ndarray]:
    if task == "gender":
        return {"p_female": rf.predict_proba(features)[:, list(rf.classes_).index(1)]
                if 1 in rf.classes_ else np.zeros(len(features))}
    if task == "age":
        return {"age_years": rf.predict(features)}
    rf_top, rf_fine = rf
    return {"top_level": _full_proba(rf_top, features, len(TOP_LEVEL)),
            "fine": _full_proba(rf_fine, features, len(FINE_CLASSES))}


def _full_proba(rf, x: np.ndarray, k: int) -> np.ndarray:
    p = np.zeros((len(x), k), np.float32)
    p[:, rf.classes_] = rf.predict_proba(x)
    return p


# ------------------------------------------------------------------------------ manifests
def _feature_names(variant: str) -> list[str]:
    axes = SI_CHANNELS + (["acc_norm", "gyro_norm"] if variant == "magnitude" else [])
    names = [f"{a}_r{k}" for a in axes for k in range(MAX_LAG + 1)]
    if variant == "gait":
        names += [f"{sig}_{stat}" for sig in ("acc_norm", "gyro_norm") for stat in GAIT_STAT_NAMES]
    return names


def manifest_fields(task: str, variant: str, norm: Normalisation, persons: dict[str, list[str]],
                    held_out: dict[str, list[str]], metrics: dict | None = None,
                    age_mode: str = AGE_MODE) -> dict:
    """Everything the daemon needs to feed this model and nothing it must guess."""
    if task == "activity":
        placement = f"right {ACTIVITY_SENSOR} (HuGaDB: sensor strapped to the front of the thigh)"
        datasets = ["hugadb"]
        outputs = [{"name": "top_level", "meaning": "softmax over " + "/".join(TOP_LEVEL)},
                   {"name": "fine", "meaning": "softmax over HuGaDB activities recorded by "
                    ">= 2 persons; read together with top_level"}]
        labels = {"top_level": list(TOP_LEVEL), "fine": list(FINE_CLASSES)}
        thresholds: dict[str, float] = {}
        tasks = ["activity"]
    else:
        placement = "waist (SisFall: device on the belt, front)"
        datasets = ["sisfall"]
        if task == "gender":
            outputs = [{"name": "p_female", "meaning": "probability the wearer is female, per 2 s "
                        "walking/jogging window; decide per walk by vote (fraction > 0.5)"}]
            thresholds = {"p_female": 0.5}
        elif age_mode == "groups":
            outputs = [{"name": "age_years", "meaning": "estimated age in years, per 2 s "
                        "walking/jogging window, between the young and the elderly training "
                        "group's mean age; take the median over a walk"},
                       {"name": "p_elderly", "meaning": f"probability the wearer is >= "
                        f"{AGE_SPLIT_YEARS:g} years old, per window"}]
            thresholds = {"p_elderly": 0.5}
        else:
            outputs = [{"name": "age_years", "meaning": "estimated age in years, per 2 s "
                        "walking/jogging window; take the median over a walk"}]
            thresholds = {}
        labels = {}
        tasks = [task]
    gate = ("Feed only windows the gait gate (daemon.dsp.imu.detect_gait) marks as walking."
            if task != "activity" else "Feed every window; clipped windows should be dropped.")
    return {
        "version": VERSION,
        "tasks": tasks,
        "inputs": [{
            "name": "features",
            "shape": [acf_feature_size(MAX_LAG, variant)],
            "rate_hz": MODEL_RATE_HZ,
            "window_s": WINDOW_S,
            "channels": _feature_names(variant),
            "units": "autocorrelation of mean-removed acc (m/s²)² and gyro (rad/s)²"
                     + ("; then gait statistics of |acc| (m/s²) and |gyro| (rad/s), see "
                        "daemon.dsp.imu.gait_stats_batch" if variant == "gait" else ""),
            "normalisation": norm.model_dump(),
            "placement": placement,
            "features": {
                "kind": "acf",
                "params": {"variant": variant, "max_lag": MAX_LAG, "fs": MODEL_RATE_HZ,
                           "stride_s": STRIDE_S},
                "source_shape": [int(WINDOW_S * MODEL_RATE_HZ), 6],
                "source_channels": SI_CHANNELS,
                "source_units": "acc m/s², gyro rad/s, sensor axes as worn",
            },
            "description": f"daemon.dsp.imu.acf_features_batch(window, **params); {WINDOW_S:g} s "
                           f"windows every {HOP_S:g} s. {gate}",
        }],
        "outputs": outputs,
        "labels": labels,
        "thresholds": thresholds,
        "training": {"datasets": datasets, "persons": persons, "held_out": held_out,
                     "description": "subject-disjoint: held_out persons never seen in training"},
        "metrics": metrics or {},
        "notes": _model_note(task, variant) + "; see docs/models/imu.md"
                 + (AGE_WARNING if task == "age" and age_mode == "groups" else ""),
    }


def _model_note(task: str, variant: str) -> str:
    if variant == "gait" and not USE_ACF[task]:
        return (f"FC 64 + dropout on the {2 * GAIT_STATS_PER_SIGNAL} gait statistics of the "
                f"'gait' features (the ACF block is not read), {SEEDS[task]} seeds averaged")
    return ("BioDeep-style CNN (Conv1D 16, Conv1D 32, FC 64, dropout) on ACF features"
            + (" + gait statistics at the dense layer" if variant == "gait" else "")
            + (f", {SEEDS[task]} seeds averaged" if SEEDS[task] > 1 else ""))


# ------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ImuData:
    gait: dict[str, WindowSet]  # variant -> SisFall waist walking/jogging windows
    activity: dict[str, WindowSet]  # variant -> HuGaDB thigh windows
    excluded: tuple[str, ...]  # HuGaDB recordings with a corrupt gyroscope


def load_data(data_dir: Path, variants: dict[str, set[str]], progress: Progress = _quiet
              ) -> ImuData:
    data_dir = Path(data_dir)
    gait, act, excluded = {}, {}, ()
    if variants.get("gait"):
        recs = load_sisfall(data_dir / "sisfall")
        for v in sorted(variants["gait"]):
            gait[v] = window_set(recs, v, MAX_LAG)
        progress(f"SisFall: {len(recs)} walking/jogging trials, "
                 f"{len(next(iter(gait.values())))} windows")
    if variants.get("activity"):
        recs, excl = load_hugadb(data_dir / "hugadb", ACTIVITY_SENSOR)
        excluded = tuple(excl)
        for v in sorted(variants["activity"]):
            act[v] = window_set(recs, v, MAX_LAG)
        progress(f"HuGaDB ({ACTIVITY_SENSOR}): {len(recs)} recordings, {len(excl)} excluded "
                 f"(corrupt gyroscope), {len(next(iter(act.values())))} windows")
    return ImuData(gait, act, excluded)


def _ws_for(data: ImuData, task: str, variant: str) -> WindowSet:
    return data.activity[variant] if task == "activity" else data.gait[variant]


def _dataset(task: str) -> str:
    return "hugadb" if task == "activity" else "sisfall"


# ---------------------------------------------------------------------------- export + run
def int8_outputs(trained: Trained, task: str, variant: str, train_ws: WindowSet,
                 features: np.ndarray, out_dir: Path, name: str, age_mode: str = AGE_MODE
                 ) -> dict[str, np.ndarray]:
    """Export int8 (calibrated on the training windows) and run through the daemon runtime."""
    from daemon.inference.runtime import load_model
    from training.export import export_int8

    fields = manifest_fields(task, variant, trained.normalisation,
                             {_dataset(task): sorted(set(train_ws.subject.tolist()))}, {},
                             age_mode=age_mode)
    path = export_int8(trained.model, train_ws.features, out_dir, name, fields)
    return load_model(path).run(features=features)


# ---------------------------------------------------------------------------- cross-validation
def cv_windows(ws: WindowSet, task: str, include_held_out: bool = False) -> WindowSet:
    """The windows a k-fold of ``task`` may use: the training persons' only, unless asked."""
    if include_held_out:
        return ws
    return ws.select(~np.isin(ws.subject, HELD_OUT[_dataset(task)]))


def cross_validate(data_dir: Path, variants: tuple[str, ...] = ("biodeep", "normalized", "stride"),
                   tasks: tuple[str, ...] = TASKS, folds: int = 5, int8: bool = True,
                   progress: Progress = _quiet, age_mode: str = AGE_MODE,
                   include_held_out: bool = False) -> dict:
    """Grouped k-fold by person: CNN float / CNN int8 / random forest, per task and variant.

    Over the training persons only (``HELD_OUT`` left out) unless ``include_held_out``. WHY:
    the k-fold is where variants, seeds and the age mode are chosen; folds that hold the
    held-out persons would let those choices see the persons the shipped models are then
    reported on (the k-fold tables in docs/models/imu.md before 2026-11-23 did)."""
    from sklearn.model_selection import GroupKFold

    need = {"gait": set(variants) if {"gender", "age"} & set(tasks) else set(),
            "activity": set(variants) if "activity" in tasks else set()}
    data = load_data(data_dir, need, progress)
    report: dict = {"folds": folds, "excluded_hugadb_recordings": len(data.excluded),
                    "age_mode": age_mode, "held_out_included": include_held_out}
    with tempfile.TemporaryDirectory(prefix="biod_imu_cv_") as tmp:
        for task in tasks:
            for variant in variants:
                ws = cv_windows(_ws_for(data, task, variant), task, include_held_out)
                preds: dict[str, dict[str, np.ndarray]] = {}
                for k, (tr, te) in enumerate(GroupKFold(folds).split(ws.features, groups=ws.subject)):
                    t0 = time.time()
                    train, test = ws.select(tr), ws.select(te)
                    trained = fit_task(task, train, variant, age_mode=age_mode)
                    outs = {"cnn_float": keras_outputs(trained, test.features)}
                    if int8:
                        outs["cnn_int8"] = int8_outputs(trained, task, variant, train,
                                                        test.features, Path(tmp), f"{task}_{k}",
                                                        age_mode)
                    outs["rf"] = forest_outputs(task, fit_forest(task, train), test.features)
                    for kind, o in outs.items():
                        for key, v in o.items():
                            arr = preds.setdefault(kind, {}).setdefault(
                                key, np.zeros((len(ws), *np.shape(v)[1:]), np.float32))
                            arr[te] = v
                    progress(f"cv {task}/{variant} fold {k + 1}/{folds} ({time.time() - t0:.0f}s)")
                report.setdefault(task, {})[variant] = {
                    kind: task_metrics(task, ws, o) for kind, o in preds.items()}
                progress(f"cv {task}/{variant}: {json.dumps(report[task][variant])}")
    return report


# ------------------------------------------------------------------------------ shipping
def train_imu(data_dir: Path, out_dir: Path, progress: Progress = _quiet,
              tasks: tuple[str, ...] = TASKS) -> dict:
    """Train the shipped models on all but the held-out persons, export, evaluate held-out.

    Writes ``<out>/imu_{gender,age,activity}.tflite`` + ``.json`` (int8), float twins and the
    Keras models (for ``training.finetune_imu``) under ``<out>/float/``. Returns the held-out
    metrics also written into each manifest.
    """
    from daemon.inference.runtime import load_model
    from training.export import export_float, export_int8, save_calibration_windows, update_manifest

    out_dir = Path(out_dir)
    (out_dir / "float").mkdir(parents=True, exist_ok=True)
    need = {"gait": {VARIANT[t] for t in ("gender", "age") if t in tasks},
            "activity": {VARIANT["activity"]} if "activity" in tasks else set()}
    data = load_data(data_dir, need, progress)
    summary: dict = {"excluded_hugadb_recordings": len(data.excluded)}
    for task in tasks:
        t0 = time.time()
        variant, ds = VARIANT[task], _dataset(task)
        ws = _ws_for(data, task, variant)
        held = np.isin(ws.subject, HELD_OUT[ds])
        train, test = ws.select(~held), ws.select(held)
        persons = {ds: sorted(set(train.subject.tolist()), key=_person_key)}
        held_out = {ds: sorted(set(test.subject.tolist()), key=_person_key)}
        trained = fit_task(task, train, variant)
        fields = manifest_fields(task, variant, trained.normalisation, persons, held_out)
        name = MODEL_NAMES[task]
        p8 = export_int8(trained.model, train.features, out_dir, name, fields)
        save_calibration_windows(out_dir / "float", name, train.features)  # for finetune_imu
        pf = export_float(trained.model, out_dir / "float", name, fields)
        trained.model.save(out_dir / "float" / f"{name}.keras")
        metrics = {}
        if len(test):
            metrics = {
                "int8": task_metrics(task, test, load_model(p8).run(features=test.features)),
                "float": task_metrics(task, test, load_model(pf).run(features=test.features)),
                "rf_baseline": task_metrics(
                    task, test, forest_outputs(task, fit_forest(task, train), test.features)),
            }
            update_manifest(p8, metrics=metrics)
            update_manifest(pf, metrics=metrics)
        size = p8.stat().st_size
        summary[task] = {"model": str(p8), "bytes": size, "variant": variant,
                         "train_windows": len(train), "held_out_windows": len(test),
                         "held_out_metrics": metrics}
        progress(f"{name}: {size} B int8, held-out {json.dumps(metrics.get('int8', {}))} "
                 f"({time.time() - t0:.0f}s)")
    return summary


def _person_key(p: str) -> tuple[int, str]:
    return (int(p), "") if p.isdigit() else (0, p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train_imu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder in the shared/data format")
    ap.add_argument("--out", type=Path, default=Path("daemon/models"))
    ap.add_argument("--cv", action="store_true", help="grouped k-fold report instead of training")
    ap.add_argument("--variants", default="biodeep,normalized,stride")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--age-mode", choices=AGE_MODES, default=AGE_MODE,
                    help="cv: age as young/elderly groups (shipped) or as regression")
    ap.add_argument("--no-int8", action="store_true", help="cv: skip the int8 export per fold")
    ap.add_argument("--include-held-out", action="store_true",
                    help="cv: fold the held-out persons in too (how the k-fold ran before "
                         "2026-11-23; they are then no longer an independent test)")
    ap.add_argument("--json", type=Path, help="write the result to this JSON file")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder (expected the shared/data format)",
              file=sys.stderr)
        return 2
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    if args.cv:
        res = cross_validate(args.data, tuple(args.variants.split(",")),
                             tuple(args.tasks.split(",")), args.folds, not args.no_int8, say,
                             args.age_mode, args.include_held_out)
    else:
        from training.data.ecg import DataError

        try:
            res = train_imu(args.data, args.out, say, tuple(args.tasks.split(",")))
        except (DataError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    text = json.dumps(res, indent=2, default=float)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
