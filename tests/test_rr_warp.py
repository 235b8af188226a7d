"""Heart-rate normalisation of single beats (daemon.dsp.segment.RrWarp / warp_beats) and its
use by the pipeline's beat-morphology path."""
from __future__ import annotations

import numpy as np
import pytest

from daemon.dsp.ecg_pipeline import windows_from_record
from daemon.dsp.segment import RrWarp, warp_beats

BAZETT = RrWarp(0.5, 1.0)
FS = 125.0


def test_at_the_reference_rate_the_beat_is_the_plain_slice() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(375, 3)).astype(np.float32)
    r = np.array([60, 200])
    beats, kept = warp_beats(raw, 0, r, np.array([1.0, 1.0]), 31, 56, FS, BAZETT)
    assert kept.all()
    np.testing.assert_allclose(beats, raw[r[:, None] + np.arange(-31, 56)], atol=1e-6)


def test_the_part_after_the_qrs_is_read_on_a_sqrt_rr_scaled_axis() -> None:
    # a ramp makes linear interpolation exact: each output sample is its read position
    raw = np.repeat(np.arange(375, dtype=np.float32)[:, None], 2, axis=1)
    start, r = 1000, 1150
    beats, kept = warp_beats(raw, start, np.array([r]), np.array([0.64]), 31, 56, FS, BAZETT)
    pos = beats[0, :, 0] - (r - start)            # offsets from R actually read
    n = np.arange(-31, 56)
    q = 0.064 * FS                                # 8 samples of QRS keep their timing
    np.testing.assert_allclose(pos[n <= q], n[n <= q], atol=1e-4)
    np.testing.assert_allclose(pos[n > q], q + (n[n > q] - q) * 0.8, atol=1e-4)  # sqrt(0.64)
    # at a slow rate the T wave is looked for later
    slow, _ = warp_beats(raw, start, np.array([r]), np.array([1.44]), 31, 56, FS, BAZETT)
    assert slow[0, -1, 0] - (r - start) == pytest.approx(q + (55 - q) * 1.2, abs=1e-4)


def test_beats_without_rr_or_outside_the_window_are_left_out() -> None:
    raw = np.zeros((375, 1), np.float32)
    # RR unknown; the last fits unwarped (55 after R) but not stretched by sqrt(2)
    r = np.array([100, 150, 310])
    _, kept = warp_beats(raw, 0, r, np.array([np.nan, 1.0, 2.0]), 31, 56, FS, BAZETT)
    assert kept.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="exponent"):
        RrWarp(1.5)


def test_several_windows_in_one_call_give_each_window_s_beats_bit_for_bit() -> None:
    """The pipeline reads a push's windows in one call (``window``): the same bits as a call
    per window, beats left out where the window (not the stack) ends."""
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(3, 375, 2)).astype(np.float32)
    starts = np.array([0, 125, 250])
    r = [np.array([40, 200, 330]), np.array([160, 300, 480]), np.array([300, 560, 610])]
    rr = [np.array([0.7, 1.1, 0.9]), np.array([np.nan, 0.8, 1.3]), np.array([0.6, 1.0, 0.9])]
    alone = [warp_beats(raw[w], starts[w], r[w], rr[w], 31, 56, FS, BAZETT) for w in range(3)]
    win = np.repeat(np.arange(3), 3)
    beats, kept = warp_beats(raw, starts[win], np.concatenate(r), np.concatenate(rr), 31, 56, FS,
                             BAZETT, window=win)
    np.testing.assert_array_equal(kept, np.concatenate([k for _, k in alone]))
    np.testing.assert_array_equal(beats, np.concatenate([b for b, _ in alone]))
    assert 0 < kept.sum() < kept.size  # both kinds of beat are in it


def _synthetic_ecg(bpm: float, seconds: float, fs: float = 500.0) -> np.ndarray:
    """Gaussian P-QRS-T beats whose repolarisation obeys Bazett: the T wave's delay after R
    (0.30 s) and its width (45 ms) at RR = 1 s scale with sqrt(RR)."""
    rr = 60.0 / bpm
    t = np.arange(int(seconds * fs)) / fs
    x = np.zeros_like(t)
    for r in np.arange(0.5, seconds - 0.5, rr):
        for dt, amp, width in ((-0.16, 0.12, 0.025), (-0.02, -0.1, 0.008), (0.0, 1.2, 0.01),
                               (0.025, -0.25, 0.008), (0.30 * np.sqrt(rr), 0.35, 0.045 * np.sqrt(rr))):
            x += amp * np.exp(-0.5 * ((t - r - dt) / width) ** 2)
    return np.repeat(x[:, None], 3, axis=1).astype(np.float32)


def _mean_beat(bpm: float, exponent: float) -> np.ndarray:
    kw = dict(beat_fs=FS, beat_lowpass_hz=40.0, mains_hz=None)
    if exponent:
        kw.update(beat_rr_exponent=exponent, beat_rr_ref_s=1.0)
    wins = windows_from_record(_synthetic_ecg(bpm, 30.0), 500.0, **kw).windows
    beats = np.concatenate([w.morph for w in wins if w.morph.shape[0]])
    return beats[:, :, 0].mean(axis=0)


def test_warping_makes_one_person_s_beats_alike_at_rest_and_at_a_fast_rate() -> None:
    """The same heart at 60 and 100 bpm: without the warp the T waves sit 8 samples apart,
    with it they coincide and the repolarisation parts of the two mean beats correlate (what
    keeps identity from mistaking heart rate for person)."""
    after_qrs = slice(31 + 12, None)   # from 96 ms after R to the end of the beat

    def t_peak_lag_and_corr(exponent: float) -> tuple[int, float]:
        a, b = _mean_beat(60, exponent)[after_qrs], _mean_beat(100, exponent)[after_qrs]
        return abs(int(np.argmax(a)) - int(np.argmax(b))), float(np.corrcoef(a, b)[0, 1])

    (lag_plain, corr_plain), (lag_warped, corr_warped) = t_peak_lag_and_corr(0.0), t_peak_lag_and_corr(0.5)
    assert lag_plain >= 6 and lag_warped <= 1, (lag_plain, lag_warped)
    assert corr_warped > 0.9 > corr_plain, (corr_plain, corr_warped)


def test_the_first_beat_of_a_stream_has_no_rr_and_is_not_used() -> None:
    x = _synthetic_ecg(60, 12.0)
    plain = windows_from_record(x, 500.0, beat_fs=FS, mains_hz=None).windows
    warped = windows_from_record(x, 500.0, beat_fs=FS, mains_hz=None, beat_rr_exponent=0.5).windows
    assert [w.t_end_s for w in plain] == [w.t_end_s for w in warped]
    counts = [(p.morph.shape[0], w.morph.shape[0]) for p, w in zip(plain, warped)]
    assert counts[0][1] == counts[0][0] - 1          # the first window holds the first beat
    assert all(a == b for a, b in counts[1:])        # at RR = 1 s every later beat is kept
