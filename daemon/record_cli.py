"""``biod record``: the raw ECG and IMU streams to WFDB, with labels, on the hub.

For a household's own fine-tuning data (``python -m training.finetune_imu --data DIR`` reads
the IMU records back). The samples are stored as the devices deliver them: the ECG exactly
(format 24 with the box's µV/LSB as gain), the IMU in format 16 at 32768 counts per configured
full scale (within 0.2 % of the BMI160's own LSB at its range: nothing measurable is lost). Nothing leaves the
hub and the files are private (0600 in a 0700 folder). One record per stream, ``ecg_<time>``
and ``imu_<time>``; ``--label`` (one of ``daemon.dsp.imu.RECORD_LABELS``, checked before
anything is recorded) labels the whole recording (``.labels.csv`` and the header, written on
every flush). SIGTERM/SIGHUP (a closed ssh session) end the recording cleanly.

What the box says about its samples is kept too, because a replay (``source: replay``) must show
the daemon what it saw live: a lead whose electrode was off is stored as WFDB's "no sample" for
every sample of that frame; frames lost on the link are stored as that many samples of "no
sample" on every lead (so the sample index stays the time since the start) with a header note
``gap samples A-B (...)``; a reconnect of the box, whose duration nobody knows, is noted as
``reconnected before sample N (...)``. The IMU keeps its ``gap before sample N`` notes (its
samples are joined, which ``training.data.imu`` splits at).
"""
from __future__ import annotations

import datetime as dt
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from daemon.config import BiodConfig
from daemon.record import WfdbSignal, WfdbWriter, imu_signals
from daemon.sources.factory import open_ecg_source
from daemon.sources.serial_ecg import EcgChunk
from firmware_protocol.ecg_serial import LEAD_NAMES


