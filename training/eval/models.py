"""``python -m training.eval models --data DIR [--models PATH] [--json FILE] [--out-figures DIR]``

Evaluates the shipped (or given) int8 models AND their float twins on any folder in the format
of shared/data, never training anything:

* ECG identity (training/eval/identity.py protocol): rank-1, EER, FRR at FAR = 1 % for 3 s,
  10 s and 30 s tests, the cross-session subset, and the false-accept rate of never-enrolled
  persons (LUDB, MIT-BIH) at the manifest's operating threshold; every window scored, and again
  (``gated_*``) with only the windows that pass quality for identity
  (``Quality.ok_for_identity``), as the daemon enrols and identifies;
* ECG activity on constructed windows (training/data/ecg_activity.py) from the gudb subjects
  the manifest does not list as training persons (a printed note when none is left);
* IMU metrics from ``training.eval.imu.evaluate_imu``;
* int8 inference time per window on one core;
* 95 % person-bootstrap intervals of the identity metrics and of the paired int8 - float and
  int8 - baseline differences, and rank-1 averaged per person (``--bootstrap N``).

Persons listed in a model manifest's ``training.persons`` are dropped first, so the numbers are
subject-disjoint on shared/data (held-out persons) and on a folder of unseen persons (all).
DET curves and the activity confusion matrix are drawn only when ``--out-figures DIR`` is given
(the committed ones: ``--out-figures docs/models``); without it nothing is written but ``--json``.

A folder without ECG persons to evaluate (e.g. only ``hugadb/`` + ``sisfall/``) skips the ECG part
with a printed ``skipped:`` line, a folder without IMU data skips the IMU part alike. A malformed
dataset is a one-line ``error:`` naming the file; records the loaders leave out (a MIT-BIH record
shorter than a 10 s segment, an ECG-ID record without a readable date, a SisFall subject without
age/sex) are printed as ``note:`` lines and kept in the JSON. The ECG results are printed before
the IMU part starts, and a broken IMU folder costs only the IMU part; identity
metrics that need impostor comparisons (EER, FRR at FAR 1 %, FAR at the threshold) and rank-1
are left out, with a printed note, when fewer than 2 persons are enrolled.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from daemon.biometrics import EcgModelRunner
from daemon.inference.beatmorph import BEATS_FILE
from daemon.inference.manifest import load_manifest
from daemon.inference.runtime import load_model
from training.data.ecg import DataError, EcgRecord, WindowSet, fingerprint, load_all, person_key, record_windows
from training.data.ecg_activity import RRSeries, gudb_person, load_gudb_rr
from training.eval.identity import (
    TEST_LENGTHS_S, fused_embeddings, gallery_and_tests, genuine_impostor, identity_metrics,
    impostor_tests, person_bootstrap)

ECG_MODEL = "ecg_dualtask"
DEFAULT_MODELS = Path(__file__).resolve().parents[2] / "daemon" / "models"
ACTIVITY_SEED = 7
ACTIVITY_PER_SERIES = 4


def float_twin(int8_path: Path) -> Path:
    """Where the float32 twin of a shipped int8 model lives (not installed on hubs)."""
    return int8_path.parent / "float" / int8_path.name


def training_persons(manifest) -> set[str]:
    """Every person a manifest lists as trained on, as ``"<dataset>:<id>"`` spelt like the
    loaders spell them (:func:`training.data.ecg.person_key`), so "05" and "5" are one person."""
    return {person_key(ds, pid) for ds, ids in manifest.training.persons.items() for pid in ids}


def unseen_records(everyone: list[EcgRecord], manifests: list) -> tuple[list[EcgRecord], set[str], list[str]]:
    """(the records of persons none of ``manifests`` trained on, the persons left out, notes).

    By content where the manifests carry ``training.fingerprints``: a person is a training person
    when any of their recordings is one the model trained on, whatever number this folder gives
    them; a folder of other persons numbered from 1 keeps them all (by number, every one had been
    left out and the identity metrics with them). Manifests without fingerprints: by number."""
    ids = set().union(*(training_persons(m) for m in manifests))
    prints = set().union(*(m.training.fingerprints for m in manifests))
    persons = {r.person for r in everyone}
    if not prints:
        seen = persons & ids
        return [r for r in everyone if r.person not in seen], seen, []
    seen = {r.person for r in everyone if fingerprint(r) in prints}
    notes = []
    if renumbered := sorted(seen - ids):
        notes.append(f"{len(renumbered)} person(s) hold recordings the model trained on under another number "
                     f"({', '.join(renumbered[:5])}{' ...' if len(renumbered) > 5 else ''}): left out as training persons")
    if reused := sorted((persons & ids) - seen):
        notes.append(f"{len(reused)} person(s) carry a training person's number but none of their recordings "
                     f"({', '.join(reused[:5])}{' ...' if len(reused) > 5 else ''}): evaluated as new persons")
    return [r for r in everyone if r.person not in seen], seen, notes


def pipeline_kwargs(manifest) -> dict:
    spec = manifest.inputs[0]
    return {"model_fs": int(round(spec.rate_hz)), "window_s": float(spec.window_s), "hop_s": 1,
            "norm": "zscore"}


def run_batches(model, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(x), batch):
        for k, v in model.run(ecg=x[s:s + batch]).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def time_per_window_ms(model, x: np.ndarray, n: int = 200) -> float:
    """Median single-window latency (the runtime's interpreter runs on one thread)."""
    one = x[:1]
    for _ in range(10):
        model.run(ecg=one)
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        model.run(ecg=x[i % len(x): i % len(x) + 1])
        ts.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(ts))


