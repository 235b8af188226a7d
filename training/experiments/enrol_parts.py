"""How well the enrolment's part check (``daemon.identity.engine.part_similarity``) tells one
person's recording from two persons' recordings joined, on real persons no model was fitted on.

    python -m training.experiments.enrol_parts --data ../shared/data [--persons heldout|calibration]

Each ECG-ID recording goes through the daemon's own pipeline and the shipped int8 models (the
windows the daemon would enrol from: identity quality gate on). *One person*: every two
recordings of a person made on the same date, joined (about 40 s, a short enrolment). *Two
persons*: one person's first recording followed by another's (every ordered pair). Printed: the
part similarity's distribution for each, and, per threshold, the share of one-person enrolments
refused and of two-person ones accepted (docs/identity.md). ``calibration`` = the ECG-ID
threshold-calibration persons (training partition, never fitted on); ``heldout`` = the persons
set aside for evaluation.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def recordings(data: Path, persons: set[int]) -> dict[int, list[tuple[str, np.ndarray]]]:
    """person -> [(date, unit embeddings of the windows the daemon enrols from)] in record order."""
    from daemon.biometrics import MODELS_DIR, EcgModelRunner
    from daemon.dsp.ecg_pipeline import windows_from_record
    from training.data.ecg import load_ecgid

    runner = EcgModelRunner.load(MODELS_DIR / "ecg_dualtask.tflite")
    out: dict[int, list[tuple[str, np.ndarray]]] = {}
    for r in load_ecgid(data):
        pid = int(str(r.person).split(":")[-1])
        if pid not in persons:
            continue
        rw = windows_from_record(r.x_mv, r.fs, lead_valid=r.lead_valid, **runner.pipeline_kwargs())
        ok = np.asarray(rw.identity_ok, bool)
        e = np.stack([runner.infer(w)[0] for w, keep in zip(rw.windows, ok) if keep]) if ok.any() else np.zeros((0, 1))
        if len(e):
            out.setdefault(pid, []).append((str(r.session), e / np.linalg.norm(e, axis=1, keepdims=True)))
    return out


def measure(recs: dict[int, list[tuple[str, np.ndarray]]], parts: int = 3) -> tuple[np.ndarray, np.ndarray]:
    from daemon.identity.engine import part_similarity

    one = [part_similarity(np.concatenate([a, b]), parts)
           for rs in recs.values() for (da, a), (db, b) in itertools.combinations(rs, 2) if da == db]
    two = [part_similarity(np.concatenate([recs[p][0][1], recs[q][0][1]]), parts)
           for p, q in itertools.permutations(recs, 2)]
    return np.array(one), np.array(two)


def main(argv: list[str] | None = None) -> int:
    from training.data.ecg import ECGID_CALIBRATION, ECGID_HELDOUT

    ap = argparse.ArgumentParser(prog="python -m training.experiments.enrol_parts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--persons", choices=("heldout", "calibration"), default="heldout")
    ap.add_argument("--parts", type=int, default=3)
    args = ap.parse_args(argv)
    chosen = ECGID_HELDOUT if args.persons == "heldout" else ECGID_CALIBRATION
    one, two = measure(recordings(args.data, {int(p) for p in chosen}), args.parts)
    print(f"{args.persons} persons, {args.parts} parts: one person (same-date recording pairs) n={len(one)} "
          f"median {np.median(one):.2f} min {one.min():.2f}; two persons n={len(two)} median {np.median(two):.2f} "
          f"max {two.max():.2f}")
    print("| min_part_similarity | one person refused | two persons accepted |\n|---|---|---|")
    for t in THRESHOLDS:
        print(f"| {t:.1f} | {100 * np.mean(one < t):.1f} % | {100 * np.mean(two >= t):.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
