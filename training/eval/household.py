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
* strangers: the other held-out ECG-ID persons (all their recordings) and the never-enrolled
  MIT-BIH / LUDB persons that are NOT in the impostor set (persons the thresholds were set
  against would flatter the result); a stranger session *falsely accepted* if any member is
  ever announced.

Windows come from the daemon's own ``windows_from_record`` and embeddings from
``EcgModelRunner.infer``, exactly what ``biod run`` computes; unclean windows are fed as
unclean (they change nothing), as in the daemon.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.biometrics import MODELS_DIR, EcgModelRunner
from daemon.dsp.ecg_pipeline import windows_from_record
from daemon.enrol import load_impostors
from daemon.identity.engine import UNKNOWN, IdentityConfig, IdentityEngine
from daemon.identity.store import Person
from daemon.inference.beatmorph import BEATS_FILE
from daemon.inference.manifest import load_manifest
from training.data.ecg import EcgRecord, load_all
from training.eval.models import _lead_i_only, training_persons

ECG_MODEL = "ecg_dualtask.tflite"


@dataclass(frozen=True)
class Session:
    """One recording as the engine would see it."""

    person: str
    session: str               # recording date (ECG-ID) or record id
    emb: np.ndarray            # (n, D) identity embeddings, every window
    ok: np.ndarray             # (n,) the pipeline's quality verdict
    lead_mask: np.ndarray      # (n, 3)


def sessions_of(records: list[EcgRecord], runner: EcgModelRunner) -> list[Session]:
    out = []
    for r in records:
        rw = windows_from_record(r.x_mv, r.fs, lead_valid=r.lead_valid, **runner.pipeline_kwargs())
        if not len(rw.windows):
            continue
        emb = np.stack([runner.infer(w)[0] for w in rw.windows]).astype(np.float32)
        out.append(Session(r.person, r.session or r.record, emb, np.asarray(rw.ok, bool),
                           np.asarray(rw.lead_mask, bool)))
    return out


def stream(engine: IdentityEngine, s: Session) -> tuple[str | None, str | None, int | None]:
    """(first name announced or None, any member ever announced, clean windows until the first
    announcement) for one wearing session; the engine is reset by a not-live window first."""
    engine.observe(0.0, None, False, False)
    first, member, n_clean, at = None, None, 0, None
    for i in range(len(s.emb)):
        st = engine.observe(float(i + 1), s.emb[i], bool(s.ok[i]), True, s.lead_mask[i])
        n_clean += int(s.ok[i])
        if st.wearer is not None and first is None:
            first, at = st.wearer, n_clean
        if st.wearer not in (None, UNKNOWN) and member is None:
            member = st.wearer
    return first, member, at


def enrol(people_sessions: dict[str, Session], runner: EcgModelRunner, cfg: IdentityConfig,
          impostors) -> dict[str, Person]:
    people: dict[str, Person] = {}
    imp = impostors.for_leads(1) if impostors is not None else (None, None)
    for name, s in people_sessions.items():
        x = s.emb[s.ok]
        report = IdentityEngine(people, cfg, model=runner.ref).enrol(
            name, x, ["rest"] * len(x), impostor_embeddings=imp[0], impostor_labels=imp[1])
        if report.accepted:
            people[name] = report.person
    return people


def evaluate(data_dir: Path, models_dir: Path, n_households: int = 20, size: int = 5, seed: int = 0,
             target_far: float | None = None, progress=print) -> dict:
    runner = EcgModelRunner.load(models_dir / ECG_MODEL)
    seen = training_persons(load_manifest((models_dir / ECG_MODEL).with_suffix(".json")))
    if (models_dir / BEATS_FILE).exists():
        seen |= training_persons(load_manifest((models_dir / BEATS_FILE).with_suffix(".json")))
    impostors = load_impostors(models_dir)
    in_impostor_set = set() if impostors is None else {
        str(v).replace("-", ":", 1) for v in np.concatenate([impostors.labels, impostors.labels_3lead])}
    records = [_lead_i_only(r) for r in load_all(Path(data_dir))
               if r.person not in seen and r.person not in in_impostor_set]
    if not records:
        raise ValueError(f"{data_dir}: no ECG persons left after excluding training and impostor-set persons")
    # one 20 s ECG-ID recording gives 15-18 clean windows
    cfg = IdentityConfig(min_enrol_windows=12, **({} if target_far is None else {"target_far": target_far}))
    sessions = sessions_of(records, runner)
    by_person: dict[str, list[Session]] = defaultdict(list)
    for s in sessions:
        by_person[s.person].append(s)
    eligible = sorted(p for p, ss in by_person.items() if p.startswith("ecgid:") and len(ss) >= 2
                      and ss[0].ok.sum() >= cfg.min_pool)
    others = sorted(p for p in by_person if not p.startswith("ecgid:"))
    if len(eligible) < size + 1:
        raise ValueError(f"{data_dir}: {len(eligible)} unseen ECG-ID persons with two recordings; need {size + 1}")
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = defaultdict(int)
    to_name: list[int] = []
    for h in range(n_households):
        members = [str(p) for p in rng.choice(eligible, size, replace=False)]
        people = enrol({p: by_person[p][0] for p in members}, runner, cfg, impostors)
        counts["refused_enrolments"] += size - len(people)
        engine = IdentityEngine(people, cfg, model=runner.ref)
        for p in members:
            if p not in people:
                continue
            for s in by_person[p][1:]:
                first, _, at = stream(engine, s)
                cross = "cross_" if s.session != by_person[p][0].session else ""
                kind = ("correct" if first == p else "undecided" if first is None
                        else "unknown" if first == UNKNOWN else "wrong_person")
                counts[f"member_{kind}"] += 1
                counts[f"member_{cross}{kind}"] += bool(cross)
                counts["member_sessions"] += 1
                counts[f"member_{cross}sessions"] += bool(cross)
                if first == p and at is not None:
                    to_name.append(at)
        for p in [q for q in eligible if q not in members] + others:
            for s in by_person[p]:
                first, member, _ = stream(engine, s)
                src = "ecgid" if p.startswith("ecgid:") else "other"
                counts[f"stranger_{src}_sessions"] += 1
                counts[f"stranger_{src}_accepted"] += member is not None
                counts[f"stranger_{src}_unknown"] += first == UNKNOWN
        progress(f"household {h + 1}/{n_households}: {', '.join(members)}")
    pct = lambda a, b: 100.0 * counts[a] / max(counts[b], 1)  # noqa: E731
    result = {
        "households": n_households, "size": size, "target_far": cfg.target_far, "eligible_persons": len(eligible),
        "stranger_persons_ecgid": len(eligible) - size, "stranger_persons_other": len(others),
        "impostor_set_persons": len(in_impostor_set),
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
        "refused_enrolments": counts["refused_enrolments"],
        "median_clean_windows_to_name": float(np.median(to_name)) if to_name else None,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval household", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder in the format of ../shared/data")
    ap.add_argument("--models", type=Path, default=MODELS_DIR, help="models folder (default: the shipped ones)")
    ap.add_argument("--households", type=int, default=20, help="random households (default 20)")
    ap.add_argument("--size", type=int, default=5, help="members per household (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-far", type=float, default=None,
                    help="identity.target_far for the enrolments (default: the daemon's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        res = evaluate(args.data, args.models, args.households, args.size, args.seed, args.target_far)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, v in res.items():
        print(f"{k:<32} {v:.4g}" if isinstance(v, float) else f"{k:<32} {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
