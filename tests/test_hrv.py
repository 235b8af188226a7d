"""HR and HRV: known answers on hand-made RR series, ectopic and gap handling."""
from __future__ import annotations

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
