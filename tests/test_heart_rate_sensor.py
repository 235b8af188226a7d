"""The heart-rate sensor on real ECG with a motion burst: fresh values only, unknown when not live.

MIT-BIH 101 (2 min, tests/fixtures/ecg_pipeline) with 16 s of a strong 3 Hz swing plus noise on
top from 40 s, as a wearer's movement does: the detector still finds beats, none is clean.
"""
from __future__ import annotations

import numpy as np

from daemon.dsp.ecg_pipeline import EcgPipeline
from daemon.publish.state import HeartRateSensor
from tests.test_ecg_pipeline import mit

FS = 360.0
BURST_S = (40.0, 56.0)


def _updates():
    x = mit().copy()
    a, b = int(BURST_S[0] * FS), int(BURST_S[1] * FS)
    t = np.arange(b - a) / FS
    rng = np.random.default_rng(0)
    x[a:b, 0] += (1.5 * np.sin(2 * np.pi * 3.0 * t) + 0.8 * rng.standard_normal(b - a)).astype(np.float32)
    pipe = EcgPipeline(FS, n_leads=1)
    step = int(0.2 * FS)  # the daemon's 200 ms batches
    for i in range(0, len(x), step):
        yield (i + step) / FS, pipe.push(x[i:i + step], np.ones(1, bool))


def test_heart_rate_is_published_only_from_fresh_clean_beats_and_cleared_once() -> None:
    sensor = HeartRateSensor(interval_s=1.0)
    sent: list[tuple[float, str, float | None]] = []
    old_rule_age = []  # what publishing every second while live (the rule before) would have shown
    for now, u in _updates():
        if u.live and u.heart_rate_bpm is not None and u.heart_rate_at_s is not None:
            old_rule_age.append(now - u.heart_rate_at_s)
        payload = sensor.on_update(u.heart_rate_bpm, u.live, u.heart_rate_at_s, now)
        if payload is not None:
            sent.append((now, payload, u.heart_rate_at_s))

    assert max(old_rule_age) > 7.0  # the burst does leave the stream live on old beats
    values = [(now, float(p), at) for now, p, at in sent if p != "None"]
    assert len(values) > 20 and all(50 < v < 90 for _, v, _ in values)  # record 101: ~65-75 bpm
    ages = [now - at for now, _, at in values]
    assert max(ages) < 5.0, ages  # the pipeline's ~3.5 s decision lag, never the burst's 8 s
    beats = [at for _, _, at in values]
    assert len(set(beats)) == len(beats)  # each value stands on a newer clean beat
    assert all(n2 - n1 >= 1.0 for (n1, *_), (n2, *_) in zip(values, values[1:]))  # at most one a second
    # unknown once, during the burst, after the last value before it; values again after it
    nones = [i for i, (_, p, _) in enumerate(sent) if p == "None"]
    assert len(nones) == 1
    cleared_at = sent[nones[0]][0]
    assert BURST_S[0] < cleared_at < BURST_S[1]
    assert any(now > BURST_S[1] for now, *_ in values)


def test_clear_says_unknown_only_when_a_value_is_on_screen() -> None:
    sensor = HeartRateSensor(interval_s=1.0)
    assert sensor.clear() is None  # nothing shown: nothing to send
    assert sensor.on_update(70.0, True, 12.5, now=100.0) == "70.0"
    assert sensor.on_update(71.0, True, 12.5, now=102.0) is None  # same newest clean beat
    assert sensor.clear() == "None" and sensor.clear() is None
    assert sensor.on_update(71.0, True, 12.5, now=103.0) == "71.0"  # after a clear the same beat may show again
    assert sensor.on_update(72.0, False, 13.4, now=105.0) == "None"  # not live: unknown
