"""Real IMU recordings that drive the MetaMotion emulator.

Why: an emulator that streams synthetic sines would let DSP and model bugs hide; these are short
excerpts of SisFall v1.0 (waist ADXL345 + ITG3200, 100 Hz) so everything downstream sees real gait.
See README.md beside this file for attribution and the unit conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

STANDARD_GRAVITY_MS2 = 9.80665
FIXTURE_PATH = Path(__file__).with_name("sisfall_excerpts.npz")

__all__ = ["ImuRecording", "load_imu_recording", "list_imu_recordings", "FIXTURE_PATH"]


@dataclass(frozen=True, eq=False)
class ImuRecording:
    """One real IMU excerpt in chip units (g, °/s), float32, shape (n, 3) each."""

    name: str
    fs_hz: float
    acc_g: np.ndarray = field(repr=False)
    gyro_dps: np.ndarray = field(repr=False)
    person: str
    activity: str
    source: str

    @property
    def n_samples(self) -> int:
        return int(self.acc_g.shape[0])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.fs_hz

    @property
    def acc_ms2(self) -> np.ndarray:
        """Acceleration in SI units (m/s²)."""
        return (self.acc_g * np.float32(STANDARD_GRAVITY_MS2)).astype(np.float32)

    @property
    def gyro_rads(self) -> np.ndarray:
        """Angular rate in SI units (rad/s)."""
        return np.deg2rad(self.gyro_dps).astype(np.float32)


@lru_cache(maxsize=1)
def _archive() -> dict[str, np.ndarray]:
    with np.load(FIXTURE_PATH, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def list_imu_recordings() -> tuple[str, ...]:
    """Names accepted by :func:`load_imu_recording`, e.g. ``'SA01_D01_walking'``."""
    return tuple(sorted({k.split("/")[0] for k in _archive() if "/" in k}))


def load_imu_recording(name: str = "SA01_D01_walking") -> ImuRecording:
    """Load one excerpt by name; raises ``KeyError`` naming the valid choices."""
    arc = _archive()
    if f"{name}/acc_g" not in arc:
        raise KeyError(f"unknown IMU recording {name!r}; choose one of {list_imu_recordings()}")
    person, code, label, source = (str(x) for x in arc[f"{name}/meta"])
    acc = arc[f"{name}/acc_g"].astype(np.float32, copy=True)
    gyro = arc[f"{name}/gyro_dps"].astype(np.float32, copy=True)
    acc.setflags(write=False)
    gyro.setflags(write=False)
    return ImuRecording(
        name=name,
        fs_hz=float(arc["fs_hz"]),
        acc_g=acc,
        gyro_dps=gyro,
        person=person,
        activity=f"{code} {label}",
        source=source,
    )
