"""The BASELINES.md identity baseline (PCA + LDA on beats, cosine), scored in the same run.

WHY: ``shared/BASELINES.md`` reports what PCA + LDA on single beats reaches on persons outside
shared/data, but those persons are not ours, and ECG-ID persons differ a lot in how much they
drift between recordings (person 2 alone gives a third of our held-out tests). A comparison
means something only on the same persons, tests and protocol, so ``python -m training.eval
models --baseline-fit DIR`` fits this baseline on the TRAINING persons of ``DIR`` (never on a
person it evaluates) and scores it with exactly the protocol of the shipped models.

The baseline, as BASELINES.md states it and no more: the beats the daemon's pipeline cuts
(0.25 s before to 0.45 s after R, 125 Hz, 40 Hz low-pass; NOT the heart-rate normalised beats
the shipped beat model reads, see ``plain_beat_kwargs``), in mV minus their median, PCA (60)
then shrinkage LDA (Ledoit-Wolf) over the ECG-ID training persons (lead I), a window's embedding
the normalised mean of its beats' unit projections, cosine scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.ecg import WindowSet

N_PCA = 60


def plain_beat_kwargs(pipeline_kw: dict) -> dict:
    """``pipeline_kw`` without the heart-rate normalisation of the beats (``beat_rr_*``): the
    baseline is BASELINES.md's method as stated, on the pipeline's plain beats."""
    return {k: v for k, v in pipeline_kw.items() if not k.startswith("beat_rr_")}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _lead_i_beats(morph: np.ndarray) -> np.ndarray:
    """(k, L, 3) beats in mV -> (k, L) lead I minus its median (a beat's baseline level)."""
    b = np.asarray(morph, dtype=np.float64)[:, :, 0]
    return b - np.median(b, axis=1, keepdims=True)


@dataclass(frozen=True)
class BeatLdaBaseline:
    """A fitted PCA + LDA projection of lead I beats."""

    projection: np.ndarray  # (L, K): PCA then LDA folded into one affine map ...
    offset: np.ndarray      # (K,) ... x @ projection + offset
    persons: int
    beats: int

    def embed_windows(self, ws: WindowSet) -> np.ndarray:
        """(n_windows, K): normalised mean of the unit projections of each window's beats
        (zeros for a window without beats, which then matches nobody)."""
        if ws.morph is None:
            raise ValueError("the windows carry no beats: build them with beat_fs set")
        out = np.zeros((len(ws.morph), self.projection.shape[1]))
        for i, m in enumerate(ws.morph):
            if len(m):
                p = _lead_i_beats(m) @ self.projection + self.offset
                out[i] = _unit(_unit(p).mean(axis=0))
        return out.astype(np.float32)


def fit_baseline(ws: WindowSet) -> BeatLdaBaseline:
    """Fit on every ECG-ID beat of ``ws`` (each beat once although windows overlap)."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from training.train_beats import distinct_beats

    if ws.morph is None:
        raise ValueError("the windows carry no beats: build them with beat_fs set")
    if not any(len(m) for m in ws.morph):
        raise ValueError("the baseline needs ECG-ID training persons to fit on; found 0")
    beats, rec = distinct_beats(ws)
    keep = np.array([ws.records[r].dataset == "ecgid" for r in rec], dtype=bool)
    person = [ws.records[r].person for r in rec[keep]]
    if len(set(person)) < 3:
        raise ValueError(f"the baseline needs ECG-ID training persons to fit on; found "
                         f"{len(set(person))}")
    x = _lead_i_beats(beats[keep])
    pca = PCA(min(N_PCA, x.shape[1]), random_state=0).fit(x)
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(pca.transform(x), person)
    k = min(len(set(person)) - 1, pca.n_components_)
    origin = lda.transform(pca.transform(np.zeros((1, x.shape[1]))))[0, :k]
    proj = lda.transform(pca.transform(np.eye(x.shape[1])))[:, :k] - origin
    return BeatLdaBaseline(proj, origin, len(set(person)), len(x))
