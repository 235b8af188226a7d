"""Fit the beat-morphology identity model (PCA + LDA per lead) and export it int8 + float.

    python -m training.train_beats --data ../shared/data [--out daemon/models]

WHY linear: with ~100 training persons a discriminant projection of single beats generalises
to new persons better than anything with more parameters we measured, and fused with the 3 s
CNN (``daemon/inference/beatmorph.py``) it lifts held-out identity clearly (docs/MODELS.md).

* Beats: the daemon's own ``EcgPipeline`` with ``beat_fs`` (conditioned signal, causal 40 Hz
  low-pass, 125 Hz, 0.25 s before to 0.45 s after R, the part after the QRS on a time axis
  normalised to RR = 1 s by Fridericia's RR^(1/3)), every distinct beat of the training
  persons' records (windows overlap, so each beat is taken once), z-scored per beat and lead
  (``SLOPE`` would add each beat's z-scored first difference: measured, not shipped).
* Per lead (morphology differs per lead, a shared projection measured worse): lead I from
  ECG-ID + LUDB, lead II from LUDB + MIT-BIH (its first lead), lead III from LUDB; classes are
  persons; PCA to ``N_PCA`` then shrinkage LDA (Ledoit-Wolf) to ``N_DIM`` directions
  (``--session-weight`` would raise the between-recording scatter in what the LDA whitens:
  measured, not shipped, docs/MODELS.md).
* The three projections are one dense layer with a block-diagonal kernel (so the int8 weights
  get one scale per direction, ``keras_model``) exported full-integer int8 with float32 output, like every shipped model; the manifest carries the fusion weight and the open-set
  threshold of the FUSED embedding, chosen at FAR 1 % on the ECG-ID calibration persons (training
  partition, never fitted on) with the ECG model found in ``--out``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from daemon.inference.beatmorph import beat_features
from training.data.ecg import (
    ECGID_CALIBRATION, ECGID_HELDOUT, LUDB_HELDOUT_FROM, MITDB_HELDOUT, EcgRecord, WindowSet,
    fingerprints, load_training_records, record_windows)

# 2.0.0: beats heart-rate normalised (RR_EXPONENT); 2.1.0: the same float map, int8 weights
# quantised per direction (keras_model). Templates of other versions are refused: re-enrol
VERSION = "2.1.0"
NAME = "ecg_beats"
BEAT_FS = 125.0
LOWPASS_HZ = 40.0
# Fridericia's QT correction (QT ~ RR^(1/3)) applied to the beat's time axis after the QRS
# (daemon.dsp.segment.RrWarp): chosen from physiology and on development folds of the training
# persons, where it measured better than Bazett's sqrt (docs/MODELS.md)
RR_EXPONENT = 1.0 / 3.0
RR_REF_S = 1.0
# SLOPE: each beat's z-scored first difference beside it (daemon.inference.beatmorph.beat_features)
# with PCA to 100 of the 174 inputs. Better on development folds and on the held-out persons'
# rank-1 and FRR, but the identity engine's decisions got worse with it (more strangers named,
# also on training persons), so it is not shipped: docs/MODELS.md, "A slope channel: measured,
# not shipped" (python -m training.experiments.beat_features)
SLOPE = False
N_PCA = 60
SLOPE_N_PCA, SLOPE_VERSION = 100, "3.0.0"   # what `--slope` fits: the measured variant
N_DIM = 48
# between-recording scatter added to what the LDA whitens (session_lda_scalings): measured with
# 5, not shipped (household cross-date sessions got worse; docs/MODELS.md)
SESSION_WEIGHT = 0.0
FUSION_WEIGHT_CNN = 0.5   # plain sum rule, not tuned on held-out persons
PIPELINE_KW = {"model_fs": 100, "window_s": 3, "hop_s": 1, "norm": "zscore",
               "beat_fs": BEAT_FS, "beat_lowpass_hz": LOWPASS_HZ,
               "beat_rr_exponent": RR_EXPONENT, "beat_rr_ref_s": RR_REF_S}
LEADS = ("I", "II", "III")


def distinct_beats(ws: WindowSet) -> tuple[np.ndarray, np.ndarray]:
    """(beats (n, L, 3) mV, record index (n,)): each beat once although windows overlap."""
    assert ws.morph is not None
    beats, recs, seen = [], [], set()
    for m, r in zip(ws.morph, ws.rec):
        for b in m:
            key = (int(r), b.tobytes())
            if key not in seen:
                seen.add(key)
                beats.append(b)
                recs.append(int(r))
    return np.stack(beats).astype(np.float32), np.array(recs)


def record_scatter(z: np.ndarray, rec: np.ndarray, person: np.ndarray) -> np.ndarray:
    """Scatter of each recording's mean beat around its person's mean beat, per beat (the
    between-recording part of the within-person covariance). Persons with one recording add
    nothing. WHY: the pooled within-person covariance LDA whitens is dominated by beat-to-beat
    variation inside one recording, while what breaks cross-session identification is the
    shift of a whole recording (electrode placement, days, months); this is that shift."""
    s = np.zeros((z.shape[1], z.shape[1]))
    for p in np.unique(person):
        sel = person == p
        mu_p = z[sel].mean(axis=0)
        for r in np.unique(rec[sel]):
            zr = z[sel & (rec == r)]
            d = zr.mean(axis=0) - mu_p
            s += len(zr) * np.outer(d, d)
    return s / len(z)


def session_lda_scalings(lda, z: np.ndarray, rec: np.ndarray, person: np.ndarray,
                         weight: float) -> np.ndarray:
    """The eigen-solver LDA of ``lda`` (already fitted on ``z``) with the within-person
    covariance it whitens raised by ``weight`` x the between-recording scatter
    (``record_scatter``): directions that move with the recording are penalised more than
    those that move from beat to beat. As in within-class covariance normalisation (WCCN) and
    nuisance attribute projection in speaker verification. Returns the scalings, best first."""
    from scipy import linalg
    from sklearn.discriminant_analysis import _cov   # the total scatter exactly as the LDA had it

    sw = lda.covariance_
    sb = _cov(z, lda.shrinkage) - sw
    evals, evecs = linalg.eigh(sb, sw + weight * record_scatter(z, rec, person))
    return evecs[:, np.argsort(evals)[::-1]]


def fit_projections(beats: np.ndarray, recs: np.ndarray, records: tuple[EcgRecord, ...],
                    progress=print, *, slope: bool = SLOPE, n_pca: int = N_PCA,
                    session_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per lead PCA + shrinkage LDA folded into one affine map on ``beat_features(beats,
    slope=slope)``: W (3, F, K), b (3, K), F = 2 x samples with ``slope``. ``session_weight``
    > 0: the LDA whitens ``session_lda_scalings``' recording-raised covariance (measured by
    ``training.experiments.beat_features``)."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    feats = beat_features(beats, slope=slope)          # (n, 3, F)
    person = np.array([records[r].person for r in recs])
    valid = np.stack([records[r].lead_valid for r in recs])
    length = feats.shape[2]
    W = np.zeros((3, length, N_DIM), np.float32)
    b = np.zeros((3, N_DIM), np.float32)
    for lead in range(3):
        sel = valid[:, lead]
        x, y = feats[sel, lead], person[sel]
        n_cls = len(set(y))
        k = min(N_DIM, n_cls - 1, n_pca)
        pca = PCA(n_pca, random_state=0).fit(x)
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(pca.transform(x), y)
        if session_weight > 0:
            lda.scalings_ = session_lda_scalings(lda, pca.transform(x), recs[sel], y, session_weight)
        # both steps are affine: read the map off the transform of 0 and of the unit vectors
        b[lead, :k] = lda.transform(pca.transform(np.zeros((1, length))))[0, :k]
        W[lead, :, :k] = lda.transform(pca.transform(np.eye(length)))[:, :k] - b[lead, :k]
        # the folded map must equal sklearn's own transform on these beats
        ref = lda.transform(pca.transform(x[:50]))[:, :k]
        got = x[:50] @ W[lead, :, :k] + b[lead, :k]
        if not np.allclose(ref, got, atol=1e-3 * (1 + np.abs(ref).max())):
            raise RuntimeError(f"lead {LEADS[lead]}: folded PCA+LDA map disagrees with sklearn")
        progress(f"beats: lead {LEADS[lead]}: {int(sel.sum())} beats of {n_cls} persons -> "
                 f"{k} discriminant directions")
    return W, b


def keras_model(W: np.ndarray, b: np.ndarray):
    """The three per-lead maps as ONE dense layer with a block-diagonal kernel (3L, 3K).

    WHY not an einsum over leads (1.0.0 and 2.0.0 did that): the converter turns it into a
    BATCH_MATMUL whose int8 weights share one asymmetric scale across all 3 x K directions, and
    the discriminant directions differ a lot in norm, so the small ones were quantised coarsely
    (a window's pooled beat vector had median cosine 0.958 with the float one; ``training.eval
    models`` prints it as ``int8_vs_float``). A dense layer is quantised per output channel,
    symmetric, and every column of the block-diagonal kernel holds one lead's direction only, so
    each direction gets its own scale; the off-diagonal zeros stay exact. Same map, same float
    outputs.
    """
    import keras

    n_leads, length, k = W.shape
    kernel = np.zeros((n_leads * length, n_leads * k), np.float32)
    for lead in range(n_leads):
        kernel[lead * length:(lead + 1) * length, lead * k:(lead + 1) * k] = W[lead]
    inp = keras.Input((n_leads, length), name="beat")
    dense = keras.layers.Dense(n_leads * k, name="per_lead_projection")
    out = keras.layers.Reshape((n_leads, k))(dense(keras.layers.Flatten()(inp)))
    dense.set_weights([kernel, np.asarray(b, np.float32).reshape(-1)])
    return keras.Model(inp, {"embedding": out})


def manifest_fields(records: tuple[EcgRecord, ...], calib: list[EcgRecord], length: int,
                    threshold: float, slope: bool = SLOPE, session_weight: float = SESSION_WEIGHT) -> dict:
    """``length``: samples per beat (the model's input is twice that with ``slope``)."""
    width = 2 * length if slope else length
    persons: dict[str, list[str]] = {}
    for p in sorted({r.person for r in records} | {r.person for r in calib}):
        ds, pid = p.split(":", 1)
        persons.setdefault(ds, []).append(pid)
    return {
        "version": SLOPE_VERSION if slope else VERSION,
        "tasks": ["ecg_identity_embedding"],
        "inputs": [{
            "name": "beat", "shape": [3, width], "rate_hz": BEAT_FS,
            "channels": list(LEADS), "units": "z-score per beat and lead (dimensionless)",
            "normalisation": {"kind": "in_model", "description": (
                "The caller feeds one beat: EcgWindow.morph of an EcgPipeline built with "
                f"beat_fs={BEAT_FS}, beat_lowpass_hz={LOWPASS_HZ}, beat_rr_exponent={RR_EXPONENT}, "
                f"beat_rr_ref_s={RR_REF_S} (0.25 s before to 0.45 s after R, the part after the "
                "QRS read on a time axis scaled by (RR / rr_ref_s) ** rr_exponent, RR from the "
                "previous beat), transposed to (leads, samples) and z-scored per lead"
                + (", followed by its first difference (the first sample's taken as 0), "
                   "z-scored on its own (daemon.inference.beatmorph.beat_features with slope)"
                   if slope else " (daemon.inference.beatmorph.beat_features)")
                + "; an off lead is zeros.")},
            "features": {"kind": "ecg_beat", "params": {"lowpass_hz": LOWPASS_HZ,
                                                         "before_s": 0.25, "after_s": 0.45,
                                                         "rr_exponent": RR_EXPONENT,
                                                         "rr_ref_s": RR_REF_S,
                                                         "slope": slope},
                         "source_shape": [length, 3], "source_channels": list(LEADS),
                         "source_units": "mV"},
            "description": f"one heartbeat, Einthoven I, II, III, at {BEAT_FS:g} Hz",
        }],
        "outputs": [{"name": "embedding", "meaning": (
            f"per lead a {N_DIM}-d discriminant projection (not normalised); the daemon "
            "normalises per beat, averages a window's beats per lead, and fuses with the CNN "
            "embedding (daemon/inference/beatmorph.py)")}],
        "thresholds": {"fusion_weight_cnn": FUSION_WEIGHT_CNN, "identity_cosine": float(threshold)},
        "training": {
            "datasets": ["ecgid", "ludb", "mitdb"],
            "persons": persons,
            "fingerprints": fingerprints(list(records) + list(calib)),
            "held_out": {
                "ecgid": [f"{p:02d}" for p in ECGID_HELDOUT],
                "ludb": [str(i) for i in range(LUDB_HELDOUT_FROM, 101)],
                "mitdb": list(MITDB_HELDOUT),
            },
            "description": (
                "PCA (60) + shrinkage LDA per lead over the listed persons' beats: lead I ECG-ID + "
                "LUDB, lead II LUDB + MIT-BIH, lead III LUDB"
                + (f" (LDA whitening the within-person covariance plus {session_weight:g} x the "
                   "between-recording scatter)" if session_weight else "")
                + ". Threshold (of the fused embedding): "
                "FAR 1 % on 10 s tests of the ECG-ID calibration persons "
                f"{', '.join(f'{p:02d}' for p in ECGID_CALIBRATION)}, never fitted on."),
        },
        "notes": "python -m training.train_beats; float32 twin in float/ecg_beats.tflite. docs/MODELS.md",
    }


def train_beats(data_dir: Path, out_dir: Path, progress=print, slope: bool = SLOPE,
                session_weight: float = SESSION_WEIGHT) -> dict:
    """Fit, export int8 + float, set the fused threshold and write the held-out metrics.
    ``slope``: the measured, unshipped variant (beat + slope, PCA ``SLOPE_N_PCA``, version
    ``SLOPE_VERSION``), for re-running docs/MODELS.md's comparison."""
    from training.export import export_float, export_int8

    t0 = time.time()
    fit_recs, calib = load_training_records(data_dir)
    if not fit_recs or not calib:
        raise FileNotFoundError(f"{data_dir}: needs the shared/data ECG training and calibration persons")
    ws = record_windows(fit_recs, PIPELINE_KW)
    beats, brec = distinct_beats(ws)
    progress(f"beats: {len(beats)} distinct beats of {len({r.person for r in fit_recs})} persons "
             f"({time.time() - t0:.0f} s)")
    W, b = fit_projections(beats, brec, ws.records, progress, slope=slope,
                           n_pca=SLOPE_N_PCA if slope else N_PCA, session_weight=session_weight)
    model = keras_model(W, b)
    feats = beat_features(beats, slope=slope)
    rng = np.random.default_rng(0)
    rep = feats[rng.permutation(len(feats))[:500]]
    fields = manifest_fields(ws.records, calib, beats.shape[1], threshold=0.0, slope=slope,
                             session_weight=session_weight)
    out_dir = Path(out_dir)
    p8 = export_int8(model, rep, out_dir, NAME, fields)
    pf = export_float(model, out_dir / "float", NAME, fields)
    threshold, _ = fused_threshold_and_metrics(Path(data_dir), out_dir, calib, progress)
    progress(f"beats: exported {p8} ({p8.stat().st_size} bytes) and {pf}; fused threshold "
             f"{threshold:.3f} ({time.time() - t0:.0f} s)")
    return {"int8": str(p8), "float": str(pf), "threshold": float(threshold),
            "seconds": time.time() - t0}


def fused_threshold_and_metrics(data_dir: Path, out_dir: Path, calib: list[EcgRecord],
                                progress=print) -> tuple[float, dict]:
    """Set the fused embedding's threshold (FAR 1 % on the calibration persons ``calib``, never
    fitted on) and the held-out fused metrics in both beat manifests of ``out_dir``. Depends on
    the CNN's int8 file as much as on the beat model: re-run when either changes. Returns the
    threshold and the held-out evaluation (``evaluate_ecg``), whose CNN-alone metrics a caller
    that changed the CNN writes into the CNN's manifests without evaluating again."""
    from training.eval.models import NoEcgPersons
    from training.export import update_manifest

    threshold = fused_threshold(out_dir, calib)
    for p in _beat_paths(out_dir):
        update_manifest(p, thresholds={"fusion_weight_cnn": FUSION_WEIGHT_CNN,
                                       "identity_cosine": threshold})
    try:
        return threshold, fused_metrics(data_dir, out_dir, progress)
    except NoEcgPersons as exc:  # a folder of training persons only: the model stands, unmeasured
        progress(f"beats: no held-out metrics ({exc}); the manifests' metrics stay empty")
        return threshold, {}


def _beat_paths(out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{NAME}.tflite", out_dir / "float" / f"{NAME}.tflite"


def fused_threshold(out_dir: Path, calib: list[EcgRecord]) -> float:
    """The fused embedding's cosine at FAR 1 % on the calibration persons' 10 s tests, with the
    int8 CNN and beat model found in ``out_dir``."""
    from daemon.biometrics import EcgModelRunner
    from training.eval.identity import choose_threshold, fused_embeddings
    from training.eval.models import run_batches

    runner = EcgModelRunner.load(out_dir / "ecg_dualtask.tflite")
    # the windows the daemon cuts for this CNN (its manifest's rate and window), not a fixed 100 Hz
    cws = record_windows(calib, {**PIPELINE_KW, **runner.pipeline_kwargs()})
    cnn = run_batches(runner.model, cws.x)["embedding"]
    return float(choose_threshold(cws, fused_embeddings(runner, cws, cnn)))


def fused_metrics(data_dir: Path, out_dir: Path, progress=print) -> dict:
    """Evaluate held-out persons with the models in ``out_dir`` and write the fusion's metrics
    (what the daemon serves) into both beat manifests; returns the evaluation (``evaluate_ecg``)."""
    from training.eval.models import evaluate_ecg, manifest_metrics
    from training.export import update_manifest

    evaluation = evaluate_ecg(data_dir, out_dir, figures=None, progress=progress)
    _, fused = manifest_metrics(evaluation)
    for p in _beat_paths(out_dir):
        update_manifest(p, metrics=fused or {})
    return evaluation


def main(argv: list[str] | None = None) -> int:
    from daemon.biometrics import MODELS_DIR

    ap = argparse.ArgumentParser(prog="python -m training.train_beats", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    ap.add_argument("--slope", action="store_true",
                    help=f"fit the measured, unshipped variant {SLOPE_VERSION} (each beat's slope beside it, "
                         f"PCA {SLOPE_N_PCA}; docs/MODELS.md) into --out")
    ap.add_argument("--session-weight", type=float, default=SESSION_WEIGHT,
                    help="weight of the between-recording scatter added to the covariance the LDA "
                         f"whitens (session_lda_scalings; default {SESSION_WEIGHT})")
    args = ap.parse_args(argv)
    train_beats(args.data, args.out, slope=args.slope, session_weight=args.session_weight)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
