"""Recipe search for the ECG identity CNN on a GPU, on the training partition only (PyTorch).

Why this exists: on the 2-core machine one training run of the shipped recipe takes ~7 min and
two runs of the same recipe differ by several points, so single-run comparisons (the earlier
ablations in docs/MODELS.md) cannot tell a 2-point improvement from luck. Here many models
train at once as ONE grouped network (grouped convolutions and per-model einsums; BatchNorm
channels are per model), so every variant gets 4 development folds x 3 seeds.

This is an experiment tool, not the pipeline: it re-implements training/models/ecg_dualtask.py
(stem, residual blocks with Sequence-Channel Attention, L2-normalised embedding, activity head;
~81 k parameters per model, Keras' glorot init and BatchNorm momentum/epsilon), AM-Softmax,
the fixed 0.65/0.35 loss weights, Adam with cosine decay and training/train_ecg.augment, in
PyTorch because the GPU machines of this workplace carry PyTorch and no TensorFlow. Its numbers
compare recipes with each other; they are not the shipped model's numbers.

Development protocol (no held-out person is involved): the windows are the daemon's own
(``export_ecg_windows.py``, training + calibration persons only). The 31 training ECG-ID persons
with >= 2 recordings are split into 4 folds (the 8 multi-date persons spread over them); a
fold's persons are removed from that model's identity classes and from its activity donors,
and the model is scored with ``training.eval.identity`` (enrol from the first recording, 3 s
and 10 s tests, cross-date subset) on the fold's persons plus the 8 calibration persons (never
trained on): a 16-person gallery, like the 20-person held-out one.

Commands (the results of docs/MODELS.md, "Recipe search"):

    python -m training.experiments.export_ecg_windows --data ../shared/data --out .gpu/win.npz
    python -m training.experiments.export_beat_embeddings --data ../shared/data \
        --windows .gpu/win.npz --out .gpu/beats.npz      # per-fold beat model, for E/E4
    # on a machine with PyTorch and a GPU, from the repository root; plans A, B1-B4, C1-C3,
    # D, D4, and E, E4 with --beats .gpu/beats.npz
    python -m training.experiments.ecg_recipe_sweep run A --windows .gpu/win.npz --out a.jsonl
    python -m training.experiments.ecg_recipe_sweep report docs/models/ecg_recipe_sweep.jsonl
    python -m training.experiments.ecg_recipe_sweep seed-pick docs/models/ecg_recipe_sweep.jsonl
    # fusion weights: save a run's CNN embeddings (SWEEP_SAVE_EMB=FILE ... run E --beats ...)
    python -m training.experiments.ecg_recipe_sweep fusion-weights --beats .gpu/beats.npz \
        --emb FILE-2000-24.npz

Plan A ran as three processes (``--only`` subsets of its variants) at once on one H100; the
other plans one process each, four at a time. A whole plan takes 1-4 min there.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from training.data.ecg import WindowSet, person_folds
from training.eval.identity import gallery_and_tests, identity_metrics

SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Group:          # shared by all models of one grouped network
    steps: int = 2000
    lr: float = 2e-3
    widths: tuple = (16, 32, 48, 56)
    kernels: tuple = (5, 5, 3, 3)
    emb: int = 64
    batch_id: int = 96
    batch_act: int = 48
    wd: float = 0.0
    ema: float = 0.0        # EMA decay of the weights (0: off); evaluated beside the raw model
    kd_teachers: int = 0    # teachers per fold (base recipe, own seeds) for relational KD


@dataclass(frozen=True)
class Var:            # per model
    name: str = "base"
    margin: float = 0.3
    scale: float = 30.0
    dropout: float = 0.0
    sampling: str = "window"
    ecgid_share: float = -1.0
    aug: float = 1.0
    w_id: float = 0.65
    w_act: float = 0.35
    ldrop: float = 0.4
    kd: float = 0.0         # weight of the relational KD loss (needs Group.kd_teachers)


# ------------------------------------------------------------------ development folds
def folds_of(meta: dict, k: int = 4) -> list[list[str]]:
    """Development folds: the training ECG-ID persons with >= 2 recordings (only they can be
    enrolled and tested), multi-date persons first so that each fold gets its share of them;
    persons with one recording stay in every fold's training."""
    return person_folds((SimpleNamespace(**r) for r in meta["irecs"]), k)


def load(path: str) -> tuple[np.lib.npyio.NpzFile, dict]:
    """``export_ecg_windows`` output: (arrays, metadata)."""
    return np.load(path), json.loads(open(f"{path}.json").read())


