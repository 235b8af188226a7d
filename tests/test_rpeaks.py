"""Streaming R-peak detector on real MIT-BIH and LUDB excerpts (tests/fixtures/ecg/README.md).

Thresholds sit slightly under what the detector measures on these excerpts, so that a
regression in detection, timing, fusion or streaming shows up here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.dsp.rpeaks import Beat, RPeakDetector, detect_rpeaks
from training.eval.rpeaks import match

FIXTURES = Path(__file__).parent / "fixtures" / "ecg"
MIT = np.load(FIXTURES / "mitdb_excerpts.npz")
LUDB = np.load(FIXTURES / "ludb_excerpts.npz")
MIT_FS = float(MIT["fs"])
LUDB_FS = float(LUDB["fs"])


def mit(rec: str) -> tuple[np.ndarray, np.ndarray]:
    x = (MIT[f"sig_{rec}"].astype(np.float32) - MIT[f"baseline_{rec}"]) / MIT[f"gain_{rec}"]
    return x.astype(np.float32), MIT[f"ann_sample_{rec}"].astype(np.int64)


def ludb(i: int) -> tuple[np.ndarray, list[np.ndarray]]:
    x = (LUDB["signals"][i] / LUDB["adc_gain"][i][None, :]).astype(np.float32)
    refs = [np.sort(LUDB["ann_sample"][(LUDB["ann_record"] == i) & (LUDB["ann_lead"] == l)]).astype(np.int64)
            for l in range(3)]
    return x, refs


def in_span(det: np.ndarray, ref: np.ndarray, fs: float) -> np.ndarray:
    """LUDB's first and last second carry no marks: score between the marks +-0.5 s."""
    return det[(det >= ref[0] - fs / 2) & (det <= ref[-1] + fs / 2)]


def stream(det: RPeakDetector, x: np.ndarray, sizes, valid=None) -> list[Beat]:
    out, i, k = [], 0, 0
    while i < x.shape[0]:
        n = int(sizes[k % len(sizes)])
        v = None if valid is None else valid[i:i + n]
        out += det.process(x[i:i + n], v)
        i, k = i + n, k + 1
    return out + det.flush()


@pytest.mark.parametrize("rec,min_se,min_ppv", [("101", 1.0, 1.0), ("119", 1.0, 1.0), ("208", 0.99, 0.99)])
def test_mitdb_excerpts_sensitivity_precision_timing(rec, min_se, min_ppv):
    x, ref = mit(rec)
    det = detect_rpeaks(x, MIT_FS)
    tp, err = match(ref, det, int(0.075 * MIT_FS))
    assert tp / ref.size >= min_se
    assert tp / det.size >= min_ppv
    assert np.median(np.abs(err)) * 1000 / MIT_FS <= 4.0  # at the R peak, not a delayed fiducial


def test_ludb_single_leads_match_cardiologists_marks():
    tp = n_ref = n_det = 0
    errs = []
    for i in range(LUDB["signals"].shape[0]):
        x, refs = ludb(i)
        for lead in range(3):
            det = in_span(detect_rpeaks(x[:, lead], LUDB_FS), refs[lead], LUDB_FS)
            t, e = match(refs[lead], det, int(0.075 * LUDB_FS))
            tp, n_ref, n_det = tp + t, n_ref + refs[lead].size, n_det + det.size
            errs.append(e)
    f1 = 2 * tp / (n_ref + n_det)
    err_ms = np.abs(np.concatenate(errs)) * 1000 / LUDB_FS
    assert f1 >= 0.995
    assert np.median(err_ms) <= 3.0
    assert np.percentile(err_ms, 90) <= 6.0


def test_ludb_three_leads_fused():
    for i in range(LUDB["signals"].shape[0]):
        x, refs = ludb(i)
        det = RPeakDetector(LUDB_FS, 3)
        beats = stream(det, x, [250])
        s = in_span(np.array([b.sample for b in beats]), refs[1], LUDB_FS)
        tp, err = match(refs[1], s, int(0.075 * LUDB_FS))
        assert tp == refs[1].size == s.size
        assert np.median(np.abs(err)) * 1000 / LUDB_FS <= 10.0  # R time may come from another lead
        assert all(b.leads_used == 0b111 for b in beats)


