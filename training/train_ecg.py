"""Train, export and describe the ECG dual-task model (identity embedding + activity).

``train_ecg(data_dir, out_dir, progress)`` is what ``python -m training.train`` calls; the
ablation of loss balancing (fixed 0.65/0.35 vs DT4ECG Algorithm 1 vs Chen et al. GradNorm) is
``python -m training.train_ecg --ablation --data DIR`` and writes its table into docs/MODELS.md.

Budget: the shipped model trains in a few minutes on 2 CPU cores (TF limited to 2 threads) —
small windows (3 s at 100 Hz), a ~82 k parameter network (widths 16/32/48/56), a fixed number of steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

from training.data.ecg import (  # noqa: E402
    ECGID_CALIBRATION, ECGID_HELDOUT, LUDB_HELDOUT_FROM, MITDB_HELDOUT, MITDB_TRAIN_SEGMENTS, DataError, EcgRecord, WindowSet,
    fingerprints, load_training_records, person_folds, person_id, record_windows)
from training.data.ecg_activity import (  # noqa: E402
    GUDB_TEST_SUBJECTS, RRSeries, construct_activity_records, load_gudb_rr)
from training.gradnorm import WANTS_WEIGHTED_GRADIENT, make_balancer  # noqa: E402
from training.losses import AMSoftmaxHead, activity_loss  # noqa: E402
from training.seeding import seed_everything  # noqa: E402
from training.models.ecg_dualtask import (  # noqa: E402
    ACTIVITY_LABELS, build_dualtask, shared_last_layer)

#: What the model expects; the daemon's EcgPipeline produces exactly this with these kwargs.
PIPELINE_KW = {"model_fs": int(os.environ.get("BIOD_ECG_FS", 100)), "window_s": 3, "hop_s": 1,
               "norm": "zscore"}
INPUT_LEN = 3 * PIPELINE_KW["model_fs"]
STRIDES = (1, 2, 2, 2) if INPUT_LEN <= 300 else (2, 2, 2, 2)
MODEL_NAME = "ecg_dualtask"
# 1.1.0: the same network as 1.0.0 (float twin unchanged), int8 activation ranges from the
# CLIP_PERCENTILE-th percentiles of the calibration windows instead of their min/max
VERSION = "1.1.0"
CLIP_PERCENTILE = 99.99
ACT_SECONDS = 20.0

Progress = Callable[[str], None]


def _threads(n: int = 2) -> None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process


@dataclass(frozen=True)
class EcgTrainingData:
    ident: WindowSet          # identity windows of training persons
    ident_labels: np.ndarray  # (n,) class index per window
    classes: tuple[str, ...]  # person id per class
    act_x: np.ndarray         # (m, T, 3) constructed activity windows (training donors/subjects)
    act_mask: np.ndarray
    act_y: np.ndarray
    calib: WindowSet          # ECG-ID calibration persons (threshold only, never trained on)
    act_person: np.ndarray    # (m,) the person whose beats each activity window re-times
    #: gudb subjects whose RR series the activity windows re-time (person ids, numeric order):
    #: written into the manifest, which is what evaluation excludes
    act_subjects: tuple[str, ...] = ()


def activity_windows_of(rr: list[RRSeries], donors: list[EcgRecord], seed: int, per_series: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Constructed activity windows (x, lead mask, label, donor person) from the RR series
    ``rr``, whichever subjects the caller picked (evaluation: those a manifest does not list)."""
    if not rr or not donors:
        return (np.zeros((0, INPUT_LEN, 3), np.float32), np.zeros((0, 3), bool),
                np.zeros(0, np.int64), np.zeros(0, str))
    built = construct_activity_records(rr, donors, ACT_SECONDS, per_series, seed)
    ws = record_windows([r for r, _ in built], PIPELINE_KW)
    labels = np.array([lab for _, lab in built])[ws.rec]
    return ws.x, ws.lead_mask, labels, ws.persons()


