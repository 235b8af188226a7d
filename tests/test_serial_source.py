"""The ECG source over a real pty: handshake, exact data, and recovery from unplug/replug,
silence, wrong paths and garbage — by itself, without losing its thread."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from daemon.sources.serial_ecg import EcgChunk, EcgSource, serial_opener
from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
from firmware_protocol.emulators.recordings import load_recording


class Collector:
    def __init__(self) -> None:
        self.chunks: list[EcgChunk] = []
        self.lock = threading.Lock()

    def __call__(self, chunk: EcgChunk) -> None:
        with self.lock:
            self.chunks.append(chunk)

    def count(self) -> int:
        with self.lock:
            return len(self.chunks)

    def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            assert time.monotonic() < deadline, f"only {self.count()} chunks after {timeout} s"
            time.sleep(0.02)


def _start(source: EcgSource) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def _poll(condition, timeout_s: float, what: str) -> None:
    """Wait for ``condition()`` (a fixed sleep before the assert flaked on a slow machine)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def _run_until_chunks(source: EcgSource, got: Collector, n: int, timeout_s: float) -> None:
    """Run ``source`` in its thread until ``got`` holds ``n`` chunks (asserting it within
    ``timeout_s``), then stop it."""
    thread, stop = _start(source)
    try:
        got.wait(n, timeout_s)
    finally:
        stop.set()
        thread.join(5)


def _run_until_error(source: EcgSource, timeout_s: float, poll_s: float = 0.05) -> None:
    """Run ``source`` in its thread until it reports an error (or ``timeout_s``), then stop it."""
    thread, stop = _start(source)
    try:
        deadline = time.monotonic() + timeout_s
        while not source.health.errors and time.monotonic() < deadline:
            time.sleep(poll_s)
    finally:
        stop.set()
        thread.join(5)


@pytest.fixture
def box(tmp_path):
    rec = load_recording("ludb-16")
    emu = EcgBoxEmulator(rec, rate_hz=500, speed=4.0)
    link = tmp_path / "biod-ecg"
    emu.open_pty(link=str(link))
    emu.start()
    yield emu, link, rec
    emu.close()


def test_handshake_and_exact_samples(box) -> None:
    emu, link, rec = box
    got = Collector()
    source = EcgSource(serial_opener(str(link), 460800), str(link), got, rate_hz=500)
    thread, stop = _start(source)
    try:
        got.wait(60, 15)
        assert source.health.state == "streaming"
        assert source.health.device is not None and source.health.device.serial == emu.device_info.serial
        x = np.concatenate([c.samples_mv for c in got.chunks[:50]])
        # START replays the recording from sample 0: the samples are the recording to within 1 LSB.
        lsb = source.health.device.uv_per_lsb / 1000
        np.testing.assert_allclose(x, rec.leads_mv[: len(x)], atol=1.01 * lsb)
        assert all(c.lead_valid.all() for c in got.chunks[:50])
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_unplug_and_replug_resume_by_themselves(box) -> None:
    """Wearers come and go all day: each replug (a new /dev/pts path behind the same symlink,
    like udev after a replug) must be picked up at the first back-off step, not after the
    longest delay that earlier unplugs worked up to (a 20 s step here)."""
    emu, link, _ = box
    got = Collector()
    source = EcgSource(serial_opener(str(link), 460800), str(link), got, rate_hz=500, stall_timeout_s=1.0)
    source.BACKOFF_S = (0.5, 20.0)
    thread, stop = _start(source)
    try:
        got.wait(20, 15)
        for _ in range(3):
            emu.unplug()
            deadline = time.monotonic() + 10
            while source.health.state == "streaming" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert source.health.state != "streaming"
            assert source.health.last_error
            n = got.count()
            emu.replug()
            got.wait(n + 20, 10)  # fails if this replug waited for the 20 s step
            assert source.health.state == "streaming"
        assert source.health.connects == 4
    finally:
        stop.set()
        thread.join(5)


