"""The emulated ECG box over a real pty (pyserial) and TCP, with real recordings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from math import gcd
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import serial
from scipy.signal import resample_poly

from firmware_protocol.ecg_serial import (
    DEFAULT_BAUD,
    DEFAULT_UV_PER_LSB,
    SUPPORTED_RATES,
    Ack,
    Command,
    DataFrame,
    Decoder,
    DeviceInfo,
    Electrode,
    ErrorCode,
    Nak,
    Pong,
    encode_command,
    encode_frame,
)
from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
from firmware_protocol.emulators.recordings import list_recordings, load_recording

REPO = Path(__file__).resolve().parents[1]
LSB_MV = DEFAULT_UV_PER_LSB / 1000.0  # one ADC step in mV


class Host:
    """A minimal host: bytes over a pyserial port or a socket into the sans-I/O decoder."""

    def __init__(self, port: serial.Serial | socket.socket) -> None:
        self.port = port
        self.decoder = Decoder()
        self.events: list = []
        self._seq = 0

    def send(self, command: Command, argument: int = 0) -> None:
        self._seq += 1
        frame = encode_command(command, argument, seq=self._seq)
        if isinstance(self.port, socket.socket):
            self.port.sendall(frame)
        else:
            self.port.write(frame)

    def _read(self) -> bytes:
        if isinstance(self.port, socket.socket):
            return self.port.recv(65536)
        return self.port.read(max(1, self.port.in_waiting))

    def until(self, done: Callable[[list], bool], timeout: float = 5.0) -> list:
        """Read until ``done(events so far)``; return the events (and keep them)."""
        deadline = time.monotonic() + timeout
        while not done(self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; got {self.events[-5:]!r}, stats {self.decoder.stats}")
            self.events += self.decoder.feed(self._read())
        return self.events

    def listen(self, seconds: float) -> list:
        """Read for ``seconds`` whatever arrives."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.events += self.decoder.feed(self._read())
        return self.events

    def reply(self, kind: type, timeout: float = 5.0):
        """Next event of type ``kind`` after those already consumed."""
        start = len(self.events)
        self.until(lambda ev: any(isinstance(e, kind) for e in ev[start:]), timeout)
        return next(e for e in self.events[start:] if isinstance(e, kind))

    def frames(self) -> list[DataFrame]:
        return [e for e in self.events if isinstance(e, DataFrame)]

    def stop_and_drain(self) -> None:
        """STOP and read up to its ACK: every frame the box sent before it has then arrived."""
        start = len(self.events)
        self.send(Command.STOP)
        self.until(lambda ev: Ack(Command.STOP) in ev[start:])


def _open_serial(path: str) -> serial.Serial:
    return serial.Serial(path, DEFAULT_BAUD, timeout=0.05)


@pytest.fixture
def box(tmp_path: Path):
    with EcgBoxEmulator("ludb-37", speed=5.0, serial="BIOD-EMU-TEST") as emu:
        path = emu.open_pty(str(tmp_path / "ecg0"))
        port = _open_serial(path)
        yield emu, Host(port), tmp_path / "ecg0"
        port.close()


# ------------------------------------------------------------------------------------ recordings


