"""The ECG box source: protocol v1 over a serial port (or TCP), with handshake and recovery.

The wire format lives in ``firmware_protocol.ecg_serial`` (sans-I/O); this module owns the I/O:
open the transport, say STOP/GET_INFO/SET_RATE/START, turn data frames into ``EcgChunk``s, and
when anything goes wrong (port missing, cable pulled, box silent, wrong baud) log one line that
names the cause and the fix, wait with back-off and start again. It never gives up: a hub runs
unattended for months. The path is re-opened by name on every attempt, so a udev symlink that
moves to a new /dev/ttyACMx after a replug is followed. The one exception is an emulated box
playing a recording once (``source: replay`` with ``loop: false``): when it has sent the last
frame the source says "replay finished" once and stays idle (state ``finished``) until stopped,
instead of re-opening a box that has nothing more to send.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from daemon.sources.failure_log import FailureLog
from firmware_protocol import ecg_serial as proto

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EcgChunk:
    """Samples of one data frame, already in millivolts, in device time."""

    seq: int
    t_device_s: float
    samples_mv: np.ndarray  # float32 (n, 3): Einthoven I, II, III, whatever the box's channel count
    lead_valid: np.ndarray  # bool (3,): a lead the box does not measure is invalid
    rate_hz: int
    lost_frames_before: int = 0
    # The box's frame counter jumped back before this frame (spec section 5: it reset, e.g. a
    # watchdog or brown-out reset, and streams again): no frames counted lost, but the time
    # between is unknown, like a reconnect.
    device_restarted: bool = False
    #: device frames this chunk joins (``seq`` is the last one's): the daemon pushes several at once
    frames: int = 1

    @property
    def first_seq(self) -> int:
        """The sequence number of the chunk's first frame (the u16 counter wraps)."""
        return (self.seq - self.frames + 1) & 0xFFFF


@dataclass
class EcgHealth:
    """What ``biod doctor``, the stats topic and the watchdog look at."""

    state: str = "connecting"  # connecting | streaming | stalled | disconnected | finished (a replay's end)
    device: proto.DeviceInfo | None = None
    connects: int = 0
    frames: int = 0
    crc_errors: int = 0
    protocol_errors: int = 0
    lost_frames: int = 0
    duplicates: int = 0
    resyncs: int = 0
    discarded_bytes: int = 0
    last_frame_at: float | None = None  # time.monotonic(): the watchdog takes differences of it
    last_error: str | None = None
    errors: list[str] = field(default_factory=list)


class Transport(Protocol):
    def read(self, n: int) -> bytes: ...
    def write(self, data: bytes) -> int | None: ...
    def close(self) -> None: ...


class SourceError(Exception):
    """A failure with a person-readable cause and fix; the source retries after it."""


class _SerialTransport:
    def __init__(self, port: str, baud: int) -> None:
        import serial  # pyserial; imported here so the module loads without it for TCP users

        try:
            # exclusive: a second reader (biod calibrate or record while the service runs) would
            # steal bytes from the first and both streams would be garbage; refuse it instead
            self._s = serial.Serial(port, baudrate=baud, timeout=0.05, write_timeout=1.0, exclusive=True)
        except serial.SerialException as exc:
            cause = str(exc)
            if "exclusively lock" in cause:
                raise SourceError(f"serial port {port} is in use by another program: is the biod service running? "
                                  "stop it for biod calibrate / record (sudo systemctl stop biod), or enrol from "
                                  "Home Assistant's Enrol button instead") from None
            if "No such file" in cause or "could not open port" in cause and "Errno 2" in cause:
                raise SourceError(f"serial port {port} does not exist: check the cable, ecg.port and the udev rule (deploy/99-biod.rules)") from None
            if "Permission denied" in cause or "Errno 13" in cause:
                raise SourceError(f"no permission to open {port}: add the biod user to the 'dialout' group") from None
            raise SourceError(f"cannot open serial port {port}: {cause}") from None
        self._serial_exc = serial.SerialException

    def read(self, n: int) -> bytes:
        try:
            return self._s.read(n)
        except (self._serial_exc, OSError) as exc:
            raise SourceError(f"serial read failed ({exc}); the device was probably unplugged") from None

    def write(self, data: bytes) -> int | None:
        try:
            return self._s.write(data)
        except (self._serial_exc, OSError) as exc:
            raise SourceError(f"serial write failed ({exc}); the device was probably unplugged") from None

    def close(self) -> None:
        try:
            self._s.close()
        except Exception:  # closing a vanished device may fail; nothing to recover
            pass


