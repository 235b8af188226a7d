"""IMU DSP: units, resampling, ACF features vs a numpy reference, gait gate on real excerpts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.dsp.imu import (GAIT_STAT_NAMES, GAIT_STATS_PER_SIGNAL, ImuResampler, acc_g_to_ms2,
                            acf_feature_size, acf_features, acf_features_batch, detect_gait,
                            gait_stats_batch, gyro_dps_to_rads, resample_irregular, to_si)
from daemon.dsp.imu_pipeline import ImuPipeline, imu_windows_from_record
from firmware_protocol.emulators.imu_recordings import load_imu_recording

FIX = np.load(Path(__file__).parent / "fixtures" / "imu" / "imu_excerpts.npz")
HUGADB_FS = 58.82


def hugadb(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    raw = FIX[f"hugadb_{name}_shin"].astype(np.float64)
    t = np.arange(len(raw)) / HUGADB_FS
    return t, raw[:, :3] / 16384.0, raw[:, 3:] / 16.4


def sisfall(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    raw = FIX[f"sisfall_{name}_waist"].astype(np.float64)
    t = np.arange(len(raw)) / 100.0
    return t, raw[:, :3] * (32 / 2**13), raw[:, 3:] * (4000 / 2**16)


def acf_reference(w: np.ndarray, max_lag: int) -> np.ndarray:
    """Straightforward float64 numpy: biased ACF of the mean-removed axis, lag 0 = variance."""
    out = []
    n = len(w)
    for c in range(w.shape[1]):
        x = w[:, c].astype(np.float64) - w[:, c].astype(np.float64).mean()
        full = np.correlate(x, x, mode="full")[n - 1:]
        out.append(full[: max_lag + 1] / n)
    return np.concatenate(out)


def test_si_units():
    assert np.allclose(acc_g_to_ms2(np.ones((2, 3))), 9.80665)
    assert np.allclose(gyro_dps_to_rads(np.full((2, 3), 180.0)), np.pi)
    si = to_si(np.ones((4, 3)), np.full((4, 3), 90.0))
    assert si.dtype == np.float32 and si.shape == (4, 6)
    with pytest.raises(ValueError, match="acc"):
        to_si(np.ones((4, 2)), np.ones((4, 3)))


def test_acf_features_match_numpy_reference_on_real_data():
    t, acc, gyro = sisfall("walking")
    si = to_si(acc, gyro)[:200]
    f = acf_features(si)
    assert f.shape == (66,) and f.dtype == np.float32
    ref = acf_reference(si, 10)
    np.testing.assert_allclose(f, ref, rtol=2e-4, atol=1e-6)
    # lag 0 is the variance of each axis
    np.testing.assert_allclose(f[::11], si.astype(np.float64).var(axis=0), rtol=2e-4)
    # FFT path (long lags) agrees with the direct path / reference too
    g = acf_features(si, max_lag=60)
    np.testing.assert_allclose(g, acf_reference(si, 60), rtol=2e-3, atol=1e-5)


def test_acf_variants_and_batch():
    _, acc, gyro = hugadb("walking")
    si = to_si(acc, gyro)
    wins = np.stack([si[i:i + 200] for i in (0, 100, 200)])
    b = acf_features_batch(wins)
    for i in range(3):
        np.testing.assert_allclose(b[i], acf_features(wins[i]), rtol=1e-5, atol=1e-6)
    norm = acf_features(wins[0], variant="normalized").reshape(6, 11)
    assert np.all(np.abs(norm[:, 1:]) <= 1.0 + 1e-5)
    np.testing.assert_allclose(norm[:, 0], b[0].reshape(6, 11)[:, 0], rtol=1e-6)
    assert acf_features(wins[0], variant="magnitude").shape == (88,)
    st = acf_features(wins[0], variant="stride", fs=100.0, stride_s=1.0)
    assert st.shape == (66,)
    with pytest.raises(ValueError, match="variant"):
        acf_features(wins[0], variant="nope")
    with pytest.raises(ValueError, match="lag"):
        acf_features(wins[0][:5])


def test_gait_variant_is_stride_then_gait_stats_on_real_walking():
    _, acc, gyro = sisfall("walking")
    si = to_si(acc, gyro)
    wins = np.stack([si[i:i + 200] for i in (0, 100, 200)])
    g = acf_features_batch(wins, 10, "gait")
    assert g.shape == (3, acf_feature_size(10, "gait")) == (3, 66 + 2 * GAIT_STATS_PER_SIGNAL)
    np.testing.assert_array_equal(g[:, :66], acf_features_batch(wins, 10, "stride"))
    np.testing.assert_allclose(acf_features(wins[1], 10, "gait"), g[1], rtol=1e-6, atol=1e-7)
    acc_stats = dict(zip(GAIT_STAT_NAMES, g[0, 66:66 + GAIT_STATS_PER_SIGNAL]))
    mag = np.linalg.norm(wins[0, :, :3], axis=1)
    assert acc_stats["mean"] == pytest.approx(mag.mean(), rel=1e-5)
    assert acc_stats["std"] == pytest.approx(mag.std(), rel=1e-4)
    assert 0.6 <= acc_stats["cadence_hz"] <= 3.5 and acc_stats["step_reg"] > 0.3
    assert 0.25 <= acc_stats["step_lag_s"] <= 0.8 and 0.6 <= acc_stats["stride_lag_s"] <= 1.6


def test_gait_stats_of_a_synthetic_gait():
    """|acc| bounces at 2 steps/s (one step 0.5 s, one stride 1 s): cadence 2 Hz, regular."""
    t = np.arange(200) / 100.0
    w = np.zeros((1, 200, 6), np.float32)
    w[0, :, 2] = 9.81 + 2.0 * np.sin(2 * np.pi * 2.0 * t)
    w[0, :, 3] = 0.5 * np.sin(2 * np.pi * 1.0 * t)  # the hip turns once per stride
    s = gait_stats_batch(w)[0]
    acc = dict(zip(GAIT_STAT_NAMES, s[:GAIT_STATS_PER_SIGNAL]))
    gyro = dict(zip(GAIT_STAT_NAMES, s[GAIT_STATS_PER_SIGNAL:]))
    assert acc["mean"] == pytest.approx(9.81, abs=0.05)
    assert acc["cadence_hz"] == 2.0 and acc["band_1.5_2.5hz"] > 0.75
    assert acc["step_lag_s"] == pytest.approx(0.5, abs=0.02) and acc["step_reg"] > 0.95
    # a perfectly periodic signal repeats at every multiple of the step: 1.0 s or 1.5 s
    assert min(abs(acc["stride_lag_s"] - 1.0), abs(acc["stride_lag_s"] - 1.5)) < 0.02
    assert acc["stride_reg"] > 0.95
    # |gyro| = |0.5 sin(2 pi t)| repeats every 0.5 s too, at 4 Hz in its spectrum
    assert gyro["step_lag_s"] == pytest.approx(0.5, abs=0.02) and gyro["step_reg"] > 0.95
    with pytest.raises(ValueError, match="1.6 s"):
        gait_stats_batch(w[:, :150])


def test_resampler_is_chunk_invariant_and_respects_gaps():
    rng = np.random.default_rng(0)
    t, acc, gyro = hugadb("walking")
    t = t + rng.uniform(-0.004, 0.004, t.size)  # jittered clock
    t[300:] += 1.0                             # a 1 s hole: must not be bridged
    si = to_si(acc, gyro)
    tt, y = resample_irregular(t, si, 100.0)
    assert np.all(np.diff(tt)[np.diff(tt) < 0.5] > 0.0099)
    assert not np.any((tt > t[299] + 0.01) & (tt < t[300] - 0.01))
    r = ImuResampler(100.0, 6)
    parts = []
    pos = 0
    for n in rng.integers(1, 40, 200):
        parts += r.push(t[pos:pos + n], si[pos:pos + n])
        pos += n
        if pos >= t.size:
            break
    assert r.gaps == 1
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), tt)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="strictly increasing"):
        ImuResampler(100.0, 6).push(np.array([0.0, 0.0]), si[:2])


@pytest.mark.parametrize("name,src", [("walking", hugadb), ("walking", sisfall)])
def test_gait_detects_real_walking(name, src):
    t, acc, gyro = src(name)
    _, si = resample_irregular(t, to_si(acc, gyro), 100.0)
    g = detect_gait(si[:400, :3], 100.0)
    assert g.walking and g.periodicity > 0.5
    assert 70.0 <= g.cadence_spm <= 140.0


@pytest.mark.parametrize("speedup", [1.0, 1.15, 1.25, 1.35])
def test_gait_cadence_at_a_brisk_pace_is_the_stride_not_three_steps(speedup):
    """A waist sensor repeats every step: at a brisk cadence three steps lie inside the stride
    lags too and peak about as high as two. The cadence is the stride's (checked against the
    step period read from the same ACF at step lags), never 2/3 of it. SisFall SA01's and SA02's
    waist walking, played ``speedup`` x faster (interpolated)."""
    for name in ("SA01_D01_walking", "SA02_D01_walking"):
        rec = load_imu_recording(name)
        fs = rec.fs_hz
        a0 = rec.acc_g.astype(np.float64) * 9.80665
        t0 = np.arange(len(a0)) / fs
        t = np.arange(0.0, t0[-1] / speedup, 1.0 / fs)
        a = np.stack([np.interp(t * speedup, t0, a0[:, c]) for c in range(3)], axis=1)
        for s in range(0, len(a) - 400, 100):
            w = a[s:s + 400]
            g = detect_gait(w, fs)
            if not g.walking:
                continue
            m = np.linalg.norm(w, axis=1)
            m = m - m.mean()
            step_lags = np.arange(int(0.3 * fs), int(0.65 * fs) + 1)
            step = step_lags[np.argmax([np.dot(m[:-k], m[k:]) / (len(m) - k) for k in step_lags])]
            assert g.cadence_spm == pytest.approx(60.0 * fs / step, rel=0.12), (name, s)


@pytest.mark.parametrize("name,src", [("sitting", hugadb), ("standing", hugadb),
                                      ("sitting", sisfall)])
def test_gait_rejects_sitting_and_standing(name, src):
    t, acc, gyro = src(name)
    _, si = resample_irregular(t, to_si(acc, gyro), 100.0)
    for s in range(0, len(si) - 400, 200):
        g = detect_gait(si[s:s + 400, :3], 100.0)
        assert not g.walking and g.cadence_spm is None


def test_imu_pipeline_windows_chunk_invariant_and_gait():
    t, acc, gyro = hugadb("walking")
    whole = imu_windows_from_record(t, acc, gyro)
    chunked = imu_windows_from_record(t, acc, gyro, chunk=7)
    assert len(whole) == len(chunked) == 9  # 10.2 s at 100 Hz, 2 s windows, 1 s hop
    for a, b in zip(whole, chunked):
        assert a.t_end_s == b.t_end_s
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.features, b.features)
        assert a.gait == b.gait
    w = whole[-1]
    assert w.data.shape == (200, 6) and w.features.shape == (66,)
    np.testing.assert_allclose(w.features, acf_features(w.data), rtol=1e-6)
    assert sum(x.gait.walking for x in whole) >= 6
    t2, acc2, gyro2 = hugadb("sitting")
    assert not any(x.gait.walking for x in imu_windows_from_record(t2, acc2, gyro2))


def test_imu_pipeline_flags_clipped_gyro():
    t, acc, gyro = hugadb("walking")
    bad = np.clip(gyro * 10.0, -2000.0, 2000.0)  # HuGaDB's known 10x corruption
    good = ImuPipeline(gyro_range_dps=2000.0).push(t, acc, gyro).windows
    broken = ImuPipeline(gyro_range_dps=2000.0).push(t, acc, bad).windows
    assert not any(w.clipped for w in good)
    assert all(w.clipped for w in broken)


def test_imu_pipeline_never_windows_across_a_gap():
    t, acc, gyro = sisfall("walking")
    t = t.copy()
    t[400:] += 2.0  # BLE drop-out of 2 s after 4 s
    pipe = ImuPipeline()
    wins = []
    for s in range(0, len(t), 25):
        upd = pipe.push(t[s:s + 25], acc[s:s + 25], gyro[s:s + 25])
        wins += upd.windows
    assert upd.gaps == 1
    ends = np.array([w.t_end_s for w in wins])
    before, after = ends[ends < t[400]], ends[ends >= t[400]]
    assert before.max() <= t[399] + 1e-9
    # the first window after the gap starts at the first sample after it
    assert after.min() == pytest.approx(t[400] + 1.99, abs=1e-6)
    assert len(before) == 3 and len(after) == 3


def _vibration(odr: float, seconds: float = 6.0, hz: float = 130.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Still sensor on a 0.5 g, ``hz`` vibration (a motor, a vehicle), sampled at ``odr``."""
    n = int(odr * seconds)
    t = 1.8e9 + np.arange(n) / odr
    acc = np.zeros((n, 3), np.float32)
    acc[:, 2] = 1.0 + 0.5 * np.sin(2 * np.pi * hz * (t - t[0]))
    return t, acc, np.zeros((n, 3), np.float32)


