"""Fixed and beat-centred windows: one streaming code path, chunk-invariant, normalised."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.dsp.segment import SlidingWindower, WindowSegmenter, normalize, segment_record

FIX = Path(__file__).parent / "fixtures" / "ecg_pipeline" / "ludb_3lead.npz"


def ludb_100hz() -> tuple[np.ndarray, np.ndarray]:
    """Record 0 of the LUDB fixture (leads I, II, III) decimated 500 -> 100 Hz, and its
    cardiologist-annotated QRS peaks (lead II) at 100 Hz."""
    z = np.load(FIX)
    x = z["signals"][0].astype(np.float32) / z["adc_gain"][0][None, :3]
    peaks = z["qrs_peaks"][z["qrs_record"] == 0]
    return x[::5], np.round(peaks / 5).astype(np.int64)


def test_normalize_zscore_minmax_and_masked_leads():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (4, 300, 3)).astype(np.float32)
    z = normalize(x, "zscore")
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=1), 1, atol=1e-4)
    m = normalize(x, "minmax", np.array([True, False, True]))
    assert m.dtype == np.float32
    np.testing.assert_allclose(m[..., [0, 2]].min(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(m[..., [0, 2]].max(axis=1), 1, atol=1e-6)
    assert np.all(m[..., 1] == 0)
    flat = np.ones((300, 3), np.float32)
    assert np.all(normalize(flat, "zscore") == 0)  # a flat lead is zeros, not amplified noise
    with pytest.raises(ValueError, match="zscore"):
        normalize(x, "l2")


def test_sliding_windower_hop_and_chunking():
    x = np.arange(1000, dtype=np.float32)[:, None].repeat(2, 1)
    w = SlidingWindower(2, 300, 100)
    ends, wins, masks = w.push(x)
    assert list(ends) == list(range(300, 1001, 100))
    np.testing.assert_array_equal(wins[2, :, 0], np.arange(200, 500))
    w2 = SlidingWindower(2, 300, 100)
    got = [w2.push(x[i:i + 13], valid=np.array([True, i < 500]))[1] for i in range(0, 1000, 13)]
    got = np.concatenate([g for g in got if len(g)])
    np.testing.assert_array_equal(got, wins)


def test_segments_identical_for_any_chunking_on_real_ecg():
    x, peaks = ludb_100hz()
    kw = dict(window_len=300, hop=100, before=25, after=45)
    whole = segment_record(x, peaks, **kw)
    assert len(whole) == 8
    for chunk in (1, 5, 37, 250):
        other = segment_record(x, peaks, chunk=chunk, **kw)
        assert len(other) == len(whole)
        for a, b in zip(whole, other):
            assert a.end == b.end
            np.testing.assert_array_equal(a.data, b.data)
            np.testing.assert_array_equal(a.groups, b.groups)
            np.testing.assert_array_equal(a.beat_samples, b.beat_samples)


def test_unnormalised_segmenter_gives_the_same_raw_windows_and_beats():
    """``normalised=False`` (the beat path, which reads only raw windows and beats) skips the
    normalisation and the groups and changes nothing else."""
    x, peaks = ludb_100hz()
    kw = dict(window_len=300, hop=100, before=25, after=45)
    full, bare = segment_record(x, peaks, **kw), segment_record(x, peaks, normalised=False, **kw)
    assert [s.end for s in bare] == [s.end for s in full]
    for a, b in zip(full, bare):
        np.testing.assert_array_equal(a.raw, b.raw)
        np.testing.assert_array_equal(a.beats, b.beats)
        np.testing.assert_array_equal(a.beat_samples, b.beat_samples)
        np.testing.assert_array_equal(b.data, b.raw)
        assert b.groups.shape[0] == 0
    assert any(a.groups.shape[0] > 0 for a in full)


def test_window_and_beat_shapes_and_content():
    x, peaks = ludb_100hz()
    seg = segment_record(x, peaks, window_len=300, hop=100, before=25, after=45, norm="minmax")
    s = seg[3]
    assert s.data.shape == (300, 3) and s.data.dtype == np.float32
    np.testing.assert_allclose(s.data.min(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(s.data.max(axis=0), 1, atol=1e-6)
    start = s.end - 300
    inside = peaks[(peaks - 25 >= start) & (peaks + 45 <= s.end)]
    np.testing.assert_array_equal(s.beat_samples, inside)
    assert s.beats.shape == (len(inside), 70, 3)
    # each single beat is the input around its R peak
    np.testing.assert_array_equal(s.beats[0], x[inside[0] - 25: inside[0] + 45])
    # groups of 3 consecutive beats, stride 1, normalised per lead
    assert s.groups.shape == (len(inside) - 2, 210, 3)
    np.testing.assert_allclose(s.groups.max(axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(
        s.groups[0], normalize(np.concatenate(list(s.beats[:3])), "minmax"))


def test_windows_held_back_until_beats_are_final():
    x, peaks = ludb_100hz()
    seg = WindowSegmenter(3, 300, 100, 25, 45)
    out = seg.push(x[:600], peaks[peaks < 400], beats_final_until=400)
    assert [s.end for s in out] == [300, 400]
    out = seg.push(x[600:], peaks[peaks >= 400])
    assert [s.end for s in out] == list(range(500, 1001, 100))
