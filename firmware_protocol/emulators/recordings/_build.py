"""Rebuild the shipped recordings from ../shared/data (provenance; not used at run time).

    .venv/bin/python -m firmware_protocol.emulators.recordings._build ../shared/data

Writes one ``<name>.npz`` per recording next to this file: int16 ADC counts (n, 3) in the
dataset's own units, the per-lead gain in counts/mV, and the facts the loader exposes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: LUDB records (1-based record numbers, data/<n>): sinus rhythm, normal electrical axis, chosen
#: for the smallest Einthoven residual |III - (II - I)| among those.
LUDB_RECORDS = (16, 17, 18, 37, 40)
#: ECG-ID (person, record): persons 25, 46, 53 recorded on two dates (enrol on the first,
#: identify on the second); person 4 only on one date (the never-enrolled stranger).
ECGID_RECORDS = ((25, 1), (25, 4), (46, 1), (46, 3), (53, 1), (53, 4), (4, 1), (4, 2),
                 # persons held out of the shipped ECG model's training (its manifest lists them):
                 # the demo and the end-to-end tests enrol and identify these, honestly unseen
                 (2, 1), (2, 4), (26, 1), (26, 3), (34, 1), (34, 3), (5, 1))


def _save(name: str, counts: np.ndarray, gain: np.ndarray, present: np.ndarray, **facts: object) -> None:
    np.savez_compressed(
        HERE / f"{name}.npz",
        counts=counts.astype(np.int16),
        gain_counts_per_mv=gain.astype(np.float32),
        lead_present=present.astype(bool),
        **{k: np.asarray(v) for k, v in facts.items()},
    )


def build(data: Path) -> None:
    ludb = np.load(data / "ludb" / "ludb.npz")
    ludb_meta = json.loads((data / "ludb" / "metadata.json").read_text())
    by_record = {r["record"]: r for r in ludb_meta["records"]}
    for rec in LUDB_RECORDS:
        meta = by_record[f"data/{rec}"]
        i = meta["index"]
        _save(
            f"ludb-{rec}",
            ludb["signals"][i, :, :3],
            ludb["adc_gain"][i, :3],
            np.ones(3, bool),
            fs_hz=500,
            person=f"LUDB subject {rec} ({meta['sex']}, {meta['age']} y)",
            dataset="LUDB v1.0.1 (PhysioNet), Kalyakulina et al., ODC-By 1.0",
            source=f"PhysioNet LUDB v1.0.1 record data/{rec}, leads i, ii, iii",
            date="",
        )
    ecgid = np.load(data / "ecgid" / "ecgid.npz")
    ecgid_meta = json.loads((data / "ecgid" / "metadata.json").read_text())
    index = {(r["person"], r["rec_no"]): r for r in ecgid_meta["records"]}
    for person, rec_no in ECGID_RECORDS:
        meta = index[(person, rec_no)]
        counts = np.zeros((ecgid["signals"].shape[1], 3), np.int16)
        counts[:, 0] = ecgid["signals"][meta["index"], :, 0]  # raw lead I, as a box would see it
        _save(
            f"ecgid-p{person:02d}-r{rec_no}",
            counts,
            np.full(3, 200.0),
            np.array([True, False, False]),
            fs_hz=500,
            person=f"ECG-ID Person_{person:02d} ({meta['sex']}, {meta['age']} y)",
            dataset="ECG-ID v1.0.0 (PhysioNet), Lugovaya 2005, ODC-By 1.0",
            source=f"PhysioNet ECG-ID v1.0.0 {meta['record']}, raw lead I",
            date=meta["ecg_date"],
        )


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
