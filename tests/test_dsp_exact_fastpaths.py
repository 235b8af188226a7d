"""The DSP fast paths replace numpy/scipy calls by cheaper code with the same arithmetic; these
tests hold them to the same bits as the calls they replace (ties of -0.0/+0.0 included)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import signal
from scipy.ndimage import maximum_filter1d, median_filter, minimum_filter1d

from daemon.dsp.filters import EcgConditioner, SosFilter, StreamResampler, highpass_sos, notch_sos
from daemon.dsp.rpeaks import RPeakDetector, _percentile_linear
from daemon.dsp.stats import _MEDIAN_NETWORKS, median, median_axis0, median_filter_nearest

FIX = Path(__file__).parent / "fixtures" / "ecg_pipeline" / "ludb_3lead.npz"


def _ties(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Small integers with random signs: many ties, exact zeros of both signs."""
    return rng.integers(-2, 3, shape).astype(np.float64) * np.sign(rng.standard_normal(shape))


def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng(0)
    for t in range(5000):
        v = rng.standard_normal(int(rng.integers(1, 9))) * 10.0 ** rng.integers(-3, 4)
        if t % 3 == 0:
            v = np.round(v, 1)
        for q in (75.0, 50.0, 10.0, 100.0, 0.0):
            assert _percentile_linear(list(v), q) == np.percentile(v, q)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_medians_match_numpy_bit_for_bit(dtype) -> None:
    rng = np.random.default_rng(1)
    for t in range(1500):
        shape = (int(rng.integers(1, 12)), int(rng.integers(1, 40)), int(rng.integers(1, 4)))
        a = (_ties(rng, shape) if t % 2 else rng.standard_normal(shape)).astype(dtype)
        ref = np.median(a, axis=0)
        got = median_axis0(a)
        assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes()
        v = a[:, 0, 0].astype(np.float64)
        assert np.float64(median(v)).tobytes() == np.float64(np.median(v)).tobytes()


@pytest.mark.parametrize("size", sorted(_MEDIAN_NETWORKS))
def test_median_networks_select_the_median_of_every_input(size) -> None:
    # 0-1 principle: a compare-exchange network that puts the median of every binary input in
    # the middle slot does so for every input.
    b = np.array(np.meshgrid(*[[0.0, 1.0]] * size, indexing="ij")).reshape(size, -1)
    v = list(b)
    for i, j in _MEDIAN_NETWORKS[size]:
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    assert np.array_equal(v[size // 2], np.sort(b, axis=0)[size // 2])


@pytest.mark.parametrize("size", [3, 5, 7, 9])
def test_median_filter_nearest_matches_scipy(size) -> None:
    rng = np.random.default_rng(size)
    for t in range(400):
        shape = (int(rng.integers(1, 300)), int(rng.integers(1, 4)))
        x = _ties(rng, shape) if t % 2 else rng.standard_normal(shape)
        got = median_filter_nearest(x, size)
        ref = median_filter(x, size=(size, 1), mode="nearest")
        # Same values; of a tie between -0.0 and +0.0 the network may keep the other zero,
        # which the refinement cannot see (its baseline median adds +0.0, extrema compare equal).
        assert got.dtype == ref.dtype and np.array_equal(got, ref)


def test_sos_filter_kernel_path_is_scipy_sosfilt() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 3)).astype(np.float32) + 3.0
    sos = np.concatenate([highpass_sos(500.0, 0.5), notch_sos(500.0, 50.0)])
    for init in ("steady", "zeros"):
        f = SosFilter(sos, 3, init=init)
        first = x[0].astype(np.float64) if init == "steady" else np.zeros(3)
        zi = signal.sosfilt_zi(sos)[:, :, None] * first[None, None, :]
        ref, _ = signal.sosfilt(sos, x.astype(np.float64), axis=0, zi=zi)
        got, i = [], 0
        for n in [1, 7, 100, 999, 2893] * 2:
            got.append(f.process(x[i:i + n]))
            i += n
        assert np.concatenate(got).tobytes() == ref[:i].astype(np.float32).tobytes()


