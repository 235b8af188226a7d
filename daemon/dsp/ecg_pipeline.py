"""Streaming ECG path: raw mV chunks -> beats, model windows, quality, heart rate, HRV.

One object, :class:`EcgPipeline`, serves both the daemon (``push`` per serial frame) and
training (:func:`windows_from_record` pushes a whole record through the same object), so models
are trained on exactly the windows the hub computes. Stages (all chunk-invariant):

    raw (fs) ─┬─► EcgConditioner (HP 0.5 Hz + mains notch) ─► StreamResampler (-> model_fs)
              │        ─► WindowSegmenter: 3 s windows + beat-centred groups (model_fs)
              ├─► RPeakDetector (raw mV, lead-valid mask) ─► beats (fs sample clock)
              └─► SlidingWindower (raw, fs): flat/clip/mains/HF checks on the unconditioned
                  signal, paired 1:1 in time with the model windows ─► QualityAssessor
    clean beats ─► HeartRateTracker (HR, RMSSD, SDNN)

A window is released only when the detector can no longer add a beat inside it (its end is
``beat_horizon_s`` behind the newest sample), which is what keeps the beat lists, and hence
quality and the beat groups, independent of how the stream was chunked.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from daemon.dsp.filters import EcgConditioner, SosFilter, StreamResampler
from daemon.dsp.hrv import HeartRateTracker, Hrv
from daemon.dsp.quality import Quality, QualityAssessor, QualityConfig
from daemon.dsp.rpeaks import Beat, RPeakDetector
from daemon.dsp.spikes import SpikeGate
from daemon.dsp.segment import (RrWarp, Segment, SlidingWindower, WindowSegmenter, check_norm,
                                warp_beats)

_NEVER = np.iinfo(np.int64).min // 2  # "no lead-off yet" for the last-off sample index
#: where a beat window starts and ends around its R peak (s): the default of every pipeline,
#: and what a beat model's manifest must state (``daemon.inference.beatmorph`` checks it)
BEAT_BEFORE_S, BEAT_AFTER_S = 0.25, 0.45

__all__ = ["EcgPipeline", "EcgUpdate", "EcgWindow", "RecordWindows", "windows_from_record"]


@dataclass(frozen=True)
class EcgWindow:
    """One model input. ``data`` (window_s*model_fs, n_leads) float32 normalised per lead
    (unusable leads are zeros); ``lead_mask`` the leads that were on and not flat for the whole
    window; ``beats`` (n_groups, 3*beat_len, n_leads) groups of consecutive beat-centred windows
    (empty if fewer than 3 complete beats); ``beat_times_s`` the R peaks of the complete beats,
    group j starts at beat j."""

    t_end_s: float
    data: np.ndarray
    lead_mask: np.ndarray
    quality: Quality
    beats: np.ndarray
    beat_times_s: np.ndarray
    #: (k, beat_len at beat_fs, n_leads) single beats of the conditioned signal low-passed at
    #: ``beat_lowpass_hz`` and sampled at ``beat_fs`` (un-normalised, mV), every complete beat
    #: inside the window; (0, 0, n_leads) when the pipeline was built without ``beat_fs``.
    #: WHY a second rate: identity lives in QRS/T morphology that 100 Hz blurs (measured:
    #: docs/MODELS.md, beat morphology model), while the 3 s model is fine at 100 Hz.
    morph: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))


@dataclass(frozen=True)
class EcgUpdate:
    beats: tuple[Beat, ...]          # R peaks decided in this push (sample clock at fs)
    windows: tuple[EcgWindow, ...]   # windows released in this push
    heart_rate_bpm: float | None
    live: bool                       # recent clean beats and some lead on
    #: HRV as of this push, computed on first access (``HeartRateTracker.hrv_deferred``)
    hrv_of: Callable[[], Hrv | None] = field(default=lambda: None, repr=False, compare=False)
    #: stream time (s) of the newest clean beat behind ``heart_rate_bpm``. WHY: during motion no
    #: beat is clean for seconds while the stream stays live; the heart rate then stays the last
    #: clean median, and a publisher that wants only fresh values compares this time.
    heart_rate_at_s: float | None = None

    @property
    def hrv(self) -> Hrv | None:
        """RMSSD/SDNN over the last 60 s of clean NN intervals as of this push (None: too few)."""
        return self.hrv_of()


def _samples(seconds: float, rate: float, what: str) -> int:
    n = seconds * rate
    if abs(n - round(n)) > 1e-6 or round(n) < 1:
        raise ValueError(f"{what}={seconds} s is not a whole number of samples at {rate} Hz; "
                         f"choose a value that is")
    return int(round(n))


class EcgPipeline:
    """push(samples_mv (n, n_leads) float32, lead_valid (n_leads,) or (n, n_leads) bool)."""

    def __init__(self, fs: float, n_leads: int = 3, mains_hz: float | None = 50.0,
                 model_fs: float = 100.0, window_s: float = 3.0, hop_s: float = 1.0,
                 norm: str = "zscore", beat_before_s: float = BEAT_BEFORE_S,
                 beat_after_s: float = BEAT_AFTER_S,
                 beat_group: int = 3, beat_horizon_s: float = 2.5, live_s: float = 8.0,
                 quality: QualityConfig | None = None, beat_fs: float | None = None,
                 beat_lowpass_hz: float = 40.0, beat_rr_exponent: float = 0.0,
                 beat_rr_ref_s: float = 1.0, settle_s: float = 2.0,
                 return_guard_s: float = 0.5) -> None:
        self.fs = float(fs)
        self.n_leads = int(n_leads)
        self.model_fs = float(model_fs)
        self.norm = check_norm(norm)
        self.window_len = _samples(window_s, model_fs, "window_s")
        self.hop = _samples(hop_s, model_fs, "hop_s")
        raw_len = _samples(window_s, fs, "window_s")
        raw_hop = _samples(hop_s, fs, "hop_s")
        self.before = int(round(beat_before_s * model_fs))
        self.after = int(round(beat_after_s * model_fs))
        self.horizon = int(round(beat_horizon_s * fs))
        self.live_s = float(live_s)
        self._cond = EcgConditioner(fs, n_leads, mains_hz=mains_hz)
        self._det = RPeakDetector(fs, n_leads)
        self._rs = StreamResampler(fs, model_fs, n_leads)
        self._seg = WindowSegmenter(n_leads, self.window_len, self.hop, self.before, self.after,
                                    group=beat_group, norm=norm)
        self._raw = SlidingWindower(n_leads, raw_len, raw_hop)
        self._qa = QualityAssessor(fs, n_leads, mains_hz, quality)
        self._hr = HeartRateTracker()
        self.beat_fs = None if beat_fs is None else float(beat_fs)
        self._morph: _MorphPath | None = None
        if beat_fs is not None:
            warp = (RrWarp(float(beat_rr_exponent), float(beat_rr_ref_s))
                    if beat_rr_exponent else None)
            self._morph = _MorphPath(fs, float(beat_fs), n_leads, window_s, hop_s, beat_before_s,
                                     beat_after_s, beat_lowpass_hz, warp)
        self._pending_raw: list[tuple[np.ndarray, np.ndarray]] = []  # (windows, masks) FIFO
        self._pending_n = 0
        self._beat_t = np.zeros(0)          # detected beat times (s), recent
        self._handed = -np.inf              # beats up to this time went to the HR tracker
        self._n_in = 0
        self._lead_on = np.ones(self.n_leads, dtype=bool)
        # lead-off bookkeeping (see _hold): last valid sample per lead, last invalid sample index
        self.settle = int(round(settle_s * self.fs))
        self._held = np.zeros(self.n_leads, dtype=np.float32)
        self._last_off = np.full(self.n_leads, _NEVER, dtype=np.int64)
        # DC-step removal at a lead's return (see _hold): offset subtracted from each lead, the
        # raw value and absolute index of its last good sample, whether the last sample was good
        self._offset = np.zeros(self.n_leads, dtype=np.float64)
        self._last_good_raw = np.zeros(self.n_leads, dtype=np.float64)
        self._last_good_at = np.full(self.n_leads, _NEVER, dtype=np.int64)
        self._prev_good = np.ones(self.n_leads, dtype=bool)
        # samples beyond _max_abs are impossible (QualityConfig.max_abs_mv): held for the
        # filters, shown to quality as _wild_mv (finite, beyond the limit)
        self._max_abs = np.float32(self._qa.cfg.max_abs_mv)
        self._wild_mv = np.float32(2 * self._qa.cfg.max_abs_mv)
        # in-range samples that leap impossibly far (daemon.dsp.spikes) are held the same way
        self._spikes = SpikeGate(self.n_leads, self.fs)
        # beats are not emitted this soon after every lead was off (see _drop_after_return);
        # _returns: the first sample of each recent return; _all_off_last: the last sample was
        self.return_guard = int(round(return_guard_s * self.fs))
        self._returns: list[int] = []
        self._all_off_last = False
        # (start, end) in seconds of samples the source lost (see push_gap): the windows
        # overlapping them are reported as signal_lost
        self._lost: list[tuple[float, float]] = []

    # ----------------------------------------------------------------------------- input
    def _check(self, x: np.ndarray, lead_valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_leads:
            raise ValueError(f"EcgPipeline.push: samples must be (n, {self.n_leads}) mV, got "
                             f"{x.shape}")
        if lead_valid is None:
            v = np.ones((x.shape[0], self.n_leads), dtype=bool)
        else:
            v = np.asarray(lead_valid, dtype=bool)
            if v.shape not in ((self.n_leads,), (x.shape[0], self.n_leads)):
                raise ValueError(f"lead_valid must be ({self.n_leads},) or "
                                 f"({x.shape[0]}, {self.n_leads}) bool, got {v.shape}")
            v = np.broadcast_to(v, (x.shape[0], self.n_leads))
        return x, v

    def push(self, samples_mv: np.ndarray, lead_valid: np.ndarray | None = None) -> EcgUpdate:
        """Samples that are not finite or beyond ``QualityConfig.max_abs_mv`` (a broken driver,
        a corrupted frame), or that leap further from the last one than any ECG can (a spike:
        :class:`~daemon.dsp.spikes.SpikeGate`), are no error: the filters and the detector
        never see them (the last good value is held, see :meth:`_hold`) and every window
        holding one is rejected as ``saturation``, so one such sample costs the windows around
        it and nothing after."""
        x, v = self._check(samples_mv, lead_valid)
        sane = np.abs(x) <= self._max_abs  # False for nan and inf too
        return self._push(x, v, sane & ~self._spikes.mark(x, v, sane))

    def _push(self, x: np.ndarray, v: np.ndarray, sane: np.ndarray) -> EcgUpdate:
        if x.shape[0]:
            self._lead_on = v[-1].copy()
        held, v_windows = self._hold(x, v, sane)
        self._note_returns(v)
        beats = self._drop_after_return(self._det.process_checked(held, v))
        self._n_in += x.shape[0]
        cond = self._cond.process(held)
        y = self._rs.process(cond)
        if self._morph is not None:
            self._morph.push(cond, beats, self._n_in - self.horizon)
        final_until = (self._n_in - self.horizon) * self.model_fs / self.fs
        # quality sees an impossible sample as one beyond the limit (finite: it squares it)
        x_q = x if sane.all() else np.where(sane, x, self._wild_mv)
        return self._advance(x_q, v_windows, y, beats, int(np.floor(final_until)))

    def push_gap(self, n: int) -> EcgUpdate:
        """``n`` samples that never arrived (frames lost between the box and the hub).

        WHY not splice: beats after the hole would be dated early, heart rate would count a
        short RR, and the windows across it looked clean and were identified from. WHY not
        "lead off" either: the electrodes never moved. As lead-off, one lost 20 ms frame made
        the heart rate forget its beats and the leads settle for 2 s, so the ECG stopped being
        live for 9.5 s (LUDB fixture ECG, measured once with a throw-away script;
        tests/test_daemon_recovery.py now holds the ECG live through such a hole) and ended the wearer's
        session. So the hole is what an impossible sample is (see :meth:`_hold`): the filters
        and the detector see each lead's last value held, with no DC step to take out at the
        far side (the signal goes on from the same contact) and no settling; and the windows it
        touches are rejected as ``signal_lost`` with no usable lead, so nothing is identified
        from them and their beats are not clean: what the user has to look at is the link."""
        n = max(int(n), 0)
        if n:
            self._lost.append((self._n_in / self.fs, (self._n_in + n) / self.fs))
        return self._push(np.zeros((n, self.n_leads), np.float32), np.ones((n, self.n_leads), dtype=bool),
                          np.zeros((n, self.n_leads), dtype=bool))

    def _hold(self, x: np.ndarray, v: np.ndarray, sane: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(filter input, validity for the windows). WHY: while an electrode is off the box
        still sends that lead, at a rail or a new offset; filtered as it comes, the step back to
        the body rang through the 0.5 Hz high-pass and the detector for seconds after the lead
        came back, in windows that looked clean (measured: served embeddings at cosine 0.1-0.5
        of the undisturbed ones, a false beat at the reconnection). So the filters see each
        lead's last good sample held while it is off (or while its samples are impossible:
        ``sane`` False; one 1e20 mV sample had blinded the detector for 25 s), and a lead's
        windows count as off for ``settle_s`` after it comes back (what an electrode's new
        contact still does). When every lead is off, the heart rate forgets the beats before:
        the next wearer is not the last.

        A lead also comes back at a new DC offset (a new electrode contact: tens of mV), a step
        the high-pass rang with for 4 s, past ``settle_s``, and the detector mistimed the next
        beat. So the filters and the detector get the lead minus a per-lead offset that makes
        every return from lead-off continue from the held value: the same as restarting the
        filters in their steady state for the first returned sample, for every filter
        downstream including the detector's own, and a constant the high-pass removes. (A
        stretch of impossible samples on a lead that stayed on is only held: the jump across it
        is the ECG's own; taken out at an R peak, it left a step the high-pass rang with.)
        The offset changes only at a return, by the jump there, so it is a running sum:
        chunk-invariant to the bit (an ``add.accumulate`` carried over), and exactly 0 on a
        stream that never lost a lead (the input then passes unchanged). The held value, last
        good sample (value and index), offset and last off sample carry over."""
        n = x.shape[0]
        good = v & sane
        if n == 0 or (good.all() and self._prev_good.all() and not self._offset.any()
                      and (self._n_in - self._last_off).min() > self.settle):
            if n:
                self._held = x[-1].copy()
                self._last_good_raw = x[-1].astype(np.float64)
                self._last_good_at[:] = self._n_in + n - 1
            return x, v
        at = self._n_in + np.arange(n)
        rows = np.arange(n)[:, None]
        last_off = np.maximum.accumulate(
            np.maximum(np.where(v, _NEVER, at[:, None]), self._last_off[None, :]), axis=0)
        last_good = np.maximum.accumulate(np.where(good, rows, -1), axis=0)  # at or before i
        xd = np.where(good, x, 0.0).astype(np.float64)    # bad samples never enter a sum
        # the last good sample before each sample: its raw value and absolute index (carried)
        before = np.concatenate([np.full((1, self.n_leads), -1), last_good[:-1]])
        x_before = np.where(before >= 0, np.take_along_axis(xd, np.maximum(before, 0), axis=0),
                            self._last_good_raw[None, :])
        at_before = np.where(before >= 0, self._n_in + before, self._last_good_at[None, :])
        prev_good = np.concatenate([self._prev_good[None, :], good[:-1]])
        # a return from lead-off (not from a stretch of impossible samples only, where the
        # signal never left the body: its jump is the ECG's own and must stay) moves the offset
        back = good & ~prev_good & ((last_off > at_before) | (at_before == _NEVER))
        jump = np.where(back, xd - x_before, 0.0)
        offset = np.add.accumulate(np.concatenate([self._offset[None, :], jump]), axis=0)[1:]
        y = np.where(good, xd - offset, 0.0).astype(np.float32)
        held = np.where(last_good >= 0, np.take_along_axis(y, np.maximum(last_good, 0), axis=0),
                        self._held[None, :]).astype(np.float32)
        self._held = held[-1].copy()
        self._offset = offset[-1].copy()
        self._prev_good = good[-1].copy()
        lg = last_good[-1]
        self._last_good_raw = np.where(lg >= 0, xd[np.maximum(lg, 0), np.arange(self.n_leads)],
                                       self._last_good_raw)
        self._last_good_at = np.where(lg >= 0, self._n_in + lg, self._last_good_at)
        self._last_off = last_off[-1].copy()
        all_off = ~v.any(axis=1)
        if all_off.any():
            self._hr.forget_until(float(at[np.flatnonzero(all_off)[-1]]) / self.fs)
        return held, v & (at[:, None] - last_off > self.settle)

    def _note_returns(self, v: np.ndarray) -> None:
        """Remember where some lead came back after every lead was off (absolute sample)."""
        if v.shape[0] == 0:
            return
        all_off = ~v.any(axis=1)
        prev = np.concatenate([[self._all_off_last], all_off[:-1]])
        back = np.flatnonzero(prev & ~all_off)
        self._returns += (self._n_in + back).tolist()
        self._all_off_last = bool(all_off[-1])
        # the detector decides a beat at most the horizon late, so no beat of this push lies
        # before this push's first sample less the horizon: older returns cannot matter (and
        # ones later than that must stay, however long the push, or a long push keeps the false
        # beats that short pushes drop)
        oldest = self._n_in - 2 * self.horizon - self.return_guard
        self._returns = [r for r in self._returns if r >= oldest]

    def _drop_after_return(self, beats: list[Beat]) -> list[Beat]:
        """The beats, less those within ``return_guard_s`` after every lead was off. WHY: a
        beat whose R peak fell while every electrode was off leaves its T wave (up to a QT,
        ~0.45 s, after the R) for after the return, and the detector, learning afresh with no
        lead left to carry its thresholds, took that T wave for an R (measured: all three LUDB
        leads of record 0 off from 6 s and back at one of 21 times from 7.3 to 8.3 s, with the
        DC step already taken out by :meth:`_hold`: 7 gave a false beat 0.02-0.26 s after the
        return; none with this guard). Such beats lie in windows that count as off
        (``settle_s``) anyway, so nothing but that false beat is lost."""
        if not beats or not self._returns:
            return beats
        r = np.array(self._returns)
        return [b for b in beats
                if not ((b.sample >= r) & (b.sample < r + self.return_guard)).any()]

    def flush(self) -> EcgUpdate:
        """End of stream: decide pending beats and release every window the data allows."""
        beats = self._drop_after_return(self._det.flush())
        z = np.zeros((0, self.n_leads), dtype=np.float32)
        if self._morph is not None:
            self._morph.push(z, beats, None)
        return self._advance(z, np.zeros((0, self.n_leads), bool), z, beats, None)

    # ----------------------------------------------------------------------------- stages
    def _advance(self, x, v, y, beats: list[Beat], final_until: int | None) -> EcgUpdate:
        ends, wins, masks = self._raw.push(x, v)
        if ends.size:
            self._pending_raw.append((wins, masks))
            self._pending_n += ends.size
        if beats:
            t = np.array([b.time_s for b in beats])
            self._beat_t = np.concatenate([self._beat_t, t])
        bm = (np.round(np.array([b.sample for b in beats], dtype=np.float64)
                       * (self.model_fs / self.fs)).astype(np.int64) if beats else None)
        segs = self._seg.push(y, bm, None, final_until)
        windows = self._assess(segs) if segs else ()
        now = self._n_in / self.fs
        last = self._hr.last_clean_time()
        live = bool(self._lead_on.any() and last is not None and now - last <= self.live_s)
        return EcgUpdate(tuple(beats), windows, self._hr.heart_rate_bpm(), live, self._hr.hrv_deferred(),
                         heart_rate_at_s=last)

    def _take_raw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > self._pending_n:  # cannot happen: raw windows are never later than model ones
            raise RuntimeError("internal: model window without its raw window")
        wins = np.concatenate([w for w, _ in self._pending_raw])
        masks = np.concatenate([m for _, m in self._pending_raw])
        self._pending_raw = [(wins[k:], masks[k:])] if wins.shape[0] > k else []
        self._pending_n -= k
        return wins[:k], masks[:k]

    def _assess(self, segs) -> tuple[EcgWindow, ...]:
        raw, masks = self._take_raw(len(segs))
        morphs = (self._morph.take([s.end / self.model_fs for s in segs], self.n_leads)
                  if self._morph is not None
                  else [np.zeros((0, 0, self.n_leads), np.float32)] * len(segs))
        spans, times = [], []
        # The beat times are increasing (the detector emits each R peak once, in order): a
        # window's beats are one slice, found by bisection for every window at once.
        bt_all = self._beat_t
        t1s = [s.end / self.model_fs for s in segs]
        t0s = [t1 - self.window_len / self.model_fs for t1 in t1s]
        i0s = np.searchsorted(bt_all, t0s, side="left").tolist()
        i1s = np.searchsorted(bt_all, t1s, side="left").tolist()
        for t0, t1, i0, i1 in zip(t0s, t1s, i0s, i1s):
            spans.append((t0, t1))
            times.append(bt_all[i0:i1])
        lost = None
        if self._lost:
            lost = [any(a < t1 and t0 < b for a, b in self._lost) for t0, t1 in spans]
            self._lost = [(a, b) for a, b in self._lost if b > spans[-1][0]]  # later windows start later
        results = self._qa.assess(raw, masks, [s.beats for s in segs], times, spans,
                                  hop=self._raw.hop, lost=lost)
        out = []
        hr_t, hr_ok = [], []  # handed to the HR tracker in one call (same result, less work)
        handed = int(np.searchsorted(bt_all, self._handed, side="right"))  # first beat > _handed
        for s, (q, usable), (t0, t1), i0, i1, mo in zip(segs, results, spans, i0s, i1s, morphs):
            data, groups = s.data, s.groups
            if not usable.all():
                data = np.where(usable[None, :], data, np.float32(0.0))
                groups = np.where(usable[None, None, :], groups, np.float32(0.0))
            j = max(i0, handed)
            if i1 > j:  # beats of this window not handed yet
                hr_t.append(bt_all[j:i1])
                hr_ok += [q.ok] * (i1 - j)
                handed = i1
                self._handed = float(bt_all[i1 - 1])
            if mo.size and not usable.all():
                mo = np.where(usable[None, None, :], mo, np.float32(0.0))
            out.append(EcgWindow(t1, data, usable, q, groups, s.beat_samples / self.model_fs, mo))
        if hr_t:
            self._hr.push(np.concatenate(hr_t), np.array(hr_ok, dtype=bool))
        keep_from = spans[-1][0] + self.hop / self.model_fs
        self._beat_t = self._beat_t[self._beat_t >= keep_from]
        return tuple(out)


