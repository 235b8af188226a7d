"""Streaming filters: known answers (gains, impulse responses) and chunk invariance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import signal

from daemon.dsp.filters import (
    EcgConditioner,
    SosFilter,
    StreamResampler,
    bandpass_sos,
    highpass_sos,
    notch_sos,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ecg"


def _gain(sos: np.ndarray, f: float, fs: float) -> float:
    _, h = signal.sosfreqz(sos, worN=[f], fs=fs)
    return float(np.abs(h[0]))


def _real_ecg() -> tuple[np.ndarray, float]:
    z = np.load(FIXTURES / "mitdb_excerpts.npz")
    x = (z["sig_119"].astype(np.float32) - z["baseline_119"]) / z["gain_119"]
    return x.astype(np.float32), float(z["fs"])


def _chunked(proc, x: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    out, i, k = [], 0, 0
    while i < x.shape[0]:
        n = int(sizes[k % sizes.size])
        out.append(proc(x[i:i + n]))
        i, k = i + n, k + 1
    return np.concatenate(out)


@pytest.mark.parametrize("fs", [250.0, 360.0, 500.0])
def test_highpass_known_gains(fs):
    sos = highpass_sos(fs, 0.5)
    assert _gain(sos, 1e-4, fs) < 1e-6  # DC removed
    assert _gain(sos, 0.5, fs) == pytest.approx(1 / np.sqrt(2), rel=1e-3)  # -3 dB at cutoff
    assert _gain(sos, 10.0, fs) == pytest.approx(1.0, abs=2e-3)  # QRS band untouched


@pytest.mark.parametrize("fs,mains", [(500.0, 50.0), (500.0, 60.0), (360.0, 60.0), (250.0, 50.0)])
def test_notch_kills_mains_and_harmonics_keeps_passband(fs, mains):
    sos = notch_sos(fs, mains)
    harmonics = [k * mains for k in range(1, 10) if k * mains < 0.98 * fs / 2]
    assert len(harmonics) == sos.shape[0]
    for f in harmonics:
        assert _gain(sos, f, fs) < 1e-3
    for f in (1.0, 10.0, 0.8 * mains):
        assert _gain(sos, f, fs) > 0.95
    assert notch_sos(fs, mains, harmonics=False).shape[0] == 1


def test_bandpass_gains():
    fs = 360.0
    sos = bandpass_sos(fs, 5.0, 20.0)
    assert _gain(sos, 1e-4, fs) < 1e-6
    assert _gain(sos, 10.0, fs) == pytest.approx(1.0, abs=0.02)
    assert _gain(sos, 60.0, fs) < 0.15
    with pytest.raises(ValueError, match="band-pass edges"):
        bandpass_sos(fs, 20.0, 5.0)


def test_sosfilter_impulse_response_matches_scipy_batch():
    fs = 500.0
    sos = np.concatenate([highpass_sos(fs), notch_sos(fs, 50.0)])
    x = np.zeros((2000, 2), np.float32)
    x[100, 0] = 1.0
    x[700, 1] = -2.0
    y = SosFilter(sos, 2, init="zeros").process(x)
    ref = signal.sosfilt(sos, x.astype(np.float64), axis=0)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_sosfilter_chunking_is_bit_identical_on_real_ecg():
    x, fs = _real_ecg()
    x2 = np.stack([x, -0.5 * x + 0.3], axis=1)
    cond = EcgConditioner(fs, 2, mains_hz=60.0)
    whole = cond.process(x2)
    rng = np.random.default_rng(1)
    for sizes in (np.array([1]), np.array([7, 1, 300]), rng.integers(1, 5000, size=50)):
        cond.reset()
        part = _chunked(cond.process, x2[:6000] if sizes[0] == 1 else x2, sizes)
        np.testing.assert_array_equal(part, whole[: part.shape[0]])


def test_conditioner_removes_offset_wander_and_mains():
    fs = 500.0
    t = np.arange(int(20 * fs)) / fs
    ecg_like = np.sin(2 * np.pi * 8.0 * t)  # in-band content must survive
    x = (ecg_like + 1.5 + 0.8 * np.sin(2 * np.pi * 0.1 * t) + 0.5 * np.sin(2 * np.pi * 50.0 * t))
    y = EcgConditioner(fs, 1, mains_hz=50.0).process(x.astype(np.float32)[:, None])[:, 0]
    tail = slice(int(10 * fs), None)  # after the high-pass has settled
    amp = lambda f: 2 * abs(np.mean(y[tail] * np.exp(-2j * np.pi * f * t[tail])))  # noqa: E731
    assert amp(8.0) == pytest.approx(1.0, abs=0.01)
    assert amp(50.0) < 0.005
    assert amp(0.1) < 0.05
    assert abs(np.mean(y[tail])) < 0.02


def test_bad_input_names_the_fix():
    f = SosFilter(highpass_sos(500.0), 3)
    with pytest.raises(ValueError, match=r"\(n_samples, 3\)"):
        f.process(np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError, match="mains"):
        notch_sos(100.0, 60.0)


@pytest.mark.parametrize("fs_in,fs_out", [(500.0, 100.0), (360.0, 100.0), (250.0, 100.0), (100.0, 250.0)])
def test_resampler_matches_resample_poly_and_any_chunking(fs_in, fs_out):
    x, fs = _real_ecg()
    x = np.stack([x[:8000], x[8000:16000]], axis=1)
    r = StreamResampler(fs_in, fs_out, 2)
    y = r.process(x)
    ref = signal.resample_poly(x.astype(np.float64), r.up, r.down, axis=0)
    assert y.dtype == np.float32
    assert ref.shape[0] - y.shape[0] <= int(np.ceil(r.delay_in_samples * fs_out / fs_in)) + 1
    np.testing.assert_allclose(y, ref[: y.shape[0]], atol=1e-5)
    rng = np.random.default_rng(0)
    for sizes in (np.array([1]), np.array([3, 250]), rng.integers(1, 3000, size=40)):
        r.reset()
        part = _chunked(r.process, x, sizes)
        assert part.shape == y.shape
        np.testing.assert_allclose(part, y, atol=1e-6)


def test_resampler_passes_in_band_sine_with_unit_gain():
    fs_in, fs_out = 360.0, 100.0
    t = np.arange(int(10 * fs_in)) / fs_in
    x = np.sin(2 * np.pi * 5.0 * t).astype(np.float32)[:, None]
    y = StreamResampler(fs_in, fs_out, 1).process(x)[:, 0]
    tt = np.arange(y.size) / fs_out
    mid = slice(100, y.size - 10)
    np.testing.assert_allclose(y[mid], np.sin(2 * np.pi * 5.0 * tt[mid]), atol=2e-3)