def test_shipped_recordings_are_real_and_honest() -> None:
    names = list_recordings()
    ludb = [n for n in names if n.startswith("ludb-")]
    ecgid = [load_recording(n) for n in names if n.startswith("ecgid-")]
    assert len(ludb) >= 5 and len(ecgid) >= 7
    for n in ludb:
        rec = load_recording(n)
        assert rec.fs_hz == 500 and rec.leads_mv.shape == (5000, 3) and rec.lead_present.all()
        assert rec.leads_mv.dtype == np.float32 and np.ptp(rec.leads_mv, axis=0).min() > 0.5
        assert "LUDB" in rec.dataset and "ODC-By" in rec.dataset
    persons: dict[str, set[str]] = {}
    for rec in ecgid:
        assert rec.lead_present.tolist() == [True, False, False]  # lead I only, said honestly
        assert not rec.leads_mv[:, 1:].any() and np.ptp(rec.leads_mv[:, 0]) > 0.5
        persons.setdefault(rec.person, set()).add(rec.date)
    two_dates = [p for p, dates in persons.items() if len(dates) >= 2]
    assert len(two_dates) >= 3 and len(persons) >= 4  # enrol/identify cross-session + a stranger
    total = sum(p.stat().st_size for p in (REPO / "firmware_protocol/emulators/recordings").glob("*.npz"))
    assert total < 1_000_000
    with pytest.raises(ValueError, match="available"):
        load_recording("no-such-record")


# ---------------------------------------------------------------------------- control and stream


def test_get_info_and_stream_equals_recording(box) -> None:
    emu, host, _ = box
    host.send(Command.GET_INFO)
    info = host.reply(DeviceInfo)
    assert info.serial == "BIOD-EMU-TEST" and info.rates == SUPPORTED_RATES
    assert info.rate_hz == 500 and info.channels == 3 and info.uv_per_lsb > 0
    assert not host.listen(0.3)[1:] and not host.frames()  # nothing streams before START
    host.send(Command.START)
    assert host.reply(Ack) == Ack(Command.START)
    host.until(lambda ev: len(host.frames()) >= 60)
    frames = host.frames()[:60]
    mv = np.concatenate([f.millivolts() for f in frames])
    expected = load_recording("ludb-37").leads_mv[: mv.shape[0]]
    assert np.abs(mv - expected).max() <= LSB_MV  # within 1 LSB of the real recording
    assert [f.seq for f in frames] == list(range(frames[0].seq, frames[0].seq + 60))
    assert set(np.diff([f.timestamp_us for f in frames])) == {10 * 2000}  # device clock, 500 Hz
    assert all(f.lead_valid().all() and f.lead_off == Electrode.NONE for f in frames)
    host.stop_and_drain()
    assert host.decoder.stats.lost_frames == 0 and host.decoder.stats.crc_errors == 0
    assert len(host.frames()) == emu.frames_sent


