"""The household evaluation (`python -m training.eval household`) runs the daemon's own engine:
enrolment with the shipped impostor set, then streamed sessions, on real ECG-ID recordings of
persons outside every model's training data (shipped emulator recordings)."""
from __future__ import annotations

import numpy as np
import pytest

from daemon.biometrics import MODELS_DIR, EcgModelRunner
from daemon.enrol import load_impostors
from daemon.identity.engine import UNKNOWN, IdentityConfig, IdentityEngine
from firmware_protocol.emulators.recordings import load_recording
from training.data.ecg import EcgRecord
from training.eval.household import Session, enrol, household_order, sessions_of, stream


def _record(name: str) -> EcgRecord:
    r = load_recording(name)
    return EcgRecord("ecgid", f"ecgid:{r.person}", name, r.date, float(r.fs_hz), r.leads_mv, r.lead_present)


@pytest.fixture(scope="module")
def runner() -> EcgModelRunner:
    return EcgModelRunner.load(MODELS_DIR / "ecg_dualtask.tflite")


@pytest.fixture(scope="module")
def sessions(runner):
    names = ["ecgid-p02-r1", "ecgid-p02-r4", "ecgid-p26-r1", "ecgid-p26-r3", "ecgid-p34-r1", "ecgid-p34-r3",
             "ecgid-p05-r1"]
    return dict(zip(names, sessions_of([_record(n) for n in names], runner)))


def test_members_named_and_the_stranger_is_not(runner, sessions) -> None:
    cfg = IdentityConfig(min_enrol_windows=12)
    people = enrol({"alice": sessions["ecgid-p02-r1"], "bob": sessions["ecgid-p26-r1"],
                    "carol": sessions["ecgid-p34-r1"]}, runner, cfg, load_impostors(MODELS_DIR))
    assert sorted(people) == ["alice", "bob", "carol"]
    engine = IdentityEngine(people, cfg, model=runner.ref)
    for name, rec in (("alice", "ecgid-p02-r4"), ("bob", "ecgid-p26-r3"), ("carol", "ecgid-p34-r3")):
        first, member, at = stream(engine, sessions[rec])
        assert (first, member) == (name, name), rec
        assert at is not None and at >= cfg.min_pool  # never before a full pool
    # ECG-ID person 5 resembles alice (pooled cosine ~0.56 vs her own other day ~0.78): with an
    # impostor set of clinical LUDB recordings only, alice's threshold fell to 0.35 and he was
    # named alice. The shipped set holds wearable-like ECG-ID impostors too.
    first, member, _ = stream(engine, sessions["ecgid-p05-r1"])
    assert member is None and first in (None, UNKNOWN)
    assert people["alice"].threshold > 0.6


def test_stream_starts_each_session_from_scratch(runner, sessions) -> None:
    cfg = IdentityConfig(min_enrol_windows=12)
    people = enrol({"alice": sessions["ecgid-p02-r1"]}, runner, cfg, load_impostors(MODELS_DIR))
    engine = IdentityEngine(people, cfg, model=runner.ref)
    a = stream(engine, sessions["ecgid-p02-r4"])
    b = stream(engine, sessions["ecgid-p02-r4"])
    assert a == b  # no consensus carried over from the previous wearer
    s = sessions["ecgid-p02-r4"]
    assert s.emb.shape[0] == s.ok.shape[0] == s.lead_mask.shape[0] and np.all(s.lead_mask[:, 0])


def test_household_order_keeps_each_persons_sessions_in_date_order() -> None:
    """--adapt streams sessions as a household lives them: interleaved, each person's by date."""
    def mk(person: str, date: str) -> Session:
        return Session(person, date, np.zeros((1, 2), np.float32), np.ones(1, bool), np.ones((1, 3), bool))

    lived = {"a": [mk("a", "12.05.2005"), mk("a", "07.12.2004"), mk("a", "28.12.2004")],
             "mitdb:201": [mk("mitdb:201", "201-0"), mk("mitdb:201", "201-1")], "c": [mk("c", "21.05.2005")]}
    order = household_order(lived, np.random.default_rng(0))
    assert sorted(id(s) for _, s in order) == sorted(id(s) for ss in lived.values() for s in ss)
    assert [s.session for p, s in order if p == "a"] == ["07.12.2004", "28.12.2004", "12.05.2005"]
    assert [s.session for p, s in order if p == "mitdb:201"] == ["201-0", "201-1"]  # no date: record order
    assert order != household_order(lived, np.random.default_rng(1)) or len(order) < 3