def test_garbage_and_lost_frames_are_counted_not_fatal(box) -> None:
    emu, link, _ = box
    got = Collector()
    source = EcgSource(serial_opener(str(link), 460800), str(link), got, rate_hz=500)
    thread, stop = _start(source)
    try:
        got.wait(10, 15)
        emu.inject_garbage(300)
        emu.drop_next(3)
        emu.corrupt_next(2)
        n = got.count()
        got.wait(n + 40, 15)
        h = source.health
        assert h.lost_frames >= 5  # 3 dropped + 2 corrupted frames never arrive
        assert h.crc_errors >= 2 or h.resyncs >= 1
        assert sum(c.lost_frames_before for c in got.chunks) == h.lost_frames
        assert h.state == "streaming"
    finally:
        stop.set()
        thread.join(5)


def test_missing_port_gives_an_actionable_error_and_keeps_retrying(tmp_path, caplog) -> None:
    """A box that stays away is named once at ERROR, not at every try (the journal of a hub
    whose box was unplugged for a week held one ERROR and one WARNING every 30 s); the health
    record still counts every try, and the box's return is logged with the count."""
    got = Collector()
    path = tmp_path / "no-such-tty"
    source = EcgSource(serial_opener(str(path), 460800), str(path), got, rate_hz=500)
    source.BACKOFF_S = (0.1,)
    with caplog.at_level(logging.DEBUG, logger="daemon.sources"):
        thread, stop = _start(source)
        _poll(lambda: len(source.health.errors) >= 5, 10, "five attempts")
        stop.set()
        thread.join(5)
    assert "does not exist" in (source.health.last_error or "")
    assert "ecg.port" in source.health.last_error
    assert len(source.health.errors) >= 5  # it retried instead of dying
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
    assert len(errors) == 1 and "does not exist" in errors[0].getMessage()
    assert len(warnings) == 1
    assert sum("(try " in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) >= 4


def test_a_box_that_comes_back_after_failed_tries_is_logged_as_working_again(tmp_path, caplog) -> None:
    rec = load_recording("ludb-16")
    link = tmp_path / "biod-ecg"
    got = Collector()
    source = EcgSource(serial_opener(str(link), 460800), str(link), got, rate_hz=500)
    source.BACKOFF_S = (0.1,)
    emu = EcgBoxEmulator(rec, rate_hz=500, speed=4.0)
    with caplog.at_level(logging.INFO, logger="daemon.sources"):
        thread, stop = _start(source)
        try:
            _poll(lambda: len(source.health.errors) >= 3, 10, "three failed tries")
            emu.open_pty(link=str(link))
            emu.start()
            got.wait(5, 15)
        finally:
            stop.set()
            thread.join(5)
            emu.close()
    back = [r.getMessage() for r in caplog.records if "working again" in r.getMessage()]
    assert len(back) == 1 and "failed tries" in back[0]
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_a_second_reader_is_refused_with_the_fix_and_the_first_keeps_streaming(box) -> None:
    emu, link, _ = box
    first = Collector()
    service = EcgSource(serial_opener(str(link), 460800), str(link), first, rate_hz=500)
    t1, stop1 = _start(service)
    first.wait(20, 10)
    second = EcgSource(serial_opener(str(link), 460800), str(link), Collector(), rate_hz=500)
    second.BACKOFF_S = (0.1,)
    t2, stop2 = _start(second)  # e.g. biod calibrate while the service runs
    _poll(lambda: "in use" in (second.health.last_error or ""), 10, "the second reader's refusal")
    stop2.set()
    t2.join(5)
    n = first.count()
    first.wait(n + 20, 10)  # the service's stream went on, untouched
    stop1.set()
    t1.join(5)
    assert "in use by another program" in (second.health.last_error or "")
    assert "systemctl stop biod" in second.health.last_error and second.health.connects == 0
    assert service.health.lost_frames == 0 and service.health.crc_errors == 0


def test_wrong_serial_number_is_refused(box) -> None:
    emu, link, _ = box
    source = EcgSource(serial_opener(str(link), 460800), str(link), Collector(), rate_hz=500, match_serial="OTHER-BOX")
    source.BACKOFF_S = (0.1,)
    thread, stop = _start(source)
    _poll(lambda: "ecg.match_serial" in (source.health.last_error or ""), 15, "the serial-number refusal")
    stop.set()
    thread.join(5)
    assert "ecg.match_serial" in (source.health.last_error or "")


