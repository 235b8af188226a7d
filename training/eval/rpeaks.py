"""`python -m training.eval rpeaks --data DIR`: R-peak detection vs expert annotations and peers.

Runs biod's streaming detector (daemon.dsp.rpeaks) and, in the same run and on the same raw
signals, neurokit2's default ``ecg_clean`` + ``ecg_peaks`` and py-ecg-detectors' Pan-Tompkins,
Engzee and two-average detectors, on whatever of ``DIR/mitdb`` and ``DIR/ludb`` exists (format of
``shared/data``; records, rates, gains, baselines and beat symbols come from metadata.json).

Scoring (stated in the output too):
- a detection matches an annotation within +-75 ms, one-to-one, nearest first;
- pre-filtering: every detector gets the same raw mV signal and does its own filtering;
- delay correction: every detector's output is reported both uncorrected and moved to the
  largest |5-20 Hz band-pass| (zero-phase) within +-75 ms, as shared/BASELINES.md does;
- MIT-BIH: beat symbols only; paced records (any paced-beat annotation '/', or
  ``records[i].paced`` in metadata) reported separately; ventricular flutter/fibrillation
  episodes ('[' to ']') are not scored (ANSI/AAMI EC57 practice: there are no beats to mark);
- LUDB: Einthoven I, II, III separately against the cardiologists' QRS marks of that lead
  ('N'), scored only between the first and last mark of the lead +-75 ms (the matching
  tolerance): in many records the cardiologists left the first or last complex of the 10 s
  unmarked (the report counts them: ``ludb_unmarked_edges``), so a detection outside the marked stretch cannot be judged either way (scored
  +-0.5 s until 2026-11-22, which counted such real, unmarked complexes as false positives for
  every detector); biod also on the three leads fused (one detection per beat), each lead's
  marks scored against that lead's own R of each beat (``Beat.lead_samples``);
- noise stress: MIT-BIH non-paced records (first ``--noise-seconds``) plus generated baseline
  wander, muscle-like and motion-like noise in equal power at 12, 6 and 0 dB SNR (see
  training/eval/noise.py; generated because no noise-stress recordings are available).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import signal

from daemon.dsp.rpeaks import detect_rpeaks

from .noise import add_noise

TOL_S = 0.075
SNRS_DB = (12, 6, 0)
LUDB_LEADS = ("I", "II", "III")  # Einthoven leads, in the column order of fused LUDB series
PEERS = ("neurokit2", "pan_tompkins", "engzee", "two_average")
DETECTORS = ("biod",) + PEERS
LABELS = {
    "biod": "biod (streaming, 1 s chunks)",
    "neurokit2": "neurokit2 ecg_clean+ecg_peaks (default)",
    "pan_tompkins": "py-ecg-detectors Pan-Tompkins",
    "engzee": "py-ecg-detectors Engzee",
    "two_average": "py-ecg-detectors two-average",
}


# ----------------------------------------------------------------------------- data
@dataclass
class Series:
    """One scored signal: a record (or lead of a record) with its reference beats."""

    dataset: str  # "mitdb" | "mitdb_paced" | "ludb_I" | ...
    name: str
    fs: float
    x: np.ndarray  # (n, n_leads) float32 mV
    ref: np.ndarray  # reference sample indices
    scored: list[tuple[int, int]] = field(default_factory=list)  # [lo, hi) intervals scored
    refs_by_lead: dict[str, np.ndarray] | None = None  # fused LUDB: reference per lead
    scored_by_lead: dict[str, list[tuple[int, int]]] | None = None
    paced: bool = False


def _read_meta(folder: Path) -> dict:
    path = folder / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --data must point to a folder like shared/data")
    return json.loads(path.read_text())


def _wanted(selected: set[str] | None, dataset: str, name: str) -> bool:
    if not selected:
        return True
    base = name.split("/")[-1]
    return bool({name, base, f"{dataset}:{name}", f"{dataset}:{base}"} & selected)


def load_mitdb(folder: Path, selected: set[str] | None, max_seconds: float | None) -> list[Series]:
    meta = _read_meta(folder)
    z = np.load(folder / "mitdb.npz")
    beat_symbols = list(meta["beat_symbols"])
    out = []
    for rec in meta["records"]:
        name = str(rec["record"])
        if not _wanted(selected, "mitdb", name):
            continue
        fs = float(rec.get("fs", meta["fs_hz"]))
        raw = z[f"sig_{name}"][:, 0].astype(np.float64)
        x = ((raw - rec["baseline"][0]) / rec["adc_gain"][0]).astype(np.float32)
        samples, symbols = z[f"ann_sample_{name}"], z[f"ann_symbol_{name}"]
        n = x.shape[0] if max_seconds is None else min(x.shape[0], int(max_seconds * fs))
        ref = samples[np.isin(symbols, beat_symbols) & (samples < n)].astype(np.int64)
        paced = bool(rec.get("paced", False)) or bool(np.any(symbols == "/"))
        # Flutter/fibrillation episodes are excluded from scoring.
        scored, lo = [], 0
        for s, sym in zip(samples, symbols):
            if sym == "[":
                scored.append((lo, int(s)))
                lo = None
            elif sym == "]" and lo is None:
                lo = int(s)
        if lo is not None:
            scored.append((lo, n))
        scored = [(a, min(b, n)) for a, b in scored if min(b, n) > a]
        out.append(Series("mitdb_paced" if paced else "mitdb", name, fs, x[:n, None], ref, scored))
    return out


def load_ludb(folder: Path, selected: set[str] | None) -> list[Series]:
    meta = _read_meta(folder)
    z = np.load(folder / "ludb.npz")
    leads = [str(l).lower() for l in meta["leads"]]
    try:
        idx = [leads.index(l) for l in ("i", "ii", "iii")]
    except ValueError as exc:
        raise ValueError(f"{folder}/metadata.json lists no Einthoven I/II/III leads: {leads}") from exc
    fs = float(meta["fs_hz"])
    sig, gain = z["signals"], z["adc_gain"]
    ar, al, asamp, asym = z["ann_record"], z["ann_lead"], z["ann_sample"], z["ann_symbol"]
    half = int(round(TOL_S * fs))  # the marked stretch +- the match tolerance (module docstring)
    out = []
    for r, rec in enumerate(meta["records"]):
        name = str(rec["record"])
        if not _wanted(selected, "ludb", name):
            continue
        ri = int(rec.get("index", r))
        paced = bool(rec.get("paced", False)) or any("pacing" in str(c).lower() for c in rec.get("comments", []))
        x3 = (sig[ri][:, idx] / gain[ri][idx][None, :]).astype(np.float32)
        refs, spans = {}, {}
        for k, (lead_name, li) in enumerate(zip(LUDB_LEADS, idx)):
            ref = np.sort(asamp[(ar == ri) & (al == li) & (asym == "N")]).astype(np.int64)
            if ref.size == 0:
                continue
            span = [(max(0, int(ref[0]) - half), int(ref[-1]) + half + 1)]
            refs[lead_name], spans[lead_name] = ref, span
            out.append(Series(f"ludb_{lead_name}", name, fs, x3[:, k:k + 1], ref, span, paced=paced))
        if refs:
            out.append(Series("ludb_fused", name, fs, x3, np.zeros(0, np.int64), [], refs, spans, paced))
    return out


def ludb_unmarked_edges(series: list[Series]) -> tuple[int, int, int]:
    """(records whose first lead-I mark comes more than one median RR + 100 ms after the start,
    records whose last mark comes as long before the end, records): there the cardiologists left
    a complex unmarked. Why LUDB is scored only over the marked stretch (module docstring)."""
    n = first = last = 0
    for s in series:
        if s.dataset != "ludb_I" or s.ref.size < 3:
            continue
        slack = float(np.median(np.diff(s.ref))) + 0.1 * s.fs
        n += 1
        first += bool(s.ref[0] > slack)
        last += bool(s.x.shape[0] - s.ref[-1] > slack)
    return first, last, n


# ----------------------------------------------------------------------------- detectors
def run_detector(name: str, x: np.ndarray, fs: float) -> np.ndarray:
    """Raw detector output (sample indices) on the raw mV signal ``x`` (n, n_leads)."""
    if name == "biod":  # on several leads: each beat's R in every lead, (n_beats, n_leads)
        return detect_rpeaks(x, fs, chunk=int(round(fs)), per_lead=x.shape[1] > 1)
    x1 = np.asarray(x[:, 0], dtype=np.float64)
    if name == "neurokit2":
        import neurokit2 as nk

        clean = nk.ecg_clean(x1, sampling_rate=int(round(fs)))
        _, info = nk.ecg_peaks(clean, sampling_rate=int(round(fs)))
        return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
    from ecgdetectors import Detectors

    d = Detectors(fs)
    fn = {"pan_tompkins": d.pan_tompkins_detector, "engzee": d.engzee_detector,
          "two_average": d.two_average_detector}[name]
    return np.asarray(fn(x1), dtype=np.int64)


def lead_detections(det: np.ndarray, lead: int) -> np.ndarray:
    """One lead's beats from :func:`run_detector`'s output: for biod on several leads (one row
    per beat, each lead's own R, -1 where the lead was off) that lead's column, sorted; a 1-D
    output is the same for every lead."""
    if det.ndim == 1:
        return det
    col = det[:, lead]
    return np.unique(col[col >= 0])


def bandpass_correct(x: np.ndarray, fs: float, det: np.ndarray, tol_s: float = TOL_S) -> np.ndarray:
    """Move each detection to the largest |5-20 Hz zero-phase band-pass| within +-tol (the sum
    of |band-pass| over the columns of ``x``; the scoring passes one lead)."""
    if det.size == 0:
        return det
    sos = signal.butter(2, [5.0, 20.0], btype="bandpass", fs=fs, output="sos")
    e = np.abs(signal.sosfiltfilt(sos, np.asarray(x, dtype=np.float64), axis=0)).sum(axis=1)
    w = int(round(tol_s * fs))
    det = np.clip(det, 0, e.size - 1)
    offs = np.arange(-w, w + 1)
    idx = np.clip(det[:, None] + offs[None, :], 0, e.size - 1)
    return np.unique(idx[np.arange(det.size), np.argmax(e[idx], axis=1)])


def match(ref: np.ndarray, det: np.ndarray, tol: int) -> tuple[int, np.ndarray]:
    """One-to-one matching within +-tol samples, closest pairs first. Returns (tp, det-ref)."""
    ref, det = np.asarray(ref, np.int64), np.asarray(det, np.int64)
    if ref.size == 0 or det.size == 0:
        return 0, np.zeros(0, np.int64)
    j = np.searchsorted(det, ref)
    pairs = []
    for k in (-1, 0, 1):
        jj = j + k
        ok = (jj >= 0) & (jj < det.size)
        d = np.full(ref.size, np.iinfo(np.int64).max)
        d[ok] = np.abs(det[jj[ok]] - ref[ok])
        for i in np.flatnonzero(d <= tol):
            pairs.append((int(d[i]), int(i), int(jj[i])))
    pairs.sort()
    used_r, used_d, errs = set(), set(), []
    for _, i, jd in pairs:
        if i in used_r or jd in used_d:
            continue
        used_r.add(i)
        used_d.add(jd)
        errs.append(int(det[jd] - ref[i]))
    return len(errs), np.asarray(errs, np.int64)


def _in_spans(a: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    keep = np.zeros(a.size, bool)
    for lo, hi in spans:
        keep |= (a >= lo) & (a < hi)
    return keep


def score(ref: np.ndarray, det: np.ndarray, spans: list[tuple[int, int]], fs: float) -> dict:
    ref = ref[_in_spans(ref, spans)]
    det = det[_in_spans(det, spans)]
    tp, errs = match(ref, det, int(round(TOL_S * fs)))
    return {"tp": tp, "fn": int(ref.size - tp), "fp": int(det.size - tp),
            "err_ms": (np.abs(errs) * 1000.0 / fs).round(3).tolist()}


# ----------------------------------------------------------------------------- jobs
_SERIES: list[Series] = []  # filled in the parent before the pool forks


def _noisy(s: Series, snr: float | None, noise_seconds: float) -> tuple[np.ndarray, np.ndarray, list]:
    if snr is None:
        return s.x, s.ref, s.scored
    n = min(s.x.shape[0], int(noise_seconds * s.fs))
    seed = 1000 + int("".join(c for c in s.name if c.isdigit()) or 0) * 10 + SNRS_DB.index(snr)
    x = add_noise(s.x[:n, 0], s.fs, snr, seed)[:, None]
    spans = [(a, min(b, n)) for a, b in s.scored if min(b, n) > a]
    return x, s.ref[s.ref < n], spans


_CACHE: Path | None = None  # peers' raw outputs (deterministic) may be cached between runs


def _job(args: tuple[int, str, float | None, float]) -> dict:
    i, det_name, snr, noise_seconds = args
    s = _SERIES[i]
    x, ref, spans = _noisy(s, snr, noise_seconds)
    cache = None
    if _CACHE is not None and det_name != "biod":
        key = f"{det_name}_{s.dataset}_{s.name.replace('/', '-')}_{snr}_{x.shape[0]}.npz"
        cache = _CACHE / key
    t0 = time.perf_counter()
    error = None
    if cache is not None and cache.is_file():
        z = np.load(cache)
        det, secs = z["det"], float(z["seconds"])
        error = str(z["error"]) or None
    else:
        try:
            det = run_detector(det_name, x, s.fs)
        except Exception as exc:  # a peer crashing on a record scores as 'no beats found', noted
            if det_name == "biod":
                raise
            det, error = np.zeros(0, np.int64), f"{type(exc).__name__}: {exc}"
        secs = time.perf_counter() - t0
        if cache is not None:
            np.savez(cache, det=det, seconds=secs, error=error or "")
    out = {"series": i, "detector": det_name, "snr": snr, "seconds": secs, "n_samples": int(x.shape[0]),
           "error": error}
    if s.refs_by_lead is not None:
        # Fused leads: each lead's marks against that lead's own R of every beat (biod reports
        # one per lead), the correction on that lead alone.
        out["by_lead"] = {}
        for lead, r in s.refs_by_lead.items():
            k = LUDB_LEADS.index(lead)
            d = lead_detections(det, k)
            cor = bandpass_correct(x[:, k:k + 1], s.fs, d)
            out["by_lead"][lead] = {"raw": score(r, d, s.scored_by_lead[lead], s.fs),
                                    "corrected": score(r, cor, s.scored_by_lead[lead], s.fs)}
    else:
        cor = bandpass_correct(x, s.fs, det)
        out["raw"] = score(ref, det, spans, s.fs)
        out["corrected"] = score(ref, cor, spans, s.fs)
    return out


def _summary(rows: list[dict]) -> dict:
    tp = sum(r["tp"] for r in rows)
    fn = sum(r["fn"] for r in rows)
    fp = sum(r["fp"] for r in rows)
    err = np.concatenate([np.asarray(r["err_ms"], float) for r in rows]) if rows else np.zeros(0)
    pct = lambda a, b: round(100.0 * a / b, 3) if b else float("nan")  # noqa: E731
    return {
        "n_ref": tp + fn, "tp": tp, "fn": fn, "fp": fp,
        "se": pct(tp, tp + fn), "ppv": pct(tp, tp + fp), "f1": pct(2 * tp, 2 * tp + fn + fp),
        "median_err_ms": round(float(np.median(err)), 2) if err.size else float("nan"),
        "p95_err_ms": round(float(np.percentile(err, 95)), 2) if err.size else float("nan"),
    }


PAIRED_GROUPS = ("mitdb", "ludb_I", "ludb_II", "ludb_III", "ludb_I_nonpaced", "ludb_II_nonpaced",
                 "ludb_III_nonpaced", "noise_12dB", "noise_6dB", "noise_0dB")


PAIRED_DRAWS = 2000


def paired_f1(by_record: dict[str, dict[str, dict]], a: str, b: str, n_boot: int = PAIRED_DRAWS,
              seed: int = 0) -> dict[str, float] | None:
    """F1 of detector ``a`` minus detector ``b`` over the same records, with a 95 % interval
    from resampling RECORDS (both detectors scored on each draw's records, pooled as the
    tables pool them). WHY records: errors cluster in records (one odd morphology, one noisy
    stretch), so beats are not independent; the interval says whether a difference of a few
    tenths of a point is more than which records happen to be in the folder.
    ``by_record[detector][record] = {"tp", "fn", "fp"}``; None when a record lacks one of them."""
    names = sorted(by_record.get(a, {}))
    if len(names) < 2 or any(n not in by_record.get(b, {}) for n in names):
        return None
    counts = {d: np.array([[by_record[d][n][k] for k in ("tp", "fn", "fp")] for n in names], float)
              for d in (a, b)}

    def f1(c: np.ndarray) -> np.ndarray:  # c: (..., 3) summed counts
        den = 2 * c[..., 0] + c[..., 1] + c[..., 2]
        return 100.0 * np.divide(2 * c[..., 0], den, out=np.full(den.shape, np.nan), where=den > 0)

    draws = np.random.default_rng(seed).integers(0, len(names), (n_boot, len(names)))
    diff = f1(counts[a][draws].sum(1)) - f1(counts[b][draws].sum(1))
    lo, hi = np.nanpercentile(diff, [2.5, 97.5])
    return {"diff": float(f1(counts[a].sum(0)) - f1(counts[b].sum(0))), "lo": float(lo),
            "hi": float(hi), "records": len(names)}


def _paired_table(paired: dict) -> list[str]:
    if not paired:
        return []
    peers = [p for p in PEERS if any(p in v for v in paired.values())]
    lines = ["### biod minus each peer: F1 difference (raw), 95 % interval over records", "",
             f"Record bootstrap ({PAIRED_DRAWS} draws, fixed seed): records are resampled with replacement and "
             "both detectors scored on the same draw. An interval that excludes 0 is a difference "
             "these records can tell apart.", "",
             "| group | records | " + " | ".join(f"vs {LABELS[p]}" for p in peers) + " |",
             "|---|---|" + "---|" * len(peers)]
    for g, v in paired.items():
        n = next(iter(v.values()))["records"]
        cells = [f"{v[p]['diff']:+.2f} [{v[p]['lo']:+.2f}, {v[p]['hi']:+.2f}]" if p in v else "-" for p in peers]
        lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------- report
def _table(title: str, summ: dict, groups: list[str], mode: str) -> list[str]:
    lines = [f"### {title} ({mode})", "",
             "| group | detector | Se % | +P % | F1 % | median abs err ms | p95 abs err ms | beats |",
             "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        for d in DETECTORS:
            m = summ.get(g, {}).get(d, {}).get(mode)
            if m is None:
                continue
            lines.append(f"| {g} | {LABELS[d]} | {m['se']:.2f} | {m['ppv']:.2f} | {m['f1']:.2f} | "
                         f"{m['median_err_ms']:.1f} | {m['p95_err_ms']:.1f} | {m['n_ref']} |")
    return lines + [""]


def _headline(summ: dict) -> list[str]:
    """One row per detector and delay mode against the project's targets (shared/BASELINES.md)."""
    def cell(g: str, d: str, mode: str, key: str) -> str:
        m = summ.get(g, {}).get(d, {}).get(mode)
        return f"{m[key]:.2f}" if m else "-"

    lines = ["### Headline (targets: MIT-BIH non-paced Se and +P >= 99.7; LUDB I/II/III F1 >= 99.5 with "
             "median error <= 4 ms; F1 at 0 dB above every peer)", "",
             "| detector | delay | MIT Se | MIT +P | LUDB F1 I / II / III | LUDB median err ms I / II / III | "
             "F1 at 0 dB |", "|---|---|---|---|---|---|---|"]
    for d in DETECTORS:
        for mode in ("raw", "corrected"):
            if d not in summ.get("mitdb", {}) and d not in summ.get("ludb_I", {}):
                continue
            ludb_f1 = " / ".join(cell(f"ludb_{l}", d, mode, "f1") for l in LUDB_LEADS)
            ludb_err = " / ".join(cell(f"ludb_{l}", d, mode, "median_err_ms") for l in LUDB_LEADS)
            lines.append(f"| {LABELS[d]} | {mode} | {cell('mitdb', d, mode, 'se')} | {cell('mitdb', d, mode, 'ppv')} | "
                         f"{ludb_f1} | {ludb_err} | {cell('noise_0dB', d, mode, 'f1')} |")
    if "biod" in summ.get("ludb_fused_vs_I", {}):  # LUDB has 3 leads; MIT-BIH and the noise test 1 here
        ludb_f1 = " / ".join(cell(f"ludb_fused_vs_{l}", "biod", "raw", "f1") for l in LUDB_LEADS)
        ludb_err = " / ".join(cell(f"ludb_fused_vs_{l}", "biod", "raw", "median_err_ms") for l in LUDB_LEADS)
        lines.append(f"| biod, leads I+II+III fused, each lead's own R | raw | - | - | {ludb_f1} | {ludb_err} | - |")
    return lines + [""]


def _noise_table(summ: dict) -> list[str]:
    groups = [f"noise_{snr}dB" for snr in SNRS_DB if f"noise_{snr}dB" in summ]
    if not groups:
        return []
    lines = ["### MIT-BIH noise stress, F1 % (band-pass corrected / uncorrected)", "",
             "| detector | " + " | ".join(g.replace("noise_", "") + " SNR" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for d in DETECTORS:
        cells = []
        for g in groups:
            m = summ[g].get(d)
            cells.append(f"{m['corrected']['f1']:.2f} / {m['raw']['f1']:.2f}" if m else "-")
        lines.append(f"| {LABELS[d]} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plot(series: list[Series], path: Path, noise_seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mit = [s for s in series if s.dataset == "mitdb"]
    fused = [s for s in series if s.dataset == "ludb_fused"]
    panels = []
    if mit:
        s = mit[0]
        for cand in mit:  # prefer a record whose first 10 s show ectopic-looking RR variation
            if cand.ref.size > 20 and np.std(np.diff(cand.ref[:40])) > 0.08 * cand.fs:
                s = cand
                break
        panels.append((s, None))
        panels.append((s, 0))
    if fused:
        panels.append((fused[0], None))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.8 * len(panels)), squeeze=False)
    for ax, (s, snr) in zip(axes[:, 0], panels):
        x, ref, _ = _noisy(s, snr, noise_seconds)
        n = min(x.shape[0], int(10 * s.fs))
        det = run_detector("biod", x, s.fs)
        t = np.arange(n) / s.fs
        for k in range(x.shape[1]):
            ax.plot(t, x[:n, k] - 1.5 * k, lw=0.7, color=f"C{k}")
        lead = 0
        if s.refs_by_lead is not None:  # show lead II's marks on lead II's trace
            lead = 1 if "II" in s.refs_by_lead and x.shape[1] > 1 else 0
            ref = s.refs_by_lead.get("II", next(iter(s.refs_by_lead.values())))
        det = lead_detections(det, lead)  # the R of the lead shown
        r = ref[ref < n]
        d = det[det < n]
        y = x[:, lead] - 1.5 * lead
        ax.plot(r / s.fs, y[r], "o", mfc="none", ms=9, color="green", label="annotated")
        ax.plot(d / s.fs, y[d], "x", ms=7, color="red", label="biod")
        what = f"{s.dataset} {s.name}" + ("" if snr is None else f" + noise {snr} dB SNR")
        ax.set_title(what + (" (leads I, II, III fused; lead II's marks and R)" if x.shape[1] > 1 else ""))
        ax.set_xlabel("s")
        ax.set_ylabel("mV")
        ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval rpeaks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="folder in the format of shared/data")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--records", nargs="*", help="only these records (101, mitdb:101, ludb:data/1 ...)")
    ap.add_argument("--quick", action="store_true", help="first 5 min of MIT-BIH, 2 min for noise")
    ap.add_argument("--noise-seconds", type=float, default=None,
                    help="seconds of each MIT-BIH record used for noise stress (default 300; quick 120)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--md", type=Path, default=Path("docs/benchmarks/rpeaks.md"), help="markdown report")
    ap.add_argument("--plot", type=Path, default=Path("docs/benchmarks/rpeaks_example.png"))
    ap.add_argument("--detectors", nargs="*", choices=DETECTORS, default=list(DETECTORS),
                    help="subset of detectors to run (default: all)")
    ap.add_argument("--cache", type=Path, help="folder caching the peers' outputs between runs "
                    "(they do not change when biod does); never used for biod")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder (expected e.g. ../shared/data)", file=sys.stderr)
        return 2
    selected = set(args.records) if args.records else None
    noise_s = args.noise_seconds or (120.0 if args.quick else 300.0)
    series: list[Series] = []
    if (args.data / "mitdb").is_dir():
        series += load_mitdb(args.data / "mitdb", selected, 300.0 if args.quick else None)
    if (args.data / "ludb").is_dir():
        series += load_ludb(args.data / "ludb", selected)
    if not series:
        print(f"error: no mitdb/ or ludb/ records found under {args.data}", file=sys.stderr)
        return 2
    dets = tuple(d for d in DETECTORS if d in args.detectors)
    global _CACHE
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
        _CACHE = args.cache
    jobs = []
    for i, s in enumerate(series):
        for d in dets:
            if s.dataset == "ludb_fused" and d != "biod":
                continue
            jobs.append((i, d, None, noise_s))
            if s.dataset == "mitdb":
                jobs += [(i, d, snr, noise_s) for snr in SNRS_DB]
    jobs.sort(key=lambda j: -(series[j[0]].x.shape[0] * (3 if j[1] == "engzee" else 1)))
    global _SERIES
    _SERIES = series
    t0 = time.time()
    if args.workers > 1:
        with mp.get_context("fork").Pool(args.workers) as pool:
            results = pool.map(_job, jobs, chunksize=1)
    else:
        results = [_job(j) for j in jobs]
    wall = time.time() - t0

    # Aggregate: group -> detector -> mode -> rows.
    rows: dict[str, dict[str, dict[str, list]]] = {}
    speed: dict[str, list[float]] = {}
    per_record = []
    by_record: dict[str, dict[str, dict]] = {}  # group -> detector -> record -> raw counts
    for r in results:
        s = series[r["series"]]
        if r["snr"] is None:
            speed.setdefault(r["detector"], []).append(r["n_samples"] / s.fs / max(r["seconds"], 1e-9))
        if "by_lead" in r:
            items = [(f"ludb_fused_vs_{lead}", v) for lead, v in r["by_lead"].items()]
        else:
            g = s.dataset if r["snr"] is None else f"noise_{r['snr']}dB"
            items = [(g, {"raw": r["raw"], "corrected": r["corrected"]})]
            if g.startswith("ludb_") and not s.paced:
                # like MIT-BIH's paced records, LUDB's paced ones are also scored apart: their
                # annotators marked the pacing spike in some records and the R wave in others
                items.append((f"{g}_nonpaced", items[0][1]))
        for g, v in items:
            by_record.setdefault(g, {}).setdefault(r["detector"], {})[s.name] = v["raw"]
            for mode in ("raw", "corrected"):
                rows.setdefault(g, {}).setdefault(r["detector"], {}).setdefault(mode, []).append(v[mode])
                if "noise" not in g and not g.endswith("_nonpaced"):  # those repeat the record's rows
                    per_record.append({"group": g, "record": s.name, "detector": r["detector"], "mode": mode,
                                       **{k: v[mode][k] for k in ("tp", "fn", "fp")}})
    pooled = {"ludb_I+II+III": ("ludb_I", "ludb_II", "ludb_III"),
              "ludb_I+II+III_nonpaced": ("ludb_I_nonpaced", "ludb_II_nonpaced", "ludb_III_nonpaced"),
              "overall": ("mitdb", "mitdb_paced", "ludb_I", "ludb_II", "ludb_III")}
    for name, members in pooled.items():
        for g in (m for m in members if m in rows):
            for d in rows[g]:
                for mode in rows[g][d]:
                    rows.setdefault(name, {}).setdefault(d, {}).setdefault(mode, []).extend(rows[g][d][mode])
    errors = [f"{r['detector']} on {series[r['series']].dataset} {series[r['series']].name}"
              f"{'' if r['snr'] is None else ' at %s dB' % r['snr']}: {r['error']}" for r in results if r["error"]]
    summ = {g: {d: {m: _summary(v) for m, v in dm.items()} for d, dm in gd.items()} for g, gd in rows.items()}
    paired = {}
    for g in (g for g in PAIRED_GROUPS if g in by_record and "biod" in by_record[g]):
        cells = {p: paired_f1(by_record[g], "biod", p) for p in PEERS if p in by_record[g]}
        if any(cells.values()):
            paired[g] = {p: c for p, c in cells.items() if c}

    order = ["mitdb", "mitdb_paced", "ludb_I", "ludb_II", "ludb_III", "ludb_I+II+III",
             "ludb_I_nonpaced", "ludb_II_nonpaced", "ludb_III_nonpaced", "ludb_I+II+III_nonpaced",
             "ludb_fused_vs_I",
             "ludb_fused_vs_II", "ludb_fused_vs_III", "overall"]
    groups = [g for g in order if g in summ]
    cmd = "python -m training.eval rpeaks " + " ".join(argv if argv is not None else sys.argv[1:])
    unmarked = ludb_unmarked_edges(series)
    counts = {g: len({series[r['series']].name for r in results if r["snr"] is None and
                      (series[r['series']].dataset == g)}) for g in ("mitdb", "mitdb_paced", "ludb_I", "ludb_fused")}
    notes = [
        f"Command: `{cmd}`  ",
        f"Data folder: `{args.data.resolve()}`; date {_dt.date.today().isoformat()}; wall time {wall:.0f} s "
        f"with {args.workers} worker(s).  ",
        f"Records: MIT-BIH {counts['mitdb']} non-paced + {counts['mitdb_paced']} paced"
        f"{' (first 300 s each, --quick)' if args.quick else ''}; LUDB {counts['ludb_fused']} records.  ",
        "Match: one-to-one within +-75 ms. Every detector gets the same raw mV signal (no common "
        "pre-filter; each does its own filtering). 'corrected' = each detection moved to the largest "
        "|5-20 Hz zero-phase band-pass| within +-75 ms (as shared/BASELINES.md); 'raw' = as emitted.  ",
        "MIT-BIH: beat annotations only; paced records separate; flutter/fibrillation episodes "
        "('[' .. ']') not scored. LUDB: per-lead cardiologist QRS marks, scored between the first and "
        f"last mark of the lead +-75 ms (LUDB leaves complexes at the record edges unmarked: here the first lead-I mark "
        f"comes more than one median RR + 100 ms after the start in {unmarked[0]} of {unmarked[2]} records, and the "
        f"last mark as long before the end in {unmarked[1]}); "
        "'fused' = biod on leads I+II+III together (one detection per beat), each lead's marks against "
        "that lead's own R of each beat (its extremum within +-50 ms of the beat's R, in the lead's "
        "running polarity); '_nonpaced' leaves out the LUDB records whose diagnoses mention pacing (scored "
        "apart, as MIT-BIH's paced records are). 'overall' = MIT-BIH (incl. paced) + LUDB I, II, III pooled.  ",
        f"Noise stress: first {noise_s:.0f} s of every non-paced MIT-BIH record + generated baseline "
        "wander, muscle-like and motion-like bursts in equal power (training/eval/noise.py, fixed seeds); "
        "generated because no noise-stress recordings are available.  ",
        ("Peers' detections were read from the --cache folder where an earlier run of the same "
         "command stored them (they do not depend on biod); biod always runs.  " if args.cache else ""),
        "Speed (x real time, one core, clean records): " + ", ".join(
            f"{LABELS[d]} {np.median(v):.0f}x" for d, v in speed.items()),
    ]
    md = ["# R-peak detection benchmark", "", "Generated by `training/eval/rpeaks.py`; do not edit by hand.", ""]
    md += notes + [""]
    md += _headline(summ)
    md += _table("Clean recordings", summ, groups, "corrected")
    md += _table("Clean recordings", summ, groups, "raw")
    md += _noise_table(summ)
    md += _paired_table(paired)
    if errors:
        md += ["Peer failures (scored as no detections on that signal):", ""]
        md += [f"- {e}" for e in errors] + [""]
    md += ["![example](rpeaks_example.png)", ""]
    text = "\n".join(md)
    print(text)
    if args.md and str(args.md) not in ("", "."):
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    if args.plot and str(args.plot) not in ("", "."):
        _plot(series, args.plot, noise_s)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": cmd, "data": str(args.data.resolve()), "date": _dt.date.today().isoformat(),
            "wall_s": wall, "tolerance_ms": TOL_S * 1000, "snr_db": list(SNRS_DB), "noise_seconds": noise_s,
            "ludb_records_with_unmarked_edges": list(unmarked),
            "summary": summ, "paired_f1_biod_minus_peer": paired, "per_record": per_record, "peer_errors": errors,
            "speed_x_realtime": {d: float(np.median(v)) for d, v in speed.items()},
        }, separators=(",", ":")))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
