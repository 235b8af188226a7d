"""Fine-tune the IMU activity model on a household's own labelled recordings.

``python -m training.finetune_imu --base daemon/models/imu_activity.tflite --data DIR --out DIR``

WHY: a household's sensor sits a little differently and its people move their own way; a few
minutes of their own labelled recordings adapt the model. The convolution layers (the ACF
feature detectors learned on many persons) are frozen and only the dense head is retrained, so
a few minutes of data suffice and training is fast on a hub-class CPU. The base model's input
normalisation is kept: the frozen layers were trained on it.

``--base``: a ``.keras`` model, or a shipped ``.tflite`` whose Keras twin sits in ``float/``
beside it (``training.train_imu`` writes it). ``--data``: a folder in the HuGaDB format of
``../shared/data/hugadb`` (``metadata.json`` + ``hugadb.npz``, per-sample activity ids), a
folder holding such a ``hugadb/``, or the folder ``biod record --label ACTIVITY`` wrote on the hub
(``imu_*.hea`` WFDB records with ``.labels.csv``; recorded at the model's placement).
``--compare``: also train the same network from scratch and
report how much sooner fine-tuning reaches the same macro-F1 (recordings split alternately into
fine-tune / test so no window of a test recording is trained on).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from daemon.inference.manifest import Normalisation, load_manifest, manifest_path_for
from training.data.imu import WindowSet, load_biod_imu, load_hugadb, top_level_index, window_set
from training.eval.imu import activity_metrics

FROZEN = ("conv1", "conv2")
#: windows of each top-level activity (rest, walking, vigorous) a fine-tune needs. WHY: the head
#: is retrained with a softmax over every class; shown some activities only, it learns to answer
#: those and forgets the others.
MIN_WINDOWS_PER_CLASS = 20


def keras_base(base: Path) -> Path:
    """The Keras model to start from: ``base`` itself or the shipped model's ``float/`` twin."""
    base = Path(base)
    if base.suffix == ".keras":
        return base
    twin = base.parent / "float" / f"{base.stem}.keras"
    if not twin.exists():
        raise FileNotFoundError(f"{twin} not found: fine-tuning needs the Keras model; run "
                                "`python -m training.train_imu --data DIR --out "
                                f"{base.parent}` or pass --base path/to/model.keras")
    return twin


def _manifest_for(keras_path: Path):
    """The manifest of the shipped model the Keras file belongs to (normalisation, features)."""
    for candidate in (keras_path.parent.parent / f"{keras_path.stem}.json",
                      keras_path.with_suffix(".json")):
        if candidate.exists():
            return load_manifest(candidate)
    raise FileNotFoundError(f"no manifest for {keras_path}: expected "
                            f"{manifest_path_for(keras_path.parent.parent / keras_path.stem)}")


def household_windows(data: Path, manifest, persons: tuple[str, ...] | None = None
                      ) -> tuple[WindowSet, np.ndarray, str]:
    """Windows of the household recordings featurised as the base manifest states, the index
    of the recording each window comes from, and the dataset they belong to: ``household``
    for `biod record` files, ``hugadb`` for a HuGaDB folder."""
    data = Path(data)
    from daemon.biometrics import placement_of

    sensor = placement_of(manifest.inputs[0].placement) or "thigh"
    if any(data.glob("imu_*.hea")):  # what `biod record` wrote on the hub
        recs, excluded, dataset = load_biod_imu(data), [], "household"
        other = sorted({r.placement for r in recs} - {sensor})
        if other:
            raise ValueError(f"{data}: records made at the {', '.join(other)}; {manifest.name} is trained for "
                             f"the {sensor}: fine-tune only with recordings of an IMU worn there")
        folder = data
    else:
        folder = data / "hugadb" if (data / "hugadb").is_dir() else data
        recs, excluded = load_hugadb(folder, sensor)
        dataset = "hugadb"
    if persons:
        recs = [r for r in recs if r.subject in persons]
    if excluded:
        print(f"note: {len(excluded)} recordings with a clipped gyroscope excluded",
              file=sys.stderr)
    params = manifest.inputs[0].features.params
    sets, rec_ids = [], []
    for i, r in enumerate(recs):
        try:
            ws = window_set([r], str(params["variant"]), int(params["max_lag"]))
        except ValueError:
            continue  # too short or no trainable label
        sets.append(ws)
        rec_ids.append(np.full(len(ws), i))
    if not sets:
        raise ValueError(f"{folder}: no labelled windows of the trained activities")
    merged = WindowSet(*(np.concatenate([getattr(s, f) for s in sets])
                         for f in WindowSet.__dataclass_fields__))
    return merged, np.concatenate(rec_ids), dataset


