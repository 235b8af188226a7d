"""``python -m training.eval household --data DIR [--models PATH] [--households N] [--json FILE]``

The daemon's whole identity path on real persons it has never seen, as a household lives it:
``IdentityEngine.enrol`` (per-person open-set threshold from the shipped impostor set, as
``biod calibrate`` does) from each member's FIRST ECG-ID recording, then every other recording
of each member and every recording of strangers streamed window by window through
``IdentityEngine.observe`` (pooling, consensus, hysteresis), one recording = one wearing session.

Why this beside ``training.eval models``: that command scores embeddings with one global
threshold; what a household sees is the engine's per-person thresholds and consensus. Here:

* members: 5 persons drawn from the held-out ECG-ID persons with >= 2 recordings (``--size``),
  ``--households`` random draws; a session counts as *correct* if the first name announced is
  the wearer, *wrong person* if it is another member, *unknown* if ``unknown`` is announced,
  *undecided* if nothing is announced before the recording ends (ECG-ID records are 20 s);
* strangers: the other held-out ECG-ID persons (all their recordings; also those who could not
  be members: one recording, or too few clean windows to enrol) and the never-enrolled
  MIT-BIH / LUDB persons that are NOT in the impostor set (persons the thresholds were set
  against would flatter the result); a stranger session *falsely accepted* if any member is
  ever announced. A member's session counts as cross-date only when both its date and the
  enrolment's are known and differ.

Windows come from the daemon's own ``windows_from_record`` and embeddings from
``EcgModelRunner.infer``, exactly what ``biod run`` computes; unclean windows are fed as
unclean (they change nothing), as in the daemon.

``--adapt``: template adaptation (``identity.adapt``) needs sessions in the order a household
lives them, so each household streams one seeded random interleaving of every session that
keeps each person's recordings in date order (members from their enrolment on, strangers too:
a guest who comes back), through two engines on the same order: the static one and one that
adapts and saves every adaptation to a template store and reloads from it, as the daemon does.
Reported: the usual table for both, adaptations by the true source of the session (the wearer,
another member, a stranger = poisoning) and the sessions whose outcome adaptation changed.
``--population training`` draws households from the ECG-ID persons the models WERE trained on
(optimistic embeddings): for choosing adaptation knobs (``--identity KEY=VALUE``) without
touching the held-out persons.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from daemon.biometrics import MODELS_DIR, EcgModelRunner
from daemon.dsp.ecg_pipeline import windows_from_record
from daemon.enrol import load_impostors
from daemon.identity.engine import UNKNOWN, IdentityConfig, IdentityEngine, segment_scores, sliding_segments
from daemon.identity.store import Person, TemplateStore
from daemon.inference.beatmorph import BEATS_FILE
from daemon.inference.manifest import load_manifest
from training.data.ecg import EcgRecord, load_all, parse_date, person_key
from training.eval.models import _lead_i_only, unseen_records

ECG_MODEL = "ecg_dualtask.tflite"


@dataclass(frozen=True)
class Session:
    """One recording as the engine would see it."""

    person: str
    session: str               # recording date (ECG-ID) or record id
    emb: np.ndarray            # (n, D) identity embeddings, every window
    ok: np.ndarray             # (n,) the pipeline's quality verdict for identity
    lead_mask: np.ndarray      # (n, 3)


def sessions_of(records: list[EcgRecord], runner: EcgModelRunner) -> list[Session]:
    out = []
    for r in records:
        rw = windows_from_record(r.x_mv, r.fs, lead_valid=r.lead_valid, **runner.pipeline_kwargs())
        if not len(rw.windows):
            continue
        emb = np.stack([runner.infer(w)[0] for w in rw.windows]).astype(np.float32)
        out.append(Session(r.person, r.session or r.record, emb, np.asarray(rw.identity_ok, bool),
                           np.asarray(rw.lead_mask, bool)))
    return out


def stream(engine: IdentityEngine, s: Session) -> tuple[str | None, str | None, int | None]:
    """(first name announced or None, any member ever announced, clean windows until the first
    announcement) for one wearing session; the engine is reset by a not-live window first, and
    the session ends with one (the electrodes come off: where template adaptation happens)."""
    engine.observe(0.0, None, False, False)
    first, member, n_clean, at = None, None, 0, None
    for i in range(len(s.emb)):
        st = engine.observe(float(i + 1), s.emb[i], bool(s.ok[i]), True, s.lead_mask[i])
        n_clean += int(s.ok[i])
        if st.wearer is not None and first is None:
            first, at = st.wearer, n_clean
        if st.wearer not in (None, UNKNOWN) and member is None:
            member = st.wearer
    engine.observe(float(len(s.emb) + 1), None, False, False)
    return first, member, at


def _date_key(s: Session) -> datetime:
    """ECG-ID sessions are dates (dd.mm.yyyy); anything else sorts as one (stable) day."""
    day = parse_date(s.session)
    return datetime.min if day is None else datetime(day.year, day.month, day.day)


def _cross_date(session: str, enrol_session: str) -> bool:
    """Both sessions are readable dates, and they differ. WHY not ``!=``: a recording without a
    date is named by its record id, which differs from every date without being another day."""
    a, b = parse_date(session), parse_date(enrol_session)
    return a is not None and b is not None and a != b


def _impostor_person(label: str) -> str:
    """An impostor-set label (``"ecgid-02"``, ``"ludb-5"``) as the loaders' person key, so the
    exclusion cannot miss a person spelt otherwise."""
    dataset, sep, pid = label.partition("-")
    return person_key(dataset, pid) if sep else label


def household_order(sessions: dict[str, list[Session]], rng: np.random.Generator) -> list[tuple[str, Session]]:
    """A random interleaving of everybody's sessions that keeps each person's in date order
    (stable for recordings of one day: their record order)."""
    queues = {p: sorted(ss, key=_date_key) for p, ss in sessions.items()}
    owners = [p for p, ss in queues.items() for _ in ss]
    rng.shuffle(owners)
    taken: dict[str, int] = defaultdict(int)
    order = []
    for p in owners:
        order.append((p, queues[p][taken[p]]))
        taken[p] += 1
    return order


def enrol(people_sessions: dict[str, Session], runner: EcgModelRunner, cfg: IdentityConfig,
          impostors, refusals: list[str] | None = None) -> dict[str, Person]:
    """Enrol each person in turn as the daemon does; ``refusals`` collects '<person>: <reason>'
    for every enrolment refused (the evaluation prints them: a refusal is a household's cost)."""
    people: dict[str, Person] = {}
    imp = impostors.for_leads(1) if impostors is not None else (None, None)
    for name, s in people_sessions.items():
        x = s.emb[s.ok]
        report = IdentityEngine(people, cfg, model=runner.ref).enrol(
            name, x, ["rest"] * len(x), impostor_embeddings=imp[0], impostor_labels=imp[1], leads_on=1)
        if report.accepted:
            people[name] = report.person
        elif refusals is not None:
            refusals.append(f"{name}: {report.reason}")
    return people


Outcome = tuple[str | None, str | None, int | None]


def _tally(counts: dict[str, int], to_name: list[int], p: str, s: Session, members: list[str],
           enrol_session: dict[str, str], outcome: Outcome) -> None:
    """Add one streamed session's outcome to the counts of the household table."""
    first, member, at = outcome
    if p in members:
        cross = "cross_" if _cross_date(s.session, enrol_session[p]) else ""
        kind = ("correct" if first == p else "undecided" if first is None
                else "unknown" if first == UNKNOWN else "wrong_person")
        counts[f"member_{kind}"] += 1
        counts[f"member_{cross}{kind}"] += bool(cross)
        counts["member_sessions"] += 1
        counts[f"member_{cross}sessions"] += bool(cross)
        if first == p and at is not None:
            to_name.append(at)
    else:
        src = "ecgid" if p.startswith("ecgid:") else "other"
        counts[f"stranger_{src}_sessions"] += 1
        counts[f"stranger_{src}_accepted"] += member is not None
        counts[f"stranger_{src}_unknown"] += first == UNKNOWN


def pool_acceptance(person: Person, s: Session, window: int) -> tuple[int, int]:
    """(pools accepted, pools) of one session against one member: every run of ``window``
    consecutive clean windows pooled and scored as the engine scores (``segment_scores`` against
    the member's prototypes) and compared with the member's own threshold."""
    x = s.emb[s.ok]
    if len(x) < window:
        return 0, 0
    pools = sliding_segments(x, window)
    scores = segment_scores(pools, np.asarray(person.prototypes, np.float32), np.array([0]), "segment")[:, 0]
    return int(np.sum(scores >= person.threshold)), len(scores)


def _calibrate(calib: dict[str, int], people: dict[str, Person], by_person: dict[str, list[Session]],
               strangers: list[str], window: int) -> None:
    """WHY: each member's threshold is the impostor-set quantile for ``target_far`` per decision;
    whether the shipped impostor set stands for real strangers shows in the rate at which the
    strangers' own pooled decisions pass it (and the members' later sessions, the other side)."""
    for p, person in people.items():
        for kind, ss in [("genuine", by_person[p][1:])] + [
                ("stranger_ecgid" if q.startswith("ecgid:") else "stranger_other", by_person[q]) for q in strangers]:
            for s in ss:
                a, n = pool_acceptance(person, s, window)
                calib[f"{kind}_accepted"] += a
                calib[f"{kind}_pools"] += n


def _calibration_summary(calib: dict[str, int], target_far: float) -> dict:
    pct = lambda k: 100.0 * calib[f"{k}_accepted"] / max(calib[f"{k}_pools"], 1)  # noqa: E731
    return {"target_far_pct": 100.0 * target_far,
            "stranger_ecgid_pools_accepted_pct": pct("stranger_ecgid"),
            "stranger_other_pools_accepted_pct": pct("stranger_other"),
            "genuine_pools_accepted_pct": pct("genuine"),
            "pools": {k: calib[f"{k}_pools"] for k in ("genuine", "stranger_ecgid", "stranger_other")}}


def _summary(counts: dict[str, int], to_name: list[int]) -> dict:
    pct = lambda a, b: 100.0 * counts[a] / max(counts[b], 1)  # noqa: E731
    return {
        "member_sessions": counts["member_sessions"], "member_cross_sessions": counts["member_cross_sessions"],
        "member_correct_pct": pct("member_correct", "member_sessions"),
        "member_wrong_person_pct": pct("member_wrong_person", "member_sessions"),
        "member_unknown_pct": pct("member_unknown", "member_sessions"),
        "member_undecided_pct": pct("member_undecided", "member_sessions"),
        "member_cross_correct_pct": pct("member_cross_correct", "member_cross_sessions"),
        "member_cross_wrong_person_pct": pct("member_cross_wrong_person", "member_cross_sessions"),
        "stranger_ecgid_sessions": counts["stranger_ecgid_sessions"],
        "stranger_ecgid_accepted_pct": pct("stranger_ecgid_accepted", "stranger_ecgid_sessions"),
        "stranger_other_sessions": counts["stranger_other_sessions"],
        "stranger_other_accepted_pct": pct("stranger_other_accepted", "stranger_other_sessions"),
        "median_clean_windows_to_name": float(np.median(to_name)) if to_name else None,
    }


def _adaptive_run(order: list[tuple[str, Session]], people: dict[str, Person], cfg: IdentityConfig,
                  runner: EcgModelRunner, impostors, poison: dict[str, int]) -> tuple[list[Outcome], list[bool]]:
    """Stream ``order`` through an adapting engine that saves each adaptation to a template
    store and is rebuilt from it (the daemon's save + reload). Returns the outcomes and, per
    session, whether the member it named held a prototype made from someone else's session
    (a poisoned template); counts into ``poison`` the adaptations by the session's true source
    and, at the end, the adapted prototypes members hold by source."""
    outcomes: list[Outcome] = []
    poisoned: list[bool] = []
    source: dict[tuple[str, str], str] = {}  # (member, prototype label) -> true person of the session
    with tempfile.TemporaryDirectory() as tmp:
        store = TemplateStore(Path(tmp) / "identity" / "templates.json", model=runner.ref)
        store.save(people)
        engine = IdentityEngine(store.load(), cfg, model=runner.ref, impostors=impostors)
        for p, s in order:
            outcome = stream(engine, s)
            outcomes.append(outcome)
            held = {m.name: {source.get((m.name, lab), m.name) for lab in m.prototype_labels} for m in engine.people}
            poisoned.append(outcome[1] is not None and bool(held[outcome[1]] - {outcome[1]}))
            adaptations = engine.take_adaptations()
            for a in adaptations:
                q = a.person.name
                source[(q, a.person.prototype_labels[-1])] = p
                kind = "self" if p == q else "other_member" if p in people else (
                    "stranger_ecgid" if p.startswith("ecgid:") else "stranger_other")
                poison[f"adapt_from_{kind}"] += 1
                poison["adaptations"] += 1
                if store.update_templates(a.person) is None:
                    raise RuntimeError(f"{q}'s adaptation could not be saved: the person is gone from the store")
            if adaptations:
                engine = IdentityEngine(store.load(), cfg, model=runner.ref, impostors=impostors)
        for m in store.load().values():  # what the templates hold when the household's sessions are over
            foreign = [source[(m.name, lab)] != m.name for lab in m.prototype_labels if (m.name, lab) in source]
            poison["final_adapted_prototypes"] += len(foreign)
            poison["final_adapted_foreign"] += sum(foreign)
            poison["final_members_all_adapted_foreign"] += bool(foreign) and all(foreign)
    return outcomes, poisoned


def evaluate(data_dir: Path, models_dir: Path, n_households: int = 20, size: int = 5, seed: int = 0,
             target_far: float | None = None, progress: Callable[[str], object] = print, adapt: bool = False,
             population: Literal["heldout", "training"] = "heldout", overrides: dict | None = None) -> dict:
    runner = EcgModelRunner.load(models_dir / ECG_MODEL)
    manifests = [load_manifest((models_dir / ECG_MODEL).with_suffix(".json"))]
    if (models_dir / BEATS_FILE).exists():
        manifests.append(load_manifest((models_dir / BEATS_FILE).with_suffix(".json")))
    impostors = load_impostors(models_dir)
    in_impostor_set = set() if impostors is None else {
        _impostor_person(str(v)) for v in np.concatenate([impostors.labels, impostors.labels_3lead])}
    notes: list[str] = []
    everyone = load_all(Path(data_dir), notes=notes)
    unseen, seen, seen_notes = unseen_records(everyone, manifests)
    notes += seen_notes
    pool = [r for r in everyone if r.person in seen] if population == "training" else unseen
    records = [_lead_i_only(r) for r in pool if r.person not in in_impostor_set]
    for text in notes:
        progress(f"note: {text}")
    if not records:
        raise ValueError(f"{data_dir}: no ECG persons left after excluding training and impostor-set persons")
    # one 20 s ECG-ID recording gives 15-18 clean windows
    knobs = {"min_enrol_windows": 12, **({} if target_far is None else {"target_far": target_far}), **(overrides or {})}
    cfg = IdentityConfig(**knobs)
    cfg_adapt = IdentityConfig(**{**knobs, "adapt": True})
    sessions = sessions_of(records, runner)
    by_person: dict[str, list[Session]] = defaultdict(list)
    for s in sessions:
        by_person[s.person].append(s)
    eligible = sorted(p for p, ss in by_person.items() if p.startswith("ecgid:") and len(ss) >= 2
                      and ss[0].ok.sum() >= cfg.min_pool)
    others = sorted(p for p in by_person if not p.startswith("ecgid:"))
    ecgid_persons = sorted(p for p in by_person if p.startswith("ecgid:"))
    if len(eligible) < size + 1:
        raise ValueError(f"{data_dir}: {len(eligible)} unseen ECG-ID persons with two recordings; need {size + 1}")
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = defaultdict(int)
    to_name: list[int] = []
    counts_a: dict[str, int] = defaultdict(int)
    to_name_a: list[int] = []
    poison: dict[str, int] = defaultdict(int)
    calib: dict[str, int] = defaultdict(int)
    refused = 0
    refusals: list[str] = []
    for h in range(n_households):
        members = [str(p) for p in rng.choice(eligible, size, replace=False)]
        people = enrol({p: by_person[p][0] for p in members}, runner, cfg, impostors, refusals)
        refused += size - len(people)
        enrol_session = {p: by_person[p][0].session for p in people}
        # eligibility limits who can be a member, not who is a stranger
        strangers = [q for q in ecgid_persons if q not in members] + others
        _calibrate(calib, people, by_person, strangers, cfg.window)
        if not adapt:  # no state across sessions: the order does not matter
            engine = IdentityEngine(people, cfg, model=runner.ref)
            for p in [q for q in members if q in people] + strangers:
                for s in (by_person[p][1:] if p in people else by_person[p]):
                    _tally(counts, to_name, p, s, members, enrol_session, stream(engine, s))
        else:
            lived = {p: by_person[p][1:] for p in people} | {p: by_person[p] for p in strangers}
            order = household_order(lived, np.random.default_rng([seed, h]))
            engine = IdentityEngine(people, cfg, model=runner.ref)
            static = [stream(engine, s) for _, s in order]
            adaptive, poisoned = _adaptive_run(order, people, cfg_adapt, runner, impostors, poison)
            for (p, s), o_s, o_a, bad in zip(order, static, adaptive, poisoned):
                _tally(counts, to_name, p, s, members, enrol_session, o_s)
                _tally(counts_a, to_name_a, p, s, members, enrol_session, o_a)
                if p in people:
                    poison["member_sessions_gained"] += o_a[0] == p and o_s[0] != p
                    poison["member_sessions_lost"] += o_s[0] == p and o_a[0] != p
                else:
                    poison["stranger_sessions_newly_accepted"] += o_a[1] is not None and o_s[1] is None
                    poison["stranger_sessions_newly_accepted_poisoned"] += o_a[1] is not None and o_s[1] is None and bad
                    poison["stranger_sessions_accepted_poisoned"] += o_a[1] is not None and bad
                    poison["stranger_sessions_newly_rejected"] += o_s[1] is not None and o_a[1] is None
        progress(f"household {h + 1}/{n_households}: {', '.join(members)}")
    result = {
        "households": n_households, "size": size, "target_far": cfg.target_far, "population": population,
        "eligible_persons": len(eligible), "stranger_persons_ecgid": len(ecgid_persons) - size,
        "stranger_persons_other": len(others), "impostor_set_persons": len(in_impostor_set),
        "refused_enrolments": refused,
        "refusals": refusals,
        # per decision, at the enrolment thresholds: what target_far promised vs what happened
        "threshold_calibration": _calibration_summary(calib, cfg.target_far),
    }
    if not adapt:
        return {**result, **_summary(counts, to_name)}
    adapt_knobs = {f.name: getattr(cfg_adapt, f.name) for f in fields(IdentityConfig) if f.name.startswith("adapt")}
    return {**result, "adapt_config": adapt_knobs, "static": _summary(counts, to_name),
            "adaptive": _summary(counts_a, to_name_a), "adaptation": dict(poison)}


def _identity_overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` -> IdentityConfig field values, typed like the field's default."""
    defaults = IdentityConfig()
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(defaults, key) or not value:
            raise ValueError(f"--identity {pair!r}: want KEY=VALUE with KEY an IdentityConfig field")
        kind = type(getattr(defaults, key))
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval household", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder in the format of ../shared/data")
    ap.add_argument("--models", type=Path, default=MODELS_DIR, help="models folder (default: the shipped ones)")
    ap.add_argument("--households", type=int, default=20, help="random households (default 20)")
    ap.add_argument("--size", type=int, default=5, help="members per household (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-far", type=float, default=None,
                    help="identity.target_far for the enrolments (default: the daemon's default)")
    ap.add_argument("--adapt", action="store_true",
                    help="stream each household's sessions in date order through a static and an adapting engine")
    ap.add_argument("--population", choices=("heldout", "training"), default="heldout",
                    help="'training': households of persons the models were trained on (optimistic; for choosing knobs)")
    ap.add_argument("--identity", action="append", default=[], metavar="KEY=VALUE",
                    help="override an IdentityConfig knob, e.g. adapt_margin=0.08 (repeatable)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        res = evaluate(args.data, args.models, args.households, args.size, args.seed, args.target_far,
                       adapt=args.adapt, population=args.population, overrides=_identity_overrides(args.identity))
    except (OSError, ValueError, KeyError) as exc:  # the data loaders' errors, named
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, v in res.items():
        if isinstance(v, dict) and k in ("static", "adaptive"):
            continue
        print(f"{k:<32} {v:.4g}" if isinstance(v, float) else f"{k:<32} {v}")
    if args.adapt:
        print(f"{'':<32} {'static':>10} {'adaptive':>10}")
        for k, v in res["static"].items():
            w = res["adaptive"][k]
            fmt = lambda x: f"{x:>10.4g}" if isinstance(x, float) else f"{x!s:>10}"  # noqa: E731
            print(f"{k:<32} {fmt(v)} {fmt(w)}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