class NoEcgPersons(ValueError):
    """The folder holds no ECG person the models were not trained on: nothing to evaluate."""


def identity_eval(ws: WindowSet, emb: np.ndarray, threshold: float) -> tuple[dict, dict]:
    """All identity numbers for one model; also the 10 s genuine/impostor scores for the DET."""
    out: dict[str, float] = {}
    curves = {}
    ecg_only = np.array([ws.records[i].dataset == "ecgid" for i in ws.rec])
    for length in TEST_LENGTHS_S:
        names, templates, tests = gallery_and_tests(ws, emb, length)
        out.update(identity_metrics(names, templates, tests, threshold, prefix=f"id{length}s_"))
        imp = impostor_tests(ws, emb, length) if (~ecg_only).any() else np.zeros((0, emb.shape[1]))
        if len(imp) and len(names):
            best = (imp @ templates.T).max(1)
            out[f"id{length}s_never_enrolled_far_at_thr"] = 100.0 * float(np.mean(best >= threshold))
            out[f"id{length}s_never_enrolled_n"] = float(len(imp))
        if length == 10 and len(names) >= 2 and len(tests.person):  # a DET needs impostor scores
            curves["genuine"], curves["impostor"] = genuine_impostor(names, templates, tests)
    return out, curves


def activity_eval(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    pred = probs.argmax(1)
    f1s = []
    for c in range(probs.shape[1]):
        tp = np.sum((pred == c) & (y == c))
        p = tp / max(np.sum(pred == c), 1)
        r = tp / max(np.sum(y == c), 1)
        f1s.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    return {"activity_accuracy": 100.0 * float(np.mean(pred == y)),
            "activity_macro_f1": 100.0 * float(np.mean(f1s)),
            "activity_n": float(len(y))}


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def evaluate_ecg(data_dir: Path, models_dir: Path, figures: Path | None = None,
                 progress=print, baseline_fit: Path | None = None, n_boot: int = 0) -> dict:
    """Float and int8 ECG metrics on the non-training persons of ``data_dir``; with
    ``baseline_fit``, also the BASELINES.md PCA + LDA baseline fitted on that folder's training
    persons (training/eval/identity_baseline.py) and scored on the same tests; with ``n_boot``,
    person-bootstrap intervals of the served embedding's metrics (:func:`identity_bootstrap`)."""
    from training.train_ecg import activity_windows_of

    int8_path = Path(models_dir) / f"{ECG_MODEL}.tflite"
    manifest = load_manifest(int8_path.with_suffix(".json"))
    manifests = [manifest]
    kw = pipeline_kwargs(manifest)
    threshold = float(manifest.thresholds["identity_cosine"])
    beats_path = int8_path.with_name(BEATS_FILE)
    if beats_path.exists():  # the daemon fuses the beat-morphology model: evaluate what it serves
        beats_manifest = load_manifest(beats_path.with_suffix(".json"))
        manifests.append(beats_manifest)
        kw.update(EcgModelRunner.load(int8_path).pipeline_kwargs())
        threshold = float(beats_manifest.thresholds["identity_cosine"])
    load_notes: list[str] = []
    everyone = load_all(Path(data_dir), notes=load_notes)
    if not everyone:
        raise NoEcgPersons(f"{data_dir}: no ECG records found (no ecgid/, ludb/ or mitdb/ "
                           "records): nothing to evaluate")
    records, excluded, seen_notes = unseen_records(everyone, manifests)
    seen_ids = set().union(*(training_persons(m) for m in manifests))  # gudb subjects and the baseline's fit: by number
    load_notes += seen_notes
    # never-enrolled persons are scored on lead I (LUDB) / their one lead (MIT-BIH) like ECG-ID
    records = [_lead_i_only(r) for r in records]
    result: dict = {"persons_evaluated": len({r.person for r in records}),
                    "persons_excluded_as_training": len(excluded), "threshold": threshold}
    if not records:
        raise NoEcgPersons(f"{data_dir}: no ECG persons left after excluding the model's "
                           f"training persons (all {len(excluded)} are): nothing to evaluate")
    ws = record_windows(records, kw)
    result["notes"] = load_notes + _gallery_notes(ws)
    result["windows"] = len(ws.x)
    result["windows_quality_rejected"] = int((~ws.ok).sum())
    # What the daemon serves: `biod calibrate` and the identity engine use only windows that
    # pass quality for identity (Quality.ok_for_identity), so the gated_* metrics build
    # templates and tests from those alone.
    id_ok = ws.identity_ok
    result["windows_identity_rejected"] = int((~id_ok).sum())
    gated_ws = None if id_ok.all() else ws.select(id_ok)
    donors = [r for r in everyone if r.person not in excluded and r.dataset in ("ludb", "ecgid")]
    rr, activity_note = activity_series(Path(data_dir), seen_ids, donors)
    ax, _, ay, _ = activity_windows_of(rr, donors, seed=ACTIVITY_SEED, per_series=ACTIVITY_PER_SERIES)
    if activity_note is None and not len(ay):
        activity_note = (f"the gudb series of {', '.join(sorted({gudb_person(s.subject) for s in rr}))} "
                         "are too short for one constructed record: no ECG activity metrics")
    if activity_note is not None:
        result["notes"].append(activity_note)
    for note in result["notes"]:
        progress(f"note: {note}")
    models = {"int8": load_model(int8_path)}
    fpath = float_twin(int8_path)
    if fpath.exists():
        models["float"] = load_model(fpath)
    curves, confs = {}, {}
    embs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # kind -> (CNN embeddings, served ones)
    runners = {"int8": EcgModelRunner.load(int8_path)}
    if fpath.exists():
        runners["float"] = EcgModelRunner.load(fpath)
    for kind, model in models.items():
        cnn = run_batches(model, ws.x)["embedding"]
        emb = fused_embeddings(runners[kind], ws, cnn) if ws.morph is not None else cnn
        embs[kind] = (cnn, emb)
        metrics, curves[kind] = identity_eval(ws, emb, threshold)
        if gated_ws is not None:
            gated, _ = identity_eval(gated_ws, emb[id_ok], threshold)
            metrics.update({f"gated_{k}": v for k, v in gated.items()})
        if ws.morph is not None:  # the CNN alone, for the record of what the fusion adds
            cnn_only, _ = identity_eval(ws, cnn, float(manifest.thresholds["identity_cosine"]))
            metrics.update({f"cnn_only_{k}": v for k, v in cnn_only.items()})
        if len(ay):
            probs = run_batches(model, ax)["activity"]
            metrics.update(activity_eval(ay, probs))
            confs[kind] = confusion(ay, probs.argmax(1), probs.shape[1])
        metrics["ms_per_window_1core"] = time_per_window_ms(model, ws.x)
        beats = runners[kind].beats
        if beats is not None and ws.morph is not None:  # its share of the per-window cost
            ts = []
            for i in range(min(200, len(ws.morph))):
                t0 = time.perf_counter()
                beats.embed(ws.morph[i], ws.lead_mask[i])
                ts.append(time.perf_counter() - t0)
            metrics["beats_ms_per_window_1core"] = 1000.0 * float(np.median(ts))
        result[kind] = metrics
        progress(f"ecg {kind}: evaluated {len(ws.x)} identity windows, {len(ay)} activity windows")
    if "float" in embs:
        result["int8_vs_float"] = int8_fidelity(*embs["int8"], *embs["float"])
    served = {kind: emb for kind, (_, emb) in embs.items()}
    if baseline_fit is not None:
        result["baseline"], served["baseline"] = _baseline(Path(baseline_fit), seen_ids, ws, kw, progress)
    if n_boot:
        result["bootstrap"] = identity_bootstrap(ws, served, n_boot)
        if result["bootstrap"]:
            progress(f"bootstrap: {n_boot} draws of the test persons")
        else:
            result["notes"].append("no person-bootstrap intervals: fewer than 2 enrolled persons "
                                   "with tests")
            progress(f"note: {result['notes'][-1]}")
    if figures is not None:
        _figures(Path(figures), curves, confs, list(manifest.labels.get("activity", [])))
    if not result["notes"]:  # the JSON of a complete folder stays as it was
        del result["notes"]
    return result


def activity_series(data_dir: Path, seen: set[str], donors: list[EcgRecord]
                    ) -> tuple[list[RRSeries], str | None]:
    """The gudb RR series of the subjects the manifest does not list as trained on (``seen``),
    and why there will be no ECG activity metric, or None.

    WHY the manifest and not a fixed list of subject numbers: on a folder of unseen persons
    numbered otherwise (the independent gudb set is 15-24) a fixed list kept nothing and the
    activity metrics vanished without a word."""
    every = load_gudb_rr(data_dir)
    rr = [s for s in every if gudb_person(s.subject) not in seen]
    if not every:
        return rr, f"no gudb_rpeaks/ R-peak series in {data_dir}: no ECG activity metrics"
    if not rr:
        subjects = sorted({s.subject for s in every})
        return rr, (f"no gudb persons the model was not trained on (subjects "
                    f"{', '.join(map(str, subjects))} are all in its manifest): no ECG activity metrics")
    if not donors:
        return rr, ("no ECG-ID or LUDB person the model was not trained on to lend beats to the "
                    "gudb RR series: no ECG activity metrics")
    return rr, None


def _gallery_notes(ws: WindowSet) -> list[str]:
    """What the identity protocol cannot measure on these windows, said in words."""
    names, _, _ = gallery_and_tests(ws, np.zeros((len(ws.rec), 1), np.float32), 10)
    if not names:
        return ["no ECG-ID person left with >= 2 recordings once the model's training persons are left "
                "out: no identity metrics (rank-1, EER, FRR); only the never-enrolled and timing numbers"]
    if len(names) < 2:
        return [f"only {len(names)} enrolled person ({names[0]}): no impostor comparisons, so "
                "rank-1, EER, FRR at FAR 1 % and FAR at the threshold are not available (left out)"]
    return []


def identity_bootstrap(ws: WindowSet, served: dict[str, np.ndarray], n_boot: int) -> dict:
    """95 % person-bootstrap intervals of rank-1 / EER / FRR@FAR1% for each served embedding
    ("int8", "float", "baseline" where present) and of the paired differences int8 - float
    (the quantisation loss) and int8 - baseline, per test length and subset
    (:func:`training.eval.identity.person_bootstrap`). WHY: 20 gallery persons, one of whom
    gives a third of the tests, leave every cell uncertain by several points; the intervals say
    which differences the data can tell apart."""
    out: dict[str, float] = {}
    pairs = tuple((a, b) for a, b in (("int8", "float"), ("int8", "baseline")) if a in served and b in served)
    for length in TEST_LENGTHS_S:
        runs = {}
        for kind, emb in served.items():
            names, templates, tests = gallery_and_tests(ws, emb, length)
            runs[kind] = (templates, tests)
        if len(names) >= 2:
            out.update(person_bootstrap(names, runs, pairs, n_boot=n_boot, prefix=f"id{length}s_"))
    return out


def int8_fidelity(cnn8: np.ndarray, emb8: np.ndarray, cnnf: np.ndarray, embf: np.ndarray) -> dict:
    """Cosine of each window's int8 output with its float twin's (median and 5th percentile):
    the CNN embedding, and, when the beat model is fused, the beat part of the served embedding
    (windows with beats only). Shows which model the int8 loss comes from."""
    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        ok = (na > 0) & (nb > 0)
        return np.sum(a[ok] * b[ok], axis=1) / (na[ok] * nb[ok])

    out = {}
    parts = [("cnn", cos(cnn8, cnnf))]
    if emb8.shape[1] > cnn8.shape[1]:
        d = cnn8.shape[1]
        parts.append(("beats", cos(emb8[:, d:], embf[:, d:])))
    for name, c in parts:
        if c.size:
            out[f"{name}_cos_median"] = float(np.median(c))
            out[f"{name}_cos_p5"] = float(np.percentile(c, 5))
    return out


def _baseline(fit_dir: Path, seen: set[str], ws: WindowSet, kw: dict, progress
              ) -> tuple[dict, np.ndarray]:
    """PCA + LDA on beats, fitted on the ECG-ID persons of ``fit_dir`` that the shipped models
    were trained on (so never on an evaluated person), scored like the models; also its window
    embeddings (for the paired bootstrap)."""
    from training.eval.identity_baseline import fit_baseline, plain_beat_kwargs

    fit_recs = [r for r in load_all(fit_dir) if r.dataset == "ecgid" and r.person in seen]
    evaluated = {ws.records[i].person for i in np.unique(ws.rec)}
    if not fit_recs or evaluated & {r.person for r in fit_recs}:
        raise ValueError(f"--baseline-fit {fit_dir}: needs ECG-ID persons the models were "
                         "trained on, none of them evaluated")
    plain = plain_beat_kwargs(kw)
    base = fit_baseline(record_windows(fit_recs, plain))
    # the same windows with the plain beats (the shipped beat model reads warped ones)
    ws_plain = ws if plain == kw else record_windows(list(ws.records), plain)
    if not (np.array_equal(ws_plain.rec, ws.rec) and np.array_equal(ws_plain.t_end_s, ws.t_end_s)):
        raise RuntimeError("internal: the baseline's windows differ from the models' windows")
    emb = base.embed_windows(ws_plain)
    metrics, _ = identity_eval(ws, emb, threshold=1.0)
    progress(f"baseline: PCA+LDA fitted on {base.beats} beats of {base.persons} ECG-ID persons")
    keep = ("rank1", "eer", "frr_at_far1", "n_tests")
    return {k: v for k, v in metrics.items() if k.split("_", 1)[1].replace("cross_", "") in keep} | {
        "fit_persons": float(base.persons)}, emb


def manifest_metrics(res: dict) -> tuple[dict, dict | None]:
    """(metrics of the CNN alone, metrics of the fused embedding or None) per kind, from an
    ``evaluate_ecg`` result, for the manifests: ``ecg_dualtask`` carries the CNN's own numbers,
    ``ecg_beats`` those of the fusion the daemon serves."""
    cnn: dict = {}
    fused: dict = {}
    for kind in ("float", "int8"):
        if kind not in res:
            continue
        m = {k: float(v) for k, v in res[kind].items()}
        own = {k.removeprefix("cnn_only_"): v for k, v in m.items() if k.startswith("cnn_only_")}
        if own:  # evaluated fused: the CNN-alone keys are the CNN's numbers
            fused[kind] = {k: v for k, v in m.items() if not k.startswith("cnn_only_")}
            cnn[kind] = {**{k: v for k, v in m.items() if k.startswith("activity") or k == "ms_per_window_1core"}, **own}
        else:
            cnn[kind] = m
    return cnn, (fused or None)


def _lead_i_only(r: EcgRecord) -> EcgRecord:
    if r.dataset != "ludb":
        return r
    from dataclasses import replace
    x = r.x_mv.copy()
    x[:, 1:] = 0.0
    return replace(r, x_mv=x, lead_valid=np.array([True, False, False]))


def _figures(out: Path, curves: dict, confs: dict, labels: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.eval.identity import det

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    for kind, c in curves.items():
        if not c:
            continue
        _, far, frr = det(c["genuine"], c["impostor"])
        ax.plot(np.maximum(far, 1e-4) * 100, np.maximum(frr, 1e-4) * 100, label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FAR (%)")
    ax.set_ylabel("FRR (%)")
    ax.set_title("ECG identity DET, 10 s tests (held-out persons)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ecg_identity_det.png", dpi=100)
    plt.close(fig)
    if "int8" in confs:
        m = confs["int8"]
        fig, ax = plt.subplots(figsize=(4, 3.5))
        ax.imshow(m, cmap="Blues")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("ECG activity (int8, constructed)")
        fig.tight_layout()
        fig.savefig(out / "ecg_activity_confusion.png", dpi=100)
        plt.close(fig)


def _evaluate_imu(data_dir: Path, models_dir: Path, figures: Path | None) -> dict:
    """IMU metrics (training/eval/imu.py); a folder without IMU data is reported, not fatal, and
    so is a malformed one (``{"error": ...}``): the ECG part evaluated before must not be lost
    to it. The loaders name the file in their DataError; any other data-shaped error (an index
    or key the metadata promised and the npz lacks) is reported with its type."""
    from training.eval.imu import IMU_DATASETS, evaluate_imu

    if not any((Path(data_dir) / d).is_dir() for d in IMU_DATASETS):
        return {"skipped": f"no {' or '.join(d + '/' for d in IMU_DATASETS)} in {data_dir}"}
    try:
        return evaluate_imu(Path(data_dir), Path(models_dir), figures)
    except DataError as exc:
        return {"error": f"IMU evaluation skipped: {exc}"}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return {"error": f"IMU evaluation skipped: {type(exc).__name__}: {exc}"}


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def print_report(res: dict) -> None:
    ecg = res.get("ecg", {})
    if "skipped" in ecg:
        print(f"skipped: ECG part: {ecg['skipped']}")
    else:
        _print_ecg(ecg)
    _print_imu(res.get("imu", {}))


def _print_imu(imu: dict) -> None:
    if "skipped" in imu:
        print(f"skipped: IMU part: {imu['skipped']}")
        return
    if "error" in imu:
        print(f"error: IMU part: {imu['error']}")
        return
    print("IMU")
    for task, entry in imu.items():
        if isinstance(entry, dict) and "skipped" in entry:
            print(f"  skipped: {task}: {entry['skipped']}")
    flat = {k: v for k, v in _flatten({t: e for t, e in imu.items() if t != "notes"
                                       and not (isinstance(e, dict) and "skipped" in e)}).items()}
    for key, val in flat.items():
        print(f"  {key:<50} {_fmt(val)}")
    for note in imu.get("notes", []):
        print(f"  note: {note}")


def _print_ecg(ecg: dict) -> None:
    print(f"ECG identity ({ecg.get('persons_evaluated', 0)} persons evaluated, "
          f"{ecg.get('persons_excluded_as_training', 0)} training persons excluded, "
          f"threshold cosine {ecg.get('threshold', float('nan')):.3f})")
    kinds = [k for k in ("float", "int8", "baseline") if k in ecg]
    keys = sorted({k for kind in kinds for k in ecg[kind]})
    print(f"  {'metric':<40}" + "".join(f"{k:>10}" for k in kinds))
    for key in keys:
        print(f"  {key:<40}" + "".join(f"{_fmt(ecg[k].get(key, float('nan'))):>10}" for k in kinds))
    if "int8_vs_float" in ecg:
        print("  int8 vs float, cosine per window: " + ", ".join(
            f"{k} {v:.4f}" for k, v in ecg["int8_vs_float"].items()))
    boot = ecg.get("bootstrap", {})
    if boot:
        print("  95 % intervals over test persons (person bootstrap; a - b: paired difference)")
        for key in sorted(k for k in boot if not k.endswith(("_lo", "_hi"))):
            lo, hi = boot.get(f"{key}_lo"), boot.get(f"{key}_hi")
            ci = f"  [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
            print(f"    {key:<52} {boot[key]:8.2f}{ci}")
        for key in sorted(k[:-3] for k in boot if k.endswith("_lo") and k[:-3] not in boot):
            print(f"    {key:<52} {'':>8}  [{boot[key + '_lo']:.2f}, {boot[key + '_hi']:.2f}]")
    for note in ecg.get("notes", []):
        print(f"  note: {note}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="folder in the shared/data format")
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                    help="folder with the .tflite + .json models (default daemon/models)")
    ap.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    ap.add_argument("--baseline-fit", type=Path, metavar="DIR",
                    help="also score the BASELINES.md PCA+LDA beat baseline, fitted on the ECG-ID "
                    "persons of DIR that the models were trained on (e.g. ../shared/data)")
    ap.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                    help="person-bootstrap draws for the identity intervals (default 2000; 0: none)")
    ap.add_argument("--out-figures", type=Path, default=None, metavar="DIR",
                    help="also draw the DET curve and confusion matrix PNGs into DIR (the "
                    "committed ones: docs/models); default: no figures")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder (expected the shared/data format)",
              file=sys.stderr)
        return 2
    if not (args.models / f"{ECG_MODEL}.tflite").exists():
        print(f"error: {args.models}/{ECG_MODEL}.tflite not found; train it with "
              "`python -m training.train --data DIR --out daemon/models` or pass --models",
              file=sys.stderr)
        return 2
    progress = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        ecg = evaluate_ecg(args.data, args.models, args.out_figures, progress=progress,
                           baseline_fit=args.baseline_fit, n_boot=args.bootstrap)
    except NoEcgPersons as exc:
        ecg = {"skipped": str(exc)}
    except (OSError, ValueError, KeyError) as exc:  # DataError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "skipped" not in ecg:  # the finished ECG part is shown before the IMU part can fail
        _print_ecg(ecg)
        sys.stdout.flush()
    try:
        imu = _evaluate_imu(args.data, args.models, args.out_figures)
    except Exception as exc:  # not bad data but a bug: keep what was evaluated, then fail loudly
        _write_json(args.json, {"ecg": ecg, "imu": {"error": f"IMU evaluation failed: "
                                                             f"{type(exc).__name__}: {exc}"}})
        raise
    if "skipped" in ecg and ("skipped" in imu or "error" in imu):
        why = imu.get("error") or f"no IMU data ({imu['skipped']})"
        print(f"error: {args.data}: nothing to evaluate: {ecg['skipped']}; {why}", file=sys.stderr)
        return 2
    if "skipped" in ecg:
        print(f"skipped: ECG part: {ecg['skipped']}")
    _print_imu(imu)
    _write_json(args.json, {"ecg": ecg, "imu": imu})
    return 0


def _write_json(path: Path | None, res: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=float) + "\n")
