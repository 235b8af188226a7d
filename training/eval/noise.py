"""Generated ECG noise for stress tests: baseline wander, muscle-like and motion-like bursts.

Why generated: no public noise-stress recordings (e.g. the MIT-BIH Noise Stress Test database)
are in ``shared/data``, so the three classic artefact types are synthesised with their known
spectra and added to real ECG at a target SNR. The three components get equal power; seeds are
fixed so every run (and every detector within a run) sees the same noise.

- baseline wander: a sum of slow sinusoids (0.05-0.5 Hz, respiration and electrode drift);
- muscle (EMG-like): white Gaussian noise band-passed to 20-150 Hz (capped below Nyquist),
  amplitude-modulated slowly, like intermittent muscle tension;
- motion: bursts of 0.3-2 s of 1-12 Hz band-limited noise under a Hann envelope, a few per
  10 s, overlapping the QRS band like electrode motion does.
"""
from __future__ import annotations

import numpy as np
from scipy import signal

__all__ = ["ecg_power", "stress_noise", "add_noise"]


def _unit_power(x: np.ndarray) -> np.ndarray:
    p = float(np.mean(x * x))
    return x / np.sqrt(p) if p > 0 else x


def baseline_wander(n: int, fs: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / fs
    out = np.zeros(n)
    for f in rng.uniform(0.05, 0.5, size=4):
        out += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return _unit_power(out)


def muscle(n: int, fs: float, rng: np.random.Generator) -> np.ndarray:
    hi = min(150.0, 0.45 * fs)
    sos = signal.butter(4, [20.0, hi], btype="bandpass", fs=fs, output="sos")
    w = signal.sosfilt(sos, rng.standard_normal(n))
    env_sos = signal.butter(2, 0.3, fs=fs, output="sos")
    env = signal.sosfiltfilt(env_sos, rng.standard_normal(n))
    env = 0.5 + np.abs(env) / (np.std(env) + 1e-12)
    return _unit_power(w * env)


def motion(n: int, fs: float, rng: np.random.Generator, rate_per_10s: float = 3.0) -> np.ndarray:
    sos = signal.butter(2, [1.0, 12.0], btype="bandpass", fs=fs, output="sos")
    base = signal.sosfilt(sos, rng.standard_normal(n))
    out = np.zeros(n)
    n_bursts = max(1, int(rng.poisson(rate_per_10s * n / (10 * fs))))
    for _ in range(n_bursts):
        length = int(rng.uniform(0.3, 2.0) * fs)
        start = int(rng.integers(0, max(1, n - length)))
        seg = slice(start, min(n, start + length))
        out[seg] += base[seg] * np.hanning(seg.stop - seg.start) * rng.uniform(0.5, 1.5)
    return _unit_power(out)


def ecg_power(x: np.ndarray, fs: float) -> float:
    """Power of the ECG itself: 0.5 Hz high-passed so that DC and wander do not count."""
    sos = signal.butter(2, 0.5, btype="highpass", fs=fs, output="sos")
    y = signal.sosfiltfilt(sos, np.asarray(x, dtype=np.float64))
    return float(np.mean(y * y))


def stress_noise(n: int, fs: float, snr_db: float, signal_power: float, seed: int) -> np.ndarray:
    """Noise of total power ``signal_power / 10**(snr_db/10)``, split equally in three types."""
    rng = np.random.default_rng(seed)
    parts = [baseline_wander(n, fs, rng), muscle(n, fs, rng), motion(n, fs, rng)]
    noise = sum(parts) / np.sqrt(3.0)  # independent unit-power parts -> unit total power
    noise = _unit_power(noise)
    return noise * np.sqrt(signal_power / 10 ** (snr_db / 10.0))


def add_noise(x: np.ndarray, fs: float, snr_db: float, seed: int) -> np.ndarray:
    """``x`` (n,) in mV plus stress noise at ``snr_db`` (per-record power, fixed seed)."""
    x = np.asarray(x, dtype=np.float64)
    noise = stress_noise(x.shape[0], fs, snr_db, ecg_power(x, fs), seed)
    return (x + noise).astype(np.float32)
