"""Replay of recorded files: a household's own ``biod record`` output (WFDB) played through the
emulated devices, at 1x or faster.

WHY through the emulators: a replay then takes exactly the path live data takes (the box's
wire protocol on a pseudo-terminal, the MetaWear notifications through the BLE source), so what
a replay shows is what the hub would have done live, sample clock and lead-off handling included.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.config import ConfigError
from daemon.record import WfdbError, imu_record_problem, read_wfdb
from firmware_protocol.ecg_serial import LEAD_NAMES
from firmware_protocol.emulators.imu_recordings import ImuRecording
from firmware_protocol.emulators.recordings import Recording

_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}


def _read(path: Path, key: str):
    try:
        return read_wfdb(path)
    except WfdbError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def ecg_recording(path: Path, key: str = "ecg.replay.path") -> Recording:
    """Leads I, II, III of a WFDB record (signal names I/II/III, any case; absent leads are
    reported off by the replayed box), in mV at the record's own rate."""
    rec = _read(path, key)
    names = [n.upper() for n in rec.names]
    leads = np.zeros((rec.physical.shape[0], 3), np.float32)
    present = np.zeros(3, bool)
    for k, lead in enumerate(LEAD_NAMES):
        if lead not in names:
            continue
        i = names.index(lead)
        scale = _TO_MV.get(rec.signals[i].unit.lower())
        if scale is None:
            raise ConfigError(f"{key}: {rec.path}: lead {lead} is in {rec.signals[i].unit!r}; expected mV, uV or V")
        leads[:, k] = rec.physical[:, i] * scale
        present[k] = True
    if not present.any():
        raise ConfigError(f"{key}: {rec.path} has no lead named I, II or III (signals: {', '.join(rec.names)}); "
                          "replay an ECG record made by `biod record`")
    if rec.fs_hz != int(rec.fs_hz) or len(leads) < 2 * rec.fs_hz:
        raise ConfigError(f"{key}: {rec.path}: need an integer sampling rate and at least 2 s of ECG")
    fields = rec.comment_fields()
    return Recording(name=rec.path.stem, fs_hz=int(rec.fs_hz), leads_mv=leads, lead_present=present,
                     person=fields.get("person", ""), dataset="biod record", source=str(rec.path), date="")


def imu_recording(path: Path, key: str = "imu.replay.path") -> ImuRecording:
    """Accelerometer (g) and gyroscope (deg/s) of an IMU record made by ``biod record``."""
    rec = _read(path, key)
    problem = imu_record_problem(rec)
    if problem:
        raise ConfigError(f"{key}: {rec.path}: {problem}")
    if rec.physical.shape[0] < 2:
        raise ConfigError(f"{key}: {rec.path} holds fewer than 2 samples")
    x = rec.physical.astype(np.float32)
    fields = rec.comment_fields()
    return ImuRecording(name=rec.path.stem, fs_hz=rec.fs_hz, acc_g=x[:, :3].copy(), gyro_dps=x[:, 3:].copy(),
                        person=fields.get("person", ""), activity="", source=str(rec.path))
