"""IMU data loaders: SisFall (waist) and HuGaDB (right leg) -> SI windows and ACF features.

WHY: training must see exactly what the hub computes, so the unit conversion, resampling
(``daemon.dsp.imu.resample_irregular``, the streaming resampler run over a whole record) and
features (``daemon.dsp.imu.acf_features_batch``) are the daemon's own functions. Conversions,
rates, activity codes, placement, subjects and the held-out split are read from each folder's
``metadata.json``, so any folder in the same format (``--data``) works.

HuGaDB's known corruption (some files' gyroscopes 10x amplified and clipped) is handled per
recording: a recording is flagged when its metadata session is named in ``known_issue`` or when
the chosen sensor's gyroscope sits on the ±2000 °/s rails (``daemon.dsp.imu.clip_fraction``) for
more than ``CLIP_LIMIT`` of the samples. Measured on the shared copy, the corruption is per
sensor, not per file: in walking files whose foot or shin gyro clips, the thigh gyro often has
the normal level (median |deviation| 48-58 °/s like clean walking files), while amplified ones
sit at 240-380 °/s and clip. The thigh gyro is the least affected (69 of 496 files clip, vs 142
shin, 153 foot), which is why the activity model uses the thigh. Flagged recordings are excluded
and reported, never silently used.
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.dsp.imu import RECORD_LABELS, acf_features_batch, clip_fraction, resample_irregular, to_si
from daemon.dsp.imu_pipeline import ImuPipeline
from daemon.record import WfdbError, imu_record_problem, read_wfdb
# one error type for every dataset loader (a ValueError naming the file); re-exported here
from training.data.ecg import DataError, load_npz, meta_field, note, person_id, read_json

MODEL_RATE_HZ = 100.0
WINDOW_S = 2.0
HOP_S = 1.0
CLIP_LIMIT = 1e-3

# HuGaDB activity ids -> (fine class or None, top-level class). Transitions (sitting down /
# standing up) last about a second and are never the single label of a 2 s window: not used.
# Bicycling and sitting in a car were recorded by one person only (subject 1) in the shared
# copy: no subject-disjoint evaluation can measure them, so they train the top-level head
# (vigorous / rest) but are not fine classes.
TOP_LEVEL = ("rest", "walking", "vigorous")
HUGADB_CLASSES: dict[int, tuple[str | None, str]] = {
    1: ("walking", "walking"),
    2: ("running", "vigorous"),
    3: ("going_up", "walking"),
    4: ("going_down", "walking"),
    5: ("sitting", "rest"),
    8: ("standing", "rest"),
    9: (None, "vigorous"),  # bicycling
    10: ("up_by_elevator", "rest"),
    11: ("down_by_elevator", "rest"),
    12: (None, "rest"),  # sitting_in_car
}
FINE_CLASSES = tuple(f for f, _ in HUGADB_CLASSES.values() if f is not None)
HUGADB_SENSORS = {"foot": "rf", "shin": "rs", "thigh": "rt"}
SISFALL_GAIT_CODES = ("D01", "D02", "D03", "D04")  # walking slowly/quickly, jogging slowly/quickly


@dataclass(frozen=True)
class ImuRecord:
    """One recording at ``MODEL_RATE_HZ``: si (n, 6) float32 [acc m/s², gyro rad/s].

    ``labels``: per-sample HuGaDB activity id (0 = none) or None (SisFall: ``code`` labels the
    whole trial). ``gyro_corrupt``: flagged by the known-issue list or the clipping detector.
    """

    dataset: str
    file: str
    subject: str
    code: str
    si: np.ndarray
    labels: np.ndarray | None
    age: float
    sex: str
    placement: str
    gyro_corrupt: bool = False


@dataclass(frozen=True)
class WindowSet:
    """Windows of many records, one row per window: ``features`` (m, F) float32 and metadata."""

    features: np.ndarray
    subject: np.ndarray  # (m,) str
    code: np.ndarray  # (m,) str: SisFall code / HuGaDB session type
    activity: np.ndarray  # (m,) int: HuGaDB activity id (0 for SisFall)
    age: np.ndarray  # (m,) float32
    female: np.ndarray  # (m,) int 0/1

    def select(self, mask: np.ndarray) -> "WindowSet":
        return WindowSet(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return int(self.features.shape[0])


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow}


def _arith(expr: str) -> float:
    """Evaluate a numeric expression such as ``2*16/2**13`` (numbers and + - * / ** only)."""
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


@dataclass(frozen=True)
class _Ragged:
    """A ragged IMU dataset (SisFall, HuGaDB) read and checked against its metadata up front:
    recording ``i`` is ``data[start[i]:start[i] + length[i]]``. The paths name the files in
    every error."""

    meta: dict
    recordings: list[dict]
    arrays: dict[str, np.ndarray]
    meta_path: Path
    npz_path: Path

    def rows(self, i: int) -> slice:
        s, n = int(self.arrays["rec_start"][i]), int(self.arrays["rec_len"][i])
        return slice(s, s + n)

    def field(self, key: str, where: dict | None = None, what: str = "") -> object:
        return meta_field(self.meta if where is None else where, key, self.meta_path, what)


def _metadata(data_dir: Path, name: str, per_sample: tuple[str, ...] = ()) -> _Ragged:
    """``<name>/metadata.json`` + ``<name>.npz`` of ``data_dir``, checked against each other:
    one ``rec_start``/``rec_len`` per listed recording, every recording inside ``data``, and
    each ``per_sample`` array as long as ``data``. WHY up front: a metadata file listing one
    recording more than the npz ended the evaluation in an IndexError that named no file."""
    data_dir = Path(data_dir)
    meta_path, npz_path = data_dir / "metadata.json", data_dir / f"{name}.npz"
    for p in (meta_path, npz_path):
        if not p.exists():
            raise DataError(f"{p} not found: --data must point at a folder in the format of "
                            f"../shared/data/{name} (metadata.json + {name}.npz)")
    meta = read_json(meta_path)
    z = load_npz(npz_path)
    try:
        with z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{npz_path}: cannot be read ({exc})") from None
    for key in ("data", "rec_start", "rec_len", *per_sample):
        if key not in arrays:
            raise DataError(f"{npz_path}: no array {key!r} (it holds {', '.join(arrays) or 'nothing'})")
    recs = meta_field(meta, "recordings", meta_path)
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise DataError(f"{meta_path}: 'recordings' must be a list of objects")
    data, start, length = arrays["data"], arrays["rec_start"], arrays["rec_len"]
    if data.ndim != 2 or start.ndim != 1 or length.ndim != 1:
        raise DataError(f"{npz_path}: 'data' {data.shape}, 'rec_start' {start.shape}, 'rec_len' "
                        f"{length.shape}; expected (samples, channels) and one entry per recording")
    if not len(start) == len(length) == len(recs):
        raise DataError(f"{meta_path} lists {len(recs)} recordings but {npz_path} has "
                        f"{len(start)} rec_start / {len(length)} rec_len: the two files do not belong together")
    bad = np.flatnonzero((start < 0) | (length < 0) | (start + length > len(data)))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{npz_path}: recording #{i} ({recs[i].get('file', '?')}) spans samples "
                        f"{int(start[i])}..{int(start[i] + length[i])} but 'data' holds {len(data)}")
    for key in per_sample:
        if len(arrays[key]) != len(data):
            raise DataError(f"{npz_path}: {key!r} has {len(arrays[key])} samples, 'data' {len(data)}")
    return _Ragged(meta, recs, arrays, meta_path, npz_path)


def _subjects(ds: _Ragged, dataset: str) -> dict[str, dict]:
    """``metadata.json["subjects"]`` keyed by :func:`~training.data.ecg.person_id`."""
    subjects = ds.field("subjects")
    if not isinstance(subjects, dict):
        raise DataError(f"{ds.meta_path}: 'subjects' must be an object keyed by subject id")
    return {person_id(dataset, k): v for k, v in subjects.items()}


def _person_facts(ds: _Ragged, info: dict, subject: str) -> tuple[float, str]:
    """(age, sex) of a subject, or a DataError naming the file and the subject."""
    what = f"subjects[{subject!r}]: "
    try:
        age = float(ds.field("age", info, what))
    except (TypeError, ValueError):
        raise DataError(f"{ds.meta_path}: {what}age {info.get('age')!r} is not a number") from None
    return age, str(ds.field("sex", info, what))


def sisfall_conversion(units: str) -> tuple[float, float]:
    """(g per bit for cols 0-2, °/s per bit for cols 3-5) from SisFall's ``units`` text."""
    acc = re.search(r"g\s*=\s*\(([^)]*)\)\s*\*\s*bits\s+for\s+ADXL345", units)
    gyro = re.search(r"deg/s\s*=\s*\(([^)]*)\)\s*\*\s*bits\s+for\s+ITG3200", units)
    if not acc or not gyro:
        raise DataError(f"cannot read the ADXL345/ITG3200 conversions from units={units!r}")
    return _arith(acc.group(1)), _arith(gyro.group(1))


