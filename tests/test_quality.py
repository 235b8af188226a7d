"""Window quality on real LUDB ECG: accepts clean records, rejects each corruption with its reason."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import signal

from daemon.dsp.ecg_pipeline import windows_from_record
from daemon.dsp.quality import REASONS, Quality, QualityConfig, identity_ok, signal_scores

FIX = np.load(Path(__file__).parent / "fixtures" / "ecg_pipeline" / "ludb_3lead.npz")
FS = 500.0


def record(i: int) -> np.ndarray:
    return FIX["signals"][i].astype(np.float32) / FIX["adc_gain"][i][None, :]


@pytest.mark.parametrize("i", range(4))
def test_clean_real_ecg_is_accepted(i):
    rw = windows_from_record(record(i), FS)
    assert len(rw.windows) == 7
    assert rw.ok.all(), list(rw.reason)
    assert np.all((rw.quality_index >= 0.5) & (rw.quality_index <= 1.0))
    assert rw.lead_mask.all()


def _reasons(x, **kw):
    return list(windows_from_record(x.astype(np.float32), FS, **kw).reason)


@pytest.mark.parametrize("i", [0, 3])
def test_flat_line_rejected(i):
    x = record(i).copy()
    x[:] = x[0]  # the front end outputs a constant
    assert set(_reasons(x)) == {"flat_line"}


def test_one_flat_lead_is_masked_not_fatal():
    x = record(2).copy()
    x[:, 2] = 0.3
    rw = windows_from_record(x, FS)
    # (whether the windows pass depends on the R-peak detector coping with a constant lead that
    # is flagged valid; that is the detector's contract, not quality's)
    assert not rw.lead_mask[:, 2].any() and rw.lead_mask[:, :2].all()
    assert np.all(rw.data[:, :, 2] == 0) and np.any(rw.data[:, :, :2] != 0)
    assert "flat_line" not in set(rw.reason)


@pytest.mark.parametrize("i", [1, 2])
def test_saturation_rejected(i):
    x = record(i)
    lo, hi = np.percentile(x, [8, 92], axis=0)
    assert set(_reasons(np.clip(x, lo, hi))) == {"saturation"}
    # the ADC rails, when known, count too
    rail = float(np.percentile(x[:, 1], 85))
    cfg = QualityConfig(adc_limits_mv=(-rail, rail))
    rw = windows_from_record(x, FS, quality=cfg)
    assert (rw.reason == "saturation").any()


def test_lead_off_from_mask():
    x = record(0)
    assert set(_reasons(x, lead_valid=np.zeros(3, bool))) == {"lead_off"}
    rw = windows_from_record(x, FS, lead_valid=np.array([True, False, True]))
    assert rw.ok.all() and not rw.lead_mask[:, 1].any()
    # lead II goes off for 3 s in the middle: only the windows overlapping it lose the lead
    v = np.ones((len(x), 3), bool)
    v[2500:4000, 1] = False
    rw = windows_from_record(x, FS, lead_valid=v)
    overl = (rw.t_end_s > 5.0) & (rw.t_end_s - 3.0 < 8.0)
    assert not rw.lead_mask[overl, 1].any() and rw.lead_mask[~overl, 1].all()


@pytest.mark.parametrize("i", range(4))
@pytest.mark.parametrize("mains", [50.0, 60.0])
def test_mains_hum_rejected_on_unconditioned_signal(i, mains):
    x = record(i)
    t = np.arange(len(x)) / FS
    hum = 1.5 * np.sin(2 * np.pi * mains * t + 0.3)[:, None]
    assert set(_reasons(x + hum, mains_hz=mains)) == {"mains_hum"}
    assert set(_reasons(x, mains_hz=mains)) == {"ok"}
    # moderate hum is the notch's job, not a reason to throw the ECG away
    assert set(_reasons(x + hum / 30, mains_hz=mains)) == {"ok"}


@pytest.mark.parametrize("i", range(4))
def test_motion_artefact_rejected(i):
    rng = np.random.default_rng(i)
    x = record(i)
    sos = signal.butter(2, [1.0, 12.0], "bandpass", fs=FS, output="sos")
    motion = signal.sosfilt(sos, rng.standard_normal(x.shape), axis=0)
    motion *= 0.8 / motion.std()
    reasons = _reasons(x + motion)
    assert all(r in ("motion_artifact", "implausible_rr") for r in reasons), reasons
    # a burst in the middle: clean windows before it stay accepted
    burst = np.zeros_like(x)
    burst[3000:4500] = motion[3000:4500]
    rw = windows_from_record((x + burst).astype(np.float32), FS)
    assert rw.ok[rw.t_end_s <= 6.0].all()
    # windows with >= 2 s of the burst (median beat correlation is robust to one bad beat)
    assert not rw.ok[(rw.t_end_s >= 8.0) & (rw.t_end_s <= 9.0)].any()


def test_emg_noise_rejected():
    rng = np.random.default_rng(7)
    x = record(1) + 0.1 * rng.standard_normal((5000, 3))
    assert set(_reasons(x)) == {"high_freq_noise"}


def test_identity_reads_through_emg_and_motion_but_nothing_else():
    """The identity gate drops only high_freq_noise and motion_artifact from the checks."""
    rng = np.random.default_rng(7)
    emg = windows_from_record((record(1) + 0.1 * rng.standard_normal((5000, 3))).astype(np.float32), FS)
    assert not emg.ok.any() and emg.identity_ok.all()
    x = record(2)
    sos = signal.butter(2, [1.0, 12.0], "bandpass", fs=FS, output="sos")
    motion = signal.sosfilt(sos, rng.standard_normal(x.shape), axis=0)
    moved = windows_from_record((x + 0.8 * motion / motion.std()).astype(np.float32), FS)
    # a motion window is used unless its RR is implausible too (noise beats), which still gates
    assert (moved.reason == "motion_artifact").any()
    for w, used in zip(moved.windows, moved.identity_ok):
        rr = dict(w.quality.scores)["implausible_rr"]
        assert used == (rr >= 0.5), (w.quality.reason, rr)
    t = np.arange(len(x)) / FS
    for bad in (x + 1.5 * np.sin(2 * np.pi * 50 * t)[:, None],    # mains hum
                np.full_like(x, x[0]),                            # flat
                np.clip(x, *np.percentile(x, [8, 92], axis=0))):  # saturated
        rw = windows_from_record(bad.astype(np.float32), FS)
        assert not rw.identity_ok.any(), set(rw.reason)
    off = windows_from_record(x, FS, lead_valid=np.zeros(3, bool))
    assert not off.identity_ok.any()
    clean = windows_from_record(x, FS)
    assert clean.identity_ok.all()


def test_a_floating_lead_with_only_amplifier_noise_is_never_identified_from():
    """Flags say the leads are on, the signal is noise of 0.01-0.05 mV: the detector finds
    "beats" at plausible intervals and only the two checks identity tolerates failed, so such
    windows were identified from and enrolled. Real ECG first, so a template exists."""
    rng = np.random.default_rng(0)
    for sd in (0.01, 0.02, 0.05):
        x = np.concatenate([record(0), record(0), rng.normal(0, sd, (10000, 3))]).astype(np.float32)
        rw = windows_from_record(x, FS)
        noise_only = (rw.t_end_s - 3.0) >= 20.0
        assert noise_only.sum() >= 10 and not rw.identity_ok[noise_only].any(), sd
        assert rw.identity_ok[rw.t_end_s <= 10.0].all()  # the real ECG before the splice is used
    fresh = windows_from_record(rng.normal(0, 0.02, (15000, 3)).astype(np.float32), FS)
    assert not fresh.identity_ok.any()


def test_identity_ok_by_hand():
    rows = np.ones((len(REASONS) + 1, len(REASONS)), np.float32)
    for j in range(len(REASONS)):
        rows[j, j] = 0.49   # one check just fails
    got = identity_ok(rows)
    assert got[-1]  # all pass
    assert [REASONS[j] for j in range(len(REASONS)) if got[j]] == ["high_freq_noise", "motion_artifact"]
    both = np.ones((1, len(REASONS)), np.float32)
    both[0, [REASONS.index("high_freq_noise"), REASONS.index("motion_artifact")]] = 0.2
    assert not identity_ok(both)[0], "both tolerated checks failing at once is no ECG"
    q = Quality(0.2, False, "high_freq_noise", (("lead_off", 1.0), ("high_freq_noise", 0.2)))
    assert q.ok_for_identity and q.score_row()[REASONS.index("mains_hum")] == 1.0
    assert not Quality(0.3, False, "mains_hum", (("mains_hum", 0.3),)).ok_for_identity


def test_signal_scores_vectorised_and_bounded():
    x = record(0)
    wins = np.stack([x[s:s + 1500] for s in range(0, 3501, 500)])
    usable, scores = signal_scores(wins, np.ones((8, 3), bool), FS, 50.0, QualityConfig())
    assert usable.all()
    for v in scores.values():
        assert v.shape == (8,) and np.all((v >= 0) & (v <= 1))


def _session(names, gap_s=0.0):
    from firmware_protocol.emulators.recordings import load_recording

    parts, valid = [], []
    for k, name in enumerate(names):
        r = load_recording(name)
        if k and gap_s:
            parts.append(np.zeros((int(gap_s * r.fs_hz), 3), np.float32))
            valid.append(np.zeros((int(gap_s * r.fs_hz), 3), bool))
        parts.append(np.where(r.lead_present, r.leads_mv, 0).astype(np.float32))
        valid.append(np.repeat(r.lead_present[None], len(r.leads_mv), 0))
    return np.concatenate(parts), np.concatenate(valid)


def test_next_wearer_is_not_judged_against_the_last_ones_template():
    """Person 46 after person 25 (ECG-ID), with the electrodes off in between: the beat template
    is per wearing session, so 46's clean beats are accepted, not called motion artefact."""
    x, v = _session(["ecgid-p25-r4", "ecgid-p46-r3"], gap_s=4.0)
    rw = windows_from_record(x, 500, lead_valid=v)
    second = rw.t_end_s > 24.0 + 3.0  # windows wholly inside person 46's recording
    assert rw.ok[second].mean() > 0.9, [q for q, s in zip(rw.reason, second) if s]


