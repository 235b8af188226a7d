"""Activity-labelled ECG built from real parts: real RR series under activity + real beats.

No ECG waveform recording with activity labels could be obtained. What is real:

* ``gudb_rpeaks``: R-peak times of 15 persons sitting, doing maths, walking, hand-biking and
  jogging (Howell & Porr 2018) — the heart-rate / RR-variability behaviour of each activity;
* the ECG records of ECG-ID / LUDB / MIT-BIH persons — real beat shapes ("beat donors").

Construction (:func:`retime_record`): the donor record is re-timed so that its R peaks fall on the
gudb R-peak times. Between two R peaks, the donor's early part of the beat (R to roughly the end
of T, Bazett-like ``0.42·sqrt(RR)`` s, capped at 70 % of the interval) is mapped onto the
target's early part, and the rest (T–P, P, Q) absorbs the remaining time, so QRS/T shapes change
only as much as the heart rate changes QT, not in proportion to RR. Donor beats are used in
order and cycled. The constructed mV record then goes through the daemon's own
``windows_from_record`` like any recording. Labels: sitting/maths -> rest, walking -> walking,
hand_bike/jogging -> vigorous. What this cannot contain: motion artefacts, EMG and respiration
changes of real exercise — which is why docs/MODELS.md calls the activity head's numbers
"on constructed data".

Subject-disjoint: train and test use different gudb persons AND different beat donors. Training
uses the fixed split (every subject but :data:`GUDB_TEST_SUBJECTS`) and writes the subjects it
used into the manifest (``training.persons["gudb_rpeaks"]``); evaluation
(``python -m training.eval models``) uses every gudb subject NOT listed there, so a folder of
unseen persons numbered otherwise (the independent set's 15-24) is evaluated too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.ecg import DataError, EcgRecord, load_npz, meta_field, need_file, person_key, read_json

GUDB_ACTIVITY = {"sitting": 0, "maths": 0, "walking": 1, "hand_bike": 2, "jogging": 2}
GUDB_FS = 250.0
#: gudb subjects of shared/data that training never uses (the fixed split; evaluation instead
#: excludes the subjects a model's manifest lists, see :func:`gudb_person`).
GUDB_TEST_SUBJECTS = (10, 11, 12, 13, 14)


@dataclass(frozen=True)
class RRSeries:
    subject: int
    activity: str
    label: int
    r_times_s: np.ndarray


def gudb_person(subject: int) -> str:
    """The person key of a gudb subject, spelt as a manifest's ``training.persons`` entries are
    read (``training.eval.models.training_persons``)."""
    return person_key("gudb_rpeaks", subject)


def load_gudb_rr(data_dir: Path) -> list[RRSeries]:
    """The gudb R-peak series, one per subject and activity.

    Each session was annotated twice, on the chest strap and on the Einthoven II cables, which
    recorded at the same time: the two series are the same heartbeats (after aligning the two
    clocks, every beat of subject 10 sitting matches within 12 ms). Keeping both counted each
    session twice in the activity tests (and twice in training); the series with more usable
    R peaks is kept, the chest strap's on a tie.

    No ``gudb_rpeaks/`` folder: no series. A folder lacking a file, or whose files do not match,
    is a :class:`~training.data.ecg.DataError` naming the file."""
    d = Path(data_dir) / "gudb_rpeaks"
    if not d.is_dir():
        return []
    meta_path, npz_path = need_file(d / "metadata.json"), need_file(d / "gudb_rpeaks.npz")
    meta = read_json(meta_path)
    try:
        fs = float(meta.get("fs_hz", GUDB_FS))
    except (TypeError, ValueError):
        fs = float("nan")
    if not np.isfinite(fs) or fs <= 0:
        raise DataError(f"{meta_path}: 'fs_hz' is {meta.get('fs_hz')!r}; expected a rate in Hz > 0")
    z = load_npz(npz_path)
    entries = meta_field(meta, "entries", meta_path)
    if not isinstance(entries, list):
        raise DataError(f"{meta_path}: 'entries' must be a list of objects")
    kept: dict[tuple[int, str], RRSeries] = {}  # (subject, activity) -> its series (order kept)
    for k, e in enumerate(entries):
        what = f"entry #{k}: "
        experiment = meta_field(e, "experiment", meta_path, what)
        annotation = meta_field(e, "annotation", meta_path, what)
        try:
            subject = int(meta_field(e, "subject", meta_path, what))
        except (TypeError, ValueError):
            raise DataError(f"{meta_path}: {what}subject {e['subject']!r} is not a number") from None
        key = f"s{subject:02d}_{experiment}_{annotation}"
        if key not in z.files:
            raise DataError(f"{npz_path} has no array {key!r} although {meta_path} lists it ({what[:-2]})")
        if experiment not in GUDB_ACTIVITY:
            continue
        try:
            r = np.unique(np.asarray(z[key]).astype(np.int64).ravel()) / fs
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"{npz_path}: array {key!r} is not a list of R-peak samples ({exc})") from None
        rr = np.diff(r)
        # drop series with implausible gaps (missed annotations): RR outside 0.25..2 s
        if len(r) < 10 or np.any((rr < 0.25) | (rr > 2.0)):
            r = _longest_plausible_run(r)
            if len(r) < 10:
                continue
        best = kept.get((subject, experiment))
        if best is None or len(r) > len(best.r_times_s):
            kept[(subject, experiment)] = RRSeries(subject, experiment, GUDB_ACTIVITY[experiment], r)
    return list(kept.values())


def _longest_plausible_run(r: np.ndarray) -> np.ndarray:
    ok = (np.diff(r) >= 0.25) & (np.diff(r) <= 2.0)
    best, cur_start, best_span = (0, 0), 0, 0
    for i, good in enumerate(np.append(ok, False)):
        if not good:
            if i - cur_start > best_span:
                best, best_span = (cur_start, i), i - cur_start
            cur_start = i + 1
    return r[best[0]:best[1] + 1]


def _early_part(rr: np.ndarray) -> np.ndarray:
    return np.minimum(0.42 * np.sqrt(rr), 0.7 * rr)


def retime_record(x_mv: np.ndarray, fs: float, donor_r: np.ndarray, target_r_s: np.ndarray,
                  duration_s: float) -> np.ndarray:
    """Re-time ``x_mv`` (n, ch) so donor R peaks (sample idx) land on ``target_r_s`` (s, from 0).

    Returns (round(duration_s*fs), ch) mV. Output time before the first target R peak / after
    the last one is not produced: the caller passes a target series covering ``duration_s``.
    """
    donor_r = np.asarray(donor_r, dtype=np.float64) / fs
    if len(donor_r) < 3:
        raise ValueError("a beat donor needs at least 3 R peaks")
    d_rr = np.diff(donor_r)
    t = np.asarray(target_r_s, dtype=np.float64)
    t_rr = np.diff(t)
    k = np.arange(len(t_rr)) % len(d_rr)            # donor interval used for target interval j
    # anchors (target time -> donor time) for every target interval: R, end of early part
    n_out = int(round(duration_s * fs))
    tout = np.arange(n_out) / fs
    j = np.clip(np.searchsorted(t, tout, side="right") - 1, 0, len(t_rr) - 1)
    phase_t = tout - t[j]
    e_t = _early_part(t_rr)[j]
    e_d = _early_part(d_rr)[k[j]]
    late_t = np.maximum(t_rr[j] - e_t, 1e-6)
    late_d = d_rr[k[j]] - e_d
    src = np.where(phase_t <= e_t,
                   donor_r[k[j]] + phase_t * (e_d / e_t),
                   donor_r[k[j]] + e_d + (phase_t - e_t) * (late_d / late_t))
    pos = src * fs
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, x_mv.shape[0] - 2)
    frac = (pos - i0)[:, None].astype(np.float32)
    return (x_mv[i0] * (1 - frac) + x_mv[i0 + 1] * frac).astype(np.float32)


def construct_activity_records(rr: list[RRSeries], donors: list[EcgRecord], seconds: float,
                               per_series: int, seed: int) -> list[tuple[EcgRecord, int]]:
    """``per_series`` constructed records of ``seconds`` from each RR series, random donors.

    Donor R peaks come from the daemon's own detector (``detect_rpeaks``), so any folder works.
    """
    from daemon.dsp.rpeaks import detect_rpeaks

    rng = np.random.default_rng(seed)
    peaks = []
    for d in donors:
        r = np.asarray(detect_rpeaks(d.x_mv, d.fs, lead_valid=d.lead_valid), dtype=np.int64)
        # keep only full beats away from the record edges
        r = r[(r > 0.3 * d.fs) & (r < d.x_mv.shape[0] - 0.5 * d.fs)]
        peaks.append(r)
    usable = [i for i, p in enumerate(peaks) if len(p) >= 4]
    if not usable:
        raise ValueError("no beat donor record with at least 4 detected R peaks")
    out = []
    for s in rr:
        span = s.r_times_s[-1] - s.r_times_s[0]
        for _ in range(per_series):
            if span <= seconds + 1.0:
                break
            start = rng.uniform(s.r_times_s[0], s.r_times_s[-1] - seconds - 1.0)
            sel = s.r_times_s[(s.r_times_s >= start - 2.0) & (s.r_times_s <= start + seconds + 2.0)]
            t = sel - start  # t[0] <= 0 < seconds <= t[-1]: every output sample is covered
            di = usable[int(rng.integers(len(usable)))]
            d = donors[di]
            x = retime_record(d.x_mv, d.fs, peaks[di], t, seconds)
            rec = EcgRecord(d.dataset, d.person, f"act:{s.subject}:{s.activity}:{d.record}",
                            s.activity, d.fs, x, d.lead_valid)
            out.append((rec, s.label))
    return out
