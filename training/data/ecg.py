"""ECG record loaders for folders in the format of ``shared/data`` and the fixed person split.

Every record comes out as an :class:`EcgRecord`: millivolts shaped (n, 3) in Einthoven order
I, II, III with a lead-valid mask (ECG-ID is lead I only, MIT-BIH's first lead is treated as lead
II: MLII for most records, V5 for 102/104 — stated in docs/MODELS.md), plus the person id
(``"<dataset>:<id>"``), the session (recording date for ECG-ID) and the sampling rate. Windows are
never cut here: :func:`record_windows` hands each record to the daemon's own
``windows_from_record`` so that training sees exactly what the daemon serves.

The person split is fixed and documented (docs/MODELS.md) and written into every shipped
manifest's ``training_data``: evaluation drops persons listed there, so the same command is
honest both on shared/data (it evaluates the held-out persons) and on a folder of unseen persons
(it evaluates everybody).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: ECG-ID persons of shared/data NOT used for training (5 of them recorded on >= 2 dates).
ECGID_HELDOUT = (2, 5, 10, 14, 19, 23, 26, 29, 34, 38, 43, 47, 52, 56, 61, 65, 71, 76, 82, 86)
#: ECG-ID training-partition persons kept out of gradient training: the open-set threshold is
#: chosen on them (scores of persons the network was fitted on are far better separated than
#: those of new persons, so a threshold picked there would accept far too many impostors).
#: They count as training persons (listed in the manifest, excluded by the evaluation). All
#: were recorded on one date only: the persons with several dates are too valuable for
#: learning cross-session invariance to be spent on calibration.
ECGID_CALIBRATION = (11, 16, 59, 62, 64, 67, 70, 77)
#: LUDB records (= persons) 71..100 are held out; MIT-BIH records below are held out.
LUDB_HELDOUT_FROM = 71
MITDB_HELDOUT = ("201", "203", "205", "208", "215", "220", "223", "230")
#: MIT-BIH records are 30 min; cut them into 10 s pseudo-recordings this far apart.
MITDB_SEGMENT_S = 10.0
MITDB_TRAIN_SEGMENTS = 16
MITDB_EVAL_SEGMENTS = 6


@dataclass(frozen=True)
class EcgRecord:
    """One recording of one person, in mV, Einthoven I/II/III columns (invalid leads zero)."""

    dataset: str
    person: str
    record: str
    session: str
    fs: float
    x_mv: np.ndarray
    lead_valid: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.x_mv.shape[0] / self.fs


def need_file(path: Path) -> Path:
    """``path``, or the error that says what a dataset folder must hold."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: --data must point to a folder in the format of shared/data "
            "(<name>/<name>.npz + <name>/metadata.json)")
    return path


def _open(data_dir: Path, name: str) -> tuple[dict, np.lib.npyio.NpzFile] | None:
    """(metadata, npz) of ``<data_dir>/<name>/``, or None when the dataset is absent. A folder
    that is there but lacks either file is an error, not an absent dataset."""
    d = Path(data_dir) / name
    if not d.is_dir():
        return None
    return json.loads(need_file(d / "metadata.json").read_text()), np.load(need_file(d / f"{name}.npz"))