def test_silent_box_is_reopened(box) -> None:
    emu, link, _ = box
    got = Collector()
    source = EcgSource(serial_opener(str(link), 460800), str(link), got, rate_hz=500, stall_timeout_s=0.5)
    source.BACKOFF_S = (0.1,)
    thread, stop = _start(source)
    try:
        got.wait(10, 15)
        emu.stop()  # the box stops talking but the port stays
        deadline = time.monotonic() + 5
        while "stopped sending data" not in (source.health.last_error or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "stopped sending data" in (source.health.last_error or "")
        n = got.count()
        emu.start()
        got.wait(n + 10, 15)
        assert source.health.connects >= 2
    finally:
        stop.set()
        thread.join(5)


def test_a_usb_box_is_found_by_its_serial_number_across_replugs(tmp_path) -> None:
    """No udev rule: with only ecg.match_serial, the source looks the box up in
    /dev/serial/by-id at every open, so a replug under a new tty path is followed."""
    from daemon.config import parse_config
    from daemon.sources.serial_ecg import SourceError, find_by_serial, serial_by_id_opener

    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (by_id / "usb-Other_Thing_XYZ123-if00").symlink_to("/dev/null")  # someone else's device
    with pytest.raises(SourceError, match="no serial device with serial number 'BIOD-EMU-0001'.*is the box plugged in"):
        find_by_serial("BIOD-EMU-0001", by_id)
    emu = EcgBoxEmulator(load_recording("ludb-16"), rate_hz=500, speed=2.0, serial="BIOD-EMU-0001")
    emu.open_pty(link=str(by_id / "usb-biod_ECG_box_BIOD-EMU-0001-if00"))
    emu.start()
    got = Collector()
    source = EcgSource(serial_by_id_opener("BIOD-EMU-0001", 460800, by_id), "box BIOD-EMU-0001", got,
                       rate_hz=500, match_serial="BIOD-EMU-0001", stall_timeout_s=1.0)
    source.BACKOFF_S = (0.5,)
    thread, stop = _start(source)
    try:
        got.wait(20, 15)
        first = source.health.device
        emu.unplug()
        deadline = time.monotonic() + 10
        while source.health.state == "streaming" and time.monotonic() < deadline:
            time.sleep(0.02)
        n = got.count()
        emu.replug()
        got.wait(n + 20, 10)
        assert source.health.state == "streaming" and source.health.connects == 2
        assert first is not None and first.serial == "BIOD-EMU-0001"
    finally:
        stop.set()
        thread.join(5)
        emu.close()
    cfg = parse_config("ecg:\n  source: serial\n  match_serial: BIOD-EMU-0001\n")
    assert cfg.ecg.port is None


class _ScriptedBox:
    """A box behind a transport (the source's I/O seam): answers the handshake by the protocol,
    then streams DATA frames that ``frame(seq, t_us)`` encodes. For frames the emulator, which
    keeps to the spec, never sends."""

    def __init__(self, frame, channels: int = 3) -> None:
        from firmware_protocol import ecg_serial as proto

        self._proto, self._frame = proto, frame
        self._info = proto.DeviceInfo("scripted", "SCRIPT-1", "fw-test", (250, 500, 1000), 500, 6.0, channels,
                                      proto.DEFAULT_UV_PER_LSB)
        self._dec, self._out = proto.Decoder(), bytearray()
        self._streaming, self._seq, self._t = False, 0, 0

    def write(self, data: bytes) -> int:
        p = self._proto
        for ev in self._dec.feed(data):
            if isinstance(ev, p.HostCommand):
                if ev.command == p.Command.GET_INFO:
                    self._out += p.encode_device_info(self._info, ev.seq)
                else:
                    self._out += p.encode_ack(ev.command, ev.seq)
                    self._streaming = self._streaming or ev.command == p.Command.START
        return len(data)

    def read(self, n: int) -> bytes:
        time.sleep(0.02)
        if self._streaming:
            self._out += self._frame(self._seq, self._t)
            self._seq, self._t = (self._seq + 1) & 0xFFFF, self._t + 20_000
        data, self._out[:] = bytes(self._out[:n]), self._out[n:]
        return data

    def close(self) -> None:
        pass


def test_a_lead_I_only_box_gives_three_leads_with_II_and_III_invalid() -> None:
    """The spec allows 1..3 channels; the DSP and the models read three leads with a validity
    each. A 1-channel box used to reach the models as a (300, 1) window and end the ECG task at
    the first clean window."""
    from firmware_protocol import ecg_serial as proto

    counts = np.arange(10, dtype=np.int32)[:, None] * 100
    got = Collector()
    source = EcgSource(lambda: _ScriptedBox(lambda seq, t: proto.encode_data_frame(seq, t, proto.Electrode(0), counts),
                                            channels=1), "scripted", got, rate_hz=500)
    _run_until_chunks(source, got, 5, 10)
    chunk = got.chunks[0]
    assert chunk.samples_mv.shape == (10, 3) and chunk.lead_valid.tolist() == [True, False, False]
    lsb_mv = proto.DEFAULT_UV_PER_LSB / 1000
    np.testing.assert_allclose(chunk.samples_mv[:, 0], counts[:, 0] * lsb_mv, rtol=1e-6)
    assert not chunk.samples_mv[:, 1:].any()


def test_frames_that_break_the_spec_are_logged_with_the_reason_and_counted(caplog) -> None:
    """CRC-valid frames with a reserved lead-off bit set (spec: bits 4-7 MUST be 0) carry no
    usable samples. The host must say why, not only that the box 'stopped sending data'."""
    import struct

    from firmware_protocol import ecg_serial as proto

    def bad(seq: int, t: int) -> bytes:
        head = struct.pack("<IBBBBf", t, 0x10, 3, 10, 0, proto.DEFAULT_UV_PER_LSB)
        return proto.encode_frame(proto.FrameType.DATA, seq, head + bytes(3 * 10 * 3))

    got = Collector()
    source = EcgSource(lambda: _ScriptedBox(bad), "scripted", got, rate_hz=500, stall_timeout_s=1.0)
    source.BACKOFF_S = (5.0,)
    caplog.set_level("ERROR", logger="daemon.sources.serial_ecg")
    _run_until_error(source, 10)
    assert got.count() == 0
    assert source.health.protocol_errors >= 10
    stall = source.health.errors[0]
    assert "stopped sending data" in stall and "broke the protocol" in stall and "reserved lead-off bits" in stall
    lines = [r.getMessage() for r in caplog.records if "breaks biod ECG protocol v1" in r.getMessage()]
    assert len(lines) == 1, "one line per minute, not one per frame"


class _PtyBox:
    """A box scripted by the test behind a real pseudo-terminal: the source opens it with
    pyserial, exactly as it opens hardware. It answers GET_INFO, STOP and SET_RATE by the
    protocol; ``on_start(n, seq)`` gives the bytes it answers its n-th START (sent with ``seq``)
    with, for behaviour the emulator, which keeps to the spec, never shows (a device reset that
    resumes streaming, a command damaged on the line)."""

    def __init__(self, on_start) -> None:
        import os
        import tty

        from firmware_protocol import ecg_serial as proto

        self._proto, self._on_start = proto, on_start
        self._info = proto.DeviceInfo("scripted", "PTY-1", "fw-test", (250, 500, 1000), 500, 6.0, 3,
                                      proto.DEFAULT_UV_PER_LSB)
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # held open by the box itself: a host closing the port is no hang-up here
        self.path = os.ttyname(self._slave)
        self.starts = self.infos = 0
        self._dec = proto.Decoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import os
        import select

        p = self._proto
        while not self._stop.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                continue
            out = bytearray()
            for ev in self._dec.feed(data):
                if not isinstance(ev, p.HostCommand):
                    continue
                if ev.command == p.Command.GET_INFO:
                    self.infos += 1
                    out += p.encode_device_info(self._info, ev.seq)
                elif ev.command == p.Command.START:
                    self.starts += 1
                    out += self._on_start(self.starts, ev.seq)
                else:
                    out += p.encode_ack(ev.command, ev.seq)
            if out:
                os.write(self.master, bytes(out))  # blocking: the host reads as it goes

    def close(self) -> None:
        import os

        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self._slave)


