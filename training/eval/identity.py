"""Open-set ECG identity protocol and metrics, shared by training (threshold, ablation) and
``python -m training.eval models``.

Protocol (the BASELINES.md one, extended):

* gallery: every evaluated ECG-ID person with >= 2 recordings; enrolment template = mean of the
  L2-normalised window embeddings of the person's FIRST recording (20 s, lead I), re-normalised;
* tests: the person's other recordings, cut into non-overlapping pieces of 3 s (one window) or
  10 s (the 8 windows lying inside each 10 s half); the test embedding is the normalised mean
  of its window embeddings. 30 s tests: ECG-ID records are 20 s, so a 30 s test pools the
  windows of one test recording and of the first 10 s of the person's next non-enrolment
  recording (windows never span the junction); persons with only one test recording have no
  30 s test;
* cross-session subset: tests recorded on another date than the enrolment recording (a
  recording without a readable date, ``UNKNOWN_SESSION``, is never cross-date, and never pooled
  with another recording as one date);
* scores: cosine similarity; rank-1 over the gallery; verification EER and FRR at FAR = 1 %
  from genuine (own template) vs impostor (every other gallery template) scores;
* never-enrolled persons (LUDB lead I only, MIT-BIH its single lead): tests of the same
  lengths scored against the whole gallery; false accept = best score >= the threshold.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from training.data.ecg import UNKNOWN_SESSION, WindowSet

TEST_LENGTHS_S = (3, 10, 30)
WINDOW_S = 3.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Tests:
    """Test embeddings with their true person and cross-session flag."""

    emb: np.ndarray
    person: np.ndarray
    cross: np.ndarray


def _pieces(ends: np.ndarray, length_s: float, rec_s: float) -> list[np.ndarray]:
    """Index arrays of the windows inside each non-overlapping ``length_s`` piece."""
    out = []
    for start in np.arange(0.0, rec_s - length_s + 1e-6, length_s):
        sel = np.nonzero((ends - WINDOW_S >= start - 1e-6) & (ends <= start + length_s + 1e-6))[0]
        if sel.size:
            out.append(sel)
    return out


def _dates_differ(a: str, b: str) -> bool:
    """Two sessions known to be of different dates; an unknown date differs from nothing."""
    return UNKNOWN_SESSION not in (a, b) and a != b


def _same_date_partner(ws: WindowSet, others: list[int], k: int) -> int | None:
    """The recording that tops up ``others[k]`` to a test longer than one recording: the next
    test recording (cyclically) of the same date, or None (no such test). WHY the same date: a
    30 s "cross-date" test topped up with a recording from the enrolment date is partly a
    same-date test (it was, for five held-out persons), and the label could not say so."""
    i = others[k]
    if ws.records[i].session == UNKNOWN_SESSION:  # which recording shares its date is unknown
        return None
    for j in others[k + 1:] + others[:k]:
        if ws.records[j].session == ws.records[i].session:
            return j
    return None


def gallery_and_tests(ws: WindowSet, emb: np.ndarray, length_s: float
                      ) -> tuple[list[str], np.ndarray, Tests]:
    """Enrol ECG-ID persons from their first recording; build tests of ``length_s``. A test
    longer than a recording pools two test recordings of one date, so that cross-date means
    every window of it is from another date than the enrolment."""
    by_person: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(ws.records):
        if r.dataset == "ecgid":
            by_person[r.person].append(i)
    win_of: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(0, int))
    for i in np.unique(ws.rec):
        win_of[int(i)] = np.nonzero(ws.rec == i)[0]
    names, templates, t_emb, t_person, t_cross = [], [], [], [], []
    for person in sorted(by_person):
        recs = [i for i in by_person[person] if win_of[i].size]
        if len(recs) < 2:
            continue
        enrol = recs[0]
        names.append(person)
        templates.append(_unit(_unit(emb[win_of[enrol]]).mean(0)))
        others = recs[1:]
        for k, i in enumerate(others):
            w = win_of[i]
            cross = _dates_differ(ws.records[i].session, ws.records[enrol].session)
            rec_s = ws.records[i].duration_s
            if length_s <= rec_s:
                groups = [w[p] for p in _pieces(ws.t_end_s[w], length_s, rec_s)]
            elif (partner := _same_date_partner(ws, others, k)) is not None:
                nxt = win_of[partner]
                extra = length_s - rec_s
                groups = [np.concatenate([w, nxt[ws.t_end_s[nxt] <= extra + 1e-6]])]
            else:
                groups = []
            for g in groups:
                t_emb.append(_unit(_unit(emb[g]).mean(0)))
                t_person.append(person)
                t_cross.append(cross)
    d = emb.shape[1]
    return (names, np.array(templates).reshape(-1, d),
            Tests(np.array(t_emb).reshape(-1, d), np.array(t_person), np.array(t_cross, bool)))


def impostor_tests(ws: WindowSet, emb: np.ndarray, length_s: float) -> np.ndarray:
    """Never-enrolled persons (not ECG-ID): one embedding per ``length_s`` piece; consecutive
    10 s pseudo-recordings of a person are pooled for 30 s."""
    by_person: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(ws.records):
        if r.dataset != "ecgid":
            by_person[r.person].append(i)
    out = []
    for person, recs in by_person.items():
        wins = [np.nonzero(ws.rec == i)[0] for i in recs]
        wins = [w for w in wins if w.size]
        if not wins:
            continue
        rec_s = ws.records[recs[0]].duration_s
        if length_s <= rec_s:
            for w in wins:
                out += [_unit(_unit(emb[w[p]]).mean(0))
                        for p in _pieces(ws.t_end_s[w], length_s, rec_s)]
        else:
            need = int(np.ceil(length_s / rec_s))
            for s in range(0, len(wins) - need + 1, need):
                out.append(_unit(_unit(emb[np.concatenate(wins[s:s + need])]).mean(0)))
    return np.array(out).reshape(-1, emb.shape[1])


def det(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, FAR, FRR) over every distinct score."""
    thr = np.unique(np.concatenate([genuine, impostor]))
    g = np.sort(genuine)
    im = np.sort(impostor)
    frr = np.searchsorted(g, thr, side="left") / max(len(g), 1)
    far = 1.0 - np.searchsorted(im, thr, side="left") / max(len(im), 1)
    return thr, far, frr


