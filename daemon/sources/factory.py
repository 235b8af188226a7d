"""Build the ECG source the configuration asks for: the real box over serial or TCP, or the
emulated box on a pseudo-terminal playing a shipped recording (the demo, tests, and ``biod
calibrate`` without hardware) or a household's own ``biod record`` file (``source: replay``).
One place, so ``biod run``, ``biod calibrate`` and ``biod record`` open devices the same way."""
from __future__ import annotations

import logging
from collections.abc import Callable

from daemon.config import BiodConfig, ConfigError
from daemon.sources.serial_ecg import (
    SERIAL_BY_ID,
    EcgChunk,
    EcgSource,
    serial_by_id_opener,
    serial_opener,
    tcp_opener,
)

log = logging.getLogger(__name__)


def open_ecg_source(cfg: BiodConfig, on_chunk: Callable[[EcgChunk], None]) -> tuple[EcgSource, object | None]:
    """(source, emulator or None). The caller runs ``source.run(stop)`` in a thread and closes
    the emulator when done."""
    e = cfg.ecg
    common = dict(rate_hz=e.rate_hz, match_serial=e.match_serial, stall_timeout_s=e.stall_timeout_s,
                  boot_wait_s=e.boot_wait_s)
    if e.source in ("emulator", "replay"):
        from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
        from firmware_protocol.emulators.recordings import list_recordings, load_recording

        if e.source == "replay":
            from daemon.sources.replay import ecg_recording

            assert e.replay is not None  # the config validator guarantees it
            recording, speed, loop = ecg_recording(e.replay.path), e.replay.speed, e.replay.loop
        else:
            try:
                recording = load_recording(e.emulator.recording)
            except (KeyError, FileNotFoundError, ValueError):
                raise ConfigError(f"ecg.emulator.recording: no recording {e.emulator.recording!r}; "
                                  f"choose one of {', '.join(list_recordings())}") from None
            speed, loop = e.emulator.speed, e.emulator.loop
        emulator = EcgBoxEmulator(recording, rate_hz=e.rate_hz, speed=speed, loop=loop)
        path = emulator.open_pty()
        emulator.start()
        what = f"a replay of {recording.source}" if e.source == "replay" else f"recording {recording.name!r}"
        log.info("ecg: emulated box streaming %s on %s at %gx%s", what, path, speed, "" if loop else ", once")
        # A box that plays its recording once tells the source when it is done: the source then
        # logs "replay finished" and goes idle instead of re-opening a box with nothing to send.
        return EcgSource(serial_opener(path, e.baud), f"emulator {path}", on_chunk, baud=e.baud,
                         finished=None if loop else (lambda: emulator.finished), **common), emulator
    if e.source == "serial":
        if e.port is None:  # found by its USB serial number at every (re)open
            assert e.match_serial is not None  # the config validator guarantees one of them
            return EcgSource(serial_by_id_opener(e.match_serial, e.baud), f"box {e.match_serial} in {SERIAL_BY_ID}",
                             on_chunk, baud=e.baud, **common), None
        port = str(e.port)
        return EcgSource(serial_opener(port, e.baud), port, on_chunk, baud=e.baud, **common), None
    return EcgSource(tcp_opener(e.host, int(e.tcp_port or 0)), f"tcp://{e.host}:{e.tcp_port}", on_chunk, **common), None
