"""Fixed windows and beat-centred windows from one streaming code path.

Two model inputs are cut from the same conditioned stream:

* fixed windows (DT4ECG: 3 s = 300 samples at 100 Hz, all leads) emitted every ``hop`` samples;
* beat-centred windows (multimodal paper: ``before`` samples before the R peak and ``after``
  samples after it) grouped ``group`` consecutive beats per model input.

Both come out of :class:`WindowSegmenter`, and the batch helper :func:`segment_record` pushes a
whole record through that same streaming object, so what training sees is bit-for-bit what the
daemon serves, whatever the chunking. Beat windows are sliced out of the fixed window they lie
in, which keeps every beat and its window consistent by construction.

Normalisation (``norm``) is per lead and per window (or per beat group):

* ``"zscore"``: ``(x - mean) / std``;
* ``"minmax"``: ``(x - min) / (max - min)``, i.e. into [0, 1];
* ``"none"``: unchanged.

A lead that is masked out (lead-off, or flat: std or range below ``FLAT_EPS``) is set to zeros,
never amplified noise; the mask travels with the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORMS = ("zscore", "minmax", "none")
# Below this spread (in signal units, mV for ECG) a lead carries no information: normalising it
# would only blow up quantisation noise, so it is zeroed instead.
FLAT_EPS = 1e-6


def check_norm(norm: str) -> str:
    """Return ``norm`` or raise a ValueError naming the valid choices."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS}")
    return norm


