"""Signal quality of one ECG window: an index in [0, 1] and the reason for a rejection.

Why: identity and HR must only be computed on ECG that is really ECG. Each check below yields a
sub-score in [0, 1] (a linear ramp that crosses 0.5 at the check's threshold); the window's
index is the *minimum* sub-score, it is ``ok`` when the index is >= 0.5, and the reason is the
name of the worst check. Checks:

* ``lead_off``: no lead is on (from the source's lead-off mask);
* ``flat_line``: every lead that is on has a peak-to-peak below ``flat_ptp_mv`` (a flat lead is
  also dropped from the window's lead mask when other leads are fine);
* ``saturation``: a lead sits at its own extreme value (clipping plateau) for more than
  ``clip_fraction`` of the window, or reaches the ADC rails (``adc_limits_mv``);
* ``mains_hum``: power within ±1 Hz of the mains frequency vs the QRS band (5-25 Hz), measured
  on the *unconditioned* signal. The conditioning notch removes moderate hum (the raw ECG-ID
  recordings carry up to ~7x the QRS band's power at 50 Hz and identify fine after the notch),
  so only hum beyond 10x the QRS band is rejected: that much means a loose electrode and a
  front end near its limits;
* ``high_freq_noise``: power from 40 Hz up (mains harmonics excluded) vs the QRS band: EMG;
* ``motion_artifact``: median correlation of the window's beats with the running beat template
  (or with the window's own median beat before a template exists);
* ``implausible_rr``: RR intervals (window edges included, so missed beats count) outside
  30-220 bpm, or abrupt RR changes beyond ectopic-like ratios;
* ``no_beats``: no complete beat in the window.

The template follows the person slowly: it is updated only from windows that pass every check
and whose beats agree with each other (intra-window correlation >= ``template_update_corr``),
so one noisy burst cannot poison it.
"""
from __future__ import annotations

from dataclasses import dataclass

import functools

import numpy as np
import scipy.fft

from daemon.dsp.hrv import RR_MAX_S, RR_MIN_S
from daemon.dsp.stats import median, median_axis0

REASONS = ("lead_off", "flat_line", "saturation", "mains_hum", "high_freq_noise",
           "motion_artifact", "implausible_rr", "no_beats")


#: The checks identification does without (``Quality.ok_for_identity``). WHY: they reject
#: EMG (``high_freq_noise``) and beats unlike the running template (``motion_artifact``), which
#: spoil heart rate and the template, but the identity models read such windows well enough,
#: and a template or test cut from fewer windows is noisier: on development folds of the
#: training persons (``python -m training.experiments.identity_gate``) ignoring both for
#: identity lowered the beat model's 10 s EER from 7.0 to 6.2 % and 3 s EER from 7.8 to 7.3 %
#: with rank-1 within 0.1 (docs/MODELS.md). Lead-off, flat, saturated, hum, implausible-RR and
#: beatless windows are still never identified from.
IDENTITY_TOLERATES = ("high_freq_noise", "motion_artifact")
_IDENTITY_NEEDS = np.array([r not in IDENTITY_TOLERATES for r in REASONS])  # columns that gate
OK_AT = 0.5  # a check passes, and a window is ok, at a sub-score of at least this


def identity_ok(scores: np.ndarray) -> np.ndarray:
    """Per window, whether every check identification needs passes and at least one of the two
    it tolerates does: ``scores`` (k, len(REASONS)) sub-scores in ``REASONS`` order (1.0 for a
    check that did not run). WHY not both: a lead left floating with its flags "on" carries only
    amplifier noise, in which the detector finds beats at plausible intervals; such windows fail
    exactly these two checks, and were identified from and enrolled."""
    s = np.asarray(scores)
    passed = s >= OK_AT
    return passed[:, _IDENTITY_NEEDS].all(axis=1) & passed[:, ~_IDENTITY_NEEDS].any(axis=1)


