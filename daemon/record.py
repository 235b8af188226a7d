"""Recording raw streams to WFDB, the format PhysioNet and every ECG tool reads.

``biod record`` keeps a household's own labelled data for fine-tuning, on the hub. Samples are
appended to the ``.dat`` file as they arrive (format 24 for the ECG box's 24-bit samples,
format 16 for the IMU's int16 LSBs), and the ``.hea`` header is rewritten with the sample count
on every flush, so a power cut loses at most the last unflushed chunk and what is on disk is
always a readable record. Labels (activity, person) go into header comments and a ``.labels.csv``
with sample ranges, so they survive tools that ignore comments.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMU_SIGNALS", "WfdbError", "WfdbRecord", "WfdbSignal", "WfdbWriter", "imu_record_problem",
           "imu_signals", "read_wfdb"]

# An IMU record of `biod record`: six channels in chip units, accelerometer first.
IMU_SIGNALS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
IMU_UNITS = ("g", "g", "g", "deg/s", "deg/s", "deg/s")


@dataclass(frozen=True)
class WfdbSignal:
    """One channel: name, physical unit, gain (ADC units per physical unit), storage format."""

    name: str
    unit: str
    gain: float
    fmt: int = 16  # 16: int16; 24: 24-bit two's complement little-endian

    def __post_init__(self) -> None:
        if self.fmt not in (16, 24):
            raise ValueError(f"WFDB format {self.fmt} not supported here (16 or 24)")
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"signal name {self.name!r} must be non-empty without spaces")


class WfdbWriter:
    """Streaming writer of one WFDB record (all channels share one format)."""

    def __init__(self, directory: Path, record: str, fs_hz: float, signals: list[WfdbSignal],
                 comments: list[str] | None = None) -> None:
        if len({s.fmt for s in signals}) != 1:
            raise ValueError("all signals of one record must share a storage format")
        if not record.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"record name {record!r}: use letters, digits, '-' and '_'")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.record, self.fs_hz, self.signals = record, fs_hz, signals
        self.fmt = signals[0].fmt
        self.comments = list(comments or [])
        self.start = dt.datetime.now()
        self.n_samples = 0
        self._labels: list[tuple[int, int, str, str]] = []
        self._open_label: tuple[int, str, str] | None = None
        self._first = np.zeros(len(signals), dtype=np.int64)
        self._checksum = np.zeros(len(signals), dtype=np.int64)
        fd = os.open(self.dat_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._dat = os.fdopen(fd, "wb")
        self._write_header()

    @property
    def dat_path(self) -> Path:
        return self.dir / f"{self.record}.dat"

    @property
    def hea_path(self) -> Path:
        return self.dir / f"{self.record}.hea"

    def write_digital(self, samples: np.ndarray) -> None:
        """Append ADC counts, shape (n, channels)."""
        x = np.asarray(samples)
        if x.ndim != 2 or x.shape[1] != len(self.signals):
            raise ValueError(f"expected (n, {len(self.signals)}) samples, got {x.shape}")
        x = x.astype(np.int64)
        limit = 2 ** (self.fmt - 1)
        x = np.clip(x, -limit + 1, limit - 1)  # -2^(fmt-1) is WFDB's "no sample" marker
        if self.n_samples == 0 and len(x):
            self._first = x[0].copy()
        self._checksum = (self._checksum + x.sum(axis=0)) % 65536
        if self.fmt == 16:
            self._dat.write(x.astype("<i2").tobytes())
        else:
            u = (x.reshape(-1) & 0xFFFFFF).astype("<u4")
            self._dat.write(u.view(np.uint8).reshape(-1, 4)[:, :3].tobytes())
        self.n_samples += len(x)

    def write_physical(self, values: np.ndarray) -> None:
        """Append physical values (mV, g, deg/s ...), converted with each signal's gain."""
        gains = np.array([s.gain for s in self.signals])
        self.write_digital(np.rint(np.asarray(values, dtype=np.float64) * gains))

    def label(self, kind: str, value: str | None) -> None:
        """Start a label (e.g. kind='activity', value='walking') at the current sample; None ends it."""
        if self._open_label is not None:
            start, k, v = self._open_label
            self._labels.append((start, self.n_samples, k, v))
            self._open_label = None
        if value is not None:
            self._open_label = (self.n_samples, kind, value)

    def flush(self) -> None:
        """Samples, header and labels on disk: a recording killed after this keeps its labels
        (the open label counts up to the current sample)."""
        self._dat.flush()
        os.fsync(self._dat.fileno())
        self._write_header()
        self._write_labels()

    def close(self) -> None:
        self.label("", None)
        self.flush()
        self._dat.close()

    def _write_labels(self) -> None:
        rows = list(self._labels)
        if self._open_label is not None and self.n_samples > self._open_label[0]:
            start, kind, value = self._open_label
            rows.append((start, self.n_samples, kind, value))
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(["start_sample", "end_sample", "kind", "value"])
        w.writerows(rows)
        _replace_private(self.dir / f"{self.record}.labels.csv", text.getvalue())

    def __enter__(self) -> "WfdbWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_header(self) -> None:
        lines = [f"{self.record} {len(self.signals)} {self.fs_hz:g} {self.n_samples} "
                 f"{self.start:%H:%M:%S} {self.start:%d/%m/%Y}"]
        for i, s in enumerate(self.signals):
            lines.append(f"{self.record}.dat {self.fmt} {s.gain:g}/{s.unit} {self.fmt} 0 "
                         f"{int(self._first[i])} {int(self._checksum[i])} 0 {s.name}")
        lines += [f"# {c}" for c in self.comments]
        lines += [f"# label {k}={v} samples {a}-{b}" for a, b, k, v in self._labels]
        _replace_private(self.hea_path, "\n".join(lines) + "\n")


