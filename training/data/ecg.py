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

import hashlib

import json
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
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


class DataError(ValueError):
    """A dataset folder is malformed; the message names the file and what is wrong with it.

    A ValueError, so every command's ``except (OSError, ValueError, KeyError)`` prints it as one
    ``error:`` line instead of a traceback or a bare ``'fs_hz'``."""


#: ``EcgRecord.session`` of a recording whose date is missing or unreadable: it is never
#: counted as the same date as another recording, nor as another date.
UNKNOWN_SESSION = ""


def note(notes: list[str] | None, text: str) -> None:
    """Tell what a loader left out and why: appended to ``notes`` when the caller collects them
    (the evaluation prints and stores them), else a warning, so nothing is dropped silently."""
    if notes is None:
        warnings.warn(text, stacklevel=3)
    else:
        notes.append(text)


def person_id(dataset: str, raw: object) -> str:
    """The one spelling of a person id of ``dataset``, used by the loaders AND by the manifest
    lookup (``training.eval.models.training_persons``).

    WHY: ids arrive as ints (ECG-ID ``person``, gudb ``subject``), zero-padded text ("05") or
    paths (LUDB "data/05"); compared as raw strings, a training person spelt otherwise than in
    the manifest would be evaluated as unseen. Numeric ids become the number (ECG-ID zero-padded
    to two digits, as the manifests write them); other ids (SisFall "SA03") are kept, stripped."""
    text = str(raw).strip()
    if dataset == "ludb":
        text = text.rsplit("/", 1)[-1]
    if isinstance(raw, float) and raw.is_integer():
        text = str(int(raw))
    if text.isascii() and text.isdigit():
        n = int(text)
        return f"{n:02d}" if dataset == "ecgid" else str(n)
    return text


def person_key(dataset: str, raw: object) -> str:
    """``"<dataset>:<id>"`` with the id spelt by :func:`person_id`."""
    return f"{dataset}:{person_id(dataset, raw)}"


def parse_date(text: object) -> date | None:
    """A recording date written ``dd.mm.yyyy`` (ECG-ID; ``7.3.2005`` too) or ISO ``yyyy-mm-dd``;
    None when missing or unreadable, so that callers cannot mistake it for a date."""
    if text is None:
        return None
    for fmt in ("%d.%m.%Y", "%Y-%m-%d"):
        try:
            return datetime.strptime(str(text).strip(), fmt).date()
        except ValueError:
            continue
    return None


def session_of_date(day: date | None) -> str:
    """The session text of a recording date: one spelling per date (``dd.mm.yyyy``, as in the
    shared ECG-ID metadata), so equal dates compare equal; :data:`UNKNOWN_SESSION` for None."""
    return UNKNOWN_SESSION if day is None else day.strftime("%d.%m.%Y")


@dataclass(frozen=True)
class EcgRecord:
    """One recording of one person, in mV, Einthoven I/II/III columns (invalid leads zero).

    ``session``: ECG-ID the recording date (:func:`session_of_date`; :data:`UNKNOWN_SESSION`
    when the metadata gives none that can be read), LUDB "1", MIT-BIH the segment number."""

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