def _frames(seqs) -> bytes:
    from firmware_protocol import ecg_serial as proto

    return b"".join(proto.encode_data_frame(s, s * 20_000, proto.Electrode.NONE, np.full((10, 3), 1000, np.int32))
                    for s in seqs)


def _run_scripted(on_start, chunks: int, **source_kw) -> tuple[EcgSource, Collector, _PtyBox]:
    """A source against a ``_PtyBox`` until ``chunks`` chunks came (or 15 s), then both stopped."""
    box = _PtyBox(on_start)
    got = Collector()
    source = EcgSource(serial_opener(box.path, 460800), box.path, got, rate_hz=500, **source_kw)
    thread, stop = _start(source)
    try:
        got.wait(chunks, 15)
    finally:
        stop.set()
        thread.join(5)
        box.close()
    return source, got, box


def test_a_box_that_restarts_mid_stream_is_a_restart_not_65000_lost_frames() -> None:
    """Spec section 5: a backwards seq jump is a device reset, no loss counted. The decoder
    counted it so; the chunk handed on said ~64 000 frames lost (about 21 min), and `biod
    record` filled the rest of the recording with 'no sample'. One rule now serves both."""
    from firmware_protocol import ecg_serial as proto

    def on_start(n: int, seq: int) -> bytes:  # a watchdog reset after seq 1099 that streams on
        return proto.encode_ack(proto.Command.START, seq) + (_frames([*range(1000, 1100), *range(100)]) if n == 1 else b"")

    source, got, _ = _run_scripted(on_start, 200)
    chunks = got.chunks[:200]
    assert [c.seq for c in chunks] == [*range(1000, 1100), *range(100)]
    assert [c.lost_frames_before for c in chunks] == [0] * 200
    assert [c.seq for c in chunks if c.device_restarted] == [0]
    assert source.health.lost_frames == 0 and source.health.connects == 1
    # the shared rule, as the decoder and the source apply it
    assert proto.seq_step(1099, 0) == proto.SeqStep(restart=True)
    assert proto.seq_step(65535, 0) == proto.SeqStep() and proto.seq_step(65534, 1) == proto.SeqStep(lost=2)
    assert proto.seq_step(7, 7).duplicate and proto.seq_step(None, 5) == proto.SeqStep()


