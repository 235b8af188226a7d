"""``biod record``: raw ECG from the configured source to WFDB, with labels, on the hub.

For a household's own fine-tuning data. The samples are stored exactly (format 24 with the
box's µV/LSB as gain), nothing leaves the hub, and the files are private (0600 in a 0700 folder).
"""
from __future__ import annotations

import datetime as dt
import queue
import sys
import threading
import time
from pathlib import Path

from daemon.sources.factory import open_ecg_source
from daemon.config import BiodConfig
from daemon.record import WfdbSignal, WfdbWriter
from firmware_protocol.ecg_serial import LEAD_NAMES


def run_record(cfg: BiodConfig, out: Path, seconds: float, label: str | None, person: str | None) -> int:
    chunks: queue.Queue = queue.Queue(maxsize=10000)
    source, emulator = open_ecg_source(cfg, chunks.put)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    writer: WfdbWriter | None = None
    recorded = 0.0
    deadline = time.monotonic() + seconds + 30  # allow the device 30 s to appear
    try:
        while recorded < seconds and time.monotonic() < deadline:
            try:
                chunk = chunks.get(timeout=0.5)
            except queue.Empty:
                continue
            if writer is None:
                info = source.health.device
                gain = 1000.0 / info.uv_per_lsb if info else 1000.0
                name = f"ecg_{dt.datetime.now():%Y%m%d_%H%M%S}"
                comments = [f"biod record; device {info.model if info else '?'} serial {info.serial if info else '?'}"]
                if person:
                    comments.append(f"person {person}")
                writer = WfdbWriter(out, name, chunk.rate_hz,
                                    [WfdbSignal(n, "mV", gain, 24) for n in LEAD_NAMES[: chunk.samples_mv.shape[1]]], comments)
                if label:
                    writer.label("activity", label)
            writer.write_physical(chunk.samples_mv)
            recorded += len(chunk.samples_mv) / chunk.rate_hz
            if int(recorded) != int(recorded - len(chunk.samples_mv) / chunk.rate_hz):
                writer.flush()
    finally:
        stop.set()
        thread.join(5)
        if emulator is not None:
            emulator.close()
        if writer is not None:
            writer.close()
    if writer is None:
        print(f"biod record: no ECG arrived ({source.health.last_error or 'no data'})", file=sys.stderr)
        return 1
    print(f"recorded {recorded:.1f} s to {writer.hea_path.with_suffix('')} (WFDB)")
    return 0