class DevScorer:
    """The identity protocol (training.eval.identity) on the exported windows of chosen persons.

    Windows are indexed as exported: the training identity windows, then the calibration ones;
    an embedding function maps window indices to embeddings, so any model (or fusion) scores."""

    @classmethod
    def from_windows(cls, ws: WindowSet, cws: WindowSet) -> "DevScorer":
        """From the training and calibration WindowSets in memory, laid out as
        ``export_ecg_windows`` writes them (for experiments that cut their own windows)."""
        from training.experiments.export_ecg_windows import records_meta

        return cls({"irec": ws.rec, "crec": cws.rec, "iend": ws.t_end_s, "cend": cws.t_end_s,
                    "imask": ws.lead_mask, "cmask": cws.lead_mask},
                   {"irecs": records_meta(ws), "crecs": records_meta(cws)})

    def __init__(self, z, meta: dict) -> None:
        recs = meta["irecs"] + meta["crecs"]
        self.records = tuple(SimpleNamespace(dataset=r["dataset"], person=r["person"],
                                             session=r["session"], duration_s=r["dur"]) for r in recs)
        self.rec = np.concatenate([z["irec"], z["crec"] + len(meta["irecs"])])
        self.end = np.concatenate([z["iend"], z["cend"]])
        self.mask = np.concatenate([z["imask"], z["cmask"]])
        self.person = np.array([self.records[r].person for r in self.rec])
        self.calib = {r["person"] for r in meta["crecs"]}
        self.folds = folds_of(meta)

    def gallery(self, fold: int) -> set[str]:
        """Who a fold's models are scored on: the fold's persons and the calibration persons."""
        return set(self.folds[fold]) | self.calib

    def score(self, emb_of: Callable[[np.ndarray], np.ndarray], persons: set[str],
              lengths: tuple[int, ...] = (3, 10), prefix: str = "",
              keep: np.ndarray | None = None) -> dict[str, float]:
        """The identity metrics over ``persons``' windows; ``keep`` (bool per window, as
        indexed here) restricts templates and tests to those windows, as a quality gate does."""
        sel = np.isin(self.person, list(persons))
        idx = np.nonzero(sel if keep is None else sel & keep)[0]
        ws = WindowSet(np.zeros((len(idx), 1, 1), np.float32), self.mask[idx], self.rec[idx],
                       self.end[idx], self.records)
        out: dict[str, float] = {}
        for L in lengths:
            names, tmpl, tests = gallery_and_tests(ws, emb_of(idx), L)
            out.update({f"{prefix}t{L}_{k}": v for k, v in identity_metrics(names, tmpl, tests).items()})
        return out


