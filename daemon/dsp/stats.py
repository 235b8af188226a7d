"""Medians with numpy's exact arithmetic but without its per-call overhead.

The DSP calls medians on tiny arrays for every beat and window, where ``np.median``'s dispatch
costs more than the work. These give the same bits as ``np.median`` (the middle element, or the
mean of the two middle ones summed from +0.0, so ties of -0.0/+0.0 come out as numpy's);
``tests/test_dsp_exact_fastpaths.py`` holds them to it.
"""
from __future__ import annotations

import numpy as np


def median(v: np.ndarray) -> float:
    """``float(np.median(v))`` of a short 1-d array, sorted as a Python list (it runs for every
    window's handful of beat correlations, where even ``np.sort`` costs more than the work):
    the same middle value(s), +0.0 added as numpy's mean does (-0.0 -> +0.0), and the mean of
    two computed in ``v``'s own dtype, as numpy does."""
    v = np.asarray(v)
    s = v.tolist()
    s.sort()
    n = len(s)
    if n % 2:
        return s[n // 2] + 0.0
    t = v.dtype.type
    return float(((t(0.0) + t(s[n // 2 - 1])) + t(s[n // 2])) / t(2.0))


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


# Median-selection networks (compare-exchange pairs; the median ends in the middle slot),
# checked exhaustively by tests/test_dsp_exact_fastpaths.py (0-1 principle: all binary inputs).
_MEDIAN_NETWORKS = {
    3: ((0, 1), (1, 2), (0, 1)),
    5: ((0, 1), (3, 4), (0, 3), (1, 4), (1, 2), (2, 3), (1, 2)),
    7: ((0, 5), (0, 3), (1, 6), (2, 4), (0, 1), (3, 5), (2, 6), (2, 3), (3, 6), (4, 5), (1, 4),
        (1, 3), (3, 4)),
}


def median_filter_nearest(x: np.ndarray, size: int, axis: int = 0) -> np.ndarray:
    """``scipy.ndimage.median_filter(x, size=(size, 1), mode="nearest")`` for finite (n, ch) data;
    with ``axis=1``, the same filter along axis 1 of (k, n, ch) data (k independent signals,
    each filtered exactly as on its own).

    The R-peak refinement despikes half a second around every beat: scipy's rank filter spends
    more on its set-up than on a few hundred samples, while 7 shifted views through a
    13-exchange median network cost 26 element-wise min/max calls. Sizes without a network fall back
    to scipy. A median is one of its inputs, so the values are exactly scipy's (of tied -0.0 and
    +0.0 either zero may come out).
    """
    net = _MEDIAN_NETWORKS.get(size)
    n = x.shape[axis]
    if net is None or n < size:
        from scipy.ndimage import median_filter

        fsize = [1] * x.ndim
        fsize[axis] = size
        return median_filter(x, size=tuple(fsize), mode="nearest")
    h = size // 2
    if axis == 0:
        p = np.concatenate([np.repeat(x[:1], h, axis=0), x, np.repeat(x[-1:], h, axis=0)])
        v = [p[i:i + n] for i in range(size)]
    else:
        p = np.concatenate([np.repeat(x[:, :1], h, axis=1), x, np.repeat(x[:, -1:], h, axis=1)],
                           axis=1)
        v = [p[:, i:i + n] for i in range(size)]
    for a, b in net:
        v[a], v[b] = np.minimum(v[a], v[b]), np.maximum(v[a], v[b])
    return v[h]
