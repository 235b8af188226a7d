"""Signal quality of one ECG window: an index in [0, 1] and the reason for a rejection.

Why: identity and HR must only be computed on ECG that is really ECG. Each check below yields a
sub-score in [0, 1] (a linear ramp that crosses 0.5 at the check's threshold); the window's
index is the *minimum* sub-score, it is ``ok`` when the index is >= 0.5, and the reason is the
name of the worst check. Checks:

* ``signal_lost``: samples of the window never arrived: frames lost between the box and the
  hub (``EcgPipeline.push_gap``); no lead of such a window is usable. Its own reason because
  the fix is another one than for ``lead_off``: the cable, the USB port or a busy hub, not
  the electrodes;
* ``lead_off``: no lead is on (from the source's lead-off mask);
* ``flat_line``: every lead that is on has a peak-to-peak below ``flat_ptp_mv`` (a flat lead is
  also dropped from the window's lead mask when other leads are fine);
* ``saturation``: a lead sits at its own extreme value (clipping plateau) for more than
  ``clip_fraction`` of the window, or reaches the ADC rails (``adc_limits_mv``), or shows
  ``min_plateaus`` separate flat-topped plateaus at its extreme (R peaks clipped by the
  amplifier: a few samples each, far below ``clip_fraction``), or holds a sample no front end
  can produce (beyond ``max_abs_mv``, or not finite: a broken driver);
* ``mains_hum``: power within ±1 Hz of 50 Hz, 60 Hz and each one's harmonics vs the QRS band
  (5-25 Hz), the worst single line, measured on the *unconditioned* signal. Both mains
  frequencies whatever the hub is configured for: a hub in the wrong region, or misconfigured,
  notches the wrong line, and that hum must still be called hum (``Quality.mains_hz_found``
  says which). The conditioning notch removes moderate hum (the raw ECG-ID recordings carry up
  to ~7x the QRS band's power at 50 Hz and identify fine after the notch), so only hum beyond
  10x the QRS band is rejected: that much means a loose electrode and a front end near its
  limits;
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

REASONS = ("signal_lost", "lead_off", "flat_line", "saturation", "mains_hum", "high_freq_noise",
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
    #: the mains fundamental (50 or 60 Hz) whose line failed ``mains_hum``; None when it passed
    mains_hz_found: float | None = None

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
    #: a sample beyond this (mV, either sign) is no ECG at any front-end gain (the ADS1298 class
    #: spans +-400 mV at gain 6, +-2.4 V at gain 1 but its inputs tolerate a few hundred mV of
    #: electrode offset): a broken driver or a corrupted frame
    max_abs_mv: float = 1000.0
    #: clipped R peaks: ``min_plateaus`` runs of at least ``plateau_ms`` within ``plateau_tol``
    #: x peak-to-peak of the window's max (or min), entered steeply (``plateau_edge_frac`` x
    #: peak-to-peak within ``plateau_edge_ms`` before), at least one shortest RR apart. Measured once
    #: on 51 530 real 3 s windows (LUDB I-III, ECG-ID raw lead I, MIT-BIH 26 x 30 min, all of
    #: ../shared/data) none is flagged; with LUDB's top 30 % clipped, 94 % of windows are (a
    #: broad, exactly quantised S trough or baseline is what the steep entry and the RR apart
    #: rule out: without them 0.6-3 % of LUDB windows were flagged; a one-off script, not a
    #: repo command: tests/test_dsp_robustness.py pins clean fixtures unflagged, clipped flagged)
    plateau_ms: float = 8.0
    plateau_tol: float = 2e-4
    plateau_edge_ms: float = 4.0
    plateau_edge_frac: float = 0.02
    min_plateaus: int = 2
    #: mains fundamentals the hum check looks at, whatever the notch is set to
    hum_hz: tuple[float, ...] = (50.0, 60.0)


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
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Bin masks of a ``seg``-sample rfft at ``fs``: QRS band (5-25 Hz) and high-frequency noise
    (None when empty by config; the configured mains' harmonics left out). The same every
    window, so computed once (read-only: the arrays are shared). The hum lines: :func:`_hum_lines`."""
    f = np.fft.rfftfreq(seg, 1.0 / fs)
    qrs = (f >= 5.0) & (f <= 25.0)
    hf = None
    top = 0.95 * fs / 2
    if hf_low_hz < top:
        hf = (f >= hf_low_hz) & (f <= top)
        if mains_hz is not None:
            harm = mains_hz * np.arange(1, int(fs / 2 / mains_hz) + 2)
            hf &= np.abs(f[:, None] - harm[None, :]).min(axis=1) > 2.0
    for a in (qrs, hf):
        if a is not None:
            a.flags.writeable = False
    return qrs, hf


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


