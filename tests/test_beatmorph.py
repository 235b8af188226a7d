"""The beat-morphology identity path: pipeline beats at beat_fs, the shipped projection model,
and the sum-rule fusion with the CNN embedding (daemon/inference/beatmorph.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from daemon.biometrics import MODELS_DIR, EcgModelRunner
from daemon.dsp.ecg_pipeline import windows_from_record
from daemon.inference.beatmorph import BeatMorphModel, beat_features, fuse_embeddings
from daemon.inference.runtime import ModelError
from firmware_protocol.emulators.recordings import load_recording


@pytest.fixture(scope="module")
def runner() -> EcgModelRunner:
    return EcgModelRunner.load(MODELS_DIR / "ecg_dualtask.tflite")


def _record(name: str) -> tuple[np.ndarray, float]:
    rec = load_recording(name)
    return np.where(rec.lead_present[None, :], rec.leads_mv, 0.0).astype(np.float32), float(rec.fs_hz)


def test_morph_beats_do_not_depend_on_chunking(runner: EcgModelRunner) -> None:
    x, fs = _record("ludb-16")
    kw = runner.pipeline_kwargs()
    a = windows_from_record(x, fs, chunk_s=0.2, **kw).windows
    b = windows_from_record(x, fs, chunk_s=2.7, **kw).windows
    assert len(a) == len(b) > 3
    for wa, wb in zip(a, b):
        assert wa.morph.shape == wb.morph.shape
        np.testing.assert_allclose(wa.morph, wb.morph, atol=1e-5)
    # a 3 s window of a resting adult holds complete beats of the manifest's length
    assert all(w.morph.shape[0] >= 2 and w.morph.shape[1] == runner.beats.length for w in a)


def test_runner_fuses_cnn_and_beats(runner: EcgModelRunner) -> None:
    assert runner.beats is not None, "ecg_beats.tflite must ship beside the ECG model"
    assert runner.ref.dim == 64 + runner.beats.dim
    assert "+" in runner.ref.name  # templates of the CNN alone are not comparable
    x, fs = _record("ecgid-p04-r1")
    w = windows_from_record(x, fs, **runner.pipeline_kwargs()).windows[2]
    emb, act = runner.infer(w)
    assert emb.shape == (runner.ref.dim,)
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-4)
    wc = runner.beats.weight
    # the CNN share carries exactly weight w of the squared norm: cosine = w cos_cnn + (1-w) cos_beats
    assert np.sum(emb[:64] ** 2) == pytest.approx(wc, abs=1e-4)
    assert act.shape == (3,) and act.sum() == pytest.approx(1.0, abs=1e-3)


def test_same_person_scores_higher_than_another_person(runner: EcgModelRunner) -> None:
    """Real persons (ECG-ID p02 on two days, p26): own other-day recording wins."""
    kw = runner.pipeline_kwargs()

    def template(name: str) -> np.ndarray:
        x, fs = _record(name)
        valid = load_recording(name).lead_present
        embs = [runner.infer(w)[0] for w in windows_from_record(x, fs, lead_valid=valid, **kw).windows
                if w.quality.ok]
        m = np.mean([e / np.linalg.norm(e) for e in embs], axis=0)
        return m / np.linalg.norm(m)

    enrol, again, other = template("ecgid-p02-r1"), template("ecgid-p02-r4"), template("ecgid-p26-r1")
    assert float(enrol @ again) > float(enrol @ other) + 0.1


def test_fusion_is_the_weighted_sum_of_cosines() -> None:
    rng = np.random.default_rng(1)
    c1, c2 = rng.normal(size=(2, 64))
    b1, b2 = rng.normal(size=(2, 96))
    u = lambda v: v / np.linalg.norm(v)  # noqa: E731
    f1, f2 = fuse_embeddings(c1, b1, 0.3), fuse_embeddings(c2, b2, 0.3)
    assert float(f1 @ f2) == pytest.approx(0.3 * u(c1) @ u(c2) + 0.7 * u(b1) @ u(b2), abs=1e-5)
    # a window without beats keeps the CNN share only: its score cannot exceed w
    assert np.linalg.norm(fuse_embeddings(c1, np.zeros(96), 0.3)) == pytest.approx(np.sqrt(0.3), abs=1e-6)


def test_beat_features_are_zscored_per_beat_and_lead() -> None:
    rng = np.random.default_rng(2)
    morph = rng.normal(3.0, 2.0, size=(4, 87, 3)).astype(np.float32)
    morph[:, :, 2] = 0.0  # an off lead stays zeros, not NaN
    f = beat_features(morph)
    assert f.shape == (4, 3, 87)
    np.testing.assert_allclose(f[:, :2].mean(axis=2), 0.0, atol=1e-5)
    np.testing.assert_allclose(f[:, :2].std(axis=2), 1.0, atol=1e-4)
    assert np.all(f[:, 2] == 0.0)


def test_beat_features_with_slope_append_the_zscored_first_difference() -> None:
    rng = np.random.default_rng(3)
    morph = rng.normal(3.0, 2.0, size=(4, 87, 3)).astype(np.float32)
    morph[:, :, 2] = 0.0
    f = beat_features(morph, slope=True)
    assert f.shape == (4, 3, 174)
    np.testing.assert_array_equal(f[:, :, :87], beat_features(morph))  # the beat half unchanged
    d = np.diff(morph[:, :, :2].transpose(0, 2, 1), axis=2)
    d = np.concatenate([np.zeros((4, 2, 1), np.float32), d], axis=2)  # first sample: no slope
    want = (d - d.mean(axis=2, keepdims=True)) / d.std(axis=2, keepdims=True)
    np.testing.assert_allclose(f[:, :2, 87:], want, atol=1e-4)
    # amplitude and offset do not matter, only shape
    np.testing.assert_allclose(beat_features(5.0 * morph + 1.0, slope=True)[:, :2], f[:, :2], atol=1e-4)
    assert np.all(f[:, 2] == 0.0)


def test_off_lead_and_no_beats(runner: EcgModelRunner) -> None:
    x, fs = _record("ludb-16")
    w = windows_from_record(x, fs, **runner.pipeline_kwargs()).windows[1]
    only_i = runner.beats.embed(w.morph, np.array([True, False, False]))
    k = runner.beats.dim // 3
    assert np.linalg.norm(only_i[:k]) == pytest.approx(1.0, abs=1e-4) and not only_i[k:].any()
    assert not runner.beats.embed(np.zeros((0, runner.beats.length, 3), np.float32), np.ones(3, bool)).any()


def test_corrupt_beat_model_is_refused(tmp_path) -> None:
    for f in ("ecg_beats.tflite", "ecg_beats.json"):
        shutil.copy(MODELS_DIR / f, tmp_path / f)
    data = bytearray((tmp_path / "ecg_beats.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "ecg_beats.tflite").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        BeatMorphModel.load(tmp_path / "ecg_beats.tflite")


def test_throughput_benchmark_runs_the_pipeline_the_daemon_serves(runner: EcgModelRunner) -> None:
    """The 'as served' rows of the throughput benchmark read the beat path's settings from the
    manifest without loading the model; they must be exactly what the daemon passes."""
    from training.eval.throughput import served_ecg_kwargs

    served = served_ecg_kwargs(MODELS_DIR)
    assert runner.beats is not None
    assert served == runner.beats.pipeline_kwargs()
    assert set(served) <= set(runner.pipeline_kwargs())


def test_shipped_beat_model_reads_heart_rate_normalised_beats(runner: EcgModelRunner) -> None:
    """Beat models from 2.0.0 on were fitted on beats read on Fridericia's RR^(1/3) time axis: the runner
    must build the pipeline that way, or it would feed plain beats to a warped-beat model."""
    assert runner.beats is not None
    assert runner.beats.rr_exponent == pytest.approx(1 / 3)
    kw = runner.pipeline_kwargs()
    assert kw["beat_rr_exponent"] == pytest.approx(1 / 3) and kw["beat_rr_ref_s"] == 1.0
    assert runner.ref.version.endswith("+2.1.0")  # templates of older beat models are refused
    # the shipped model reads the beats without the slope channel: (3, 87) inputs
    assert not runner.beats.slope and runner.beats.length == 87
    assert list(runner.beats.model.manifest.inputs[0].shape) == [3, 87]


def test_int8_beat_model_matches_its_float_twin(runner: EcgModelRunner) -> None:
    """The int8 file must compute the float map it was exported from: a window's pooled beat
    vector (what is fused and scored) close to the float model's on real 1- and 3-lead recordings.
    Beat model 2.0.0 (one weight scale for all directions) gave median / min cosine 0.975 / 0.960
    on these windows and fails this; 2.1.0, which quantises each direction on its own, 0.998 /
    0.985."""
    assert runner.beats is not None
    assert (MODELS_DIR / "ecg_beats.tflite").stat().st_size <= 150 * 1024  # the per-model budget
    twin = BeatMorphModel.load(MODELS_DIR / "float" / "ecg_beats.tflite")
    cos = []
    for name in ("ecgid-p04-r1", "ludb-16"):
        x, fs = _record(name)
        for w in windows_from_record(x, fs, **runner.pipeline_kwargs()).windows:
            a, b = runner.beats.embed(w.morph, w.lead_mask), twin.embed(w.morph, w.lead_mask)
            if np.linalg.norm(b) > 0:
                cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert len(cos) > 10
    assert np.median(cos) > 0.99 and min(cos) > 0.975, (
        f"int8 beat vectors drift from float: median / min cosine {np.median(cos):.4f} / {min(cos):.4f}")


def test_beat_model_with_an_impossible_warp_is_refused(tmp_path) -> None:
    import json

    for f in ("ecg_beats.tflite", "ecg_beats.json"):
        shutil.copy(MODELS_DIR / f, tmp_path / f)
    m = json.loads((tmp_path / "ecg_beats.json").read_text())
    m["inputs"][0]["features"]["params"]["rr_exponent"] = 1.5
    (tmp_path / "ecg_beats.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="rr_exponent=1.5"):
        BeatMorphModel.load(tmp_path / "ecg_beats.tflite")


@pytest.mark.parametrize("bounds", [(0.1, 0.6), (0.25, 0.5)])
def test_beat_model_fitted_on_other_beat_bounds_is_refused_at_load(tmp_path, bounds) -> None:
    """The pipeline cuts beats 0.25 s before to 0.45 s after R whatever the manifest said; a
    model stating other bounds loaded and then raised on the first beat inside the daemon."""
    import json

    for f in ("ecg_beats.tflite", "ecg_beats.json"):
        shutil.copy(MODELS_DIR / f, tmp_path / f)
    m = json.loads((tmp_path / "ecg_beats.json").read_text())
    m["inputs"][0]["features"]["params"].update(before_s=bounds[0], after_s=bounds[1])
    (tmp_path / "ecg_beats.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match=f"{bounds[0]:g} s before to {bounds[1]:g} s after R"):
        BeatMorphModel.load(tmp_path / "ecg_beats.tflite")


def test_ecg_model_whose_rate_and_window_disagree_with_its_input_is_refused(tmp_path) -> None:
    """rate_hz edited to 250: the pipeline cut 750-sample windows and inference silently fed the
    model their first 300 samples (another time scale than it was trained on)."""
    import json

    for f in MODELS_DIR.iterdir():
        if f.is_file() and f.name.startswith("ecg_"):
            shutil.copy(f, tmp_path / f.name)
    m = json.loads((tmp_path / "ecg_dualtask.json").read_text())
    m["inputs"][0]["rate_hz"] = 250.0
    (tmp_path / "ecg_dualtask.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="250 Hz x 3 s windows but an input of 300 samples"):
        EcgModelRunner.load(tmp_path / "ecg_dualtask.tflite")


def test_a_window_the_model_cannot_take_is_dropped_and_said_once(runner, caplog) -> None:
    """A window of another length used to be cut to fit (or, for the beats, to raise out of
    the daemon's ECG task); now it is no evidence, logged once, and the stream goes on."""
    import logging

    from daemon.biometrics import Biometrics
    from daemon.dsp.ecg_pipeline import EcgPipeline
    from daemon.identity.engine import IdentityConfig, IdentityEngine

    x, fs = _record("ecgid-p04-r1")
    pipe = EcgPipeline(fs, n_leads=3, **{**runner.pipeline_kwargs(), "window_s": 4.0})
    update = pipe.push(x, np.ones(3, bool))
    assert len(update.windows) >= 3 and any(w.quality.ok_for_identity for w in update.windows)
    bio = Biometrics(runner, IdentityEngine({}, IdentityConfig(), model=runner.ref))
    with caplog.at_level(logging.ERROR):
        obs = bio.on_ecg(update, now=0.0)
        bio.on_ecg(update, now=1.0)
    assert len(obs) == len(update.windows)
    assert bio.stats.inferences == 0 and bio.stats.inference_errors == 2 * sum(
        w.quality.ok_for_identity and w.lead_mask.any() for w in update.windows)
    said = [r for r in caplog.records if "window dropped" in r.getMessage()]
    assert len(said) == 1 and "(400, 3)" in said[0].getMessage()
