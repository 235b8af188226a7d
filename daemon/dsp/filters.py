"""Streaming (chunk-invariant) IIR filters and a stateful rational resampler for ECG.

Why streaming: the daemon receives the ECG in arbitrary serial frames, and training replays
whole recordings; both must see *the same samples*. Every class here carries its state between
``process`` calls, so that cutting a stream into chunks of any size gives the same output as one
call over the whole stream (bit-identical for the IIR filters, float tolerance for the
resampler). Input and output are float32 ``(n_samples, n_channels)``; state is float64 so that
long streams do not drift.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy import signal

try:  # the compiled kernel behind scipy.signal.sosfilt, without its ~50 us of argument checks
    from scipy.signal._sosfilt import _sosfilt as _sosfilt_kernel
except ImportError:  # pragma: no cover - private scipy module moved: use the public function
    _sosfilt_kernel = None

__all__ = [
    "SosFilter",
    "highpass_sos",
    "notch_sos",
    "bandpass_sos",
    "EcgConditioner",
    "StreamResampler",
]


def _as_2d(x: np.ndarray, n_channels: int, who: str) -> np.ndarray:
    """Validate a chunk: (n,) for one channel or (n, n_channels). Bad shapes fail loudly."""
    x = np.asarray(x)
    if x.ndim == 1 and n_channels == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != n_channels:
        raise ValueError(
            f"{who}: expected a chunk of shape (n_samples, {n_channels}), got {x.shape}; "
            f"pass samples along axis 0 and one column per channel"
        )
    if x.dtype.kind not in "iufc":  # np.issubdtype(x.dtype, np.number), a tenth of the cost
        raise TypeError(f"{who}: expected numeric samples, got dtype {x.dtype}")
    return x


def _check_fs(fs: float) -> float:
    fs = float(fs)
    if not np.isfinite(fs) or fs <= 0:
        raise ValueError(f"sampling rate must be a positive number of Hz, got {fs!r}")
    return fs


class SosFilter:
    """A cascade of second-order sections applied causally with carried state.

    The state is initialised on the first chunk to the steady state for that chunk's first
    sample (``sosfilt_zi * x[0]``), so a DC offset of the electrodes does not ring through the
    high-pass for seconds at start-up. ``init="zeros"`` gives the textbook zero state instead.
    """

    def __init__(self, sos: np.ndarray, n_channels: int, *, init: str = "steady") -> None:
        sos = np.atleast_2d(np.asarray(sos, dtype=np.float64))
        if sos.ndim != 2 or sos.shape[1] != 6 or sos.shape[0] < 1:
            raise ValueError(f"sos must have shape (n_sections, 6), got {sos.shape}")
        if int(n_channels) < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        if init not in ("steady", "zeros"):
            raise ValueError(f"init must be 'steady' or 'zeros', got {init!r}")
        self.sos = np.ascontiguousarray(sos)
        self.n_channels = int(n_channels)
        self._init = init
        self._zi_unit = signal.sosfilt_zi(sos)  # (n_sections, 2) for a unit step
        self._zi: np.ndarray | None = None  # (n_channels, n_sections, 2), C-contiguous

    def reset(self) -> None:
        """Forget the past: the next chunk starts a new stream."""
        self._zi = None

    def process(self, x: np.ndarray) -> np.ndarray:
        x = _as_2d(x, self.n_channels, "SosFilter.process")
        if x.shape[0] == 0:
            return np.zeros((0, self.n_channels), dtype=np.float32)
        if _sosfilt_kernel is None or x.dtype.kind == "c":  # pragma: no cover
            return self._process_public(x)
        # Same compiled kernel and data as scipy.signal.sosfilt(axis=0) uses internally (time
        # on the last axis, state (channels, sections, 2)), so bit-identical, without its
        # per-call validation and axis shuffling, which cost more than 200 ms of filtering.
        if self._zi is None:
            first = x[0].astype(np.float64) if self._init == "steady" else np.zeros(self.n_channels)
            self._zi = np.ascontiguousarray(
                (self._zi_unit[:, :, None] * first[None, None, :]).transpose(2, 0, 1))
        y = np.array(x.T, dtype=np.float64, order="C")  # the kernel filters in place
        _sosfilt_kernel(self.sos, y, self._zi)
        return y.T.astype(np.float32)

    def _process_public(self, x: np.ndarray) -> np.ndarray:
        xd = x.astype(np.float64, copy=False)
        if self._zi is None:
            first = xd[0] if self._init == "steady" else np.zeros(self.n_channels)
            self._zi = np.ascontiguousarray(
                (self._zi_unit[:, :, None] * first[None, None, :]).transpose(2, 0, 1))
        y, zi = signal.sosfilt(self.sos, xd, axis=0, zi=self._zi.transpose(1, 2, 0))
        self._zi = np.ascontiguousarray(zi.transpose(2, 0, 1))
        return y.astype(np.float32)


def highpass_sos(fs: float, cutoff_hz: float = 0.5, order: int = 2) -> np.ndarray:
    """Butterworth high-pass removing baseline wander (respiration, electrode drift).

    0.5 Hz (AHA diagnostic-band lower edge) with a low order keeps ST/QRS morphology: the
    phase shift at QRS frequencies is well under one sample.
    """
    fs = _check_fs(fs)
    if not 0 < cutoff_hz < fs / 2:
        raise ValueError(f"high-pass cutoff must be in (0, {fs / 2}) Hz, got {cutoff_hz}")
    return signal.butter(order, cutoff_hz, btype="highpass", fs=fs, output="sos")


def notch_sos(fs: float, mains_hz: float = 50.0, harmonics: bool = True, q: float = 30.0) -> np.ndarray:
    """IIR notch at the mains frequency (50 or 60 Hz) and, optionally, its harmonics < Nyquist.

    Harmonics within 2 % of Nyquist are skipped: a notch there is numerically ill-posed and
    removes nothing the anti-alias filter of the front end left.
    """
    fs = _check_fs(fs)
    if mains_hz <= 0 or mains_hz >= fs / 2:
        raise ValueError(
            f"mains frequency {mains_hz} Hz must be in (0, {fs / 2}) Hz for fs={fs} Hz; "
            f"use 50 or 60, or disable the notch (mains_hz=None) for low sampling rates"
        )
    freqs = [mains_hz]
    if harmonics:
        k = 2
        while k * mains_hz < 0.98 * fs / 2:
            freqs.append(k * mains_hz)
            k += 1
    sections = []
    for f in freqs:
        b, a = signal.iirnotch(f, q, fs=fs)
        sections.append(signal.tf2sos(b, a))
    return np.concatenate(sections, axis=0)


def bandpass_sos(fs: float, low_hz: float, high_hz: float, order: int = 2) -> np.ndarray:
    """Butterworth band-pass (e.g. 5-20 Hz: where QRS energy dominates P/T waves and noise)."""
    fs = _check_fs(fs)
    if not 0 < low_hz < high_hz < fs / 2:
        raise ValueError(
            f"band-pass edges must satisfy 0 < low < high < fs/2={fs / 2} Hz, got {low_hz}, {high_hz}"
        )
    return signal.butter(order, [low_hz, high_hz], btype="bandpass", fs=fs, output="sos")


class EcgConditioner:
    """High-pass (baseline wander) + mains notch: the signal that beat windows and models see.

    ``mains_hz=None`` disables the notch (e.g. a battery device or a rate too low for it).
    """

    def __init__(
        self,
        fs: float,
        n_channels: int,
        mains_hz: float | None = 50.0,
        highpass_hz: float = 0.5,
    ) -> None:
        self.fs = _check_fs(fs)
        self.n_channels = int(n_channels)
        parts = [highpass_sos(self.fs, highpass_hz)]
        if mains_hz is not None:
            parts.append(notch_sos(self.fs, mains_hz))
        self._filter = SosFilter(np.concatenate(parts, axis=0), self.n_channels)

    @property
    def sos(self) -> np.ndarray:
        return self._filter.sos

    def reset(self) -> None:
        self._filter.reset()

    def process(self, x: np.ndarray) -> np.ndarray:
        return self._filter.process(x)


class StreamResampler:
    """Stateful polyphase resampler by the rational factor fs_out/fs_in (e.g. 360 -> 100 Hz).

    Output sample m is the value at time m/fs_out of the input band-limited by a Kaiser-windowed
    FIR (the same design as ``scipy.signal.resample_poly``) and its group delay is compensated,
    so the output lines up in time with the input, like ``resample_poly``; in exchange an output
    sample is only emitted once the input reaches ``delay_in_samples`` beyond it. Samples before
    the stream start are taken as zero (as resample_poly does). Chunk-invariant: the output for
    output index m is computed from the same input samples with the same coefficients whatever
    the chunking.
    """

    def __init__(self, fs_in: float, fs_out: float, n_channels: int, *, kaiser_beta: float = 5.0) -> None:
        fs_in, fs_out = _check_fs(fs_in), _check_fs(fs_out)
        ratio = Fraction(fs_out).limit_denominator(10_000) / Fraction(fs_in).limit_denominator(10_000)
        if abs(float(ratio) - fs_out / fs_in) > 1e-9 * fs_out / fs_in:
            raise ValueError(f"fs_out/fs_in={fs_out}/{fs_in} is not a usable rational ratio")
        self.fs_in, self.fs_out = fs_in, fs_out
        self.n_channels = int(n_channels)
        self.up, self.down = ratio.numerator, ratio.denominator
        up, down = self.up, self.down
        max_rate = max(up, down)
        half_len = 10 * max_rate
        h = signal.firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", kaiser_beta)) * up
        self._delay = half_len  # in upsampled samples
        n_taps_phase = -(-h.size // up)
        h = np.concatenate([h, np.zeros(n_taps_phase * up - h.size)])
        # _phases[p, i] = h[p + i*up]: the taps that multiply x[n0 - i] for an output of phase p.
        self._phases = h.reshape(n_taps_phase, up).T.copy()
        self._q = n_taps_phase
        self._lag = np.arange(n_taps_phase)
        self._hist = np.zeros((n_taps_phase - 1, self.n_channels), dtype=np.float64)
        self._n_in = 0  # input samples consumed so far
        self._m_next = 0  # next output index to produce
        self.delay_in_samples = self._delay / up

    def reset(self) -> None:
        self._hist[:] = 0.0
        self._n_in = 0
        self._m_next = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        x = _as_2d(x, self.n_channels, "StreamResampler.process")
        xd = x.astype(np.float64, copy=False)
        buf = np.concatenate([self._hist, xd], axis=0)  # buf[j] = input index (n_in - (q-1) + j)
        start_idx = self._n_in - (self._q - 1)
        self._n_in += xd.shape[0]
        # Output m needs input index n0 = (m*down + delay)//up <= n_in - 1.
        last_m = ((self._n_in - 1) * self.up + (self.up - 1) - self._delay) // self.down
        m = np.arange(self._m_next, max(last_m + 1, self._m_next), dtype=np.int64)
        out = np.empty((m.size, self.n_channels), dtype=np.float64)
        lag = self._lag
        c = self.n_channels
        for s in range(0, m.size, 4096):  # bounded memory for long batch calls
            mm = m[s:s + 4096]
            t = mm * self.down + self._delay
            n0, ph = t // self.up, t % self.up
            if c >= 2 and self.up == 1 and mm.size >= 64:
                # Pure decimation (up == 1), long pushes: per channel, the taps of output k
                # read col[i0 + down*k + (Q-1) - q], a strided view of the channel, so no index
                # array and no gather. The products fill a C-contiguous (q, k) array reduced
                # over q in the same order as the gather below: bit-identical, and about a
                # quarter faster from ~64 outputs on (slower below: a few calls per channel).
                i0 = int(n0[0]) - start_idx - (self._q - 1)
                taps = self._phases[0][:, None]
                prod = np.empty((self._q, mm.size), dtype=np.float64)
                span = (self._q - 1) + self.down * (mm.size - 1) + 1  # the input this block reads
                for ch in range(c):
                    col = np.ascontiguousarray(buf[i0:i0 + span, ch])
                    win = np.lib.stride_tricks.as_strided(
                        col, shape=(self._q, mm.size),
                        strides=(col.strides[0], self.down * col.strides[0]), writeable=False)
                    np.multiply(win[::-1], taps, out=prod)
                    out[s:s + mm.size, ch] = np.add.reduce(prod, axis=0) + 0.0
            elif c >= 2:
                # out[k, c] = sum over q, in order q = 0, 1, ..., of taps[k, q] * x[k, q, c]:
                # the order np.einsum("kq,kqc->kc") accumulates in for c >= 2 (it walks q
                # outside the contiguous channel axis), so the result is bit-identical; a
                # reduction over axis 0 of (q, k*c) accumulates in that same order, and
                # np.take plus one in-place multiply cost half of the fancy gather + einsum.
                idx = (n0 - start_idx)[None, :] - lag[:, None]  # (q, k)
                prod = np.take(buf, idx.ravel(), axis=0).reshape(self._q, mm.size * c)
                if self.up == 1:
                    prod *= self._phases[0][:, None]
                else:
                    prod.reshape(self._q, mm.size, c)[...] *= self._phases[ph].T[:, :, None]
                # + 0.0: einsum starts its sums from +0.0, so an all-zero input gives +0.0
                out[s:s + mm.size] = (np.add.reduce(prod, axis=0) + 0.0).reshape(mm.size, c)
            else:  # one channel: einsum's inner loop runs over q (SIMD order): keep it
                idx = (n0 - start_idx)[:, None] - lag[None, :]
                taps = self._phases[ph]  # (k, q)
                out[s:s + mm.size] = np.einsum("kq,kqc->kc", taps, buf[idx])
        self._m_next += m.size
        keep = self._q - 1
        self._hist = buf[buf.shape[0] - keep:] if keep else buf[:0]
        return out.astype(np.float32)