def _resample_reference(rs: StreamResampler, x: np.ndarray) -> np.ndarray:
    """The einsum formulation the fast path replaced, over the whole stream at once."""
    q = rs._q
    buf = np.concatenate([np.zeros((q - 1, x.shape[1])), x.astype(np.float64)])
    last_m = ((x.shape[0] - 1) * rs.up + (rs.up - 1) - rs._delay) // rs.down
    m = np.arange(0, last_m + 1)
    t = m * rs.down + rs._delay
    n0, ph = t // rs.up, t % rs.up
    idx = (n0 + q - 1)[:, None] - np.arange(q)[None, :]
    return np.einsum("kq,kqc->kc", rs._phases[ph], buf[idx]).astype(np.float32)


@pytest.mark.parametrize("fs_in,fs_out,ch", [(500, 100, 3), (500, 125, 3), (360, 100, 3), (500, 100, 2),
                                             (360, 100, 1), (1000, 250, 12)])
def test_resampler_matches_einsum_for_any_chunking(fs_in, fs_out, ch) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9000, ch)).astype(np.float32)
    x[2000:3000] = 0.0  # all-zero input: +0.0, as einsum gives
    x[3000:3500] = -0.0
    ref = _resample_reference(StreamResampler(fs_in, fs_out, ch), x)
    for chunks in ([1], [20], [5000], [9000], [13, 900, 4097, 5]):
        rs = StreamResampler(fs_in, fs_out, ch)
        out, i, j = [], 0, 0
        while i < x.shape[0]:
            n = chunks[j % len(chunks)]
            out.append(rs.process(x[i:i + n]))
            i, j = i + n, j + 1
        got = np.concatenate(out)
        if ch >= 2:  # the fast path: bit-identical to the one-shot einsum
            assert got.tobytes() == ref[:got.shape[0]].tobytes()
        else:  # the einsum path (chunk-invariant to float tolerance, as documented)
            np.testing.assert_allclose(got, ref[:got.shape[0]], atol=1e-5)


def test_conditioner_chunking_bit_identical() -> None:
    z = np.load(FIX)
    x = z["signals"][0].astype(np.float32) / z["adc_gain"][0][None, :]
    ref = EcgConditioner(500.0, 3).process(x)
    c = EcgConditioner(500.0, 3)
    got = np.concatenate([c.process(x[i:i + 37]) for i in range(0, x.shape[0], 37)])
    assert got.tobytes() == ref.tobytes()


