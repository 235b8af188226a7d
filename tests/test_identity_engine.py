"""Open-set identity engine on a synthetic but realistic household.

The simulator draws ECG-embedding-like vectors on the unit sphere (D=64):
* persons share a common component (mean between-person cosine ~0.3, like a trained
  embedding where every ECG looks somewhat like every other);
* each recording session drifts the person's mean (cross-session: electrode placement, day),
  and walking moves it again (heart rate, posture) in a person-specific direction;
* consecutive windows are correlated (AR(1), rho 0.6: the 3 s windows arrive every second and
  overlap), and a fraction of windows are outliers (artefacts that passed the quality gate).
Scale: ``pooling_det`` below (20 persons x 6 seeds, per-activity prototypes from one session,
5-window segments from another day) measures EER 5.5 % and FRR at FAR 1 % 24 %; compare
BASELINES.md, PCA+LDA on ECG-ID cross-date: EER 9.4 % at 3 s and 5.6 % at 10 s. Realistic,
not easy: some strangers resemble a household member.

``python tests/test_identity_engine.py`` prints the measurements quoted in docs/identity.md.
"""
from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass, replace

import numpy as np
import pytest

from daemon.identity.engine import (
    ADAPTED_PREFIX,
    UNKNOWN,
    IdentityConfig,
    IdentityEngine,
    _confident_threshold,
    build_prototypes,
    segment_scores,
)
from daemon.identity.fusion import (
    ActivityEstimate,
    FusionConfig,
    FusionError,
    ScoreNorm,
    fuse_activity,
    fuse_identity,
    gate_walking_only,
    normalise_by_impostors,
    to_top_level,
)
from daemon.identity.store import ModelRef, Person, StoreError, TemplateStore

