"""Rebuild ``sisfall_excerpts.npz`` from the project's SisFall copy (maintainer tool, not imported).

Why a script: the fixture must be reproducible from the shared dataset and its conversion must be
auditable. Run from the repository root::

    .venv/bin/python -m firmware_protocol.emulators.imu_recordings._build_fixture \
        /work/shared/data/sisfall

Conversion (from ``sisfall/metadata.json`` → ``units``):
  ADXL345 (cols 0-2):  g     = (2*16 / 2**13) * bits   (= bits / 256)
  ITG3200 (cols 3-5):  deg/s = (2*2000 / 2**16) * bits (= bits / 16.384)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

#: (subject, code, trial, first sample, n samples, label) — 100 Hz samples after SisFall's decimation.
EXCERPTS: tuple[tuple[str, str, int, int, int, str], ...] = (
    ("SA01", "D01", 1, 1000, 2000, "walking"),
    ("SA01", "D07", 1, 0, 600, "sitting"),
    ("SA02", "D01", 1, 1000, 2000, "walking"),
    ("SA02", "D07", 1, 0, 600, "sitting"),
)
ACC_G_PER_BIT = 2 * 16 / 2**13
GYRO_DPS_PER_BIT = 2 * 2000 / 2**16


def build(sisfall_dir: Path, out: Path) -> None:
    meta = json.loads((sisfall_dir / "metadata.json").read_text())
    if meta["fs_hz"] != 100.0:
        raise ValueError(f"expected SisFall at 100 Hz, metadata says {meta['fs_hz']}")
    data = np.load(sisfall_dir / "sisfall.npz")
    subj, code, trial = data["rec_subject"], data["rec_code"], data["rec_trial"]
    start, length = data["rec_start"], data["rec_len"]
    arrays: dict[str, np.ndarray] = {}
    for s, c, t, first, n, label in EXCERPTS:
        idx = np.flatnonzero((subj == s) & (code == c) & (trial == t))
        if idx.size != 1:
            raise ValueError(f"SisFall record {s} {c} R{t:02d} not found exactly once")
        i = int(idx[0])
        if first + n > length[i]:
            raise ValueError(f"{s} {c}: excerpt {first}+{n} exceeds record length {length[i]}")
        bits = data["data"][start[i] + first : start[i] + first + n].astype(np.float64)
        name = f"{s}_{c}_{label}"
        arrays[f"{name}/acc_g"] = (bits[:, 0:3] * ACC_G_PER_BIT).astype(np.float32)
        arrays[f"{name}/gyro_dps"] = (bits[:, 3:6] * GYRO_DPS_PER_BIT).astype(np.float32)
        arrays[f"{name}/meta"] = np.array(
            [s, c, label, f"SisFall v1.0 {s}/{c}_{s}_R{t:02d}.txt samples {first}..{first + n} @100 Hz"]
        )
    arrays["fs_hz"] = np.array(100.0)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/sisfall")
    build(src, Path(__file__).with_name("sisfall_excerpts.npz"))
