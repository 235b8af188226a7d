"""Streaming IMU path: raw MetaWear-style samples -> SI, fixed rate, windows, ACF features, gait.

The same :class:`ImuPipeline` feeds the daemon (``push`` per BLE batch) and training
(:func:`imu_windows_from_record`), so models see exactly the features the hub computes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import signal

from daemon.dsp.imu import (GaitState, ImuResampler, acf_feature_size, acf_features_batch,
                            clip_fraction, detect_gait, to_si)
from daemon.dsp.filters import SosFilter
from daemon.dsp.segment import SlidingWindower

log = logging.getLogger(__name__)


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
    ``input_hz``: the sensor's sample rate. Above ``fs_out`` the samples are low-pass filtered
    first (``ANTI_ALIAS``): the resampler interpolates linearly, and the MetaWear boards' own
    filters at 200–800 Hz pass far above the 50 Hz the model rate can hold, which would fold into
    the gait band (a 130 Hz vibration came out as a full-size 30 Hz movement). At or below
    ``fs_out`` (the rates every model was trained at) nothing is filtered.
    """

    ANTI_ALIAS = (6, 0.4)  # Butterworth order, cut-off as a fraction of fs_out (40 Hz at 100 Hz)

    def __init__(self, fs_out: float = 100.0, window_s: float = 2.0, hop_s: float = 1.0,
                 max_lag: int = 10, variant: str = "biodeep", gait_window_s: float = 4.0,
                 max_gap_s: float = 0.5, acc_range_g: float | None = None,
                 gyro_range_dps: float | None = None, input_hz: float | None = None) -> None:
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
        self.max_gap_s = float(max_gap_s)
        self._anti_alias = self.anti_alias(input_hz, self.fs_out)
        self._t_last: float | None = None
        self._start_run(0.0)

    @classmethod
    def anti_alias(cls, input_hz: float | None, fs_out: float) -> SosFilter | None:
        """The low-pass applied before resampling a faster sensor down to ``fs_out`` (None when
        it is not faster). One definition: training's loaders filter recordings with it, so a
        model fine-tuned on 400 Hz recordings sees what the daemon serves."""
        if input_hz is None or input_hz <= fs_out * 1.001:
            return None
        order, frac = cls.ANTI_ALIAS
        return SosFilter(signal.butter(order, frac * fs_out, fs=float(input_hz), output="sos"), 6)

    def _start_run(self, anchor: float) -> None:
        self._windower = SlidingWindower(6, self.window_len, self.hop)
        self._anchor = anchor
        self._hist = np.zeros((0, 6), dtype=np.float32)
        self._hist_start = 0

    def push(self, t_s: np.ndarray, acc_g: np.ndarray, gyro_dps: np.ndarray) -> ImuUpdate:
        si = to_si(acc_g, gyro_dps)
        if self._anti_alias is not None:
            si = self._low_pass(np.asarray(t_s, dtype=np.float64).reshape(-1), si)
        out: list[ImuWindow] = []
        for t_grid, y, continues in self._resampler.push(t_s, si):
            if not continues:
                self._start_run(float(t_grid[0]) if t_grid.size else self._resampler.anchor)
            if y.shape[0]:
                out += self._windows(y)
        return ImuUpdate(tuple(out), self._resampler.gaps)

    def _low_pass(self, t: np.ndarray, si: np.ndarray) -> np.ndarray:
        """The anti-alias filter, restarted after every gap the resampler will not bridge (the
        samples either side of one are not one signal)."""
        assert self._anti_alias is not None
        if t.size == 0:
            return si
        prev = np.concatenate([[self._t_last if self._t_last is not None else -np.inf], t[:-1]])
        starts = np.flatnonzero(t - prev > self.max_gap_s)
        bounds = np.concatenate([[0], starts, [t.size]])
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a in starts:
                self._anti_alias.reset()
            if b > a:
                parts.append(self._anti_alias.process(si[a:b]))
        self._t_last = float(t[-1])
        return np.concatenate(parts) if parts else si

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


class SensorImuPipeline:
    """The pipeline as the daemon and ``biod calibrate`` run it on a live sensor: built from the
    IMU configuration, and started again when a chunk cannot follow the last one.

    Why: ``ImuPipeline.push`` refuses times that go backwards, rightly, but on a hub that must not
    end IMU processing for the rest of the run (and, through the watchdog, restart the ECG side
    too). The source keeps its times increasing; should anything still break the time line, the
    windows in progress are dropped, the error is logged, and processing goes on.
    """

    def __init__(self, acc_range_g: float, gyro_range_dps: float, odr_hz: float) -> None:
        self._kwargs = dict(acc_range_g=acc_range_g, gyro_range_dps=gyro_range_dps, input_hz=odr_hz)
        self.pipeline = ImuPipeline(**self._kwargs)
        self.restarts = 0
        self._gaps_before = 0  # gaps counted by the pipelines before this one (+1 per restart)
        self._gaps = 0

    def push(self, t_s: np.ndarray, acc_g: np.ndarray, gyro_dps: np.ndarray) -> ImuUpdate:
        try:
            update = self.pipeline.push(t_s, acc_g, gyro_dps)
        except ValueError as exc:
            log.error("imu: %s; IMU processing starts again from the next chunk", exc)
            self.restarts += 1
            self._gaps_before += self._gaps + 1
            self._gaps = 0
            self.pipeline = ImuPipeline(**self._kwargs)
            return ImuUpdate((), self._gaps_before)
        self._gaps = update.gaps
        return ImuUpdate(update.windows, update.gaps + self._gaps_before)


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


__all__ = ["ImuPipeline", "SensorImuPipeline", "ImuUpdate", "ImuWindow", "imu_windows_from_record", "clip_fraction"]
