"""Streaming multi-lead R-peak detector (Pan-Tompkins family, refined to the true R extremum).

Pipeline per chunk (vectorised; the only Python loop is over candidate peaks):

1. per lead: 0.5 Hz high-pass (kept for the refinement and amplitudes) and a 4-20 Hz QRS
   band-pass, a 5-point derivative, rectified -> the lead's slope ``f`` (Pan-Tompkins squares
   it; |slope| keeps small aberrant/ectopic beats within reach of the threshold);
2. per lead normalisation by the lead's typical QRS slope (a percentile of the maxima of the
   previous 1 s blocks, blocks aligned to absolute sample indices, so the result does not depend
   on chunking) and fusion of the *valid* leads by averaging -> ``g``; a lead that goes off is
   simply left out of the average, an inverted lead contributes the same (slopes are rectified);
3. moving-window integration (150 ms) -> ``mwi``; candidates are its local maxima over
   +-``lookahead`` (this fixes the detector's decision delay);
4. Pan-Tompkins decision logic per candidate: adaptive signal/noise peak levels and thresholds,
   200 ms refractory period, T-wave discrimination by slope (< half the previous QRS's slope
   within 360 ms), and search-back at 1.66 x the mean RR with the lower threshold;
5. refinement: the detection is moved to the extremum of the high-passed signal of the best
   lead near the steepest slope, with a per-lead polarity estimate, so that the reported sample
   is the R peak itself and not the (delayed) integrator maximum.

Every decision is taken at a sample position that does not depend on where chunks are cut,
so any chunking gives the same beats. The latency of a beat is the time between its R peak
and the last input sample of the call that emitted it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import signal
from scipy.ndimage import maximum_filter1d, minimum_filter1d

from .filters import bandpass_sos, highpass_sos
from .stats import median_axis0, median_filter_nearest

try:  # the compiled kernel behind scipy.signal.sosfilt, without its ~50 us of argument checks
    from scipy.signal._sosfilt import _sosfilt as _sosfilt_kernel
except ImportError:  # pragma: no cover - private scipy module moved: use the public function
    _sosfilt_kernel = None

__all__ = ["Beat", "RPeakDetector", "detect_rpeaks"]


def _percentile_linear(values: list[float], q: float) -> float:
    """``np.percentile(values, q)`` (method 'linear') for a short list of finite floats.

    The same arithmetic as numpy's ``_quantile`` + ``_lerp`` (virtual index ``(n-1)*q/100``,
    ``a + (b-a)*g`` below g = 0.5, ``b - (b-a)*(1-g)`` from it), hence the same bits, without
    numpy's ~60 us of per-call machinery: it runs for every lead at every block boundary.
    """
    v = sorted(values)
    n = len(v)
    vi = (n - 1) * (q / 100.0)
    i0 = min(math.floor(vi), n - 1)
    i1 = min(i0 + 1, n - 1)
    g = vi - i0
    a, b = v[i0], v[i1]
    d = b - a
    return b - d * (1.0 - g) if g >= 0.5 else a + d * g


@dataclass(frozen=True)
class Beat:
    """One detected heart beat."""

    sample: int  # absolute sample index of the R peak in the input stream (at fs)
    time_s: float  # sample / fs
    latency_s: float  # how long after the R peak the detector emitted it
    amplitude_mv: float  # high-passed signal at the R peak in the refining lead (signed)
    leads_used: int  # bitmask of the leads that contributed to the detection
    # Each lead's own R (or QS) extremum near ``sample``, one per lead, -1 for a lead that was off.
    # The beat's ``sample`` is the R of the lead with the largest deflection; on the others the
    # peak comes a few to tens of ms earlier or later (the QRS axis), which is what a lead's own
    # annotation marks.
    lead_samples: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Params:
    """Tunables, in seconds/Hz so that they hold at any sampling rate."""

    band_hz: tuple[float, float] = (4.0, 20.0)
    power: float = 1.0  # feature = |slope| ** power (Pan-Tompkins squares: 2; 1 keeps small ectopics)
    thr_frac: float = 0.40  # THR1 = NPK + thr_frac * (SPK - NPK)
    twave_ratio: float = 0.5  # T wave if its slope is below this fraction of the last QRS's
    band_order: int = 2
    feature: str = "slope"  # "slope": derivative of the band-pass; "energy": the band-pass itself
    mwi_s: float = 0.150
    lookahead_s: float = 0.250  # candidate = max of mwi within +- this
    refractory_s: float = 0.200
    twave_s: float = 0.360
    searchback_factor: float = 1.66
    block_s: float = 1.0
    scale_blocks: int = 8
    scale_percentile: float = 75.0
    learn_s: float = 2.0
    slope_back_s: float = 0.250  # steepest slope is searched in [c - this, c]
    refine_s: float = 0.090  # R extremum searched from this before the steepest slope ...
    refine_after_s: float = 0.060  # ... to this after it
    lead_peak_s: float = 0.050  # each lead's own extremum is searched within +- this of the R
    despike_s: float = 0.012  # median filter width against pacemaker spikes (refinement only)
    qs_ratio: float = 1.5  # a lead is 'negative' when its S/QS is this much deeper than R
    polarity_weight: float = 1.0 / 3.0  # opposite extremum wins when 2x larger (ectopics)
    baseline_s: float = 0.250  # isoelectric level = median over +- this around the QRS
    keep_s: float = 6.0  # history kept for search-back and refinement
    flat_s: float = 1.0  # a lead with no excursion above flat_mv within this trailing window ...
    flat_mv: float = 0.015  # ... is treated as off (electrode not attached, amplifier output pinned)
    relearn_s: float = 1.0  # after this long with every lead off, thresholds are learned again


class _StreamSos:
    """Causal SOS cascade on (n, L) float64 chunks with carried state, returning float32.

    Same arithmetic (same compiled kernel, same steady-state start on the first sample) as
    :class:`daemon.dsp.filters.SosFilter`, so outputs are bit-identical to it, but without the
    per-call validation and axis shuffling of ``scipy.signal.sosfilt``: on 50 ms frames that
    overhead cost more than the filtering itself.
    """

    def __init__(self, sos: np.ndarray, n_channels: int) -> None:
        self.sos = np.ascontiguousarray(np.asarray(sos, dtype=np.float64))
        self._zi_unit = signal.sosfilt_zi(self.sos)  # (n_sections, 2)
        self._zi: np.ndarray | None = None  # (n_channels, n_sections, 2), C-contiguous
        self._n = n_channels

    def process(self, x: np.ndarray) -> np.ndarray:
        if self._zi is None:
            zi = self._zi_unit[:, :, None] * x[0][None, None, :]
            self._zi = np.ascontiguousarray(np.moveaxis(zi, (0, 1), (-2, -1)))
        if _sosfilt_kernel is None:  # pragma: no cover
            zi = np.moveaxis(self._zi, (-2, -1), (0, 1))
            y, zi = signal.sosfilt(self.sos, x, axis=0, zi=zi)
            self._zi = np.ascontiguousarray(np.moveaxis(zi, (0, 1), (-2, -1)))
            return y.astype(np.float32)
        y = np.array(x.T, dtype=np.float64, order="C")  # the kernel filters in place
        _sosfilt_kernel(self.sos, y, self._zi)
        return y.T.astype(np.float32)


def _fir_stream(b: np.ndarray, x: np.ndarray, zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.signal.lfilter(b, [1.0], x, axis=0, zi=zi)`` for (n,) or (n, L) float64 ``x``.

    The same computation as scipy's FIR path (full convolution plus the carried state), so the
    result is bit-identical, without ``apply_along_axis`` and its per-call overhead.
    """
    m = len(b) - 1
    if x.ndim == 1:
        full = np.convolve(b, x)
    else:
        full = np.empty((x.shape[0] + m, x.shape[1]))
        for l in range(x.shape[1]):
            full[:, l] = np.convolve(b, x[:, l])
    full[:m] += zi
    return full[: x.shape[0]], full[x.shape[0]:].copy()


