"""Heart rate and HRV (RMSSD, SDNN) from clean beats, robust to ectopics and missed beats.

Only intervals between two *consecutive clean* beats count (an RR spanning a rejected beat or a
gap is not an RR). Each RR must lie in the plausible range (``RR_MIN_S``..``RR_MAX_S`` =
220..30 bpm), and ectopic-like intervals (differing by more than ``ectopic_tol`` from the median
of their neighbours, the usual premature-beat + compensatory-pause signature) are excluded from
HRV and do not move the heart rate, which is the median of the recent clean RRs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.dsp.stats import median

RR_MIN_S = 60.0 / 220.0
RR_MAX_S = 60.0 / 30.0


@dataclass(frozen=True)
class Hrv:
    rmssd_ms: float   # root mean square of successive NN differences
    sdnn_ms: float    # standard deviation of NN intervals (population, ddof=0)
    n_intervals: int  # NN intervals used





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


def nn_intervals(times_s: np.ndarray, clean: np.ndarray,
                 ectopic_tol: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Beat times + per-beat clean flags -> (NN intervals s, contiguous flags for successive
    differences). Vectorised."""
    t = np.asarray(times_s, dtype=np.float64)
    c = np.asarray(clean, dtype=bool)
    if t.size < 2:
        return np.zeros(0), np.zeros(0, dtype=bool)
    rr = np.diff(t)
    ok = c[1:] & c[:-1] & (rr >= RR_MIN_S) & (rr <= RR_MAX_S)
    # Ectopic filter: compare each RR with the median of up to 5 RRs centred on it.
    if rr.size >= 3:
        pad = np.concatenate([rr[:1], rr[:1], rr, rr[-1:], rr[-1:]])  # np.pad(rr, 2, "edge")
        win = np.stack([pad[i:i + rr.size] for i in range(5)], axis=1)
        ref = np.sort(win, axis=1)[:, 2] + 0.0  # == np.median(win, axis=1), 5x cheaper
        ok &= np.abs(rr - ref) <= ectopic_tol * ref
    idx = np.flatnonzero(ok)
    contiguous = np.diff(idx) == 1
    return rr[idx], contiguous


class HeartRateTracker:
    """Keeps the recent beats (time, clean flag) and answers heart rate and HRV.

    HR = 60 / median of the last ``hr_intervals`` NN intervals within ``hr_window_s``;
    HRV over the NN intervals within ``hrv_window_s`` (at least ``min_hrv_intervals``).
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

    def _recent(self, span: float) -> tuple[np.ndarray, np.ndarray]:
        if not self._t.size:
            return np.zeros(0), np.zeros(0, dtype=bool)
        sel = self._t >= self._t[-1] - span
        return nn_intervals(self._t[sel], self._clean[sel])

    def heart_rate_bpm(self) -> float | None:
        if "hr" not in self._cache:
            self._cache["hr"] = self._heart_rate()
        return self._cache["hr"]  # type: ignore[return-value]

    def hrv(self) -> Hrv | None:
        if "hrv" not in self._cache:
            self._cache["hrv"] = self._hrv()
        return self._cache["hrv"]  # type: ignore[return-value]

    def _heart_rate(self) -> float | None:
        rr, _ = self._recent(self.hr_window_s)
        rr = rr[-self.hr_intervals:]
        if rr.size < self.min_hr_intervals:
            return None
        return float(60.0 / median(rr))

    def _hrv(self) -> Hrv | None:
        rr, contiguous = self._recent(self.hrv_window_s)
        if rr.size < self.min_hrv_intervals or not contiguous.any():
            return None
        return Hrv(rmssd(rr, contiguous), sdnn(rr), int(rr.size))