class _TcpTransport:
    def __init__(self, host: str, port: int) -> None:
        try:
            self._sock = socket.create_connection((host, port), timeout=3.0)
        except OSError as exc:
            raise SourceError(f"cannot connect to the ECG box at {host}:{port} ({exc.strerror or exc}); check ecg.host/tcp_port") from None
        self._sock.settimeout(0.05)

    def read(self, n: int) -> bytes:
        try:
            data = self._sock.recv(n)
        except socket.timeout:
            return b""
        except OSError as exc:
            raise SourceError(f"TCP read failed ({exc})") from None
        if not data:
            raise SourceError("the ECG box closed the TCP connection")
        return data

    def write(self, data: bytes) -> int | None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise SourceError(f"TCP write failed ({exc})") from None
        return len(data)

    def close(self) -> None:
        self._sock.close()


def serial_opener(port: str, baud: int) -> Callable[[], Transport]:
    return lambda: _SerialTransport(port, baud)


SERIAL_BY_ID = Path("/dev/serial/by-id")


def find_by_serial(serial: str, by_id: Path = SERIAL_BY_ID) -> Path:
    """The one ``/dev/serial/by-id`` entry whose name carries ``serial`` (udev names USB serial
    devices ``usb-<vendor>_<product>_<serial>-if<NN>``). Looked up again at every open, so a box
    replugged into another port, or enumerated as another ttyACM, is found under its serial
    number without any udev rule. A box behind a USB-UART bridge reports the bridge's serial
    here: give such a box a udev symlink (deploy/99-biod.rules) and ``ecg.port`` instead."""
    try:
        names = sorted(p.name for p in by_id.iterdir())
    except OSError:
        names = []
    hits = [n for n in names if f"_{serial}-" in n or n.endswith(f"_{serial}")]
    if len(hits) == 1:
        return by_id / hits[0]
    if not hits:
        raise SourceError(f"no serial device with serial number {serial!r} in {by_id} "
                          f"({', '.join(names) or 'empty'}): is the box plugged in? (ecg.match_serial)")
    raise SourceError(f"several serial devices carry serial number {serial!r}: {', '.join(hits)}; set ecg.port")


def serial_by_id_opener(serial: str, baud: int, by_id: Path = SERIAL_BY_ID) -> Callable[[], Transport]:
    return lambda: _SerialTransport(str(find_by_serial(serial, by_id)), baud)


def tcp_opener(host: str, port: int) -> Callable[[], Transport]:
    return lambda: _TcpTransport(host, port)


N_LEADS = 3


