"""IMU signal processing: SI units, fixed-rate resampling, gait gate, autocorrelation features.

Everything here is stateless except :class:`ImuResampler`, which is chunk-invariant (the output
grid is anchored to the first timestamp, so the same samples come out however the input is
chunked). Arrays are float32 except timestamps, which stay float64 because seconds since the
epoch lose millisecond resolution in float32.

Autocorrelation features (``acf_features``), exact definition
-------------------------------------------------------------
For a window ``x`` (n, 6) = acc x/y/z (m/s²) then gyro x/y/z (rad/s), each axis is mean-removed
over the window and its *biased* autocorrelation is taken::

    r[k] = (1/n) * sum_{t=0}^{n-1-k} x[t] * x[t+k],   k = 0..max_lag

so ``r[0]`` is the (biased) variance of the axis. BioDeep feeds the raw autocorrelation at lags
0..10 to its models; we keep that: ``variant="biodeep"`` returns r[0..max_lag] of the 6 axes,
axis-major (axis 0 lags 0..max_lag, then axis 1, ...) -> 6*(max_lag+1) = 66 values by default.

Variants (same layout, same definition of r):

* ``"normalized"``: r[k]/r[0] for k >= 1 (correlation coefficients, amplitude-free), r[0] is
  still the variance so the energy is not lost;
* ``"magnitude"``: 8 channels: the 6 axes + |acc| + |gyro| (orientation-free) -> 8*(max_lag+1);
* ``"stride"``: ``max_lag+1`` lags spread evenly from 0 to ``stride_s`` seconds (default 1.2 s,
  about one stride), i.e. lags ``round(linspace(0, stride_s*fs, max_lag+1))``, normalised like
  ``"normalized"``. BioDeep's lags 0..10 span only 0.1 s at 100 Hz; this variant sees the gait
  cycle itself;
* ``"gait"``: the 66 ``"stride"`` values followed by ``GAIT_STATS_PER_SIGNAL`` orientation-free
  gait statistics of |acc| and then of |gyro| (``gait_stats_batch``): mean, std, IQR, 5th/95th
  percentile, 5-95 range, RMS jerk, relative band powers (7 bands 0.5-50 Hz of the
  Hann-windowed, mean-removed magnitude), spectral centroid, dominant frequency in 0.6-3.5 Hz
  (cadence), step and stride regularity (peak unbiased normalised ACF at 0.25-0.8 s /
  0.6-1.6 s), their lags (s) and the step/stride ratio (symmetry). Why: the ACF of the sensor axes
  depends on how the device sits; walking speed, cadence, regularity and movement energy are
  what age and sex change, and the magnitudes see them whatever the orientation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

G = np.float32(9.80665)          # standard gravity, m/s² per g
DEG2RAD = np.float32(np.pi / 180.0)
ACF_VARIANTS = ("biodeep", "normalized", "magnitude", "stride", "gait")
GAIT_BANDS_HZ = ((0.5, 1.5), (1.5, 2.5), (2.5, 3.5), (3.5, 5.0), (5.0, 8.0), (8.0, 15.0), (15.0, 50.0))
GAIT_STAT_NAMES = ("mean", "std", "iqr", "p5", "p95", "range", "jerk_rms",
                   *(f"band_{lo:g}_{hi:g}hz" for lo, hi in GAIT_BANDS_HZ), "centroid_hz",
                   "cadence_hz", "step_reg", "step_lag_s", "stride_reg", "stride_lag_s", "symmetry")
GAIT_STATS_PER_SIGNAL = len(GAIT_STAT_NAMES)  # per magnitude (|acc|, |gyro|)


def acc_g_to_ms2(acc_g: np.ndarray) -> np.ndarray:
    """Accelerometer g -> m/s² (float32)."""
    return np.asarray(acc_g, dtype=np.float32) * G


def gyro_dps_to_rads(gyro_dps: np.ndarray) -> np.ndarray:
    """Gyroscope °/s -> rad/s (float32)."""
    return np.asarray(gyro_dps, dtype=np.float32) * DEG2RAD


def to_si(acc_g: np.ndarray, gyro_dps: np.ndarray) -> np.ndarray:
    """(n,3) g + (n,3) °/s -> (n,6) float32 [acc m/s², gyro rad/s]."""
    acc_g = np.asarray(acc_g)
    gyro_dps = np.asarray(gyro_dps)
    if acc_g.ndim != 2 or acc_g.shape[1] != 3 or gyro_dps.shape != acc_g.shape:
        raise ValueError(f"need acc (n,3) and gyro (n,3) of equal length, got {acc_g.shape} "
                         f"and {gyro_dps.shape}")
    return np.concatenate([acc_g_to_ms2(acc_g), gyro_dps_to_rads(gyro_dps)], axis=1)


def clip_fraction(x: np.ndarray, full_scale: float, margin: float = 0.98) -> np.ndarray:
    """Fraction of samples per channel at or beyond ``margin * full_scale``.

    Why: some HuGaDB gyroscope files are 10x amplified and clip at the sensor's range; a window
    that sits on the rails is not motion, it is a broken sensor, and must be flagged.
    """
    x = np.asarray(x, dtype=np.float32)
    return (np.abs(x) >= np.float32(margin * full_scale)).mean(axis=-2)


class ImuResampler:
    """Irregular (jittered, BLE-batched) timestamps -> a fixed ``fs_out`` grid, streaming.

    Linear interpolation between the two input samples around each grid time. The grid is
    ``t_anchor + k / fs_out`` with ``t_anchor`` the first timestamp (re-anchored after a gap), so
    output is identical for any chunking. A gap longer than ``max_gap_s`` is never bridged by
    interpolation (that would invent motion): the grid restarts after it, ``gaps`` counts it and
    ``push`` reports where the new contiguous run starts.
    """

    def __init__(self, fs_out: float, n_channels: int, max_gap_s: float = 0.5) -> None:
        if fs_out <= 0:
            raise ValueError(f"fs_out must be > 0, got {fs_out}")
        self.fs_out = float(fs_out)
        self.n_channels = int(n_channels)
        self.max_gap_s = float(max_gap_s)
        self.gaps = 0
        self._t_prev: float | None = None
        self._x_prev: np.ndarray | None = None
        self._anchor = 0.0
        self._k = 0  # next grid index since anchor

    @property
    def anchor(self) -> float:
        """Time of grid sample 0 of the current contiguous run."""
        return self._anchor

    def push(self, t_s: np.ndarray, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        """Return contiguous runs ``[(t_out (m,) float64, y (m, ch) float32, continues)]``;
        ``continues`` is False for a run that starts after a gap (or the very first run)."""
        t = np.asarray(t_s, dtype=np.float64).reshape(-1)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape != (t.size, self.n_channels):
            raise ValueError(f"need t (n,) and x (n, {self.n_channels}), got {t.shape}, {x.shape}")
        if t.size == 0:
            return []
        if not np.all(np.isfinite(t)):
            raise ValueError("IMU timestamps contain NaN/inf; fix the source's clock handling")
        first_new = self._t_prev is None
        if not first_new:
            t = np.concatenate([[self._t_prev], t])
            x = np.concatenate([self._x_prev[None], x])
        dt = np.diff(t)
        if np.any(dt <= 0):
            i = int(np.argmax(dt <= 0))
            raise ValueError(
                f"IMU timestamps must be strictly increasing: t={t[i + 1]!r} follows {t[i]!r}; "
                "de-duplicate or sort the samples (or timestamp them on arrival) before pushing")
        cuts = np.flatnonzero(dt > self.max_gap_s) + 1
        bounds = np.concatenate([[0], cuts, [t.size]])
        runs = []
        for j in range(len(bounds) - 1):
            a, b = int(bounds[j]), int(bounds[j + 1])
            restart = first_new if j == 0 else True
            if restart:
                if j > 0:
                    self.gaps += 1
                self._anchor = float(t[a])
                self._k = 0
            tt, xx = t[a:b], x[a:b]
            k_end = int(np.floor((tt[-1] - self._anchor) * self.fs_out + 1e-9))
            if k_end >= self._k:
                grid = self._anchor + np.arange(self._k, k_end + 1) / self.fs_out
                y = np.empty((grid.size, self.n_channels), dtype=np.float32)
                for c in range(self.n_channels):  # loop over channels, not samples
                    y[:, c] = np.interp(grid, tt, xx[:, c])
                self._k = k_end + 1
                runs.append((grid, y, not restart))
            elif restart:
                runs.append((np.zeros(0), np.zeros((0, self.n_channels), np.float32), False))
        self._t_prev = float(t[-1])
        self._x_prev = x[-1].copy()
        return [r for r in runs if r[0].size or not r[2]]


def resample_irregular(t_s: np.ndarray, x: np.ndarray, fs_out: float,
                       max_gap_s: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Batch: whole record on a fixed grid (gaps dropped, runs concatenated)."""
    runs = ImuResampler(fs_out, np.shape(x)[1], max_gap_s).push(t_s, x)
    return (np.concatenate([r[0] for r in runs]),
            np.concatenate([r[1] for r in runs]).astype(np.float32))