def eer(genuine: np.ndarray, impostor: np.ndarray) -> float:
    _, far, frr = det(genuine, impostor)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2)


def threshold_at_far(impostor: np.ndarray, far: float = 0.01) -> float:
    """Smallest threshold whose false-accept rate on ``impostor`` is <= ``far``."""
    im = np.sort(impostor)
    k = int(np.floor(far * len(im)))
    return float(np.nextafter(im[len(im) - 1 - k], np.inf)) if len(im) else 1.0


def frr_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float = 0.01) -> float:
    return float(np.mean(genuine < threshold_at_far(impostor, far)))


def _per_test(names: list[str], templates: np.ndarray, tests: Tests
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank-1 correct, genuine score, impostor scores (n, G-1)) of every test; no tests, or
    a gallery of one (no impostor score), give empty arrays of those shapes."""
    scores = tests.emb @ templates.T
    n = len(tests.person)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0), np.zeros((0, max(len(names) - 1, 0)))
    truth = np.searchsorted(np.array(names), tests.person)
    gen = scores[np.arange(n), truth]
    mask = np.ones_like(scores, bool)
    mask[np.arange(n), truth] = False
    return scores.argmax(1) == truth, gen, scores[mask].reshape(n, max(len(names) - 1, 0))


def identity_metrics(names: list[str], templates: np.ndarray, tests: Tests,
                     threshold: float | None = None, prefix: str = "") -> dict[str, float]:
    """rank-1, EER, FRR@FAR1% (percent) for all tests and the cross-session subset.

    With a gallery of one person there is no impostor comparison: rank-1 (always right), EER,
    FRR@FAR1% and FAR at the threshold would be numbers measured on nothing, so they are left
    out (the genuine-only FRR at the threshold and the counts stay)."""
    out: dict[str, float] = {}
    if not len(names) or not len(tests.person):
        return out
    correct, gen_all, imp_all = _per_test(names, templates, tests)
    for sub, sel in (("", np.ones(len(correct), bool)), ("cross_", tests.cross)):
        if not sel.any():
            continue
        gen, imp = gen_all[sel], imp_all[sel].ravel()
        if imp.size:
            out[f"{prefix}{sub}rank1"] = 100.0 * float(np.mean(correct[sel]))
            out[f"{prefix}{sub}eer"] = 100.0 * eer(gen, imp)
            out[f"{prefix}{sub}frr_at_far1"] = 100.0 * frr_at_far(gen, imp)
        out[f"{prefix}{sub}n_tests"] = float(sel.sum())
        if threshold is not None:
            out[f"{prefix}{sub}frr_at_thr"] = 100.0 * float(np.mean(gen < threshold))
            if imp.size:
                out[f"{prefix}{sub}far_at_thr"] = 100.0 * float(np.mean(imp >= threshold))
    out[f"{prefix}n_gallery"] = float(len(names))
    return out


def genuine_impostor(names: list[str], templates: np.ndarray, tests: Tests
                     ) -> tuple[np.ndarray, np.ndarray]:
    _, gen, imp = _per_test(names, templates, tests)
    return gen, imp.ravel()


def choose_threshold(ws: WindowSet, emb: np.ndarray, far: float = 0.01,
                     length_s: float = 10.0) -> float:
    """Operating threshold from TRAINING persons only: FAR = ``far`` on their 10 s tests."""
    names, templates, tests = gallery_and_tests(ws, emb, length_s)
    _, imp = genuine_impostor(names, templates, tests)
    return threshold_at_far(imp, far)


def fused_embeddings(runner, ws: WindowSet, cnn: np.ndarray) -> np.ndarray:
    """The daemon's identity embedding of every window of ``ws`` (``EcgModelRunner``'s fusion of
    the CNN embeddings ``cnn`` with the windows' beats), so evaluation scores what is served."""
    if ws.morph is None:
        raise ValueError("the windows carry no beats: build them with the runner's pipeline_kwargs()")
    return np.stack([runner.identity_embedding(cnn[i], ws.morph[i], ws.lead_mask[i])
                     for i in range(len(cnn))]).astype(np.float32)


