"""Beat-morphology identity model and its fusion with the 3 s window embedding.

WHY a second identity model: the 3 s CNN sees the ECG at 100 Hz and learns from ~100 training
persons; a linear discriminant projection of single beats at 125 Hz (PCA + LDA, fitted on the
same training persons, ``training/train_beats.py``) keeps finer QRS/T morphology and, fused with
the CNN, measured clearly better on held-out persons than either alone (docs/MODELS.md). It is a
linear map, shipped as an int8 LiteRT model with its manifest like every other model.

Fusion is the sum rule on cosine scores, done in the embedding itself so that the identity
engine, the store and the evaluation stay unchanged: the fused embedding is
``[sqrt(w) * unit(cnn), sqrt(1 - w) * unit(beats)]``, whose dot product with another such vector
is ``w * cos_cnn + (1 - w) * cos_beats``. The beat part is itself one unit vector per lead
(mean of that lead's unit beat embeddings), concatenated over leads, zeros for a lead that is off.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.dsp.ecg_pipeline import BEAT_AFTER_S, BEAT_BEFORE_S
from daemon.inference.runtime import Model, ModelError, load_model

BEATS_FILE = "ecg_beats.tflite"


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(n > 1e-12, v / np.maximum(n, 1e-12), 0.0).astype(np.float32)


def _zscore_last(x: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=2, keepdims=True)
    sd = x.std(axis=2, keepdims=True)
    return ((x - mu) / np.maximum(sd, 1e-6)).astype(np.float32)


def beat_features(morph: np.ndarray, stride: int = 1, slope: bool = False) -> np.ndarray:
    """(k, L, n_leads) beats in mV -> (k, n_leads, L) z-scored per beat and lead; with
    ``slope``, (k, n_leads, 2L): the z-scored beat followed by its z-scored first difference.

    Per-beat z-scoring removes amplitude (electrode contact and placement change it from day to
    day) and keeps shape, which is what stays personal across sessions. The slope half is
    z-scored on its own, which no linear map of the beat can do: it gives the QRS's and the T
    wave's slopes their own scale beside their heights (measured as beat model 3.0.0 and not
    shipped: docs/MODELS.md, "A slope channel for the beat model").
    """
    x = np.asarray(morph, dtype=np.float32)[:, ::stride, :].transpose(0, 2, 1)
    z = _zscore_last(x)
    if not slope:
        return z
    d = np.diff(z, axis=2, prepend=z[:, :, :1])
    return np.concatenate([z, _zscore_last(d)], axis=2)


def pipeline_kwargs_of(beat_fs: float, lowpass_hz: float, rr_exponent: float = 0.0,
                      rr_ref_s: float = 1.0) -> dict[str, float]:
    """``EcgPipeline`` arguments for a beat model's stated input (one place maps the manifest's
    features to the pipeline, for the runtime and for the benchmarks)."""
    kw = {"beat_fs": float(beat_fs), "beat_lowpass_hz": float(lowpass_hz)}
    if rr_exponent:
        kw.update(beat_rr_exponent=float(rr_exponent), beat_rr_ref_s=float(rr_ref_s))
    return kw


@dataclass(frozen=True)
class BeatMorphModel:
    """The projection model and the pipeline settings its manifest states."""

    model: Model
    input_name: str
    n_leads: int
    length: int            # samples per beat (the model's input is 2x that with ``slope``)
    beat_fs: float
    lowpass_hz: float
    weight: float          # share of the CNN score in the fused score (sum rule)
    #: heart-rate normalisation of the beats (``daemon.dsp.segment.RrWarp``); 0: none (models
    #: before 2.0.0, whose manifests do not state it)
    rr_exponent: float = 0.0
    rr_ref_s: float = 1.0
    #: the input carries each beat's z-scored first difference after it (manifest's
    #: features.params.slope; False for the shipped model and when a manifest does not say)
    slope: bool = False

    @classmethod
    def load(cls, path: Path) -> "BeatMorphModel":
        model = load_model(path)
        spec = model.manifest.inputs[0]
        fp = spec.features.params if spec.features is not None else {}
        if spec.rate_hz is None or len(spec.shape) != 2 or "lowpass_hz" not in fp:
            raise ModelError(f"{path}: the manifest must state rate_hz, a (leads, samples) shape "
                             "and features.params.lowpass_hz")
        w = float(model.manifest.thresholds.get("fusion_weight_cnn", 0.5))
        if not 0.0 <= w <= 1.0:
            raise ModelError(f"{path}: thresholds.fusion_weight_cnn={w} must lie in [0, 1]")
        rr_exp, rr_ref = float(fp.get("rr_exponent", 0.0)), float(fp.get("rr_ref_s", 1.0))
        if not 0.0 <= rr_exp <= 1.0 or rr_ref <= 0:
            raise ModelError(f"{path}: features.params rr_exponent={rr_exp} must lie in [0, 1] "
                             f"and rr_ref_s={rr_ref} be positive")
        slope = bool(fp.get("slope", False))
        width = int(spec.shape[1])
        if slope and width % 2:
            raise ModelError(f"{path}: features.params.slope needs an even input width "
                             f"(beat + its slope), the manifest states {width}")
        # WHY at load: the pipeline cuts beats BEAT_BEFORE_S..BEAT_AFTER_S around R; a model fitted
        # on other bounds would otherwise fail on the first beat, inside the running daemon
        before = float(fp.get("before_s", BEAT_BEFORE_S))
        after = float(fp.get("after_s", BEAT_AFTER_S))
        length = width // 2 if slope else width
        expected = int(round(BEAT_BEFORE_S * spec.rate_hz)) + int(round(BEAT_AFTER_S * spec.rate_hz))
        if (before, after) != (BEAT_BEFORE_S, BEAT_AFTER_S) or length != expected:
            raise ModelError(f"{path}: the manifest states beats {before:g} s before to {after:g} s "
                             f"after R, {length} samples at {spec.rate_hz:g} Hz; this biod cuts "
                             f"{BEAT_BEFORE_S:g} s to {BEAT_AFTER_S:g} s, {expected} samples: "
                             "re-install biod's models")
        return cls(model, spec.name, int(spec.shape[0]), length,
                   float(spec.rate_hz), float(fp["lowpass_hz"]), w, rr_exp, rr_ref, slope)

    @property
    def dim(self) -> int:
        out = next(o for o in self.model.manifest.outputs if o.name == "embedding")
        return int(out.shape[0] * out.shape[1])

    def pipeline_kwargs(self) -> dict[str, float]:
        return pipeline_kwargs_of(self.beat_fs, self.lowpass_hz, self.rr_exponent, self.rr_ref_s)

    def embed(self, morph: np.ndarray, lead_mask: np.ndarray) -> np.ndarray:
        """(n_leads * K,) unit vector from a window's beats; zeros when it has none."""
        mask = np.asarray(lead_mask, dtype=bool)[: self.n_leads]
        out = np.zeros(self.dim, dtype=np.float32)
        if morph.ndim != 3 or morph.shape[0] == 0 or not mask.any():
            return out
        if morph.shape[1] != self.length:
            raise ModelError(f"beat windows have {morph.shape[1]} samples, the beat model expects "
                             f"{self.length}: build the pipeline with this model's pipeline_kwargs()")
        feats = beat_features(morph[:, :, : self.n_leads], slope=self.slope)
        # all of the window's beats in one invoke: the same numbers as one call per beat, at
        # about half the cost (the per-call overhead of the interpreter dominates a 44 KB model)
        per_lead = np.asarray(self.model.run(**{self.input_name: feats})["embedding"])  # (k, n_leads, K)
        return pool_beats(per_lead, mask)


def pool_beats(per_lead: np.ndarray, lead_mask: np.ndarray) -> np.ndarray:
    """A window's beat vector from its beats' projections (k, n_leads, K): per lead the mean of
    the unit beat projections, normalised; zeros for a lead that is off; then normalised as one
    (n_leads * K,) vector, so every lead that is on weighs the same."""
    lead_vec = _unit(_unit(per_lead).mean(axis=0))              # (n_leads, K)
    lead_vec[~np.asarray(lead_mask, dtype=bool)] = 0.0
    return _unit(lead_vec.reshape(-1))


def fuse_embeddings(cnn: np.ndarray, beats: np.ndarray | None, weight_cnn: float) -> np.ndarray:
    """``[sqrt(w) unit(cnn), sqrt(1-w) unit(beats)]`` (see module docstring). A window without
    beats keeps only the CNN share, so its score against any template is lower: conservative."""
    c = np.sqrt(weight_cnn) * _unit(np.asarray(cnn, dtype=np.float32))
    if beats is None:
        return c
    return np.concatenate([c, np.sqrt(1.0 - weight_cnn) * _unit(np.asarray(beats, dtype=np.float32))])