@functools.lru_cache(maxsize=32)
def _hum_lines(seg: int, fs: float, hum_hz: tuple[float, ...]
               ) -> tuple[tuple[float, tuple[np.ndarray, ...]], ...]:
    """Per mains fundamental in ``hum_hz``: the bin masks (+-1 Hz) of its lines in a
    ``seg``-sample rfft at ``fs``: the fundamental when it is below Nyquist - 1 Hz (as the
    single-line check had it), its harmonics up to the top of the HF band (0.95 Nyquist)."""
    f = np.fft.rfftfreq(seg, 1.0 / fs)
    top = 0.95 * fs / 2
    out = []
    for f0 in hum_hz:
        lines = [f0] if f0 + 1.0 < fs / 2 else []
        lines += [k * f0 for k in range(2, int(top // f0) + 1)]
        masks = []
        for line in lines:
            m = (f >= line - 1.0) & (f <= line + 1.0)
            m.flags.writeable = False
            masks.append(m)
        if masks:
            out.append((float(f0), tuple(masks)))
    return tuple(out)


def _plateaus(rt: np.ndarray, hi: np.ndarray, lo: np.ndarray, ptp: np.ndarray, fs: float,
              cfg: "QualityConfig") -> np.ndarray:
    """(k, ch) the number of clipping plateaus at the window's max or min (the more of the two).

    A plateau: ``plateau_ms`` or more consecutive samples within ``plateau_tol`` x ptp of the
    extreme, entered steeply (``plateau_edge_ms`` before its start the signal is at least
    ``plateau_edge_frac`` x ptp away from the extreme) and starting at least the shortest RR
    after the last one (a plateau broken by one sample is one). WHY: an amplifier that clips
    the R peaks flattens each one for a few ms only, far below ``clip_fraction`` of the window,
    and a natural R apex or S trough is rounded (no run of equal samples) or, where it is
    broad and quantised flat, entered slowly. Prefix sums: no per-sample loop."""
    k, ch, n = rt.shape
    m = max(2, int(round(cfg.plateau_ms * fs / 1000.0)))
    e = max(1, int(round(cfg.plateau_edge_ms * fs / 1000.0)))
    g = max(1, int(round(RR_MIN_S * fs)))
    best = np.zeros((k, ch), dtype=np.int64)
    if n < m + e:
        return best
    tol = np.maximum(np.float32(cfg.plateau_tol) * ptp, np.float32(1e-4))[:, :, None]
    edge = (np.float32(cfg.plateau_edge_frac) * ptp)[:, :, None]
    idx = np.arange(n - m + 1)
    back = np.maximum(idx - g, 0)
    for at, ext in ((rt >= hi[:, :, None] - tol, hi), (rt <= lo[:, :, None] + tol, lo)):
        c = np.zeros((k, ch, n + 1), dtype=np.int32)
        np.cumsum(at, axis=2, out=c[:, :, 1:])
        run = (c[:, :, m:] - c[:, :, :-m]) == m          # samples i..i+m-1 all at the extreme
        if not run.any():
            continue
        cr = np.zeros((k, ch, run.shape[2] + 1), dtype=np.int32)
        np.cumsum(run, axis=2, out=cr[:, :, 1:])
        start = run & ((cr[:, :, idx] - cr[:, :, back]) == 0)   # no run in the g samples before
        before = rt[:, :, np.maximum(idx - e, 0)]
        start &= (idx >= e) & (np.abs(before - ext[:, :, None]) >= edge)
        best = np.maximum(best, np.count_nonzero(start, axis=2))
    return best


@dataclass(frozen=True)
class SignalChecks:
    """What :func:`signal_checks` found in a batch of windows."""

    usable: np.ndarray                 # (k, ch) leads on and not flat
    scores: dict[str, np.ndarray]      # check -> (k,) sub-score
    mains_hz_found: np.ndarray         # (k,) fundamental of the failing hum line, nan if none


def signal_scores(raw: np.ndarray, mask: np.ndarray, fs: float, mains_hz: float | None,
                  cfg: QualityConfig, hop: int | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Vectorised over windows: raw (k, n, ch) unconditioned mV, mask (k, ch) lead-on;
    ``hop``: see :func:`_window_power` (only for consecutive windows).

    Returns (usable leads (k, ch), {check: (k,) sub-score}); :func:`signal_checks` also says
    which mains frequency hummed."""
    c = signal_checks(raw, mask, fs, mains_hz, cfg, hop)
    return c.usable, c.scores


def signal_checks(raw: np.ndarray, mask: np.ndarray, fs: float, mains_hz: float | None,
                  cfg: QualityConfig, hop: int | None = None) -> SignalChecks:
    """:func:`signal_scores` with the hum's frequency. ``mains_hz`` (the notch's) only decides
    which lines the HF check leaves out; the hum check looks at every ``cfg.hum_hz``."""
    raw = np.asarray(raw, dtype=np.float32)
    k, n, ch = raw.shape
    mask = np.asarray(mask, dtype=bool)
    # Time on the last, contiguous axis: strided reductions over axis 1 are ~20x slower.
    rt = np.ascontiguousarray(raw.transpose(0, 2, 1))
    hi = rt.max(axis=2)
    lo = rt.min(axis=2)
    # nan propagates into max/min and fails both comparisons: non-finite counts as wild
    wild = ~((hi <= cfg.max_abs_mv) & (lo >= -cfg.max_abs_mv))
    if wild.any():  # numbers the spectra can square: the window is rejected anyway
        big = np.float32(2 * cfg.max_abs_mv)
        rt = np.clip(np.nan_to_num(rt, nan=big, posinf=big, neginf=-big), -big, big)
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
    sat = np.where(_plateaus(rt, hi, lo, ptp, float(fs), cfg) >= cfg.min_plateaus, 0.0, sat)
    sat = np.where(wild, 0.0, sat)
    # a wild lead counts even when it looks flat (stuck at an impossible value)
    scores["saturation"] = np.where(usable | (mask & wild), sat, 1.0).min(axis=1)

    p, seg = _window_power(rt, fs, hop)
    qrs_sel, hf_sel = _spectral_bins(seg, float(fs), mains_hz, cfg.hf_low_hz)
    p_qrs = p[..., qrs_sel].sum(axis=-1) + 1e-12
    tiny = 1e-12
    scores["mains_hum"], found = _hum_scores(p, p_qrs, usable, seg, float(fs), cfg)
    if hf_sel is not None:
        hr = np.log10(p[:, :, hf_sel].sum(axis=2) / p_qrs + tiny)
        scores["high_freq_noise"] = np.where(usable, _ramp(hr, cfg.hf_log_ratio, -0.5), 1.0).min(1)
    else:
        scores["high_freq_noise"] = np.ones(k)
    return SignalChecks(usable, scores, found)


def _hum_scores(p: np.ndarray, p_qrs: np.ndarray, usable: np.ndarray, seg: int, fs: float,
                cfg: QualityConfig) -> tuple[np.ndarray, np.ndarray]:
    """(k,) hum sub-score: the worst single mains line (50/60 Hz and harmonics) of any usable
    lead against the QRS band; and (k,) the fundamental of the failing line (nan if it passed).
    Per line the same sum and ramp the single-line check used, so a window hummed only at the
    configured fundamental scores as before."""
    k = p.shape[0]
    score = np.ones(k)
    found = np.full(k, np.nan)
    for f0, masks in _hum_lines(seg, fs, tuple(cfg.hum_hz)):
        for sel in masks:
            mr = np.log10(p[..., sel].sum(axis=-1) / p_qrs + 1e-12)
            s = np.where(usable, _ramp(mr, cfg.mains_log_ratio, -0.5), 1.0).min(1)
            worse = s < score
            found = np.where(worse & (s < OK_AT), f0, found)
            score = np.minimum(score, s)
    return score, found


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
               hop: int | None = None, lost: list[bool] | None = None) -> list[tuple[Quality, np.ndarray]]:
        """raw (k, n, ch) unconditioned windows; mask (k, ch); per window: ``beats`` (b, bl, ch)
        complete conditioned beats, ``beat_times`` (all beats in the window, s) and its span;
        ``lost``: whether the window holds samples that never arrived (``signal_lost``).
        Returns (Quality, usable lead mask) per window."""
        checks = signal_checks(raw, mask, self.fs, self.mains_hz, self.cfg, hop)
        usable, sig = checks.usable, checks.scores
        hum_at = checks.mains_hz_found.tolist()
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
            scores = {"signal_lost": 0.0} if lost is not None and lost[i] else {}  # first: wins ties
            scores.update({name: v[i] for name, v in sig_l.items()})
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
            hum = hum_at[i]
            out.append((Quality(index, ok, "ok" if ok else name,
                                tuple((r, scores[r]) for r in REASONS if r in scores),
                                None if hum != hum else hum),  # nan: no hum
                        np.zeros_like(usable[i]) if lost is not None and lost[i] else usable[i]))
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
