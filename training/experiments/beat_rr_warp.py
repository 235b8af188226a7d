"""How much heart-rate normalisation the beat-morphology model's beats should get, measured on
development folds of the TRAINING persons only (never on held-out persons).

    python -m training.experiments.beat_rr_warp --data ../shared/data [--exponents 0 0.25 0.333 0.5]

For each exponent of ``daemon.dsp.segment.RrWarp`` (0 = the beats as before), the beats come
from the daemon's own pipeline (``training.train_beats.PIPELINE_KW`` with that exponent), and
for each of ``ecg_recipe_sweep``'s 4 development folds the per-lead PCA + LDA is fitted with
``train_beats.fit_projections`` as it was when the exponent was chosen (beat model 2.x: no slope
channel, PCA 60; ``beat_features`` measures those choices), on the training records WITHOUT the
fold's persons, and scored with the identity protocol (``training.eval.identity``: enrol from
the first recording, 10 s and 3 s tests) on a gallery of the fold's persons plus the ECG-ID
calibration persons (``ecg_recipe_sweep.DevScorer``). Prints the mean over folds of the beat model alone (no CNN: the CNN was
trained on these persons, so a fused score here would flatter it).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from training.eval.identity_baseline import plain_beat_kwargs
from training.experiments.beat_features import BeatDevFolds
from training.train_beats import PIPELINE_KW, RR_REF_S

KEYS = ("t10_rank1", "t10_eer", "t10_frr_at_far1", "t10_cross_rank1", "t3_rank1", "t3_eer",
        "t3_frr_at_far1")


def dev_scores(data: Path, exponent: float) -> dict[str, float]:
    """Mean over the development folds of the beat model's identity metrics."""
    kw = plain_beat_kwargs(PIPELINE_KW)
    if exponent:
        kw.update(beat_rr_exponent=exponent, beat_rr_ref_s=RR_REF_S)
    # the beat model as it was when the exponent was chosen (2.x: no slope channel, PCA 60),
    # so this command reproduces its table in docs/MODELS.md
    return BeatDevFolds.load(data, kw).mean_scores(slope=False, n_pca=60, keys=KEYS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.beat_rr_warp",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--exponents", type=float, nargs="+", default=[0.0, 0.15, 0.25, 1 / 3, 0.4, 0.5])
    args = ap.parse_args(argv)
    print("exponent  " + "  ".join(f"{k:>16}" for k in KEYS), flush=True)
    for e in args.exponents:
        t0 = time.time()
        s = dev_scores(args.data, e)
        print(f"{e:8.3f}  " + "  ".join(f"{s.get(k, float('nan')):16.1f}" for k in KEYS)
              + f"  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