@dataclass(frozen=True)
class Quality:
    index: float                           # [0, 1], min of the sub-scores
    ok: bool                               # index >= 0.5
    reason: str                            # "ok", or the worst check's name (see REASONS)
    scores: tuple[tuple[str, float], ...] = ()  # every sub-score, for diagnostics

    def score_row(self) -> np.ndarray:
        """The sub-scores in ``REASONS`` order, 1.0 for a check that did not run."""
        got = dict(self.scores)
        return np.array([got.get(r, 1.0) for r in REASONS], dtype=np.float32)

    @property
    def ok_for_identity(self) -> bool:
        """Whether enrolment and identification may use this window (``IDENTITY_TOLERATES``)."""
        return bool(identity_ok(self.score_row()[None])[0])


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds (where the sub-score crosses 0.5) and ramp widths; defaults calibrated on
    LUDB / MIT-BIH clean windows vs the same windows with added corruption (tests/)."""

    flat_ptp_mv: float = 0.05
    clip_fraction: float = 0.04
    adc_limits_mv: tuple[float, float] | None = None
    mains_log_ratio: float = 1.0       # log10(P_mains / P_qrs): > 10x the QRS band's power
    hf_log_ratio: float = -0.3         # log10(P_hf / P_qrs)
    hf_low_hz: float = 40.0
    corr_threshold: float = 0.75
    template_update_corr: float = 0.9
    template_alpha: float = 0.2
    rr_jump_ratio: float = 1.8         # successive RR ratio beyond this is not physiological


def _ramp(v: np.ndarray, thr: float, width: float) -> np.ndarray:
    """0.5 at ``thr``, 1 at ``thr + width`` (width > 0: higher is better; < 0: lower is better)."""
    return np.clip(0.5 + 0.5 * (np.asarray(v, dtype=np.float64) - thr) / width, 0.0, 1.0)


def _band_power(p: np.ndarray, f: np.ndarray, lo: float, hi: float) -> np.ndarray:
    sel = (f >= lo) & (f <= hi)
    return p[..., sel].sum(axis=-1)


@functools.lru_cache(maxsize=32)
def _hann32(n: int) -> np.ndarray:
    """``np.hanning(n)`` as float32, computed once per length (read-only: it is shared)."""
    w = np.hanning(n).astype(np.float32)
    w.flags.writeable = False
    return w


@functools.lru_cache(maxsize=32)
def _spectral_bins(seg: int, fs: float, mains_hz: float | None, hf_low_hz: float
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Bin masks of a ``seg``-sample rfft at ``fs``: QRS band (5-25 Hz), mains (+-1 Hz, None
    when not measured) and high-frequency noise (None when empty by config). The same every
    window, so computed once (read-only: the arrays are shared)."""
    f = np.fft.rfftfreq(seg, 1.0 / fs)
    qrs = (f >= 5.0) & (f <= 25.0)
    mains = None
    if mains_hz is not None and mains_hz + 1.0 < fs / 2:
        mains = (f >= mains_hz - 1.0) & (f <= mains_hz + 1.0)
    hf = None
    top = 0.95 * fs / 2
    if hf_low_hz < top:
        hf = (f >= hf_low_hz) & (f <= top)
        if mains_hz is not None:
            harm = mains_hz * np.arange(1, int(fs / 2 / mains_hz) + 2)
            hf &= np.abs(f[:, None] - harm[None, :]).min(axis=1) > 2.0
    for a in (qrs, mains, hf):
        if a is not None:
            a.flags.writeable = False
    return qrs, mains, hf


def _window_power(rt: np.ndarray, fs: float, hop: int | None) -> tuple[np.ndarray, int]:
    """Power spectra (k, ch, bins) of windows ``rt`` (k, ch, n), and the FFT length.

    With ``hop`` given, the windows are consecutive (window j starts ``hop`` samples after window
    j-1) and ``n`` is a multiple of ``hop``: the spectrum is then Welch-like, the sum of the Hann
    periodograms of the window's hop-long blocks, and each block is transformed once even though
    it lies in n/hop windows (3x less FFT work for 3 s windows with a 1 s hop). Otherwise one
    Hann periodogram per window.
    """
    k, ch, n = rt.shape
    if hop and n % hop == 0 and n // hop > 1:
        m = n // hop
        blocks = rt[0].reshape(ch, m, hop).transpose(1, 0, 2)
        if k > 1:
            blocks = np.concatenate([blocks, rt[1:, :, n - hop:]])
        seg = hop
    else:
        blocks, seg, m = rt, n, 1
    x = blocks - blocks.mean(axis=2, keepdims=True)
    x *= _hann32(seg)
    spec = scipy.fft.rfft(x, axis=2)
    pb = spec.real ** 2 + spec.imag ** 2
    if m > 1:
        kk = pb.shape[0] - m + 1
        pb = sum(pb[j:j + kk] for j in range(m))  # m shifted adds: exact, no cancellation
    return pb, seg


