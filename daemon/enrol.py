"""Enrolment: collect a person's clean ECG embeddings (and gait embeddings of walking IMU
windows, when an IMU streams), then build templates without retraining.

Used by ``biod calibrate`` (terminal, guided) and by the enrol button in Home Assistant
(time-boxed, like ESPresense): both feed the same ``Enrolment`` with what ``Biometrics``
computes from clean windows, so a template made either way is the same template.
"""
from __future__ import annotations

import logging
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from daemon.identity.engine import EnrolmentReport, IdentityConfig, IdentityEngine
from daemon.identity.store import ModelRef, StoreError, TemplateStore

log = logging.getLogger(__name__)

IMPOSTORS_FILE = "ecg_impostors.npz"


@dataclass(frozen=True)
class Impostors:
    """Embeddings of never-enrolled persons shipped with the model (for FAR estimates), seen
    through lead I only and through all three leads (``python -m training.impostors``)."""

    embeddings: np.ndarray         # (m, D) float32, lead I only
    labels: np.ndarray             # (m,) person of each row
    embeddings_3lead: np.ndarray   # (k, D) float32, leads I, II, III
    labels_3lead: np.ndarray
    model_version: str

    def made_with(self, ref: ModelRef) -> bool:
        """Whether the set was made with the ECG model ``ref`` (same dimension and version, and
        the same weights, ``"<name> <version> <weights>"``): scores of one model's templates
        against another model's embeddings mean nothing, and a retrained model keeps its name and
        version (a set made before the beat model's hash was part of it names the CNN's only, and
        is refused beside a beat model: rebuild it with ``python -m training.impostors``)."""
        name, _, rest = self.model_version.partition(" ")
        version, _, weights = rest.partition(" ")
        return self.embeddings.shape[1] == ref.dim and ref.accepts(ModelRef(name, version, ref.dim, weights))

    def for_leads(self, n_leads_on: int) -> tuple[np.ndarray, np.ndarray]:
        """The set seen through the same leads as the enrolment (one lead or several)."""
        return (self.embeddings, self.labels) if n_leads_on <= 1 else (self.embeddings_3lead, self.labels_3lead)


class ImpostorsError(Exception):
    """The shipped impostor set exists but cannot be read (truncated, corrupt, wrong layout)."""


def load_impostors(models_dir: Path) -> Impostors | None:
    """The shipped impostor set, None if there is none; ``ImpostorsError`` naming the file and the
    fix if it is there but unreadable (a half-copied install must not surface as a zip traceback)."""
    path = Path(models_dir) / IMPOSTORS_FILE
    if not path.exists():
        log.warning("enrol: %s is missing; false-accept rates are estimated from enrolled persons only", path)
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            imp = Impostors(z["embeddings"].astype(np.float32), z["labels"], z["embeddings_3lead"].astype(np.float32),
                            z["labels_3lead"], str(z["model_version"]))
        for what, x, labels in (("embeddings", imp.embeddings, imp.labels),
                                ("embeddings_3lead", imp.embeddings_3lead, imp.labels_3lead)):
            if x.ndim != 2 or x.shape[1] != imp.embeddings.shape[-1] or labels.shape != (len(x),):
                # a set of another layout failed deep inside enrolment, after the person had recorded
                raise ValueError(f"{what} has shape {x.shape} with {labels.shape} labels: want (rows, one "
                                 "dimension for both sets) and one label per row")
            if not np.all(np.isfinite(x)):  # one NaN row gave a NaN threshold that accepted everyone
                raise ValueError(f"{what} holds non-finite values")
        return imp
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ImpostorsError(f"{path} is unreadable ({type(exc).__name__}: {exc}): re-install biod's models "
                             "(`sudo deploy/install.sh` from the biod checkout) or rebuild it on a machine "
                             "with the training extras: python -m training.impostors") from None