def hugadb_conversion(units: str) -> tuple[float, float, float]:
    """(counts per g, counts per °/s, gyro full scale °/s) from HuGaDB's ``column_units``."""
    acc = re.search(r"([\d.]+)\s*counts/g", units)
    gyro = re.search(r"([\d.]+)\s*counts/\(deg/s\)", units)
    rng = re.search(r"gyroscope range \+-\s*([\d.]+)\s*deg/s", units)
    if not acc or not gyro or not rng:
        raise DataError(f"cannot read the HuGaDB count conversions from column_units={units!r}")
    return float(acc.group(1)), float(gyro.group(1)), float(rng.group(1))


def _to_model_rate(si: np.ndarray, fs: float, anti_alias: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Resample with the daemon's resampler; returns (y (m, 6), source index of each sample).

    ``anti_alias``: first low-pass a faster recording as the daemon low-passes a faster sensor
    (``ImuPipeline.anti_alias``): on for `biod record` files, which the daemon would have
    streamed through that filter (tests/test_imu_models.py holds the two equal at 400 Hz). Off for SisFall's 200 Hz, which the shipped
    models were trained on unfiltered (a MetaMotion at its default 100 Hz is not filtered)."""
    t = np.arange(si.shape[0], dtype=np.float64) / fs
    if abs(fs - MODEL_RATE_HZ) < 1e-9:
        return si.astype(np.float32), np.arange(si.shape[0])
    low_pass = ImuPipeline.anti_alias(fs, MODEL_RATE_HZ) if anti_alias else None
    if low_pass is not None:
        si = low_pass.process(np.asarray(si, np.float32))
    t_out, y = resample_irregular(t, si, MODEL_RATE_HZ, max_gap_s=np.inf)
    src = np.minimum(np.floor(t_out * fs + 1e-6).astype(np.int64), si.shape[0] - 1)
    return y, src


def _rate(ds: _Ragged, key: str) -> float:
    try:
        fs = float(ds.field(key))
    except (TypeError, ValueError):
        fs = float("nan")
    if not np.isfinite(fs) or fs <= 0:
        raise DataError(f"{ds.meta_path}: {key!r} is {ds.meta.get(key)!r}; expected a rate in Hz > 0")
    return fs


def _skip_unknown_subject(ds: _Ragged, subject: str, skipped: set[str], notes: list[str] | None) -> None:
    """Say once per subject that its recordings are left out: no age/sex in ``subjects``."""
    if subject not in skipped:
        skipped.add(subject)
        note(notes, f"{ds.meta_path}: subject {subject} is not in 'subjects' (no age/sex): "
             "its recordings are skipped")


def load_sisfall(data_dir: Path, codes: tuple[str, ...] | None = SISFALL_GAIT_CODES,
                 notes: list[str] | None = None) -> list[ImuRecord]:
    """SisFall trials (default: walking/jogging D01-D04) as waist records at 100 Hz.

    A subject missing from ``subjects`` is skipped, said in ``notes`` (see
    :func:`training.data.ecg.note`), not the end of the whole folder."""
    ds = _metadata(data_dir, "sisfall")
    g_per_bit, dps_per_bit = sisfall_conversion(str(ds.field("units")))
    fs = _rate(ds, "fs_hz")
    placement = str(ds.meta.get("sensor_placement", "waist"))
    subjects = _subjects(ds, "sisfall")
    if ds.arrays["data"].shape[1] < 6:
        raise DataError(f"{ds.npz_path}: 'data' has {ds.arrays['data'].shape[1]} columns; "
                        "SisFall needs 6 (ADXL345 acc + ITG3200 gyro)")
    out, skipped = [], set()
    for i, rec in enumerate(ds.recordings):
        what = f"recording #{i}: "
        code = str(ds.field("code", rec, what))
        if codes is not None and code not in codes:
            continue
        subject = person_id("sisfall", ds.field("subject", rec, what))
        if subject not in subjects:
            _skip_unknown_subject(ds, subject, skipped, notes)
            continue
        age, sex = _person_facts(ds, subjects[subject], subject)
        raw = ds.arrays["data"][ds.rows(i), :6].astype(np.float32)
        si = to_si(raw[:, :3] * g_per_bit, raw[:, 3:6] * dps_per_bit)
        si, _ = _to_model_rate(si, fs)
        out.append(ImuRecord("sisfall", str(ds.field("file", rec, what)), subject, code, si, None,
                             age, sex, placement))
    if not out:
        raise DataError(f"{data_dir}: no SisFall recordings with codes {codes}"
                        + (f" of subjects with age/sex ({', '.join(sorted(skipped))} have none)" if skipped else ""))
    return out


def _known_issue_patterns(text: str) -> list[re.Pattern[str]]:
    """'HuGaDB_v1_various_03_* and _04_*' -> regexes for various_03_* and various_04_*."""
    pats, last_prefix = [], None
    for m in re.finditer(r"(HuGaDB_v1_[a-z_]+?_)?(\d+)_\*", text):
        prefix = m.group(1) or last_prefix
        if prefix is None:
            continue
        last_prefix = prefix
        pats.append(re.compile(re.escape(prefix + m.group(2) + "_")))
    return pats


def load_hugadb(data_dir: Path, sensor: str = "thigh", notes: list[str] | None = None
                ) -> tuple[list[ImuRecord], list[str]]:
    """HuGaDB recordings of one right-leg sensor at 100 Hz, corrupt-gyro files excluded.

    Returns (records, excluded file names). A subject missing from ``subjects`` is skipped,
    said in ``notes`` (see :func:`training.data.ecg.note`).
    """
    if sensor not in HUGADB_SENSORS:
        raise DataError(f"sensor={sensor!r}: HuGaDB has {sorted(HUGADB_SENSORS)}")
    ds = _metadata(data_dir, "hugadb", per_sample=("activity",))
    per_g, per_dps, gyro_range = hugadb_conversion(str(ds.field("column_units")))
    fs = _rate(ds, "sampling_rate_hz_approx")
    cols = ds.field("columns")
    if not isinstance(cols, list) or len(cols) != ds.arrays["data"].shape[1]:
        raise DataError(f"{ds.meta_path}: 'columns' must name each of the {ds.arrays['data'].shape[1]} "
                        f"columns of {ds.npz_path} 'data'")
    tag = HUGADB_SENSORS[sensor]
    wanted = [f"acc_{tag}_{a}" for a in "xyz"] + [f"gyro_{tag}_{a}" for a in "xyz"]
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise DataError(f"{ds.meta_path}: 'columns' lacks {', '.join(missing)} (the right {sensor} IMU)")
    acc_cols, gyro_cols = [cols.index(c) for c in wanted[:3]], [cols.index(c) for c in wanted[3:]]
    known = _known_issue_patterns(str(ds.meta.get("known_issue", "")))
    subjects = _subjects(ds, "hugadb")
    records, excluded, skipped = [], [], set()
    for i, rec in enumerate(ds.recordings):
        what = f"recording #{i}: "
        file = str(ds.field("file", rec, what))
        raw = ds.arrays["data"][ds.rows(i)].astype(np.float32)
        clipped = clip_fraction(raw[:, gyro_cols] / per_dps, gyro_range).max() > CLIP_LIMIT
        if clipped or any(p.match(file) for p in known):
            excluded.append(file)
            continue
        subj = person_id("hugadb", ds.field("subject", rec, what))
        if subj not in subjects:
            _skip_unknown_subject(ds, subj, skipped, notes)
            continue
        age, sex = _person_facts(ds, subjects[subj], subj)
        si = to_si(raw[:, acc_cols] / per_g, raw[:, gyro_cols] / per_dps)
        si, src = _to_model_rate(si, fs)
        labels = ds.arrays["activity"][ds.rows(i)][src].astype(np.int64)
        records.append(ImuRecord("hugadb", file, subj, str(ds.field("session_type", rec, what)), si,
                                 labels, age, sex, f"right {sensor}"))
    return records, excluded


#: ``biod record --label`` names of the activities the activity model knows -> HuGaDB ids
BIOD_LABELS: dict[str, int] = {**{f: k for k, (f, _) in HUGADB_CLASSES.items() if f is not None},
                               "bicycling": 9, "sitting_in_car": 12}
assert set(BIOD_LABELS) == set(RECORD_LABELS), "daemon.dsp.imu.RECORD_LABELS and BIOD_LABELS disagree"


def load_biod_imu(folder: Path) -> list[ImuRecord]:
    """The IMU records ``biod record`` wrote to ``folder`` (WFDB format 16, ``imu_*.hea``), at
    100 Hz in SI units, with per-sample activity ids from their ``.labels.csv``.

    A household's own data for ``training.finetune_imu``: the same conversion and resampler as
    everything else here. Labels must be activity names the model knows (``BIOD_LABELS``);
    unlabelled samples are kept out of training windows (id 0).
    """
    import csv

    folder = Path(folder)
    heads = sorted(folder.glob("imu_*.hea"))
    if not heads:
        raise DataError(f"{folder}: no imu_*.hea records (write them with `biod record` on a hub with an IMU)")
    out = []
    for hea in heads:
        try:
            rec = read_wfdb(hea)
        except WfdbError as exc:
            raise DataError(str(exc)) from None
        problem = imu_record_problem(rec) or (None if all(sg.fmt == 16 for sg in rec.signals) else
                                              "signals in format 24; `biod record` writes IMU records in format 16")
        if problem:
            raise DataError(f"{hea}: {problem}")
        fs, phys, n = rec.fs_hz, rec.physical, rec.physical.shape[0]
        comments = rec.comment_fields()
        labels = np.zeros(n, np.int64)
        label_file = hea.with_name(hea.stem + ".labels.csv")
        if label_file.exists():
            with open(label_file, newline="") as f:
                reader = csv.DictReader(f)
                need = ("start_sample", "end_sample", "kind", "value")
                if not set(need) <= set(reader.fieldnames or ()):
                    raise DataError(f"{label_file}: columns {reader.fieldnames}, expected {', '.join(need)} "
                                    "(as `biod record --label` writes them)")
                for line, row in enumerate(reader, start=2):
                    if row["kind"] != "activity":
                        continue
                    if row["value"] not in BIOD_LABELS:
                        raise DataError(f"{label_file}: activity {row['value']!r} is not one the model knows; "
                                        f"use one of {', '.join(sorted(BIOD_LABELS))}")
                    try:
                        a, b = int(row["start_sample"]), int(row["end_sample"])
                    except (TypeError, ValueError):
                        a = b = -1
                    if not 0 <= a < b <= n:  # a negative start sliced from the end; end < start labelled nothing
                        raise DataError(f"{label_file}:{line}: samples {row['start_sample']!r}..{row['end_sample']!r} "
                                        f"are not a span within the record's {n} samples")
                    labels[a:b] = BIOD_LABELS[row["value"]]
        placement = comments.get("placement", "unknown")
        # `biod record` notes where the board lost samples: no window may span such a gap
        cuts = sorted({int(m.group(1)) for c in rec.comments if (m := re.match(r"gap before sample (\d+)", c))})
        bounds = [0] + [c for c in cuts if 0 < c < n] + [n]
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b - a < 2:
                continue
            si, src = _to_model_rate(to_si(phys[a:b, :3], phys[a:b, 3:]), fs, anti_alias=True)
            name = hea.stem if len(bounds) == 2 else f"{hea.stem}#{k}"
            out.append(ImuRecord("biod", name, comments.get("person", "household"), "biod_record", si,
                                 labels[a:b][src], float("nan"), "?", placement))
    return out


def sliding_windows(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    """(n, c) -> (m, length, c) view of windows starting every ``hop`` samples."""
    if x.shape[0] < length:
        return np.zeros((0, length, x.shape[1]), dtype=x.dtype)
    v = np.lib.stride_tricks.sliding_window_view(x, length, axis=0)[::hop]
    return np.moveaxis(v, -1, 1)


def window_set(records: list[ImuRecord], variant: str = "biodeep", max_lag: int = 10,
               window_s: float = WINDOW_S, hop_s: float = HOP_S) -> WindowSet:
    """ACF features of every window; HuGaDB windows must carry one trainable label throughout."""
    length, hop = int(round(window_s * MODEL_RATE_HZ)), int(round(hop_s * MODEL_RATE_HZ))
    feats, subj, code, act, age, fem = [], [], [], [], [], []
    for r in records:
        w = sliding_windows(r.si, length, hop)
        if not len(w):
            continue
        if r.labels is not None:
            lab = sliding_windows(r.labels[:, None], length, hop)[:, :, 0]
            pure = (lab == lab[:, :1]).all(1) & np.isin(lab[:, 0], list(HUGADB_CLASSES))
            w, a = w[pure], lab[pure, 0]
        else:
            a = np.zeros(len(w), dtype=np.int64)
        if not len(w):
            continue
        feats.append(acf_features_batch(np.ascontiguousarray(w), max_lag, variant, MODEL_RATE_HZ))
        subj += [r.subject] * len(w)
        code += [r.code] * len(w)
        act.append(a)
        age += [r.age] * len(w)
        fem += [int(r.sex == "F")] * len(w)
    if not feats:
        raise DataError("no complete windows in the given records")
    return WindowSet(np.concatenate(feats), np.array(subj), np.array(code),
                     np.concatenate(act).astype(np.int64), np.array(age, np.float32),
                     np.array(fem, np.int64))


def _lut(values: dict[int, int]) -> np.ndarray:
    lut = np.full(max(HUGADB_CLASSES) + 1, -1, np.int64)
    for k, v in values.items():
        lut[k] = v
    return lut


def top_level_index(activity: np.ndarray) -> np.ndarray:
    """HuGaDB activity ids -> index into ``TOP_LEVEL`` (-1: not a trained class)."""
    return _lut({k: TOP_LEVEL.index(t) for k, (_, t) in HUGADB_CLASSES.items()})[activity]


def fine_index(activity: np.ndarray) -> np.ndarray:
    """HuGaDB activity ids -> index into ``FINE_CLASSES`` (-1: top-level only)."""
    return _lut({k: FINE_CLASSES.index(f) for k, (f, _) in HUGADB_CLASSES.items()
                 if f is not None})[activity]