D = 64
MODEL = ModelRef("ecg_dualtask", "1.0.0", D)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Household:
    """Synthetic embedding source; every draw uses ``rng`` so a seed fixes everything."""

    rng: np.random.Generator
    common_weight: float = 0.55
    drift: float = 0.6
    walk: float = 0.45
    noise: float = 1.5
    rho: float = 0.6
    impostors: tuple[np.ndarray, np.ndarray] | None = None  # the impostor set enrol_household used

    def __post_init__(self) -> None:
        self.common = _unit(self.rng.normal(size=D))
        self._gait: dict[bytes, np.ndarray] = {}
        self._enrolled: dict[bytes, np.ndarray] = {}

    def same_session(self, mean: np.ndarray, n: int, outliers: float = 0.0) -> np.ndarray:
        """Resting windows from the enrolment session: for tests of mechanics, not accuracy."""
        return self.windows(self._enrolled[mean.tobytes()], n, outliers)

    def gait_direction(self, mean: np.ndarray) -> np.ndarray:
        """How walking moves this person's embedding: the person's own, mostly the same each day."""
        key = mean.tobytes()
        if key not in self._gait:
            self._gait[key] = _unit(self.rng.normal(size=D))
        return self._gait[key]

    def persons(self, n: int) -> np.ndarray:
        r = _unit(self.rng.normal(size=(n, D)))
        return _unit(self.common_weight * self.common + np.sqrt(1 - self.common_weight**2) * r)

    def session(self, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rest mean, walking mean) of one wearing session."""
        rest = _unit(mean + self.drift * _unit(self.rng.normal(size=D)))
        walk_dir = _unit(self.gait_direction(mean) + 0.5 * _unit(self.rng.normal(size=D)))
        return rest, _unit(rest + self.walk * walk_dir)

    def windows(self, centre: np.ndarray, n: int, outliers: float = 0.0) -> np.ndarray:
        eps = self.rng.normal(size=(n, D)) / np.sqrt(D)
        for i in range(1, n):  # AR(1): overlapping windows share signal and noise
            eps[i] = self.rho * eps[i - 1] + np.sqrt(1 - self.rho**2) * eps[i]
        e = _unit(centre + self.noise * eps)
        bad = self.rng.random(n) < outliers
        e[bad] = _unit(self.rng.normal(size=(int(bad.sum()), D)))
        return e

    def enrolment(self, mean: np.ndarray, n_rest: int = 45, n_walk: int = 45) -> tuple[np.ndarray, list[str]]:
        """About 1.5 minutes of `biod calibrate`: rest, then walking, one session."""
        rest, walk = self.session(mean)
        self._enrolled[mean.tobytes()] = rest
        x = np.concatenate([self.windows(rest, n_rest), self.windows(walk, n_walk)])
        return x, ["rest"] * n_rest + ["walking"] * n_walk

    def stream(self, mean: np.ndarray, n: int, outliers: float = 0.0) -> np.ndarray:
        """A later wearing session (another day): rest then walking."""
        rest, walk = self.session(mean)
        return np.concatenate([self.windows(rest, n // 2, outliers), self.windows(walk, n - n // 2, outliers)])

    def impostor_set(self, n_persons: int, per_person: int = 30) -> tuple[np.ndarray, np.ndarray]:
        means = self.persons(n_persons)
        x = np.concatenate([self.stream(m, per_person) for m in means])
        return x, np.repeat(np.arange(n_persons), per_person)


def enrol_household(seed: int = 0, n: int = 5, config: IdentityConfig | None = None
                    ) -> tuple[Household, np.ndarray, dict[str, Person], IdentityConfig]:
    config = config or IdentityConfig()
    hh = Household(np.random.default_rng(seed))
    means = hh.persons(n)
    imp_x, imp_y = hh.impostor_set(60)
    hh.impostors = (imp_x, imp_y)
    people: dict[str, Person] = {}
    for i, m in enumerate(means):
        x, acts = hh.enrolment(m)
        report = IdentityEngine(people, config, model=MODEL).enrol(f"P{i}", x, acts, imp_x, imp_y, leads_on=3)
        assert report.accepted, report.reason
        people[report.person.name] = report.person
    return hh, means, people, config


def run_stream(engine: IdentityEngine, emb: np.ndarray, t0: float = 0.0) -> list:
    return [engine.observe(t0 + i, e, True, True, (True, True, True)) for i, e in enumerate(emb)]


@pytest.fixture(scope="module")
def household():
    return enrol_household()


# ---- consensus, correctness, open set -----------------------------------------------------
@pytest.mark.parametrize("confirm", [2, 3, 5])
def test_announcement_waits_for_confirm_agreeing_windows(household, confirm):
    hh, means, people, base = household
    cfg = IdentityConfig(**{**base.__dict__, "confirm": confirm})
    delay = cfg.min_pool - 1 + confirm  # a full pool, then `confirm` agreeing decisions
    announced_at = []
    for p in range(len(means)):
        engine = IdentityEngine(people, cfg, model=MODEL)
        states = run_stream(engine, hh.same_session(means[p], 25))
        first = next(i for i, s in enumerate(states) if s.decided)
        assert all(s.wearer is None and not s.decided and s.live for s in states[:first])
        assert states[first].wearer == f"P{p}"
        assert states[first].n_agreeing >= confirm
        # confidence: Laplace share of agreeing decisions, so a clean announcement reads high
        n_decisions = first + 1 - (cfg.min_pool - 1)
        assert states[first].confidence == pytest.approx((states[first].n_agreeing + 1) / (n_decisions + 2))
        assert states[first].confidence >= 0.5
        assert states[-1].confidence >= states[first].confidence  # grows as agreeing decisions add up
        announced_at.append(first + 1)
    assert min(announced_at) == delay  # never earlier; exactly on time when all windows agree
    assert np.median(announced_at) <= delay + 1


def test_unclean_windows_do_not_count_towards_consensus(household):
    hh, means, people, cfg = household
    engine = IdentityEngine(people, cfg, model=MODEL)
    emb = hh.same_session(means[1], 30)
    for i in range(10):  # live but noisy: nothing can be decided from it
        s = engine.observe(i, emb[i], False, True)
        assert not s.decided and s.wearer is None
        s = engine.observe(i + 0.5, None, True, True)
        assert not s.decided
    states = [engine.observe(10 + i, e, True, True) for i, e in enumerate(emb[10:])]
    assert next(i for i, s in enumerate(states) if s.decided) + 1 >= cfg.min_pool - 1 + cfg.confirm


def _wearers_and_strangers(household) -> tuple[float, float, int]:
    """(windows naming the right member, windows naming a wrong one, of 60 strangers how many
    were announced as a member), each member streamed 3 times for 60 windows on another day."""
    hh, means, people, cfg = household
    wrong = correct = 0
    for rep in range(3):
        for p, m in enumerate(means):
            engine = IdentityEngine(people, cfg, model=MODEL)
            states = run_stream(engine, hh.stream(m, 60))
            decided = [s.wearer for s in states if s.decided]
            correct += sum(w == f"P{p}" for w in decided)
            wrong += sum(w not in (f"P{p}", UNKNOWN) for w in decided)
    total = 3 * len(means) * 60
    named = 0
    for m in hh.persons(60):
        states = run_stream(IdentityEngine(people, cfg, model=MODEL), hh.stream(m, 40))
        named += any(s.wearer not in (None, UNKNOWN) for s in states)
    return correct / total, wrong / total, named


def test_correct_wearer_across_sessions():
    # own households (not the shared fixture, whose random stream earlier tests advance), the
    # same persons enrolled with the plain impostor quantile and with the default; 3 seeds
    def over_seeds(config: IdentityConfig | None) -> tuple[float, float, int]:
        runs = [_wearers_and_strangers(enrol_household(seed=seed, config=config)) for seed in (1, 2, 3)]
        for correct, wrong, _ in runs:
            assert wrong <= 0.02, f"{wrong:.1%} of windows announced the wrong person"
        return (float(np.mean([r[0] for r in runs])), float(np.mean([r[1] for r in runs])), sum(r[2] for r in runs))

    plain = over_seeds(IdentityConfig(far_confidence=0.0))
    conf = over_seeds(None)
    assert plain[0] >= 0.7, plain  # at most 0.88: 7 of 60 windows are the consensus delay
    # The confident thresholds (default) trade members for strangers in this simulator, whose
    # 60 impostor persons already pin the 1 % quantile (docs/identity.md): fewer strangers
    # named, and members later or `unknown` more often, never named wrongly.
    assert conf[0] >= 0.5, conf
    assert conf[2] < plain[2], (conf, plain)


def test_impostor_is_unknown_not_a_household_member(household):
    hh, _, people, cfg = household
    strangers = hh.persons(30)
    named = unknown = 0
    for m in strangers:
        engine = IdentityEngine(people, cfg, model=MODEL)
        states = run_stream(engine, hh.stream(m, 40))
        first = next((i for i, s in enumerate(states) if s.decided), None)
        named += any(s.wearer not in (None, UNKNOWN) for s in states)
        unknown += states[-1].wearer == UNKNOWN
        if first is not None and states[first].wearer == UNKNOWN:
            assert first + 1 >= cfg.min_pool - 1 + cfg.unknown  # only after enough rejecting windows
    # per-member FAR 1 % per decision; strangers resembling a member are named (measured ~14 %)
    assert named <= 7, f"{named}/30 strangers were announced as a household member"
    assert unknown >= 22


def test_not_live_ends_identity_immediately_and_resets_consensus(household):
    hh, means, people, cfg = household
    engine = IdentityEngine(people, cfg, model=MODEL)
    states = run_stream(engine, hh.same_session(means[0], 15))
    assert states[-1].wearer == "P0"
    off = engine.observe(15.0, None, False, False)
    assert off.wearer is None and off.decided and not off.live and off.n_agreeing == 0
    lead_off = engine.observe(16.0, hh.same_session(means[0], 1)[0], True, True, (False, False, False))
    assert lead_off.wearer is None and not lead_off.live
    # a new person puts the electrodes on: announced after `confirm`, not `switch`, windows
    states = run_stream(engine, hh.same_session(means[3], 15), t0=20.0)
    first = next(i for i, s in enumerate(states) if s.decided)
    assert states[first].wearer == "P3"
    assert first + 1 < cfg.min_pool - 1 + cfg.switch


def count_flips(people, cfg, streams) -> tuple[int, set[str]]:
    flips, seen = 0, set()
    for emb in streams:
        announced = [s.wearer for s in run_stream(IdentityEngine(people, cfg, model=MODEL), emb) if s.decided]
        flips += sum(a != b for a, b in zip(announced, announced[1:]))
        seen |= set(announced)
    return flips, seen


def test_no_flicker_under_outlier_windows(household):
    hh, means, people, cfg = household
    streams = []
    for p, m in enumerate(means):
        emb = hh.same_session(m, 80, outliers=0.1)  # artefacts that passed the quality gate
        other = hh.same_session(means[(p + 1) % len(means)], 80)
        swap = hh.rng.random(80) < 0.08  # and windows that look like another member
        emb[swap] = other[swap]
        streams.append(emb)
    naive = IdentityConfig(**{**cfg.__dict__, "history": 1, "confirm": 1, "unknown": 1, "switch": 1,
                              "stay_hysteresis": 0.0, "window": 1, "min_pool": 1})
    flips, seen = count_flips(people, cfg, streams)
    naive_flips, _ = count_flips(people, naive, streams)
    assert naive_flips >= 20  # the stream really is noisy ...
    assert flips <= 2, flips  # ... and consensus + hysteresis hold the wearer
    assert seen <= {f"P{p}" for p in range(len(means))} | {UNKNOWN}


def test_no_enrolled_people_means_unknown():
    hh = Household(np.random.default_rng(5))
    engine = IdentityEngine({}, IdentityConfig(), model=MODEL)
    cfg = IdentityConfig()
    states = run_stream(engine, hh.windows(hh.persons(1)[0], 12))
    at = cfg.min_pool - 1 + cfg.unknown
    assert all(s.wearer is None for s in states[: at - 1])
    assert all(s.wearer == UNKNOWN for s in states[at - 1 :])


def test_lead_set_change_keeps_wearer_but_restarts_the_pool(household):
    hh, means, people, cfg = household
    engine = IdentityEngine(people, cfg, model=MODEL)
    emb = hh.same_session(means[1], 22)
    for i, e in enumerate(emb[:20]):
        s = engine.observe(i, e, True, True, (True, True, True))
    assert s.wearer == "P1"
    s = engine.observe(20, emb[20], True, True, (True, False, True))  # lead II dropped
    assert s.wearer == "P1" and len(engine._pool) == 1


# ---- enrolment ------------------------------------------------------------------------------
def test_enrolment_refuses_too_few_windows():
    hh = Household(np.random.default_rng(1))
    x, acts = hh.enrolment(hh.persons(1)[0], n_rest=8, n_walk=6)
    report = IdentityEngine({}, IdentityConfig(), model=MODEL).enrol("Ann", x, acts)
    assert not report.accepted and report.person is None
    assert "only 14 clean ECG windows" in report.reason and "record longer" in report.reason


def test_enrolment_refuses_inconsistent_windows():
    hh = Household(np.random.default_rng(2))
    mixed = np.concatenate([hh.windows(m, 10) for m in hh.persons(6)])  # six people in one recording
    report = IdentityEngine({}, IdentityConfig(), model=MODEL).enrol("Ann", mixed)
    assert not report.accepted and "inconsistent" in report.reason
    assert report.median_self_similarity < IdentityConfig().min_self_similarity
    # while a genuine single-person recording of the same length passes
    ok = IdentityEngine({}, IdentityConfig(), model=MODEL).enrol("Ann", hh.enrolment(hh.persons(1)[0], 30, 30)[0])
    assert ok.accepted, ok.reason


def test_enrolment_refuses_duplicate_name_and_wrong_dimension(household):
    hh, means, people, cfg = household
    engine = IdentityEngine(people, cfg, model=MODEL)
    x, acts = hh.enrolment(hh.persons(1)[0])
    assert "already enrolled" in engine.enrol("p0", x, acts).reason
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        engine.enrol("New", x[:, :32])


def test_prototypes_per_activity_or_kmeans(household):
    _, _, people, _ = household
    assert people["P0"].prototype_labels == ("rest", "walking")
    hh = Household(np.random.default_rng(3))
    x, _ = hh.enrolment(hh.persons(1)[0])
    report = IdentityEngine({}, IdentityConfig(), model=MODEL).enrol("Ann", x)
    assert report.accepted
    assert report.person.prototype_labels[0].startswith("cluster-") and 1 <= len(report.person.prototype_labels) <= 3


def test_reported_far_matches_held_out_impostors_and_frr_is_sensible(household):
    hh, means, people, cfg = household
    r = enrolment_estimates(hh, means, people, cfg)
    for rep, up, frr_rep, frr_meas in zip(r["far_rep"], r["far_upper"], r["frr_rep"], r["frr_meas"]):
        assert rep <= up and rep <= 2 * cfg.target_far
        assert frr_rep <= frr_meas + 0.05  # the same-session FRR is the optimistic one
    assert abs(np.mean(r["far_meas"]) - np.mean(r["far_rep"])) <= 0.02, r
    assert np.mean(r["far_meas"]) <= np.mean(r["far_upper"]) + 0.01, r
    # per decision, another day; consensus turns it into a late announcement (the default
    # confident thresholds pay for their lower FAR here: 0.41 on this household, plain quantile 0.24)
    assert np.mean(r["frr_meas"]) <= 0.5, r


def test_enrolment_reports_margins_to_each_enrolled_person(household):
    hh, means, people, cfg = household
    twin = _unit(hh._enrolled[means[0].tobytes()] + 0.15 * _unit(hh.rng.normal(size=D)))  # nearly P0 that day
    twin_windows = hh.windows(twin, 90)
    refused = IdentityEngine(people, cfg, model=MODEL).enrol("Twin", twin_windows)
    assert not refused.accepted and "look like 'P0'" in refused.reason  # P0 under a second name
    # the margins themselves, with that refusal switched off
    engine = IdentityEngine(people, dataclasses.replace(cfg, max_accepted_by_other=1.01), model=MODEL)
    far_away = hh.persons(1)[0]
    near = engine.enrol("Twin", twin_windows)
    distinct = engine.enrol("Other", *hh.enrolment(far_away))
    assert set(distinct.margins) == set(people)
    assert distinct.min_margin == min(distinct.margins.values())
    assert near.margins["P0"] < distinct.margins["P0"]
    assert near.min_margin < distinct.min_margin
    assert any("hard to tell" in w for w in near.warnings)


def test_templates_of_another_model_are_set_aside_and_the_others_still_identified(household):
    """One person left from before a model update used to switch identity off for the whole
    household (the engine refused every template); now only that person is not scored."""
    hh, means, people, cfg = household
    assert IdentityEngine(people, cfg, model=ModelRef("ecg_dualtask", "2.0.0", D)).stale == tuple(sorted(people))
    old = ModelRef(MODEL.name, "0.9.0", D)
    mixed = {**people, "P0": dataclasses.replace(people["P0"], model=old)}
    engine = IdentityEngine(mixed, cfg, model=MODEL)
    assert engine.stale == ("P0",) and "P0" not in [p.name for p in engine.people]
    assert engine.name_problem("P0") is None  # re-enrolling P0 is allowed (the store replaces the stale record)
    assert "same id" in engine.name_problem("p0")  # another name with P0's id is not
    assert run_stream(engine, hh.same_session(means[3], 30))[-1].wearer == "P3"
    assert "P0" not in {s.wearer for s in run_stream(IdentityEngine(mixed, cfg, model=MODEL), hh.same_session(means[0], 30))}
    with pytest.raises(StoreError, match="different ECG models"):  # no model given: nothing says which is right
        IdentityEngine(mixed, cfg)


def test_store_round_trip_gives_the_same_decisions(household, tmp_path):
    hh, means, people, cfg = household
    store = TemplateStore(tmp_path / "identity" / "templates.json", model=MODEL)
    store.save(people)
    loaded = store.load()
    assert loaded == people
    emb = hh.same_session(means[3], 30)
    a = [s.wearer for s in run_stream(IdentityEngine(people, cfg, model=MODEL), emb)]
    b = [s.wearer for s in run_stream(IdentityEngine(loaded, cfg, model=MODEL), emb)]
    assert a == b and a[-1] == "P3"


# ---- template adaptation -------------------------------------------------------------------
@dataclass(frozen=True)
class FixedImpostors:
    """The impostor set as ``daemon.enrol.Impostors`` hands it out (same set for any leads)."""

    x: np.ndarray
    y: np.ndarray

    def for_leads(self, n_leads_on: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x, self.y


ADAPT = dict(adapt=True, adapt_margin=0.05)  # synthetic scores: the guards' logic, not the shipped margin


def adapting_engine(household, **knobs) -> IdentityEngine:
    hh, _, people, cfg = household
    return IdentityEngine(people, replace(cfg, **{**ADAPT, **knobs}), model=MODEL, impostors=FixedImpostors(*hh.impostors))


def wear(engine: IdentityEngine, emb: np.ndarray, t0: float = 0.0) -> list:
    """One wearing session: clean windows, then the electrodes come off (the session ends)."""
    states = run_stream(engine, emb, t0)
    engine.observe(t0 + len(emb), None, False, False)
    return states


def test_adaptation_is_off_by_default(household):
    hh, means, people, cfg = household
    engine = IdentityEngine(people, cfg, model=MODEL, impostors=FixedImpostors(*hh.impostors))
    assert wear(engine, hh.same_session(means[0], 30))[-1].wearer == "P0"
    assert engine.take_adaptations() == [] and engine.people == list(people.values())


def test_strong_session_adds_a_prototype_and_rederives_the_threshold(household):
    hh, means, people, _ = household
    engine = adapting_engine(household)
    assert wear(engine, hh.same_session(means[0], 30))[-1].wearer == "P0"
    (a,) = engine.take_adaptations()
    before, after = people["P0"], a.person
    assert after.id == before.id and after.prototype_labels == before.prototype_labels + (f"{ADAPTED_PREFIX}1",)
    assert np.array_equal(after.prototypes[:-1], before.prototypes)  # enrolment prototypes kept as they were
    assert a.score >= before.threshold + engine.config.adapt_margin and a.score - a.runner_up >= engine.config.adapt_runner_up
    assert after.stats["enrol_threshold"] == before.threshold and after.stats["n_adaptations"] == 1
    # the threshold is the impostor quantile for the NEW prototype set (other members' prototypes
    # count as impostors, P0's own do not): per-decision FAR stays at target
    imp, who = engine._impostor_scores(after.prototypes, *hh.impostors, exclude=0)
    cfg = engine.config
    assert after.threshold == pytest.approx(_confident_threshold(imp, who, cfg.target_far, cfg.far_confidence, cfg.seed))
    assert after.threshold >= float(np.quantile(imp, 1 - cfg.target_far, method="higher"))
    assert after.threshold >= before.threshold  # max over more prototypes: impostors score at least as high
    assert np.mean(imp >= after.threshold) <= engine.config.target_far + 1 / imp.size  # the quantile score itself
    assert after.stats["expected_far"] == pytest.approx(float(np.mean(imp >= after.threshold)))
    assert engine.people[0] is after  # the engine scores with it from the next session on
    assert engine.take_adaptations() == []  # handed out once


@pytest.mark.parametrize("case", ["short", "weak", "ambiguous", "stranger", "split_vote", "unannounced"])
def test_no_adaptation_without_strong_evidence(household, case):
    hh, means, _, _ = household
    emb = hh.same_session(means[1], 30)
    knobs: dict = {}
    if case == "short":          # announced, but too few clean windows to trust a session mean
        emb = emb[:9]
        knobs = {"adapt_min_windows": 10}
    elif case == "weak":         # accepted, but not by the adaptation margin
        knobs = {"adapt_margin": 1.0}
    elif case == "ambiguous":    # another member scores too close
        knobs = {"adapt_runner_up": 1.5}
    elif case == "stranger":     # nobody accepted: unknown
        emb = hh.stream(hh.persons(1)[0], 30)
    elif case == "split_vote":   # too few of the session's decisions named the wearer
        knobs = {"adapt_min_agreement": 1.0}
        emb = np.concatenate([emb[:20], _unit(hh.rng.normal(size=(10, D))), emb[20:30]])
    elif case == "unannounced":  # the electrodes came off before anybody was announced
        emb = emb[:6]
        knobs = {"adapt_min_windows": 1}
    engine = adapting_engine(household, **knobs)
    states = wear(engine, emb)
    if case in ("weak", "ambiguous", "split_vote"):
        assert states[-1].wearer == "P1"  # identified all the same: only the adaptation is withheld
    assert engine.take_adaptations() == []


def test_adapted_prototypes_are_capped_oldest_first(household):
    hh, means, people, _ = household
    engine = adapting_engine(household, adapt_max_prototypes=2)
    for k in range(4):
        wear(engine, hh.same_session(means[2], 25), t0=100.0 * k)
    adaptations = engine.take_adaptations()
    assert len(adaptations) == 4
    last = adaptations[-1]
    labels = people["P2"].prototype_labels
    assert last.person.prototype_labels == labels + (f"{ADAPTED_PREFIX}3", f"{ADAPTED_PREFIX}4")
    assert last.dropped == (f"{ADAPTED_PREFIX}2",)
    assert np.array_equal(last.person.prototypes[:len(labels)], people["P2"].prototypes)


def test_anchor_refuses_a_session_only_an_adapted_prototype_accepts(household):
    """Poisoning by small steps: a look-alike whose session was adapted once must not add more
    prototypes on the strength of that adapted one."""
    hh, means, people, cfg = household
    stranger = hh.persons(1)[0]
    emb = hh.stream(stranger, 30)
    poisoned = people["P0"]
    poisoned = replace(poisoned, prototypes=np.vstack([poisoned.prototypes, _unit(emb.mean(axis=0))[None]]),
                       prototype_labels=poisoned.prototype_labels + (f"{ADAPTED_PREFIX}1",),
                       stats={**poisoned.stats, "enrol_threshold": poisoned.threshold})
    household_p = {**people, "P0": poisoned}
    imp = FixedImpostors(*hh.impostors)
    for anchor, expected in ((True, 0), (False, 1)):
        engine = IdentityEngine(household_p, replace(cfg, **ADAPT, adapt_anchor=anchor), model=MODEL, impostors=imp)
        assert wear(engine, emb)[-1].wearer == "P0"
        assert len(engine.take_adaptations()) == expected


def test_no_adaptation_without_an_impostor_set(household):
    hh, means, people, cfg = household
    engine = IdentityEngine(people, replace(cfg, **ADAPT), model=MODEL)
    wear(engine, hh.same_session(means[0], 30))
    assert engine.take_adaptations() == []


def test_adaptation_is_persisted_private_and_reloaded(household, tmp_path):
    hh, means, people, cfg = household
    store = TemplateStore(tmp_path / "identity" / "templates.json", model=MODEL)
    store.save(people)
    engine = adapting_engine(household)
    wear(engine, hh.same_session(means[4], 30))
    (a,) = engine.take_adaptations()
    saved = store.update_templates(a.person)
    assert saved == a.person
    assert oct((tmp_path / "identity" / "templates.json").stat().st_mode & 0o777) == "0o600"
    loaded = store.load()
    assert loaded["P4"] == a.person and loaded["P0"] == people["P0"]
    emb = hh.same_session(means[4], 20)
    restarted = IdentityEngine(loaded, engine.config, model=MODEL, impostors=FixedImpostors(*hh.impostors))
    assert [s.scores for s in run_stream(restarted, emb)] == [s.scores for s in run_stream(engine, emb)]
    store.remove("P4")  # removed meanwhile: a late adaptation must not bring the template back
    assert store.update_templates(a.person) is None and "P4" not in store.load()


# ---- the segment-vs-median choice ----------------------------------------------------------
def pooling_det(scoring: str, outliers: float, seeds: range = range(30, 33), n: int = 20) -> tuple[float, float]:
    """(EER, FRR at FAR 1 %) of 5-window pooled scores, cross-session, n persons per seed."""
    cfg = IdentityConfig(scoring=scoring)
    genuine, impostor = [], []
    start = np.zeros(1, np.intp)
    for seed in seeds:
        hh = Household(np.random.default_rng(seed))
        means = hh.persons(n)
        protos = [build_prototypes(*hh.enrolment(m), cfg)[0] for m in means]
        for q, m in enumerate(means):
            emb = hh.stream(m, 60, outliers)
            segs = np.lib.stride_tricks.sliding_window_view(emb, cfg.window, axis=0).transpose(0, 2, 1)[::2]
            for p in range(n):
                (genuine if p == q else impostor).append(segment_scores(segs, protos[p], start, scoring)[:, 0])
    g, i = np.concatenate(genuine), np.concatenate(impostor)
    ts = np.quantile(np.r_[g, i], np.linspace(0, 1, 600))
    frr = (g[None, :] < ts[:, None]).mean(axis=1)
    far = (i[None, :] >= ts[:, None]).mean(axis=1)
    k = int(np.argmin(np.abs(frr - far)))
    return float((frr[k] + far[k]) / 2), float(np.mean(g < np.quantile(i, 0.99)))


def test_segment_pooling_beats_median_of_window_scores():
    seg = pooling_det("segment", 0.05)
    med = pooling_det("median", 0.05)
    assert seg[0] < med[0] and seg[1] < med[1], (seg, med)


def measure_engine(cfg: IdentityConfig, seeds: range, outliers: float = 0.05, n_windows: int = 90) -> dict[str, float]:
    """Whole engine, 5-person households, other-day streams: what a household would see."""
    correct = wrong = total = flips = strangers_named = strangers = 0
    first: list[int] = []
    for seed in seeds:
        hh, means, people, _ = enrol_household(seed, config=cfg)
        for p, m in enumerate(means):
            states = run_stream(IdentityEngine(people, cfg, model=MODEL), hh.stream(m, n_windows, outliers))
            total += len(states)
            correct += sum(s.wearer == f"P{p}" for s in states)
            wrong += sum(s.wearer not in (None, UNKNOWN, f"P{p}") for s in states)
            announced = [s.wearer for s in states if s.decided]
            flips += sum(a != b for a, b in zip(announced, announced[1:]))
            first.append(next((i + 1 for i, s in enumerate(states) if s.wearer == f"P{p}"), n_windows + 1))
        for m in hh.persons(20):
            states = run_stream(IdentityEngine(people, cfg, model=MODEL), hh.stream(m, n_windows, outliers))
            strangers += 1
            strangers_named += any(s.wearer not in (None, UNKNOWN) for s in states)
    return {"windows_correct": correct / total, "windows_wrong_person": wrong / total,
            "flips_per_session": flips / len(first), "median_windows_to_name": float(np.median(first)),
            "never_named": float(np.mean(np.array(first) > n_windows)), "strangers_named": strangers_named / strangers}


# ---- fusion (known answers) -----------------------------------------------------------------
IMU_LABELS = ("sitting", "standing", "walking", "going_up", "running", "bicycling")


def test_fine_imu_classes_map_to_top_level():
    est = ActivityEstimate(np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.1]), IMU_LABELS)
    np.testing.assert_allclose(to_top_level(est), [0.3, 0.4, 0.3], atol=1e-6)
    with pytest.raises(FusionError, match="'elevator_x' has no top-level class"):
        to_top_level(ActivityEstimate(np.array([1.0]), ("elevator_x",)))


def test_activity_sum_rule_with_weights_and_missing_modality():
    ecg = ActivityEstimate(np.array([0.8, 0.2, 0.0]), ("rest", "walking", "vigorous"))
    imu = ActivityEstimate(np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), IMU_LABELS)
    cfg = FusionConfig(ecg_activity_weight=0.4, imu_activity_weight=0.6)
    fused = fuse_activity(ecg, imu, cfg)
    np.testing.assert_allclose(fused.probs, [0.32, 0.68, 0.0], atol=1e-6)  # 0.4*[.8,.2,0] + 0.6*[0,1,0]
    assert fused.label == "walking" and fused.sources == ("ecg", "imu")
    only_ecg = fuse_activity(ecg, None, cfg)  # IMU lost over BLE: ECG alone, weight renormalised
    np.testing.assert_allclose(only_ecg.probs, [0.8, 0.2, 0.0], atol=1e-6)
    assert only_ecg.sources == ("ecg",)
    assert fuse_activity(None, None, cfg) is None


def test_identity_fusion_normalises_then_weights():
    ecg_norm = ScoreNorm("znorm", loc=0.2, scale=0.1)    # cosine: impostors ~0.2 +- 0.1
    gait_norm = ScoreNorm("minmax", loc=-5.0, scale=10.0)  # a logit-like gait score in [-5, 5]
    cfg = FusionConfig(ecg_identity_weight=0.7, gait_identity_weight=0.3)
    fused = fuse_identity({"Ann": 0.6, "Bob": 0.3}, {"Ann": 5.0, "Bob": -5.0}, ecg_norm, gait_norm, cfg)
    assert fused["Ann"] == pytest.approx(0.7 * 4.0 + 0.3 * 1.0)
    assert fused["Bob"] == pytest.approx(0.7 * 1.0 + 0.3 * 0.0)
    only_ecg = fuse_identity({"Cy": 0.5}, {"Ann": 0.0}, ecg_norm, gait_norm, cfg)
    assert only_ecg["Cy"] == pytest.approx(3.0) and only_ecg["Ann"] == pytest.approx(0.5)
    z = normalise_by_impostors([0.1, 0.3])
    assert (z.loc, z.scale) == pytest.approx((0.2, 0.1))


def test_age_gender_only_while_walking():
    walking = fuse_activity(None, ActivityEstimate(np.array([0, 0, 0.9, 0, 0.1, 0]), IMU_LABELS))
    sitting = fuse_activity(None, ActivityEstimate(np.array([0.9, 0, 0.1, 0, 0, 0]), IMU_LABELS))
    estimate = {"age": 41.0, "female": 0.7}
    assert gate_walking_only(estimate, walking) is estimate
    assert gate_walking_only(estimate, sitting) is None
    assert gate_walking_only(estimate, None) is None


def pooled_scores(x: np.ndarray, person: Person, cfg: IdentityConfig) -> np.ndarray:
    """Pooled scores of every run of ``cfg.window`` consecutive windows against one person."""
    segs = np.lib.stride_tricks.sliding_window_view(x, cfg.window, axis=0).transpose(0, 2, 1)
    return segment_scores(segs, person.prototypes, np.zeros(1, np.intp), cfg.scoring)[:, 0]


def enrolment_estimates(hh: Household, means: np.ndarray, people: dict[str, Person], cfg: IdentityConfig
                        ) -> dict[str, list[float]]:
    """Each person's reported FAR/FRR next to FAR on 60 held-out impostor persons and FRR on another day."""
    held_x, held_y = hh.impostor_set(60)
    out: dict[str, list[float]] = {"far_rep": [], "far_upper": [], "far_meas": [], "frr_rep": [], "frr_meas": []}
    for p, person in enumerate(people.values()):
        imp = np.concatenate([pooled_scores(held_x[held_y == u], person, cfg) for u in np.unique(held_y)])
        out["far_rep"].append(person.stats["expected_far"])
        out["far_upper"].append(person.stats["expected_far_upper"])
        out["far_meas"].append(float(np.mean(imp >= person.threshold)))
        out["frr_rep"].append(person.stats["expected_frr"])
        out["frr_meas"].append(float(np.mean(pooled_scores(hh.stream(means[p], 200), person, cfg) < person.threshold)))
    return out