def _three_leads(cols: dict[int, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((n, 3), dtype=np.float32)
    valid = np.zeros(3, dtype=bool)
    for lead, sig in cols.items():
        x[:, lead] = sig
        valid[lead] = True
    return x, valid


def load_ecgid(data_dir: Path) -> list[EcgRecord]:
    """ECG-ID: lead I raw channel (what a device would deliver), 500 Hz, session = date."""
    opened = _open(data_dir, "ecgid")
    if opened is None:
        return []
    meta, z = opened
    sig = z["signals"]
    fs = float(meta["fs_hz"])
    out = []
    for r in meta["records"]:
        x, v = _three_leads({0: sig[r["index"], :, 0].astype(np.float32) / 200.0}, sig.shape[1])
        out.append(EcgRecord("ecgid", f"ecgid:{int(r['person']):02d}", r["record"],
                             str(r.get("ecg_date", "")), fs, x, v))
    return out


def load_ludb(data_dir: Path) -> list[EcgRecord]:
    """LUDB: leads I, II, III (the first three of the 12), 500 Hz, one 10 s record per person."""
    opened = _open(data_dir, "ludb")
    if opened is None:
        return []
    meta, z = opened
    sig, gain = z["signals"], z["adc_gain"]
    fs = float(meta["fs_hz"])
    out = []
    for i, r in enumerate(meta["records"]):
        idx = int(r.get("index", i))
        x = (sig[idx, :, :3].astype(np.float32) / gain[idx, :3].astype(np.float32))
        out.append(EcgRecord("ludb", f"ludb:{r['record'].split('/')[-1]}", r["record"], "1",
                             fs, x, np.ones(3, dtype=bool)))
    return out


def load_mitdb(data_dir: Path, n_segments: int | None = None) -> list[EcgRecord]:
    """MIT-BIH: first lead as lead II, cut into ``n_segments`` 10 s pieces spread over the
    record (None: the held-out default for evaluation, MITDB_EVAL_SEGMENTS)."""
    opened = _open(data_dir, "mitdb")
    if opened is None:
        return []
    meta, z = opened
    out = []
    for r in meta["records"]:
        name = r["record"]
        key = f"sig_{name}"
        if key not in z:
            raise KeyError(f"mitdb.npz has no {key} although metadata.json lists record {name}")
        fs = float(r["fs"])
        x_all = (z[key][:, 0].astype(np.float32) - float(r["baseline"][0])) / float(r["adc_gain"][0])
        seg = int(MITDB_SEGMENT_S * fs)
        k = n_segments or MITDB_EVAL_SEGMENTS
        starts = np.linspace(0, len(x_all) - seg, k).astype(int)
        for j, s in enumerate(starts):
            x, v = _three_leads({1: x_all[s:s + seg]}, seg)
            out.append(EcgRecord("mitdb", f"mitdb:{name}", f"{name}@{s}", str(j), fs, x, v))
    return out


def load_all(data_dir: Path, mitdb_segments: int | None = None) -> list[EcgRecord]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a folder")
    return load_ecgid(data_dir) + load_ludb(data_dir) + load_mitdb(data_dir, mitdb_segments)


def is_training_person(person: str) -> bool:
    """The fixed split: True for persons of shared/data that train the shipped model."""
    ds, pid = person.split(":", 1)
    if ds == "ecgid":
        return int(pid) not in ECGID_HELDOUT
    if ds == "ludb":
        return int(pid) < LUDB_HELDOUT_FROM
    if ds == "mitdb":
        return pid not in MITDB_HELDOUT
    return False


def is_calibration_person(person: str) -> bool:
    ds, pid = person.split(":", 1)
    return ds == "ecgid" and int(pid) in ECGID_CALIBRATION


def load_training_records(data_dir: Path) -> tuple[list[EcgRecord], list[EcgRecord]]:
    """(records that train the network, ECG-ID records of the threshold-calibration persons)."""
    recs = load_ecgid(data_dir) + load_ludb(data_dir) + load_mitdb(data_dir, MITDB_TRAIN_SEGMENTS)
    recs = [r for r in recs if is_training_person(r.person)]
    return ([r for r in recs if not is_calibration_person(r.person)],
            [r for r in recs if is_calibration_person(r.person)])


@dataclass(frozen=True)
class WindowSet:
    """Model-input windows of many records; ``rec`` indexes ``records``."""

    x: np.ndarray          # (n, T, 3) float32, normalised by the daemon's pipeline
    lead_mask: np.ndarray  # (n, 3) bool
    rec: np.ndarray        # (n,) int, index into records
    t_end_s: np.ndarray    # (n,) window end within its record
    records: tuple[EcgRecord, ...]
    #: per window, its single beats at the pipeline's ``beat_fs`` ((k, L, 3) mV) when the
    #: pipeline was asked for them (``beat_fs`` in ``pipeline_kw``), else None
    morph: tuple[np.ndarray, ...] | None = None
    #: per window, the pipeline's full quality verdict (``Quality.ok``: what heart rate and the
    #: quality template use; identity uses the laxer ``identity_ok`` below)
    ok: np.ndarray | None = None
    #: per window, every quality sub-score (``daemon.dsp.quality.REASONS`` order, 1.0 for a
    #: check that did not run): lets an evaluation ask what another gate would have passed
    qscores: np.ndarray | None = None

    def persons(self) -> np.ndarray:
        return np.array([self.records[i].person for i in self.rec])

    @property
    def identity_ok(self) -> np.ndarray:
        """Per window, whether the daemon enrols and identifies from it
        (``daemon.dsp.quality.identity_ok`` of the sub-scores)."""
        from daemon.dsp.quality import identity_ok

        if self.qscores is None:
            raise ValueError("these windows carry no quality scores (cut them with record_windows)")
        return identity_ok(self.qscores)

    def select(self, keep: np.ndarray) -> "WindowSet":
        """The windows where ``keep`` (bool, one per window) holds, every per-window field
        cut alike; ``records`` (which ``rec`` indexes) unchanged."""
        keep = np.asarray(keep, dtype=bool)
        return WindowSet(self.x[keep], self.lead_mask[keep], self.rec[keep], self.t_end_s[keep],
                         self.records,
                         None if self.morph is None else tuple(m for m, k in zip(self.morph, keep) if k),
                         None if self.ok is None else self.ok[keep],
                         None if self.qscores is None else self.qscores[keep])


def record_windows(records: list[EcgRecord], pipeline_kw: dict) -> WindowSet:
    """Cut model windows from every record with the daemon's ``windows_from_record``."""
    from daemon.dsp.ecg_pipeline import windows_from_record
    from daemon.dsp.quality import REASONS

    xs, masks, recs, ends, morph, oks, qs = [], [], [], [], [], [], []
    for i, r in enumerate(records):
        rw = windows_from_record(r.x_mv, r.fs, lead_valid=r.lead_valid, **pipeline_kw)
        # a window with no usable lead is all zeros: nothing to learn or to identify from
        keep = np.asarray(rw.lead_mask, dtype=bool).any(axis=1)
        if not keep.any():
            continue
        xs.append(np.asarray(rw.data, dtype=np.float32)[keep])
        masks.append(np.asarray(rw.lead_mask, dtype=bool)[keep])
        recs.append(np.full(int(keep.sum()), i))
        ends.append(np.asarray(rw.t_end_s, dtype=np.float32)[keep])
        oks.append(np.asarray(rw.ok, dtype=bool)[keep])
        morph += [w.morph for w, k in zip(rw.windows, keep) if k]
        qs += [w.quality.score_row() for w, k in zip(rw.windows, keep) if k]
    if not xs:
        raise ValueError("no record was long enough for one model window")
    return WindowSet(np.concatenate(xs), np.concatenate(masks), np.concatenate(recs),
                     np.concatenate(ends), tuple(records),
                     tuple(morph) if pipeline_kw.get("beat_fs") else None, np.concatenate(oks),
                     np.asarray(qs, dtype=np.float32).reshape(-1, len(REASONS)))