def impostors_for(models_dir: Path, model: ModelRef) -> Impostors | None:
    """The shipped impostor set for enrolling with ``model``: None if there is none (thresholds
    then come from the person's own scores, the stricter side); ``ImpostorsError`` if it is
    unreadable or was made with another ECG model.

    WHY refuse a set of another model: a threshold set against another embedding space's vectors
    means nothing. Measured (review, 2026-11-24): with the shipped set rotated and relabelled,
    ``biod calibrate`` reported threshold 0.200 and an expected FAR of 0 % where the matching set
    gives 0.699, so strangers would have been named; a set of another dimension failed after the
    person had recorded for the whole enrolment."""
    imp = load_impostors(models_dir)
    if imp is not None and not imp.made_with(model):
        raise ImpostorsError(
            f"{Path(models_dir) / IMPOSTORS_FILE} was made with {imp.model_version!r} (D={imp.embeddings.shape[1]}), "
            f"not the installed ECG model {model}: thresholds set against it would mean nothing. Re-install biod's "
            "models (`sudo deploy/install.sh` from the biod checkout) or rebuild it on a machine with the training "
            "extras: python -m training.impostors --data DIR")
    return imp


class EnrolmentRefused(Exception):
    """What would refuse an enrolment at its end, found before anyone records (the message says why)."""


def check_before_recording(store: TemplateStore, config: IdentityConfig, model: ModelRef, models_dir: Path,
                           name: str) -> tuple[IdentityEngine, Impostors | None]:
    """Everything that would refuse enrolling ``name`` at its end, checked before anyone wears the
    electrodes for it: the store reads and can be written, the name is free in the store itself
    (not in a running engine, which is empty while the store cannot be read), and the impostor set
    was made with ``model``. Returns an engine over the stored persons and the impostor set;
    :class:`EnrolmentRefused` otherwise. ``biod calibrate`` and an enrolment from Home Assistant
    both call it, so the two cannot drift apart."""
    try:
        engine = IdentityEngine(store.load(), config, model=model)
        store.check_writable()
    except StoreError as exc:
        raise EnrolmentRefused(str(exc)) from None
    if (problem := engine.name_problem(name)) is not None:
        raise EnrolmentRefused(problem)
    try:
        return engine, impostors_for(models_dir, model)
    except ImpostorsError as exc:
        raise EnrolmentRefused(str(exc)) from None


@dataclass
class ContinuityWatch:
    """One wearer from an enrolment's first clean window to its last.

    WHY: putting the electrodes on someone else means taking them off first, and the ECG is
    then not live. A template built across that pause mixes two persons, and the second is later
    named as the first (measured: half of one person and half of another pass the embedding
    checks in most pairs). So once windows are collected, the ECG not live for ``max_off_s``
    (longer than a contact glitch, shorter than moving three electrodes) ends the enrolment."""

    max_off_s: float = 2.0
    off_since: float | None = None
    broken: str | None = None

    def feed(self, now: float, live: bool, collecting: bool) -> None:
        """``now`` in seconds (monotonic or sample time), ``collecting``: clean windows were taken."""
        if self.broken is not None:
            return
        if live or not collecting:
            self.off_since = None
            return
        if self.off_since is None:
            self.off_since = now
        elif now - self.off_since >= self.max_off_s:
            self.broken = (f"the ECG stopped part-way (electrodes off for {now - self.off_since:.0f} s or more): an "
                           "enrolment must be one person wearing the electrodes throughout; nothing was saved, start again")