def test_rates_above_the_model_rate_are_low_passed_before_resampling() -> None:
    """At 800 Hz a 130 Hz vibration folded into a full-size 30 Hz movement of the 100 Hz windows
    (|acc| std 3.5 m/s², far above what 'rest' allows); with the anti-alias filter it is gone."""
    from daemon.dsp.imu_pipeline import ImuPipeline

    t, acc, gyro = _vibration(800.0)
    plain = ImuPipeline().push(t, acc, gyro).windows[-1].data
    filtered = ImuPipeline(input_hz=800.0).push(t, acc, gyro).windows[-1].data
    assert np.linalg.norm(plain[:, :3], axis=1).std() > 2.0
    assert np.linalg.norm(filtered[:, :3], axis=1).std() < 0.1
    # gravity passes untouched
    assert np.linalg.norm(filtered[:, :3], axis=1).mean() == pytest.approx(9.80665, rel=1e-3)


def test_anti_alias_is_chunk_invariant_and_absent_at_the_model_rate() -> None:
    from daemon.dsp.imu_pipeline import ImuPipeline, imu_windows_from_record

    t, acc, gyro = _vibration(400.0, hz=30.0)
    whole = imu_windows_from_record(t, acc, gyro, input_hz=400.0)
    chunked = imu_windows_from_record(t, acc, gyro, chunk=37, input_hz=400.0)
    assert len(whole) == len(chunked) > 0
    for a, b in zip(whole, chunked):
        assert np.allclose(a.data, b.data, atol=1e-5)
    # at 100 Hz, the rate every model was trained at, the pipeline is what it always was
    t, acc, gyro = _vibration(100.0, hz=7.0)
    same = ImuPipeline(input_hz=100.0).push(t, acc, gyro).windows
    ref = ImuPipeline().push(t, acc, gyro).windows
    assert all(np.array_equal(a.data, b.data) for a, b in zip(same, ref))