def test_ludb_three_leads_fused_report_each_leads_own_r():
    """Each lead's marks against that lead's own R of every fused beat: every beat found on
    every lead, at the lead's peak (the common R alone is up to tens of ms off on some leads)."""
    errs_own, errs_common = [], []
    for i in range(LUDB["signals"].shape[0]):
        x, refs = ludb(i)
        beats = stream(RPeakDetector(LUDB_FS, 3), x, [250])
        per_lead = np.array([b.lead_samples for b in beats])
        assert per_lead.shape == (len(beats), 3) and (per_lead >= 0).all()
        assert all(b.sample in b.lead_samples for b in beats)  # the refining lead's is the R
        assert (np.abs(per_lead - np.array([b.sample for b in beats])[:, None]) <= 0.05 * LUDB_FS).all()
        for lead in range(3):
            s = in_span(per_lead[:, lead], refs[lead], LUDB_FS)
            tp, err = match(refs[lead], s, int(0.075 * LUDB_FS))
            assert tp == refs[lead].size == s.size, (i, lead)
            errs_own.append(err)
            _, err_c = match(refs[lead], in_span(np.array([b.sample for b in beats]), refs[lead], LUDB_FS),
                             int(0.075 * LUDB_FS))
            errs_common.append(err_c)
    own = np.abs(np.concatenate(errs_own)) * 1000 / LUDB_FS
    common = np.abs(np.concatenate(errs_common)) * 1000 / LUDB_FS
    assert np.median(own) <= 3.0
    assert np.percentile(own, 90) < np.percentile(common, 90)


def test_any_chunking_gives_the_same_beats():
    x, _ = mit("208")  # PVCs and fusion beats: search-back and T-wave logic are exercised
    whole = detect_rpeaks(x, MIT_FS, chunk=x.shape[0])
    assert whole.size > 90
    rng = np.random.default_rng(7)
    for sizes in ([1000], [5000], [37, 1, 4999, 260], list(rng.integers(1, 5000, size=30))):
        beats = stream(RPeakDetector(MIT_FS, 1), x, sizes)
        np.testing.assert_array_equal([b.sample for b in beats], whole)
    short = x[: int(12 * MIT_FS)]
    one_by_one = stream(RPeakDetector(MIT_FS, 1), short, [1])
    np.testing.assert_array_equal([b.sample for b in one_by_one], detect_rpeaks(short, MIT_FS, chunk=short.size))


def test_dead_stretches_inside_one_push_give_the_same_beats():
    """Every lead off for 1.5 s and for 3 s (longer than ``relearn_s``: the thresholds are
    learned again after each), with the ECG before, between and after: a push holding one or
    both stretches must find what small pushes find. It lost every beat before the last
    stretch of its push (22 of 67 found in one push)."""
    x, _ = mit("119")
    x = x[: int(20 * MIT_FS)]
    parts, valid = [x], [np.ones(x.size, bool)]
    for gap_s in (1.5, 3.0):
        gap = int(gap_s * MIT_FS)
        parts += [np.zeros(gap, np.float32), x]
        valid += [np.zeros(gap, bool), np.ones(x.size, bool)]
    sx, sv = np.concatenate(parts)[:, None], np.concatenate(valid)[:, None]
    small = stream(RPeakDetector(MIT_FS, 1), sx, [100], sv)
    ref = np.array([b.sample for b in small])
    per_piece = [np.count_nonzero((ref >= a) & (ref < a + x.size))
                 for a in (0, x.size + int(1.5 * MIT_FS), 2 * x.size + int(4.5 * MIT_FS))]
    assert min(per_piece) >= 20  # beats in each of the three ECG pieces
    for sizes in ([sx.shape[0]], [5000], [37, 1, 4999, 260], [12000, 3]):
        beats = stream(RPeakDetector(MIT_FS, 1), sx, sizes, sv)
        np.testing.assert_array_equal([b.sample for b in beats], ref)
        np.testing.assert_array_equal([b.lead_samples for b in beats], [b.lead_samples for b in small])


def test_lead_going_off_mid_stream_keeps_beats_from_the_others():
    x, refs = ludb(0)
    x = x.copy()
    off = int(4 * LUDB_FS)
    rng = np.random.default_rng(0)
    x[off:, 0] = 0.0  # lead I disconnected: flat
    x[off:, 1] = rng.normal(0, 1.0, x.shape[0] - off).astype(np.float32)  # lead II: garbage
    valid = np.ones(x.shape, bool)
    valid[off:, :2] = False
    det = RPeakDetector(LUDB_FS, 3)
    beats = []
    for i in range(0, x.shape[0], 100):  # per-call lead_valid, as the daemon passes it
        beats += det.process(x[i:i + 100], valid[i])
    beats += det.flush()
    s = in_span(np.array([b.sample for b in beats]), refs[2], LUDB_FS)
    tp, _ = match(refs[2], s, int(0.075 * LUDB_FS))
    assert tp == refs[2].size and s.size == tp
    late = [b for b in beats if b.sample > off + LUDB_FS * 0.3]
    assert len(late) >= 4 and all(b.leads_used == 0b100 for b in late)
    # no R is reported for the leads that are off
    assert all(b.lead_samples[:2] == (-1, -1) and b.lead_samples[2] == b.sample for b in late)
    # The same garbage without the mask would not be fused silently into the result.
    assert all(b.leads_used == 0b111 for b in beats if b.sample < off - LUDB_FS * 0.3)