def test_a_different_heart_without_lead_off_gets_a_new_template():
    x, v = _session(["ecgid-p25-r4", "ecgid-p46-r3"])
    rw = windows_from_record(x, 500, lead_valid=v)
    late = rw.t_end_s > 20.0 + 3.0 + 8.0  # after the re-seed (5 windows) has had time
    assert rw.ok[late].mean() > 0.9


def test_identity_gate_experiment_gates_as_the_daemon_does():
    """training.experiments.identity_gate's 'full' gate is Quality.ok and the served
    identity gate is its high_freq_noise=0,motion_artifact=0, window by window."""
    from training.experiments.identity_gate import parse_gate, passes

    rng = np.random.default_rng(3)
    x = record(0).copy()
    x[1500:3500] += 0.12 * rng.standard_normal((2000, 3))   # EMG in the first half
    rw = windows_from_record(x.astype(np.float32), FS)
    qs = np.stack([w.quality.score_row() for w in rw.windows])
    assert not rw.ok.all() and rw.ok.any() and rw.identity_ok.all()
    assert np.array_equal(passes(qs, parse_gate("full")), rw.ok)
    assert np.array_equal(passes(qs, parse_gate("high_freq_noise=0,motion_artifact=0")), rw.identity_ok)
    assert passes(qs, parse_gate("all")).all()
    with pytest.raises(Exception, match="not a quality check"):
        parse_gate("hum=0")