def test_flat_lead_fast_path_equals_running_filters() -> None:
    """The block test that skips the running max/min filters must flag exactly what they flag."""
    z = np.load(FIX)
    x = (z["signals"][1].astype(np.float32) / z["adc_gain"][1][None, :]).copy()
    x[1000:1700, 0] = 0.2                 # flat 1.4 s on lead I
    x[2500:2900, 1] = 0.0                 # flat 0.8 s: shorter than the 1 s window
    x[3000:3520, 2] = 0.3                 # flat just over 1 s
    x[4000:4600] += 0.004 * np.sin(np.arange(600))[:, None].astype(np.float32)
    det = RPeakDetector(500.0, 3)
    W, thr = det._flat_w, det._p.flat_mv
    mx = maximum_filter1d(x, size=W, axis=0, origin=(W - 1) // 2, mode="nearest")
    mn = minimum_filter1d(x, size=W, axis=0, origin=(W - 1) // 2, mode="nearest")
    ref = (mx - mn) < thr
    for step in (1, 25, 100, 333, 5000):
        det = RPeakDetector(500.0, 3)
        got = np.concatenate([det._flat(x[i:i + step]) for i in range(0, x.shape[0], step)])
        assert np.array_equal(got, ref), step
    assert ref[1600, 0] and not ref[2800, 1] and ref[3519, 2]


@pytest.mark.parametrize("size", sorted(_MEDIAN_NETWORKS) + [9])
def test_median_filter_along_axis1_is_per_signal(size) -> None:
    """The batched despiking (k signals along axis 1) gives each signal's own filter."""
    rng = np.random.default_rng(7)
    for t in range(200):
        k, n, ch = int(rng.integers(1, 6)), int(rng.integers(1, 60)), int(rng.integers(1, 4))
        x = _ties(rng, (k, n, ch)) if t % 2 else rng.standard_normal((k, n, ch))
        got = median_filter_nearest(x, size, axis=1)
        for i in range(k):
            ref = median_filter_nearest(x[i], size)
            assert np.array_equal(got[i], ref), (size, t, i)
            assert np.array_equal(np.abs(got[i]), np.abs(median_filter(x[i], size=(size, 1),
                                                                       mode="nearest")))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quality_fast_paths_match_reference(dtype) -> None:
    from daemon.dsp import quality as qm

    rng = np.random.default_rng(3)
    for t in range(400):
        b = (_ties(rng, (int(rng.integers(1, 8)), 70, 3)) if t % 3 == 0
             else rng.standard_normal((int(rng.integers(1, 8)), 70, 3)) * 10.0 ** rng.integers(-3, 3))
        b = b.astype(dtype)
        if t % 4 == 0:
            b[0, :, 1] = 0.25  # a flat beat-lead
        got = qm._znorm(b)
        # correlation from precomputed halves == _corr_rows
        a = got.reshape(got.shape[0], -1)
        tb = (got[0] if t % 5 else np.zeros_like(got[0])).reshape(-1)
        # the numpy formulation _corr_rows replaced (the reference)
        ra, rb = a - a.mean(axis=1, keepdims=True), tb - tb.mean()
        den = np.linalg.norm(ra, axis=1) * np.linalg.norm(rb)
        ref_c = np.where(den > 0, ra @ rb / np.where(den > 0, den, 1.0), 0.0)
        ac, an = qm._centred_rows(a)
        bc, bn = qm._centred(tb)
        for got_c in (qm._corr_rows(a, tb), qm._corr_centred(ac, an, min(an.tolist()), bc, bn)):
            assert got_c.dtype == ref_c.dtype and got_c.tobytes() == ref_c.tobytes()
        v = ref_c if t % 2 else np.round(ref_c * 2).astype(dtype) * np.sign(rng.standard_normal(ref_c.size)).astype(dtype)
        assert np.float64(median(v)).tobytes() == np.float64(np.median(v)).tobytes()


def _rr_bad_numpy(times: np.ndarray, span: tuple[float, float], jump: float) -> int:
    """The numpy implausible-RR count that quality._rr_bad replaced (the reference)."""
    from daemon.dsp.hrv import RR_MAX_S, RR_MIN_S

    rr = np.diff(times)
    if times.size:
        edges = (times[0] - span[0] > RR_MAX_S) + (span[1] - times[-1] > RR_MAX_S)
    else:
        edges = int(span[1] - span[0] > RR_MAX_S)
    bad = int(np.count_nonzero(rr < RR_MIN_S) + np.count_nonzero(rr > RR_MAX_S) + edges)
    if rr.size >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = rr[1:] / rr[:-1]
        bad += int(np.count_nonzero((ratio > jump) | (ratio < 1 / jump)))
    return bad


def test_rr_checks_in_floats_match_numpy() -> None:
    from daemon.dsp import quality as qm

    rng = np.random.default_rng(5)
    for t in range(5000):
        n = int(rng.integers(0, 8))
        times = np.sort(rng.uniform(0.0, 3.0, n))
        if t % 3 == 0:
            times = np.round(times, 1)  # repeated times: zero intervals
        span = (0.0, 3.0) if t % 2 else (float(rng.uniform(-1, 1)), float(rng.uniform(2, 4)))
        assert qm._rr_bad(times.tolist(), span, 1.8) == _rr_bad_numpy(times, span, 1.8), (times, span)


def test_batched_refinement_equals_per_beat() -> None:
    """Refining all beats of a call at once gives the beats of refining them one by one."""
    z = np.load(FIX)
    x = np.concatenate([z["signals"][r].astype(np.float32) / z["adc_gain"][r][None, :]
                        for r in range(4)])
    x[3000:3300, 2] = -x[3000:3300, 2] * 3
    valid = np.ones(x.shape, bool)
    valid[7000:7400, 0] = False   # a lead off for part of some beats
    valid[9000:9800, :2] = False

    def run(batched: bool, step: int):
        det = RPeakDetector(500.0, 3)
        if not batched:
            det._refine_many = lambda cs: None
        out = []
        for i in range(0, x.shape[0], step):
            out += det.process(x[i:i + step], valid[i:i + step])
        out += det.flush()
        return [(b.sample, b.amplitude_mv, b.leads_used, b.latency_s, b.lead_samples) for b in out]

    for step in (5000, 20000):
        ref = run(False, step)
        assert len(ref) > 30 and run(True, step) == ref
        # some beats lose lead 0 (-1 there) and the others have a sample per lead
        assert any(b[4][0] == -1 and b[4][2] >= 0 for b in ref)
        assert all(len(b[4]) == 3 and b[0] in b[4] for b in ref)