class _MorphPath:
    """Beat morphology at ``beat_fs``: conditioned signal -> resampler -> causal low-pass ->
    a second :class:`WindowSegmenter` with the same window timing in seconds, whose single
    beats are handed to the model windows, paired by window end time. Its windows are released by the
    same detector horizon (whole-second window ends, so both segmenters release together) and
    at flush whatever the data allows; a model window without its morph twin gets none.

    With ``warp`` (:class:`RrWarp`) each beat is read on a heart-rate-normalised time axis
    (:func:`warp_beats`) with the RR from its previous beat; the first beat of a stream, or one
    more than ``warp.rr_max_s`` after the previous (a gap, a missed beat), has no RR and is left
    out of the window's beats."""

    def __init__(self, fs: float, beat_fs: float, n_leads: int, window_s: float, hop_s: float,
                 before_s: float, after_s: float, lowpass_hz: float,
                 warp: RrWarp | None = None) -> None:
        from scipy.signal import butter

        if not 0 < lowpass_hz < beat_fs / 2:
            raise ValueError(f"beat_lowpass_hz={lowpass_hz} must be in (0, beat_fs/2={beat_fs / 2})")
        self.fs, self.beat_fs = fs, beat_fs
        self._rs = StreamResampler(fs, beat_fs, n_leads)
        self._lp = SosFilter(butter(4, lowpass_hz, fs=beat_fs, output="sos"), n_leads)
        self.before = int(round(before_s * beat_fs))
        self.after = int(round(after_s * beat_fs))
        self.warp = warp
        self._hop = _samples(hop_s, beat_fs, "hop_s")
        # with a warp the segmenter only has to find the beats: each one's own span is checked
        # when it is read, so select with the shortest span any RR can give
        sel_after = self.after if warp is None else int(np.ceil(
            warp.offsets(self.before, self.after, beat_fs, np.array([warp.rr_min_s]))[0, -1])) + 1
        self._seg = WindowSegmenter(n_leads, _samples(window_s, beat_fs, "window_s"), self._hop,
                                    self.before, sel_after, group=1, normalised=False)
        self._pending: dict[int, np.ndarray] = {}  # window end (ms) -> beats
        # recent beats (their sample at fs) for each beat's RR
        self._hist_fs = np.zeros(0, np.float64)

    def push(self, cond: np.ndarray, beats: list[Beat], final_until_fs: int | None) -> None:
        yb = self._lp.process(self._rs.process(cond))
        at_fs = np.array([b.sample for b in beats], dtype=np.float64)
        bm = self._at_beat_fs(at_fs) if beats else None
        if beats and self.warp is not None:
            self._hist_fs = np.concatenate([self._hist_fs, at_fs])
        fu = None if final_until_fs is None else int(np.floor(final_until_fs * self.beat_fs / self.fs))
        segs = self._seg.push(yb, bm, None, fu)
        read = [s.beats for s in segs] if self.warp is None else self._warped(segs)
        for s, b in zip(segs, read):
            self._pending[int(round(s.end * 1000 / self.beat_fs))] = b
        if segs and self.warp is not None:
            # a later window starts at least one hop later; its first beat's RR looks back rr_max
            next_start = segs[-1].end - segs[-1].raw.shape[0] + self._hop
            keep = (self._at_beat_fs(self._hist_fs)
                    >= next_start + self.before - self.warp.rr_max_s * self.beat_fs - 1)
            self._hist_fs = self._hist_fs[keep]

    def _at_beat_fs(self, samples_fs: np.ndarray) -> np.ndarray:
        """Beat sample indices at fs -> at beat_fs (what the segmenter is given)."""
        return np.round(samples_fs * (self.beat_fs / self.fs)).astype(np.int64)

    def _warped(self, segs: list[Segment]) -> list[np.ndarray]:
        """Each window's beats read by :func:`warp_beats` with each beat's RR from the history;
        the windows of one push in one call."""
        assert self.warp is not None
        if not segs:
            return []
        counts = [len(s.beat_samples) for s in segs]
        bs = np.concatenate([s.beat_samples for s in segs])
        i = np.searchsorted(self._at_beat_fs(self._hist_fs), bs)
        prev = np.maximum(i - 1, 0)
        rr = (self._hist_fs[np.minimum(i, self._hist_fs.size - 1)] - self._hist_fs[prev]) / self.fs
        rr = np.where((i > 0) & (rr <= self.warp.rr_max_s), rr, np.nan)
        win = np.repeat(np.arange(len(segs)), counts)
        starts = np.array([s.end - s.raw.shape[0] for s in segs], np.int64)[win]
        beats, kept = warp_beats(np.stack([s.raw for s in segs]), starts, bs, rr, self.before,
                                 self.after, self.beat_fs, self.warp, window=win)
        per_window = np.bincount(win[kept], minlength=len(segs))
        return np.split(beats, np.cumsum(per_window)[:-1])

    def take(self, ends_s: list[float], n_leads: int) -> list[np.ndarray]:
        """The beats of the windows ending at ``ends_s``, paired by end time (never by count,
        so a twin released one push late cannot shift every later pairing)."""
        keys = [int(round(t * 1000)) for t in ends_s]
        empty = np.zeros((0, 0, n_leads), np.float32)
        out = [self._pending.pop(k, empty) for k in keys]
        for k in [k for k in self._pending if k <= keys[-1]]:
            del self._pending[k]
        return out