@dataclass(frozen=True)
class _Opened:
    """One dataset folder's parsed ``metadata.json`` and its (lazily read) npz, with their paths
    for the error messages."""

    meta: dict
    npz: np.lib.npyio.NpzFile
    meta_path: Path
    npz_path: Path

    def array(self, key: str, ndim: int) -> np.ndarray:
        """The npz array ``key`` with ``ndim`` dimensions, or a DataError naming the npz."""
        if key not in self.npz.files:
            raise DataError(f"{self.npz_path}: no array {key!r} (it holds "
                            f"{', '.join(self.npz.files) or 'nothing'})")
        try:
            arr = self.npz[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.npz_path}: array {key!r} cannot be read ({exc})") from None
        if arr.ndim != ndim:
            raise DataError(f"{self.npz_path}: array {key!r} has shape {arr.shape}; "
                            f"expected {ndim} dimensions")
        return arr

    def records(self, key: str = "records") -> list[dict]:
        recs = meta_field(self.meta, key, self.meta_path)
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise DataError(f"{self.meta_path}: {key!r} must be a list of objects")
        return recs

    def rate(self, where: dict, key: str, what: str = "") -> float:
        """A sampling rate: a positive number, else a DataError naming the file."""
        v = meta_field(where, key, self.meta_path, what)
        try:
            fs = float(v)
        except (TypeError, ValueError):
            fs = float("nan")
        if not np.isfinite(fs) or fs <= 0:
            raise DataError(f"{self.meta_path}: {what}{key!r} is {v!r}; expected a rate in Hz > 0")
        return fs

    def index(self, r: dict, k: int, n: int, default: int | None = None) -> int:
        """Record ``k``'s row in an npz array of ``n`` rows, checked against the npz up front."""
        if default is None:
            v = meta_field(r, "index", self.meta_path, f"record #{k}: ")
        else:
            v = r.get("index", default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < n:
            raise DataError(f"{self.meta_path}: record #{k} ({r.get('record', '?')}) has index {v!r} "
                            f"but {self.npz_path} holds {n} records: the two files do not belong together")
        return int(v)

    @contextmanager
    def parsing(self) -> Iterator[None]:
        """Whatever else a malformed field makes the parsing code raise, re-raised as a
        DataError that names both files (no bare ``KeyError: 'fs'`` or broadcast error)."""
        try:
            yield
        except DataError:
            raise
        except KeyError as exc:
            raise DataError(f"{self.meta_path}: missing field {exc} (or {self.npz_path}: missing array)") from None
        except (IndexError, TypeError, ValueError) as exc:
            raise DataError(f"{self.meta_path} / {self.npz_path}: {type(exc).__name__}: {exc}") from None


def meta_field(d: object, key: str, path: Path, what: str = "") -> object:
    """``d[key]``, or a DataError saying which file lacks which field (``what``: where in it)."""
    if not isinstance(d, dict) or key not in d:
        raise DataError(f"{path}: {what}no {key!r} field")
    return d[key]


def read_json(path: Path) -> dict:
    """A metadata.json as a dict, or a DataError naming the file (truncated, not JSON, ...)."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); restore the file from the dataset") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def load_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``np.load`` of an archive, or a DataError naming it when it is not a readable npz."""
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None


def _open(data_dir: Path, name: str) -> _Opened | None:
    """``<data_dir>/<name>/`` parsed, or None when the dataset is absent. A folder that is there
    but lacks either file, or holds one that cannot be read, is an error, not an absent dataset."""
    d = Path(data_dir) / name
    if not d.is_dir():
        return None
    meta_path, npz_path = need_file(d / "metadata.json"), need_file(d / f"{name}.npz")
    return _Opened(read_json(meta_path), load_npz(npz_path), meta_path, npz_path)


def _numeric_person(ds: _Opened, dataset: str, raw: object, k: int) -> str:
    """The person key of a dataset whose fixed split is numeric (ECG-ID, LUDB)."""
    pid = person_id(dataset, raw)
    if not (pid.isascii() and pid.isdigit()):
        raise DataError(f"{ds.meta_path}: record #{k}: person id {raw!r} is not a number")
    return f"{dataset}:{pid}"


def _three_leads(cols: dict[int, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((n, 3), dtype=np.float32)
    valid = np.zeros(3, dtype=bool)
    for lead, sig in cols.items():
        x[:, lead] = sig
        valid[lead] = True
    return x, valid


def load_ecgid(data_dir: Path, notes: list[str] | None = None) -> list[EcgRecord]:
    """ECG-ID: lead I raw channel (what a device would deliver), 500 Hz, session = date.

    A record without a readable ``ecg_date`` keeps :data:`UNKNOWN_SESSION` (said in ``notes``):
    the identity protocol never counts it as cross-date nor pools it with another recording."""
    ds = _open(data_dir, "ecgid")
    if ds is None:
        return []
    with ds.parsing():
        fs = ds.rate(ds.meta, "fs_hz")
        sig = ds.array("signals", 3)
        recs = ds.records()
        if len(recs) > len(sig):
            raise DataError(f"{ds.meta_path} lists {len(recs)} records but {ds.npz_path} holds "
                            f"{len(sig)} signals: the two files do not belong together")
        out = []
        for k, r in enumerate(recs):
            idx = ds.index(r, k, len(sig))
            person = _numeric_person(ds, "ecgid", meta_field(r, "person", ds.meta_path, f"record #{k}: "), k)
            name = str(meta_field(r, "record", ds.meta_path, f"record #{k}: "))
            day = parse_date(r.get("ecg_date"))
            if day is None:
                note(notes, f"{ds.meta_path}: record {name} has no readable ecg_date "
                     f"({r.get('ecg_date')!r}): never counted as cross-date, nor pooled with "
                     "another recording as the same date")
            x, v = _three_leads({0: sig[idx, :, 0].astype(np.float32) / 200.0}, sig.shape[1])
            out.append(EcgRecord("ecgid", person, name, session_of_date(day), fs, x, v))
    return out


def load_ludb(data_dir: Path) -> list[EcgRecord]:
    """LUDB: leads I, II, III (the first three of the 12), 500 Hz, one 10 s record per person."""
    ds = _open(data_dir, "ludb")
    if ds is None:
        return []
    with ds.parsing():
        sig, gain = ds.array("signals", 3), ds.array("adc_gain", 2)
        if sig.shape[2] < 3 or gain.shape[1] < 3:
            raise DataError(f"{ds.npz_path}: 'signals' {sig.shape} / 'adc_gain' {gain.shape} hold "
                            "fewer than the 3 leads I, II, III")
        fs = ds.rate(ds.meta, "fs_hz")
        out = []
        for i, r in enumerate(ds.records()):
            idx = ds.index(r, i, min(len(sig), len(gain)), default=i)
            name = str(meta_field(r, "record", ds.meta_path, f"record #{i}: "))
            g = gain[idx, :3].astype(np.float32)
            if not np.all(np.isfinite(g) & (g != 0)):
                raise DataError(f"{ds.npz_path}: adc_gain of record {name} is {g.tolist()}: "
                                "cannot convert to mV")
            x = sig[idx, :, :3].astype(np.float32) / g
            out.append(EcgRecord("ludb", _numeric_person(ds, "ludb", name, i), name, "1",
                                 fs, x, np.ones(3, dtype=bool)))
    return out


def load_mitdb(data_dir: Path, n_segments: int | None = None,
               notes: list[str] | None = None) -> list[EcgRecord]:
    """MIT-BIH: first lead as lead II, cut into ``n_segments`` 10 s pieces spread over the
    record (None: the held-out default for evaluation, MITDB_EVAL_SEGMENTS).

    Pieces never overlap: a record with room for fewer gives as many as fit, one shorter than a
    piece is skipped (both said in ``notes``). WHY: overlapping "10 s" pieces of 12 s of signal
    would count the same beats as several independent never-enrolled tests."""
    ds = _open(data_dir, "mitdb")
    if ds is None:
        return []
    out = []
    with ds.parsing():
        for i, r in enumerate(ds.records()):
            raw_name = str(meta_field(r, "record", ds.meta_path, f"record #{i}: "))
            what = f"record {raw_name}: "
            fs = ds.rate(r, "fs", what)
            baseline = float(np.ravel(meta_field(r, "baseline", ds.meta_path, what))[0])
            gain = float(np.ravel(meta_field(r, "adc_gain", ds.meta_path, what))[0])
            if not np.isfinite(gain) or gain == 0:
                raise DataError(f"{ds.meta_path}: {what}adc_gain {gain!r} cannot convert to mV")
            key = f"sig_{raw_name}"
            if key not in ds.npz.files:
                raise DataError(f"{ds.npz_path} has no {key} although {ds.meta_path} lists record {raw_name}")
            sig = ds.array(key, 2)
            x_all = (sig[:, 0].astype(np.float32) - baseline) / gain
            seg = int(MITDB_SEGMENT_S * fs)
            want = n_segments or MITDB_EVAL_SEGMENTS
            k = min(want, len(x_all) // seg)
            if k == 0:
                note(notes, f"{ds.npz_path}: MIT-BIH record {raw_name} is {len(x_all) / fs:.1f} s, "
                     f"shorter than one {MITDB_SEGMENT_S:g} s segment: skipped")
                continue
            if k < want:
                note(notes, f"{ds.npz_path}: MIT-BIH record {raw_name} is {len(x_all) / fs:.1f} s: "
                     f"{k} non-overlapping {MITDB_SEGMENT_S:g} s segments instead of {want}")
            person = person_key("mitdb", raw_name)
            starts = np.linspace(0, len(x_all) - seg, k).astype(int)
            for j, s in enumerate(starts):
                x, v = _three_leads({1: x_all[s:s + seg]}, seg)
                out.append(EcgRecord("mitdb", person, f"{raw_name}@{s}", str(j), fs, x, v))
    return out


def load_all(data_dir: Path, mitdb_segments: int | None = None,
             notes: list[str] | None = None) -> list[EcgRecord]:
    """Every ECG record of ``data_dir`` (ECG-ID, LUDB, MIT-BIH); what was left out or flagged
    goes to ``notes`` (see :func:`note`)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a folder")
    return (load_ecgid(data_dir, notes) + load_ludb(data_dir)
            + load_mitdb(data_dir, mitdb_segments, notes))


def fingerprint(record: EcgRecord) -> str:
    """A record's content fingerprint: sha256 (16 hex digits) of its whole signal as loaded
    (float32 mV, all three lead columns; a MIT-BIH segment of ``MITDB_SEGMENT_S``, the first of
    which starts at 0 however many a loader cuts). WHY: a model's manifest lists the persons it
    trained on by number, and a folder of other persons numbered from 1 reuses those numbers
    (its persons were then all excluded as "training persons", and the evaluation lost every
    identity metric), while a training person renumbered would pass as new. The recording
    itself says which it is. Not a prefix: seven ECG-ID recordings of seven persons (13, 25,
    26, 28, 32, 44, 83) begin with the same 2 to 4.1 s of samples (one flat value, -0.005 mV)."""
    return hashlib.sha256(np.ascontiguousarray(record.x_mv, dtype="<f4").tobytes()).hexdigest()[:16]


def fingerprints(records: list[EcgRecord]) -> list[str]:
    """The sorted fingerprints of ``records`` (for a manifest's ``training.fingerprints``)."""
    return sorted({fingerprint(r) for r in records})


def person_folds(records, k: int) -> list[list[str]]:
    """Development folds of ``records``' persons (objects with ``dataset``, ``person`` and
    ``session``): the ECG-ID persons with >= 2 recordings (only they can be enrolled and tested),
    multi-date persons dealt out first so that each fold gets its share of cross-date tests;
    everyone else trains in every fold."""
    by: dict[str, list[str]] = {}
    for r in records:
        if r.dataset == "ecgid":
            by.setdefault(r.person, []).append(r.session)
    multi = sorted(p for p, s in by.items() if len(set(s)) >= 2)
    single = sorted(p for p, s in by.items() if len(s) >= 2 and len(set(s)) < 2)
    folds: list[list[str]] = [[] for _ in range(k)]
    for i, p in enumerate(multi + single):
        folds[i % k].append(p)
    return folds


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
