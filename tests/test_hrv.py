"""HR and HRV: known answers on hand-made RR series, ectopic and gap handling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.dsp.hrv import HeartRateTracker, nn_intervals, rmssd, sdnn


def test_rmssd_sdnn_known_answer():
    rr = np.array([0.80, 0.82, 0.78, 0.80, 0.85])
    # successive differences 20, -40, 20, 50 ms -> sqrt((400+1600+400+2500)/4) = 35 ms
    assert rmssd(rr) == pytest.approx(35.0, abs=1e-9)
    # mean 810 ms, deviations -10, 10, -30, -10, 40 -> sqrt(2800/5) ms
    assert sdnn(rr) == pytest.approx(np.sqrt(560.0), abs=1e-9)
    # a break in contiguity drops the difference across it
    assert rmssd(rr, [True, False, True, True]) == pytest.approx(np.sqrt((400 + 400 + 2500) / 3))
    with pytest.raises(ValueError):
        rmssd(np.array([0.8]))


def test_nn_intervals_drop_unclean_ectopic_and_implausible():
    rr = np.array([0.8, 0.8, 0.8, 0.5, 1.1, 0.8, 0.8, 0.8, 0.8])  # premature beat + pause
    t = np.concatenate([[0.0], np.cumsum(rr)])
    clean = np.ones(t.size, bool)
    nn, contiguous = nn_intervals(t, clean)
    assert np.allclose(nn, 0.8) and nn.size == 7
    assert contiguous.tolist() == [True, True, False, True, True, True]
    clean[7] = False  # beat rejected by quality: both RRs touching it go
    nn2, _ = nn_intervals(t, clean)
    assert nn2.size == 5
    t3 = np.array([0.0, 0.1, 0.9, 1.7, 4.0])  # 600 bpm and 26 bpm intervals are not RRs
    assert nn_intervals(t3, np.ones(5, bool))[0].tolist() == pytest.approx([0.8, 0.8])


def test_tracker_heart_rate_and_hrv():
    rng = np.random.default_rng(3)
    rr = 0.75 + 0.03 * rng.standard_normal(80)  # 80 bpm with some variability
    t = np.cumsum(rr)
    tr = HeartRateTracker()
    assert tr.heart_rate_bpm() is None and tr.hrv() is None
    tr.push(t[:40], True)
    tr.push(t[40:], True)
    recent = np.diff(t)[-8:]
    assert tr.heart_rate_bpm() == pytest.approx(60 / np.median(recent))
    h = tr.hrv()
    nn, cont = nn_intervals(t[t >= t[-1] - 60], np.ones((t >= t[-1] - 60).sum(), bool))
    assert h.n_intervals == nn.size
    assert h.rmssd_ms == pytest.approx(rmssd(nn, cont)) and h.sdnn_ms == pytest.approx(sdnn(nn))
    with pytest.raises(ValueError, match="increasing"):
        tr.push(t[:1], True)
    dirty = HeartRateTracker()
    dirty.push(t, False)
    assert dirty.heart_rate_bpm() is None and dirty.last_clean_time() is None


# --- real MIT-BIH rhythms (tests/fixtures/ecg/mitdb_excerpts.npz; attribution in its README) ---
_MITDB = Path(__file__).parent / "fixtures" / "ecg" / "mitdb_excerpts.npz"


def _annotated(rec: str) -> tuple[np.ndarray, np.ndarray]:
    """Beat times (s) and symbols of a 60 s MIT-BIH excerpt (the experts' beat labels only)."""
    z = np.load(_MITDB)
    return z[f"ann_sample_{rec}"] / float(z["fs"]), z[f"ann_symbol_{rec}"]


def _reference(t: np.ndarray, sym: np.ndarray) -> tuple[float, float, float]:
    """HR (60 / median NN), RMSSD, SDNN of the annotations' NN intervals: both beats 'N'; a
    successive difference only between two adjacent such intervals."""
    rr = np.diff(t)
    nn_ok = (sym[1:] == "N") & (sym[:-1] == "N")
    d = np.diff(rr)[nn_ok[1:] & nn_ok[:-1]]
    nn = rr[nn_ok]
    return 60.0 / np.median(nn), np.sqrt(np.mean(d * d)) * 1000.0, nn.std() * 1000.0


@pytest.mark.parametrize("rec", ["119", "208"])
def test_nn_intervals_match_annotated_nn_through_ventricular_ectopics(rec):
    """119 (0-60 s): ventricular bigeminy and trigeminy; 208 (200-260 s): PVCs (only ~15 %
    premature), couplets and fusion beats. Every annotated beat is given as clean, so the ectopic
    filter alone must find the N-N intervals. Tolerances: HR 3 bpm, SDNN 20 %, RMSSD 50 % (timing
    cannot see 208's fusion beats or its PVCs that come on time; 119 matches exactly). The median
    filter this replaced gave 119: RMSSD 431 vs 43 ms, SDNN 215 vs 30 ms (60/median NN was fine);
    208: RMSSD 72 vs 21 ms, SDNN 45 vs 27 ms."""
    t, sym = _annotated(rec)
    hr_ref, rmssd_ref, sdnn_ref = _reference(t, sym)
    nn, cont = nn_intervals(t, np.ones(t.size, bool))
    assert 60.0 / np.median(nn) == pytest.approx(hr_ref, abs=3.0)
    assert sdnn(nn) == pytest.approx(sdnn_ref, rel=0.2)
    assert rmssd(nn, cont) == pytest.approx(rmssd_ref, rel=0.5)
    tr = HeartRateTracker()
    tr.push(t, True)
    h = tr.hrv()
    assert h is not None and h.rmssd_ms == pytest.approx(rmssd_ref, rel=0.5)
    assert h.sdnn_ms == pytest.approx(sdnn_ref, rel=0.2)


def test_sinus_rhythm_keeps_its_values_and_sheds_a_mild_pvc():
    """Real sinus rhythm (MIT-BIH 101, 60 s, all 'N', RMSSD ~29 ms) loses no interval; a premature
    beat inserted 15 % early with its compensatory pause (the size of 208's PVCs, which the old
    +-20 % median filter let through) takes out exactly its two intervals."""
    t, sym = _annotated("101")
    assert set(sym.tolist()) == {"N"}
    _, rmssd_ref, sdnn_ref = _reference(t, sym)
    nn, cont = nn_intervals(t, np.ones(t.size, bool))
    assert nn.size == t.size - 1 and cont.all()
    assert rmssd(nn, cont) == pytest.approx(rmssd_ref, abs=1e-9)
    assert sdnn(nn) == pytest.approx(sdnn_ref, abs=1e-9)
    k = 30
    t2 = t.copy()
    t2[k] -= 0.15 * (t[k] - t[k - 1])  # premature by 15 % of its RR; the next beat is on time
    nn2, cont2 = nn_intervals(t2, np.ones(t2.size, bool))
    expect = np.delete(np.diff(t), [k - 1, k])
    assert nn2.size == expect.size and np.allclose(nn2, expect)
    assert cont2.sum() == cont.size - 3  # the three differences touching the two removed RRs go


def test_rmssd_needs_a_minimum_of_successive_differences():
    """RMSSD is a mean of successive differences: ten NN intervals that are mostly isolated must
    not give an RMSSD resting on one difference (reviewer's hrv_few repro)."""
    def tracker(n_pairs: int) -> HeartRateTracker:
        t = np.cumsum(np.r_[0.0, np.full(60, 0.8)])
        t[1::2] += 0.02  # alternating 820/780 ms: every successive difference is 40 ms
        clean = np.zeros(t.size, bool)
        clean[: n_pairs + 2] = True  # one run of n_pairs + 1 NN intervals -> n_pairs differences
        clean[n_pairs + 4::3] = True  # then isolated NN intervals (beat pairs), no differences
        clean[n_pairs + 5::3] = True
        tr = HeartRateTracker()
        tr.push(t, clean)
        return tr

    assert tracker(1).hrv() is None
    from daemon.dsp.hrv import MIN_SUCCESSIVE_DIFFERENCES as m

    assert tracker(m - 1).hrv() is None
    h = tracker(m).hrv()
    assert h is not None and h.n_differences == m and h.n_intervals >= 10
    assert h.rmssd_ms == pytest.approx(40.0)


def test_deferred_hrv_is_the_hrv_of_its_push_whenever_it_is_read():
    """EcgUpdate.hrv is computed on first access (the daemon publishes no HRV, and it cost a
    few % of the ECG path on every push): it must still be the HRV as of that push, not of
    the beats pushed since, and equal what the eager call gives."""
    rng = np.random.default_rng(5)
    t = np.cumsum(0.8 + 0.05 * rng.standard_normal(200))
    tracker, eager = HeartRateTracker(), HeartRateTracker()
    tracker.push(t[:100], True)
    eager.push(t[:100], True)
    deferred = tracker.hrv_deferred()
    tracker.push(t[100:], np.arange(100) % 7 != 0)  # later beats, some not clean
    tracker.forget_until(float(t[150]))
    got, want = deferred(), eager.hrv()
    assert got is not None and got == want
    assert deferred() is got  # computed once
    assert tracker.hrv() != want  # the tracker itself has moved on
