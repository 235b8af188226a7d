"""Gait identity: real SisFall walking through the daemon's IMU pipeline and the shipped gait
model, templates in the store, fusion with the ECG score, and never an identity from gait alone.

The two persons (SisFall SA01, SA02, excerpts in firmware_protocol/emulators/imu_recordings,
attribution there) are TRAINING persons of ``gait_waist``: these tests check the mechanics on
real gait; how well it generalises to unseen persons is measured by
``python -m training.eval.gait_identity`` (docs/identity.md).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.biometrics import MODELS_DIR, Biometrics, ImuModelSet
from daemon.dsp.imu_pipeline import ImuUpdate, imu_windows_from_record
from daemon.identity.engine import IdentityConfig, IdentityEngine
from daemon.identity.fusion import FusionConfig, ScoreNorm, fuse_identity
from daemon.identity.gait import GaitModel, build_gait_template, load_gait_models
from daemon.identity.store import GaitTemplate, ModelRef, Person, TemplateStore, slugify
from daemon.inference.runtime import ModelError
from firmware_protocol.emulators.imu_recordings import load_imu_recording

ECG = ModelRef("ecg_dualtask", "1.0.0", 16)


@pytest.fixture(scope="module")
def model() -> GaitModel:
    return load_gait_models(MODELS_DIR)["waist"]


@pytest.fixture(scope="module")
def walking() -> dict[str, list]:
    """The daemon's 2 s windows of each person's 20 s walking excerpt, gait gate on."""
    out = {}
    for person in ("SA01", "SA02"):
        rec = load_imu_recording(f"{person}_D01_walking")
        t = np.arange(rec.n_samples) / rec.fs_hz
        wins = imu_windows_from_record(t, rec.acc_g, rec.gyro_dps)
        out[person] = [w for w in wins if w.gait.walking]
        assert len(out[person]) >= 15, "the gait gate should see walking in a walking recording"
    return out


def _embed(model: GaitModel, windows: list) -> np.ndarray:
    return model.embed(np.stack([w.data for w in windows]))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _person(name: str, proto: np.ndarray, gait: GaitTemplate | None, threshold: float = 0.6) -> Person:
    return Person(id=f"id-{name}", name=name, slug=slugify(name), created="2026-01-01T00:00:00+00:00", model=ECG,
                  prototypes=proto[None], prototype_labels=("rest",), threshold=threshold,
                  stats={"ecg_impostor_mean": 0.2, "ecg_impostor_std": 0.15}, gait=gait)


# ------------------------------------------------------------------------------------------ model
def test_shipped_models_load_and_embed_unit_vectors(model):
    models = load_gait_models(MODELS_DIR)
    assert set(models) == {"waist", "thigh"}
    training = model.info["training"]
    assert set(training["held_out"]).isdisjoint(training["persons"])  # never fitted on held-out persons
    e = model.embed(np.random.default_rng(0).normal(size=(3, 200, 6)).astype(np.float32))
    assert e.shape == (3, model.ref.dim) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_gait_model_save_load_round_trip(model, tmp_path):
    model.save(tmp_path / "gait_waist.npz")
    again = GaitModel.load(tmp_path / "gait_waist.npz")
    assert again.ref == model.ref and again.score_norm == model.score_norm and again.pool == model.pool
    np.testing.assert_array_equal(again.projection, model.projection)


# -------------------------------------------------------------------------------------- templates
def test_gait_templates_separate_two_real_persons(model, walking):
    """Enrol each person from the first part of their walk, score the rest: own template wins."""
    emb = {p: _embed(model, w) for p, w in walking.items()}
    tpl = {p: build_gait_template(e[:10], model) for p, e in emb.items()}
    assert all(t is not None and t.n_windows == 10 for t in tpl.values())
    for p, e in emb.items():
        other = "SA02" if p == "SA01" else "SA01"
        test = _unit(e[10:15].mean(axis=0))  # one pooled score, as the daemon computes it
        own, theirs = float(test @ tpl[p].prototype), float(test @ tpl[other].prototype)
        assert own > theirs + 0.2, (p, own, theirs)
        assert model.score_norm.apply(own) > 2.0  # far above the impostor distribution


def test_too_few_walking_windows_give_no_template(model, walking):
    assert build_gait_template(_embed(model, walking["SA01"][:5]), model) is None


# ------------------------------------------------------------------------------------------ store
def test_store_round_trip_with_and_without_gait(model, walking, tmp_path):
    rng = np.random.default_rng(1)
    gait = build_gait_template(_embed(model, walking["SA01"]), model)
    people = {"Ann": _person("Ann", _unit(rng.normal(size=16)), gait),
              "Bob": _person("Bob", _unit(rng.normal(size=16)), None)}
    store = TemplateStore(tmp_path / "id" / "templates.json")
    store.save(people)
    loaded = store.load()
    assert loaded == people
    assert loaded["Bob"].gait is None and loaded["Ann"].gait == gait
    np.testing.assert_array_equal(loaded["Ann"].gait.prototype, gait.prototype)
    doc = json.loads((tmp_path / "id" / "templates.json").read_text())
    assert "gait" not in {k for p in doc["payload"]["people"] if p["name"] == "Bob" for k in p}


def test_store_written_before_gait_identity_still_loads(tmp_path):
    """A person record without a ``gait`` key (older biod) loads as ECG-only."""
    p = _person("Cy", _unit(np.ones(16, np.float32)), None)
    record = p.to_json()
    assert "gait" not in record
    path = tmp_path / "id" / "templates.json"
    path.parent.mkdir(mode=0o700)
    path.write_text(json.dumps({"format": "biod-templates", "container_version": 1, "encrypted": False,
                                "payload": {"people": [record]}}))
    assert TemplateStore(path).load()["Cy"].gait is None


# ----------------------------------------------------------------------------------------- fusion
def test_fuse_identity_per_person_norms_and_invert():
    norms = {"Ann": ScoreNorm("znorm", 0.2, 0.1), "Bob": ScoreNorm("znorm", 0.3, 0.2)}
    gait = ScoreNorm("znorm", 0.0, 0.5)
    cfg = FusionConfig(ecg_identity_weight=0.8, gait_identity_weight=0.2)
    z = fuse_identity({"Ann": 0.5, "Bob": 0.7, "Cy": 0.9}, {"Ann": 1.0, "Bob": -0.5}, norms, gait, cfg)
    assert z["Ann"] == pytest.approx(0.8 * 3.0 + 0.2 * 2.0)
    assert z["Bob"] == pytest.approx(0.8 * 2.0 + 0.2 * -1.0)
    assert "Cy" not in z  # no ECG norm for Cy and no gait score: nothing to fuse
    assert float(norms["Ann"].invert(3.0)) == pytest.approx(0.5)


def _household(model, walking):
    """Two persons with ECG prototypes 0.5 apart in cosine and real gait templates."""
    a = np.zeros(16, np.float32)
    a[0] = 1
    b = np.zeros(16, np.float32)
    b[1] = 1
    gait = {p: build_gait_template(_embed(model, w[:10]), model) for p, w in walking.items()}
    people = {"Ann": _person("Ann", a, gait["SA01"]), "Bob": _person("Bob", b, gait["SA02"])}
    return people, _unit(a + 0.6 * b)  # an ECG window closer to Ann than to Bob


def _run(engine: IdentityEngine, ecg: np.ndarray, n: int = 8, t0: float = 100.0):
    state = None
    for k in range(n):
        state = engine.observe(t0 + k, ecg, True, True)
    return state


def test_fusion_moves_scores_towards_the_walking_person(model, walking):
    people, ecg = _household(model, walking)
    cfg = IdentityConfig()
    ecg_only = _run(IdentityEngine(people, cfg, model=ECG, gait_model=model), ecg)
    assert not ecg_only.fused  # no walking windows: exactly the ECG scores
    for own, other in (("Ann", "Bob"), ("Bob", "Ann")):
        engine = IdentityEngine(people, cfg, model=ECG, gait_model=model)
        person = "SA01" if own == "Ann" else "SA02"
        for k, e in enumerate(_embed(model, walking[person][10:])):
            engine.observe_gait(100.0 + k * 0.5, e)
        fused = _run(engine, ecg, t0=100.0)
        assert fused.fused
        # the walking person's own evidence adds up; the lead over the other person grows
        assert fused.scores[own] > ecg_only.scores[own]
        assert (fused.scores[own] - fused.scores[other]) > (ecg_only.scores[own] - ecg_only.scores[other]) + 0.02


def test_ecg_only_engine_is_unchanged_without_gait_templates(model, walking):
    people, ecg = _household(model, walking)
    plain = {n: _person(n, p.prototypes[0], None) for n, p in people.items()}
    engine = IdentityEngine(plain, IdentityConfig(), model=ECG, gait_model=model)
    for k, e in enumerate(_embed(model, walking["SA01"])):
        engine.observe_gait(100.0 + k * 0.5, e)
    state = _run(engine, ecg)
    reference = _run(IdentityEngine(plain, IdentityConfig(), model=ECG), ecg)
    assert not state.fused and state.scores == reference.scores and state.wearer == reference.wearer == "Ann"


def test_gait_alone_never_announces(model, walking):
    people, _ = _household(model, walking)
    engine = IdentityEngine(people, IdentityConfig(), model=ECG, gait_model=model)
    emb = _embed(model, walking["SA01"])
    for k in range(60):
        engine.observe_gait(100.0 + k, emb[k % len(emb)])
    # live ECG but no clean window, then no live ECG: nobody, whatever the gait says
    assert engine.observe(200.0, None, False, True).wearer is None
    assert engine.observe(201.0, None, False, False).wearer is None
    for k in range(20):
        state = engine.observe(202.0 + k, None, False, True)
    assert state.wearer is None and state.scores == {}


def test_enrol_stores_a_gait_template_and_ecg_norm(model, walking):
    rng = np.random.default_rng(3)
    base = _unit(rng.normal(size=16))
    ecg = _unit(base + 0.15 * rng.normal(size=(40, 16)))
    impostors = _unit(rng.normal(size=(60, 16)))
    engine = IdentityEngine({}, IdentityConfig(), model=ECG, gait_model=model)
    report = engine.enrol("Ann", ecg, impostor_embeddings=impostors,
                          impostor_labels=np.repeat(np.arange(12), 5),
                          gait_embeddings=_embed(model, walking["SA01"]))
    assert report.accepted and report.person.gait is not None
    assert report.person.gait.model == model.ref
    assert report.person.stats["ecg_impostor_std"] > 0
    short = engine.enrol("Bob", ecg, impostor_embeddings=impostors, impostor_labels=np.repeat(np.arange(12), 5),
                         gait_embeddings=_embed(model, walking["SA02"][:3]))
    assert short.accepted and short.person.gait is None
    assert any("walking IMU windows" in w for w in short.warnings)


# ------------------------------------------------------------------------------------- biometrics
def test_on_imu_feeds_gait_evidence_and_the_enrolment_sink(model, walking):
    people, _ = _household(model, walking)
    engine = IdentityEngine(people, IdentityConfig(), model=ECG)
    bio = Biometrics(None, engine, ImuModelSet.load_dir(MODELS_DIR))
    bio.gait_sink = []
    bio.on_imu(ImuUpdate(tuple(walking["SA01"]), 0), now=100.0)
    assert engine.gait_model is not None and engine.gait_model.ref == model.ref
    assert len(bio.gait_sink) == len(walking["SA01"])
    assert set(engine._gait.scores(100.0)) == {"Ann", "Bob"}
    assert bio.identity.wearer is None  # IMU evidence alone changes no identity


def test_a_waist_imu_gets_activity_from_motion_not_from_the_thigh_model(model, walking):
    """The shipped activity model is a thigh model; at the waist it is not loaded, and the
    movement rule (daemon.dsp.imu.motion_activity) gives the IMU's activity instead."""
    from daemon.dsp.imu import motion_activity

    engine = IdentityEngine({}, IdentityConfig(), model=ECG)
    waist = ImuModelSet.load_dir(MODELS_DIR, "waist")
    assert "activity" not in waist.models
    bio = Biometrics(None, engine, waist)
    bio.on_imu(ImuUpdate(tuple(walking["SA01"]), 0), now=100.0)
    assert bio.fused_activity(100.0).label == "walking"  # real SisFall walking at the waist
    # no model at all for a shin or wrist IMU: the daemon still runs the IMU path (gait, motion)
    from daemon.app import load_imu_models
    from daemon.config import parse_config

    shin = load_imu_models(parse_config("imu:\n  enabled: true\n  source: emulator\n  placement: shin\n"))
    assert shin is not None and not shin.models
    bio = Biometrics(None, engine, shin)
    bio.on_imu(ImuUpdate(tuple(walking["SA01"]), 0), now=100.0)
    assert bio.fused_activity(100.0).label == "walking" and bio.gait["walking"] is True
    still = walking["SA01"][0]
    g = np.zeros_like(still.data[:, :3])
    g[:, 2] = 9.81
    assert motion_activity(g + 0.01 * np.random.default_rng(0).standard_normal(g.shape), still.gait.__class__(False, None, 0.0)) == "rest"
    jog = g.copy()
    jog[:, 2] += 9.0 * np.sin(np.linspace(0, 2 * np.pi * 5.6, len(jog)))  # 2.8 Hz bounce, std ~6.4 m/s²
    assert motion_activity(jog, still.gait) == "vigorous"