@dataclass
class Enrolment:
    name: str
    engine: IdentityEngine
    impostors: Impostors | None
    seconds: float
    started: float = field(default_factory=time.monotonic)  # monotonic (daemon.clock)
    sink: list[tuple[float, np.ndarray, str | None, int]] = field(default_factory=list)
    gait_sink: list[np.ndarray] = field(default_factory=list)  # Biometrics.gait_sink while enrolling
    watch: ContinuityWatch = field(default_factory=ContinuityWatch)

    def on_ecg(self, now: float, live: bool) -> None:
        """Every ECG update while enrolling (``interrupted`` then says whether to end it now)."""
        self.watch.feed(now, live, bool(self.sink))

    @property
    def interrupted(self) -> bool:
        return self.watch.broken is not None

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    @property
    def n_windows(self) -> int:
        return len(self.sink)

    @property
    def needed(self) -> int:
        return self.engine.config.min_enrol_windows

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def finish(self) -> EnrolmentReport:
        if self.watch.broken is not None:
            return EnrolmentReport(accepted=False, reason=self.watch.broken, person=None, n_windows=len(self.sink),
                                   median_self_similarity=float("nan"))
        if not self.sink:
            return self.engine.enrol(self.name, np.zeros((0, self.engine.model.dim if self.engine.model else 1), np.float32))
        embeddings = np.stack([e for _, e, _, _ in self.sink]).astype(np.float32)
        gait = np.stack(self.gait_sink).astype(np.float32) if self.gait_sink else None
        return enrol_one_lead_set(self.engine, self.name, embeddings, [n for *_, n in self.sink],
                                  [a for _, _, a, _ in self.sink], self.impostors, gait)


def one_lead_set(lead_counts: Sequence[int]) -> tuple[np.ndarray, int, str | None]:
    """The windows of the enrolment's most common lead count: (which to keep, that count, a
    warning when others were left out).

    WHY: the model's embedding of one person's beats seen through three leads and through
    lead I alone are about as far apart as two persons' (a review's look at LUDB records), so a
    template averaging both is neither, and the
    threshold is set against the impostor set of one lead count. A tie keeps the larger count
    (more leads: the fuller view of the heart)."""
    counts = np.asarray(lead_counts, dtype=np.int64)
    if counts.size == 0:
        return np.zeros(0, bool), 1, None
    values, n = np.unique(counts, return_counts=True)
    leads = int(values[np.flatnonzero(n == n.max())[-1]])
    keep = counts == leads
    warning = None
    if not keep.all():
        others = ", ".join(f"{c} with {v} lead{'s' * (v != 1)}" for v, c in zip(values.tolist(), n.tolist()) if v != leads)
        warning = (f"{int((~keep).sum())} clean windows were seen through another set of leads ({others}) and were "
                   f"left out: the template is made from the {int(keep.sum())} windows with {leads} lead{'s' * (leads != 1)} "
                   "on; keep every electrode attached for the whole enrolment")
    return keep, leads, warning


def enrol_one_lead_set(engine: IdentityEngine, name: str, embeddings: np.ndarray, lead_counts: Sequence[int],
                       activities: Sequence[str | None], impostors: "Impostors | None",
                       gait_embeddings: np.ndarray | None = None) -> EnrolmentReport:
    """``engine.enrol`` on the windows of one lead count (``one_lead_set``), against the
    impostor set seen through that many leads: what ``biod calibrate`` and an enrolment from
    Home Assistant both run. ``activities``: one label (or None) per window; prototypes per
    activity only when every kept window has one and there are at least two."""
    if not len(lead_counts) == len(activities) == len(embeddings):
        raise ValueError(f"{len(lead_counts)} lead counts and {len(activities)} activity labels for "
                         f"{len(embeddings)} windows: give one of each per window")
    keep, leads_on, warning = one_lead_set(lead_counts)
    acts = [a for a, k in zip(activities, keep) if k]
    if any(a is None for a in acts) or len(set(acts)) < 2:
        acts = None
    imp = impostors.for_leads(leads_on) if impostors else (None, None)
    report = engine.enrol(name, np.asarray(embeddings, dtype=np.float32)[keep], acts, impostor_embeddings=imp[0],
                          impostor_labels=imp[1], gait_embeddings=gait_embeddings, leads_on=leads_on)
    return report if warning is None else replace(report, warnings=report.warnings + (warning,))