def calibration_windows(kpath: Path, name: str, household: np.ndarray, report: dict) -> np.ndarray:
    """The int8 calibration set: the base model's own calibration windows (saved beside its
    Keras twin by training.train_imu) plus the household's. WHY: the conv layers are frozen
    and keep seeing the whole range of movement; calibrated on a household's few minutes of
    walking alone, the int8 input range shrank to that and other persons' windows saturated
    (measured by training.experiments.finetune_int8_range; docs/models/imu.md)."""
    base = kpath.parent / f"{name}.representative.npz"
    if not base.exists():
        report["calibration"] = "household windows only (no base calibration windows found)"
        print(f"warning: {base} not found: the int8 model is calibrated on the household's windows "
              "only and may saturate on movements they lack; retrain the base with training.train_imu",
              file=sys.stderr)
        return household
    with np.load(base) as z:
        own = np.asarray(z["features"], np.float32)
    if own.shape[1:] != household.shape[1:]:
        raise ValueError(f"{base}: windows of shape {own.shape[1:]}, the household's are {household.shape[1:]}")
    report["calibration"] = f"{len(own)} base calibration windows + {len(household)} household windows"
    return np.concatenate([own, household.astype(np.float32)])


def prepare(model, frozen: bool) -> None:
    """Freeze (or not) the conv layers and recompile; only the head trains when frozen."""
    from training.models.imu import compile_activity

    for layer in model.layers:
        layer.trainable = not (frozen and layer.name in FROZEN)
    compile_activity(model)


def train_curve(model, x: np.ndarray, ws: WindowSet, x_test: np.ndarray, test: WindowSet,
                epochs: int) -> list[dict[str, float]]:
    """Train epoch by epoch; after each, the test macro-F1 and the cumulative training time."""
    from training.train_imu import fit_activity

    curve, spent = [], 0.0
    for e in range(epochs):
        t0 = time.process_time()
        fit_activity(model, x, ws.activity, 1, seed=e)
        spent += time.process_time() - t0
        out = model.predict(x_test, batch_size=1024, verbose=0)
        m = activity_metrics(test.activity, np.asarray(out["top_level"]), np.asarray(out["fine"]))
        curve.append({"epoch": e + 1, "cpu_s": spent, **m})
    return curve


def _time_to(curve: list[dict[str, float]], key: str, target: float) -> float | None:
    for point in curve:
        if point[key] >= target:
            return point["cpu_s"]
    return None


def check_classes(ws: WindowSet, data: Path, allow_missing: bool) -> None:
    """Refuse (ValueError) data that lacks a top-level activity, unless ``allow_missing``."""
    from training.data.imu import TOP_LEVEL

    top = top_level_index(ws.activity)
    counts = {name: int(np.sum(top == i)) for i, name in enumerate(TOP_LEVEL)}
    short = [name for name, n in counts.items() if n < MIN_WINDOWS_PER_CLASS]
    if short and not allow_missing:
        raise ValueError(
            f"{data}: too few windows of {', '.join(short)} ({', '.join(f'{k} {v}' for k, v in counts.items())}; "
            f"need {MIN_WINDOWS_PER_CLASS} of each): a model fine-tuned on some activities forgets the others. "
            "Record the missing ones (biod record --label sitting|standing|walking|running ...), or pass "
            "--allow-missing-classes to accept that")


