"""Recording raw streams to WFDB, the format PhysioNet and every ECG tool reads.

``biod record`` keeps a household's own labelled data for fine-tuning, on the hub. Samples are
appended to the ``.dat`` file as they arrive (format 24 for the ECG box's 24-bit samples,
format 16 for the IMU's int16 LSBs), and the ``.hea`` header is rewritten with the sample count
on every flush, so a power cut loses at most the last unflushed chunk and what is on disk is
always a readable record. Activity labels go into header comments and a ``.labels.csv`` with
sample ranges, so they survive tools that ignore comments; the wearer (``--person``) is a
``person NAME`` header comment.

A sample that was not measured (an ECG lead whose electrode was off, the samples of frames lost
on the link) is stored as WFDB's "no sample" value, -2^(fmt-1), which the writer otherwise never
produces (it clips at -2^(fmt-1)+1): PhysioNet's tools read it as NaN, and so does
:func:`read_wfdb`. Recordings made before this marker was used hold no such value and read as
before.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMU_SIGNALS", "NO_SAMPLE", "WfdbError", "WfdbRecord", "WfdbSignal", "WfdbWriter", "imu_record_problem",
           "imu_signals", "read_wfdb"]

# An IMU record of `biod record`: six channels in chip units, accelerometer first.
IMU_SIGNALS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
IMU_UNITS = ("g", "g", "g", "deg/s", "deg/s", "deg/s")

#: WFDB's "no sample" (invalid) value per storage format: the most negative value the format holds.
NO_SAMPLE = {16: -(1 << 15), 24: -(1 << 23)}


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

    def write_digital(self, samples: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Append ADC counts, shape (n, channels). ``valid`` (bool, (channels,) for the whole
        chunk or (n, channels)): False stores WFDB's "no sample" there (a lead whose electrode
        was off), so a reader never mistakes it for a measured value."""
        x = np.asarray(samples)
        if x.ndim != 2 or x.shape[1] != len(self.signals):
            raise ValueError(f"expected (n, {len(self.signals)}) samples, got {x.shape}")
        x = x.astype(np.int64)
        limit = 2 ** (self.fmt - 1)
        x = np.clip(x, -limit + 1, limit - 1)  # -2^(fmt-1) is WFDB's "no sample" marker
        if valid is not None:
            x = np.where(self._valid_mask(valid, x.shape), x, NO_SAMPLE[self.fmt])
        if self.n_samples == 0 and len(x):
            self._first = x[0].copy()
        self._checksum = (self._checksum + x.sum(axis=0)) % 65536
        if self.fmt == 16:
            self._dat.write(x.astype("<i2").tobytes())
        else:
            u = (x.reshape(-1) & 0xFFFFFF).astype("<u4")
            self._dat.write(u.view(np.uint8).reshape(-1, 4)[:, :3].tobytes())
        self.n_samples += len(x)

    def write_physical(self, values: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Append physical values (mV, g, deg/s ...), converted with each signal's gain. NaN, and
        False in ``valid`` (as for :meth:`write_digital`), store "no sample": what
        :func:`read_wfdb` reads back as NaN."""
        gains = np.array([s.gain for s in self.signals])
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.signals):
            raise ValueError(f"expected (n, {len(self.signals)}) values, got {x.shape}")
        finite = np.isfinite(x)
        ok = finite if valid is None else finite & self._valid_mask(valid, x.shape)
        self.write_digital(np.rint(np.where(finite, x, 0.0) * gains), None if ok.all() else ok)

    def _valid_mask(self, valid: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``valid`` as bool ``shape``; per channel (the whole chunk) or per sample."""
        v = np.asarray(valid, dtype=bool)
        if v.shape not in ((len(self.signals),), shape):
            raise ValueError(f"valid must be ({len(self.signals)},) or {shape} bool, got {v.shape}")
        return np.broadcast_to(v, shape)

    def write_no_samples(self, n: int) -> None:
        """Append ``n`` samples of "no sample" on every channel: a stretch of time the device
        delivered nothing for (frames lost on the link). Stored rather than skipped so that the
        sample index stays the time since the start, which labels and replays rely on."""
        block = max(1, int(self.fs_hz) * 10)  # bounded memory for a long gap
        for start in range(0, max(0, n), block):
            k = min(block, n - start)
            self.write_digital(np.zeros((k, len(self.signals)), np.int64), np.zeros((k, len(self.signals)), bool))

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
            lines.append(f"{self.record}.dat {self.fmt} {_gain_text(s.gain)}/{s.unit} {self.fmt} 0 "
                         f"{int(self._first[i])} {int(self._checksum[i])} 0 {s.name}")
        lines += [f"# {c}" for c in self.comments]
        lines += [f"# label {k}={v} samples {a}-{b}" for a, b, k, v in self._labels]
        _replace_private(self.hea_path, "\n".join(lines) + "\n")


def _gain_text(gain: float) -> str:
    """``gain`` as the shortest text that reads back as the same float ("20971.52", "1000").
    WHY not ``:g``: its 6 significant digits stored the ECG box's 20971.52 counts/mV as
    20971.5, so every reader scaled the exact 24-bit samples by a gain 1e-6 off (up to 0.38 uV
    at full scale) and a record -> replay round trip was no longer bit-exact."""
    text = repr(float(gain))
    return text[:-2] if text.endswith(".0") else text


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

    @property
    def valid(self) -> np.ndarray:
        """bool (n, channels): False where the record holds WFDB's "no sample" (``physical`` is
        NaN there): a lead that was off, or time the device delivered nothing for."""
        return ~np.isnan(self.physical)

    def comment_fields(self) -> dict[str, str]:
        """``# key value`` comments as a dict (``person``, ``placement`` ...)."""
        return dict(c.split(" ", 1) for c in self.comments if " " in c)


def read_wfdb(hea: Path) -> WfdbRecord:
    """Read a single-file WFDB record in format 16 or 24: what :class:`WfdbWriter` (``biod
    record``) writes, and what most tools can convert to. Other formats (212, 80, multi-file
    records) are refused with the reason rather than misread, and so is a header that does not
    describe its ``.dat`` (a signal line missing, no positive sampling rate, a negative or too
    large sample count): each as a :class:`WfdbError` naming the file, never a traceback from
    deep in numpy. WFDB's "no sample" value reads as NaN (see :attr:`WfdbRecord.valid`)."""
    hea = Path(hea)
    if hea.suffix != ".hea":
        hea = hea.with_name(hea.name + ".hea")
    try:
        lines = [l.strip() for l in hea.read_text().splitlines()]
    except OSError as exc:
        raise WfdbError(f"{hea}: cannot read the WFDB header ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise WfdbError(f"{hea}: not a text file; give the record's .hea header, not its .dat") from None
    # WFDB lets comment lines stand anywhere; the record line and the signal lines are the rest
    specs = [l for l in lines if l and not l.startswith("#")]
    comments = tuple(l[1:].strip() for l in lines if l.startswith("#"))
    nsig, fs, n = _record_line(hea, specs[0].split() if specs else [])
    if len(specs) - 1 != nsig:
        raise WfdbError(f"{hea}: the record line announces {nsig} signal(s) but {len(specs) - 1} signal line(s) "
                        "follow: the header is damaged; copy the record again or fix the count on its first line")
    signals, files, baselines = [], set(), []
    for k, line in enumerate(specs[1:], start=1):
        signal, baseline = _signal_line(hea, k, line.split())
        signals.append(signal)
        baselines.append(baseline)
        files.add(line.split()[0])
    if len(files) != 1 or len({s.fmt for s in signals}) != 1:
        raise WfdbError(f"{hea}: signals spread over several files or formats; biod reads single-file records")
    dat = hea.with_name(files.pop())
    try:
        raw = np.fromfile(dat, dtype=np.uint8)
    except OSError as exc:
        raise WfdbError(f"{dat}: cannot read the samples ({exc.strerror}); copy the .dat beside the .hea") from None
    width = signals[0].fmt // 8
    if n is None:  # WFDB lets the count be left out: the .dat holds every sample
        n = raw.size // (nsig * width)
    # More bytes than the header counts is the tail a recording wrote after its last header
    # update (a power cut between flushes): the header's count is what was complete, so read that.
    if raw.size < n * nsig * width:
        raise WfdbError(f"{dat} holds {raw.size // (nsig * width)} samples, the header says {n}: copy the record whole")
    raw = raw[: n * nsig * width]
    if width == 2:
        digital = raw.view("<i2").astype(np.int64)
    else:
        b = raw.reshape(-1, 3).astype(np.int64)
        digital = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        digital = np.where(digital >= 1 << 23, digital - (1 << 24), digital)
    digital = digital.reshape(n, nsig)
    gains = np.array([s.gain for s in signals])
    physical = (digital - np.array(baselines)) / gains
    physical[digital == NO_SAMPLE[signals[0].fmt]] = np.nan
    return WfdbRecord(hea, fs, tuple(signals), physical, comments)


def _record_line(hea: Path, head: list[str]) -> tuple[int, float, int | None]:
    """(signals, sampling rate, samples or None when left out) of a header's first line."""
    if not head:
        raise WfdbError(f"{hea}: the header is empty; give the .hea that `biod record` (or a WFDB tool) wrote")
    if "/" in head[0]:
        raise WfdbError(f"{hea}: a multi-segment record ({head[0]}); biod reads single-segment records: "
                        "join the segments with the wfdb package (rdrecord, then wrsamp)")
    if len(head) < 2:
        raise WfdbError(f"{hea}: the record line {' '.join(head)!r} gives no number of signals")
    nsig = _number(hea, head[1], int, "the number of signals on the record line")
    if nsig < 1:
        raise WfdbError(f"{hea}: the record line says {nsig} signals; a record biod reads has at least one")
    fs = 250.0  # WFDB's default when the field is left out
    if len(head) > 2:
        fs = _number(hea, head[2].split("/")[0].split("(")[0], float, "the sampling frequency on the record line")
        if not (np.isfinite(fs) and fs > 0):
            raise WfdbError(f"{hea}: sampling frequency {head[2]} on the record line; "
                            "it must be a number of Hz above 0")
    n = None
    if len(head) > 3:
        n = _number(hea, head[3], int, "the number of samples on the record line")
        if n < 0:
            raise WfdbError(f"{hea}: the record line says {n} samples; the count cannot be negative")
    return nsig, fs, n


def _signal_line(hea: Path, k: int, f: list[str]) -> tuple[WfdbSignal, int]:
    """Signal line ``k`` (1-based) as a :class:`WfdbSignal` and its baseline (ADC units)."""
    where = f"signal line {k}"
    if len(f) < 2:
        raise WfdbError(f"{hea}: {where} ({' '.join(f)!r}) gives no storage format")
    if f[1] not in ("16", "24"):
        raise WfdbError(f"{hea}: signal format {f[1]}; biod reads formats 16 and 24 (what `biod record` "
                        "writes): convert the record with the wfdb package (rdrecord, then wrsamp with fmt 16)")
    gain_field, _, unit = (f[2] if len(f) > 2 else "").partition("/")
    gain_text, _, base = gain_field.partition("(")
    gain = _number(hea, gain_text, float, f"the ADC gain on {where}") if gain_text else 0.0
    if not np.isfinite(gain):
        raise WfdbError(f"{hea}: ADC gain {gain_text} on {where}; it must be a finite number")
    adc_zero = _number(hea, f[4], int, f"the ADC zero on {where}") if len(f) > 4 else 0
    baseline = _number(hea, base.rstrip(")"), int, f"the baseline on {where}") if base else adc_zero
    name = f[8] if len(f) > 8 else f"ch{k - 1}"
    try:  # gain 0 means WFDB's default, 200
        return WfdbSignal(name, unit or "mV", gain or 200.0, int(f[1])), baseline
    except ValueError as exc:
        raise WfdbError(f"{hea}: {where}: {exc}") from None


def _number(hea: Path, text: str, kind: type, what: str):
    """``kind(text)``, or a :class:`WfdbError` saying which field of the header is not a number."""
    try:
        return kind(text)
    except ValueError:
        raise WfdbError(f"{hea}: {what} is {text!r}, not {'an integer' if kind is int else 'a number'}; "
                        "the header is damaged") from None


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
