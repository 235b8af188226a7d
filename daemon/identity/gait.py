"""Gait identity: a small linear projection of IMU walking windows, per-person templates, scores.

WHY this shape (measured, docs/identity.md "Gait identity"):

* Input: the daemon's 2 s IMU windows (``ImuWindow.data``, SI units, 100 Hz) while the gait
  gate says walking. Raw z-normalised autocorrelation features score near chance across
  persons (cosine is dominated by how hard someone walks, not who they are); an LDA
  projection fitted on TRAINING persons only (``python -m training.train_gait``) keeps the
  directions that separate persons and is what ships.
* Features ``stride_lognorm``: the stride-lag ACF (lags spread over 1.2 s, correlation
  coefficients, so the gait cycle's shape) with the per-axis variance as log, plus the
  normalised short-lag ACF (lags 1..10 = 10-100 ms, the shape of each step). ``stride``:
  the stride-lag ACF as the IMU models use it.
* A person's template is the mean of their unit-length enrolment embeddings; a live score is
  the cosine of the mean of the last ``pool`` walking windows to it (like the ECG segment
  pooling). Scores are z-normalised with the impostor mean/std measured on training persons
  (stored in the model) before they are fused with the ECG score.
* The model is a few kB of float32 in ONE file, ``daemon/models/gait_<placement>.npz``: the
  arrays plus a ``meta_json`` string (name, version, placement, features, score norm, the
  training persons and the measured metrics; print it with ``python -c "import numpy as np;
  print(np.load('daemon/models/gait_waist.npz')['meta_json'])"``). No ``.json`` sidecar, so
  the ``*.json`` manifests next to it stay the tflite models' only. Pure numpy, no
  TensorFlow, no per-sample Python loops.

Gait is weak and is NEVER an identity on its own: the engine only uses it to adjust the ECG
score of a clean, live ECG window (see ``IdentityEngine.observe_gait``).
"""
from __future__ import annotations

import json
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from daemon.dsp.imu import acf_features_batch
from daemon.identity.fusion import ScoreNorm
from daemon.identity.store import GaitTemplate, ModelRef, Person

__all__ = ["GAIT_FEATURES", "GaitModel", "GaitModelError", "GaitScorer", "build_gait_template",
           "gait_features", "load_gait_models"]

GAIT_FEATURES = ("stride", "stride_lognorm")
_LOG_EPS = np.float32(1e-4)


class GaitModelError(ValueError):
    """A gait model asset is missing, malformed or does not fit its input; says which file."""


def gait_features(windows: np.ndarray, kind: str, fs: float = 100.0) -> np.ndarray:
    """(b, n, 6) SI windows -> (b, F) float32 gait features (see the module docstring)."""
    w = np.asarray(windows, dtype=np.float32)
    if kind == "stride":
        return acf_features_batch(w, 10, "stride", fs)
    if kind == "stride_lognorm":
        stride = acf_features_batch(w, 10, "stride", fs).reshape(len(w), 6, 11)
        stride[:, :, 0] = np.log(stride[:, :, 0] + _LOG_EPS)
        short = acf_features_batch(w, 10, "normalized", fs).reshape(len(w), 6, 11)[:, :, 1:]
        return np.concatenate([stride.reshape(len(w), -1), short.reshape(len(w), -1)], axis=1)
    raise GaitModelError(f"gait feature kind {kind!r} is not one of {GAIT_FEATURES}")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