class _History:
    """Append-only sample history with amortised growth and O(1) trimming from the front.

    Replaces ``np.concatenate`` of the whole kept history (several seconds of samples) on every
    chunk, which made a 50 ms frame cost as much as a second's; ``view()`` is valid until the
    next ``append`` or ``drop``.
    """

    def __init__(self, shape_tail: tuple[int, ...], dtype: type) -> None:
        self._a = np.zeros((1024,) + shape_tail, dtype=dtype)
        self._lo = 0
        self._hi = 0

    def __len__(self) -> int:
        return self._hi - self._lo

    def append(self, x: np.ndarray) -> None:
        n = x.shape[0]
        if self._hi + n > self._a.shape[0]:
            size = self._hi - self._lo
            cap = max(self._a.shape[0], 2 * (size + n))
            a = np.zeros((cap,) + self._a.shape[1:], dtype=self._a.dtype)
            a[:size] = self._a[self._lo:self._hi]
            self._a, self._lo, self._hi = a, 0, size
        self._a[self._hi:self._hi + n] = x
        self._hi += n

    def drop(self, k: int) -> None:
        """Forget the first ``k`` samples."""
        self._lo = min(self._hi, self._lo + k)

    def view(self) -> np.ndarray:
        return self._a[self._lo:self._hi]


