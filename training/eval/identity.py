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
* cross-session subset: tests recorded on another date than the enrolment recording;
* scores: cosine similarity; rank-1 over the gallery; verification EER and FRR at FAR = 1 %
  from genuine (own template) vs impostor (every other gallery template) scores;
* never-enrolled persons (LUDB lead I only, MIT-BIH its single lead): tests of the same
  lengths scored against the whole gallery; false accept = best score >= the threshold.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from training.data.ecg import WindowSet

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


def gallery_and_tests(ws: WindowSet, emb: np.ndarray, length_s: float
                      ) -> tuple[list[str], np.ndarray, Tests]:
    """Enrol ECG-ID persons from their first recording; build tests of ``length_s``."""
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
            cross = ws.records[i].session != ws.records[enrol].session
            rec_s = ws.records[i].duration_s
            if length_s <= rec_s:
                groups = [w[p] for p in _pieces(ws.t_end_s[w], length_s, rec_s)]
            elif len(others) >= 2:
                nxt = win_of[others[(k + 1) % len(others)]]
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


def identity_metrics(names: list[str], templates: np.ndarray, tests: Tests,
                     threshold: float | None = None, prefix: str = "") -> dict[str, float]:
    """rank-1, EER, FRR@FAR1% (percent) for all tests and the cross-session subset."""
    out: dict[str, float] = {}
    if not len(names) or not len(tests.person):
        return out
    scores = tests.emb @ templates.T
    truth = np.searchsorted(np.array(names), tests.person)
    for sub, sel in (("", np.ones(len(truth), bool)), ("cross_", tests.cross)):
        if not sel.any():
            continue
        s, t = scores[sel], truth[sel]
        gen = s[np.arange(len(t)), t]
        mask = np.ones_like(s, bool)
        mask[np.arange(len(t)), t] = False
        imp = s[mask]
        out[f"{prefix}{sub}rank1"] = 100.0 * float(np.mean(s.argmax(1) == t))
        out[f"{prefix}{sub}eer"] = 100.0 * eer(gen, imp)
        out[f"{prefix}{sub}frr_at_far1"] = 100.0 * frr_at_far(gen, imp)
        out[f"{prefix}{sub}n_tests"] = float(len(t))
        if threshold is not None:
            out[f"{prefix}{sub}frr_at_thr"] = 100.0 * float(np.mean(gen < threshold))
            out[f"{prefix}{sub}far_at_thr"] = 100.0 * float(np.mean(imp >= threshold))
    out[f"{prefix}n_gallery"] = float(len(names))
    return out


def genuine_impostor(names: list[str], templates: np.ndarray, tests: Tests
                     ) -> tuple[np.ndarray, np.ndarray]:
    scores = tests.emb @ templates.T
    truth = np.searchsorted(np.array(names), tests.person)
    gen = scores[np.arange(len(truth)), truth]
    mask = np.ones_like(scores, bool)
    mask[np.arange(len(truth)), truth] = False
    return gen, scores[mask]


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
