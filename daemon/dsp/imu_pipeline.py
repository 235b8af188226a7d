"""Streaming IMU path: raw MetaWear-style samples -> SI, fixed rate, windows, ACF features, gait.

The same :class:`ImuPipeline` feeds the daemon (``push`` per BLE batch) and training
(:func:`imu_windows_from_record`), so models see exactly the features the hub computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.dsp.imu import (GaitState, ImuResampler, acf_feature_size, acf_features_batch,
                            clip_fraction, detect_gait, to_si)
from daemon.dsp.segment import SlidingWindower


@dataclass(frozen=True)
class ImuWindow:
    """t_end_s: timestamp of the last sample; data (n, 6) float32 [acc m/s², gyro rad/s];
    features: ACF features (see daemon.dsp.imu); gait over the last ``gait_window_s``;
    clipped: some axis sits on the sensor's full-scale rails for > 1 % of the window."""

    t_end_s: float
    data: np.ndarray
    features: np.ndarray
    gait: GaitState
    clipped: bool


@dataclass(frozen=True)
class ImuUpdate:
    windows: tuple[ImuWindow, ...]
    gaps: int  # gaps (> max_gap_s without samples) seen so far; never bridged


NOT_WALKING = GaitState(False, None, 0.0)


class ImuPipeline:
    """push(t_s (n,), acc_g (n,3), gyro_dps (n,3)) -> ImuUpdate. Chunk-invariant.

    ``acc_range_g`` / ``gyro_range_dps``: the sensor's configured full scale; when given, windows
    whose samples sit on the rails are flagged ``clipped`` (e.g. HuGaDB's corrupted gyro files).
    """

    def __init__(self, fs_out: float = 100.0, window_s: float = 2.0, hop_s: float = 1.0,
                 max_lag: int = 10, variant: str = "biodeep", gait_window_s: float = 4.0,
                 max_gap_s: float = 0.5, acc_range_g: float | None = None,
                 gyro_range_dps: float | None = None) -> None:
        self.fs_out = float(fs_out)
        self.window_len = int(round(window_s * fs_out))
        self.hop = int(round(hop_s * fs_out))
        self.gait_len = max(int(round(gait_window_s * fs_out)), self.window_len)
        self.max_lag = int(max_lag)
        self.variant = variant
        acf_feature_size(max_lag, variant)
        self._clip_level = None
        if acc_range_g is not None or gyro_range_dps is not None:
            big = np.float32(np.inf)
            self._clip_level = np.array(
                [acc_range_g * 9.80665 if acc_range_g else big] * 3
                + [np.deg2rad(gyro_range_dps) if gyro_range_dps else big] * 3, dtype=np.float32)
        self._resampler = ImuResampler(fs_out, 6, max_gap_s)
        self._start_run(0.0)

    def _start_run(self, anchor: float) -> None:
        self._windower = SlidingWindower(6, self.window_len, self.hop)
        self._anchor = anchor
        self._hist = np.zeros((0, 6), dtype=np.float32)
        self._hist_start = 0

    def push(self, t_s: np.ndarray, acc_g: np.ndarray, gyro_dps: np.ndarray) -> ImuUpdate:
        si = to_si(acc_g, gyro_dps)
        out: list[ImuWindow] = []
        for t_grid, y, continues in self._resampler.push(t_s, si):
            if not continues:
                self._start_run(float(t_grid[0]) if t_grid.size else self._resampler.anchor)
            if y.shape[0]:
                out += self._windows(y)
        return ImuUpdate(tuple(out), self._resampler.gaps)

    def _windows(self, y: np.ndarray) -> list[ImuWindow]:
        self._hist = np.concatenate([self._hist, y])
        ends, wins, _ = self._windower.push(y)
        res: list[ImuWindow] = []
        if ends.size:
            feats = acf_features_batch(wins, self.max_lag, self.variant, self.fs_out)
            if self._clip_level is not None:
                clipped = ((np.abs(wins) >= 0.98 * self._clip_level).mean(axis=1) > 0.01).any(1)
            else:
                clipped = np.zeros(ends.size, dtype=bool)
            for k, end in enumerate(ends):
                a = max(int(end) - self.gait_len, 0) - self._hist_start
                acc = self._hist[a:int(end) - self._hist_start, :3]
                try:
                    gait = detect_gait(acc, self.fs_out)
                except ValueError:  # not yet enough history at the start of a run
                    gait = NOT_WALKING
                res.append(ImuWindow(self._anchor + (int(end) - 1) / self.fs_out, wins[k],
                                     feats[k], gait, bool(clipped[k])))
        keep_from = self._windower.total - self.gait_len
        if keep_from > self._hist_start:
            self._hist = self._hist[keep_from - self._hist_start:]
            self._hist_start = keep_from
        return res


def imu_windows_from_record(t_s: np.ndarray, acc_g: np.ndarray, gyro_dps: np.ndarray,
                            chunk: int | None = None, **kwargs) -> list[ImuWindow]:
    """Batch helper for training: the streaming pipeline over a whole record."""
    pipe = ImuPipeline(**kwargs)
    n = len(t_s)
    step = int(chunk) if chunk else max(n, 1)
    out: list[ImuWindow] = []
    for s in range(0, n, step):
        out += pipe.push(t_s[s:s + step], acc_g[s:s + step], gyro_dps[s:s + step]).windows
    return out


__all__ = ["ImuPipeline", "ImuUpdate", "ImuWindow", "imu_windows_from_record", "clip_fraction"]