class RPeakDetector:
    """Streaming R-peak detector over ``n_leads`` simultaneously sampled ECG leads.

    ``process(x, lead_valid)`` takes raw mV samples ``(n, n_leads)`` and an optional validity mask,
    either one flag per lead for the whole chunk or one per sample ``(n, n_leads)``; invalid
    samples (lead off, saturated) are excluded from the fusion. Returns the beats decided in
    this call (in sample order); ``flush()`` decides what is still pending at the end.
    """

    def __init__(self, fs: float, n_leads: int = 1, *, params: "_Params | None" = None) -> None:
        fs = float(fs)
        if not np.isfinite(fs) or fs < 50:
            raise ValueError(f"RPeakDetector needs fs >= 50 Hz (QRS energy reaches 20-25 Hz), got {fs}")
        if int(n_leads) < 1:
            raise ValueError(f"n_leads must be >= 1, got {n_leads}")
        self.fs = fs
        self.n_leads = L = int(n_leads)
        p = self._p = params or _Params()
        s = lambda sec: max(1, int(round(sec * fs)))  # noqa: E731
        self._W = s(p.mwi_s)
        self._h = s(p.lookahead_s)
        self._refr = s(p.refractory_s)
        self._twave = s(p.twave_s)
        self._block = s(p.block_s)
        self._learn = s(p.learn_s)
        self._slope_back = s(p.slope_back_s)
        self._refine = s(p.refine_s)
        self._refine_after = s(p.refine_after_s)
        self._lead_peak = s(p.lead_peak_s)
        self._keep = s(p.keep_s)
        self._base = s(p.baseline_s)
        self._twave_g = p.twave_ratio ** p.power  # in feature units (slope ** power)
        self._despike = int(round(p.despike_s * fs)) | 1
        self._hp = _StreamSos(highpass_sos(fs, 0.5), L)
        self._bp = _StreamSos(bandpass_sos(fs, *p.band_hz, order=p.band_order), L)
        self._deriv_b = np.array([2.0, 1.0, 0.0, -1.0, -2.0]) * (fs / 8.0)
        self._deriv_zi = np.zeros((4, L))
        self._mwi_b = np.full(self._W, 1.0 / self._W)
        self._mwi_zi = np.zeros(self._W - 1)
        # Aligned history buffers; absolute index of element 0 is self._buf0.
        self._buf0 = 0
        self._xhp_h = _History((L,), np.float32)
        self._f_h = _History((L,), np.float64)  # feature per lead (raw part, may run ahead of fusion)
        self._valid_h = _History((L,), bool)
        self._g_h = _History((), np.float64)  # fused normalised feature
        self._mwi_h = _History((), np.float64)
        self._raw_end = 0  # absolute index one past the last raw sample
        self._fused_end = 0  # one past the last fused sample
        # Block statistics for normalisation.
        # Per completed block: max f per lead (nan = no valid sample), and the running max of
        # the block being fused; Python floats (a few per second, read one by one).
        self._blk_max: list[list[float]] = []
        self._cur_blk_max = [-math.inf] * L
        self._blk_offset = 0  # absolute block index of _blk_max[0]
        self._startup_scale = np.full(L, np.nan)
        self._startup_end = 0
        self._scale_cache: tuple[int, np.ndarray] = (-1, np.full(L, np.nan))
        self._scale_use_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # Decision state.
        self._frontier = 0  # candidates < frontier have been examined
        self._learned = False
        self._spk = 0.0
        self._npk = 0.0
        self._last_c = None  # mwi position of the last beat
        self._last_slope = 0.0
        self._rr: list[int] = []
        self._sb_deadline: int | None = None
        self._default_rr = int(round(0.8 * fs))
        self._pending: list[tuple[int, float]] = []  # rejected candidates since the last beat
        self._last_r = -(10**12)
        self._to_refine: list[int] = []  # accepted mwi peaks of this call, refined at its end
        self._polarity = np.zeros(L)  # running polarity vote per lead
        # Flat-lead detection and re-learning after every lead was off (electrodes put on).
        self._flat_w = s(p.flat_s) | 1
        self._flat_tail = np.zeros((0, L), dtype=np.float32)
        self._relearn = s(p.relearn_s)
        self._dead_run = 0  # consecutive fused samples with no usable lead
        self._revives: list[int] = []  # first usable samples after dead runs >= relearn, in order
        self._learn_start = 0

    # Views of the aligned histories (element 0 is absolute sample ``_buf0``).
    _xhp = property(lambda self: self._xhp_h.view())
    _f = property(lambda self: self._f_h.view())
    _valid = property(lambda self: self._valid_h.view())
    _g = property(lambda self: self._g_h.view())
    _mwi = property(lambda self: self._mwi_h.view())

    # ------------------------------------------------------------------ public API
    def process(self, x: np.ndarray, lead_valid: np.ndarray | None = None) -> list[Beat]:
        x = self._check_chunk(x)
        n = x.shape[0]
        valid = self._check_valid(lead_valid, n)
        if n:
            self._ingest(x, valid)
        return self._decide(final=False)

    def process_checked(self, x: np.ndarray, valid: np.ndarray) -> list[Beat]:
        """:meth:`process` for a caller that has already validated its input (the ECG
        pipeline): ``x`` (n, n_leads) finite float32 or float64, ``valid`` (n, n_leads) bool.
        The same result, without checking the same chunk twice on every push."""
        if x.shape[0]:
            self._ingest(x.astype(np.float64), valid)
        return self._decide(final=False)

    def flush(self) -> list[Beat]:
        """Decide everything still pending (end of stream); later calls start from here."""
        self._fuse(force=True)
        return self._decide(final=True)

    # ------------------------------------------------------------------ input checks
    def _check_chunk(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1 and self.n_leads == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.n_leads:
            raise ValueError(
                f"RPeakDetector.process: expected (n_samples, {self.n_leads}) mV samples, got shape "
                f"{x.shape}; one column per lead"
            )
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError(
                "RPeakDetector.process: non-finite samples; replace them (e.g. by 0) and mark "
                "them invalid with lead_valid instead"
            )
        return x

    def _check_valid(self, lead_valid: np.ndarray | None, n: int) -> np.ndarray:
        if lead_valid is None:
            return np.ones((n, self.n_leads), dtype=bool)
        v = np.asarray(lead_valid, dtype=bool)
        if v.shape == (self.n_leads,):
            return np.broadcast_to(v, (n, self.n_leads))
        if v.shape == (n, self.n_leads):
            return v
        raise ValueError(
            f"lead_valid must have shape ({self.n_leads},) or ({n}, {self.n_leads}), got {v.shape}"
        )

    # ------------------------------------------------------------------ feature stage
    def _flat(self, x: np.ndarray) -> np.ndarray:
        """(n, L) True where a lead has had no excursion above ``flat_mv`` in the trailing
        ``flat_s``: such a lead carries no ECG (an unattached electrode, a pinned amplifier),
        and treating it as valid would normalise noise up to QRS size and invent beats."""
        W = self._flat_w
        full = self._flat_tail.shape[0] == W - 1  # every window below lies wholly inside z
        z = np.concatenate([self._flat_tail, x.astype(np.float32)])
        self._flat_tail = z[-(W - 1):]
        # Fast exact path: once the tail is full, every trailing W-window ending in this chunk
        # contains a whole block of B <= (W+1)/2 consecutive samples of z, and its range is at
        # least that block's; so when every block's range reaches flat_mv, no sample is flat
        # (the usual case), without the two running filters.
        B = (W + 1) // 2
        nb = z.shape[0] // B
        if full and nb:
            blocks = z[:nb * B].reshape(nb, B, z.shape[1])
            if not ((blocks.max(axis=1) - blocks.min(axis=1)) < self._p.flat_mv).any():
                return np.zeros(x.shape, dtype=bool)
        mx = maximum_filter1d(z, size=W, axis=0, origin=(W - 1) // 2, mode="nearest")
        mn = minimum_filter1d(z, size=W, axis=0, origin=(W - 1) // 2, mode="nearest")
        return (mx - mn)[-x.shape[0]:] < self._p.flat_mv

    def _ingest(self, x: np.ndarray, valid: np.ndarray) -> None:
        valid = valid & ~self._flat(x)
        xhp = self._hp.process(x)
        bp = self._bp.process(x).astype(np.float64)
        if self._p.feature == "slope":
            d, self._deriv_zi = _fir_stream(self._deriv_b, bp, self._deriv_zi)
        else:
            d = bp
        f = d * d if self._p.power == 2.0 else np.abs(d) ** self._p.power
        self._xhp_h.append(xhp)
        self._f_h.append(f)
        self._valid_h.append(valid)
        self._raw_end += x.shape[0]
        self._fuse()

    def _scale_for_block(self, k: int) -> np.ndarray:
        """Per-lead typical QRS slope from the previous blocks (nan where a lead has no history)."""
        if self._scale_cache[0] == k:
            return self._scale_cache[1]
        kk = k - self._blk_offset
        hist = self._blk_max[max(0, kk - self._p.scale_blocks):max(0, kk)]
        if not hist:
            return np.full(self.n_leads, np.nan)
        q = self._p.scale_percentile
        vals = [[b[l] for b in hist if math.isfinite(b[l])] for l in range(self.n_leads)]
        out = np.array([_percentile_linear(v, q) if v else math.nan for v in vals])
        self._scale_cache = (k, out)
        return out

    def _fuse(self, force: bool = False) -> None:
        """Normalise each lead's slope by its block scale, average the usable leads, integrate.

        The learning period (stream start, or after every lead was off) goes one block at a
        time; otherwise every block from the fusion frontier to the newest sample is fused in
        one vectorised pass: the scale of block k needs only the maxima of blocks < k, which
        the feature itself gives, so they are recorded first."""
        B = self._block
        while self._fused_end < self._raw_end:
            a = self._fused_end
            k = a // B
            learning = k * B < self._startup_end
            scale = self._startup_scale if learning else self._scale_for_block(k)
            if not np.isfinite(scale).any():
                # No lead has history (stream start or all leads were off): normalise by the
                # maxima of this and the next blocks (a learning period long enough to hold a
                # beat even at 40 bpm), which delays the first decisions by that much.
                span_end = k * B + self._learn
                if self._raw_end < span_end and not force:
                    break
                sl = slice(k * B - self._buf0, min(span_end, self._raw_end) - self._buf0)
                fm = np.where(self._valid[sl], self._f[sl], -np.inf).max(axis=0)
                scale = np.where(np.isfinite(fm), fm, np.nan)
                self._startup_scale, self._startup_end = scale, span_end
                learning = True
            last = min((k + 1) * B, self._raw_end) if learning else self._raw_end
            sl = slice(a - self._buf0, last - self._buf0)
            fv = np.where(self._valid[sl], self._f[sl], -np.inf)
            if last <= (k + 1) * B:  # within one block (small pushes): no reduceat set-up
                fms = fv.max(axis=0, keepdims=True)
            else:
                starts = np.arange(k * B, last, B)
                starts[0] = a
                fms = np.maximum.reduceat(fv, starts - a, axis=0)
            ends, scales = [], []
            for i, fm in enumerate(fms.tolist()):  # one short step per 1 s block
                blk_end = (k + i + 1) * B
                ends.append(min(blk_end, last))
                scales.append(scale)
                # np.maximum in floats (nan propagates), then non-finite -> nan
                self._cur_blk_max = [u if u >= v or u != u else v
                                     for u, v in zip(self._cur_blk_max, fm)]
                if ends[-1] == blk_end:
                    cur = self._cur_blk_max
                    self._blk_max.append([u if math.isfinite(u) else math.nan for u in cur])
                    self._cur_blk_max = [-math.inf] * self.n_leads
                    if len(self._blk_max) > 4 * self._p.scale_blocks:  # bounded memory
                        drop = len(self._blk_max) - 2 * self._p.scale_blocks
                        self._blk_max = self._blk_max[drop:]
                        self._blk_offset += drop
                if ends[-1] == last:
                    break
                scale = self._scale_for_block(k + i + 1)
                if not np.isfinite(scale).any():  # every lead was off for scale_blocks
                    break
            self._fuse_span(a, ends, scales)

    def _fuse_span(self, a: int, ends: list[int], scales: list[np.ndarray]) -> None:
        """Fuse samples ``a`` .. ``ends[-1]``; block i (ending at ``ends[i]``) uses ``scales[i]``."""
        b = ends[-1]
        sl = slice(a - self._buf0, b - self._buf0)
        f, v = self._f[sl], self._valid[sl]
        if len(ends) == 1:
            lead_ok, safe = self._scale_use(scales[0])
        else:
            sc = np.stack(scales)
            lead_ok = np.isfinite(sc) & (sc > 0)
            lens = np.diff(np.asarray([a] + ends))
            safe = np.repeat(np.where(lead_ok, sc, 1.0), lens, axis=0)
            lead_ok = np.repeat(lead_ok, lens, axis=0)
        use = v & lead_ok
        num = np.where(use, f / safe, 0.0).sum(axis=1)
        cnt = use.sum(axis=1)
        self._track_dead(a, cnt)
        g = num / np.maximum(cnt, 1)
        mwi, self._mwi_zi = _fir_stream(self._mwi_b, g, self._mwi_zi)
        self._g_h.append(g)
        self._mwi_h.append(mwi)
        self._fused_end = b

    def _scale_use(self, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(leads with a usable scale (1, L), divisor (1, L)) for ``scale``; cached because the
        scale changes once per block while small pushes fuse a piece of a block each."""
        c = self._scale_use_cache
        if c is not None and c[0] is scale:
            return c[1], c[2]
        ok = np.isfinite(scale) & (scale > 0)
        safe = np.where(ok, scale, 1.0)
        self._scale_use_cache = (scale, ok[None, :], safe[None, :])
        return ok[None, :], safe[None, :]

    def _track_dead(self, a: int, cnt: np.ndarray) -> None:
        """Remember each place where usable ECG resumes after every lead was off for
        ``relearn_s``: the thresholds learned on the previous wearer (or on nothing) must not
        judge the new signal. ``cnt``: usable leads per fused sample from absolute sample ``a``."""
        if cnt.all():  # every sample has a usable lead (the usual case): same as below
            if cnt.size:
                if self._dead_run >= self._relearn:
                    self._revives.append(a)
                self._dead_run = 0
            return
        alive = np.flatnonzero(cnt > 0)
        if alive.size == 0:
            self._dead_run += len(cnt)
            return
        if self._dead_run + alive[0] >= self._relearn:
            self._revives.append(a + int(alive[0]))
        self._dead_run = len(cnt) - 1 - int(alive[-1])
        # dead runs inside this segment count too, each of them
        gaps = np.diff(alive) - 1
        for j in np.flatnonzero(gaps >= self._relearn).tolist():
            self._revives.append(a + int(alive[j + 1]))

    def _restart_learning(self, at: int) -> None:
        self._learned = False
        self._learn_start = at
        self._rr = []
        self._last_c = None
        self._pending = []
        self._sb_deadline = None
        self._frontier = max(self._frontier, at)

    # ------------------------------------------------------------------ decision stage
    def _decide(self, final: bool) -> list[Beat]:
        """Decide the candidates the fused feature now allows, then refine and emit them.

        Each place where usable ECG resumed after every lead was off for ``relearn_s`` ends one
        stretch of decisions: what lies before it is decided with the thresholds of then (a
        small push would have decided it before the leads came back), and learning starts again
        from it. So a push holding a whole dead stretch, or several, gives the beats that pushes
        of any other size give."""
        beats: list[Beat] = []
        for at in self._revives:
            if at > self._learn_start:
                self._decide_until(at, False, beats)
                self._restart_learning(at)
        self._revives = []
        self._decide_until(self._fused_end, final, beats)
        self._emit(beats)
        self._trim()
        return beats

    def _decide_until(self, limit: int, final: bool, beats: list[Beat]) -> None:
        """Examine the candidates of the fused feature up to ``limit`` (not beyond the lookahead
        before it unless ``final``), learning the thresholds first where they are not yet."""
        if not self._learned:
            if limit >= self._learn_start + self._learn or (final and limit > self._learn_start):
                lo = max(self._learn_start, self._buf0)
                m = self._mwi[lo - self._buf0: min(self._learn_start + self._learn, limit) - self._buf0]
                self._spk = 0.5 * float(m.max())
                self._npk = 0.5 * float(m.mean())
                self._learned = True
            else:
                return
        end = limit if final else limit - self._h
        if end > self._frontier:
            lo = max(self._buf0, self._frontier - self._h)
            seg = self._mwi[lo - self._buf0: limit - self._buf0]
            mx = maximum_filter1d(seg, size=2 * self._h + 1, mode="constant", cval=-np.inf)
            rising = np.empty(seg.shape[0], dtype=bool)  # seg > previous sample (-inf before)
            rising[:1] = seg[:1] > -np.inf
            np.greater(seg[1:], seg[:-1], out=rising[1:])
            is_pk = (seg >= mx) & rising & (seg > 0)
            pos = np.flatnonzero(is_pk) + lo
            pos = pos[(pos >= self._frontier) & (pos < end)]
            for c in pos:
                self._searchback(int(c), beats)
                self._candidate(int(c), float(self._mwi[c - self._buf0]), beats)
            self._frontier = end
            self._searchback(end, beats)

    def _thresholds(self) -> tuple[float, float]:
        thr1 = self._npk + self._p.thr_frac * (self._spk - self._npk)
        return thr1, 0.5 * thr1

    def _slope(self, c: int) -> float:
        a = max(self._buf0, c - self._slope_back)
        return float(self._g[a - self._buf0: c + 1 - self._buf0].max())

    def _candidate(self, c: int, v: float, beats: list[Beat]) -> None:
        if self._last_c is not None and c - self._last_c < self._refr:
            return
        thr1, _ = self._thresholds()
        if v > thr1:
            if self._is_twave(c):
                self._npk = 0.125 * v + 0.875 * self._npk
                return
            self._spk = 0.125 * v + 0.875 * self._spk
            self._accept(c, beats)
        else:
            self._npk = 0.125 * v + 0.875 * self._npk
            self._pending.append((c, v))

    def _is_twave(self, c: int) -> bool:
        if self._last_c is None or c - self._last_c >= self._twave:
            return False
        return self._slope(c) < self._twave_g * self._last_slope

    def _searchback(self, now: int, beats: list[Beat]) -> None:
        """Look back with the lower threshold once 1.66 x RR passed without a beat.

        If nothing qualifies, the signal level is halved and the next look-back is one RR
        later: after a sudden drop in QRS amplitude (electrode contact, posture) the detector
        recovers within a few beats instead of staying deaf.
        """
        while True:
            anchor = self._last_c if self._last_c is not None else 0
            # == float(np.mean(self._rr)): integer sum (exact) over count, correctly rounded
            rr = sum(self._rr) / len(self._rr) if self._rr else self._default_rr
            if self._sb_deadline is None:
                self._sb_deadline = anchor + int(self._p.searchback_factor * rr)
            if now <= self._sb_deadline:
                return
            _, thr2 = self._thresholds()
            best = None
            for c, v in self._pending:
                # Only the last keep_s before the deadline: older history may already be
                # trimmed, and when depends on chunking; this bound does not.
                if self._sb_deadline - self._keep <= c <= self._sb_deadline and c - anchor >= self._refr and v > thr2:
                    if self._is_twave(c):
                        continue
                    if best is None or v > best[1]:
                        best = (c, v)
            if best is None:
                self._spk *= 0.5
                self._npk *= 0.5
                self._sb_deadline += int(rr)
                continue
            self._spk = 0.25 * best[1] + 0.75 * self._spk
            rest = [(c, v) for c, v in self._pending if c > best[0]]
            self._accept(best[0], beats)
            self._pending = rest

    def _accept(self, c: int, beats: list[Beat]) -> None:
        slope = self._slope(c)
        if self._last_c is not None:
            rr = c - self._last_c
            self._rr.append(rr)
            if len(self._rr) > 8:
                self._rr.pop(0)
        self._last_c = c
        self._last_slope = slope
        self._pending = []
        self._sb_deadline = None
        # The refinement feeds no decision (only the reported sample, amplitude and the
        # polarity votes, which only the refinement reads): it runs for every beat accepted in
        # this call at once, in acceptance order, before the history is trimmed (_emit).
        self._to_refine.append(c)

    def _emit(self, beats: list[Beat]) -> None:
        """Refine the beats accepted in this call and append them to ``beats`` (in order)."""
        cs = self._to_refine
        if not cs:
            return
        self._to_refine = []
        refined = self._refine_many(cs) if len(cs) > 1 else None
        if refined is None:
            refined = [self._refine_r(c) for c in cs]
        for r, amp, leads, per_lead in refined:
            if r <= self._last_r:
                continue
            self._last_r = r
            beats.append(
                Beat(
                    sample=int(r),
                    time_s=r / self.fs,
                    latency_s=(self._raw_end - 1 - r) / self.fs,
                    amplitude_mv=float(amp),
                    leads_used=leads,
                    lead_samples=per_lead,
                )
            )

    def _refine_many(self, cs: list[int]) -> list[tuple[int, float, int, tuple[int, ...]]] | None:
        """:meth:`_refine_r` for several beats (in order) with one array call per step for all
        of them instead of one per beat: the same elements through the same element-wise
        operations (gathers, the despiking network along the beat axis, per-beat partitions,
        max/min/argmax per row), so the same bits. None when some beat's windows are clipped by
        the history or the decision limit (stream start, flush): then per beat."""
        b0 = self._buf0
        B, R, RA, SB, d = self._base, self._refine, self._refine_after, self._slope_back, self._despike
        if R > B or RA > B or (self._despike > 1 and 2 * B + 1 <= self._despike):
            return None
        c = np.asarray(cs, dtype=np.int64)
        if int(c[0]) - SB < b0:
            return None
        g = self._g[(c - SB - b0)[:, None] + np.arange(SB + 1)]
        q = c - SB + g.argmax(axis=1)
        lim = np.minimum(self._raw_end, c + self._h + 1)
        if int(q.min()) - B < b0 or ((q + B + 1) > lim).any():
            return None
        xhp = self._xhp
        wide = xhp[(q - B - b0)[:, None] + np.arange(2 * B + 1)].astype(np.float64)
        if self._despike > 1:
            wide = median_filter_nearest(wide, self._despike, axis=1)
        n = wide.shape[1]
        base = np.partition(wide, (n // 2, n - 1), axis=1)[:, n // 2] + 0.0
        xs = wide[:, B - R: B + RA + 1] - base[:, None, :]
        lo = q - R
        hi = q + RA + 1
        L = self.n_leads
        lo0, hi0 = int(lo.min()), int(hi.max())
        if self._valid[lo0 - b0: hi0 - b0].all():
            oks = [[True] * L] * len(cs)
        else:
            vs = self._valid[(lo - b0)[:, None] + np.arange(R + RA + 1)]
            all_ok, any_ok = vs.all(axis=1).tolist(), vs.any(axis=1).tolist()
            oks = []
            for a_ok, y_ok in zip(all_ok, any_ok):
                oks.append(a_ok if any(a_ok) else (y_ok if any(y_ok) else [True] * L))
        pos_all = xs.max(axis=1).tolist()
        neg_all = (-xs.min(axis=1)).tolist()
        bests, signs, used = [], [], []
        for ok, pos, neg in zip(oks, pos_all, neg_all):  # beat after beat: the votes carry over
            u, best, lead_signs = self._pick_lead(ok, pos, neg)
            used.append(u)
            bests.append(best)
            signs.append(lead_signs)
        nb = len(cs)
        rows = np.arange(nb)
        best_a = np.asarray(bests, dtype=np.intp)
        signs_a = np.asarray(signs)
        sign_a = signs_a[rows, best_a]
        i = (sign_a[:, None] * xs[rows, :, best_a]).argmax(axis=1)
        h = d // 2
        # the unfiltered extremum within h samples, clipped to [lo, hi): repeated edge indices
        # lie before (at lo) or after (at hi - 1) the samples they repeat, so the first maximum
        # is the one argmax over the clipped span finds
        idx = np.clip((lo + i)[:, None] + np.arange(-h, h + 1), lo[:, None], (hi - 1)[:, None])
        raw = xhp[idx - b0, best_a[:, None]]
        j = idx[rows, (sign_a[:, None] * raw).argmax(axis=1)]
        amps = (xhp[j - b0, best_a] - base[rows, best_a]).tolist()
        per_lead = self._lead_samples(j, base, signs_a, np.asarray(oks, dtype=bool), best_a, lim)
        return list(zip(j.tolist(), amps, used, per_lead))

    def _pick_lead(self, ok: list[bool], pos: list[float], neg: list[float]) -> tuple[int, int, list[float]]:
        """One beat's refining lead and polarities, from each lead's largest positive (``pos``)
        and negative (``neg``) deflection; updates the running polarity votes of the usable
        leads (``ok``). Returns (bitmask of the leads used, best lead, per lead +1 for R or -1
        for S/QS).

        Per lead in plain floats (the same IEEE double arithmetic as numpy's; a handful of
        leads per beat, where array calls cost more than the arithmetic)."""
        qs, w = self._p.qs_ratio, self._p.polarity_weight
        polarity = self._polarity
        best, best_amp = -1, -math.inf
        for l in range(self.n_leads):
            if ok[l]:
                # +1 when R dominates, -1 when S/QS clearly dominates (neg > 1.5 pos).
                vote = -1.0 if neg[l] > qs * pos[l] else 1.0
                polarity[l] = vote if polarity[l] == 0 else 0.9 * polarity[l] + 0.1 * vote
                amp = max(pos[l], neg[l])
                if amp > best_amp:  # first of equal amplitudes, as argmax
                    best, best_amp = l, amp
        if best < 0:  # cannot happen (some lead is always taken as ok); argmax of all -inf is 0
            best = 0
        # The lead's polarity weighs this beat's two extrema: with a confident estimate the
        # opposite one must be (1 + k) / (1 - k) = 2x larger to win; with an uncertain one
        # (mixed ectopic/normal morphologies) the larger extremum wins.
        signs = []
        for l in range(self.n_leads):
            k = w * min(1.0, max(-1.0, float(polarity[l])))
            signs.append(1.0 if pos[l] * (1.0 + k) >= neg[l] * (1.0 - k) else -1.0)
        return sum(1 << l for l in range(self.n_leads) if ok[l]), best, signs

    def _lead_samples(self, j: np.ndarray, base: np.ndarray, signs: np.ndarray, ok: np.ndarray,
                      best: np.ndarray, lim: np.ndarray) -> list[tuple[int, ...]]:
        """Each lead's own R for beats whose R (of lead ``best``) is at ``j`` (nb,): the
        extremum in the lead's polarity ``signs`` (nb, L) within +-lead_peak_s of ``j``, despiked
        and then exact on the unfiltered signal as in the refinement; ``base`` (nb, L) is the
        isoelectric level. -1 for leads not ``ok``; the best lead's is ``j`` itself. Samples at
        or past ``lim`` (the decision point) are never read, so chunking cannot change it."""
        b0, P, d = self._buf0, self._lead_peak, self._despike
        h = d // 2
        lo = np.maximum(b0, j - P - h)
        hi = np.minimum(lim, j + P + h + 1)
        idx = np.clip(j[:, None] + np.arange(-P - h, P + h + 1), lo[:, None], (hi - 1)[:, None])
        seg = self._xhp[idx - b0].astype(np.float64)  # (nb, 2(P + h) + 1, L)
        ds = median_filter_nearest(seg, d, axis=1) if d > 1 else seg
        core = (ds[:, h: h + 2 * P + 1] - base[:, None, :]) * signs[:, None, :]
        i = core.argmax(axis=1) + h  # (nb, L), in seg's index
        raw = np.take_along_axis(seg, i[:, None, :] + np.arange(-h, h + 1)[None, :, None], axis=1)
        k = (raw * signs[:, None, :]).argmax(axis=1) + i - h
        out = np.take_along_axis(idx, k, axis=1)  # idx is the same for every lead
        out = np.where(ok, out, -1)
        out[np.arange(j.size), best] = j
        return [tuple(r) for r in out.tolist()]

    def _refine_r(self, c: int) -> tuple[int, float, int, tuple[int, ...]]:
        """Move the detection at mwi peak ``c`` to the R extremum of the high-passed signal.

        The steepest fused slope before ``c`` locates the QRS; within +-refine_s of it the R
        peak is the extremum of the lead with the largest deflection, in the lead's running
        polarity (biased to positive: an RS complex is marked at R unless S clearly dominates),
        or the opposite extremum when that is twice as large in this beat (ectopic beats with
        inverted QRS). A short median filter first removes pacemaker spikes, which are
        narrower than any QRS and would otherwise attract the extremum.
        """
        b0 = self._buf0
        a = max(b0, c - self._slope_back)
        g = self._g[a - b0: c + 1 - b0]
        q = a + int(np.argmax(g))
        lo = max(b0, q - self._refine)
        # Only samples up to the decision point c + lookahead: how far the raw stream runs
        # ahead depends on chunking, and the result must not.
        lim = min(self._raw_end, c + self._h + 1)
        hi = min(lim, q + self._refine_after + 1)
        wlo = max(b0, q - self._base)
        whi = min(lim, q + self._base + 1)
        wide = self._xhp[wlo - b0: whi - b0].astype(np.float64)
        if self._despike > 1 and wide.shape[0] > self._despike:
            wide = median_filter_nearest(wide, self._despike)
        base = median_axis0(wide)
        xs = wide[lo - wlo: hi - wlo] - base[None, :]
        vs = self._valid[lo - b0: hi - b0]
        lead_ok = vs.all(axis=0) if vs.size else np.zeros(self.n_leads, bool)
        if not lead_ok.any():
            lead_ok = vs.any(axis=0) if vs.size else np.ones(self.n_leads, bool)
            if not lead_ok.any():
                lead_ok[:] = True
        pos = xs.max(axis=0).tolist()
        neg = (-xs.min(axis=0)).tolist()
        leads_used, best, signs = self._pick_lead(lead_ok.tolist(), pos, neg)
        sign = signs[best]
        i = int(np.argmax(sign * xs[:, best]))
        # The median flattens the very top of R: take the exact extremum of the unfiltered
        # signal within the filter's half width of the despiked one.
        d = self._despike // 2
        raw = self._xhp[max(lo, lo + i - d) - b0: min(hi, lo + i + d + 1) - b0, best]
        j = max(lo, lo + i - d) + int(np.argmax(sign * raw))
        per_lead = self._lead_samples(np.array([j]), base[None, :], np.asarray([signs]), lead_ok[None, :],
                                      np.array([best]), np.array([lim]))[0]
        return j, float(self._xhp[j - b0, best] - base[best]), leads_used, per_lead

    def _trim(self) -> None:
        """Drop history no decision can need any more (bounded memory on endless streams)."""
        need = min(self._frontier, self._fused_end) - self._keep
        if self._last_c is not None:
            # Keep back to the last beat, but never more than 2 x keep_s: a stream with no
            # beats for minutes (all leads off) must not grow.
            need = max(min(need, self._last_c - self._slope_back - self._refine), need - self._keep)
        if need - self._buf0 > self._keep:
            k = need - self._buf0
            for h in (self._xhp_h, self._f_h, self._valid_h, self._g_h, self._mwi_h):
                h.drop(k)
            self._buf0 = need
            self._pending = [(c, v) for c, v in self._pending if c >= need + self._slope_back]


def detect_rpeaks(
    x: np.ndarray, fs: float, lead_valid: np.ndarray | None = None, chunk: int | None = None,
    per_lead: bool = False,
) -> np.ndarray:
    """Batch convenience: run the streaming detector over a whole recording.

    ``x`` is (n,) or (n, n_leads) in mV; ``lead_valid`` is None, (n_leads,) or (n, n_leads);
    ``chunk`` is the chunk size fed to the detector (None: one second). Returns R-peak sample
    indices (int64, increasing), or with ``per_lead`` each beat's R in every lead
    (``Beat.lead_samples``, shape (n_beats, n_leads), -1 where a lead was off).
    """
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    det = RPeakDetector(fs, x.shape[1])
    step = int(chunk) if chunk else max(1, int(round(fs)))
    per_sample = lead_valid is not None and np.asarray(lead_valid).ndim == 2
    out: list[Beat] = []
    for i in range(0, x.shape[0], step):
        lv = np.asarray(lead_valid)[i:i + step] if per_sample else lead_valid
        out.extend(det.process(x[i:i + step], lv))
    out.extend(det.flush())
    if per_lead:
        return np.array([b.lead_samples for b in out], dtype=np.int64).reshape(len(out), x.shape[1])
    return np.array([b.sample for b in out], dtype=np.int64)