def measure_enrolment_estimates(seeds: range) -> dict[str, float]:
    r: dict[str, list[float]] = {}
    for seed in seeds:
        hh, means, people, cfg = enrol_household(seed)
        for k, v in enrolment_estimates(hh, means, people, cfg).items():
            r.setdefault(k, []).extend(v)
    return {"far_reported_mean": float(np.mean(r["far_rep"])), "far_held_out_mean": float(np.mean(r["far_meas"])),
            "far_held_out_max": float(np.max(r["far_meas"])), "frr_reported_mean": float(np.mean(r["frr_rep"])),
            "frr_reported_max": float(np.max(r["frr_rep"])), "frr_other_day_q10": float(np.quantile(r["frr_meas"], 0.1)),
            "frr_other_day_median": float(np.median(r["frr_meas"])), "frr_other_day_q90": float(np.quantile(r["frr_meas"], 0.9))}

if __name__ == "__main__":
    print("pooling, 5-window segments, 20 persons x 6 seeds, cross-session:")
    for outliers in (0.0, 0.05, 0.15, 0.3):
        for scoring in ("segment", "median"):
            eer, frr = pooling_det(scoring, outliers, range(30, 36))
            print(f"  outliers={outliers:.2f} scoring={scoring:8s} EER={eer:.3f} FRR@FAR1%={frr:.3f}")
    print("whole engine, 5-person households x 4 seeds, 90-window other-day sessions, 5 % outliers:")
    plain = dict(far_confidence=0.0)  # the variants below against the plain impostor quantile
    for name, cfg in (("defaults", IdentityConfig()),
                      ("far_confidence=0", IdentityConfig(**plain)),
                      ("far_confidence=0 scoring=median", IdentityConfig(**plain, scoring="median")),
                      ("far_confidence=0 target_far=0.005", IdentityConfig(**plain, target_far=0.005)),
                      ("far_confidence=0 switch=5 stay_hysteresis=0.03",
                       IdentityConfig(**plain, switch=5, stay_hysteresis=0.03)),
                      ("far_confidence=0 window=min_pool=8", IdentityConfig(**plain, window=8, min_pool=8))):
        r = measure_engine(cfg, range(20, 24))
        print(f"  {name:32s} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    print("enrolment estimates vs held-out (60 impostor persons) and another day, 5 persons x 8 seeds:")
    print("  " + " ".join(f"{k}={v:.3f}" for k, v in measure_enrolment_estimates(range(8)).items()))


def test_daemon_saves_the_engines_adaptations_privately(tmp_path, monkeypatch) -> None:
    """The daemon's side: what the engine adapted reaches the template store (0600, atomic
    save) without a restart, and an adaptation of a person removed meanwhile is dropped."""
    from daemon.app import BiodApp
    from daemon.config import parse_config
    from daemon.identity.engine import Adaptation
    from daemon.identity.store import new_person_id, slugify

    cfg = parse_config(f"hub:\n  id: adapt\nstate_dir: {tmp_path / 'state'}\nidentity:\n  adapt: true\n"
                       "ecg:\n  source: emulator\n")
    app = BiodApp(cfg)
    ref = app.ecg_model.ref
    rng = np.random.default_rng(0)
    protos = _unit(rng.standard_normal((2, ref.dim)))
    ada = Person(new_person_id(), "Ada", slugify("Ada"), "2026-11-22T00:00:00Z", ref, protos[:1], ("rest",), 0.6)
    app.store.add(ada)
    app.reload_people()  # the store watch picks Ada up (as after `biod calibrate`)
    assert list(app.people) == ["Ada"]
    adapted = replace(ada, prototypes=protos, prototype_labels=("rest", f"{ADAPTED_PREFIX}1"), threshold=0.65,
                      stats={"enrol_threshold": 0.6, "n_adaptations": 1.0})
    pending = [Adaptation(adapted, score=0.9, runner_up=-1.0, anchor_score=0.9, n_windows=12, old_threshold=0.6)]
    monkeypatch.setattr(app.bio.engine, "take_adaptations", lambda: [pending.pop()] if pending else [])
    app._save_adaptations()
    path = tmp_path / "state" / "identity" / "templates.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    saved = TemplateStore(path, model=ref).load()["Ada"]
    assert saved.prototype_labels == ("rest", f"{ADAPTED_PREFIX}1") and saved.threshold == pytest.approx(0.65)
    engine = app.bio.engine
    app.reload_people()  # the store watch after our own save: nothing new, the engine is kept
    assert app.bio.engine is engine
    app.store.remove("Ada")
    app.reload_people()  # someone else's edit: the engine is rebuilt from the store
    assert app.bio.engine is not engine and app.people == {}
    monkeypatch.setattr(app.bio.engine, "take_adaptations", lambda: [pending.pop()] if pending else [])
    pending.append(Adaptation(adapted, 0.9, -1.0, 0.9, 12, 0.6))
    app._save_adaptations()  # a late adaptation must not bring a removed person back
    assert not pending and TemplateStore(path, model=ref).load() == {}


def test_daemon_adapts_only_with_an_impostor_set_of_the_installed_model(tmp_path, monkeypatch) -> None:
    """A stale impostor set (another model's embeddings) would make every re-derived threshold
    meaningless, or fail on the dimension: the daemon then does not adapt, and says why."""
    import daemon.app as app_mod
    from daemon.config import parse_config
    from daemon.enrol import Impostors

    cfg = parse_config(f"hub:\n  id: adapt\nstate_dir: {tmp_path / 'state'}\nidentity:\n  adapt: true\n"
                       "ecg:\n  source: emulator\n")
    app = app_mod.BiodApp(cfg)
    ref = app.ecg_model.ref
    assert app.bio.engine.impostors is not None and app.bio.engine.impostors.made_with(ref)
    e = np.zeros((4, ref.dim), np.float32)
    stale = Impostors(e, np.arange(4), e, np.arange(4), f"{ref.name} 0.0.1 0123")
    assert not stale.made_with(ref)
    # the same name and version, other weights (a retrained model): refused too
    cnn, beats = ref.weights.split("+")
    assert Impostors(e, np.arange(4), e, np.arange(4), f"{ref.name} {ref.version} {cnn}+{'0' * 12}").made_with(ref) is False
    assert Impostors(e, np.arange(4), e, np.arange(4), f"{ref.name} {ref.version} {cnn}").made_with(ref) is False
    monkeypatch.setattr(app_mod, "load_impostors", lambda models_dir: stale)
    assert app._engine().impostors is None


def test_adaptation_stays_with_the_lead_count_of_the_enrolment(household):
    """Review finding: one session seen through another lead count re-derived the threshold
    against that lead count's impostor set (on held-out persons: lead-I thresholds fell by 0.37
    after one 3-lead session). The household was enrolled through 3 leads."""
    hh, means, people, _ = household
    engine = adapting_engine(household)
    emb = hh.same_session(means[0], 30)
    states = [engine.observe(i, e, True, True, (True, False, False)) for i, e in enumerate(emb)]
    engine.observe(len(emb), None, False, False)
    assert states[-1].wearer == "P0"  # identified all the same ...
    assert engine.take_adaptations() == []  # ... but lead I alone does not adapt a 3-lead template
    legacy = {n: replace(p, stats={k: v for k, v in p.stats.items() if k != "enrol_leads"}) for n, p in people.items()}
    engine = IdentityEngine(legacy, replace(engine.config), model=MODEL, impostors=FixedImpostors(*hh.impostors))
    assert wear(engine, emb)[-1].wearer == "P0"
    assert engine.take_adaptations() == []  # a template that does not say its lead count never adapts


def test_adaptation_never_lowers_the_threshold(household):
    hh, means, people, _ = household
    far_away = FixedImpostors(-hh.impostors[0], hh.impostors[1])  # impostors scoring far below the enrolment's
    engine = IdentityEngine(people, replace(household[3], **ADAPT), model=MODEL, impostors=far_away)
    assert wear(engine, hh.same_session(means[0], 30))[-1].wearer == "P0"
    (a,) = engine.take_adaptations()
    assert a.person.threshold == pytest.approx(people["P0"].threshold)