def imu_signals(acc_range_g: float, gyro_range_dps: float) -> list["WfdbSignal"]:
    """The six IMU channels at 32768 counts per configured full scale (format 16)."""
    return [WfdbSignal(n, u, 32768.0 / (acc_range_g if u == "g" else gyro_range_dps))
            for n, u in zip(IMU_SIGNALS, IMU_UNITS)]


def imu_record_problem(rec: "WfdbRecord") -> str | None:
    """Why ``rec`` is not an IMU record as ``biod record`` writes it (channel names and units),
    or None when it is."""
    if rec.names != IMU_SIGNALS:
        return f"expected signals {', '.join(IMU_SIGNALS)} (an IMU record of `biod record`), got {', '.join(rec.names)}"
    units = tuple(s.unit for s in rec.signals)
    if units != IMU_UNITS:
        return f"units {', '.join(units)}; expected g and deg/s"
    return None


class WfdbError(ValueError):
    """A WFDB record biod cannot read, phrased for the person who gave its path."""


@dataclass(frozen=True)
class WfdbRecord:
    """A record read back: physical values (float64, (n, channels)), its signals and comments."""

    path: Path  # the .hea
    fs_hz: float
    signals: tuple[WfdbSignal, ...]
    physical: np.ndarray
    comments: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.signals)

    def comment_fields(self) -> dict[str, str]:
        """``# key value`` comments as a dict (``person``, ``placement`` ...)."""
        return dict(c.split(" ", 1) for c in self.comments if " " in c)


def read_wfdb(hea: Path) -> WfdbRecord:
    """Read a single-file WFDB record in format 16 or 24: what :class:`WfdbWriter` (``biod
    record``) writes, and what most tools can convert to. Other formats (212, 80, multi-file
    records) are refused with the reason rather than misread."""
    hea = Path(hea)
    if hea.suffix != ".hea":
        hea = hea.with_name(hea.name + ".hea")
    try:
        lines = [l.strip() for l in hea.read_text().splitlines()]
    except OSError as exc:
        raise WfdbError(f"{hea}: cannot read the WFDB header ({exc.strerror})") from None
    try:
        head = lines[0].split()
        nsig, fs, n = int(head[1]), float(head[2].split("/")[0]), int(head[3])
        fields = [l.split() for l in lines[1:1 + nsig]]
        signals, files, baselines = [], set(), []
        for f in fields:
            if f[1] not in ("16", "24"):
                raise WfdbError(f"{hea}: signal format {f[1]}; biod reads formats 16 and 24 (what `biod record` "
                                "writes): convert the record with the wfdb package (rdrecord, then wrsamp with fmt 16)")
            gain_field, _, unit = f[2].partition("/")
            gain, _, base = gain_field.partition("(")
            adc_zero = int(f[4]) if len(f) > 4 else 0
            baselines.append(int(base.rstrip(")")) if base else adc_zero)
            signals.append(WfdbSignal(f[8] if len(f) > 8 else f"ch{len(signals)}", unit or "mV",
                                      float(gain) or 200.0, int(f[1])))  # gain 0 means WFDB's default, 200
            files.add(f[0])
    except WfdbError:
        raise
    except (IndexError, ValueError) as exc:
        raise WfdbError(f"{hea}: not a WFDB header biod can read ({exc})") from None
    if len(files) != 1 or len({s.fmt for s in signals}) != 1:
        raise WfdbError(f"{hea}: signals spread over several files or formats; biod reads single-file records")
    dat = hea.with_name(files.pop())
    try:
        raw = np.fromfile(dat, dtype=np.uint8)
    except OSError as exc:
        raise WfdbError(f"{dat}: cannot read the samples ({exc.strerror}); copy the .dat beside the .hea") from None
    width = signals[0].fmt // 8
    if raw.size < n * nsig * width:
        raise WfdbError(f"{dat} holds {raw.size // (nsig * width)} samples, the header says {n}: copy the record whole")
    raw = raw[: n * nsig * width]
    if width == 2:
        digital = raw.view("<i2").astype(np.int64)
    else:
        b = raw.reshape(-1, 3).astype(np.int64)
        digital = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        digital = np.where(digital >= 1 << 23, digital - (1 << 24), digital)
    gains = np.array([s.gain for s in signals])
    physical = (digital.reshape(n, nsig) - np.array(baselines)) / gains
    comments = tuple(l[1:].strip() for l in lines[1 + nsig:] if l.startswith("#"))
    return WfdbRecord(hea, fs, tuple(signals), physical, comments)


def _replace_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename), mode 0600: a power cut
    leaves the previous version or this one, and labels and headers are personal data too."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