def three_leads(samples_mv: np.ndarray, lead_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A frame's channels as Einthoven I, II, III: channel c is lead c (spec section 4), and a
    lead the box does not measure is zero and invalid.

    WHY here: the spec lets a box send 1 or 2 channels, but the DSP and the models read three
    leads with a validity flag each. A lead-I-only box is then exactly a 3-lead box whose LL
    electrode is off, a case every stage downstream already handles, instead of a narrower
    array that the models refuse at the first clean window."""
    n, ch = samples_mv.shape
    if ch == N_LEADS:
        return samples_mv, lead_valid
    samples = np.zeros((n, N_LEADS), np.float32)
    samples[:, :ch] = samples_mv
    valid = np.zeros(N_LEADS, bool)
    valid[:ch] = lead_valid
    return samples, valid


def _reply_text(reply: object | None) -> str:
    """A box's answer for a log line, error codes by name: an IntEnum formats as its bare number
    ("(1)") on Python 3.11+, which nobody can look up."""
    if reply is None:
        return "no answer"
    if isinstance(reply, proto.Nak):
        err = reply.error
        name = err.name if isinstance(err, proto.ErrorCode) else f"unknown error 0x{int(err):02x}"
        if isinstance(err, proto.ErrorCode) and err == proto.ErrorCode.BAD_CRC:
            return "NAK BAD_CRC to every try: the line damages commands; check the cable and ecg.baud"
        return f"NAK {name}"
    return type(reply).__name__


def _answers(event: object, command: proto.Command, sent: set[int]) -> bool:
    """Whether ``event`` answers ``command`` sent with one of the seqs in ``sent``."""
    if isinstance(event, proto.DataFrame):
        return True
    if isinstance(event, (proto.Ack, proto.Nak)) and event.command != command:
        return False
    return getattr(event, "seq", None) in sent


class EcgSource:
    """Runs in its own thread (``run``); hands chunks to ``on_chunk`` from that thread."""

    # Spec section 6: a host SHOULD send a command again when it got no reply after 250 ms (a box
    # MUST reply within 100 ms), and declare the box unresponsive after 3 tries. WHY not longer:
    # a command lost on the line then costs a quarter of a second, not one, and a silent box is
    # named (and re-opened) after 0.75 s.
    COMMAND_REPLY_TIMEOUT_S = 0.25
    COMMAND_TRIES = 3
    BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

    def __init__(
        self,
        opener: Callable[[], Transport],
        describe: str,
        on_chunk: Callable[[EcgChunk], None],
        *,
        rate_hz: int = 500,
        match_serial: str | None = None,
        stall_timeout_s: float = 3.0,
        baud: int | None = None,
        finished: Callable[[], bool] | None = None,
        boot_wait_s: float = 0.0,
    ) -> None:
        """``finished``: for an emulated box playing a recording once, True once the box has
        written its last frame; the source then ends its sessions instead of re-opening the box
        (which would only say START to a box with nothing left to play). ``boot_wait_s``: how
        long after opening the port GET_INFO is still sent again every 250 ms when the three
        tries of the spec are used up (see :meth:`_handshake`)."""
        self._open = opener
        self.describe = describe
        self._on_chunk = on_chunk
        self.rate_hz = rate_hz
        self.match_serial = match_serial
        self.stall_timeout_s = stall_timeout_s
        self.baud = baud
        self.boot_wait_s = float(boot_wait_s)
        self.health = EcgHealth()
        self._finished = finished
        self._command_seq = 0  # seq of the last command sent; replies echo it (spec section 5)
        self._last_seq: int | None = None
        self._pending: list[proto.DataFrame] = []
        self._protocol_error: str | None = None  # the latest spec violation of this session
        self._protocol_error_logged_at = float("-inf")
        self._failures = FailureLog(log, "ecg")

    # -- the loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            connects = self.health.connects
            try:
                if self._session(stop):
                    self._replay_finished(stop)
                    return
            except SourceError as exc:
                loud = self._fail(str(exc))
            except Exception as exc:  # never let one odd failure end a months-long run
                loud = self._fail(f"unexpected error: {exc!r}")
                if loud:  # the traceback with the line that says it, not at every retry
                    log.error("ecg: where that unexpected error came from", exc_info=True)
            else:
                loud = True
            if stop.is_set():
                break
            # A session that got through the handshake ended by an unplug (or a stall), not by a
            # missing device: start the back-off again, so that the next wearer's replug is
            # picked up within half a second rather than after the longest delay reached so far.
            failures = 0 if self.health.connects > connects else failures + 1
            delay = self.BACKOFF_S[min(max(failures - 1, 0), len(self.BACKOFF_S) - 1)]
            log.log(logging.WARNING if loud else logging.DEBUG, "ecg: retrying %s in %.1f s", self.describe, delay)
            stop.wait(delay)
        self.health.state = "disconnected"

    def _replay_finished(self, stop: threading.Event) -> None:
        """The emulated box played its whole recording (``loop: false``): say so once and stay
        idle until stopped. WHY not end the thread: ``biod run``'s watchdog treats a dead source
        thread as a wedged daemon and systemd would restart it, playing the replay again; idle,
        the daemon keeps running with the ECG not live (state ``finished``)."""
        self.health.state = "finished"
        log.info("ecg: replay finished: %s played its recording once (loop: false); no more ECG until biod "
                 "restarts (set loop: true to play it again and again)", self.describe)
        stop.wait()

    def _fail(self, message: str) -> bool:
        """Record a failed try in the health record; True when the log said it out loud."""
        self.health.state = "disconnected"
        self.health.last_error = message
        self.health.errors = (self.health.errors + [message])[-20:]
        return self._failures.failed(message)

    def _session(self, stop: threading.Event) -> bool:
        """One open-handshake-stream cycle; True when it ended because a replay finished."""
        self.health.state = "connecting"
        self._protocol_error = None
        transport = self._open()
        try:
            decoder = proto.Decoder()
            info = self._handshake(transport, decoder, stop)
            self.health.device = info
            self.health.connects += 1
            self.health.state = "streaming"
            self._failures.recovered()
            log.info("ecg: streaming from %s (%s serial %s, firmware %s) at %d Hz",
                     self.describe, info.model, info.serial, info.firmware, self.rate_hz)
            return self._stream(transport, decoder, info, stop)
        finally:
            try:
                if stop.is_set():
                    transport.write(proto.encode_command(proto.Command.STOP))
            except SourceError:
                pass
            transport.close()

    def _handshake(self, transport: Transport, decoder: proto.Decoder, stop: threading.Event) -> proto.DeviceInfo:
        transport.write(proto.encode_command(proto.Command.STOP))  # the box may still stream from before
        # A board whose USB-serial chip resets the microcontroller when the port opens (the
        # Arduino way: DTR) hears nothing until it has booted, 1-2 s; the spec's 3 tries (0.75 s)
        # then failed at every open, and every re-open reset it again: it never streamed.
        info = self._request(transport, decoder, proto.Command.GET_INFO, 0, proto.DeviceInfo, stop,
                             keep_trying_until=time.monotonic() + self.boot_wait_s)
        if info is None:
            if self._protocol_error is not None:  # it answers, in frames that break the spec
                raise SourceError(f"{self.describe} answers but breaks biod ECG protocol v1: {self._protocol_error}")
            baud = f" at {self.baud} baud" if self.baud else ""
            raise SourceError(f"no DEVICE_INFO from {self.describe}{baud} ({self._tries_text()}): check that the box is on, "
                              "that ecg.baud matches it and that it speaks biod ECG protocol v1")
        assert isinstance(info, proto.DeviceInfo)
        if self.match_serial and info.serial != self.match_serial:
            raise SourceError(f"{self.describe} is box {info.serial!r}, not the configured ecg.match_serial {self.match_serial!r}: fix ecg.port or ecg.match_serial")
        if self.rate_hz not in info.rates:
            raise SourceError(f"box {info.serial} supports {list(info.rates)} Hz, not ecg.rate_hz={self.rate_hz}: change ecg.rate_hz")
        if info.rate_hz != self.rate_hz:
            reply = self._request(transport, decoder, proto.Command.SET_RATE, self.rate_hz, (proto.Ack, proto.Nak), stop)
            if not isinstance(reply, proto.Ack):
                raise SourceError(f"box {info.serial} refused SET_RATE {self.rate_hz} ({_reply_text(reply)})")
        self._last_seq = None
        reply = self._request(transport, decoder, proto.Command.START, 0, (proto.Ack, proto.Nak, proto.DataFrame), stop)
        if isinstance(reply, proto.Nak) or reply is None:
            raise SourceError(f"box {info.serial} did not start streaming ({_reply_text(reply)})")
        return info

    def _request(self, transport: Transport, decoder: proto.Decoder, command: proto.Command, argument: int,
                 wanted: type | tuple[type, ...], stop: threading.Event,
                 keep_trying_until: float = 0.0) -> object | None:
        """Send ``command`` until the box answers it, at most ``COMMAND_TRIES`` times (and on
        until the monotonic time ``keep_trying_until``), each try waiting
        ``COMMAND_REPLY_TIMEOUT_S`` (spec section 6); return the answer (an event of a
        ``wanted`` type), else the last NAK BAD_CRC, else None.

        A reply counts only if it answers this command: its seq echoes one of the seqs this
        request sent (a slow box's answer to an earlier try is still the answer), and an ACK or
        NAK names this command. WHY: a late reply to another command (a retried SET_RATE's
        duplicate ACK) must not pass for START's. DATA frames count as START's answer (the box
        streams, whatever became of its ACK). NAK BAD_CRC is not a refusal: the box received a
        copy damaged on the line (its seq and type are untrusted, spec section 7), so the
        command is sent again at once."""
        sent: set[int] = set()
        damaged: proto.Nak | None = None
        unanswered = False  # the previous try got no reply within COMMAND_REPLY_TIMEOUT_S
        attempt = 0
        while attempt < self.COMMAND_TRIES or time.monotonic() < keep_trying_until:
            attempt += 1
            if stop.is_set():
                break
            if unanswered and attempt <= self.COMMAND_TRIES:
                log.info("ecg: no reply from %s to %s within %.0f ms (try %d of %d); sending it again",
                         self.describe, command.name, self.COMMAND_REPLY_TIMEOUT_S * 1000, attempt - 1,
                         self.COMMAND_TRIES)
            elif unanswered and attempt == self.COMMAND_TRIES + 1:
                log.info("ecg: no reply from %s to %s yet; trying on for up to %.1f s after opening it "
                         "(ecg.boot_wait_s: a board that resets when its port opens is still booting)",
                         self.describe, command.name, self.boot_wait_s)
            self._command_seq = self._command_seq % 0xFFFF + 1  # 1..65535: a BAD_CRC NAK says seq 0
            sent.add(self._command_seq)
            transport.write(proto.encode_command(command, argument, self._command_seq))
            deadline = time.monotonic() + self.COMMAND_REPLY_TIMEOUT_S
            resend = False
            while not resend and time.monotonic() < deadline and not stop.is_set():
                events = decoder.feed(transport.read(4096))
                for i, event in enumerate(events):
                    if isinstance(event, proto.ProtocolError):
                        self._report_protocol_error(event)
                    elif isinstance(event, proto.Nak) and event.error == proto.ErrorCode.BAD_CRC:
                        damaged, resend = event, True
                        log.warning("ecg: box %s received %s damaged (NAK BAD_CRC); sending it again",
                                    self.describe, command.name)
                    elif isinstance(event, wanted) and _answers(event, command, sent):
                        # Frames that arrived in the same read as the reply are data, not noise.
                        self._pending = [e for e in events[i:] if isinstance(e, proto.DataFrame)]
                        return event
            unanswered = not resend
        return damaged

    def _tries_text(self) -> str:
        wait = f", for {self.boot_wait_s:g} s after opening it" if self.boot_wait_s > 0 else ""
        return f"{self.COMMAND_TRIES} tries, {self.COMMAND_REPLY_TIMEOUT_S * 1000:.0f} ms each{wait}"

    def _stream(self, transport: Transport, decoder: proto.Decoder, info: proto.DeviceInfo, stop: threading.Event) -> bool:
        """Hand on the box's frames until stopped (False) or a replay's box has sent its last
        frame and every byte of it was read (True); raise SourceError when the box stalls."""
        last_data = time.monotonic()
        base = {name: getattr(self.health, name) for name in self._COUNTERS}
        pending, self._pending = self._pending, []
        for frame in pending:
            self._emit(frame)
        while not stop.is_set():
            # Asked before the read: if the box had finished then, an empty read means its last
            # frame was already read (asked after, a frame written in between would be lost).
            finished = self._finished is not None and self._finished()
            data = transport.read(4096)
            if finished and not data:
                self._account(decoder.stats, base)
                return True
            now = time.monotonic()
            for event in decoder.feed(data):
                if isinstance(event, proto.DataFrame):
                    last_data = now
                    self._emit(event)
                elif isinstance(event, proto.ProtocolError):
                    self._report_protocol_error(event)
            self._account(decoder.stats, base)
            if now - last_data > self.stall_timeout_s:
                self.health.state = "stalled"
                why = f" (its last frames broke the protocol: {self._protocol_error})" if self._protocol_error else ""
                raise SourceError(f"box {info.serial} stopped sending data for {self.stall_timeout_s:.0f} s{why}; re-opening {self.describe}")
        return False

    PROTOCOL_ERROR_LOG_EVERY_S = 60.0

    def _report_protocol_error(self, event: proto.ProtocolError) -> None:
        """A CRC-valid frame that breaks the spec is a misbehaving box, not line noise: say why
        (the spec asks the host to log the reason), but at most once a minute, because a box
        that gets it wrong gets it wrong in every frame. The decoder counts them all."""
        self._protocol_error = event.reason
        self.health.last_error = f"protocol error: {event.reason}"
        now = time.monotonic()
        if now - self._protocol_error_logged_at >= self.PROTOCOL_ERROR_LOG_EVERY_S:
            self._protocol_error_logged_at = now
            log.error("ecg: %s sent a frame that breaks biod ECG protocol v1 (type 0x%02x, seq %d): %s",
                      self.describe, event.frame_type, event.seq, event.reason)

    def _emit(self, frame: proto.DataFrame) -> None:
        # The decoder's own rule (it already dropped duplicates): a backwards jump is a device
        # restart, not 64 000 lost frames.
        step = proto.seq_step(self._last_seq, frame.seq)
        self._last_seq = frame.seq
        self.health.last_frame_at = time.monotonic()
        samples, valid = three_leads(frame.millivolts(), frame.lead_valid())
        self._on_chunk(EcgChunk(
            seq=frame.seq,
            t_device_s=frame.timestamp_us / 1e6,
            samples_mv=samples,
            lead_valid=valid,
            rate_hz=self.rate_hz,
            lost_frames_before=step.lost,
            device_restarted=step.restart,
        ))

    _COUNTERS = ("frames", "crc_errors", "protocol_errors", "lost_frames", "duplicates", "resyncs", "discarded_bytes")

    def _account(self, stats: proto.DecoderStats, base: dict[str, int]) -> None:
        """Totals across reconnects: each session has a fresh decoder, so add its counts to the
        totals there were when the session began."""
        for name in self._COUNTERS:
            setattr(self.health, name, base[name] + getattr(stats, name))
