"""Short real ECG recordings shipped with the emulator (see README.md here for attribution).

Each ``<name>.npz`` holds int16 ADC counts in the source dataset's own units plus the per-lead
gain, so nothing is resampled or re-quantised on the way in; :func:`load_recording` converts to
millivolts. Why ship them in the package: the emulator, the tests and the demo must run on a hub
or in CI without ``../shared/data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Recording", "list_recordings", "load_recording"]

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recording:
    """One recording as Einthoven leads I, II, III.

    ``leads_mv[:, c]`` is meaningful only where ``lead_present[c]``; absent leads are zeros
    (ECG-ID has lead I only), and the emulator reports their electrode as off.

    A household's own recording (``biod record``, read by ``daemon.sources.replay``) also says
    what the box said over time: ``lead_off_bits`` (uint8 (n,), the box's electrode-off bits per
    sample) and ``link_gap`` (bool (n,), samples whose frames were lost on the link). The
    emulator plays them frame by frame; None for the shipped datasets' recordings.
    """

    name: str
    fs_hz: int
    leads_mv: np.ndarray  # float32 (n, 3)
    lead_present: np.ndarray  # bool (3,)
    person: str
    dataset: str
    source: str
    date: str  # recording date as the dataset gives it ("" when the dataset has none)
    lead_off_bits: np.ndarray | None = None
    link_gap: np.ndarray | None = None

    @property
    def duration_s(self) -> float:
        return self.leads_mv.shape[0] / self.fs_hz


def list_recordings() -> list[str]:
    """Names accepted by :func:`load_recording`, sorted."""
    return sorted(p.stem for p in _HERE.glob("*.npz"))


def load_recording(name: str) -> Recording:
    """Load a shipped recording by name (e.g. ``"ludb-37"``, ``"ecgid-p25-r1"``)."""
    path = _HERE / f"{name}.npz"
    if not path.is_file():
        raise ValueError(
            f"no recording named {name!r}; available: {', '.join(list_recordings())}"
        )
    with np.load(path, allow_pickle=False) as z:
        counts = z["counts"]
        gain = z["gain_counts_per_mv"].astype(np.float32)
        leads_mv = (counts.astype(np.float32) / gain).astype(np.float32)
        return Recording(
            name=name,
            fs_hz=int(z["fs_hz"]),
            leads_mv=leads_mv,
            lead_present=z["lead_present"].astype(bool),
            person=str(z["person"]),
            dataset=str(z["dataset"]),
            source=str(z["source"]),
            date=str(z["date"]),
        )