# ------------------------------------------------------------------ autocorrelation features
def _acf(x: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """Biased ACF of mean-removed ``x`` (b, n, c) at ``lags`` -> (b, c, len(lags)) float32."""
    n = x.shape[1]
    if int(lags.max()) >= n:
        raise ValueError(f"ACF lag {int(lags.max())} needs a window longer than {n} samples")
    x = x - x.mean(axis=1, keepdims=True)
    if lags.size <= 32:
        out = np.empty((x.shape[0], x.shape[2], lags.size), dtype=np.float32)
        for j, k in enumerate(lags):  # loop over lags (few), vectorised over batch and axes
            k = int(k)
            out[:, :, j] = np.einsum("bnc,bnc->bc", x[:, : n - k], x[:, k:])
    else:
        nfft = scipy.fft.next_fast_len(2 * n)
        f = scipy.fft.rfft(x, nfft, axis=1)
        full = scipy.fft.irfft(f.real ** 2 + f.imag ** 2, nfft, axis=1)
        out = np.moveaxis(full[:, lags, :], 1, 2).astype(np.float32)
    return out / np.float32(n)


def acf_feature_size(max_lag: int = 10, variant: str = "biodeep") -> int:
    extra = 2 * GAIT_STATS_PER_SIGNAL if variant == "gait" else 0
    return (8 if variant == "magnitude" else 6) * (max_lag + 1) + extra


def gait_stats_batch(windows: np.ndarray, fs: float = 100.0) -> np.ndarray:
    """(b, n, 6) SI windows -> (b, 2 * GAIT_STATS_PER_SIGNAL) float32: ``GAIT_STAT_NAMES`` of
    |acc| (m/s²) then of |gyro| (rad/s). Vectorised over the batch; see the module docstring."""
    w = np.asarray(windows, dtype=np.float32)
    b, n, _ = w.shape
    step_lo, step_hi, stride_hi = (int(round(s * fs)) for s in (0.25, 0.8, 1.6))
    stride_lo = int(round(0.6 * fs))
    if n <= stride_hi:
        raise ValueError(f"gait statistics need windows longer than 1.6 s, got {n / fs:.2f} s")
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    hann = np.hanning(n).astype(np.float32)
    cad = (freqs >= 0.6) & (freqs <= 3.5)
    lags = np.arange(step_lo, stride_hi + 1)
    step, stride = lags <= step_hi, lags >= stride_lo
    out = []
    for m in (np.linalg.norm(w[..., :3], axis=2), np.linalg.norm(w[..., 3:], axis=2)):
        q5, q25, q75, q95 = np.percentile(m, [5, 25, 75, 95], axis=1)
        jerk = np.sqrt(np.mean(np.diff(m, axis=1) ** 2, axis=1)) * np.float32(fs)
        mc = m - m.mean(axis=1, keepdims=True)
        p = np.abs(np.fft.rfft(mc * hann, axis=1)) ** 2
        total = p[:, 1:].sum(axis=1) + 1e-12
        bands = [p[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) / total for lo, hi in GAIT_BANDS_HZ]
        centroid = (p * freqs).sum(axis=1) / (p.sum(axis=1) + 1e-12)
        cadence = freqs[cad][p[:, cad].argmax(axis=1)]
        r = _acf(m[:, :, None], np.concatenate([[0], lags]))[:, 0]
        rn = r[:, 1:] * (n / (n - lags)) / np.maximum(r[:, :1], 1e-12)  # unbiased, normalised
        step_reg, stride_reg = rn[:, step].max(axis=1), rn[:, stride].max(axis=1)
        step_lag = lags[step][rn[:, step].argmax(axis=1)] / fs
        stride_lag = lags[stride][rn[:, stride].argmax(axis=1)] / fs
        symmetry = step_reg / np.maximum(stride_reg, 1e-3)
        out += [m.mean(axis=1), m.std(axis=1), q75 - q25, q5, q95, q95 - q5, jerk, *bands, centroid,
                cadence, step_reg, step_lag, stride_reg, stride_lag, symmetry]
    return np.stack(out, axis=1).astype(np.float32)


def acf_features_batch(windows: np.ndarray, max_lag: int = 10, variant: str = "biodeep",
                       fs: float = 100.0, stride_s: float = 1.2) -> np.ndarray:
    """(b, n, 6) SI windows -> (b, F) float32 features (see module docstring for F and order)."""
    w = np.asarray(windows, dtype=np.float32)
    if w.ndim != 3 or w.shape[2] != 6:
        raise ValueError(f"windows must be (batch, n, 6) [acc m/s², gyro rad/s], got {w.shape}")
    if variant not in ACF_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {ACF_VARIANTS}")
    if max_lag < 0:
        raise ValueError("max_lag must be >= 0")
    if variant == "magnitude":
        mags = np.stack([np.linalg.norm(w[..., :3], axis=2),
                         np.linalg.norm(w[..., 3:], axis=2)], axis=2)
        w = np.concatenate([w, mags.astype(np.float32)], axis=2)
    if variant == "gait":
        return np.concatenate([acf_features_batch(w, max_lag, "stride", fs, stride_s),
                               gait_stats_batch(w, fs)], axis=1)
    if variant == "stride":
        lags = np.unique(np.round(np.linspace(0, stride_s * fs, max_lag + 1)).astype(np.int64))
        if lags.size != max_lag + 1:
            raise ValueError(f"stride_s*fs={stride_s * fs:.1f} samples is too short for "
                             f"{max_lag + 1} distinct lags; lower max_lag or raise stride_s")
    else:
        lags = np.arange(max_lag + 1)
    r = _acf(w, lags)
    if variant in ("normalized", "stride") and max_lag > 0:
        r0 = r[:, :, :1]
        r[:, :, 1:] = np.where(r0 > 0, r[:, :, 1:] / np.where(r0 > 0, r0, 1), 0)
    return r.reshape(r.shape[0], -1).astype(np.float32, copy=False)


def acf_features(window: np.ndarray, max_lag: int = 10, variant: str = "biodeep",
                 fs: float = 100.0, stride_s: float = 1.2) -> np.ndarray:
    """(n, 6) SI window -> (acf_feature_size(max_lag, variant),) float32."""
    w = np.asarray(window, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"window must be (n, 6), got {w.shape}")
    return acf_features_batch(w[None], max_lag, variant, fs, stride_s)[0]


# ------------------------------------------------------------------------------ gait gate
@dataclass(frozen=True)
class GaitState:
    """walking: periodic gait detected; cadence_spm: steps/min (None if not walking);
    periodicity: peak normalised ACF of |acc| at stride lags (0..1, higher = more periodic)."""

    walking: bool
    cadence_spm: float | None
    periodicity: float


def detect_gait(acc: np.ndarray, fs: float, stride_lags_s: tuple[float, float] = (0.8, 1.6),
                min_std_ms2: float = 0.6, min_periodicity: float = 0.4) -> GaitState:
    """Is the person walking? ``acc`` (n, 3) in m/s² at ``fs`` Hz, n >= 2 strides advised.

    Why the magnitude: it does not depend on how the sensor is worn. Why stride lags: a stride
    (two steps) is the true period for a sensor on one leg (HuGaDB shin/thigh) and still a period
    for a waist sensor (whose step peak sits at half the stride). Walking = enough movement
    energy (std of |acc| >= ``min_std_ms2``; standing/sitting is ~0.05) AND a normalised,
    overlap-corrected ACF peak >= ``min_periodicity`` at a stride lag. Cadence = 120 / stride.
    """
    a = np.asarray(acc, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"acc must be (n, 3) m/s², got {a.shape}")
    lo, hi = (int(round(s * fs)) for s in stride_lags_s)
    n = a.shape[0]
    if n < hi + int(0.5 * fs):
        raise ValueError(f"gait detection needs >= {(hi + 0.5 * fs) / fs:.1f} s of samples "
                         f"(stride lags up to {stride_lags_s[1]} s), got {n / fs:.2f} s")
    m = np.linalg.norm(a, axis=1)
    m = m - m.mean()
    std = float(m.std())
    if std < 1e-6:
        return GaitState(False, None, 0.0)
    lags = np.arange(lo, hi + 1)
    r = _acf(m[None, :, None], np.concatenate([[0], lags]))[0, 0]
    # Unbias (each lag sums n-k products) so long lags are not penalised, then normalise.
    rn = r[1:] * (n / (n - lags)) / r[0]
    periodicity = float(np.clip(rn.max(), 0.0, 1.0))
    walking = std >= min_std_ms2 and periodicity >= min_periodicity
    cadence = 120.0 * fs / float(lags[_stride_peak(rn)]) if walking else None
    return GaitState(bool(walking), cadence, periodicity)


def _stride_peak(rn: np.ndarray, near_best: float = 0.85) -> int:
    """Index of the stride among ACF values ``rn`` at increasing lags: the shortest local
    maximum within ``near_best`` of the highest. WHY not the highest: a waist sensor repeats
    every step, so at a brisk cadence (110-135 steps/min) three steps also fall inside the
    stride lags and can peak as high as two; the argmax then gave 2/3 of the cadence (SisFall
    walking played 1.15-1.35x faster: 13 of 63 windows)."""
    inner = (rn[1:-1] >= rn[:-2]) & (rn[1:-1] >= rn[2:])
    peaks = np.flatnonzero(inner) + 1
    best = float(rn[peaks].max()) if peaks.size else 0.0
    if best <= 0.0:
        # no positive peak inside the lags (the ACF's maximum sits at an end of them): with a
        # negative best, "within 0.85 of it" selected nothing and raised IndexError, which ended
        # the IMU path on real SisFall walking (found by the throughput benchmark)
        return int(np.argmax(rn))
    return int(peaks[rn[peaks] >= near_best * best][0])


# ------------------------------------------------------------------------------ activity from motion
#: std of |acc| (m/s², one 2 s window) from which movement is vigorous (jogging, running). Chosen
#: on the SisFall training persons' waist trials: walking quickly reaches 4.3 at its 90th
#: percentile, slow jogging starts at 5.5 (10th percentile); `python -m training.eval.imu` scores
#: the rule on the held-out persons.
VIGOROUS_ACC_STD_MS2 = 5.0
#: below this nobody walks: ``detect_gait``'s own energy floor, not chosen for this rule (a check
#: on HuGaDB sitting/standing windows of all its persons: 99 % lie below 0.38)
REST_ACC_STD_MS2 = 0.6
MOTION_CLASSES = ("rest", "walking", "vigorous")
#: the activity names ``biod record --label`` accepts: those the activity model is trained on
#: (HuGaDB's, ``training.data.imu.BIOD_LABELS`` maps them to its ids)
RECORD_LABELS = ("walking", "running", "going_up", "going_down", "sitting", "standing",
                 "up_by_elevator", "down_by_elevator", "bicycling", "sitting_in_car")


def motion_activity(acc_ms2: np.ndarray, gait: GaitState) -> str | None:
    """Top-level activity from movement alone, for an IMU worn where no activity model was
    trained (the shipped one is a thigh model: on SisFall's waist walking and jogging windows it
    is right on 21 %, calling 89 % of the walking windows 'rest'). Vigorous = strong movement, walking = the gait
    detector's periodic gait, rest = stillness; anything else (a transition, fidgeting) is None,
    and the ECG alone speaks for that window."""
    a = np.asarray(acc_ms2, dtype=np.float32)
    std = float(np.linalg.norm(a, axis=1).std())
    if std >= VIGOROUS_ACC_STD_MS2:
        return "vigorous"
    if gait.walking:
        return "walking"
    if std < REST_ACC_STD_MS2:
        return "rest"
    return None