def finetune(base: Path, data: Path, out: Path, epochs: int = 10, compare: bool = False,
             scratch_epochs: int = 30, persons: tuple[str, ...] | None = None,
             allow_missing_classes: bool = False) -> dict:
    import keras

    from training.models.imu import build_activity, limit_threads
    from training.export import export_int8, reexport_fields, save_calibration_windows

    limit_threads(1)
    kpath = keras_base(base)
    manifest = _manifest_for(kpath)
    norm: Normalisation = manifest.inputs[0].normalisation
    ws, rec, dataset = household_windows(data, manifest, persons)
    report: dict = {"base": str(kpath), "windows": len(ws), "persons": sorted(set(ws.subject))}
    check_classes(ws, data, allow_missing_classes)
    if compare:
        if len(np.unique(rec)) < 2:
            raise ValueError(f"{data}: --compare needs at least two recordings (alternate ones are the test "
                             "set); record another one or leave out --compare")
        test_mask = rec % 2 == 1  # alternate recordings: no window of a test recording trains
        train, test = ws.select(~test_mask), ws.select(test_mask)
    else:
        train, test = ws, None
    x = norm.apply(train.features)
    model = keras.models.load_model(kpath)
    if test is not None:
        xt = norm.apply(test.features)
        out0 = model.predict(xt, batch_size=1024, verbose=0)
        report["base_before_finetune"] = activity_metrics(
            test.activity, np.asarray(out0["top_level"]), np.asarray(out0["fine"]))
        prepare(model, frozen=True)
        ft = train_curve(model, x, train, xt, test, epochs)
        cfg_axes = model.get_layer("conv1").input.shape[-1]
        from training.models.imu import CnnConfig

        scratch = build_activity(len(manifest.labels["top_level"]), len(manifest.labels["fine"]),
                                 CnnConfig(n_axes=int(cfg_axes)))
        sc = train_curve(scratch, x, train, xt, test, scratch_epochs)
        key = "top_macro_f1"
        target = 0.98 * min(max(p[key] for p in ft), max(p[key] for p in sc))
        t_ft, t_sc = _time_to(ft, key, target), _time_to(sc, key, target)
        report.update({
            "finetune_curve": ft, "scratch_curve": sc, "target_top_macro_f1": target,
            "finetune_cpu_s_to_target": t_ft, "scratch_cpu_s_to_target": t_sc,
            "speedup": (t_sc / t_ft) if t_ft and t_sc else None,
            "finetune_final": ft[-1], "scratch_final": sc[-1],
        })
    else:
        prepare(model, frozen=True)
        from training.train_imu import fit_activity

        fit_activity(model, x, train.activity, epochs)
    fields = reexport_fields(manifest)
    # The persons fine-tuned on are listed under the dataset they come from: the IMU evaluation
    # leaves out the manifest's persons *of the dataset it evaluates on*, and under a separate
    # "household" key HuGaDB persons fine-tuned on were evaluated as unseen.
    tuned = set(train.subject.tolist()) | set(manifest.training.persons.get(dataset, []))
    fields["training"] = {
        "datasets": manifest.training.datasets + ([dataset] if dataset not in manifest.training.datasets else []),
        "persons": {**manifest.training.persons, dataset: sorted(tuned)},
        "held_out": {}, "description": f"fine-tuned (conv frozen) from {kpath.name} on {data}"}
    fields["metrics"] = {"household_test": report["finetune_final"]} if compare else {}
    calibration = calibration_windows(kpath, manifest.name, train.features, report)
    path = export_int8(model, calibration, Path(out), manifest.name, fields)
    (Path(out) / "float").mkdir(parents=True, exist_ok=True)
    model.save(Path(out) / "float" / f"{manifest.name}.keras")  # to fine-tune again later
    save_calibration_windows(Path(out) / "float", manifest.name, calibration)
    report["model"] = str(path)
    report["bytes"] = path.stat().st_size
    report["top_level_present"] = sorted(set(top_level_index(train.activity).tolist()))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.finetune_imu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--compare", action="store_true",
                    help="also train from scratch and report the speed-up")
    ap.add_argument("--scratch-epochs", type=int, default=30)
    ap.add_argument("--persons", help="comma-separated person ids to use (default: all)")
    ap.add_argument("--allow-missing-classes", action="store_true",
                    help=f"fine-tune even when a top-level activity has fewer than {MIN_WINDOWS_PER_CLASS} windows "
                         "(the model then tends to forget it)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        res = finetune(args.base, args.data, args.out, args.epochs, args.compare,
                       args.scratch_epochs,
                       tuple(args.persons.split(",")) if args.persons else None,
                       allow_missing_classes=args.allow_missing_classes)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=2, default=float)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
