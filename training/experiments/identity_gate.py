"""Which quality gate the identity engine should use, measured on development folds of the
TRAINING persons only (never on held-out persons).

    python -m training.experiments.identity_gate --data ../shared/data [--gates full all high_freq_noise=0]

WHY: until 2026-11-23 the daemon enrolled and identified only from windows whose quality is
``ok`` (every sub-score of ``daemon.dsp.quality`` at least 0.5). That gate was built to reject
what is not ECG, not to help identification, and on the held-out persons it cost 10 s rank-1
(89.8 -> 87.7, docs/MODELS.md): its ``high_freq_noise`` rule rejects EMG-laden stretches of
ECG-ID's raw recordings, which the identity models read well enough, and a test or template
with fewer windows is noisier. Whether a looser gate for identity is better had to be decided
here, on persons the held-out evaluation never sees; this command chose the one the daemon now
uses (``Quality.ok_for_identity``: ``high_freq_noise=0,motion_artifact=0``).

A gate is ``full`` (the full quality gate, ``Quality.ok``: every sub-score >= 0.5), ``all``
(every window), or a list of ``REASON=CUTOFF`` overrides of the full gate, comma-separated
(``high_freq_noise=0`` ignores that check, ``high_freq_noise=0.25`` passes about 1.8 times the
noise power it allows). Scored with the
shipped beat model's features (``train_beats.PIPELINE_KW``, fitted per fold on the training
persons outside the fold, as in ``beat_features``) on ``ecg_recipe_sweep``'s 4 development
folds; templates and tests alike are cut from the passing windows only, as the daemon does.
The beat model alone: the shipped CNN has seen these persons, the beat model fitted per fold
has not.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from daemon.dsp.quality import OK_AT, REASONS
from training.experiments.beat_features import BeatDevFolds, print_table
from training.experiments.export_beat_embeddings import window_vectors
from training.train_beats import PIPELINE_KW, fit_projections

KEYS = ("t10_rank1", "t10_eer", "t10_frr_at_far1", "t10_cross_rank1", "t10_cross_eer",
        "t3_rank1", "t3_eer", "t3_frr_at_far1", "t10_n_tests", "t3_n_tests")



def parse_gate(text: str) -> dict[str, float]:
    """Per-reason cutoffs of a gate: ``"full"`` -> every reason at 0.5; ``"all"`` -> 0;
    ``"high_freq_noise=0.25"`` -> that reason at 0.25, the others at 0.5."""
    if text == "all":
        return {r: 0.0 for r in REASONS}
    cut = {r: OK_AT for r in REASONS}
    if text == "full":
        return cut
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in REASONS:
            raise argparse.ArgumentTypeError(
                f"gate {text!r}: {name!r} is not a quality check; one of {', '.join(REASONS)}")
        try:
            cut[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"gate {text!r}: want REASON=CUTOFF, e.g. "
                                             "high_freq_noise=0.25") from None
    return cut


def passes(qscores: np.ndarray, cut: dict[str, float]) -> np.ndarray:
    """Per window, whether every sub-score reaches its cutoff (a cutoff of 0 always passes)."""
    lim = np.array([cut[r] for r in REASONS], dtype=np.float32)
    return ((qscores >= lim) | (lim <= 0)).all(axis=1)


def dev_scores(folds: BeatDevFolds, gates: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per gate, the mean over the development folds of the beat model's identity metrics."""
    qs = np.concatenate([folds.ws.qscores, folds.cws.qscores])
    keeps = [passes(qs, g) for g in gates]
    scores: list[dict[str, list[float]]] = [defaultdict(list) for _ in gates]
    for k, fold in enumerate(folds.dev.folds):
        train = ~np.isin(folds.person, fold)
        W, b = fit_projections(folds.beats[train], folds.brec[train], folds.ws.records,
                               progress=lambda m: None)
        vec = np.concatenate([window_vectors(folds.ws, W, b), window_vectors(folds.cws, W, b)])
        gallery = folds.dev.gallery(k)
        for keep, acc in zip(keeps, scores):
            for key, v in folds.dev.score(lambda idx: vec[idx], gallery, keep=keep).items():
                acc[key].append(v)
    rows = []
    for keep, acc in zip(keeps, scores):
        row = {k: float(np.mean(acc[k])) for k in KEYS if k in acc}
        row["rejected_pct"] = 100.0 * float((~keep).mean())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.identity_gate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--gates", nargs="+", default=["full", "all", "high_freq_noise=0.25",
                                                   "high_freq_noise=0"])
    args = ap.parse_args(argv)
    gates = [parse_gate(g) for g in args.gates]
    t0 = time.time()
    folds = BeatDevFolds.load(args.data, PIPELINE_KW)
    rows = dev_scores(folds, gates)
    print_table("gate", args.gates, rows, ("rejected_pct",) + KEYS)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
