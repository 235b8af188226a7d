"""Score-level fusion of the ECG and IMU outputs: activity, identity, and gated age/gender.

WHY score-level sum rule: the modalities are independent sensors with calibrated-ish
outputs; a weighted sum of (normalised) scores is the classic, robust fusion (Kittler et al.
1998, "On combining classifiers") and degrades gracefully: a missing modality simply drops
out and the remaining weights are renormalised, so losing the IMU over BLE never blanks the
activity. Products or learned fusers punish one over-confident modality far more.

* Activity: each model's class probabilities are first mapped onto the top-level classes
  ``rest / walking / vigorous`` (IMU models have fine classes such as ``going_up`` or
  ``bicycling``), then summed with weights.
* Identity (when both ECG and gait identity scores exist): raw scores live on different
  scales (ECG cosine vs. gait cosine, with very different impostor spreads), so each modality
  is normalised first (z-norm with its impostor mean/std, or min-max over a fixed range), then
  summed with weights. The engine maps the fused z back onto each person's ECG cosine scale
  (``ScoreNorm.invert``) so its thresholds apply; gait alone is never fused into an identity.
* Age/gender from gait are only meaningful while walking: they are published only when the
  fused activity says walking with enough probability.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np

__all__ = [
    "ACTIVITY_CLASSES",
    "DEFAULT_ACTIVITY_MAP",
    "ActivityEstimate",
    "FusedActivity",
    "FusionConfig",
    "ScoreNorm",
    "fuse_activity",
    "fuse_identity",
    "gate_walking_only",
    "normalise_by_impostors",
    "to_top_level",
]

ACTIVITY_CLASSES: tuple[str, ...] = ("rest", "walking", "vigorous")

# Fine labels seen in HuGaDB / SisFall-style IMU models and ECG activity heads -> top level.
DEFAULT_ACTIVITY_MAP: dict[str, str] = {
    "rest": "rest", "sitting": "rest", "standing": "rest", "lying": "rest", "sitting_in_car": "rest",
    "sitting_down": "rest", "standing_up": "rest", "up_by_elevator": "rest", "down_by_elevator": "rest",
    "walking": "walking", "going_up": "walking", "going_down": "walking", "stairs": "walking",
    "vigorous": "vigorous", "running": "vigorous", "jogging": "vigorous", "bicycling": "vigorous",
    "cycling": "vigorous", "jumping": "vigorous",
}


class FusionError(ValueError):
    """Inputs the fusion cannot interpret (unknown label, wrong length); names the fix."""


@dataclass(frozen=True)
class ActivityEstimate:
    """One model's activity output: probabilities over its own ``labels``."""

    probs: np.ndarray
    labels: tuple[str, ...]


@dataclass(frozen=True)
class FusedActivity:
    """Top-level activity probabilities (order ``ACTIVITY_CLASSES``) and which inputs fed them."""

    probs: np.ndarray
    sources: tuple[str, ...]

    @property
    def label(self) -> str:
        return ACTIVITY_CLASSES[int(np.argmax(self.probs))]

    def p(self, name: str) -> float:
        return float(self.probs[ACTIVITY_CLASSES.index(name)])


@dataclass(frozen=True)
class ScoreNorm:
    """Maps a modality's raw identity score onto a common scale.

    ``znorm``: (s - loc) / scale with loc/scale the impostor mean/std of that modality
    (impostor scores -> ~N(0,1), so "how many impostor std above chance" is comparable).
    ``minmax``: (s - loc) / scale with loc = min, scale = max - min of the modality's range.
    """

    kind: Literal["znorm", "minmax"]
    loc: float
    scale: float

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise FusionError(f"score normalisation scale must be > 0, got {self.scale}")

    def apply(self, scores: np.ndarray) -> np.ndarray:
        out = (np.asarray(scores, dtype=np.float32) - np.float32(self.loc)) / np.float32(self.scale)
        return np.clip(out, 0.0, 1.0) if self.kind == "minmax" else out

    def invert(self, normalised: np.ndarray | float) -> np.ndarray:
        """Back to the raw scale (``loc + scale * z``): lets a fused z-score be compared with
        thresholds set on this modality's raw scores (the engine's per-person cosines)."""
        return (np.float32(self.loc) + np.float32(self.scale) * np.asarray(normalised, dtype=np.float32)).astype(np.float32)