# -------------------------------------------------------------------------------------- calibrate
@pytest.mark.timeout(300)
def test_calibrate_walking_phase_stores_a_gait_template(tmp_path):
    """`biod calibrate` with the emulated ECG box and MetaMotion: rest, then walking; the walking
    phase's gait windows become the person's gait template in the store."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"hub:\n  id: home\nstate_dir: {tmp_path / 'state'}\nidentity:\n  min_enrol_windows: 12\n"
        "ecg:\n  source: emulator\n  emulator:\n    recording: ecgid-p25-r1\n    speed: 4\n"
        "imu:\n  enabled: true\n  source: emulator\n  placement: waist\n"
        "  emulator:\n    recording: SA01_D01_walking\n    speed: 4\n")
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "calibrate", "--name", "ann", "--seconds", "40",
                          "--config", str(cfg)], cwd=repo, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gait template from" in res.stdout
    person = TemplateStore(tmp_path / "state" / "identity" / "templates.json").load()["ann"]
    assert person.gait is not None and person.gait.model.name == "gait_waist" and person.gait.n_windows >= 10


def test_the_imu_activity_is_read_from_the_top_level_head(walking):
    """The thigh model has a 'fine' head (HuGaDB classes, no bicycling) beside 'top_level'; the
    daemon took whichever output came first, 'fine', so no bicycling window was ever vigorous."""
    from daemon.biometrics import activity_output

    thigh = ImuModelSet.load_dir(MODELS_DIR, "thigh")
    outs = thigh.run("activity", walking["SA01"][0])
    assert outs is not None and set(outs) == {"fine", "top_level"}
    assert activity_output({"fine": 0, "top_level": 1}) == "top_level"
    bio = Biometrics(None, IdentityEngine({}, IdentityConfig(), model=ECG), thigh)
    bio.on_imu(ImuUpdate(tuple(walking["SA01"][:3]), 0), now=100.0)
    assert bio._imu_activity is not None and bio._imu_activity.labels == ("rest", "walking", "vigorous")
    with pytest.raises(ModelError, match="no 'top_level' or 'activity' output"):
        activity_output({"fine": 0})


def test_a_window_without_a_motion_verdict_leaves_the_activity_to_the_ecg(walking):
    """At the waist (movement rule), a window with no verdict kept the last one ('walking') for
    10 s while the person sat down: the docstring says the ECG alone speaks for such a window."""
    import dataclasses

    from daemon.dsp.imu import GaitState, motion_activity

    waist = ImuModelSet.load_dir(MODELS_DIR, "waist")
    bio = Biometrics(None, IdentityEngine({}, IdentityConfig(), model=ECG), waist)
    bio.on_imu(ImuUpdate(tuple(walking["SA01"][:2]), 0), now=100.0)
    assert bio.fused_activity(100.0).label == "walking"
    odd = dataclasses.replace(walking["SA01"][2], gait=GaitState(False, None, 0.0))  # moving, not walking
    assert motion_activity(odd.data[:, :3], odd.gait) is None
    bio.on_imu(ImuUpdate((odd,), 0), now=101.0)
    assert bio.fused_activity(101.0) is None  # neither modality has a verdict now


def test_clipped_windows_give_no_imu_activity_age_or_gender(walking):
    """The IMU models never saw a window on the sensor's rails (training drops such recordings;
    the manifests say to drop them): a clipped window gives no activity, age or gender, and
    leaves the activity to the ECG, as a window without a verdict does."""
    import dataclasses

    every = ImuModelSet.load_dir(MODELS_DIR)
    assert {"activity", "age", "gender"} <= set(every.models)
    bio = Biometrics(None, IdentityEngine({}, IdentityConfig(), model=ECG), every)
    bio.on_imu(ImuUpdate(tuple(walking["SA01"][:2]), 0), now=100.0)
    assert bio._imu_activity is not None and {"age", "gender"} <= set(bio.gait)
    clipped = dataclasses.replace(walking["SA01"][2], clipped=True)
    bio.on_imu(ImuUpdate((clipped,), 0), now=101.0)
    assert bio._imu_activity is None and bio.fused_activity(101.0) is None
    assert bio.gait["walking"] is True and not {"age", "gender"} & set(bio.gait)


@pytest.mark.parametrize("damage", ["truncated", "empty", "meta"])
def test_a_damaged_gait_model_is_named_and_the_daemon_goes_on_without_it(tmp_path, damage):
    """A truncated gait_*.npz raised zipfile.BadZipFile and an empty one EOFError, which nothing
    caught: `biod run` died at start (and systemd restarted it in a loop), even with the IMU off."""
    import shutil

    from daemon.app import BiodApp
    from daemon.config import parse_config
    from daemon.identity.gait import GaitModel, GaitModelError

    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR, models, ignore=shutil.ignore_patterns("float"))
    bad = models / "gait_waist.npz"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        with np.load(bad) as z:
            arrays = {k: z[k] for k in z.files if k != "meta_json"}
        np.savez(bad, meta_json=np.array('{"schema_version": 1, "name": "gait"}'), **arrays)
    with pytest.raises(GaitModelError, match=r"gait_waist\.npz.*re-install biod"):
        GaitModel.load(bad)
    imu = ImuModelSet.load_dir(models)
    assert imu.gait == {} and {"activity", "age", "gender"} <= set(imu.models)
    for enabled in ("false", "true"):
        app = BiodApp(parse_config(f"state_dir: {tmp_path / 'state'}\nmodels_dir: {models}\n"
                                   f"imu:\n  enabled: {enabled}\n  source: emulator\n"))
        assert app.ecg_model is not None and app.imu_models is not None and app.imu_models.gait == {}


def test_gait_estimates_in_events_are_plain_numbers(walking):
    """The event's sensors.gait carried age and gender as one-element lists
    ({"age_years": [22.97]}), which docs/mqtt.md did not show and templates must unpack."""
    waist = ImuModelSet.load_dir(MODELS_DIR, "waist")
    bio = Biometrics(None, IdentityEngine({}, IdentityConfig(), model=ECG), waist)
    bio.on_imu(ImuUpdate(tuple(walking["SA01"][:3]), 0), now=100.0)
    gait = bio.gait
    assert gait["walking"] is True and isinstance(gait["cadence_spm"], float)
    assert isinstance(gait["age"]["age_years"], float) and isinstance(gait["age"]["p_elderly"], float)
    assert 0.0 <= gait["gender"]["p_female"] <= 1.0
    obs = bio._observation(100.0, live=False)
    assert obs.sensors["gait"] is gait  # walking: the estimates ride on the event
