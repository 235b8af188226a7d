"""Open-set identity: who (of the enrolled household, or nobody known) is wearing the ECG.

Pure and synchronous: ECG window embeddings in, :class:`IdentityState` out; no I/O, no clock
(the caller passes ``t``). See ``docs/identity.md`` for the reasoning and the measurements.

Pipeline per clean window (``quality_ok`` and an embedding):

1. *Scores.* Each person has a few L2-normalised prototypes (one per enrolment activity, or
   k-means centroids). A set of embeddings is scored against a person by cosine similarity
   to the closest prototype (max over prototypes). The last ``window`` clean windows are
   pooled, by default by averaging the embeddings (``scoring="segment"``) -- measured better
   than the median of per-window scores (``scoring="median"``) on the synthetic household
   in ``tests/test_identity_engine.py``; both are implemented so the choice can be re-measured
   on the real model's embeddings.
2. *Decision* for this window: the best person if its pooled score reaches that person's own
   threshold AND beats the runner-up by ``margin``; ``unknown`` if nobody's threshold is
   reached; no decision (abstain) when two persons are too close to call.
3. *Consensus.* Decisions go into a short history. A person is announced only when
   ``confirm`` decisions in the history agree; ``unknown`` only after ``unknown`` clean
   windows rejected everyone; an announced wearer is replaced only by ``switch`` agreeing
   decisions, and keeps winning its own window while its score stays above
   ``threshold - stay_hysteresis`` (hysteresis, so one odd window never flips the wearer).
4. *Liveness.* When the ECG is not live (lead-off, no beats) the identity ends immediately:
   wearer None, history cleared. A person can only change by taking the electrodes off.
5. *Gait fusion (optional).* Walking IMU windows (``observe_gait``) only fill a gait pool;
   they never make a decision. When a clean ECG window is scored and the pool holds enough
   fresh walking windows, each person with a gait template gets the sum-rule fusion of the
   z-normalised ECG and gait scores (``fusion.fuse_identity``, rescaled to Stouffer's weighted
   Z so the impostor spread is unchanged), mapped back onto that person's ECG cosine scale so the thresholds, margin and hysteresis apply unchanged. No
   gait (not walking, no template, no gait model): exactly the ECG-only behaviour. No live
   clean ECG: no identity, whatever the gait says.
6. *Template adaptation (opt-in, ``adapt``).* When a wearing session ends (``live`` False)
   after it was announced as person P with strong evidence -- enough clean windows, most of
   its decisions for P, the session's mean embedding above P's threshold by ``adapt_margin``,
   above every other member by ``adapt_runner_up`` and accepted by P's ENROLMENT prototypes
   alone (the anchor) -- that mean becomes an extra prototype of P (at most
   ``adapt_max_prototypes``, oldest dropped; enrolment prototypes are never dropped) and P's
   threshold is re-derived against the impostor set, so P's per-decision FAR stays at
   ``target_far``. The caller persists it (:meth:`IdentityEngine.take_adaptations`).
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Protocol, Sequence

import numpy as np

from daemon.identity.fusion import FusionConfig, ScoreNorm, fuse_identity
from daemon.identity.gait import GaitModel, GaitScorer, build_gait_template
from daemon.identity.store import (
    ModelRef,
    Person,
    StoreError,
    new_person_id,
    slugify,
    stale_persons,
    utc_now,
)
from daemon.identity.store import name_problem as _name_rule_problem  # IdentityEngine.name_problem adds "not taken"

__all__ = [
    "ADAPTED_PREFIX",
    "UNKNOWN",
    "Adaptation",
    "EnrolmentReport",
    "IdentityConfig",
    "IdentityEngine",
    "IdentityState",
    "build_prototypes",
    "segment_scores",
    "sliding_segments",
]

UNKNOWN = "unknown"
#: ``prototype_labels`` of prototypes added by template adaptation start with this; all
#: others are enrolment prototypes, which adaptation never removes.
ADAPTED_PREFIX = "adapted-"


@dataclass(frozen=True)
class IdentityConfig:
    """Knobs of scoring, consensus and enrolment (defaults measured, see docs/identity.md)."""

    # scoring
    scoring: Literal["segment", "median"] = "segment"
    window: int = 5                 # clean windows pooled per score (~5 s of ECG)
    min_pool: int = 5               # no decision from fewer pooled windows (thresholds are set for full pools)
    max_age_s: float = 20.0         # a clean window older than this leaves the pool
    margin: float = 0.05            # best minus runner-up pooled score needed to decide
    # consensus
    history: int = 8                # per-window decisions kept
    confirm: int = 3                # agreeing decisions to announce a person from nothing
    unknown: int = 5                # rejecting decisions to announce "unknown"
    switch: int = 8                 # agreeing decisions to replace an announced wearer
    stay_hysteresis: float = 0.06   # the announced wearer keeps its window down to threshold - this
    # enrolment
    min_enrol_windows: int = 20     # clean 3 s windows (about 1 minute at 1 window/s, cut 3 s hops)
    min_self_similarity: float = 0.25  # median pairwise cosine of the enrolment windows (set per model)
    enrol_parts: int = 3            # the enrolment cut in this many parts in time order ...
    min_part_similarity: float = 0.4  # ... whose mean embeddings must agree this well (docs/identity.md)
    #: refuse an enrolment whose segments an enrolled person's template accepts this often: the
    #: same person under a second name (both then go undecided: the runner-up margin never clears)
    max_accepted_by_other: float = 0.5
    n_prototypes: int = 3           # k-means centroids when no activities are given
    min_windows_per_prototype: int = 8
    target_far: float = 0.01        # per-decision false-accept rate the threshold aims for
    max_frr: float = 0.05           # genuine quantile used as threshold when no impostor set is given
    far_confidence: float = 0.95    # target_far must hold at this percentile of a bootstrap over impostor persons (0: plain quantile)
    refuse_frr: float = 0.5         # refuse enrolment when the expected FRR is worse than this
    threshold_bounds: tuple[float, float] = (0.2, 0.98)
    cv_folds: int = 5
    seed: int = 0
    # template adaptation (opt-in; docs/identity.md "Template adaptation")
    adapt: bool = False             # add confidently identified sessions as extra prototypes
    adapt_max_prototypes: int = 3   # adapted prototypes kept per person (oldest dropped first)
    adapt_min_windows: int = 10     # clean windows (one lead set) the session needs
    adapt_min_agreement: float = 0.8  # share of the session's decisions naming the wearer
    adapt_margin: float = 0.15      # session-mean score above the wearer's threshold by this (set on training persons)
    adapt_runner_up: float = 0.10   # ... and above every other member's score by this
    adapt_anchor: bool = True       # ... and accepted by the wearer's enrolment prototypes alone

    def __post_init__(self) -> None:
        if self.scoring not in ("segment", "median"):
            raise ValueError(f"identity.scoring must be 'segment' or 'median', got {self.scoring!r}")
        if self.window < 1 or self.history < 1:
            raise ValueError("identity.window and identity.history must be >= 1")
        if not 1 <= self.min_pool <= self.window:
            raise ValueError(f"identity.min_pool={self.min_pool} must be between 1 and identity.window={self.window}")
        for knob in ("confirm", "unknown", "switch"):
            value = getattr(self, knob)
            if not 1 <= value <= self.history:
                raise ValueError(f"identity.{knob}={value} must be between 1 and identity.history={self.history}")
        if not 0 < self.target_far < 1 or not 0 < self.max_frr < 1:
            raise ValueError("identity.target_far and identity.max_frr must be in (0, 1)")
        if not 0 <= self.far_confidence < 1:
            raise ValueError(f"identity.far_confidence must be in [0, 1) (0: off), got {self.far_confidence}")
        if self.adapt_max_prototypes < 1 or self.adapt_min_windows < 1 or not 0 <= self.adapt_min_agreement <= 1:
            raise ValueError("identity.adapt_max_prototypes and adapt_min_windows must be >= 1, adapt_min_agreement in [0, 1]")


@dataclass(frozen=True)
class IdentityState:
    """What the engine believes now.

    ``wearer``: a display name, ``"unknown"`` (a live person no template accepts) or None
    (nobody / not live / not decided yet). ``decided`` is False while evidence is being
    gathered (wearer None but the ECG is live). ``confidence`` = (agreeing decisions + 1) /
    (decisions in the history + 2) (1.0 for "nobody" when the ECG is not live). ``scores``: latest pooled score
    per person. ``n_agreeing``: decisions in the history agreeing with the wearer (or, while
    undecided, with the leading candidate).
    """

    wearer: str | None
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)
    n_agreeing: int = 0
    decided: bool = True
    live: bool = False
    candidate: str | None = None
    fused: bool = False   # ``scores`` include gait evidence (ECG + gait fusion)


@dataclass(frozen=True)
class EnrolmentReport:
    """Outcome of :meth:`IdentityEngine.enrol`; ``person`` is None when refused (see ``reason``).

    ``expected_far``: fraction of impostor segments (never-enrolled persons + the other
    enrolled persons' prototypes) the new threshold accepts, per decision; impostor scores
    cluster by person, so ``expected_far_upper`` is the 95th percentile of a bootstrap over
    impostor PERSONS (how far off the estimate may be with this many impostors).
    ``expected_frr``: fraction of the person's own held-out segments it rejects, cross-validated
    over time-contiguous folds of the enrolment session: a same-session (optimistic) figure;
    on another day expect more (docs/identity.md has the measured gap).
    ``margins``: per enrolled person, the 5th percentile of (own score - that person's score)
    over the new person's held-out segments; ``accepted_by``: the fraction of those segments
    an already-enrolled person's threshold would accept (their new false-accept risk).
    """

    accepted: bool
    reason: str
    person: Person | None
    n_windows: int
    median_self_similarity: float
    threshold: float = float("nan")
    expected_far: float = float("nan")
    expected_far_upper: float = float("nan")
    expected_frr: float = float("nan")
    n_genuine: int = 0
    n_impostor: int = 0
    margins: dict[str, float] = field(default_factory=dict)
    min_margin: float = float("nan")
    accepted_by: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Adaptation:
    """One template adaptation made at the end of a wearing session.

    ``person``: the updated Person (same id; prototypes, labels, threshold, stats changed) to
    save with ``TemplateStore.update_templates``. ``score``: the session mean's score against
    the person's prototypes before the update; ``runner_up``: the best other member's score
    (-1 without others); ``anchor_score``: against the enrolment prototypes alone;
    ``dropped``: labels of the adapted prototypes that made room (oldest first).
    """

    person: Person
    score: float
    runner_up: float
    anchor_score: float
    n_windows: int
    old_threshold: float
    dropped: tuple[str, ...] = ()


class ImpostorSource(Protocol):
    """The shipped impostor set seen through one lead or several (``daemon.enrol.Impostors``)."""

    def for_leads(self, n_leads_on: int) -> tuple[np.ndarray, np.ndarray]: ...


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def _stack(people: Sequence[Person]) -> tuple[np.ndarray, np.ndarray]:
    """All prototypes in one (K, D) matrix and each person's first row (for reduceat)."""
    if not people:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.intp)
    protos = np.concatenate([p.prototypes for p in people]).astype(np.float32)
    starts = np.cumsum([0] + [p.prototypes.shape[0] for p in people[:-1]]).astype(np.intp)
    return protos, starts


def segment_scores(segments: np.ndarray, protos: np.ndarray, starts: np.ndarray, scoring: str) -> np.ndarray:
    """Pooled scores of segments (s, w, D) against persons -> (s, n_persons).

    ``segment``: cosine of the re-normalised mean embedding to each person's closest
    prototype. ``median``: per-window closest-prototype cosine, then the median over the w
    windows (a vote-like, outlier-robust pooling).
    """
    segments = np.asarray(segments, dtype=np.float32)
    s, w, _ = segments.shape
    if protos.shape[0] == 0:
        return np.zeros((s, 0), np.float32)
    if scoring == "segment":
        sims = _unit(segments.mean(axis=1)) @ protos.T
        return np.maximum.reduceat(sims, starts, axis=1)
    sims = segments.reshape(s * w, -1) @ protos.T
    per_window = np.maximum.reduceat(sims, starts, axis=1).reshape(s, w, -1)
    return np.median(per_window, axis=1).astype(np.float32)


def _kmeans_sphere(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25) -> np.ndarray:
    """Spherical k-means (cosine), k-means++ init; returns the non-empty centroids."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = 1.0 - np.max(x @ np.stack(centres).T, axis=1)
        d = np.maximum(d, 0.0) ** 2
        total = float(d.sum())
        if total <= 0:
            break
        centres.append(x[rng.choice(len(x), p=d / total)])
    c = np.stack(centres)
    for _ in range(iters):
        assign = np.argmax(x @ c.T, axis=1)
        new = np.stack([x[assign == j].mean(axis=0) if np.any(assign == j) else c[j] for j in range(len(c))])
        new = _unit(new)
        if np.allclose(new, c, atol=1e-6):
            break
        c = new
    assign = np.argmax(x @ c.T, axis=1)
    return c[np.unique(assign)]


def part_similarity(x: np.ndarray, parts: int) -> float:
    """Lowest cosine between the mean unit embeddings of ``parts`` time-ordered parts of ``x``.

    WHY beside the median self-similarity: half of one person and half of another pass that
    check (their within-person pairs carry the median), and the template then names the second
    person as the first. Parts of one person's recording mostly agree, two persons' mostly do not,
    with an overlap (``python -m training.experiments.enrol_parts``, docs/identity.md); the
    primary guard is the electrodes: an enrolment ends when the ECG stops part-way
    (``daemon.enrol.ContinuityWatch``)."""
    n = len(x)
    if parts < 2 or n < 2 * parts:
        return 1.0
    means = [_unit(x[i].mean(axis=0, keepdims=True))[0] for i in np.array_split(np.arange(n), parts)]
    return float(min(a @ b for i, a in enumerate(means) for b in means[i + 1:]))


def build_prototypes(x: np.ndarray, activities: Sequence[str] | None, config: IdentityConfig
                     ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-activity means where each activity has enough windows, spherical k-means otherwise.

    WHY several prototypes: the ECG embedding of one person moves with heart rate and posture
    (rest vs walking); one mean would sit between the modes and score both lower.
    """
    x = _unit(x)
    if activities is not None:
        acts = np.asarray(list(activities), dtype=object)
        labels, counts = np.unique(acts, return_counts=True)
        keep = [str(a) for a, c in zip(labels, counts) if c >= config.min_windows_per_prototype]
        if keep:
            protos = _unit(np.stack([x[acts == a].mean(axis=0) for a in keep]))
            return protos, tuple(keep)
    k = max(1, min(config.n_prototypes, len(x) // max(1, config.min_windows_per_prototype)))
    if k == 1:
        return _unit(x.mean(axis=0, keepdims=True)), ("cluster-0",)
    protos = _kmeans_sphere(x, k, np.random.default_rng(config.seed))
    return protos, tuple(f"cluster-{i}" for i in range(len(protos)))


def _ecg_norm(person: Person) -> ScoreNorm | None:
    """The person's ECG z-norm (impostor mean/std at enrolment); None for older templates."""
    loc, scale = person.stats.get("ecg_impostor_mean"), person.stats.get("ecg_impostor_std")
    if loc is None or scale is None or not np.isfinite(loc) or not scale > 1e-6:
        return None
    return ScoreNorm("znorm", float(loc), float(scale))


def _person_draws(n_persons: int, seed: int, n_boot: int = 400) -> np.ndarray:
    """(n_boot, n_persons) how often each impostor person is drawn in each bootstrap draw."""
    idx = np.random.default_rng(seed).integers(n_persons, size=(n_boot, n_persons))
    return (idx[:, :, None] == np.arange(n_persons)).sum(axis=1).astype(np.float64)


def _far_upper(accepted: np.ndarray, person: np.ndarray, seed: int, n_boot: int = 400) -> float:
    """95th percentile of the FAR when the impostor persons are resampled with replacement."""
    if accepted.size == 0:
        return float("nan")
    hits = np.bincount(person, weights=accepted.astype(np.float64))
    totals = np.bincount(person).astype(np.float64)
    draws = _person_draws(len(totals), seed, n_boot)
    return float(np.quantile((draws @ hits) / (draws @ totals), 0.95))


def _confident_threshold(impostor: np.ndarray, person: np.ndarray, target_far: float, confidence: float,
                         seed: int) -> float:
    """The lowest threshold whose FAR, at the ``confidence`` percentile of a bootstrap over
    impostor persons, is at most ``target_far``.

    WHY: impostor scores cluster by person, and a tail quantile estimated from a few dozen
    persons misses the look-alikes that a larger population holds (docs/identity.md: 2.6 %
    realised against a 1 % dial). Asking the FAR to hold over resampled impostor populations
    raises the threshold most where few persons carry the tail, and hardly where many do."""
    totals = np.bincount(person).astype(np.float64)
    draws = _person_draws(len(totals), seed)
    cand = np.unique(impostor[impostor >= np.quantile(impostor, 1.0 - target_far, method="higher")])
    # hits[k, c]: person k's scores >= cand[c]; a score passes the candidates below
    # m = searchsorted(cand, score, 'right') of them (candidates ascending)
    n_below = np.zeros((len(totals), cand.size + 1))
    np.add.at(n_below, (person, np.searchsorted(cand, impostor, side="right")), 1.0)
    hits = np.cumsum(n_below[:, ::-1], axis=1)[:, ::-1][:, 1:]
    far = (draws @ hits) / np.maximum(draws @ totals, 1.0)[:, None]
    ok = np.quantile(far, confidence, axis=0) <= target_far
    if ok.any():
        return float(cand[int(np.argmax(ok))])
    return float(np.nextafter(np.float32(impostor.max()), np.float32(np.inf)))


def sliding_segments(x: np.ndarray, w: int, stride: int = 1) -> np.ndarray:
    """(s, w, D) runs of w consecutive rows; a run shorter than w gives one (1, len, D).
    The engine's pools (enrolment, impostor set) and the household evaluation's are cut here."""
    if len(x) < w:
        return x[None]
    view = np.lib.stride_tricks.sliding_window_view(x, w, axis=0)  # (n-w+1, D, w)
    return np.ascontiguousarray(np.moveaxis(view, -1, 1)[::stride])


class IdentityEngine:
    """Stateful per ECG stream; one instance per hub wearable.

    ``store_people``: ``TemplateStore.load()`` (name -> Person). ``model``: the embedding model
    loaded now; persons whose templates were made with another model are set aside in ``stale``
    (never scored: their scores would mean nothing) while everyone else is identified. WHY not
    refuse them all: one person left over from before a model update switched identity off for
    the whole household, and a new person enrolled meanwhile was never identified either
    (review, 2026-11-24). Without ``model`` the model is taken from the templates (all must
    agree, else :class:`StoreError`) and is required for :meth:`enrol`.
    ``impostors``: the shipped impostor set; template adaptation (``config.adapt``) needs it to
    re-derive thresholds and is off without it.
    """

    def __init__(self, store_people: dict[str, Person], config: IdentityConfig | None = None,
                 *, model: ModelRef | None = None, gait_model: GaitModel | None = None,
                 fusion: FusionConfig | None = None, impostors: ImpostorSource | None = None) -> None:
        self.config = config or IdentityConfig()
        people = list(store_people.values())
        models = {p.model for p in people}
        if model is None and len(models) > 1:
            raise StoreError("the enrolled templates come from different ECG models: re-enrol everybody with `biod calibrate`")
        self.model = model or (next(iter(models)) if models else None)
        #: persons enrolled with another ECG model: not identified until re-enrolled
        self.stale: tuple[str, ...] = ()
        if self.model is not None:
            self.stale = tuple(sorted(p.name for p in stale_persons(people, self.model)))
            people = [p for p in people if p.name not in self.stale]
        self._set_people(people)
        self.fusion = fusion or FusionConfig()
        self.impostors = impostors
        self._adaptations: list[Adaptation] = []
        self._gait: GaitScorer | None = None
        self._gait_attached = False
        if gait_model is not None:
            self.attach_gait({gait_model.placement: gait_model}, gait_model.placement)
        self._reset()

    def _set_people(self, people: list[Person]) -> None:
        """(Re)build the scoring arrays from ``people`` (at start and after an adaptation)."""
        self.people = people
        self._names = [p.name for p in people]
        self._thresholds = np.array([p.threshold for p in people], dtype=np.float32)
        self._protos, self._starts = _stack(people)
        self._ecg_norms = {p.name: n for p in people if (n := _ecg_norm(p)) is not None}

    # ---- gait ----------------------------------------------------------------------------
    @property
    def gait_model(self) -> GaitModel | None:
        return self._gait.model if self._gait is not None else None

    @property
    def gait_attached(self) -> bool:
        return self._gait_attached

    def attach_gait(self, models: Mapping[str, GaitModel], placement: str = "waist") -> GaitModel | None:
        """Choose the gait model: the one most enrolled gait templates were made with, else
        the one for ``placement`` (used for new enrolments). Returns it (None: no gait)."""
        self._gait_attached = True
        by_ref = {m.ref: m for m in models.values()}
        refs = Counter(p.gait.model for p in self.people if p.gait is not None and p.gait.model in by_ref)
        model = by_ref[refs.most_common(1)[0][0]] if refs else models.get(placement)
        self._gait = GaitScorer(self.people, model) if model is not None else None
        return model

    def observe_gait(self, t: float, embedding: np.ndarray) -> None:
        """One walking IMU window's gait embedding (``GaitModel.embed``). Evidence only: it
        never decides or announces anything by itself (a decision needs a clean ECG window)."""
        if self._gait is not None:
            self._gait.push(t, embedding)

    def _fuse(self, t: float, scores: np.ndarray) -> tuple[np.ndarray, bool]:
        """ECG cosine scores -> fused scores on each person's ECG cosine scale (see module doc)."""
        gait = self._gait.scores(t) if self._gait is not None else None
        if not gait:
            return scores, False
        names = [n for n in self._names if n in gait and n in self._ecg_norms]
        if not names:
            return scores, False
        ecg = {n: float(s) for n, s in zip(self._names, scores)}
        z = fuse_identity({n: ecg[n] for n in names}, {n: gait[n] for n in names},
                          self._ecg_norms, self._gait.model.score_norm, self.fusion)
        # fuse_identity is the weighted mean of z-scores; Stouffer's weighted Z rescales it so
        # that, for independent unit-variance impostor z-scores, the fused impostor z is unit
        # variance again: the person's ECG threshold (an impostor quantile) keeps its FAR and
        # agreeing gait evidence adds to the ECG evidence instead of averaging it down.
        w_e, w_g = self.fusion.ecg_identity_weight, self.fusion.gait_identity_weight
        stouffer = (w_e + w_g) / float(np.hypot(w_e, w_g)) if w_e > 0 and w_g > 0 else 1.0
        out = scores.copy()
        for i, n in enumerate(self._names):
            if n in z:
                out[i] = float(self._ecg_norms[n].invert(z[n] * stouffer))
        return out, True

    # ---- streaming -----------------------------------------------------------------------
    def _reset(self) -> None:
        self._pool: deque[tuple[float, np.ndarray]] = deque(maxlen=self.config.window)
        self._decisions: deque[str | None] = deque(maxlen=self.config.history)
        # the whole wearing session's evidence, for template adaptation at its end
        self._session_sum: np.ndarray | None = None   # running sum: sessions may last hours
        self._session_n = 0
        self._session_votes: Counter[str | None] = Counter()
        self._wearer: str | None = None
        self._scores: dict[str, float] = {}
        self._lead_mask: tuple[bool, ...] | None = None
        self._fused = False
        if getattr(self, "_gait", None) is not None:
            self._gait.clear()  # type: ignore[union-attr]

    def observe(self, t: float, embedding: np.ndarray | None, quality_ok: bool, live: bool,
                lead_mask: Sequence[bool] | np.ndarray | None = None) -> IdentityState:
        """Feed one ECG window (about one per second) and get the current identity.

        ``live`` False (lead-off, no beats) ends the identity at once. A live but unclean
        window (``quality_ok`` False or no embedding) changes nothing: the wearer is kept,
        since changing wearer needs the electrodes off. ``lead_mask`` (which leads fed the
        model): a change clears the pooled embeddings, so windows from different lead sets
        are never averaged together.
        """
        mask = None if lead_mask is None else tuple(bool(v) for v in np.asarray(lead_mask).ravel())
        if not live or (mask is not None and not any(mask)):
            self._end_session()
            self._reset()
            return IdentityState(wearer=None, confidence=1.0, decided=True, live=False)
        if mask != self._lead_mask:
            self._pool.clear()
            self._session_sum, self._session_n = None, 0  # a session mean never mixes lead sets either
            self._session_votes.clear()
            self._lead_mask = mask
        if quality_ok and embedding is not None:
            self._add_clean(float(t), embedding)
        return self._state()

    def _add_clean(self, t: float, embedding: np.ndarray) -> None:
        e = np.asarray(embedding, dtype=np.float32).ravel()
        if self.model is not None and e.shape[0] != self.model.dim:
            raise ValueError(f"embedding has {e.shape[0]} values but the templates were made with D={self.model.dim} ({self.model})")
        if not np.all(np.isfinite(e)):
            return  # a NaN embedding is an upstream bug for this window, not evidence
        while self._pool and t - self._pool[0][0] > self.config.max_age_s:
            self._pool.popleft()
        self._pool.append((t, _unit(e)))
        if self.config.adapt:
            unit = self._pool[-1][1]
            self._session_sum = unit.astype(np.float64) if self._session_sum is None else self._session_sum + unit
            self._session_n += 1
        seg = np.stack([v for _, v in self._pool])[None]
        scores = segment_scores(seg, self._protos, self._starts, self.config.scoring)[0]
        scores, self._fused = self._fuse(t, scores)
        self._scores = {n: float(s) for n, s in zip(self._names, scores)}
        if len(self._pool) >= self.config.min_pool:
            self._decisions.append(self._decide(scores) if self.people else UNKNOWN)
            self._session_votes[self._decisions[-1]] += 1
            self._update_wearer()

    def _decide(self, scores: np.ndarray) -> str | None:
        cfg = self.config
        order = np.argsort(scores)[::-1]
        best = int(order[0])
        runner_up = float(scores[order[1]]) if len(order) > 1 else -1.0
        name = self._names[best]
        incumbent = name == self._wearer
        threshold = self._thresholds[best] - (cfg.stay_hysteresis if incumbent else 0.0)
        if not scores[best] >= threshold:  # fails closed: NaN is unknown, never a name
            return UNKNOWN
        if scores[best] - runner_up < (0.0 if incumbent else cfg.margin):
            return None  # two persons too close to call: abstain
        return name

    def _update_wearer(self) -> None:
        counts = Counter(d for d in self._decisions if d is not None)
        if not counts:
            return
        leader, n = counts.most_common(1)[0]
        if leader == self._wearer:
            return
        if self._wearer is None:
            needed = self.config.unknown if leader == UNKNOWN else self.config.confirm
        else:
            needed = self.config.switch
        if n >= needed and n > counts.get(self._wearer, 0):
            self._wearer = leader

    def _state(self) -> IdentityState:
        counts = Counter(d for d in self._decisions if d is not None)
        candidate = self._wearer
        if candidate is None and counts:
            candidate = counts.most_common(1)[0][0]
        n = counts.get(candidate, 0) if candidate is not None else 0
        return IdentityState(
            wearer=self._wearer,
            # Laplace estimate of the share of recent decisions that agree: 3 of 3 at the
            # announcement reads 0.8, 8 of 8 reads 0.9, 4 of 8 reads 0.5. Agreement / history
            # read 0.375 at every announcement, which a household's dashboard shows as "low".
            confidence=(n + 1) / (len(self._decisions) + 2),
            scores=dict(self._scores),
            n_agreeing=n,
            decided=self._wearer is not None,
            live=True,
            candidate=candidate,
            fused=self._fused,
        )

    # ---- template adaptation -------------------------------------------------------------
    def take_adaptations(self) -> list[Adaptation]:
        """Adaptations made since the last call, oldest first. The engine already scores with
        them; the caller persists each ``Adaptation.person`` (``TemplateStore.update_templates``)
        so a restart keeps them."""
        out, self._adaptations = self._adaptations, []
        return out

    def _end_session(self) -> None:
        """The wearing session ended (not live): adapt the wearer's templates if it qualifies."""
        adaptation = self._adaptation()
        if adaptation is not None:
            people = list(self.people)
            people[self._names.index(adaptation.person.name)] = adaptation.person
            self._set_people(people)
            self._adaptations.append(adaptation)

    def _adaptation(self) -> Adaptation | None:
        """The wearer's updated templates if this session is strong evidence of who it was.

        WHY each guard (poisoning: a stranger once accepted must not take over a template):
        an announced wearer and ``adapt_min_agreement`` of the session's decisions for them
        (not a session that hovered between persons or ``unknown``); the session mean (all its
        clean windows, one lead set: less noisy than any 5-window pool) ``adapt_margin`` above
        the threshold and ``adapt_runner_up`` above every other member (a borderline accept
        or a near-tie adds nothing); ``adapt_anchor``: the enrolment prototypes alone must
        accept it too, so a prototype can never be added on the strength of an adapted one
        (no chain of small steps walks a template towards a look-alike). Adapted prototypes
        are capped (oldest dropped) and the enrolment ones always kept, so the person the
        template was made from is always still accepted as at enrolment.

        Only a session seen through the enrolment's lead count adapts (``stats["enrol_leads"]``;
        a template without it never adapts): one person's 3-lead and lead-I embeddings are as
        far apart as two persons', and the re-derived threshold would be set against the other
        lead count's impostor set, which guards every later session (a review saw one 3-lead
        session lower lead-I thresholds far enough to let many other persons in). The threshold
        never falls below the one set at enrolment either: adaptation adds evidence, it must not
        lower the bar.
        """
        cfg = self.config
        wearer = self._wearer
        if not cfg.adapt or self.impostors is None or wearer is None or wearer == UNKNOWN:
            return None
        n_votes = sum(self._session_votes.values())
        if (self._session_sum is None or self._session_n < cfg.adapt_min_windows or not n_votes
                or self._session_votes[wearer] / n_votes < cfg.adapt_min_agreement):
            return None
        i = self._names.index(wearer)
        person = self.people[i]
        leads_on = 1 if self._lead_mask is None else max(1, sum(self._lead_mask))
        if person.stats.get("enrol_leads") != float(leads_on):
            return None
        mean = _unit(self._session_sum)
        scores = np.maximum.reduceat(self._protos @ mean, self._starts)
        score = float(scores[i])
        runner_up = float(np.delete(scores, i).max()) if len(scores) > 1 else -1.0
        adapted = np.array([lab.startswith(ADAPTED_PREFIX) for lab in person.prototype_labels])
        anchor = float(np.max(person.prototypes[~adapted] @ mean)) if (~adapted).any() else score
        enrol_threshold = float(person.stats.get("enrol_threshold", person.threshold))
        if (score < float(self._thresholds[i]) + cfg.adapt_margin or score - runner_up < cfg.adapt_runner_up
                or (cfg.adapt_anchor and anchor < enrol_threshold)):
            return None
        # FIFO over the adapted prototypes: drift is followed by the most recent sessions
        keep = np.ones(len(adapted), bool)
        old = np.nonzero(adapted)[0]
        keep[old[:max(0, len(old) - cfg.adapt_max_prototypes + 1)]] = False
        count = int(person.stats.get("n_adaptations", 0)) + 1
        protos = np.vstack([person.prototypes[keep], mean[None]])
        labels = tuple(lab for lab, k in zip(person.prototype_labels, keep) if k) + (f"{ADAPTED_PREFIX}{count}",)
        imp, imp_labels = self.impostors.for_leads(leads_on)
        impostor, impostor_person = self._impostor_scores(protos, imp, imp_labels, exclude=i)
        if impostor.size == 0:
            return None  # no way to keep the FAR at target with more prototypes: do not adapt
        threshold, _ = self._choose_threshold(np.zeros(0, np.float32), impostor, impostor_person)
        threshold = max(threshold, enrol_threshold)
        stats = {**person.stats, "enrol_threshold": enrol_threshold, "n_adaptations": float(count),
                 "n_prototypes": float(len(protos)), "expected_far": float(np.mean(impostor >= threshold)),
                 "expected_far_upper": _far_upper(impostor >= threshold, impostor_person, cfg.seed)}
        if impostor.size >= 10:  # the ECG z-norm for gait fusion follows the new prototypes
            stats["ecg_impostor_mean"] = float(impostor.mean())
            stats["ecg_impostor_std"] = float(impostor.std())
        updated = replace(person, prototypes=protos, prototype_labels=labels, threshold=threshold, stats=stats)
        dropped = tuple(lab for lab, k in zip(person.prototype_labels, keep) if not k)
        return Adaptation(person=updated, score=score, runner_up=runner_up, anchor_score=anchor,
                          n_windows=self._session_n, old_threshold=float(person.threshold), dropped=dropped)

    # ---- enrolment -----------------------------------------------------------------------
    def name_problem(self, name: str) -> str | None:
        """Why ``name`` cannot be enrolled (the store's one name rule, ``store.name_problem``,
        refuses it, or the name or its id is taken), else None. ``biod calibrate`` and an
        enrolment from Home Assistant ask before anyone records, so nobody wears the electrodes
        for a minute and a half to be told the name was wrong."""
        if (problem := _name_rule_problem(name)) is not None:
            return problem
        name = name.strip()
        slug = slugify(name)
        for p in self.people:
            if p.name == name or p.slug == slug:
                return f"{p.name!r} is already enrolled: choose another name, or remove {p.name!r} first to re-enrol"
        for other in self.stale:  # enrolled with another ECG model: only the same name re-enrols (replaces) them
            if other != name and slugify(other) == slug:
                return (f"{other!r}, enrolled with another ECG model, has the same id as {name!r}: to re-enrol them "
                        f"use the name {other!r}, or remove {other!r} first")
        return None

    def enrol(self, name: str, embeddings: np.ndarray, activities: Sequence[str] | None = None,
              impostor_embeddings: np.ndarray | None = None,
              impostor_labels: Sequence[object] | np.ndarray | None = None,
              gait_embeddings: np.ndarray | None = None, leads_on: int | None = None) -> EnrolmentReport:
        """Build a Person from clean enrolment windows (in time order) without retraining.

        ``activities``: one label per window (e.g. ``rest``/``walking`` from the calibration
        script); one prototype per activity with enough windows, k-means otherwise.
        ``impostor_embeddings`` (m, D): windows of never-enrolled persons (shipped with the
        model); ``impostor_labels`` (m,) says whose each row is. Without labels the rows are
        taken as consecutive blocks of one person each of ``window`` rows (so give them
        ordered by person). ``gait_embeddings`` (g, k): walking windows' gait embeddings from
        the attached gait model; a gait template is added when there are enough of them (a
        warning says why not otherwise: the person is then identified by ECG alone). The
        engine is not changed: save ``report.person`` to the store and build a new engine.
        ``leads_on``: how many leads every window was seen through (``daemon.enrol.one_lead_set``
        keeps one count); kept in ``stats["enrol_leads"]`` because the threshold was set
        against the impostor set of that lead count, and template adaptation must stay with it.
        """
        cfg = self.config
        if self.model is None:
            raise StoreError("enrolment needs the ECG model's name, version and dimension: pass model=ModelRef(...) from the manifest")
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.model.dim:
            raise ValueError(f"enrolment embeddings must have shape (n, {self.model.dim}) for {self.model}, got {x.shape}")
        if activities is not None and len(activities) != len(x):
            raise ValueError(f"{len(activities)} activity labels for {len(x)} embeddings: give one label per window")
        finite = np.all(np.isfinite(x), axis=1) & (np.linalg.norm(x, axis=1) > 1e-6)
        if activities is not None:
            activities = [a for a, ok in zip(activities, finite) if ok]
        x = _unit(x[finite])
        n = len(x)

        def refuse(reason: str, selfsim: float = float("nan")) -> EnrolmentReport:
            return EnrolmentReport(accepted=False, reason=reason, person=None, n_windows=n, median_self_similarity=selfsim)

        problem = self.name_problem(name)
        if problem is not None:
            return refuse(problem)
        name = name.strip()  # as the store keeps it (an enrolment from Home Assistant arrives stripped)
        if n < cfg.min_enrol_windows:
            return refuse(
                f"only {n} clean ECG windows, need at least {cfg.min_enrol_windows}: record longer "
                "and check the electrodes' contact"
            )
        gram = x @ x.T
        selfsim = float(np.median(gram[~np.eye(n, dtype=bool)]))
        if selfsim < cfg.min_self_similarity:
            return refuse(
                f"the enrolment windows are inconsistent (median self-similarity {selfsim:.2f} < {cfg.min_self_similarity:.2f}): "
                "the electrodes may have moved or more than one person was recorded; re-record with the same person, electrodes firmly placed",
                selfsim,
            )

        parts = part_similarity(x, cfg.enrol_parts)
        if parts < cfg.min_part_similarity:
            return refuse(
                f"the recording changes part-way (its {cfg.enrol_parts} parts in time agree only to {parts:.2f} < "
                f"{cfg.min_part_similarity:.2f}): the electrodes may have moved, or another person wore them for "
                "part of it; re-record with one person, electrodes firmly placed throughout",
                selfsim,
            )

        protos, labels = build_prototypes(x, activities, cfg)
        own_scores, other_scores = self._cv_genuine(x, activities)
        impostor, impostor_person = self._impostor_scores(protos, impostor_embeddings, impostor_labels)
        threshold, warnings = self._choose_threshold(own_scores, impostor, impostor_person)
        if not np.isfinite(threshold):
            return refuse(f"no threshold could be set (scores of {impostor.size} impostor and {own_scores.size} own "
                          "windows gave a non-number): the impostor set may be damaged; re-install biod's models",
                          selfsim)
        far = float(np.mean(impostor >= threshold)) if impostor.size else float("nan")
        far_upper = _far_upper(impostor >= threshold, impostor_person, cfg.seed)
        frr = float(np.mean(own_scores < threshold))
        margins: dict[str, float] = {}
        accepted_by: dict[str, float] = {}
        for j, p in enumerate(self.people):
            margins[p.name] = float(np.quantile(own_scores - other_scores[:, j], 0.05))
            accepted_by[p.name] = float(np.mean(other_scores[:, j] >= p.threshold))
            if margins[p.name] < cfg.margin:
                warnings.append(
                    f"{name!r} is hard to tell from {p.name!r} (5th-percentile margin {margins[p.name]:.3f} < {cfg.margin}): "
                    "some windows will be left undecided"
                )
            if accepted_by[p.name] >= cfg.max_accepted_by_other:
                return refuse(
                    f"these windows look like {p.name!r}, who is enrolled already: the template of "
                    f"{p.name!r} accepts {accepted_by[p.name]:.0%} of them. If this is {p.name!r}, remove "
                    f"them first to re-enrol (biod people remove {p.name!r}). If not, biod cannot tell "
                    f"the two apart from this recording (enrolled both, neither would be named): "
                    "re-record with the electrodes firmly placed, resting and walking", selfsim)
            if accepted_by[p.name] > cfg.target_far * 5:
                warnings.append(f"the template of {p.name!r} accepts {accepted_by[p.name]:.1%} of the segments "
                                f"of {name!r}: consider re-enrolling {p.name!r}")
        if not impostor.size:
            warnings.append("no impostor set given: the threshold is set from the genuine scores only and FAR is not estimated")
        gait = None
        if gait_embeddings is not None and len(gait_embeddings):
            if self._gait is None:
                warnings.append("walking IMU windows were recorded but no gait model is loaded: no gait template")
            else:
                gait = build_gait_template(gait_embeddings, self._gait.model)
                if gait is None:
                    warnings.append(f"only {len(gait_embeddings)} walking IMU windows (need {self._gait.model.min_enrol_windows}): "
                                    "no gait template, identity from the ECG alone; walk longer to add one")
        min_margin = min(margins.values()) if margins else float("nan")
        stats = {
            "n_windows": float(n), "median_self_similarity": selfsim, "expected_far": far, "expected_far_upper": far_upper,
            "expected_frr": frr, "min_margin": min_margin, "n_prototypes": float(len(protos)),
        }
        if leads_on is not None:
            stats["enrol_leads"] = float(leads_on)
        if impostor.size >= 10:  # the ECG z-norm for gait fusion (too few impostors: no fusion)
            stats["ecg_impostor_mean"] = float(impostor.mean())
            stats["ecg_impostor_std"] = float(impostor.std())
        report_args = dict(
            n_windows=n, median_self_similarity=selfsim, threshold=threshold, expected_far=far, expected_far_upper=far_upper,
            expected_frr=frr, n_genuine=int(own_scores.size), n_impostor=int(impostor.size),
            margins=margins, min_margin=min_margin, accepted_by=accepted_by, warnings=tuple(warnings),
        )
        if frr > cfg.refuse_frr:
            return EnrolmentReport(
                accepted=False, person=None,
                reason=(f"{name!r} would be rejected {frr:.0%} of the time at a threshold keeping false accepts near "
                        f"{cfg.target_far:.0%}: the recording does not separate from other people; re-record longer with good contact"),
                **report_args,  # type: ignore[arg-type]
            )
        person = Person(
            id=new_person_id(), name=name, slug=slugify(name), created=utc_now(), model=self.model,
            prototypes=protos, prototype_labels=labels, threshold=threshold, stats=stats, gait=gait,
        )
        return EnrolmentReport(accepted=True, reason="ok", person=person, **report_args)  # type: ignore[arg-type]

    def _cv_genuine(self, x: np.ndarray, activities: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
        """Pooled scores of held-out, time-contiguous folds against prototypes built without them.

        Returns (own scores (s,), scores against each enrolled person (s, n_people)).
        """
        cfg = self.config
        n = len(x)
        folds = max(2, min(cfg.cv_folds, n // max(cfg.window, 1)))
        bounds = np.linspace(0, n, folds + 1).astype(int)
        own, other = [], []
        acts = None if activities is None else np.asarray(list(activities), dtype=object)
        for a, b in zip(bounds[:-1], bounds[1:]):
            train = np.r_[0:a, b:n]
            protos, _ = build_prototypes(x[train], None if acts is None else list(acts[train]), cfg)
            segs = sliding_segments(x[a:b], cfg.window)
            own.append(segment_scores(segs, protos, np.zeros(1, np.intp), cfg.scoring)[:, 0])
            other.append(segment_scores(segs, self._protos, self._starts, cfg.scoring))
        return np.concatenate(own), np.concatenate(other)

    def _impostor_scores(self, protos: np.ndarray, impostors: np.ndarray | None,
                         labels: Sequence[object] | np.ndarray | None,
                         exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pooled scores of never-enrolled persons' segments and of the enrolled persons'
        prototypes (already segment-like means) against the new person's prototypes, with
        the impostor person each score comes from (for the person-level bootstrap).
        ``exclude``: index of an enrolled person whose own prototypes are not impostors
        (re-deriving that person's threshold after an adaptation)."""
        cfg = self.config
        start = np.zeros(1, np.intp)
        out: list[np.ndarray] = []
        others = self._protos
        if exclude is not None:
            first = int(self._starts[exclude])
            others = np.delete(others, np.s_[first:first + self.people[exclude].prototypes.shape[0]], axis=0)
        if len(others):
            out.extend(segment_scores(others[:, None, :], protos, start, cfg.scoring)[:, 0, None])
        if impostors is not None:
            imp = np.asarray(impostors, dtype=np.float32)
            if imp.ndim != 2 or imp.shape[1] != protos.shape[1]:
                raise ValueError(f"impostor embeddings must have shape (m, {protos.shape[1]}), got {imp.shape}")
            imp = _unit(imp)
            if labels is None:
                groups = [np.arange(i, min(i + cfg.window, len(imp))) for i in range(0, len(imp), cfg.window)]
                stride = cfg.window
            else:
                lab = np.asarray(labels)
                if len(lab) != len(imp):
                    raise ValueError(f"{len(lab)} impostor labels for {len(imp)} impostor embeddings")
                groups = [np.nonzero(lab == u)[0] for u in np.unique(lab)]
                stride = max(1, cfg.window // 2)
            for g in groups:
                segs = sliding_segments(imp[g], cfg.window, stride)
                out.append(segment_scores(segs, protos, start, cfg.scoring)[:, 0])
        if not out:
            return np.zeros(0, np.float32), np.zeros(0, np.intp)
        return np.concatenate(out), np.repeat(np.arange(len(out)), [len(o) for o in out])

    def _choose_threshold(self, genuine: np.ndarray, impostor: np.ndarray,
                          impostor_person: np.ndarray) -> tuple[float, list[str]]:
        """Neyman-Pearson: the lowest threshold keeping false accepts at ``target_far`` (with
        ``far_confidence`` > 0: at that percentile of a bootstrap over ``impostor_person``).

        WHY not also push it up towards the genuine scores: the genuine scores come from the
        enrolment session itself and are optimistic; another day's windows score lower
        (electrode placement, drift), so every bit of threshold above the impostor quantile
        is paid for in false rejects later. Without an impostor set only the genuine side is
        known and the ``max_frr`` quantile of it is used (stricter than needed: safe side).
        ``genuine`` may be empty (re-deriving after an adaptation: the impostor side decides).
        """
        cfg = self.config
        warnings: list[str] = []
        thr_frr = float(np.quantile(genuine, cfg.max_frr)) if genuine.size else float("inf")
        if impostor.size:
            if cfg.far_confidence > 0 and np.unique(impostor_person).size >= 2:
                thr = _confident_threshold(impostor, impostor_person, cfg.target_far, cfg.far_confidence, cfg.seed)
            else:
                thr = float(np.quantile(impostor, 1.0 - cfg.target_far, method="higher"))
            if thr > thr_frr:
                warnings.append(
                    f"genuine and impostor scores overlap: to keep false accepts near {cfg.target_far:.0%} "
                    f"more than {cfg.max_frr:.0%} of this person's windows will be rejected"
                )
        else:
            thr = thr_frr
        lo, hi = cfg.threshold_bounds
        return float(np.clip(thr, lo, hi)), warnings
