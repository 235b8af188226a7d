"""Heart rate and HRV (RMSSD, SDNN) from clean beats, robust to ectopics and missed beats.

Only intervals between two *consecutive clean* beats count (an RR spanning a rejected beat or a
gap is not an RR). Each RR must lie in the plausible range (``RR_MIN_S``..``RR_MAX_S`` =
220..30 bpm). Ectopic beats are found by *prematurity* against a reference of normal intervals
(see ``nn_intervals``): both intervals touching an ectopic beat (the premature one and the
compensatory one after it) are excluded, and so is any other interval more than ``ectopic_tol``
away from the reference. The heart rate is the median of the recent NN intervals; RMSSD uses only
differences of two *adjacent* NN intervals and needs ``MIN_SUCCESSIVE_DIFFERENCES`` of them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from daemon.dsp.stats import median

RR_MIN_S = 60.0 / 220.0
RR_MAX_S = 60.0 / 30.0

MIN_SUCCESSIVE_DIFFERENCES = 8
"""Fewest successive NN differences (pairs of *adjacent* NN intervals) RMSSD is reported from.

WHY: RMSSD is a root mean square of successive differences, so its sampling error depends on the
number of differences, not of intervals: with ectopic removals or beats rejected by quality, ten
NN intervals can hold a single adjacent pair, and an RMSSD "from 10 intervals" would rest on one
difference (a relative standard error of ~70 %). Eight differences bring that to ~25 %, still
reachable in a 60 s window with a few interruptions."""

_REF_HALF_WIDTH = 8
"""Intervals on either side that form the normal-interval reference (17 in all, ~15 s at rest):
wide enough that runs of bigeminy or a couplet cannot become the majority, short enough to follow
a heart-rate change."""


@dataclass(frozen=True)
class Hrv:
    rmssd_ms: float   # root mean square of successive NN differences
    sdnn_ms: float    # standard deviation of NN intervals (population, ddof=0)
    n_intervals: int  # NN intervals used
    n_differences: int = 0  # successive differences (adjacent NN pairs) RMSSD was computed from





def rmssd(rr_s: np.ndarray, contiguous: np.ndarray | None = None) -> float:
    """RMSSD in ms. ``contiguous[i]`` True when rr[i+1] directly follows rr[i] (default all)."""
    rr = np.asarray(rr_s, dtype=np.float64)
    d = np.diff(rr)
    if contiguous is not None:
        d = d[np.asarray(contiguous, dtype=bool)]
    if d.size == 0:
        raise ValueError("RMSSD needs at least two successive NN intervals")
    return float(np.sqrt(np.mean(d * d)) * 1000.0)


def sdnn(rr_s: np.ndarray) -> float:
    """SDNN in ms (population standard deviation, ddof=0, as in short-term HRV practice)."""
    rr = np.asarray(rr_s, dtype=np.float64)
    if rr.size < 2:
        raise ValueError("SDNN needs at least two NN intervals")
    return float(rr.std() * 1000.0)


def _rolling_nanmedian(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred median over ``x[i-half..i+half]`` ignoring NaN, and how many values it used (0 ->
    NaN). One sort of a (n, 2*half+1) view: NaNs sort last, so the median of row i lies at the
    middle of its first ``count`` entries."""
    n = x.size
    pad = np.concatenate([np.full(half, np.nan), x, np.full(half, np.nan)])
    win = np.sort(np.lib.stride_tricks.sliding_window_view(pad, 2 * half + 1), axis=1)
    count = np.count_nonzero(~np.isnan(win), axis=1)
    rows = np.arange(n)
    lo = win[rows, np.maximum(count - 1, 0) // 2]
    hi = win[rows, count // 2]
    return np.where(count > 0, (lo + hi) / 2.0, np.nan), count


def nn_intervals(times_s: np.ndarray, clean: np.ndarray,
                 ectopic_tol: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Beat times + per-beat clean flags -> (NN intervals s, contiguous flags for successive
    differences: ``contiguous[i]`` True when NN ``i+1`` directly follows NN ``i``). Vectorised.

    Ectopic beats are detected by prematurity against a reference of *normal* intervals, not a
    median of the intervals around each one (with bigeminy or couplets that median is the
    alternating short/long interval itself, so nothing would be removed):

    1. Provisional reference: the centred median (``_REF_HALF_WIDTH`` each side) of the means of
       adjacent RR pairs. A premature beat followed by its compensatory pause averages to about
       one normal interval, so this stays near the sinus interval even in runs of bigeminy.
    2. Candidate normal intervals: plausible RRs between clean beats within ``ectopic_tol`` of
       that reference. The final reference is the centred median of those candidates (the
       provisional one where fewer than 3 lie in the window, e.g. inside a bigeminy run).
    3. A beat is ectopic when the RR before it is premature (< (1 - ``ectopic_tol``) x reference)
       and the RR after it is longer (the compensatory pause); both RRs touching it are dropped.
       Any other RR more than ``ectopic_tol`` from the reference (a premature beat without a
       longer follower, e.g. the first of a couplet; a pause; a missed beat) is dropped too.
    """
    t = np.asarray(times_s, dtype=np.float64)
    c = np.asarray(clean, dtype=bool)
    if t.size < 2:
        return np.zeros(0), np.zeros(0, dtype=bool)
    rr = np.diff(t)
    plausible = (rr >= RR_MIN_S) & (rr <= RR_MAX_S)
    ok = c[1:] & c[:-1] & plausible
    if rr.size >= 2:
        rr_p = np.where(plausible, rr, np.nan)
        pair = (rr_p[1:] + rr_p[:-1]) / 2.0  # pair[j]: mean of rr[j], rr[j+1]
        # the pair means touching each interval, pooled (interval j is in pairs j-1 and j)
        pm, _ = _rolling_nanmedian(pair, _REF_HALF_WIDTH)
        ref0 = np.concatenate([pm[:1], (pm[1:] + pm[:-1]) / 2.0, pm[-1:]])
        ref0 = np.where(np.isnan(ref0), rr_p, ref0)
        cand = ok & (np.abs(rr - ref0) <= ectopic_tol * ref0)
        ref1, n_cand = _rolling_nanmedian(np.where(cand, rr, np.nan), _REF_HALF_WIDTH)
        ref = np.where(n_cand >= 3, ref1, ref0)
        ref = np.where(np.isnan(ref), rr, ref)  # nothing plausible nearby: the RR itself
        before, after, r = rr[:-1], rr[1:], ref[:-1]  # around beat k+1
        # both RRs plausible: a double detection or a gap says nothing about prematurity
        early = plausible[:-1] & plausible[1:] & (before < r)
        # premature and followed by a longer RR, or the short-long jump of a less premature
        # ectopic beat and its compensatory pause
        ectopic = early & (((before < (1.0 - ectopic_tol) * r) & (after > before))
                           | (after - before > ectopic_tol * r))
        ok[:-1] &= ~ectopic
        ok[1:] &= ~ectopic
        ok &= np.abs(rr - ref) <= ectopic_tol * ref
    idx = np.flatnonzero(ok)
    contiguous = np.diff(idx) == 1
    return rr[idx], contiguous


class HeartRateTracker:
    """Keeps the recent beats (time, clean flag) and answers heart rate and HRV.

    HR = 60 / median of the last ``hr_intervals`` NN intervals within ``hr_window_s``;
    HRV over the NN intervals within ``hrv_window_s`` (at least ``min_hrv_intervals`` of them and
    ``MIN_SUCCESSIVE_DIFFERENCES`` successive differences of adjacent ones).
    """

    def __init__(self, hr_window_s: float = 10.0, hr_intervals: int = 8,
                 hrv_window_s: float = 60.0, min_hrv_intervals: int = 10,
                 min_hr_intervals: int = 3) -> None:
        self.hr_window_s = float(hr_window_s)
        self.hr_intervals = int(hr_intervals)
        self.hrv_window_s = float(hrv_window_s)
        self.min_hrv_intervals = int(min_hrv_intervals)
        self.min_hr_intervals = int(min_hr_intervals)
        self._t = np.zeros(0)
        self._clean = np.zeros(0, dtype=bool)
        self._cache: dict[str, object] = {}  # answers until the next push (streams poll often)
        self._forgotten_until = -np.inf

    def forget_until(self, t_s: float) -> None:
        """Drop every beat up to ``t_s`` and refuse later pushes of such beats. WHY: when every
        electrode is off, the next person may put them on within seconds; their heart rate
        must not be the previous wearer's, nor their session live on the previous beats."""
        self._forgotten_until = max(self._forgotten_until, float(t_s))
        keep = self._t > self._forgotten_until
        self._t, self._clean = self._t[keep], self._clean[keep]
        self._cache = {}

    def push(self, times_s: np.ndarray, clean: np.ndarray | bool) -> None:
        t = np.asarray(times_s, dtype=np.float64).reshape(-1)
        c = np.broadcast_to(np.asarray(clean, dtype=bool), t.shape)
        if t.size and t[0] <= self._forgotten_until:  # decided late, from before the leads came off
            keep = t > self._forgotten_until
            t, c = t[keep], c[keep]
        if t.size == 0:
            return
        if self._t.size and t[0] <= self._t[-1]:
            raise ValueError("beats must be pushed in increasing time order, each once")
        self._t = np.concatenate([self._t, t])
        self._clean = np.concatenate([self._clean, c])
        keep = self._t >= self._t[-1] - max(self.hrv_window_s, self.hr_window_s) - RR_MAX_S
        self._t, self._clean = self._t[keep], self._clean[keep]
        self._cache = {}

    def last_clean_time(self) -> float | None:
        if "last" not in self._cache:
            idx = np.flatnonzero(self._clean)
            self._cache["last"] = float(self._t[idx[-1]]) if idx.size else None
        return self._cache["last"]  # type: ignore[return-value]

    def _recent(self, span: float, t: np.ndarray | None = None, clean: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        t = self._t if t is None else t
        clean = self._clean if clean is None else clean
        if not t.size:
            return np.zeros(0), np.zeros(0, dtype=bool)
        sel = t >= t[-1] - span
        return nn_intervals(t[sel], clean[sel])

    def heart_rate_bpm(self) -> float | None:
        if "hr" not in self._cache:
            self._cache["hr"] = self._heart_rate()
        return self._cache["hr"]  # type: ignore[return-value]

    def hrv(self) -> Hrv | None:
        if "hrv" not in self._cache:
            self._cache["hrv"] = self._hrv()
        return self._cache["hrv"]  # type: ignore[return-value]

    def hrv_deferred(self) -> Callable[[], Hrv | None]:
        """HRV of the beats as they are now, computed when (and if) it is asked for. WHY: HRV
        reads the last 60 s of beats on every push, a few % of the ECG path, and the daemon
        publishes none of it. The arrays are captured, not copied: push and forget_until
        replace them and never write into them, so a later push cannot change this answer."""
        if "hrv" in self._cache:
            done = self._cache["hrv"]
            return lambda: done  # type: ignore[return-value]
        t, clean = self._t, self._clean
        memo: list[Hrv | None] = []

        def compute() -> Hrv | None:
            if not memo:
                memo.append(self._hrv(t, clean))
            return memo[0]
        return compute

    def _heart_rate(self) -> float | None:
        rr, _ = self._recent(self.hr_window_s)
        rr = rr[-self.hr_intervals:]
        if rr.size < self.min_hr_intervals:
            return None
        return float(60.0 / median(rr))

    def _hrv(self, t: np.ndarray | None = None, clean: np.ndarray | None = None) -> Hrv | None:
        rr, contiguous = self._recent(self.hrv_window_s, t, clean)
        n_diff = int(np.count_nonzero(contiguous))
        if rr.size < self.min_hrv_intervals or n_diff < MIN_SUCCESSIVE_DIFFERENCES:
            return None
        return Hrv(rmssd(rr, contiguous), sdnn(rr), int(rr.size), n_diff)