@pytest.mark.parametrize("first_reply", ["nak_bad_crc", "stale_ack"])
def test_a_start_damaged_on_the_line_is_sent_again_not_taken_as_a_refusal(first_reply: str, caplog) -> None:
    """NAK BAD_CRC means the box got a damaged copy (spec section 7), not that it refuses: the
    host sends START again in the same session instead of tearing it down and re-opening the
    port. A stale ACK for another command (seq never sent for START) is not START's answer."""
    from firmware_protocol import ecg_serial as proto

    def on_start(n: int, seq: int) -> bytes:
        if n == 1:
            if first_reply == "nak_bad_crc":
                return proto.encode_nak(0, proto.ErrorCode.BAD_CRC)
            return proto.encode_ack(proto.Command.SET_RATE, (seq + 100) & 0xFFFF)  # not START's, not its seq
        return proto.encode_ack(proto.Command.START, seq) + _frames(range(50))

    caplog.set_level("WARNING", logger="daemon.sources.serial_ecg")
    source, got, box = _run_scripted(on_start, 50, stall_timeout_s=5.0)
    assert source.health.errors == [] and source.health.connects == 1
    assert (box.infos, box.starts) == (1, 2)  # one session: START sent twice, the port opened once
    if first_reply == "nak_bad_crc":
        assert any("START damaged (NAK BAD_CRC)" in r.getMessage() for r in caplog.records)


def test_a_box_that_keeps_receiving_start_damaged_is_named_after_three_tries() -> None:
    """Bounded: three tries, then one error that names the code (BAD_CRC, not "(1)", which is
    how an IntEnum formats on Python 3.11) and the fix."""
    from firmware_protocol import ecg_serial as proto

    box = _PtyBox(lambda n, seq: proto.encode_nak(0, proto.ErrorCode.BAD_CRC))
    source = EcgSource(serial_opener(box.path, 460800), box.path, Collector(), rate_hz=500)
    source.BACKOFF_S = (30.0,)
    thread, stop = _start(source)
    try:
        deadline = time.monotonic() + 15
        while not source.health.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        starts = box.starts
    finally:
        stop.set()
        thread.join(5)
        box.close()
    (error,) = source.health.errors
    assert starts == 3
    assert "did not start streaming" in error and "BAD_CRC" in error and "cable" in error, error


