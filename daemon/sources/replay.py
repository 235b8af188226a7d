"""Replay of recorded files: a household's own ``biod record`` output (WFDB) played through the
emulated devices, at 1x or faster.

WHY through the emulators: a replay then takes exactly the path live data takes (the box's
wire protocol on a pseudo-terminal, the MetaWear notifications through the BLE source), so what
a replay shows is what the hub would have done live, sample clock and lead-off handling included.

What the box said about its samples comes back as the box would have said it. ``biod record``
stores a lead whose electrode was off as WFDB's "no sample", frames lost on the link as "no
sample" on every lead under a ``gap samples A-B`` note, and a reconnect as a ``reconnected
before sample N`` note. :func:`ecg_recording` turns those into the recording's per-sample
electrode-off bits and link gaps, which the emulated box plays as lead-off bits in the frames
that hold such samples (a frame carries one set of bits, so a lead counts off for the whole frame
when it is off on any of its samples: with the box's and the emulator's 10 samples a frame, the
same frames as live) and by dropping the frames of a recorded gap, so the host sees the same
sequence-number gap, and the daemon the same ``lost_frames_before``, as live. A reconnect plays
as one frame with every electrode off (what made the daemon start its DSP afresh live cannot be
replayed on one link). Records made before these markers existed have none, and play as before.
IMU gaps are not replayed: the IMU record's samples are joined at its ``gap before sample N``
notes.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from daemon.config import ConfigError
from daemon.record import WfdbError, imu_record_problem, read_wfdb
from firmware_protocol.ecg_serial import LEAD_NAMES, Electrode
from firmware_protocol.emulators.imu_recordings import ImuRecording
from firmware_protocol.emulators.recordings import Recording

__all__ = ["ecg_recording", "imu_recording"]

_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}
# Each electrode and the leads (I, II, III) it belongs to: an electrode is off exactly when
# every lead through it is invalid, which is how the box's bits map to leads (I = LA-RA ...).
_ELECTRODE_LEADS = ((Electrode.RA, (0, 1)), (Electrode.LA, (0, 2)), (Electrode.LL, (1, 2)))
_GAP_NOTE = re.compile(r"gap samples (\d+)-(\d+)\b")
_RECONNECT_NOTE = re.compile(r"reconnected before sample (\d+)\b")


def _read(path: Path, key: str):
    try:
        return read_wfdb(path)
    except WfdbError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _derive_single_missing_lead(leads: np.ndarray, valid: np.ndarray) -> None:
    """Where exactly one lead of three is missing, compute it from the other two (III = II - I).

    WHY: the box's lead-off bits name electrodes, and no electrode set turns off one lead only;
    such a record (a two-channel box measures I and II, never III) cannot be played as it was.
    The missing lead is the difference of the other two by its definition, so deriving it adds
    nothing that was not measured, where marking a second lead off would drop measured signal."""
    one = valid.sum(axis=1) == 2
    if not one.any():
        return
    i, ii, iii = leads[:, 0], leads[:, 1], leads[:, 2]
    for k, derived in ((0, ii - iii), (1, i + iii), (2, ii - i)):
        at = one & ~valid[:, k]
        leads[at, k] = derived[at]
        valid[at, k] = True


def _expressible(present: np.ndarray) -> np.ndarray:
    """``present`` as the emulator's fixed lead-off bits can say it: exactly two leads present
    cannot be said (see :func:`_derive_single_missing_lead`), so such a record is all present,
    and its per-sample ``lead_valid`` says which leads are off when."""
    return np.ones(3, bool) if present.sum() == 2 else present


def ecg_recording(path: Path, key: str = "ecg.replay.path") -> Recording:
    """Leads I, II, III of a WFDB record (signal names I/II/III, any case; absent leads are
    reported off by the replayed box), in mV at the record's own rate, with the lead validity
    and link gaps ``biod record`` stored (see the module's docstring)."""
    rec = _read(path, key)
    names = [n.upper() for n in rec.names]
    n = rec.physical.shape[0]
    leads = np.zeros((n, 3), np.float32)
    valid = np.zeros((n, 3), bool)
    named = np.zeros(3, bool)
    for k, lead in enumerate(LEAD_NAMES):
        if lead not in names:
            continue
        i = names.index(lead)
        scale = _TO_MV.get(rec.signals[i].unit.lower())
        if scale is None:
            raise ConfigError(f"{key}: {rec.path}: lead {lead} is in {rec.signals[i].unit!r}; expected mV, uV or V")
        x = rec.physical[:, i] * scale
        valid[:, k] = np.isfinite(x)
        leads[:, k] = np.where(valid[:, k], x, 0.0)  # what the replayed box sends while the lead is off
        named[k] = True
    if not named.any():
        raise ConfigError(f"{key}: {rec.path} has no lead named I, II or III (signals: {', '.join(rec.names)}); "
                          "replay an ECG record made by `biod record`")
    if rec.fs_hz != int(rec.fs_hz) or len(leads) < 2 * rec.fs_hz:
        raise ConfigError(f"{key}: {rec.path}: need an integer sampling rate and at least 2 s of ECG")
    _derive_single_missing_lead(leads, valid)
    link_gap = np.zeros(n, bool)
    for comment in rec.comments:
        if m := _GAP_NOTE.match(comment):
            link_gap[int(m.group(1)):int(m.group(2))] = True
        elif (m := _RECONNECT_NOTE.match(comment)) and int(m.group(1)) < n:
            valid[int(m.group(1))] = False  # one frame with every electrode off: not a silent splice
    valid[link_gap] = False
    present = valid.any(axis=0)
    if not present.any():
        raise ConfigError(f"{key}: {rec.path}: every sample of leads {', '.join(np.array(LEAD_NAMES)[named])} is "
                          "WFDB 'no sample' (the electrodes were off for the whole recording): nothing to replay")
    fields = rec.comment_fields()
    plain = valid.all() and not link_gap.any()
    return Recording(name=rec.path.stem, fs_hz=int(rec.fs_hz), leads_mv=leads, lead_present=_expressible(present),
                     person=fields.get("person", ""), dataset="biod record", source=str(rec.path), date="",
                     lead_off_bits=None if plain else _electrodes_off(valid), link_gap=None if plain else link_gap)


def _electrodes_off(valid: np.ndarray) -> np.ndarray:
    """uint8 (n,) lead-off bits per sample from bool (n, 3) lead validity (an electrode is off
    where every lead through it is invalid)."""
    off = np.zeros(len(valid), np.uint8)
    for electrode, (a, b) in _ELECTRODE_LEADS:
        off[~valid[:, a] & ~valid[:, b]] |= int(electrode)
    return off


def imu_recording(path: Path, key: str = "imu.replay.path") -> ImuRecording:
    """Accelerometer (g) and gyroscope (deg/s) of an IMU record made by ``biod record``."""
    rec = _read(path, key)
    problem = imu_record_problem(rec)
    if problem:
        raise ConfigError(f"{key}: {rec.path}: {problem}")
    if rec.physical.shape[0] < 2:
        raise ConfigError(f"{key}: {rec.path} holds fewer than 2 samples")
    if not rec.valid.all():
        first = int(np.argmin(rec.valid.all(axis=1)))
        raise ConfigError(f"{key}: {rec.path} holds WFDB 'no sample' values (first at sample {first}); "
                          "`biod record` never writes them in an IMU record: replay an IMU record it made")
    x = rec.physical.astype(np.float32)
    fields = rec.comment_fields()
    return ImuRecording(name=rec.path.stem, fs_hz=rec.fs_hz, acc_g=x[:, :3].copy(), gyro_dps=x[:, 3:].copy(),
                        person=fields.get("person", ""), activity="", source=str(rec.path))