@dataclass(frozen=True, eq=False)
class GaitModel:
    """Features -> z-norm (``mean``/``scale``) -> minus ``center`` -> ``projection`` (F, k) -> unit.

    ``score_norm``: z-norm of the POOLED cosine score (impostor mean/std, training persons,
    cross-validated); ``pool``: walking windows averaged per score; ``max_age_s``: older
    walking windows leave the pool; ``min_enrol_windows``: fewer walking windows at
    enrolment -> no gait template. ``placement`` must match how the IMU is worn.
    """

    name: str
    version: str
    placement: str
    features: str
    fs_hz: float
    window_s: float
    mean: np.ndarray
    scale: np.ndarray
    center: np.ndarray
    projection: np.ndarray
    score_norm: ScoreNorm
    pool: int = 5
    max_age_s: float = 15.0
    min_enrol_windows: int = 10
    info: Mapping[str, object] = field(default_factory=dict)  # training persons, metrics (not used to score)

    def __post_init__(self) -> None:
        f, k = np.shape(self.projection)
        for name in ("mean", "scale", "center"):
            if np.shape(getattr(self, name)) != (f,):
                raise GaitModelError(f"gait model {self.name}: {name} must have shape ({f},), got {np.shape(getattr(self, name))}")
        if self.features not in GAIT_FEATURES:
            raise GaitModelError(f"gait model {self.name}: features {self.features!r} not in {GAIT_FEATURES}")
        if not np.all(np.asarray(self.scale) > 0):
            raise GaitModelError(f"gait model {self.name}: scale must be > 0")

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version, int(np.shape(self.projection)[1]))

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """(b, n, 6) SI windows (or one (n, 6)) -> (b, k) unit float32 embeddings."""
        w = np.asarray(windows, dtype=np.float32)
        if w.ndim == 2:
            w = w[None]
        expect = int(round(self.window_s * self.fs_hz))
        if w.shape[1] != expect:
            raise GaitModelError(f"gait model {self.name} needs {expect}-sample windows ({self.window_s} s at {self.fs_hz} Hz), got {w.shape[1]}")
        x = (gait_features(w, self.features, self.fs_hz) - self.mean) / self.scale
        return _unit((x - self.center) @ self.projection)

    # ---- asset I/O -----------------------------------------------------------------------
    def save(self, npz_path: Path) -> None:
        """One ``.npz``: the arrays and ``meta_json`` (everything else, ``info`` included)."""
        meta = {"schema_version": 1, "name": self.name, "version": self.version, "placement": self.placement,
                "features": self.features, "fs_hz": self.fs_hz, "window_s": self.window_s,
                "dim": int(np.shape(self.projection)[1]), "pool": self.pool, "max_age_s": self.max_age_s,
                "min_enrol_windows": self.min_enrol_windows,
                "score_norm": {"kind": self.score_norm.kind, "loc": self.score_norm.loc, "scale": self.score_norm.scale},
                "info": dict(self.info)}
        np.savez(Path(npz_path), mean=np.asarray(self.mean, np.float32), scale=np.asarray(self.scale, np.float32),
                 center=np.asarray(self.center, np.float32), projection=np.asarray(self.projection, np.float32),
                 meta_json=np.array(json.dumps(meta, indent=1)))

    @classmethod
    def load(cls, npz_path: Path) -> "GaitModel":
        npz_path = Path(npz_path)
        fix = "re-install biod or run python -m training.train_gait"
        try:
            with np.load(npz_path, allow_pickle=False) as z:
                arrays = {k: z[k].astype(np.float32) for k in ("mean", "scale", "center", "projection")}
                meta = json.loads(str(z["meta_json"]))
        # a truncated file is BadZipFile, an empty one EOFError: both had crashed `biod run`
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise GaitModelError(f"{npz_path}: cannot load the gait model ({type(exc).__name__}: {exc}); {fix}") from None
        if not isinstance(meta, dict) or meta.get("schema_version") != 1:
            got = meta.get("schema_version") if isinstance(meta, dict) else meta
            raise GaitModelError(f"{npz_path}: unsupported gait model schema {got!r}; {fix}")
        try:
            sn = meta["score_norm"]
            return cls(name=str(meta["name"]), version=str(meta["version"]), placement=str(meta["placement"]),
                       features=str(meta["features"]), fs_hz=float(meta["fs_hz"]), window_s=float(meta["window_s"]),
                       score_norm=ScoreNorm(sn["kind"], float(sn["loc"]), float(sn["scale"])),
                       pool=int(meta.get("pool", 5)), max_age_s=float(meta.get("max_age_s", 15.0)),
                       min_enrol_windows=int(meta.get("min_enrol_windows", 10)), info=dict(meta.get("info", {})),
                       **arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise GaitModelError(f"{npz_path}: damaged gait model metadata ({type(exc).__name__}: {exc}); {fix}") from None


def load_gait_models(directory: Path) -> dict[str, GaitModel]:
    """Every ``gait_*.npz`` in ``directory``, keyed by placement (``waist``, ``thigh``)."""
    out: dict[str, GaitModel] = {}
    for path in sorted(Path(directory).glob("gait_*.npz")):
        model = GaitModel.load(path)
        out[model.placement] = model
    return out


def build_gait_template(embeddings: np.ndarray, model: GaitModel) -> GaitTemplate | None:
    """Mean of the unit enrolment embeddings; None with fewer than ``min_enrol_windows``."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != model.ref.dim:
        raise ValueError(f"gait embeddings must have shape (n, {model.ref.dim}) for {model.ref}, got {x.shape}")
    x = x[np.all(np.isfinite(x), axis=1)]
    if len(x) < model.min_enrol_windows:
        return None
    x = _unit(x)
    proto = _unit(x.mean(axis=0))
    pooled = _unit(np.stack([x[i:i + model.pool].mean(0) for i in range(0, len(x) - model.pool + 1)]))
    self_score = float(np.median(pooled @ proto)) if len(pooled) else float("nan")
    return GaitTemplate(model=model.ref, prototype=proto, n_windows=int(len(x)), self_score=self_score)


class GaitScorer:
    """Pooled gait scores of the recent walking windows against the persons' gait templates.

    Only persons whose template was made with ``model`` are scored (another model's space is
    not comparable); the others simply get no gait score (ECG alone for them).
    """

    def __init__(self, people: list[Person], model: GaitModel) -> None:
        self.model = model
        scored = [p for p in people if p.gait is not None and model.ref.accepts(p.gait.model)]
        self.names = [p.name for p in scored]
        self._templates = (np.stack([p.gait.prototype for p in scored]).astype(np.float32)  # type: ignore[union-attr]
                           if scored else np.zeros((0, model.ref.dim), np.float32))
        self._pool: deque[tuple[float, np.ndarray]] = deque(maxlen=model.pool)

    def clear(self) -> None:
        self._pool.clear()

    def push(self, t: float, embedding: np.ndarray) -> None:
        e = np.asarray(embedding, dtype=np.float32).ravel()
        if e.shape[0] == self.model.ref.dim and np.all(np.isfinite(e)):
            self._pool.append((float(t), _unit(e)))

    def scores(self, t: float) -> dict[str, float] | None:
        """Raw pooled cosine per scored person; None without ``pool`` fresh walking windows."""
        fresh = [e for ts, e in self._pool if t - ts <= self.model.max_age_s]
        if not self.names or len(fresh) < self.model.pool:
            return None
        s = _unit(np.mean(fresh, axis=0)) @ self._templates.T
        return {n: float(v) for n, v in zip(self.names, s)}