def test_inverted_polarity_lead_is_detected_at_the_true_extremum():
    x, ref = mit("101")
    det = detect_rpeaks(-x, MIT_FS)
    tp, err = match(ref, det, int(0.075 * MIT_FS))
    assert tp == ref.size == det.size
    assert np.median(np.abs(err)) * 1000 / MIT_FS <= 6.0
    xl, refs = ludb(1)
    inv = xl.copy()
    inv[:, 1] *= -1.0
    for lead in range(3):
        a = detect_rpeaks(xl[:, lead], LUDB_FS)
        b = detect_rpeaks(inv[:, lead], LUDB_FS)
        if lead != 1:
            np.testing.assert_array_equal(a, b)
        else:  # the same complexes are found, refined to the (now negative) extremum
            tp, _ = match(a, b, int(0.03 * LUDB_FS))
            assert tp == a.size == b.size
    fused = detect_rpeaks(inv, LUDB_FS)
    tp, _ = match(refs[1], in_span(fused, refs[1], LUDB_FS), int(0.075 * LUDB_FS))
    assert tp == refs[1].size


def test_latency_is_reported_and_bounded():
    x, _ = mit("119")
    det = RPeakDetector(MIT_FS, 1)
    beats, step = [], int(0.04 * MIT_FS)  # 40 ms frames, like the serial box
    for i in range(0, x.shape[0], step):
        for b in det.process(x[i:i + step]):
            assert b.latency_s >= 0
            assert b.latency_s == pytest.approx((min(i + step, x.shape[0]) - 1 - b.sample) / MIT_FS)
            assert b.time_s == pytest.approx(b.sample / MIT_FS)
            beats.append(b)
    steady = np.array([b.latency_s for b in beats if b.time_s > 3.0])
    assert np.median(steady) < 0.5
    assert steady.max() < 1.5  # search-back can take longer, but never unbounded


def test_flush_emits_the_last_beat():
    x, ref = mit("101")
    end = int(ref[10] + 0.05 * MIT_FS)  # stream stops 50 ms after an R peak
    det = RPeakDetector(MIT_FS, 1)
    got = [b.sample for b in det.process(x[:end])]
    assert not any(abs(s - ref[10]) < 10 for s in got)
    got += [b.sample for b in det.flush()]
    assert any(abs(s - ref[10]) < 10 for s in got)


def test_bad_input_is_rejected_with_the_fix():
    det = RPeakDetector(MIT_FS, 3)
    with pytest.raises(ValueError, match=r"\(n_samples, 3\)"):
        det.process(np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError, match="lead_valid"):
        det.process(np.zeros((10, 3), np.float32), np.ones(2, bool))
    bad = np.zeros((10, 3), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="lead_valid"):
        det.process(bad)
    with pytest.raises(ValueError, match="fs"):
        RPeakDetector(20.0)


def test_all_leads_off_then_back_resumes_detection_with_bounded_memory():
    x, ref = mit("119")
    gap = int(60 * MIT_FS)
    stream_x = np.concatenate([x, np.zeros(gap, np.float32), x])
    valid = np.ones(stream_x.shape[0], bool)
    valid[x.size:x.size + gap] = False
    det = RPeakDetector(MIT_FS, 1)
    beats, longest = [], 0
    step = int(0.5 * MIT_FS)
    for i in range(0, stream_x.size, step):
        beats += det.process(stream_x[i:i + step], valid[i:i + step, None])
        longest = max(longest, det._xhp.shape[0])  # history buffer: must stay bounded
    beats += det.flush()
    assert longest < 20 * MIT_FS
    s = np.array([b.sample for b in beats])
    assert not np.any((s > x.size + 0.5 * MIT_FS) & (s < x.size + gap))  # nothing while off
    second = s[s >= x.size + gap] - (x.size + gap)
    tp, _ = match(ref, second, int(0.075 * MIT_FS))
    assert tp >= ref.size - 3  # back within a few beats (learning the lead again)


