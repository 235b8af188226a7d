"""Medians with numpy's exact arithmetic but without its per-call overhead.

The DSP calls medians on tiny arrays for every beat and window, where ``np.median``'s dispatch
costs more than the work. These give the same bits as ``np.median`` (the middle element, or the
mean of the two middle ones summed from +0.0, so ties of -0.0/+0.0 come out as numpy's);
``tests/test_dsp_exact_fastpaths.py`` holds them to it.
"""
from __future__ import annotations

import numpy as np


def median(v: np.ndarray) -> float:
    """``float(np.median(v))`` of a short 1-d array."""
    v = np.sort(v)
    n = v.size
    if n % 2:
        return float(v[n // 2] + 0.0)  # numpy's mean sums from +0.0 (-0.0 -> +0.0)
    return float(((0.0 + v[n // 2 - 1]) + v[n // 2]) / 2.0)


def median_axis0(a: np.ndarray) -> np.ndarray:
    """``np.median(a, axis=0)`` for finite data, via one partition."""
    n = a.shape[0]
    h = n // 2
    if n == 0:
        return np.median(a, axis=0)
    # numpy's kth (-1 included) and its mean's sum from +0.0
    if n % 2:
        return np.partition(a, (h, -1), axis=0)[h] + 0.0
    p = np.partition(a, (h - 1, h, -1), axis=0)
    return ((0.0 + p[h - 1]) + p[h]) / 2.0