def test_a_command_without_reply_is_sent_again_after_250_ms_and_answered(box, caplog) -> None:
    """Spec section 6: no reply after 250 ms, send it again; unresponsive after 3 tries. The box
    hears the first two GET_INFOs and answers neither (lost on the line, or a busy box); the
    third is answered and the session streams, on the port opened once."""
    from firmware_protocol.ecg_serial import Command

    emu, link, _ = box
    emu.ignore_next(Command.GET_INFO, 2)
    caplog.set_level("INFO", logger="daemon.sources.serial_ecg")
    got = Collector()
    source = EcgSource(serial_opener(str(link), 460800), str(link), got, rate_hz=500)
    source.BACKOFF_S = (30.0,)  # a failed handshake would show as a missing stream, not a quick second session
    _run_until_chunks(source, got, 10, 15)
    counters = emu.counters()
    assert counters.commands_ignored == 2
    assert source.health.errors == [] and source.health.connects == 1
    retries = [r.getMessage() for r in caplog.records if "sending it again" in r.getMessage()]
    assert retries == [f"ecg: no reply from {link} to GET_INFO within 250 ms (try {n} of 3); sending it again"
                       for n in (1, 2)], retries


def test_a_box_that_answers_no_try_is_named_unresponsive_after_three(box) -> None:
    """Bounded: three tries of 250 ms, then one error that says so, and the port is re-opened
    after the back-off (not within this test)."""
    from firmware_protocol.ecg_serial import Command

    emu, link, _ = box
    emu.ignore_next(Command.GET_INFO, 3)
    source = EcgSource(serial_opener(str(link), 460800), str(link), Collector(), rate_hz=500)
    source.BACKOFF_S = (30.0,)
    _run_until_error(source, 15, poll_s=0.02)
    (error,) = source.health.errors
    assert emu.counters().commands_ignored == 3 and source.health.connects == 0
    assert "no DEVICE_INFO" in error and "3 tries, 250 ms each" in error, error


@pytest.fixture
def arduino_box(tmp_path):
    """A box that resets when its port opens (DTR, the Arduino way) and boots for 1.2 s: longer
    than the spec's 3 tries of 250 ms."""
    emu = EcgBoxEmulator(load_recording("ludb-16"), rate_hz=500, speed=4.0, boot_s=1.2)
    link = tmp_path / "biod-ecg"
    emu.open_pty(link=str(link))
    emu.start()
    yield emu, link
    emu.close()


def test_a_box_that_resets_when_its_port_opens_streams_on_the_first_open(arduino_box, caplog) -> None:
    """With the spec's 0.75 s alone such a box was named unresponsive at every open, and every
    re-open reset it again: it never streamed. ``boot_wait_s`` (ecg.boot_wait_s, 2 s by default
    for a serial box) keeps asking for DEVICE_INFO every 250 ms until it has booted."""
    emu, link = arduino_box
    caplog.set_level("INFO", logger="daemon.sources.serial_ecg")
    got = Collector()
    source = EcgSource(serial_opener(str(link), 460800), str(link), got, rate_hz=500, boot_wait_s=2.0)
    source.BACKOFF_S = (30.0,)  # a failed handshake would show as a missing stream
    t0 = time.monotonic()
    _run_until_chunks(source, got, 10, 15)
    counters = emu.counters()
    assert source.health.errors == [] and source.health.connects == 1
    assert counters.boots == 1 and counters.bytes_lost_booting > 0  # it was deaf while booting
    assert time.monotonic() - t0 >= 1.2
    assert any("boot_wait_s" in r.getMessage() for r in caplog.records)


def test_without_a_boot_wait_such_a_box_is_named_unresponsive(arduino_box) -> None:
    emu, link = arduino_box
    source = EcgSource(serial_opener(str(link), 460800), str(link), Collector(), rate_hz=500, boot_wait_s=0.0)
    source.BACKOFF_S = (30.0,)
    _run_until_error(source, 15, poll_s=0.02)
    (error,) = source.health.errors
    assert "no DEVICE_INFO" in error and "3 tries, 250 ms each" in error and source.health.connects == 0
    assert emu.counters().boots == 1


def test_the_serial_source_gets_the_configured_boot_wait(tmp_path) -> None:
    from daemon.config import parse_config
    from daemon.sources.factory import open_ecg_source

    default = parse_config("ecg:\n  source: serial\n  port: /dev/biod-ecg\n")
    assert default.ecg.boot_wait_s == 2.0
    source, _ = open_ecg_source(parse_config("ecg:\n  source: serial\n  port: /dev/biod-ecg\n  boot_wait_s: 0.5\n"),
                                lambda chunk: None)
    assert source.boot_wait_s == 0.5