@pytest.mark.parametrize("snr_db", [12.0, 0.0])
def test_stress_noise_has_the_requested_snr_and_is_reproducible(snr_db):
    from training.eval.noise import add_noise, ecg_power

    x, _ = mit("101")
    noisy = add_noise(x, MIT_FS, snr_db, seed=3)
    noise = noisy.astype(np.float64) - x
    measured = 10 * np.log10(ecg_power(x, MIT_FS) / np.mean(noise ** 2))
    assert measured == pytest.approx(snr_db, abs=0.05)
    np.testing.assert_array_equal(noisy, add_noise(x, MIT_FS, snr_db, seed=3))
    assert not np.array_equal(noisy, add_noise(x, MIT_FS, snr_db, seed=4))


def test_electrodes_put_on_after_a_flat_start() -> None:
    """ECG-ID person 25, record 4 starts with 4 s of exact zeros (the electrodes were not yet on):
    no beat may be invented there, and once the ECG starts every beat must be found, as if the
    stream had started with the ECG (thresholds are learned again, not kept from the flat part)."""
    from firmware_protocol.emulators.recordings import load_recording

    rec = load_recording("ecgid-p25-r4")
    x = rec.leads_mv[:, :1].astype(np.float32)
    onset = int(np.flatnonzero(np.abs(x[:, 0]) > 0.01)[0])
    assert onset > 3 * rec.fs_hz  # the property this test is about
    beats = detect_rpeaks(x, rec.fs_hz, chunk=25)
    assert not (beats < onset).any()
    reference = detect_rpeaks(x[onset:], rec.fs_hz) + onset
    matched = sum(np.min(np.abs(beats - r)) <= 0.05 * rec.fs_hz for r in reference)
    assert matched == len(reference) and len(beats) == len(reference)
    rr = np.diff(beats) / rec.fs_hz
    assert 0.6 < np.median(rr) < 1.3


def test_fast_stream_filters_are_bit_identical_to_scipy() -> None:
    """The detector's private filter paths skip scipy's per-call checks; they must not change
    a single bit of the result, for any chunking (chunks of 1 sample up to longer than a block)."""
    from scipy import signal

    from daemon.dsp.filters import SosFilter, bandpass_sos
    from daemon.dsp.rpeaks import _fir_stream, _StreamSos

    x, _ = ludb(0)
    x = x.astype(np.float64)[:3000]
    sos = bandpass_sos(LUDB_FS, 4.0, 20.0, order=2)
    ref = SosFilter(sos, 3).process(x)
    fast = _StreamSos(sos, 3)
    b = np.array([2.0, 1.0, 0.0, -1.0, -2.0]) * 62.5
    w = np.full(75, 1.0 / 75)
    zd, zm, szd, szm = np.zeros((4, 3)), np.zeros(74), np.zeros((4, 3)), np.zeros(74)
    ys, ds, ms, sds, sms, i = [], [], [], [], [], 0
    for n in [1, 2, 3, 7, 25, 74, 75, 500, 1200] * 3:
        c = x[i:i + n]
        ys.append(fast.process(c))
        d, zd = _fir_stream(b, c, zd)
        m, zm = _fir_stream(w, c[:, 0], zm)
        sd, szd = signal.lfilter(b, [1.0], c, axis=0, zi=szd)  # what the detector used to call
        sm, szm = signal.lfilter(w, [1.0], c[:, 0], zi=szm)
        ds.append(d)
        ms.append(m)
        sds.append(sd)
        sms.append(sm)
        i += n
        if i >= x.shape[0]:
            break
    n = sum(len(y) for y in ys)
    assert np.array_equal(np.concatenate(ys), ref[:n]) and np.concatenate(ys).dtype == np.float32
    assert np.array_equal(np.concatenate(ds), np.concatenate(sds))
    assert np.array_equal(np.concatenate(ms), np.concatenate(sms))
    assert np.array_equal(zd, szd) and np.array_equal(zm, szm)


def test_history_buffer_matches_concatenation_and_stays_bounded() -> None:
    from daemon.dsp.rpeaks import _History

    rng = np.random.default_rng(0)
    h, ref, cap = _History((2,), np.float32), np.zeros((0, 2), np.float32), 0
    for _ in range(3000):
        c = rng.standard_normal((int(rng.integers(0, 40)), 2)).astype(np.float32)
        h.append(c)
        ref = np.concatenate([ref, c])
        if len(h) > 500:  # keep the last ~300 samples, like the detector's trimming
            k = len(h) - 300
            h.drop(k)
            ref = ref[k:]
        assert len(h) == ref.shape[0]
        cap = max(cap, h._a.shape[0])
    assert np.array_equal(h.view(), ref)
    assert cap <= 2048  # amortised growth, no leak on an endless stream
