"""The torch-free half of the GPU recipe search (training/experiments/ecg_recipe_sweep.py):
its development folds must be subject-disjoint and spread the multi-date persons, and the
report must average what the docs say it averages."""
from __future__ import annotations

import numpy as np

from training.experiments.ecg_recipe_sweep import PLANS, VARS, folds_of, report


def _meta() -> dict:
    recs = []
    # 6 multi-date persons, 5 single-date persons with 2 recordings, 2 with one recording
    for p in range(6):
        recs += [{"dataset": "ecgid", "person": f"ecgid:{p:02d}", "session": s, "dur": 20.0}
                 for s in ("2005-01-01", "2005-03-01")]
    for p in range(6, 11):
        recs += [{"dataset": "ecgid", "person": f"ecgid:{p:02d}", "session": "d", "dur": 20.0}] * 2
    recs += [{"dataset": "ecgid", "person": f"ecgid:{p:02d}", "session": "d", "dur": 20.0}
             for p in (11, 12)]
    recs += [{"dataset": "ludb", "person": "ludb:1", "session": "1", "dur": 10.0}]
    return {"irecs": recs}


def test_folds_are_disjoint_cover_testable_persons_and_spread_multi_date() -> None:
    folds = folds_of(_meta(), k=4)
    flat = [p for f in folds for p in f]
    assert len(flat) == len(set(flat)) == 11                     # disjoint; 2-recording persons
    assert not {"ecgid:11", "ecgid:12", "ludb:1"} & set(flat)   # untestable ones always train
    multi = {f"ecgid:{p:02d}" for p in range(6)}
    per_fold = [len(multi & set(f)) for f in folds]
    assert max(per_fold) - min(per_fold) <= 1                   # multi-date spread evenly


def test_report_means_over_folds_and_seeds_and_seed_spread() -> None:
    rows = []
    for seed, vals in ((0, (80.0, 90.0)), (1, (90.0, 100.0))):
        for fold, v in enumerate(vals):
            rows.append({"var": "base", "fold": fold, "seed": seed, "steps": 2000, "lr": 0.002,
                         "emb": 64, "batch_id": 96, "wd": 0.0, "widths": [16, 32, 48, 56],
                         "t10_rank1": v, "t10_eer": 5.0, "t10_frr_at_far1": 20.0,
                         "t10_cross_rank1": v, "t3_rank1": v, "t3_eer": 8.0})
    rows.append({**rows[0], "var": "base", "steps": 4000, "t10_rank1": 99.0})
    table = report(rows).splitlines()
    assert table[2].startswith("| base, 4000 steps | 99.0 |")          # best first
    base = table[3].split("|")
    assert base[1].strip() == "base"
    # mean of 80, 90, 90, 100 = 90; fold-means per seed 85 and 95 -> std 5.0
    assert base[2].strip() == "90.0 ± 5.0"
    assert base[-2].strip() == "4"


def test_plans_name_known_variants_and_the_shipped_recipe_is_the_base() -> None:
    for plan, groups in PLANS.items():
        for _, names in groups:
            assert set(names) <= set(VARS), plan
    from training.experiments.ecg_recipe_sweep import Group
    g, v = Group(), VARS["base"]
    # the base variant is what training/train_ecg.TrainConfig ships (kept in step by hand)
    from training.train_ecg import STRIDES, TrainConfig
    cfg = TrainConfig()
    assert (g.steps, g.lr, g.batch_id, g.batch_act) == (cfg.steps, cfg.lr, cfg.batch_id, cfg.batch_act)
    assert (v.margin, v.scale, v.dropout, v.sampling) == (cfg.margin, cfg.scale, cfg.dropout, cfg.sampling)
    assert STRIDES == (1, 2, 2, 2)
    import inspect

    from training.models.ecg_dualtask import build_dualtask
    d = {k: p.default for k, p in inspect.signature(build_dualtask).parameters.items()}
    assert (d["widths"], d["kernels"], d["embedding_dim"]) == (g.widths, g.kernels, g.emb)
    assert np.isclose(v.w_id, 0.65) and np.isclose(v.w_act, 0.35)  # FixedWeights' default