def test_pool_acceptance_scores_pooled_clean_windows_against_the_members_threshold(runner, sessions) -> None:
    """The threshold-calibration numbers of the household report: real sessions, a real
    enrolment; the member's own later session passes far more pools than a stranger's, pools
    come only from clean windows, and a threshold above every score accepts nothing."""
    from dataclasses import replace

    from training.eval.household import pool_acceptance

    cfg = IdentityConfig(min_enrol_windows=12)
    alice = enrol({"alice": sessions["ecgid-p02-r1"]}, runner, cfg, load_impostors(MODELS_DIR))["alice"]
    own, n_own = pool_acceptance(alice, sessions["ecgid-p02-r4"], cfg.window)
    other, n_other = pool_acceptance(alice, sessions["ecgid-p05-r1"], cfg.window)
    s = sessions["ecgid-p02-r4"]
    assert n_own == int(s.ok.sum()) - cfg.window + 1 > 0 and n_other > 0
    assert own / n_own > 0.5 > other / n_other
    assert pool_acceptance(replace(alice, threshold=1.0), s, cfg.window)[0] == 0
    dirty = replace(s, ok=np.zeros_like(s.ok))
    assert pool_acceptance(alice, dirty, cfg.window) == (0, 0)


def _ecgid_folder(tmp_path, records: list[str]):
    """``tmp_path/d/ecgid/`` holding the named recordings of the real-data fixture
    (tests/fixtures/minidata)."""
    import json
    from pathlib import Path

    mini = Path(__file__).resolve().parent / "fixtures" / "minidata" / "ecgid"
    meta = json.loads((mini / "metadata.json").read_text())
    z = np.load(mini / "ecgid.npz")
    keep = [i for i, r in enumerate(meta["records"]) if r["record"] in records]
    d = tmp_path / "d" / "ecgid"
    d.mkdir(parents=True)
    np.savez(d / "ecgid.npz", signals=z["signals"][keep], person=z["person"][keep])
    (d / "metadata.json").write_text(json.dumps(
        {**meta, "records": [dict(meta["records"][old], index=new) for new, old in enumerate(keep)]}))
    return tmp_path / "d"


def test_a_person_who_cannot_be_a_member_is_still_a_stranger(tmp_path) -> None:
    """Review finding 6: ECG-ID person 34 with one recording cannot be enrolled as a member (no
    second session to test), but is a held-out person the household has never seen: a stranger
    with all their recordings, as the module says; it was left out of both."""
    from training.eval.household import evaluate

    folder = _ecgid_folder(tmp_path, [f"Person_{p:02d}/rec_{k}" for p in (2, 26) for k in (1, 2, 3, 4)]
                           + ["Person_34/rec_1"])
    res = evaluate(folder, MODELS_DIR, n_households=1, size=1, progress=lambda m: None)
    assert res["eligible_persons"] == 2  # persons 2 and 26: three recordings each
    assert res["stranger_persons_ecgid"] == 2  # the other of them, and person 34
    assert res["stranger_ecgid_sessions"] == 3 + 1


def test_a_session_without_a_date_is_never_counted_as_cross_date() -> None:
    """Review finding 4: a recording without a readable date is named by its record id, which
    differs from every date; it must not count as another day than the enrolment."""
    from collections import defaultdict

    from training.eval.household import _tally

    def mk(session: str) -> Session:
        return Session("ecgid:02", session, np.zeros((1, 2), np.float32), np.ones(1, bool), np.ones((1, 3), bool))

    counts: dict[str, int] = defaultdict(int)
    enrolled = {"ecgid:02": "07.12.2004"}
    for s in (mk("Person_02/rec_2"), mk("7.12.2004"), mk("28.12.2004")):
        _tally(counts, [], "ecgid:02", s, ["ecgid:02"], enrolled, ("ecgid:02", "ecgid:02", 3))
    assert counts["member_sessions"] == 3 and counts["member_cross_sessions"] == 1