@dataclass(frozen=True)
class RecordWindows:
    """Everything :func:`windows_from_record` computed over one record (for training)."""

    windows: tuple[EcgWindow, ...]
    t_end_s: np.ndarray          # (k,)
    data: np.ndarray             # (k, L, n_leads) float32
    lead_mask: np.ndarray        # (k, n_leads) bool
    quality_index: np.ndarray    # (k,) float32
    ok: np.ndarray               # (k,) bool
    identity_ok: np.ndarray      # (k,) bool: what enrolment and identification use
    reason: np.ndarray           # (k,) str
    beats: np.ndarray            # (b,) R-peak sample indices at fs
    beat_groups: np.ndarray      # (G, 3*beat_len, n_leads): each group once (first window)
    beat_group_t_s: np.ndarray   # (G,) time of each group's first R peak
    beat_group_ok: np.ndarray    # (G,) group came from a window that passed quality
    heart_rate_bpm: float | None


def windows_from_record(x_mv: np.ndarray, fs: float, lead_valid: np.ndarray | None = None,
                        chunk_s: float = 1.0, **kwargs) -> RecordWindows:
    """Batch helper: run :class:`EcgPipeline` over a whole record in ``chunk_s`` chunks.

    ``x_mv`` (n, n_leads) mV; ``lead_valid`` None, (n_leads,) or (n, n_leads); ``kwargs`` as
    for :class:`EcgPipeline`. The result does not depend on ``chunk_s`` (tests check it).
    """
    x = np.asarray(x_mv, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    kwargs.setdefault("n_leads", x.shape[1])
    pipe = EcgPipeline(fs, **kwargs)
    step = max(1, int(round(chunk_s * fs)))
    per_sample = lead_valid is not None and np.ndim(lead_valid) == 2
    wins: list[EcgWindow] = []
    beats: list[int] = []
    upd = None
    for s in range(0, x.shape[0], step):
        lv = lead_valid[s:s + step] if per_sample else lead_valid
        upd = pipe.push(x[s:s + step], lv)
        wins += upd.windows
        beats += [b.sample for b in upd.beats]
    upd = pipe.flush()
    wins += upd.windows
    beats += [b.sample for b in upd.beats]
    n = pipe.n_leads
    groups, gt, gok, seen = [], [], [], set()
    for w in wins:
        for j in range(w.beats.shape[0]):
            key = round(float(w.beat_times_s[j]) * pipe.model_fs)
            if key not in seen:
                seen.add(key)
                groups.append(w.beats[j])
                gt.append(float(w.beat_times_s[j]))
                gok.append(w.quality.ok)
    glen = pipe._seg.group * pipe._seg.beat_len
    return RecordWindows(
        windows=tuple(wins),
        t_end_s=np.array([w.t_end_s for w in wins], dtype=np.float64),
        data=(np.stack([w.data for w in wins]) if wins
              else np.zeros((0, pipe.window_len, n), np.float32)),
        lead_mask=(np.stack([w.lead_mask for w in wins]) if wins
                   else np.zeros((0, n), bool)),
        quality_index=np.array([w.quality.index for w in wins], dtype=np.float32),
        ok=np.array([w.quality.ok for w in wins], dtype=bool),
        identity_ok=np.array([w.quality.ok_for_identity for w in wins], dtype=bool),
        reason=np.array([w.quality.reason for w in wins], dtype=str),
        beats=np.array(beats, dtype=np.int64),
        beat_groups=(np.stack(groups) if groups else np.zeros((0, glen, n), np.float32)),
        beat_group_t_s=np.array(gt, dtype=np.float64),
        beat_group_ok=np.array(gok, dtype=bool),
        heart_rate_bpm=upd.heart_rate_bpm,
    )