def normalize(x: np.ndarray, norm: str, lead_mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise ``x`` (..., n, ch) per lead over the time axis (-2); masked leads become zeros.

    ``lead_mask`` is (ch,) or (..., ch) bool; ``None`` means all leads valid.
    """
    check_norm(norm)
    x = np.asarray(x, dtype=np.float32)
    if norm == "zscore":
        mean = x.mean(axis=-2, keepdims=True)
        std = x.std(axis=-2, keepdims=True)
        ok = std > FLAT_EPS
        out = (x - mean) / np.where(ok, std, np.float32(1.0))
    elif norm == "minmax":
        lo = x.min(axis=-2, keepdims=True)
        span = x.max(axis=-2, keepdims=True) - lo
        ok = span > FLAT_EPS
        out = (x - lo) / np.where(ok, span, np.float32(1.0))
    else:
        ok = np.ones(x.shape[:-2] + (1, x.shape[-1]), dtype=bool)
        out = x.copy()
    if lead_mask is not None:
        ok = ok & np.expand_dims(np.asarray(lead_mask, dtype=bool), -2)
    return np.where(ok, out, np.float32(0.0)).astype(np.float32, copy=False)


class SlidingWindower:
    """Streaming fixed-length windows with a hop: (n, ch) chunks in, whole windows out.

    The first window ends at sample ``length``; later ones every ``hop`` samples. Windows are only
    released up to ``release_until`` (absolute sample index) so a caller can hold them back until
    a later stage (e.g. the R-peak detector, which has latency) has caught up. A per-sample
    validity mask (e.g. lead-on flags) travels with the samples; a window's mask is True for a
    channel only if that channel was valid for every sample in the window.
    """

    def __init__(self, n_channels: int, length: int, hop: int) -> None:
        if length < 1 or hop < 1 or hop > length:
            raise ValueError(f"window length ({length}) and hop ({hop}) must be >= 1 sample, "
                             "with hop <= length (no sample may fall between windows)")
        self.n_channels = int(n_channels)
        self.length = int(length)
        self.hop = int(hop)
        # Growable buffer: _buf[:_len] holds samples from absolute index _buf_start on. Appends
        # write in place (no per-push reallocation); consumed samples are shifted out lazily.
        self._buf = np.zeros((2 * self.length, self.n_channels), dtype=np.float32)
        self._valid = np.zeros((2 * self.length, self.n_channels), dtype=bool)
        self._len = 0
        self._buf_start = 0          # absolute index of _buf[0]
        self._next_end = self.length  # absolute (exclusive) end of the next window
        self.total = 0               # samples pushed so far

    def _append(self, x: np.ndarray, valid: np.ndarray | bool | None) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_channels:
            raise ValueError(
                f"expected samples shaped (n, {self.n_channels}), got {x.shape}")
        n = x.shape[0]
        if self._len + n > self._buf.shape[0]:
            cap = max(2 * (self._len + n), 2 * self.length)
            buf = np.empty((cap, self.n_channels), dtype=np.float32)
            val = np.empty((cap, self.n_channels), dtype=bool)
            buf[:self._len] = self._buf[:self._len]
            val[:self._len] = self._valid[:self._len]
            self._buf, self._valid = buf, val
        self._buf[self._len:self._len + n] = x
        self._valid[self._len:self._len + n] = True if valid is None else valid
        self._len += n
        self.total += n

    def _drop_before(self, index: int) -> None:
        drop = index - self._buf_start
        if drop <= 0:
            return
        if drop >= self._len:
            self._len = 0
        elif drop > self._buf.shape[0] // 2:  # shift only when it frees much: amortised O(1)
            keep = self._len - drop
            self._buf[:keep] = self._buf[drop:self._len]
            self._valid[:keep] = self._valid[drop:self._len]
            self._len = keep
        else:
            return
        self._buf_start = index

    def push(self, x: np.ndarray, valid: np.ndarray | bool | None = None,
             release_until: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Append samples; return (ends (k,) int64, windows (k, length, ch), masks (k, ch))."""
        self._append(x, valid)
        limit = self.total if release_until is None else min(self.total, int(release_until))
        if limit < self._next_end:
            ends = np.zeros(0, dtype=np.int64)
        else:
            ends = np.arange(self._next_end, limit + 1, self.hop, dtype=np.int64)
        if ends.size:
            idx = (ends[:, None] - self.length - self._buf_start) + np.arange(self.length)
            windows = self._buf[idx]
            if self._valid[idx[0, 0]:idx[-1, -1] + 1].all():  # the usual case: no gather
                masks = np.ones((ends.size, self.n_channels), dtype=bool)
            else:
                masks = self._valid[idx].all(axis=1)
            self._next_end = int(ends[-1]) + self.hop
        else:
            windows = np.zeros((0, self.length, self.n_channels), dtype=np.float32)
            masks = np.zeros((0, self.n_channels), dtype=bool)
        self._drop_before(self._next_end - self.length)
        return ends, windows, masks


@dataclass(frozen=True)
class Segment:
    """One fixed window plus the beat-centred windows lying wholly inside it.

    ``end`` is the absolute (exclusive) sample index of the window end in the pushed stream.
    ``raw`` is the un-normalised input window, ``data`` the normalised one (``raw`` itself, and
    no ``groups``, from a segmenter made with ``normalised=False``); ``beats`` are the
    un-normalised single beats (k, before+after, ch) at ``beat_samples`` (absolute indices);
    ``groups`` are ``group`` consecutive beats concatenated in time and normalised per lead.
    """

    end: int
    data: np.ndarray
    raw: np.ndarray
    lead_mask: np.ndarray
    beat_samples: np.ndarray
    beats: np.ndarray
    groups: np.ndarray


class WindowSegmenter:
    """Streaming fixed windows + beat-centred groups (see module docstring).

    push(x, beats, valid, beats_final_until): ``beats`` are absolute sample indices (in this
    stream's sample clock) of R peaks found so far (each beat is pushed once, in order);
    ``beats_final_until`` is the index below which no more beats can arrive (the detector's
    horizon). Windows are released only once that horizon passes their end, so a window's beat
    list never depends on how the stream was chunked.
    """

    def __init__(self, n_channels: int, window_len: int, hop: int, before: int, after: int,
                 group: int = 3, group_stride: int = 1, norm: str = "zscore",
                 normalised: bool = True) -> None:
        if before < 0 or after < 1 or before + after > window_len:
            raise ValueError(
                f"beat window before={before}, after={after} must fit in window_len={window_len}")
        if group < 1 or group_stride < 1:
            raise ValueError("group and group_stride must be >= 1")
        self.windower = SlidingWindower(n_channels, window_len, hop)
        self.before = int(before)
        self.after = int(after)
        self.group = int(group)
        self.group_stride = int(group_stride)
        self.norm = check_norm(norm)
        #: False: a caller that reads only ``raw``, ``beats`` and ``beat_samples`` (the beat
        #: path at 125 Hz) gets ``data`` = ``raw`` and no groups, and pays for neither
        self.normalised = bool(normalised)
        self._beats = np.zeros(0, dtype=np.int64)
        self._last_beat = -1

    @property
    def beat_len(self) -> int:
        return self.before + self.after

    def push(self, x: np.ndarray, beats: np.ndarray | None = None,
             valid: np.ndarray | bool | None = None,
             beats_final_until: int | None = None) -> list[Segment]:
        if beats is not None and len(beats):
            b = np.asarray(beats, dtype=np.int64)
            b = np.sort(b[b > self._last_beat])
            if b.size:
                self._beats = np.concatenate([self._beats, b])
                self._last_beat = int(b[-1])
        ends, windows, masks = self.windower.push(x, valid, beats_final_until)
        if not ends.size:
            return []
        out: list[Segment] = []
        length = self.windower.length
        data = normalize(windows, self.norm, masks) if self.normalised else windows
        bl = self.beat_len
        offs = np.arange(bl) - self.before
        beats_all = []
        for k, end in enumerate(ends):
            start = int(end) - length
            sel = self._beats[(self._beats - self.before >= start)
                              & (self._beats + self.after <= end)]
            if sel.size:
                beats_k = windows[k][(sel - start)[:, None] + offs]
            else:
                beats_k = np.zeros((0, bl, self.windower.n_channels), dtype=np.float32)
            beats_all.append((sel, beats_k))
        if self.normalised:
            groups = self._group_windows([b for _, b in beats_all], masks)
        else:
            groups = [np.zeros((0, self.group * bl, self.windower.n_channels), np.float32)] * len(ends)
        for k, end in enumerate(ends):
            sel, beats_k = beats_all[k]
            out.append(Segment(int(end), data[k], windows[k], masks[k].copy(), sel,
                               beats_k, groups[k]))
        # Beats that can no longer fall into any future window are forgotten.
        next_start = self.windower._next_end - length
        self._beats = self._beats[self._beats - self.before >= next_start]
        return out

    def _group_windows(self, beats: list[np.ndarray], masks: np.ndarray) -> list[np.ndarray]:
        """Each window's (k, bl, ch) consecutive beats -> its (g, group*bl, ch) groups (stride
        ``group_stride``), normalised per group and lead with window i's lead mask ``masks[i]``;
        all windows of a push in one ``normalize`` call (per window it was most of the
        segmenter's cost)."""
        g, stride = self.group, self.group_stride
        parts, gmask, counts = [], [], []
        for b, m in zip(beats, masks):
            k = b.shape[0]
            n = len(range(0, k - g + 1, stride)) if k >= g else 0
            if n:
                idx = np.arange(0, k - g + 1, stride)[:, None] + np.arange(g)
                parts.append(b[idx].reshape(n, g * b.shape[1], b.shape[2]))
                gmask.append(np.broadcast_to(m, (n, m.shape[0])))
            counts.append(n)
        bl, ch = self.beat_len, masks.shape[1]
        if not parts:
            return [np.zeros((0, g * bl, ch), dtype=np.float32) for _ in beats]
        groups = normalize(np.concatenate(parts), self.norm, np.concatenate(gmask))
        return np.split(groups, np.cumsum(counts)[:-1])


def segment_record(x: np.ndarray, beats: np.ndarray, window_len: int, hop: int, before: int,
                   after: int, valid: np.ndarray | None = None, chunk: int | None = None,
                   **kwargs) -> list[Segment]:
    """Batch helper for training: run :class:`WindowSegmenter` over a whole record.

    ``x`` (n, ch) conditioned samples, ``beats`` absolute R-peak indices, ``valid`` optional
    (n, ch) or (ch,) lead flags. ``chunk`` pushes in chunks of that many samples (default: all at
    once); the result is the same either way, which the tests check.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be (n_samples, n_leads), got shape {x.shape}")
    seg = WindowSegmenter(x.shape[1], window_len, hop, before, after, **kwargs)
    beats = np.sort(np.asarray(beats, dtype=np.int64))
    step = x.shape[0] if not chunk else int(chunk)
    out: list[Segment] = []
    per_sample = valid is not None and np.ndim(valid) == 2
    for s in range(0, x.shape[0], max(step, 1)):
        e = min(s + step, x.shape[0])
        v = valid[s:e] if per_sample else valid
        out += seg.push(x[s:e], beats[(beats >= s) & (beats < e)], v)
    return out


@dataclass(frozen=True)
class RrWarp:
    """Heart-rate normalisation of single beats: the part after the QRS is resampled on a time
    axis scaled by ``(RR / rr_ref_s) ** exponent``, RR being the interval from the previous beat.

    WHY: the ST segment and T wave come later at a slow heart rate and earlier at a fast one (QT
    grows with RR: as RR^(1/3) in Fridericia's correction, RR^(1/2) in Bazett's), so without it
    the same person's beats change shape between a resting enrolment and a test after climbing
    the stairs, and an identity model mistakes heart rate for person. ``exponent=1/3,
    rr_ref_s=1.0`` (what the shipped beat model asks for) is Fridericia's correction; the QRS
    itself (``qrs_s`` after R) and everything before R keep their timing, since QRS width and the
    PR interval hardly change with rate. Measured gain: docs/MODELS.md.
    """

    exponent: float
    rr_ref_s: float = 1.0
    qrs_s: float = 0.064
    rr_min_s: float = 0.3
    rr_max_s: float = 2.0   # a beat whose previous beat is farther back has no known RR

    def __post_init__(self) -> None:
        if not 0.0 < self.exponent <= 1.0:
            raise ValueError(f"RR warp exponent={self.exponent} must be in (0, 1]")
        if not 0 < self.rr_min_s < self.rr_ref_s < self.rr_max_s:
            raise ValueError("RR warp needs 0 < rr_min_s < rr_ref_s < rr_max_s")

    def offsets(self, before: int, after: int, fs: float, rr_s: np.ndarray) -> np.ndarray:
        """(k, before+after) sample offsets from R at which beat k is read."""
        n = np.arange(-before, after, dtype=np.float64)
        q = self.qrs_s * fs
        f = (np.clip(rr_s, self.rr_min_s, self.rr_max_s) / self.rr_ref_s) ** self.exponent
        return np.where(n > q, q + (n - q) * f[:, None], n)


def warp_beats(raw: np.ndarray, start: int | np.ndarray, beat_samples: np.ndarray, rr_s: np.ndarray,
               before: int, after: int, fs: float, warp: RrWarp,
               window: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Beats read out of one un-normalised window ``raw`` (n, ch) that begins at absolute sample
    ``start``, at :meth:`RrWarp.offsets` around each R (linear interpolation between samples).

    Several windows at once (one call per push, not per window): ``raw`` (w, n, ch), ``window``
    (k,) the window of each beat and ``start`` (k,) that window's first sample; each beat goes
    through the same element-wise operations as alone, so the same bits.

    Returns (beats (k', before+after, ch) float32, kept (k,) bool): a beat is kept when its RR
    is known (finite) and the whole warped span lies inside the window, so a window's beats
    never depend on samples outside it, as for the unwarped beats.
    """
    ch, n = raw.shape[-1], raw.shape[-2]
    if not len(beat_samples):
        return np.zeros((0, before + after, ch), np.float32), np.zeros(0, bool)
    pos = (np.asarray(beat_samples, np.int64) - start)[:, None] + warp.offsets(
        before, after, fs, np.nan_to_num(np.asarray(rr_s, np.float64), nan=warp.rr_ref_s))
    kept = np.isfinite(rr_s) & (pos[:, 0] >= 0) & (pos[:, -1] <= n - 1)
    pos = pos[kept]
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    frac = (pos - i0)[..., None]
    if window is None:
        a, b = raw[i0], raw[i0 + 1]
    else:
        w = np.asarray(window, np.int64)[kept][:, None]
        a, b = raw[w, i0], raw[w, i0 + 1]
    beats = a * (1.0 - frac) + b * frac
    return beats.astype(np.float32), kept