def prepare(data_dir: Path, progress: Progress, act_per_series: int = 3) -> EcgTrainingData:
    recs, calib = load_training_records(data_dir)
    if not recs:
        raise FileNotFoundError(f"{data_dir}: no ECG training persons (ecgid/ludb/mitdb) found")
    if not calib:
        raise FileNotFoundError(
            f"{data_dir}: none of the ECG-ID threshold-calibration persons {ECGID_CALIBRATION} "
            "is there; training needs the shared/data ECG-ID persons (see docs/MODELS.md)")
    progress(f"ecg: {len(recs)} training records of "
             f"{len({r.person for r in recs})} persons -> windows via daemon DSP")
    ws = record_windows(recs, PIPELINE_KW)
    persons = ws.persons()
    classes = tuple(sorted(set(persons)))
    labels = np.searchsorted(np.array(classes), persons)
    donors = [r for r in recs if r.dataset in ("ludb", "ecgid")]
    rr = [s for s in load_gudb_rr(data_dir) if s.subject not in GUDB_TEST_SUBJECTS]
    ax, am, ay, ap = activity_windows_of(rr, donors, seed=1, per_series=act_per_series)
    # the subjects trained on go into the manifest: evaluation excludes exactly those
    act_subjects = tuple(sorted({person_id("gudb_rpeaks", s.subject) for s in rr}, key=int)
                         ) if len(ax) else ()
    progress(f"ecg: {len(ws.x)} identity windows, {len(classes)} classes; "
             f"{len(ax)} constructed activity windows {np.bincount(ay, minlength=3).tolist()} "
             f"(gudb subjects {', '.join(act_subjects) or 'none'})")
    return EcgTrainingData(ws, labels, classes, ax, am, ay, record_windows(calib, PIPELINE_KW), ap,
                           act_subjects)


# ---------------------------------------------------------------- augmentation (numpy, batch)

def augment(x: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            lead_dropout: bool = True) -> np.ndarray:
    """Noise, baseline wander, amplitude, small time warps, and lead dropout, on normalised
    windows (B, T, C). Lead dropout keeps at least one valid lead and zeroes the others — the
    same zeros the pipeline emits for a lead-off lead, so every subset of leads is trained."""
    b, t, c = x.shape
    x = x.copy()
    # time warp: resample by 0.92..1.08 around a random centre, keep length
    scale = rng.uniform(0.92, 1.08, size=b)
    grid = np.arange(t, dtype=np.float32)
    centre = rng.uniform(0, t, size=b)
    src = np.clip(centre[:, None] + (grid[None] - centre[:, None]) * scale[:, None], 0, t - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, t - 1)
    f = (src - i0)[..., None].astype(np.float32)
    rows = np.arange(b)[:, None]
    x = x[rows, i0] * (1 - f) + x[rows, i1] * f
    x *= rng.uniform(0.8, 1.2, size=(b, 1, c)).astype(np.float32)
    tt = grid[None, :, None] / float(PIPELINE_KW["model_fs"])  # seconds: the wander's 0.05-0.5 Hz at any rate
    wander = rng.uniform(0, 0.3, size=(b, 1, c)) * np.sin(
        2 * np.pi * rng.uniform(0.05, 0.5, size=(b, 1, c)) * tt + rng.uniform(0, 6.3, size=(b, 1, c)))
    x += wander.astype(np.float32)
    x += (rng.normal(size=x.shape) * rng.uniform(0, 0.15, size=(b, 1, 1))).astype(np.float32)
    keep = mask.copy()
    if lead_dropout:
        drop = rng.random((b, c)) < 0.4
        keep &= ~drop
        none_left = ~keep.any(axis=1) & mask.any(axis=1)
        if none_left.any():  # restore one valid lead at random
            for i in np.nonzero(none_left)[0]:
                valid = np.nonzero(mask[i])[0]
                keep[i, rng.choice(valid)] = True
    return (x * keep[:, None, :]).astype(np.float32)


# ---------------------------------------------------------------- training loop