def test_the_daemon_identifies_through_emg_but_not_through_hum():
    """Biometrics runs the identity model on every window that passes quality for identity:
    an EMG-laden stream (full gate: all rejected) is identified from, a humming one is not."""
    from daemon.biometrics import MODELS_DIR, Biometrics, EcgModelRunner
    from daemon.dsp.ecg_pipeline import EcgPipeline
    from daemon.identity.engine import IdentityConfig, IdentityEngine

    runner = EcgModelRunner.load(MODELS_DIR / "ecg_dualtask.tflite")
    x = record(1)
    t = np.arange(len(x)) / FS
    emg = x + 0.1 * np.random.default_rng(7).standard_normal(x.shape)
    hum = x + 1.5 * np.sin(2 * np.pi * 50 * t)[:, None]
    seen = {}
    for name, sig in (("emg", emg), ("hum", hum)):
        bio = Biometrics(runner, IdentityEngine({}, IdentityConfig(), model=runner.ref))
        pipe = EcgPipeline(FS, n_leads=3, mains_hz=50.0, **runner.pipeline_kwargs())
        update = pipe.push(sig.astype(np.float32))
        bio.on_ecg(update, now=10.0)
        seen[name] = ([w.quality.ok for w in update.windows], bio.stats.inferences)
    (ok, n), (ok_hum, n_hum) = seen["emg"], seen["hum"]
    assert len(ok) >= 5 and not any(ok) and n == len(ok)
    assert len(ok_hum) >= 5 and not any(ok_hum) and n_hum == 0