def signal_scores(raw: np.ndarray, mask: np.ndarray, fs: float, mains_hz: float | None,
                  cfg: QualityConfig, hop: int | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Vectorised over windows: raw (k, n, ch) unconditioned mV, mask (k, ch) lead-on;
    ``hop``: see :func:`_window_power` (only for consecutive windows).

    Returns (usable leads (k, ch), {check: (k,) sub-score}).
    """
    raw = np.asarray(raw, dtype=np.float32)
    k, n, ch = raw.shape
    mask = np.asarray(mask, dtype=bool)
    # Time on the last, contiguous axis: strided reductions over axis 1 are ~20x slower.
    rt = np.ascontiguousarray(raw.transpose(0, 2, 1))
    hi = rt.max(axis=2)
    lo = rt.min(axis=2)
    ptp = hi - lo
    flat = ptp < cfg.flat_ptp_mv
    usable = mask & ~flat
    scores: dict[str, np.ndarray] = {}
    scores["lead_off"] = mask.any(axis=1).astype(np.float64)
    # flat: best lead that is on (1 when none is on: lead_off already says why)
    fs_lead = np.where(mask, _ramp(ptp, cfg.flat_ptp_mv, cfg.flat_ptp_mv), 0.0)
    scores["flat_line"] = np.where(mask.any(axis=1), fs_lead.max(axis=1), 1.0)

    eps = np.maximum(np.float32(2e-3) * ptp, np.float32(1e-4))[:, :, None]
    at_rail = (rt >= hi[:, :, None] - eps) | (rt <= lo[:, :, None] + eps)
    clip_frac = np.count_nonzero(at_rail, axis=2) / n
    if cfg.adc_limits_mv is not None:
        a, b = cfg.adc_limits_mv
        clip_frac = np.maximum(clip_frac, np.count_nonzero((rt <= a) | (rt >= b), axis=2) / n)
    sat = _ramp(clip_frac, cfg.clip_fraction, -cfg.clip_fraction)
    scores["saturation"] = np.where(usable, sat, 1.0).min(axis=1)

    p, seg = _window_power(rt, fs, hop)
    qrs_sel, mains_sel, hf_sel = _spectral_bins(seg, float(fs), mains_hz, cfg.hf_low_hz)
    p_qrs = p[..., qrs_sel].sum(axis=-1) + 1e-12
    tiny = 1e-12
    if mains_sel is not None:
        p_m = p[..., mains_sel].sum(axis=-1)
        mr = np.log10(p_m / p_qrs + tiny)
        scores["mains_hum"] = np.where(usable, _ramp(mr, cfg.mains_log_ratio, -0.5), 1.0).min(1)
    else:
        scores["mains_hum"] = np.ones(k)
    if hf_sel is not None:
        hr = np.log10(p[:, :, hf_sel].sum(axis=2) / p_qrs + tiny)
        scores["high_freq_noise"] = np.where(usable, _ramp(hr, cfg.hf_log_ratio, -0.5), 1.0).min(1)
    else:
        scores["high_freq_noise"] = np.ones(k)
    return usable, scores


def _znorm(beats: np.ndarray) -> np.ndarray:
    """Z-score each beat per lead over time (axis 1); a flat beat-lead stays zeros."""
    b = beats - beats.mean(axis=1, keepdims=True)
    sd = b.std(axis=1, keepdims=True)
    return b / np.where(sd > 0, sd, np.float32(1.0))


def _leads(z: np.ndarray, use: np.ndarray) -> np.ndarray:
    """(b, bl, ch) beats -> (b, bl * n_used) rows of the leads in ``use``, flattened the way
    ``z[:, :, use].reshape(b, -1)`` does; a view, not a copy, when every lead is used."""
    if use.all():
        return z.reshape(z.shape[0], -1)
    return z[:, :, use].reshape(z.shape[0], -1)


def _centred_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The a half of :func:`_corr_rows` ((m, d) ``a``): each row centred, and its norm."""
    ac = a - np.add.reduce(a, axis=1, keepdims=True) / a.shape[1]
    return ac, np.sqrt(np.add.reduce(ac * ac, axis=1))


def _centred(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The b half of :func:`_corr_rows` (1-d ``b``): centred b and its norm."""
    b = b - np.add.reduce(b) / b.shape[0]
    return b, np.sqrt(b.dot(b))


def _corr_centred(ac: np.ndarray, an: np.ndarray, an_min: float, bc: np.ndarray,
                  bn: np.ndarray) -> np.ndarray:
    """Pearson correlation from the two halves: ``ac`` the centred rows of a, ``an`` their
    norms (smallest ``an_min``), ``bc`` centred b and ``bn`` its norm; 0 where a norm product
    is 0. When every product ``an * bn`` is clearly positive (no underflow to 0 even in
    float32), the masks select everything and the quotient is all that is left."""
    if an_min > 1e-18 and bn > 1e-18:
        return ac @ bc / (an * bn)
    den = an * bn
    return np.where(den > 0, ac @ bc / np.where(den > 0, den, 1.0), 0.0)


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a (m, d) with b (d,).

    ``np.add.reduce`` and ``dot`` are the sums ``mean`` and ``linalg.norm`` compute (hence the
    same bits), without their wrappers: this runs several times per window on a handful of
    beats, where the wrappers cost more than the arithmetic. The batch path of
    :meth:`QualityAssessor.assess` computes the a half once per push and slices it."""
    ac, an = _centred_rows(a)
    bc, bn = _centred(b)
    return _corr_centred(ac, an, float(an.min()), bc, bn)


def _rr_bad(t: list[float], span: tuple[float, float], jump: float) -> int:
    """Implausible RR count of a window (see :meth:`QualityAssessor._beat_scores`): RR outside
    30-220 bpm, a window edge farther than the longest RR from a beat (missed beats), and
    successive RR ratios beyond ``jump``. In Python floats for a handful of beats: the same
    IEEE double subtractions, divisions and comparisons as the numpy version it replaced
    (tests/test_dsp_exact_fastpaths.py holds it to that one), including its inf/nan quotients
    after a zero interval, which increasing beat times never give."""
    n = len(t)
    if n:  # numpy added the two edge flags as np.bool_: a logical or, not a count
        bad = int((t[0] - span[0] > RR_MAX_S) or (span[1] - t[-1] > RR_MAX_S))
    else:
        bad = int(span[1] - span[0] > RR_MAX_S)
    rr = [t[j + 1] - t[j] for j in range(n - 1)]
    for r in rr:
        bad += (r < RR_MIN_S) + (r > RR_MAX_S)
    lo = 1 / jump
    for a, b in zip(rr, rr[1:]):
        if a == 0:  # b / 0 is +-inf (a jump either way) unless b is 0 too (nan: none)
            bad += b != 0
        else:
            bad += (b / a > jump) or (b / a < lo)
    return int(bad)


class QualityAssessor:
    """Stateful (running beat template) quality of successive windows of one stream."""

    def __init__(self, fs: float, n_leads: int, mains_hz: float | None = 50.0,
                 config: QualityConfig | None = None) -> None:
        self.fs = float(fs)
        self.n_leads = int(n_leads)
        self.mains_hz = mains_hz
        self.cfg = config or QualityConfig()
        self.template: np.ndarray | None = None       # (beat_len, ch), per-lead z-scored
        self._template_ok = np.zeros(self.n_leads, dtype=bool)
        self._mismatch = 0  # consecutive self-consistent windows that disagree with the template
        # (template it was computed from, centred flattened template, its norm): the b half of
        # the template correlation, which changes only when the template does
        self._tcache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    RESEED_AFTER = 5  # windows: a new wearer's steady beats replace the old template after ~5 s

    def reset_template(self) -> None:
        """Forget the running beat template: it belongs to one wearing session, and the next
        person's beats would otherwise be judged as motion artefact against the last one's."""
        self.template = None
        self._template_ok[:] = False
        self._mismatch = 0
        self._tcache = None

    def _template_centred(self) -> tuple[np.ndarray, np.ndarray]:
        c = self._tcache
        if c is None or c[0] is not self.template:
            bc, bn = _centred(_leads(self.template[None], self._template_ok)[0])
            c = self._tcache = (self.template, bc, bn)
        return c[1], c[2]

    @staticmethod
    def _intra(z: np.ndarray, usable: np.ndarray, med: np.ndarray, rows=None) -> np.ndarray:
        """Correlation of the window's beats with their median beat ``med`` (usable leads);
        ``rows``: (centred rows, norms, smallest norm) of ``z`` over every lead, given when
        every lead is usable."""
        if rows is not None:
            bc, bn = _centred(med.reshape(-1))
            return _corr_centred(rows[0], rows[1], rows[2], bc, bn)
        return _corr_rows(_leads(z, usable), _leads(med[None], usable)[0])

    def _self_consistent(self, z: np.ndarray, usable: np.ndarray, rows=None) -> bool:
        if z.shape[0] < 2 or not usable.any():
            return False
        intra = self._intra(z, usable, median_axis0(z), rows)
        return bool(median(intra) >= self.cfg.template_update_corr)

    def assess(self, raw: np.ndarray, mask: np.ndarray, beats: list[np.ndarray],
               beat_times: list[np.ndarray], spans_s: list[tuple[float, float]],
               hop: int | None = None) -> list[tuple[Quality, np.ndarray]]:
        """raw (k, n, ch) unconditioned windows; mask (k, ch); per window: ``beats`` (b, bl, ch)
        complete conditioned beats, ``beat_times`` (all beats in the window, s) and its span.
        Returns (Quality, usable lead mask) per window."""
        usable, sig = signal_scores(raw, mask, self.fs, self.mains_hz, self.cfg, hop)
        # z-score all beats of the batch at once, then split per window
        counts = [b.shape[0] for b in beats]
        total = sum(counts)
        if total:
            zall = _znorm(np.concatenate(beats))
            zs = np.split(zall, np.cumsum(counts)[:-1])
            # The a half of _corr_rows for rows over every lead (centred rows and their norms):
            # row by row the same sums, so computed once for the batch and sliced per window.
            ac, an = _centred_rows(zall.reshape(total, -1))
            an_l = an.tolist()
        else:
            zs = [b for b in beats]
        sig_l = {name: v.tolist() for name, v in sig.items()}
        use_l = usable.tolist()
        out = []
        s0 = 0
        for i in range(raw.shape[0]):
            u = use_l[i]
            if not any(u):  # electrodes off: whoever comes next is judged afresh
                self.reset_template()
            s1 = s0 + counts[i]
            rows = (ac[s0:s1], an[s0:s1], min(an_l[s0:s1])) if s1 > s0 and all(u) else None
            s0 = s1
            scores = {name: v[i] for name, v in sig_l.items()}
            scores.update(self._beat_scores(zs[i], beat_times[i], spans_s[i], usable[i], rows))
            name = min(scores, key=scores.get)   # dict order = REASONS order on ties
            index = scores[name]
            ok = index >= OK_AT
            if ok:
                self._mismatch = 0
                self._update_template(zs[i], usable[i], rows)
            elif name == "motion_artifact" and self.template is not None and self._self_consistent(zs[i], usable[i], rows):
                # Steady, self-consistent beats that keep disagreeing with the template are a
                # different heart, not motion: start a new template.
                self._mismatch += 1
                if self._mismatch >= self.RESEED_AFTER:
                    self.reset_template()
            else:
                self._mismatch = 0
            out.append((Quality(index, ok, "ok" if ok else name,
                                tuple((r, scores[r]) for r in REASONS if r in scores)),
                        usable[i]))
        return out

    def _beat_scores(self, z: np.ndarray, times: np.ndarray, span: tuple[float, float],
                     usable: np.ndarray, rows=None) -> dict[str, float]:
        """``z``: the window's complete beats, z-scored per beat and lead (b, bl, ch);
        ``rows``: see :meth:`_intra`."""
        cfg = self.cfg
        bad_rr = _rr_bad(np.asarray(times, dtype=np.float64).tolist(), span, cfg.rr_jump_ratio)
        scores = {"implausible_rr": 1.0 if bad_rr == 0 else 0.25 / bad_rr,
                  "no_beats": 1.0 if z.shape[0] else 0.0}
        if not z.shape[0] or not usable.any():
            scores["motion_artifact"] = 1.0 if not usable.any() else 0.0
            return scores
        if self.template is not None and (usable & self._template_ok).any():
            use = usable & self._template_ok
            if rows is not None and use.all():
                bc, bn = self._template_centred()
                corr = _corr_centred(rows[0], rows[1], rows[2], bc, bn)
            else:
                corr = _corr_rows(_leads(z, use), _leads(self.template[None], use)[0])
        elif len(z) > 1:
            corr = _corr_rows(_leads(z, usable), median_axis0(_leads(z, usable)))
        else:
            corr = np.ones(1)
        # _ramp's arithmetic on one float (same IEEE double operations, no array round trip)
        r = 0.5 + 0.5 * (median(corr) - cfg.corr_threshold) / 0.15
        scores["motion_artifact"] = min(1.0, max(0.0, r))
        return scores

    def _update_template(self, z: np.ndarray, usable: np.ndarray, rows=None) -> None:
        if z.shape[0] < 2 or not usable.any():
            return
        med = median_axis0(z)
        if median(self._intra(z, usable, med, rows)) < self.cfg.template_update_corr:
            return
        med = _znorm(med[None])[0]
        if self.template is None:
            self.template = np.zeros_like(med)
        a = self.cfg.template_alpha
        new = usable & self._template_ok
        if new.all():  # the usual case, without boolean-index copies (same arithmetic)
            self.template = (1 - a) * self.template + a * med
            return
        fresh = usable & ~self._template_ok
        self.template[:, new] = (1 - a) * self.template[:, new] + a * med[:, new]
        self.template[:, fresh] = med[:, fresh]
        self._template_ok |= usable
        self._tcache = None  # the template changed in place