BOOT_METRICS = ("rank1", "eer", "frr_at_far1")


def _metrics_of(per_test: tuple[np.ndarray, np.ndarray, np.ndarray], idx: np.ndarray
                ) -> np.ndarray:
    correct, gen, imp = per_test
    g, im = gen[idx], imp[idx].ravel()
    return 100.0 * np.array([np.mean(correct[idx]), eer(g, im), frr_at_far(g, im)])


def person_bootstrap(names: list[str], runs: dict[str, tuple[np.ndarray, Tests]],
                     pairs: tuple[tuple[str, str], ...] = (), *, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95, prefix: str = "") -> dict[str, float]:
    """Confidence intervals of rank-1, EER and FRR@FAR1% by resampling test *persons*.

    WHY persons and not tests: a person's tests share their enrolment, electrodes and drift,
    so they fail together (ECG-ID person 2 alone gives a third of the 10 s tests); resampling
    tests as if independent would give intervals far too narrow. The gallery stays fixed (the
    enrolled household is given); each bootstrap draw takes as many persons as there are,
    with replacement, and all their tests. ``runs`` maps a name ("int8", "float", ...) to
    (templates, tests) of the SAME protocol (same persons and tests in the same order, as
    :func:`gallery_and_tests` gives for two embeddings of the same windows); ``pairs`` names
    differences ``a - b`` whose interval comes from the same draws for both (paired), e.g. the
    int8 loss. Keys: ``{prefix}{run}_{sub}{metric}_lo`` / ``_hi`` and, per pair,
    ``{prefix}{a}_minus_{b}_{sub}{metric}`` (point) with ``_lo`` / ``_hi``, ``sub`` being ""
    or "cross_"; plus ``{prefix}{run}_{sub}rank1_person_mean`` (rank-1 averaged per person,
    every person weighing the same). Fixed ``seed``: the same numbers on every run.
    """
    if not runs:
        return {}
    ref = next(iter(runs.values()))[1]
    for name, (_, t) in runs.items():
        if not (np.array_equal(t.person, ref.person) and np.array_equal(t.cross, ref.cross)):
            raise ValueError(f"person_bootstrap: run {name!r} has other tests than the first run")
    if len(names) < 2:  # a gallery of one: no impostor score, nothing to resample
        return {}
    per = {name: _per_test(names, tmpl, t) for name, (tmpl, t) in runs.items()}
    out: dict[str, float] = {}
    alpha = 100.0 * (1.0 - level) / 2.0
    rng = np.random.default_rng(seed)
    for sub, sel in (("", np.ones(len(ref.person), bool)), ("cross_", ref.cross)):
        persons = sorted(set(ref.person[sel]))
        if len(persons) < 2:
            continue
        of = [np.flatnonzero(sel & (ref.person == p)) for p in persons]
        for name, pt in per.items():
            out[f"{prefix}{name}_{sub}rank1_person_mean"] = 100.0 * float(
                np.mean([pt[0][ix].mean() for ix in of]))
        draws = {name: np.empty((n_boot, len(BOOT_METRICS))) for name in per}
        for b in range(n_boot):
            idx = np.concatenate([of[k] for k in rng.integers(0, len(of), len(of))])
            for name, pt in per.items():
                draws[name][b] = _metrics_of(pt, idx)
        every = np.flatnonzero(sel)
        point = {name: _metrics_of(pt, every) for name, pt in per.items()}
        for name, d in draws.items():
            lo, hi = np.percentile(d, [alpha, 100.0 - alpha], axis=0)
            for j, m in enumerate(BOOT_METRICS):
                out[f"{prefix}{name}_{sub}{m}_lo"] = float(lo[j])
                out[f"{prefix}{name}_{sub}{m}_hi"] = float(hi[j])
        for a, b_ in pairs:
            diff = draws[a] - draws[b_]
            lo, hi = np.percentile(diff, [alpha, 100.0 - alpha], axis=0)
            for j, m in enumerate(BOOT_METRICS):
                key = f"{prefix}{a}_minus_{b_}_{sub}{m}"
                out[key] = float(point[a][j] - point[b_][j])
                out[f"{key}_lo"] = float(lo[j])
                out[f"{key}_hi"] = float(hi[j])
    return out