class _Stream:
    """One recorded stream: its writer (made on the first chunk, when the rate is known)."""

    def __init__(self, out: Path, kind: str, stamp: str, comments: list[str], label: str | None) -> None:
        self.out, self.kind, self.stamp, self.comments, self.label = out, kind, stamp, comments, label
        self.writer: WfdbWriter | None = None
        self.samples = 0
        self.fs = 1.0
        self._flushed_s = -1  # whole seconds on disk at the last flush; -1: none yet

    @property
    def seconds(self) -> float:  # from the sample count: summing 0.02 s steps drifts
        return self.samples / self.fs

    def write(self, fs: float, signals: list[WfdbSignal] | None, values: np.ndarray,
              valid: np.ndarray | None = None) -> None:
        """Append ``values`` (``valid``: per channel or per sample, False stores "no sample");
        ``signals`` (and ``comments``) only matter for the first chunk, which creates the record."""
        if self.writer is None:
            assert signals is not None
            self.writer = WfdbWriter(self.out, f"{self.kind}_{self.stamp}", fs, signals, self.comments)
            self.fs = fs
            if self.label:
                self.writer.label("activity", self.label)
        self.writer.write_physical(values, valid)
        self._wrote(len(values))

    def write_gap(self, n: int) -> None:
        """Append ``n`` samples of "no sample" on every channel (time the device sent nothing for)."""
        assert self.writer is not None
        self.writer.write_no_samples(n)
        self._wrote(n)

    def _wrote(self, n: int) -> None:
        """Flush after the first chunk, then every second of signal: a power cut loses at most a
        second. WHY the first chunk too: until a flush the header says 0 samples, which WFDB
        reads as "unknown" (biod reads nothing, wfdb.rdrecord fails), so a recording killed
        in its first second held samples no reader would show."""
        self.samples += n
        if int(self.seconds) > self._flushed_s:
            self._flushed_s = int(self.seconds)
            self.writer.flush()

    def note(self, text: str) -> None:
        if self.writer is not None:
            self.writer.comments.append(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _ecg_discontinuity(ecg: _Stream, chunk: EcgChunk, reconnected: bool, seconds: float) -> None:
    """Keep a break in the ECG stream in the record instead of splicing it silently.

    Frames lost on the link (``lost_frames_before``; the box's frames all hold as many samples
    as this one, as the daemon assumes when it measures the same gap) are filled with "no
    sample" up to the requested length, so sample indices, labels and a replay keep the live
    timing: a replay drops exactly those frames again. A reconnect has no measurable length:
    it is only noted, and a replay marks every lead off at that sample; so is a restart of the
    box within a session (its frame counter jumps back: no frames are counted lost)."""
    assert ecg.writer is not None  # the first chunk made the record; breaks come after it
    n = ecg.writer.n_samples
    if reconnected:
        ecg.note(f"reconnected before sample {n} (the box was re-opened; the time between is unknown "
                 "and the samples are joined there)")
    elif chunk.device_restarted:  # noted as a reconnect: a replay marks the joint the same way
        ecg.note(f"reconnected before sample {n} (the box restarted: its frame counter jumped back; the time "
                 "between is unknown and the samples are joined there)")
    if chunk.lost_frames_before:
        lost = chunk.lost_frames_before * len(chunk.samples_mv)
        fill = min(lost, max(0, int(np.ceil(seconds * ecg.fs)) - ecg.samples))
        ended = "" if fill == lost else f"; the recording reached --seconds inside it, {fill} stored"
        ecg.note(f"gap samples {n}-{n + fill} ({chunk.lost_frames_before} frames, {lost} samples, lost on the "
                 f"link; stored as WFDB 'no sample'{ended})")
        ecg.write_gap(fill)


#: seconds without any sample after which `biod record` stops waiting for the devices (``--wait``).
#: WHY 60: the serial and BLE sources retry a lost device with a back-off that tops out at 30 s
#: (after a drop they try again about 0.5, 1, 2, 4, 9, 19 and 49 s after it, then every 30 s):
#: 30 s of waiting gave a box or board that came back after the try at 19 s no further try
#: before the record ended.
QUIET_S = 60.0


def run_record(cfg: BiodConfig, out: Path, seconds: float, label: str | None, person: str | None,
               wait_s: float | None = None) -> int:
    from daemon.dsp.imu import RECORD_LABELS
    from daemon.identity.store import name_problem

    if label is not None and label not in RECORD_LABELS:
        print(f"biod record: --label {label!r} is not an activity the models know; use one of "
              f"{', '.join(RECORD_LABELS)}", file=sys.stderr)
        return 2
    # The person goes into every header as a comment line: a newline in it (a name pasted with
    # its CR/LF) made a record neither biod nor wfdb can read, found only at replay or training.
    # The one name rule of biod, checked before anything is opened or written.
    if person is not None:
        if (problem := name_problem(person)) is not None:
            print(f"biod record: --person: {problem}", file=sys.stderr)
            return 2
        person = person.strip()

    try:  # a bad --out is said before the devices are opened, not as a traceback at the first sample
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        print(f"biod record: cannot use --out {out} as the recordings folder ({exc.strerror or exc}): "
              "give a folder that exists or can be created", file=sys.stderr)
        return 2

    def ended(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the finally below closes the records, labels included

    previous = {sig: signal.signal(sig, ended) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _record(cfg, out, seconds, label, person, QUIET_S if wait_s is None else float(wait_s))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _record(cfg: BiodConfig, out: Path, seconds: float, label: str | None, person: str | None,
            wait_s: float) -> int:
    stamp = f"{dt.datetime.now():%Y%m%d_%H%M%S}"
    common = [f"person {person}"] if person else []
    ecg_q: queue.Queue = queue.Queue(maxsize=10000)
    source = emulator = thread = None
    stop = threading.Event()
    if cfg.ecg.enabled:
        source, emulator = open_ecg_source(cfg, ecg_q.put)
        thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
        thread.start()
    imu = None
    if cfg.imu.enabled:
        from daemon.sources.imu_thread import ImuThread

        imu = ImuThread(cfg.imu)
        imu.start()
    if source is None and imu is None:
        print("biod record: neither ecg nor imu is enabled in the config: nothing to record", file=sys.stderr)
        return 2
    ecg = _Stream(out, "ecg", stamp, [], label)
    imu_rec = _Stream(out, "imu", stamp, common + [f"placement {cfg.imu.placement}"], label)
    imu_sigs = imu_signals(cfg.imu.acc_range_g, cfg.imu.gyro_range_dps)
    # The devices get wait_s to appear and, after a drop, to come back (see QUIET_S);
    # --seconds counts signal, not the wall clock from the start, which had ended a box that
    # appeared late or dropped for a while short, with exit 0.
    deadline = time.monotonic() + wait_s
    interrupted = False
    connects = 0  # the source's sessions when the last chunk came: a change is a reconnect
    try:
        while time.monotonic() < deadline:
            # A replay that played its recording once sends no more: its end ends the ECG record.
            # (The state first: the source queued every chunk before it said "finished".)
            ecg_done = (source is None or ecg.seconds >= seconds
                        or (source.health.state == "finished" and ecg_q.empty()))
            if ecg_done and (imu is None or imu_rec.seconds >= seconds):
                break
            try:
                chunk = ecg_q.get(timeout=0.1)
            except queue.Empty:
                chunk = None
            imu_chunks = imu.drain() if imu is not None else []
            if chunk is not None or imu_chunks:
                deadline = time.monotonic() + wait_s
            if chunk is not None and ecg.seconds < seconds:
                ecg_sigs = None
                if ecg.writer is None:  # the box's identity and gain, once
                    info = source.health.device
                    ecg.comments = common + [f"biod record; device {info.model if info else '?'} "
                                             f"serial {info.serial if info else '?'}"]
                    gain = 1000.0 / info.uv_per_lsb if info else 1000.0
                    ecg_sigs = [WfdbSignal(n, "mV", gain, 24) for n in LEAD_NAMES[: chunk.samples_mv.shape[1]]]
                else:
                    _ecg_discontinuity(ecg, chunk, source.health.connects != connects, seconds)
                connects = source.health.connects
                if ecg.seconds < seconds:
                    ecg.write(chunk.rate_hz, ecg_sigs, chunk.samples_mv, chunk.lead_valid)
            for c in imu_chunks:
                if imu_rec.seconds >= seconds:
                    continue
                if c.gap and imu_rec.writer is not None:  # WFDB has no gaps: say where one was
                    imu_rec.note(f"gap before sample {imu_rec.writer.n_samples} (~{c.lost_samples} samples lost)")
                imu_rec.write(c.odr_hz, imu_sigs, np.concatenate([c.acc_g, c.gyro_dps], axis=1))
    except KeyboardInterrupt:
        interrupted = True
        print("biod record: stopped; keeping what was recorded", file=sys.stderr)
    finally:
        stop.set()
        if thread is not None:
            thread.join(5)
        if imu is not None:
            imu.stop()
        if emulator is not None:
            emulator.close()
        ecg.close()
        imu_rec.close()
    streams = [(name, s, src.health) for name, s, src in (("ECG", ecg, source), ("IMU", imu_rec, imu.source if imu else None))
               if src is not None]
    missing = [(name, health.last_error) for name, s, health in streams if s.writer is None]
    for name, why in missing:
        print(f"biod record: no {name} arrived ({why or 'no data'})", file=sys.stderr)
    for name, s in (("ECG", ecg), ("IMU", imu_rec)):
        if s.writer is not None:
            print(f"recorded {s.seconds:.1f} s of {name} to {s.writer.hea_path.with_suffix('')} (WFDB)")
    # short: the device went quiet for wait_s (a replay that played once ends its record: not short)
    short = [(name, s, health) for name, s, health in streams if s.writer is not None and s.seconds < seconds
             and not interrupted and health.state != "finished"]
    for name, s, health in short:
        print(f"biod record: only {s.seconds:.1f} s of {name} of the {seconds:g} s asked: nothing came for "
              f"{wait_s:g} s ({health.last_error or 'no error reported'}); the record is kept",
              file=sys.stderr)
    return 1 if missing or short else 0