def _identity_sampler(data: "EcgTrainingData", cfg: "TrainConfig", rng: np.random.Generator
                      ) -> Callable[[int], np.ndarray]:
    """Returns draw(n) -> window indices for one identity batch (see TrainConfig.sampling)."""
    n_all = len(data.ident.x)
    if cfg.sampling == "window":
        return lambda n: rng.integers(0, n_all, n)
    if cfg.sampling != "person":
        raise ValueError(f"TrainConfig.sampling={cfg.sampling!r}: use 'window' or 'person'")
    # windows grouped by class, then by record within the class
    rec_of_class: list[list[np.ndarray]] = [[] for _ in data.classes]
    for r in np.unique(data.ident.rec):
        idx = np.nonzero(data.ident.rec == r)[0]
        rec_of_class[int(data.ident_labels[idx[0]])].append(idx)
    is_ecgid = np.array([c.startswith("ecgid:") for c in data.classes])
    p = np.ones(len(data.classes))
    if 0.0 <= cfg.ecgid_share <= 1.0 and is_ecgid.any() and (~is_ecgid).any():
        p[is_ecgid] = cfg.ecgid_share / is_ecgid.sum()
        p[~is_ecgid] = (1.0 - cfg.ecgid_share) / (~is_ecgid).sum()
    p /= p.sum()

    def draw(n: int) -> np.ndarray:
        cls = rng.choice(len(p), size=n, p=p)
        out = np.empty(n, np.int64)
        for j, c in enumerate(cls):
            recs = rec_of_class[c]
            w = recs[rng.integers(len(recs))]
            out[j] = w[rng.integers(len(w))]
        return out
    return draw


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_id: int = 96
    batch_act: int = 48
    lr: float = 2e-3
    balancing: str = "fixed"
    update_every: int = 0   # balancer period in steps; 0: every step (chen), steps//20 (dt4ecg)
    seed: int = 0
    margin: float = 0.3
    scale: float = 30.0
    #: "window": windows drawn uniformly (persons with long records dominate);
    #: "person": persons drawn uniformly, then a window of a random record of that person
    #: (cross-session persons contribute all their dates equally often).
    sampling: str = "window"
    #: share of identity samples drawn from ECG-ID persons under "person" sampling (ECG-ID is
    #: the lead-I, multi-session domain the identity numbers are measured on); <0: no re-weighting
    ecgid_share: float = -1.0
    dropout: float = 0.0    # on the pooled features before the identity head (training only)


