"""Impulsive spikes: samples that leap further from the lead's last sample than any heart can.

WHY: an electrostatic discharge, a knocked cable or a bit error in the front end puts a single
sample (or a few) tens to hundreds of mV away from the ECG, within the range a front end can
produce (so the ``max_abs_mv`` check lets it through). Filtered as it comes, one 400 mV sample
raised the R-peak detector's signal level so far that it missed beats for 10 s after it
(LUDB record 3 of tests/fixtures/ecg_pipeline, measured once with a throw-away script;
tests/test_dsp_robustness.py fails on the code before this gate). No ECG moves by
``step_mv`` (50 mV) between two samples: on every recording in ../shared/data the largest
step between consecutive samples is 2.5 mV (ECG-ID), 0.8 mV (LUDB) and 0.6 mV (MIT-BIH), apart
from two ECG-ID recordings whose amplifier hits its rail (-153.6 mV) (measured once with a
throw-away script; tests/test_dsp_robustness.py holds the real fixtures to no spike at all). So such samples are
marked, and the pipeline holds them exactly like impossible ones. An excursion longer than
``max_s`` is a real step (a new electrode offset, a rail): from then on it is signal again, as
it was before this gate existed.

Chunk-invariant: the last accepted value and the length of the excursion in progress carry
over. The common case (no step beyond ``step_mv`` between consecutive samples, no excursion in
progress) is a vectorised check; the per-sample walk runs only for a lead that has one.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SpikeGate"]


class SpikeGate:
    """``mark(x, valid, sane)`` -> bool (n, n_leads), True where a sample is a spike."""

    def __init__(self, n_leads: int, fs: float, step_mv: float = 50.0, max_s: float = 0.01) -> None:
        if not step_mv > 0 or not max_s > 0:
            raise ValueError(f"step_mv and max_s must be > 0, got {step_mv}, {max_s}")
        self.step = float(step_mv)
        self.max_len = max(1, int(round(max_s * fs)))
        self._ref = np.full(n_leads, np.nan)      # last accepted sample per lead; nan: none yet / lead off
        self._run = np.zeros(n_leads, dtype=int)  # samples of the excursion in progress

    def mark(self, x: np.ndarray, valid: np.ndarray, sane: np.ndarray) -> np.ndarray:
        """``x`` (n, L) mV; ``valid`` (n, L) the lead is on; ``sane`` (n, L) the sample is
        possible at all (impossible ones are held elsewhere and neither judged nor accepted)."""
        n, n_leads = x.shape
        out = np.zeros((n, n_leads), dtype=bool)
        if n == 0:
            return out
        ok = valid & sane
        if ok.all() and not self._run.any():  # the usual push: every sample possible, every lead on
            with np.errstate(invalid="ignore"):
                if (np.abs(x[0] - self._ref) <= self.step).all() or not np.isfinite(self._ref).any():
                    if n == 1 or np.abs(np.diff(x, axis=0)).max() <= self.step:
                        self._ref = x[-1].astype(np.float64)
                        return out
        rows = np.arange(n)[:, None]
        cols = np.arange(n_leads)
        # per sample, the last accepted value before it as the walk would hold it (the lead's
        # last possible sample; nan after the lead was off): any leap from it means a walk
        last_ok = np.maximum.accumulate(np.where(ok, rows, -1), axis=0)
        last_off = np.maximum.accumulate(np.where(valid, -1, rows), axis=0)
        ok_before = np.concatenate([np.full((1, n_leads), -1), last_ok[:-1]])
        off_before = np.concatenate([np.full((1, n_leads), -1), last_off[:-1]])
        prev = np.where(ok_before >= 0, x[np.maximum(ok_before, 0), cols], self._ref)
        prev = np.where(off_before > ok_before, np.nan, prev)
        with np.errstate(invalid="ignore"):
            leap = ok & (np.abs(x - prev) > self.step)  # nan: no reference, no leap
        slow = leap.any(axis=0) | (self._run > 0)
        for j in np.flatnonzero(slow):
            self._walk(x[:, j], valid[:, j], ok[:, j], out[:, j], j)
        fast = ~slow
        if fast.any():  # the walk's end state without walking: the last accepted value, or none
            ref = np.where(last_ok[-1] >= 0, x[np.maximum(last_ok[-1], 0), cols], self._ref)
            ref = np.where(last_off[-1] > last_ok[-1], np.nan, ref)
            self._ref = np.where(fast, ref, self._ref)
        return out

    def _walk(self, x: np.ndarray, valid: np.ndarray, ok: np.ndarray, out: np.ndarray, j: int) -> None:
        ref, run = float(self._ref[j]), int(self._run[j])
        for i in range(x.shape[0]):
            if not valid[i]:
                ref, run = float("nan"), 0
            elif ok[i]:
                xi = float(x[i])
                if ref == ref and abs(xi - ref) > self.step and run < self.max_len:
                    out[i] = True
                    run += 1
                else:
                    ref, run = xi, 0
        self._ref[j], self._run[j] = ref, run
