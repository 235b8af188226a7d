"""The streaming ECG pipeline on real ECG: chunk invariance, window shapes, HR vs annotations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.dsp.ecg_pipeline import EcgPipeline, EcgUpdate, windows_from_record
from daemon.dsp.rpeaks import Beat

HERE = Path(__file__).parent / "fixtures" / "ecg_pipeline"
LUDB = np.load(HERE / "ludb_3lead.npz")
MIT = np.load(HERE / "mitdb_101_2min.npz")


def ludb(i: int) -> np.ndarray:
    return LUDB["signals"][i].astype(np.float32) / LUDB["adc_gain"][i][None, :]


def ludb_peaks(i: int) -> np.ndarray:
    return LUDB["qrs_peaks"][LUDB["qrs_record"] == i]


def mit() -> np.ndarray:
    return ((MIT["counts"].astype(np.float32) - MIT["baseline"]) / MIT["gain"]).reshape(-1, 1)


@pytest.mark.parametrize("i", [0, 3])
def test_windows_identical_for_any_chunking(i):
    x = ludb(i)
    ref = windows_from_record(x, 500.0, chunk_s=10.0)
    for chunk_s in (0.05, 0.37, 1.0):
        other = windows_from_record(x, 500.0, chunk_s=chunk_s)
        np.testing.assert_array_equal(other.beats, ref.beats)
        np.testing.assert_array_equal(other.t_end_s, ref.t_end_s)
        np.testing.assert_array_equal(other.reason, ref.reason)
        np.testing.assert_array_equal(other.lead_mask, ref.lead_mask)
        # the rational resampler is chunk-invariant to float rounding
        np.testing.assert_allclose(other.data, ref.data, atol=2e-4)
        np.testing.assert_allclose(other.beat_groups, ref.beat_groups, atol=2e-4)
        np.testing.assert_allclose(other.quality_index, ref.quality_index, atol=1e-3)
    # irregular chunk sizes through the push API
    rng = np.random.default_rng(i)
    pipe = EcgPipeline(500.0)
    wins = []
    pos = 0
    while pos < len(x):
        n = int(rng.integers(1, 400))
        wins += pipe.push(x[pos:pos + n], np.ones(3, bool)).windows
        pos += n
    wins += pipe.flush().windows
    np.testing.assert_allclose(np.stack([w.data for w in wins]), ref.data, atol=2e-4)


def test_every_lead_off_inside_one_push_gives_what_small_pushes_give():
    """Four LUDB records, every lead off for 2.5 s after each (a wearer taking the electrodes
    off; the daemon joins what queued while it was busy into one push). Beats, windows and
    their quality must not depend on the push size: one push kept false beats right after a
    return that small pushes drop, because the returns were forgotten relative to the end of
    the push instead of its start."""
    gap = int(2.5 * 500)
    parts, valid = [], []
    for i in range(4):
        parts += [ludb(i), np.zeros((gap, 3), np.float32)]
        valid += [np.ones((len(parts[-2]), 3), bool), np.zeros((gap, 3), bool)]
    x, v = np.concatenate(parts), np.concatenate(valid)

    def run(step: int) -> tuple[list[int], list[tuple[float, str]], np.ndarray]:
        beats, wins, _ = _stream(x, v, step)
        return ([b.sample for b in beats], [(w.t_end_s, w.quality.reason) for w in wins],
                np.stack([w.data for w in wins]))

    ref = run(100)
    assert len(ref[0]) >= 35
    for step in (len(x), 7000):
        got = run(step)
        assert got[0] == ref[0]
        assert got[1] == ref[1]
        np.testing.assert_allclose(got[2], ref[2], atol=2e-4)


def test_window_shapes_and_normalisation():
    x = ludb(2)
    rw = windows_from_record(x, 500.0)
    assert rw.data.shape == (7, 300, 3) and rw.data.dtype == np.float32
    np.testing.assert_allclose(rw.data.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(rw.data.std(axis=1), 1, atol=1e-3)
    np.testing.assert_array_equal(rw.t_end_s, np.arange(3.0, 10.0))
    w = max(rw.windows, key=lambda w: len(w.beat_times_s))
    assert w.beats.ndim == 3 and w.beats.shape[1:] == (210, 3)  # 3 x (25 + 45) samples
    assert w.beats.shape[0] == max(len(w.beat_times_s) - 2, 0) >= 1
    # every beat in the annotated span (LUDB marks nothing in the first ~1 s) is an annotated QRS
    ann = ludb_peaks(2) / 500.0
    for v in rw.windows:
        bt = v.beat_times_s[v.beat_times_s >= ann[0] - 0.1]
        if bt.size:
            assert np.abs(ann[:, None] - bt[None, :]).min(axis=0).max() < 0.02
    mm = windows_from_record(x, 500.0, norm="minmax")
    np.testing.assert_allclose(mm.data.min(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(mm.data.max(axis=1), 1, atol=1e-6)
    assert rw.beat_groups.shape[1:] == (210, 3) and rw.beat_group_ok.all()
    assert len(np.unique(rw.beat_group_t_s)) == len(rw.beat_group_t_s)


@pytest.mark.parametrize("i", range(4))
def test_heart_rate_matches_annotations_ludb(i):
    ann_hr = 60.0 / np.median(np.diff(ludb_peaks(i)) / 500.0)
    rw = windows_from_record(ludb(i), 500.0)
    assert rw.heart_rate_bpm == pytest.approx(ann_hr, abs=2.0)


def test_heart_rate_hrv_and_live_on_mitdb_single_lead():
    x = mit()
    ann = MIT["ann_sample"] / 360.0
    pipe = EcgPipeline(360.0, n_leads=1)
    step = 90  # 250 ms frames
    checked = 0
    upd = None
    for s in range(0, len(x), step):
        upd = pipe.push(x[s:s + step], np.ones(1, bool))
        assert isinstance(upd, EcgUpdate)
        assert all(isinstance(b, Beat) for b in upd.beats)
        t = (s + step) / 360.0
        if t > 20 and s % (360 * 10) < step:
            recent = ann[(ann > t - 12) & (ann <= t - 2.5)]
            ann_hr = 60.0 / np.median(np.diff(recent))
            assert upd.heart_rate_bpm == pytest.approx(ann_hr, abs=2.0)
            assert upd.live
            checked += 1
    assert checked >= 9
    h = upd.hrv
    assert h is not None and h.n_intervals >= 10 and 0 < h.rmssd_ms < 300 and 0 < h.sdnn_ms < 300
    # electrodes off: no lead on -> not live, and windows say lead_off
    off = None
    for s in range(0, 360 * 4, step):
        off = pipe.push(x[s:s + step], np.zeros(1, bool))
    assert not off.live
    reasons = [w.quality.reason for w in pipe.push(x[:360 * 3], np.zeros(1, bool)).windows]
    assert reasons and set(reasons) == {"lead_off"}


def test_bad_input_is_rejected_clearly():
    pipe = EcgPipeline(500.0)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        pipe.push(np.zeros((10, 2), np.float32), np.ones(3, bool))
    # a non-finite sample is the driver's fault, not a reason to stop the stream: handled
    # (held, its windows rejected: tests/test_dsp_robustness.py), never raised
    bad = np.zeros((10, 3), np.float32)
    bad[3, 1] = np.nan
    pipe.push(bad, np.ones(3, bool))
    with pytest.raises(ValueError, match="lead_valid"):
        pipe.push(np.zeros((10, 3), np.float32), np.ones(2, bool))
    with pytest.raises(ValueError, match="whole number of samples"):
        EcgPipeline(500.0, window_s=3.0001)
    with pytest.raises(ValueError, match="norm"):
        EcgPipeline(500.0, norm="robust")


def _stream(x: np.ndarray, valid: np.ndarray, chunk: int) -> tuple[list[Beat], list, list[EcgUpdate]]:
    pipe = EcgPipeline(500.0)
    beats, wins, ups = [], [], []
    for s in range(0, len(x), chunk):
        u = pipe.push(x[s:s + chunk], valid[s:s + chunk])
        beats += u.beats
        wins += u.windows
        ups.append(u)
    u = pipe.flush()
    return beats + list(u.beats), wins + list(u.windows), ups


def test_a_lead_back_from_a_rail_gives_the_undisturbed_signal_after_settling():
    """While an electrode is off the box sends that lead at a rail; when it is back, the filters
    must not ring with the step for seconds in windows that pass as clean (they did: served
    embeddings at cosine 0.1-0.5 of the undisturbed ones, and a false beat at the reconnection)."""
    x = np.concatenate([ludb(0), ludb(0)])  # 20 s
    ok = np.ones_like(x, dtype=bool)
    off = slice(int(6.0 * 500), int(7.5 * 500))
    x_off, v_off = x.copy(), ok.copy()
    x_off[off, 0], v_off[off, 0] = 300.0, False  # lead I at the rail, flagged off
    ref_beats, ref_wins, _ = _stream(x, ok, 97)
    beats, wins, _ = _stream(x_off, v_off, 97)
    assert [w.t_end_s for w in wins] == [w.t_end_s for w in ref_wins]
    for w, r in zip(wins, ref_wins):
        start = w.t_end_s - 3.0
        if start < 7.5 + 2.0 and w.t_end_s > 6.0:  # off, or settling (2 s): lead I not used
            assert not w.lead_mask[0], w.t_end_s
        elif start >= 9.5:
            assert w.lead_mask[0] and np.abs(w.data[:, 0] - r.data[:, 0]).max() < 0.05, w.t_end_s
    # the beats of leads II and III carry on; after the lead is back, the same beats as undisturbed
    after = lambda bs: np.array([b.time_s for b in bs if b.time_s > 8.0])  # noqa: E731
    assert len(after(beats)) == len(after(ref_beats))
    assert np.abs(after(beats) - after(ref_beats)).max() <= 0.004
    # and the hold is chunk-invariant like the rest
    _, wins_big, _ = _stream(x_off, v_off, 1000)
    np.testing.assert_allclose(np.stack([w.data for w in wins_big]), np.stack([w.data for w in wins]), atol=2e-4)


def test_the_next_wearer_does_not_get_the_last_ones_heart_rate():
    """All electrodes off for 3 s, then another person: no update after the leads came off may
    carry the first person's heart rate (57 bpm), nor say live before the new person's beats."""
    a, b = ludb(0), ludb(3)  # 57 and 99 bpm
    gap = np.zeros((1500, 3), np.float32)
    x = np.concatenate([a, gap, b])
    v = np.ones_like(x, dtype=bool)
    v[len(a):len(a) + len(gap)] = False
    _, _, ups = _stream(x, v, 100)
    off_at = len(a) // 100
    assert ups[off_at - 1].heart_rate_bpm is not None and abs(ups[off_at - 1].heart_rate_bpm - 57) < 5
    after = ups[off_at:]
    hrs = [u.heart_rate_bpm for u in after if u.heart_rate_bpm is not None]
    assert hrs and all(abs(hr - 99) < 10 for hr in hrs), hrs
    back = (len(a) + len(gap)) // 100
    assert not ups[back].live, "live on the previous wearer's beats"
    assert ups[-1].live