def train_model(data: EcgTrainingData, cfg: TrainConfig, progress: Progress):
    """Returns (keras model, history dict with losses and loss weights)."""
    _threads()
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_dualtask(INPUT_LEN, strides=STRIDES, dropout=cfg.dropout)
    head = AMSoftmaxHead(int(model.output["embedding"].shape[-1]), len(data.classes),
                         scale=cfg.scale, margin=cfg.margin, seed=cfg.seed)
    sched = tf.keras.optimizers.schedules.CosineDecay(cfg.lr, cfg.steps, alpha=0.02)
    opt = tf.keras.optimizers.Adam(sched)
    params = model.trainable_variables + [head.centres]
    shared_ids = {id(v) for v in shared_last_layer(model)}
    shared_idx = [i for i, v in enumerate(model.trainable_variables) if id(v) in shared_ids]
    weights = tf.Variable([1.0, 1.0], dtype=tf.float32, trainable=False)
    balancer = make_balancer(cfg.balancing)
    weights.assign(np.asarray(balancer.weights, dtype=np.float32))
    n_id = cfg.batch_id
    has_act = len(data.act_y) > 0

    @tf.function(reduce_retracing=True)
    def step(x, y_id, y_act):
        with tf.GradientTape(persistent=True) as tape:
            out = model(x, training=True)
            l_id = head.loss(out["embedding"][:n_id], y_id)
            l_act = activity_loss(out["activity"][n_id:], y_act)
        g_id = tape.gradient(l_id, params)
        g_act = tape.gradient(l_act, model.trainable_variables)
        del tape
        g_act = list(g_act) + [tf.zeros_like(head.centres)]
        grads = [weights[0] * (a if a is not None else tf.zeros_like(v))
                 + weights[1] * (b if b is not None else tf.zeros_like(v))
                 for a, b, v in zip(g_id, g_act, params)]
        opt.apply_gradients(zip(grads, params))
        n_id_g = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g_id[i])) for i in shared_idx]))
        n_act_g = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g_act[i])) for i in shared_idx]))
        return l_id, l_act, n_id_g, n_act_g

    ix = data.ident.x
    draw_id = _identity_sampler(data, cfg, rng)
    by_class = [np.nonzero(data.act_y == c)[0] for c in np.unique(data.act_y)]
    hist = {"l_id": [], "l_act": [], "w": []}
    period = cfg.update_every or (max(cfg.steps // 20, 1) if cfg.balancing == "dt4ecg" else 1)
    acc_n: list[np.ndarray] = []
    acc_l: list[np.ndarray] = []
    t0 = time.time()
    for s in range(cfg.steps):
        bi = draw_id(n_id)
        xb = augment(ix[bi], data.ident.lead_mask[bi], rng)
        if has_act:
            # class-balanced: rest has two source activities (sitting, maths)
            cls = rng.integers(0, len(by_class), cfg.batch_act)
            ba = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in cls])
            xa = augment(data.act_x[ba], data.act_mask[ba], rng)
            ya = data.act_y[ba]
        else:
            xa = np.zeros((cfg.batch_act, INPUT_LEN, 3), np.float32)
            ya = np.zeros(cfg.batch_act, np.int64)
        l_id, l_act, gn_id, gn_act = step(np.concatenate([xb, xa]), data.ident_labels[bi], ya)
        losses = np.array([float(l_id), float(l_act)])
        norms = np.array([float(gn_id), float(gn_act)])
        if WANTS_WEIGHTED_GRADIENT[cfg.balancing]:
            norms = norms * weights.numpy()
        acc_n.append(norms)
        acc_l.append(losses)
        if len(acc_n) >= period:
            w = balancer.update(np.mean(acc_n, axis=0), np.mean(acc_l, axis=0))
            weights.assign(np.asarray(w, dtype=np.float32))
            acc_n, acc_l = [], []
        w = weights.numpy()
        hist["l_id"].append(losses[0])
        hist["l_act"].append(losses[1])
        hist["w"].append(np.asarray(w, dtype=float).tolist())
        if (s + 1) % max(cfg.steps // 10, 1) == 0 or s == 0:
            progress(f"ecg[{cfg.balancing}] step {s + 1}/{cfg.steps}  L_id {losses[0]:.3f}  "
                     f"L_act {losses[1]:.3f}  w {np.round(w, 3).tolist()}  "
                     f"{time.time() - t0:.0f}s")
    return model, hist


# ---------------------------------------------------------------- export + manifest

def manifest_fields(data: EcgTrainingData, threshold: float, cfg: TrainConfig) -> dict:
    persons: dict[str, list[str]] = {}
    for p in sorted(set(data.classes) | {r.person for r in data.calib.records}):
        ds, pid = p.split(":", 1)
        persons.setdefault(ds, []).append(pid)
    persons["gudb_rpeaks"] = list(data.act_subjects)  # those trained on, whatever their numbers
    return {
        "version": VERSION,
        "tasks": ["ecg_identity_embedding", "ecg_activity"],
        "inputs": [{
            "name": "ecg",
            "shape": [INPUT_LEN, 3],
            "rate_hz": float(PIPELINE_KW["model_fs"]),
            "window_s": float(PIPELINE_KW["window_s"]),
            "channels": ["I", "II", "III"],
            "units": "z-score per lead per window (dimensionless)",
            "normalisation": {"kind": "in_model", "description": (
                f"The caller feeds EcgPipeline windows (model_fs={PIPELINE_KW['model_fs']}, "
                f"window_s={PIPELINE_KW['window_s']}, hop_s={PIPELINE_KW['hop_s']}, "
                "norm='zscore'): mV high-passed 0.5 Hz + mains notch, resampled to "
                f"{PIPELINE_KW['model_fs']} Hz, z-scored per lead over the {PIPELINE_KW['window_s']} s "
                "window; a lead-off or flat lead is all zeros. "
                "Any subset of the three leads is valid (trained with lead dropout).")},
            "description": f"{PIPELINE_KW['window_s']} s of 3-lead ECG (Einthoven I, II, III) at {PIPELINE_KW['model_fs']} Hz",
        }],
        "outputs": [
            {"name": "embedding", "meaning": (
                "64-d L2-normalised identity embedding; compare by cosine similarity with an "
                "enrolment template (mean of normalised window embeddings, re-normalised); "
                "average over the windows of a test segment before comparing")},
            {"name": "activity", "meaning": "softmax probabilities rest / walking / vigorous"},
        ],
        "labels": {"activity": list(ACTIVITY_LABELS)},
        "thresholds": {"identity_cosine": float(threshold)},
        "training": {
            "datasets": ["ecgid", "ludb", "mitdb", "gudb_rpeaks"],
            "persons": persons,
            "fingerprints": fingerprints(list(data.ident.records) + list(data.calib.records)),
            "held_out": {
                "ecgid": [f"{p:02d}" for p in ECGID_HELDOUT],
                "ludb": [str(i) for i in range(LUDB_HELDOUT_FROM, 101)],
                "mitdb": list(MITDB_HELDOUT),
                "gudb_rpeaks": [str(s) for s in GUDB_TEST_SUBJECTS],
            },
            "description": (
                "Identity: AM-Softmax over the listed persons (ECG-ID lead I, LUDB leads I-III, "
                f"MIT-BIH first lead as II, {MITDB_TRAIN_SEGMENTS} x 10 s per record). Activity: "
                f"gudb R-peak series of subjects {', '.join(data.act_subjects) or '(none)'} "
                "re-timing real beats of the listed "
                "ECG-ID/LUDB persons (training/data/ecg_activity.py). Threshold: FAR 1 % on "
                "10 s tests of ECG-ID calibration persons "
                f"{', '.join(f'{p:02d}' for p in ECGID_CALIBRATION)} (training partition, "
                "listed here, never used for gradient updates)."),
        },
        "notes": (f"loss balancing {cfg.balancing}, {cfg.steps} steps; float32 twin in "
                  "float/ecg_dualtask.tflite (evaluation only). docs/MODELS.md"),
    }


def representative_windows(data: EcgTrainingData) -> np.ndarray:
    """The int8 calibration windows: 400 identity and 100 constructed activity windows of the
    training persons, drawn with a fixed seed (the same 500 for every export of one data folder)."""
    rng = np.random.default_rng(0)
    return np.concatenate([data.ident.x[rng.permutation(len(data.ident.x))[:400]],
                           data.act_x[rng.permutation(len(data.act_x))[:100]]])


def export_models(model, data: EcgTrainingData, threshold: float, cfg: TrainConfig,
                  out_dir: Path) -> tuple[Path, Path]:
    from training.export import export_float, export_int8

    fields = manifest_fields(data, threshold, cfg)
    p8 = export_int8(model, representative_windows(data), out_dir, MODEL_NAME, fields,
                     clip_percentile=CLIP_PERCENTILE)
    pf = export_float(model, Path(out_dir) / "float", MODEL_NAME, fields)
    # the trained Keras model beside the float twin (like the IMU models'): the int8 file can be
    # re-exported or its quantisation examined without retraining
    model.save(pf.with_suffix(".keras"))
    return p8, pf


def embed(model, x: np.ndarray) -> np.ndarray:
    return model.predict(x, batch_size=256, verbose=0)["embedding"]


def train_ecg(data_dir: Path, out_dir: Path, progress: Progress = print,
              cfg: TrainConfig | None = None) -> dict:
    """Train on the fixed training persons, export int8 + float, evaluate held-out persons,
    write the metrics into the manifest. Returns a summary dict."""
    from training.eval.identity import choose_threshold
    from training.eval.models import NoEcgPersons, evaluate_ecg, manifest_metrics
    from training.export import update_manifest

    cfg = cfg or TrainConfig()
    t0 = time.time()
    data = prepare(Path(data_dir), progress)
    if not len(data.act_x):
        raise DataError(f"{data_dir}: no gudb_rpeaks RR series to build the activity windows from: the "
                        "activity head would learn from nothing and still be shipped; add gudb_rpeaks/")
    model, hist = train_model(data, cfg, progress)
    threshold = choose_threshold(data.calib, embed(model, data.calib.x))
    progress(f"ecg: operating threshold (FAR 1 % on the calibration persons) cosine "
             f"{threshold:.3f}")
    p8, pf = export_models(model, data, threshold, cfg, Path(out_dir))
    progress(f"ecg: exported {p8} ({p8.stat().st_size} bytes) and {pf}")
    try:
        res = evaluate_ecg(Path(data_dir), Path(out_dir), figures=None, progress=progress)
        metrics, _ = manifest_metrics(res)  # the CNN's own numbers, whatever beat model lies beside it
    except NoEcgPersons as exc:  # a folder of training persons only: the model stands, unmeasured
        progress(f"ecg: no held-out metrics ({exc}); the manifest's metrics stay empty")
        metrics = {}
    update_manifest(p8, metrics=metrics)
    update_manifest(pf, metrics=metrics)
    return {"model": str(p8), "float_model": str(pf), "threshold": threshold,
            "final_weights": hist["w"][-1], "seconds": time.time() - t0, "metrics": metrics}


# ---------------------------------------------------------------- ablation

ABLATION_KEYS = ("t10_rank1", "t10_eer", "t10_frr_at_far1", "t10_cross_rank1",
                 "t3_rank1", "t3_eer", "activity_accuracy", "activity_macro_f1")


def _without(data: EcgTrainingData, persons: set[str], act: tuple) -> EcgTrainingData:
    """The training data with ``persons`` taken out of the identity classes and ``act`` (the
    fold's constructed activity training windows) in place of the activity windows."""
    keep = ~np.isin(data.ident.persons(), list(persons))
    ident = data.ident.select(keep)
    persons_kept = ident.persons()
    classes = tuple(sorted(set(persons_kept)))
    labels = np.searchsorted(np.array(classes), persons_kept)
    ax, am, ay, ap = act
    return EcgTrainingData(ident, labels, classes, ax, am, ay, data.calib, ap, data.act_subjects)


def ablation(data_dir: Path, steps: int, progress: Progress = print,
             doc: Path | None = None, folds: int = 4) -> list[dict]:
    """Loss balancing (fixed 0.65/0.35, DT4ECG Algorithm 1, Chen et al. GradNorm) compared on
    development folds of the training persons; no held-out person is read.

    Per fold, each balancing trains (same seed, data and steps) without the fold's ECG-ID
    persons and without a quarter of the gudb RR subjects; identity is scored on the fold's
    persons plus the 8 calibration persons (never trained on): enrolment from the first
    recording, 3 s and 10 s tests, cross-date subset (``training.eval.identity``); activity on
    windows that re-time the fold's persons' beats with the held-back subjects' RR series.
    Metrics are averaged over the folds (float Keras model)."""
    from training.eval.identity import gallery_and_tests, identity_metrics
    from training.eval.models import activity_eval

    data = prepare(Path(data_dir), progress)
    parts = person_folds(data.ident.records, folds)  # as the GPU recipe search cuts them
    rr = [s for s in load_gudb_rr(Path(data_dir)) if s.subject not in GUDB_TEST_SUBJECTS]
    subjects = sorted({s.subject for s in rr})
    donors = [r for r in data.ident.records if r.dataset in ("ludb", "ecgid")]
    per_fold: dict[str, list[dict]] = {b: [] for b in ("fixed", "dt4ecg", "chen")}
    for f, fold in enumerate(parts):
        held_subj = set(subjects[f::folds])
        out = set(fold)
        act_train = activity_windows_of([s for s in rr if s.subject not in held_subj],
                                        [d for d in donors if d.person not in out], seed=1, per_series=3)
        ax, _, ay, _ = activity_windows_of([s for s in rr if s.subject in held_subj],
                                           [d for d in donors if d.person in out], seed=7, per_series=4)
        fdata = _without(data, out, act_train)
        # the fold's persons, and the calibration persons: 8 more persons never trained on
        scored = _merge(data.ident.select(np.isin(data.ident.persons(), fold)), data.calib)
        progress(f"ablation fold {f + 1}/{folds}: {len(fold)} persons out "
                 f"({', '.join(fold)}), gudb subjects out {sorted(held_subj)}; "
                 f"{len(fdata.classes)} classes, {len(ay)} activity test windows")
        for bal in per_fold:
            model, hist = train_model(fdata, TrainConfig(steps=steps, balancing=bal), progress)
            m: dict[str, float] = {}
            emb = embed(model, scored.x)
            for length in (3, 10):
                names, tmpl, tests = gallery_and_tests(scored, emb, length)
                m.update({f"t{length}_{k}": v for k, v in identity_metrics(names, tmpl, tests).items()})
            if len(ay):
                m.update(activity_eval(ay, model.predict(ax, batch_size=256, verbose=0)["activity"]))
            m["final_weights"] = hist["w"][-1]
            per_fold[bal].append(m)
            progress(f"ablation fold {f + 1} {bal}: " + ", ".join(
                f"{k} {m.get(k, float('nan')):.1f}" for k in ABLATION_KEYS))
    rows = []
    for bal, ms in per_fold.items():
        rows.append({"balancing": bal,
                     "final_weights": np.mean([m["final_weights"] for m in ms], axis=0).tolist(),
                     "per_fold": ms,
                     **{k: float(np.nanmean([m.get(k, np.nan) for m in ms])) for k in ABLATION_KEYS}})
    if doc is not None:
        write_ablation_table(doc, rows, steps, folds)
    return rows


def _merge(a: WindowSet, b: WindowSet) -> WindowSet:
    """Two WindowSets as one (``b``'s record indices moved past ``a``'s records)."""
    return WindowSet(np.concatenate([a.x, b.x]), np.concatenate([a.lead_mask, b.lead_mask]),
                     np.concatenate([a.rec, b.rec + len(a.records)]),
                     np.concatenate([a.t_end_s, b.t_end_s]), a.records + b.records)


ABLATION_BEGIN = "<!-- ablation:begin -->"
ABLATION_END = "<!-- ablation:end -->"


def write_ablation_table(doc: Path, rows: list[dict], steps: int, folds: int) -> None:
    lines = [ABLATION_BEGIN,
             f"Command: `python -m training.train_ecg --ablation --data ../shared/data "
             f"--steps {steps} --folds {folds}` (float Keras model, {folds} development folds of "
             "the training persons, galleries of the fold's ECG-ID persons + the 8 calibration "
             "persons, same seed; mean over the folds).",
             "",
             "| loss weights | final w (id, act) | 10 s rank-1 | 10 s EER | 10 s FRR@FAR1% "
             "| 10 s cross-date rank-1 | 3 s rank-1 | 3 s EER | activity acc | activity macro-F1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"fixed": "fixed 0.65 / 0.35", "dt4ecg": "DT4ECG Alg. 1 (α=2) + floor 0.1, every steps/20",
             "chen": "GradNorm, Chen et al. (α=1.5)"}
    for r in rows:
        w = ", ".join(f"{v:.2f}" for v in r["final_weights"])
        lines.append(f"| {names[r['balancing']]} | {w} | " + " | ".join(
            f"{r[k]:.1f}" for k in ABLATION_KEYS) + " |")
    lines.append(ABLATION_END)
    block = "\n".join(lines)
    text = doc.read_text() if doc.exists() else ""
    if ABLATION_BEGIN in text and ABLATION_END in text:
        a = text.index(ABLATION_BEGIN)
        b = text.index(ABLATION_END) + len(ABLATION_END)
        text = text[:a] + block + text[b:]
    else:
        text = text + "\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train_ecg")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("daemon/models"))
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--balancing", choices=("fixed", "dt4ecg", "chen"),
                    default=TrainConfig.balancing)
    ap.add_argument("--ablation", action="store_true",
                    help="compare loss balancings and write the table into docs/MODELS.md")
    ap.add_argument("--doc", type=Path, default=Path("docs/MODELS.md"))
    ap.add_argument("--folds", type=int, default=4, help="development folds of the ablation")
    args = ap.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.ablation:
        ablation(args.data, args.steps, say, args.doc, args.folds)
        return 0
    res = train_ecg(args.data, args.out, say, TrainConfig(steps=args.steps,
                                                            balancing=args.balancing))
    print(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