def fused_embedding(cnn: Callable[[np.ndarray], np.ndarray], beats: np.ndarray, weight_cnn: float
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """The served sum-rule fusion (daemon/inference/beatmorph.fuse_embeddings) of a CNN
    embedding function with a fold's beat vectors (unit, or zero without beats)."""
    def emb(idx: np.ndarray) -> np.ndarray:
        c = cnn(idx)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        return np.concatenate([np.sqrt(weight_cnn) * c, np.sqrt(1 - weight_cnn) * beats[idx]], axis=1)
    return emb


def fusion_weights(z, meta: dict, beats: np.ndarray, emb: np.ndarray, models: list[str],
                   weights: tuple[float, ...]) -> list[dict]:
    """Fused scores of saved CNN embeddings (``SWEEP_SAVE_EMB``) at several CNN weights."""
    dev = DevScorer(z, meta)
    rows = []
    for m, name in enumerate(models):
        var, fold, seed = name.split(":")
        for w in weights:
            f = fused_embedding(lambda idx, m=m: emb[idx, m].astype(np.float32), beats[int(fold)], w)
            rows.append({"var": var, "fold": int(fold), "seed": int(seed), "weight_cnn": w,
                         **dev.score(f, dev.gallery(int(fold)), (10,))})
    return rows


VARS = {
    "base": Var(),
    "person": Var("person", sampling="person"),
    "person_e5": Var("person_e5", sampling="person", ecgid_share=0.5),
    "m02": Var("m02", margin=0.2),
    "m04": Var("m04", margin=0.4),
    "s16": Var("s16", scale=16.0),
    "s48": Var("s48", scale=48.0),
    "drop02": Var("drop02", dropout=0.2),
    "drop04": Var("drop04", dropout=0.4),
    "noact": Var("noact", w_id=1.0, w_act=0.0),
    "aug0": Var("aug0", aug=0.0),
    "aug2": Var("aug2", aug=2.0),
    "person_drop02": Var("person_drop02", sampling="person", dropout=0.2),
    "ecgid_only": Var("ecgid_only", sampling="person", ecgid_share=1.0),
    "ecgid_08": Var("ecgid_08", sampling="person", ecgid_share=0.8),
    "ldrop0": Var("ldrop0", ldrop=0.0),
    "kd3": Var("kd3", kd=3.0),
    "kd10": Var("kd10", kd=10.0),
    "kd30": Var("kd30", kd=30.0),
    "noact_e5": Var("noact_e5", sampling="person", ecgid_share=0.5, w_id=1.0, w_act=0.0),
}


PLANS: dict[str, list[tuple[Group, list[str]]]] = {
    "A": [(Group(), list(VARS)[:13])],
    "B1": [(Group(steps=4000), ["base", "noact"])],
    "B2": [(Group(lr=1e-3), ["base"]), (Group(lr=4e-3), ["base"]), (Group(wd=1e-3), ["base"])],
    "B3": [(Group(emb=128), ["base"]), (Group(batch_id=192), ["base"]),
           (Group(widths=(24, 32, 48, 64), kernels=(5, 5, 5, 5)), ["base"])],
    "B4": [(Group(), ["ecgid_only", "ecgid_08", "ldrop0", "noact_e5"]),
           (Group(widths=(12, 24, 32, 40)), ["base"])],
    "C1": [(Group(ema=0.998), ["base", "noact"])],
    "C2": [(Group(steps=4000, ema=0.999), ["base"])],
    "C3": [(Group(kd_teachers=3), ["base", "kd3", "kd10", "kd30"])],
    # seed selection: 8 seeds of the shipped recipe, scored on calibration and fold persons apart
    "D": [(Group(), ["base"])],
    "D4": [(Group(steps=4000), ["base"])],
    # the served fusion (CNN + beat model) on development folds: one CNN against 2 and 6 seeds
    "E": [(Group(), ["base"])],
    "E4": [(Group(steps=4000), ["base"])],
    "smoke": [(Group(steps=3, ema=0.9, kd_teachers=2), ["base", "kd3"])],
}

REPORT_METRICS = (("t10_rank1", "10 s rank-1"), ("t10_eer", "10 s EER"),
                  ("t10_frr_at_far1", "10 s FRR@FAR1%"), ("t10_cross_rank1", "10 s cross-date rank-1"),
                  ("t3_rank1", "3 s rank-1"), ("t3_eer", "3 s EER"))


def report(rows: list[dict]) -> str:
    """Markdown table: per recipe, the mean over folds and seeds and, after ±, the spread
    (standard deviation over seeds of the fold-mean); seed ensembles have one value per fold."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        key = (r["var"], r["steps"], r["lr"], r["emb"], r["batch_id"], r["wd"], tuple(r["widths"]),
               r.get("ema", 0.0))
        groups[key].append(r)
    base = (16, 32, 48, 56)
    lines = ["| recipe | " + " | ".join(h for _, h in REPORT_METRICS) + " | models |",
             "|---|" + "---|" * (len(REPORT_METRICS) + 1)]
    order = sorted(groups.items(), key=lambda kv: -float(np.mean([r["t10_rank1"] for r in kv[1]])))
    for (var, steps, lr, emb, bid, wd, widths, ema), rs in order:
        name = [var]
        for cond, txt in ((steps != 2000, f"{steps} steps"), (lr != 2e-3, f"lr {lr:g}"),
                          (emb != 64, f"embedding {emb}"), (bid != 96, f"batch {bid}"),
                          (wd, f"weight decay {wd:g}"), (widths != base, "widths " + "/".join(map(str, widths)))):
            if cond:
                name.append(txt)
        cells = []
        for k, _ in REPORT_METRICS:
            by_seed = defaultdict(list)
            for r in rs:
                by_seed[r["seed"]].append(r[k])
            fold_means = [float(np.mean(v)) for v in by_seed.values()]
            spread = f" ± {np.std(fold_means):.1f}" if len(fold_means) > 1 else ""
            cells.append(f"{np.mean([r[k] for r in rs]):.1f}{spread}")
        lines.append(f"| {', '.join(name)} | " + " | ".join(cells) + f" | {len(rs)} |")
    return "\n".join(lines)


def seed_pick(rows: list[dict]) -> list[dict]:
    """Per recipe with calibration/fold scores apart (plans D, D4): the gain, on the fold's
    persons, of keeping the seed that scores best (10 s rank-1 minus EER) on the calibration
    persons, against the mean seed; and that score's correlation with the fold's rank-1 − EER."""
    out = []
    recipes: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if "cal_t10_rank1" in r and "_ens" not in r["var"]:
            recipes[(r["var"], r["steps"])].append(r)
    for (var, steps), rs in sorted(recipes.items()):
        gains, corrs = [], []
        for fold in sorted({r["fold"] for r in rs}):
            f = [r for r in rs if r["fold"] == fold]
            cal = np.array([r["cal_t10_rank1"] - r["cal_t10_eer"] for r in f])
            rank1 = np.array([r["fold_t10_rank1"] for r in f])
            gains.append(float(rank1[int(np.argmax(cal))] - rank1.mean()))
            corrs.append(float(np.corrcoef(cal, rank1 - np.array([r["fold_t10_eer"] for r in f]))[0, 1]))
        out.append({"var": var, "steps": steps, "seeds": len(rs) // max(len(gains), 1),
                    "rank1_gain": float(np.mean(gains)), "fold_gains": gains, "correlations": corrs})
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="python -m training.experiments.ecg_recipe_sweep")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and score one plan's recipes (GPU)")
    r.add_argument("plan", choices=sorted(PLANS))
    r.add_argument("--windows", default=".gpu/win.npz", help="export_ecg_windows output")
    r.add_argument("--out", required=True, help="JSON lines, appended")
    r.add_argument("--only", default="", help="comma-separated subset of the plan's variants")
    r.add_argument("--beats", default="", help="export_beat_embeddings output: score the fused embedding too")
    p = sub.add_parser("report", help="markdown table of result files")
    p.add_argument("results", nargs="+")
    q = sub.add_parser("seed-pick", help="can the calibration persons pick a good seed?")
    q.add_argument("results", nargs="+")
    fw = sub.add_parser("fusion-weights", help="fused scores of saved CNN embeddings per CNN weight")
    fw.add_argument("--windows", default=".gpu/win.npz")
    fw.add_argument("--beats", required=True)
    fw.add_argument("--emb", required=True, help="a SWEEP_SAVE_EMB file of a run")
    fw.add_argument("--weights", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    args = ap.parse_args(argv)
    if args.cmd == "fusion-weights":
        z, meta = load(args.windows)
        saved = np.load(args.emb)
        rows = fusion_weights(z, meta, np.load(args.beats)["beats"].astype(np.float32),
                              saved["emb"], [str(m) for m in saved["models"]],
                              tuple(float(w) for w in args.weights.split(",")))
        for w in sorted({r["weight_cnn"] for r in rows}):
            rs = [r for r in rows if r["weight_cnn"] == w]
            print(json.dumps({"weight_cnn": w, "models": len(rs), **{
                k: round(float(np.mean([r[k] for r in rs])), 2)
                for k in ("t10_rank1", "t10_eer", "t10_frr_at_far1", "t10_cross_rank1")}}))
        return 0
    if args.cmd == "seed-pick":
        for res in seed_pick([json.loads(line) for f in args.results for line in open(f) if line.strip()]):
            print(json.dumps(res))
        return 0
    if args.cmd == "report":
        print(report([json.loads(line) for f in args.results for line in open(f) if line.strip()]))
        return 0
    from training.experiments.ecg_recipe_torch import run_group  # needs PyTorch

    z, meta = load(args.windows)
    beats = np.load(args.beats)["beats"].astype(np.float32) if args.beats else None
    only = [n for n in args.only.split(",") if n]
    with open(args.out, "a") as fh:
        for g, names in PLANS[args.plan]:
            names = [n for n in names if not only or n in only]
            seeds = {"smoke": (0, 1), "D": tuple(range(10, 18)), "D4": tuple(range(10, 18)),
                     "E": tuple(range(20, 26)), "E4": tuple(range(20, 26))}.get(args.plan, SEEDS)
            models = [(VARS[n], f, s) for n in names for f in range(4) for s in seeds]
            if not models:
                continue
            for res in run_group(g, models, z, meta, log=lambda m: print(m, flush=True), beats=beats):
                fh.write(json.dumps(res) + "\n")
            fh.flush()
    os.sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
