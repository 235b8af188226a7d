"""What the beat-morphology model should read of each beat, measured on development folds of
the TRAINING persons only (never on held-out persons).

    python -m training.experiments.beat_features --data ../shared/data [--variants 60:0 60:1 100:1]

A variant is ``N_PCA:SLOPE[:SESSION_WEIGHT]``: the number of PCA components kept before the
LDA, whether each beat's z-scored first difference goes in beside the z-scored beat
(``daemon.inference.beatmorph.beat_features``), and how much of the between-recording scatter
the LDA adds to the covariance it whitens (``train_beats.session_lda_scalings``; 0, the
default, is the shipped fit). The beats are the shipped ones
(``training.train_beats.PIPELINE_KW``: heart-rate normalised); for each of
``ecg_recipe_sweep``'s 4 development folds the per-lead PCA + LDA is fitted with
``train_beats.fit_projections`` on the training records WITHOUT the fold's persons and scored
with the identity protocol on a gallery of the fold's persons plus the ECG-ID calibration
persons (``ecg_recipe_sweep.DevScorer``), beat model alone, as in ``beat_rr_warp``.

WHY a slope channel: per-beat z-scoring keeps shape and drops amplitude; the first difference,
z-scored on its own, gives the steep QRS edges and the slow T-wave slopes a scale of their own,
a non-linear view of the beat that the linear PCA + LDA cannot form from the beat alone. With
twice the input dimensions PCA has to keep more components to keep what separates persons.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.ecg import WindowSet, load_training_records, record_windows
from training.experiments.ecg_recipe_sweep import DevScorer
from training.experiments.export_beat_embeddings import window_vectors
from training.train_beats import PIPELINE_KW, distinct_beats, fit_projections

KEYS = ("t10_rank1", "t10_eer", "t10_frr_at_far1", "t10_cross_rank1", "t3_rank1", "t3_eer",
        "t3_frr_at_far1", "t3_cross_rank1")


def parse_variant(text: str) -> tuple[int, bool, float]:
    """``"100:1"`` -> (100, True, 0.0); ``"60:0:3"`` -> (60, False, 3.0)."""
    try:
        n_pca, slope, *rest = text.split(":")
        if len(rest) > 1:
            raise ValueError
        return int(n_pca), bool(int(slope)), float(rest[0]) if rest else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: want N_PCA:SLOPE[:SESSION_WEIGHT], e.g. 100:1 or 60:0:3") from None


@dataclass(frozen=True)
class BeatDevFolds:
    """The training persons' windows cut with one pipeline setting, their distinct beats and
    ``ecg_recipe_sweep``'s development folds: what the beat-model experiments (this one and
    ``beat_rr_warp``) fit and score on."""

    ws: WindowSet
    cws: WindowSet
    dev: DevScorer
    beats: np.ndarray
    brec: np.ndarray
    person: np.ndarray

    @classmethod
    def load(cls, data: Path, pipeline_kw: dict) -> "BeatDevFolds":
        recs, calib = load_training_records(data)
        ws, cws = record_windows(recs, pipeline_kw), record_windows(calib, pipeline_kw)
        beats, brec = distinct_beats(ws)
        return cls(ws, cws, DevScorer.from_windows(ws, cws), beats, brec,
                   np.array([ws.records[r].person for r in brec]))

    def mean_scores(self, *, slope: bool, n_pca: int, keys: tuple[str, ...],
                    session_weight: float = 0.0) -> dict[str, float]:
        """Mean over the folds of the beat model's identity metrics, the per-lead PCA + LDA
        fitted on the beats of the persons outside each fold."""
        scores: dict[str, list[float]] = defaultdict(list)
        for k, fold in enumerate(self.dev.folds):
            keep = ~np.isin(self.person, fold)
            W, b = fit_projections(self.beats[keep], self.brec[keep], self.ws.records,
                                   progress=lambda m: None, slope=slope, n_pca=n_pca,
                                   session_weight=session_weight)
            vec = np.concatenate([window_vectors(self.ws, W, b), window_vectors(self.cws, W, b)])
            for key, v in self.dev.score(lambda idx: vec[idx], self.dev.gallery(k)).items():
                scores[key].append(v)
        return {k: float(np.mean(scores[k])) for k in keys if k in scores}


def dev_scores(data: Path, variants: list[tuple[int, bool, float]]) -> list[dict[str, float]]:
    """Per variant, the mean over the development folds of the beat model's identity metrics."""
    folds = BeatDevFolds.load(data, PIPELINE_KW)
    return [folds.mean_scores(slope=slope, n_pca=n_pca, keys=KEYS, session_weight=w)
            for n_pca, slope, w in variants]


def print_table(head: str, labels: list[str], rows: list[dict[str, float]], keys: tuple[str, ...]) -> None:
    """One line per row: its label, then each key's value (nan where a row lacks it)."""
    width = max(len(head), *(len(s) for s in labels))
    print(f"{head:<{width}}  " + "  ".join(f"{k:>15}" for k in keys))
    for label, s in zip(labels, rows):
        print(f"{label:<{width}}  " + "  ".join(f"{s.get(k, float('nan')):15.1f}" for k in keys))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.beat_features",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--variants", type=parse_variant, nargs="+",
                    default=[parse_variant(v) for v in ("40:0", "60:0", "60:1", "80:1", "100:1", "120:1")])
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = dev_scores(args.data, args.variants)
    print_table("n_pca slope session", [f"{n:5d} {int(sl):5d} {w:7g}" for n, sl, w in args.variants],
                rows, KEYS)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