@dataclass(frozen=True)
class FusionConfig:
    ecg_activity_weight: float = 0.4     # the IMU sees movement directly; ECG infers it from HR/morphology
    imu_activity_weight: float = 0.6
    # Identity: gait is weak (waist, held-out cross-trial EER 22.7 % vs the served ECG's cross-date
    # 9.6-10.4 %, docs/identity.md): the d'-proportional weight would be 0.37; 0.15 because the gait numbers come
    # from 5 held-out persons and a cross-speed protocol only, and no paired ECG+gait data exists.
    ecg_identity_weight: float = 0.85
    gait_identity_weight: float = 0.15
    walking_min_prob: float = 0.6        # age/gender published only above this fused P(walking)
    activity_map: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTIVITY_MAP))


def to_top_level(estimate: ActivityEstimate, mapping: Mapping[str, str] = DEFAULT_ACTIVITY_MAP) -> np.ndarray:
    """Sum fine-class probabilities into rest/walking/vigorous (renormalised to 1)."""
    probs = np.asarray(estimate.probs, dtype=np.float32).ravel()
    if probs.shape[0] != len(estimate.labels):
        raise FusionError(f"{probs.shape[0]} activity probabilities for {len(estimate.labels)} labels")
    idx = []
    for label in estimate.labels:
        top = mapping.get(label)
        if top not in ACTIVITY_CLASSES:
            raise FusionError(f"activity label {label!r} has no top-level class: add it to the activity map (rest/walking/vigorous)")
        idx.append(ACTIVITY_CLASSES.index(top))
    out = np.bincount(np.asarray(idx), weights=np.clip(probs, 0, None), minlength=len(ACTIVITY_CLASSES)).astype(np.float32)
    total = float(out.sum())
    if total <= 0 or not np.isfinite(total):
        raise FusionError("activity probabilities sum to zero or are not finite")
    return out / np.float32(total)


def fuse_activity(ecg: ActivityEstimate | None, imu: ActivityEstimate | None,
                  config: FusionConfig = FusionConfig()) -> FusedActivity | None:
    """Weighted sum of the present modalities' top-level probabilities; None when neither."""
    parts = [(name, est, w) for name, est, w in (("ecg", ecg, config.ecg_activity_weight),
                                                 ("imu", imu, config.imu_activity_weight))
             if est is not None and w > 0]
    if not parts:
        return None
    total_w = sum(w for _, _, w in parts)
    probs = sum(np.float32(w / total_w) * to_top_level(est, config.activity_map) for _, est, w in parts)
    return FusedActivity(probs=np.asarray(probs, dtype=np.float32), sources=tuple(n for n, _, _ in parts))


def _norm_for(norm: ScoreNorm | Mapping[str, ScoreNorm], name: str) -> ScoreNorm | None:
    return norm if isinstance(norm, ScoreNorm) else norm.get(name)


def fuse_identity(ecg_scores: Mapping[str, float] | None, gait_scores: Mapping[str, float] | None,
                  ecg_norm: ScoreNorm | Mapping[str, ScoreNorm], gait_norm: ScoreNorm | Mapping[str, ScoreNorm],
                  config: FusionConfig = FusionConfig()) -> dict[str, float]:
    """Per person: weighted mean of the normalised scores of the modalities that score them.

    A person with only an ECG template gets the normalised ECG score alone (weights are
    renormalised per person), so enrolling gait for some persons only does not penalise others.
    A norm may be one ``ScoreNorm`` for everybody or one per person (the ECG thresholds and
    impostor statistics are per person); a person without a norm for a modality gets that
    modality left out.
    """
    out: dict[str, float] = {}
    names = sorted(set(ecg_scores or {}) | set(gait_scores or {}))
    for name in names:
        num = den = 0.0
        for scores, norms, w in ((ecg_scores, ecg_norm, config.ecg_identity_weight),
                                 (gait_scores, gait_norm, config.gait_identity_weight)):
            norm = _norm_for(norms, name)
            if scores is not None and name in scores and w > 0 and norm is not None:
                num += w * float(norm.apply(np.float32(scores[name])))
                den += w
        if den > 0:
            out[name] = num / den
    return out


def gate_walking_only(estimate: object, activity: FusedActivity | None,
                      config: FusionConfig = FusionConfig()) -> object | None:
    """Age/gender estimates from gait only while walking is detected; None otherwise.

    WHY: the IMU age/gender models were trained on walking windows (SisFall walking/jogging);
    on a sitting person they output confident nonsense.
    """
    if estimate is None or activity is None or activity.p("walking") < config.walking_min_prob:
        return None
    return estimate


def normalise_by_impostors(impostor_scores: Sequence[float] | np.ndarray) -> ScoreNorm:
    """A z-norm from a modality's impostor scores (e.g. the enrolment impostor set)."""
    s = np.asarray(impostor_scores, dtype=np.float64)
    if s.size < 2:
        raise FusionError("need at least two impostor scores to fit a z-norm")
    return ScoreNorm("znorm", float(s.mean()), float(max(s.std(), 1e-6)))