def test_sensor_pipeline_survives_a_time_line_that_goes_back(caplog: pytest.LogCaptureFixture) -> None:
    """ImuPipeline rightly refuses times that go backwards; on the hub that ended IMU processing
    for the rest of the run (the consumer task died). The sensor pipeline logs and goes on."""
    from daemon.dsp.imu_pipeline import SensorImuPipeline

    t, acc, gyro = _vibration(100.0, seconds=8.0, hz=2.0)
    p = SensorImuPipeline(8.0, 1000.0, 100.0)
    first = p.push(t[:400], acc[:400], gyro[:400])
    assert first.windows
    back = p.push(t[:400] - 1.0, acc[:400], gyro[:400])  # e.g. a reconnect anchored too early
    assert back.windows == () and p.restarts == 1 and "starts again" in caplog.text
    later = p.push(t[400:], acc[400:], gyro[400:])
    assert later.windows and later.gaps >= first.gaps + 1


def test_stride_peak_when_no_acf_peak_inside_the_lags_is_positive():
    """The ACF (stride lags 0.7-1.5 s) of one real 2 s SisFall waist window, the 10-min signal of
    `training.eval throughput`: highest at the shortest lag, every interior peak negative. "Within
    0.85 of the best peak" then selected nothing and raised IndexError, ending the IMU path."""
    from daemon.dsp.imu import _stride_peak

    rn = np.array([
        0.57, 0.552, 0.527, 0.502, 0.482, 0.47, 0.464, 0.462, 0.458, 0.448, 0.429, 0.401, 0.368,
        0.333, 0.305, 0.285, 0.274, 0.268, 0.259, 0.239, 0.205, 0.159, 0.108, 0.063, 0.031, 0.014,
        0.009, 0.006, -0.002, -0.026, -0.066, -0.119, -0.176, -0.232, -0.28, -0.319, -0.352,
        -0.381, -0.409, -0.433, -0.452, -0.46, -0.458, -0.449, -0.438, -0.431, -0.434, -0.446,
        -0.465, -0.485, -0.501, -0.509, -0.506, -0.491, -0.466, -0.434, -0.401, -0.37, -0.344,
        -0.322, -0.301, -0.281, -0.258, -0.231, -0.198, -0.161, -0.12, -0.079, -0.038, 0.0,
        0.035, 0.069, 0.104, 0.143, 0.188, 0.237, 0.286, 0.33, 0.365, 0.392, 0.415])
    assert _stride_peak(rn) == 0  # the ACF's maximum, as before the stride-peak rule
    two = np.array([0.1, 0.5, 0.2, 0.45, 0.1])  # positive peaks: the shortest within 0.85 of the best
    assert _stride_peak(two) == 1 and _stride_peak(np.array([0.1, 0.3, 0.2, 0.9, 0.1])) == 3