@pytest.mark.parametrize("rate", [250, 1000])
def test_set_rate_resamples(box, rate: int) -> None:
    emu, host, _ = box
    host.send(Command.START)
    host.reply(Ack)
    host.send(Command.SET_RATE, rate)
    assert host.reply(Nak) == Nak(Command.SET_RATE, ErrorCode.BUSY)  # STOP first
    host.stop_and_drain()
    host.send(Command.SET_RATE, 300)
    assert host.reply(Nak) == Nak(Command.SET_RATE, ErrorCode.UNSUPPORTED_RATE)
    host.send(Command.SET_RATE, rate)
    assert host.reply(Ack) == Ack(Command.SET_RATE)
    host.send(Command.GET_INFO)
    assert host.reply(DeviceInfo).rate_hz == rate
    already = len(host.frames())
    host.send(Command.START)
    host.until(lambda ev: len(host.frames()) >= already + 30)
    frames = host.frames()[already : already + 30]
    assert set(np.diff([f.timestamp_us for f in frames])) == {10 * 1_000_000 // rate}
    rec = load_recording("ludb-37")
    g = gcd(rate, 500)
    expected = resample_poly(rec.leads_mv.astype(np.float64), rate // g, 500 // g, axis=0)
    mv = np.concatenate([f.millivolts() for f in frames])
    assert np.abs(mv - expected[: mv.shape[0]]).max() <= LSB_MV


def test_ping_unknown_command_bad_argument_bad_crc(box) -> None:
    _, host, _ = box
    host.send(Command.PING, 0xC0FFEE)
    pong = host.reply(Pong)
    assert pong.token == 0xC0FFEE and pong.seq == host._seq
    host.port.write(encode_frame(0x1E, 9, b"\0\0\0\0"))
    assert host.reply(Nak) == Nak(0x1E, ErrorCode.UNKNOWN_COMMAND)
    host.send(Command.START, 5)
    assert host.reply(Nak) == Nak(Command.START, ErrorCode.BAD_ARGUMENT)
    bad = bytearray(encode_command(Command.PING, 1))
    bad[-2] ^= 0xFF
    host.port.write(bytes(bad))
    assert host.reply(Nak) == Nak(0, ErrorCode.BAD_CRC)


# ------------------------------------------------------------------------------- fault injection


def test_fault_injection_counted_exactly(box) -> None:
    emu, host, _ = box
    host.send(Command.START)
    host.until(lambda ev: len(host.frames()) >= 5)
    emu.inject_garbage(37)
    host.until(lambda ev: host.decoder.stats.resyncs == 1)
    assert host.decoder.stats.discarded_bytes == 37 and host.decoder.stats.crc_errors == 0
    emu.corrupt_next(2)
    host.until(lambda ev: host.decoder.stats.crc_errors == 2 and host.decoder.stats.lost_frames == 2)
    emu.drop_next(3)
    host.until(lambda ev: host.decoder.stats.lost_frames == 5)
    host.stop_and_drain()
    stats, sent = host.decoder.stats, emu.counters()
    assert (sent.frames_corrupted, sent.frames_dropped, sent.garbage_bytes) == (2, 3, 37)
    assert stats.crc_errors == 2 and stats.lost_frames == 5 and stats.resyncs == 2
    assert len(host.frames()) == sent.frames_sent - sent.frames_corrupted
    seqs = [f.seq for f in host.frames()]
    assert seqs[-1] - seqs[0] + 1 == len(seqs) + 5  # exactly 5 sequence numbers missing


def test_lead_off_bits(box) -> None:
    emu, host, _ = box
    emu.set_lead_off(Electrode.RA)
    host.send(Command.START)
    host.until(lambda ev: len(host.frames()) >= 3)
    assert host.frames()[-1].lead_off == Electrode.RA
    assert host.frames()[-1].lead_valid().tolist() == [False, False, True]  # I and II use RA


def test_ecgid_reports_ll_off_and_only_lead_i(tmp_path: Path) -> None:
    with EcgBoxEmulator("ecgid-p25-r1", speed=5.0) as emu:
        port = _open_serial(emu.open_pty())
        host = Host(port)
        host.send(Command.START)
        host.until(lambda ev: len(host.frames()) >= 20)
        frames = host.frames()
        assert all(f.lead_off == Electrode.LL for f in frames)
        assert frames[0].lead_valid().tolist() == [True, False, False]
        mv = np.concatenate([f.millivolts() for f in frames])
        assert not mv[:, 1:].any()
        assert np.abs(mv[:, 0] - load_recording("ecgid-p25-r1").leads_mv[: len(mv), 0]).max() <= LSB_MV
        port.close()


def test_set_recording_changes_the_wearer_without_a_replug(box) -> None:
    emu, host, _ = box
    host.send(Command.START)
    host.until(lambda ev: len(host.frames()) >= 5)
    emu.set_recording("ecgid-p25-r1")  # the next person puts the electrodes on
    n0 = len(host.frames())
    host.until(lambda ev: len(host.frames()) >= n0 + 40)
    frames = host.frames()
    after = [f for f in frames[n0:] if f.lead_off == Electrode.LL]  # ECG-ID: lead I only
    assert len(after) >= 30 and frames[0].lead_off == Electrode.NONE
    mv = np.concatenate([f.millivolts() for f in after[:30]])
    ecgid = load_recording("ecgid-p25-r1").leads_mv[:, 0]
    assert np.abs(mv[:, 0] - ecgid[: len(mv)]).max() <= LSB_MV  # the new recording, from its start
    seqs = [f.seq for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one unbroken stream
    host.stop_and_drain()
    assert host.decoder.stats.lost_frames == 0


# ------------------------------------------------------------------------------ unplug / replug


def test_unplug_and_replug(box) -> None:
    emu, host, link = box
    old_path = emu.device_path
    assert os.readlink(link) == old_path
    host.send(Command.START)
    host.until(lambda ev: len(host.frames()) >= 3)
    emu.unplug()
    with pytest.raises(serial.SerialException):  # EIO / hang-up, as when a USB box is pulled
        for _ in range(50):
            host.port.read(4096)
    assert not os.path.lexists(link)
    host.port.close()

    new_path = emu.replug()
    assert os.readlink(link) == new_path == emu.device_path and os.path.exists(new_path)
    port = _open_serial(str(link))
    host2 = Host(port)
    assert host2.listen(0.3) == []  # the box came back idle
    host2.send(Command.START)
    assert host2.reply(Ack) == Ack(Command.START)
    host2.until(lambda ev: len(host2.frames()) >= 5)
    assert host2.decoder.stats.crc_errors == 0
    port.close()


def test_a_host_closing_the_port_puts_the_box_back_to_idle(box) -> None:
    """Spec section 6: the box MUST return to IDLE when the link drops (port closed) and MUST NOT
    send DATA before the host's START. A box that kept streaming after the host closed the pty
    handed the next opener a stream it never asked for."""
    emu, host, link = box
    host.send(Command.START)
    host.until(lambda ev: len(host.frames()) >= 3)
    host.port.close()
    deadline = time.monotonic() + 5
    while emu.streaming:  # the box notices the hang-up by itself; nobody calls unplug()
        assert time.monotonic() < deadline, "the box still streams after the host closed the port"
        time.sleep(0.02)
    assert emu.counters().link_drops == 1
    port = _open_serial(str(link))  # the same pty: the box was never unplugged
    try:
        again = Host(port)
        assert again.listen(0.5) == []  # nothing at all before START
        again.send(Command.START)
        assert again.reply(Ack) == Ack(Command.START)
        again.until(lambda ev: len(again.frames()) >= 3)
        assert again.decoder.stats.crc_errors == 0 and again.decoder.stats.discarded_bytes == 0
    finally:
        port.close()


# ----------------------------------------------------------------------------------------- TCP


def test_tcp_mode() -> None:
    with EcgBoxEmulator("ludb-16", speed=5.0, serial="BIOD-TCP") as emu:
        port_no = emu.serve_tcp()
        sock = socket.create_connection(("127.0.0.1", port_no), timeout=5)
        host = Host(sock)
        host.send(Command.GET_INFO)
        assert host.reply(DeviceInfo).serial == "BIOD-TCP"
        host.send(Command.START)
        host.until(lambda ev: len(host.frames()) >= 20)
        mv = np.concatenate([f.millivolts() for f in host.frames()])
        assert np.abs(mv - load_recording("ludb-16").leads_mv[: len(mv)]).max() <= LSB_MV
        emu.unplug()
        sock.settimeout(2)
        while sock.recv(65536):  # drain until EOF: the box dropped the connection
            pass
        sock.close()
        assert emu.replug() == port_no
        sock = socket.create_connection(("127.0.0.1", port_no), timeout=5)
        host = Host(sock)
        host.send(Command.PING, 7)
        assert host.reply(Pong).token == 7
        sock.close()


def test_cli_serves_a_pty_until_interrupted(tmp_path: Path) -> None:
    link = tmp_path / "ecg-cli"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_protocol.emulators.ecg_box", "--recording", "ludb-40",
         "--pty", "--link", str(link), "--rate", "1000"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == str(link)
        port = _open_serial(str(link))
        host = Host(port)
        host.send(Command.GET_INFO)
        assert host.reply(DeviceInfo, timeout=10).rate_hz == 1000
        port.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    assert not link.exists()