def test_seed_pick_keeps_the_seed_the_calibration_persons_prefer() -> None:
    from training.experiments.ecg_recipe_sweep import seed_pick

    def r(fold: int, seed: int, cal: float, fold_rank1: float) -> dict:
        return {"var": "base", "steps": 2000, "fold": fold, "seed": seed,
                "cal_t10_rank1": cal, "cal_t10_eer": 0.0,
                "fold_t10_rank1": fold_rank1, "fold_t10_eer": 0.0}
    # fold 0: calibration prefers the better seed (+5 over the mean); fold 1: the worse (-10)
    rows = [r(0, 1, 90.0, 100.0), r(0, 2, 80.0, 90.0), r(1, 1, 70.0, 100.0), r(1, 2, 95.0, 80.0)]
    (res,) = seed_pick(rows)
    assert res["fold_gains"] == [5.0, -10.0]
    assert res["rank1_gain"] == -2.5 and res["seeds"] == 2
    assert np.allclose(res["correlations"], [1.0, -1.0])


def test_beat_vectors_follow_the_served_beat_embedding() -> None:
    """export_beat_embeddings.window_vectors = BeatMorphModel.embed with a float projection:
    unit vector, zeros for an off lead, and zeros for a window without beats."""
    from types import SimpleNamespace

    from daemon.inference.beatmorph import beat_features
    from training.experiments.export_beat_embeddings import window_vectors

    rng = np.random.default_rng(0)
    L, K = 87, 4
    W = rng.normal(size=(3, L, K)).astype(np.float32)
    b = rng.normal(size=(3, K)).astype(np.float32)
    morph = rng.normal(size=(2, L, 3)).astype(np.float32)
    ws = SimpleNamespace(morph=(morph, np.zeros((0, L, 3), np.float32)),
                         lead_mask=np.array([[True, False, True], [True, True, True]]),
                         rec=np.array([0, 0]))
    v = window_vectors(ws, W, b)
    assert v.shape == (2, 3 * K)
    assert np.isclose(np.linalg.norm(v[0]), 1.0) and not v[0, K:2 * K].any()
    assert not v[1].any()
    # lead I block: mean of the unit beat projections, normalised, scaled with the others
    p = np.einsum("bl,lk->bk", beat_features(morph)[:, 0], W[0]) + b[0]
    p = (p / np.linalg.norm(p, axis=1, keepdims=True)).mean(0)
    lead_i = p / np.linalg.norm(p)
    assert np.allclose(v[0, :K] * np.sqrt(2), lead_i, atol=1e-5)
    # a projection twice as wide as the beats reads each beat with its slope (beat model 3.x)
    W2 = rng.normal(size=(3, 2 * L, K)).astype(np.float32)
    v2 = window_vectors(ws, W2, b)
    p2 = np.einsum("bl,lk->bk", beat_features(morph, slope=True)[:, 0], W2[0]) + b[0]
    p2 = (p2 / np.linalg.norm(p2, axis=1, keepdims=True)).mean(0)
    assert np.allclose(v2[0, :K] * np.sqrt(2), p2 / np.linalg.norm(p2), atol=1e-5)


def test_sweep_fusion_is_the_served_fusion() -> None:
    """The development-fold fusion must be exactly what the daemon serves (beatmorph)."""
    from daemon.inference.beatmorph import fuse_embeddings
    from training.experiments.ecg_recipe_sweep import fused_embedding

    rng = np.random.default_rng(1)
    cnn = rng.normal(size=(5, 64)).astype(np.float32)
    beats = rng.normal(size=(5, 144)).astype(np.float32)
    beats /= np.linalg.norm(beats, axis=1, keepdims=True)
    for w in (0.3, 0.5, 0.8):
        got = fused_embedding(lambda idx: cnn[idx], beats, w)(np.arange(5))
        want = np.stack([fuse_embeddings(cnn[i], beats[i], w) for i in range(5)])
        assert np.allclose(got, want, atol=1e-6)
