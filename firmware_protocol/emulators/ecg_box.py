"""Emulated serial ECG box speaking biod ECG serial protocol v1 over a real pty or TCP.

Why a real pseudo-terminal: the daemon opens the box with pyserial exactly as it opens real
hardware (termios, hang-ups on unplug, a udev-style symlink that moves when the box is
re-plugged), so the emulator exercises the same code paths, including the failure ones.

The device side is the same sans-I/O :class:`~firmware_protocol.ecg_serial.Decoder` the host
uses; this module only adds a state machine (idle/streaming, sample rate), a device clock and
the transports. Timestamps follow the device clock (samples x 1e6 / rate), never wall time, so
a slow host or ``speed`` != 1 changes when frames arrive but not what they say.

CLI::

    python -m firmware_protocol.emulators.ecg_box --recording ludb-37 --pty --link /tmp/ecg0
    python -m firmware_protocol.emulators.ecg_box --recording ecgid-p25-r1 --tcp 5555
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import select
import signal
import socket
import termios
import threading
import time
import tty
from dataclasses import dataclass

import numpy as np

from ..ecg_serial import (
    DEFAULT_GAIN,
    DEFAULT_UV_PER_LSB,
    SAMPLE_MAX,
    SAMPLE_MIN,
    SUPPORTED_RATES,
    SYNC,
    Command,
    Decoder,
    DeviceInfo,
    Electrode,
    ErrorCode,
    HostCommand,
    ProtocolError,
    encode_ack,
    encode_data_frame,
    encode_device_info,
    encode_nak,
    encode_pong,
)
from .recordings import Recording, load_recording

__all__ = ["EcgBoxEmulator", "EmulatorCounters", "main"]

MODEL = "BIOD-EMU-ECG3"
FIRMWARE = "emu-1.0.0"
_WRITE_TIMEOUT_S = 0.5  # a host that stops reading for longer than this overflows the device
_MAX_CATCH_UP_FRAMES = 50
# How often an idle pty box looks whether a host has opened the port. WHY poll: the master side
# of a pty reports the slave being closed (POLLHUP, EIO) but no event when it is opened again.
# Well inside the spec's 100 ms reply budget for the first command of a host that just opened it.
_ATTACH_POLL_S = 0.02

# Lead -> electrodes (I = LA-RA, II = LL-RA, III = LL-LA), to derive which electrode a
# recording without some leads must report as off.
_ELECTRODE_LEADS = {Electrode.RA: {0, 1}, Electrode.LA: {0, 2}, Electrode.LL: {1, 2}}


@dataclass(frozen=True)
class EmulatorCounters:
    """What the emulator did, so a test can check the host's loss accounting exactly.

    ``frames_sent`` counts DATA frames written (corrupted ones included); dropped and overflowed
    frames used a sequence number but never reached the link.
    """

    frames_sent: int
    frames_corrupted: int
    frames_dropped: int
    frames_overflowed: int
    garbage_bytes: int
    commands: int
    naks: int
    # The host closed the link (the last opener of the pty closed the port, or the TCP connection
    # closed): the box went back to IDLE, as spec section 6 requires.
    link_drops: int = 0
    # Commands the box heard and did not answer (``ignore_next``): a host's retries test.
    commands_ignored: int = 0
    # Boots after a host opened the link (``boot_s`` > 0), and the bytes lost while booting.
    boots: int = 0
    bytes_lost_booting: int = 0


def _inherent_lead_off(present: np.ndarray) -> Electrode:
    """The electrode a recording must report off so exactly its absent leads are invalid."""
    absent = {i for i in range(3) if not present[i]}
    if not absent:
        return Electrode.NONE
    for electrode, leads in _ELECTRODE_LEADS.items():
        if leads == absent:
            return electrode
    if len(absent) == 3:
        return Electrode.RA | Electrode.LA | Electrode.LL
    raise ValueError(
        f"a recording with leads {sorted(absent)} absent cannot be expressed with lead-off bits "
        "(one missing lead of three means all three electrodes are on); ship the missing lead "
        "(III = II - I) instead"
    )


def _to_counts(leads_mv: np.ndarray, uv_per_lsb: float) -> np.ndarray:
    counts = np.rint(leads_mv.astype(np.float64) * (1000.0 / uv_per_lsb))
    return np.clip(counts, SAMPLE_MIN, SAMPLE_MAX).astype(np.int32)


def resample_recording(recording: Recording, rate_hz: int) -> np.ndarray:
    """The recording's leads in mV at ``rate_hz`` (polyphase FIR resampling), float64 (n, 3)."""
    if rate_hz == recording.fs_hz:
        return recording.leads_mv.astype(np.float64)
    from scipy.signal import resample_poly  # lazy: scipy.signal costs ~1-2 s to import on a Pi

    g = math.gcd(rate_hz, recording.fs_hz)
    return resample_poly(recording.leads_mv.astype(np.float64), rate_hz // g, recording.fs_hz // g, axis=0)


class EcgBoxEmulator:
    """A serial ECG box playing a real recording, per docs/ecg-serial-protocol.md.

    Lifecycle: construct, open a transport (:meth:`open_pty` or :meth:`serve_tcp`), :meth:`start`
    (power on: a background thread answers commands and streams after START), then
    :meth:`stop`/:meth:`close`. As a context manager it starts on entry and closes on exit.

    ``loop=True`` (a demo) plays the recording round and round, from its start at every START.
    ``loop=False`` (a replay of a household's own record) plays it once: a START after a STOP or
    a reconnect resumes where the box was, the last frame holds whatever samples are left (so
    every sample is sent exactly once), and from then on :attr:`finished` is True and START is
    ACKed but streams nothing. WHY: rewinding at every START made a host that re-opens a silent
    box (every host does) replay the recording for ever.

    A host closing the link (the last program holding the pty open closes it, or the TCP
    connection closes) puts the box back to IDLE, as spec section 6 requires: whoever opens it
    next hears nothing before its own START. Counted in ``link_drops``.

    ``boot_s`` > 0 is a board whose USB-serial chip resets the microcontroller when a host opens
    the port (the Arduino way, through DTR): for ``boot_s`` after each open it is booting and
    every byte the host sends is lost (a bootloader does not speak the protocol), and its frame
    counter starts again from 0. Counted in ``boots`` and ``bytes_lost_booting``.
    """

    def __init__(
        self,
        recording: Recording | str,
        rate_hz: int = 500,
        speed: float = 1.0,
        serial: str = "BIOD-EMU-0001",
        samples_per_frame: int = 10,
        loop: bool = True,
        *,
        seed: int = 0,
        boot_s: float = 0.0,
    ) -> None:
        if isinstance(recording, str):
            recording = load_recording(recording)
        if rate_hz not in SUPPORTED_RATES:
            raise ValueError(f"rate_hz {rate_hz} not supported; choose one of {SUPPORTED_RATES}")
        if not speed > 0:
            raise ValueError(f"speed must be > 0 (1.0 = real time), got {speed}")
        if not 1 <= samples_per_frame <= 100:
            raise ValueError(f"samples_per_frame must be 1..100 (a frame holds <= 112), got {samples_per_frame}")
        self.recording = recording
        self.speed = float(speed)
        self.serial = serial
        self.samples_per_frame = samples_per_frame
        self.loop = loop
        self._rng = np.random.default_rng(seed)
        self._inherent_off = _inherent_lead_off(recording.lead_present)
        self._present = recording.lead_present.copy()

        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

        # Device state (guarded by _lock).
        self._rate = rate_hz
        self._signal = self._make_signal(rate_hz)
        self._streaming = False
        self._finished = False  # loop=False and the last sample was sent
        self._data_seq = 0
        self._pos = 0
        self._samples_streamed = 0
        self._stream_base_us = 0
        self._device_us = 0
        self._idle_since = time.monotonic()
        self._next_due = 0.0
        self._t_anchor = 0.0
        self._frames_scheduled = 0
        self._injected_off = Electrode.NONE
        self._pending_garbage: list[bytes] = []
        self._corrupt_pending = 0
        self._drop_pending = 0
        self.frames_sent = 0
        self.frames_corrupted = 0
        self.frames_dropped = 0
        self.frames_overflowed = 0
        self.garbage_bytes = 0
        self.commands = 0
        self.naks = 0
        self.link_drops = 0
        self.commands_ignored = 0
        self._ignore: dict[Command, int] = {}
        if not boot_s >= 0:
            raise ValueError(f"boot_s must be >= 0 s, got {boot_s}")
        self.boot_s = float(boot_s)
        self._booting_until = 0.0
        self.boots = 0
        self.bytes_lost_booting = 0

        # Transport state.
        self._master: int | None = None
        self._host_attached = False  # a host holds the pty slave open (see _poll_attach_locked)
        self._slave_path: str | None = None
        self._link: str | None = None
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._tcp_addr: tuple[str, int] | None = None
        self._decoder = Decoder()

    # ------------------------------------------------------------------------------- properties

    @property
    def rate_hz(self) -> int:
        return self._rate

    @property
    def streaming(self) -> bool:
        return self._streaming

    @property
    def finished(self) -> bool:
        """True once a box with ``loop=False`` has written the recording's last frame to the
        link: it sends no more DATA (until :meth:`set_recording`)."""
        return self._finished

    @property
    def device_path(self) -> str | None:
        """The current pty slave path (None while unplugged or in TCP mode)."""
        return self._slave_path

    @property
    def lead_off(self) -> Electrode:
        """Electrodes reported off: the recording's absent leads plus :meth:`set_lead_off`."""
        return self._inherent_off | self._injected_off

    @property
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(
            model=MODEL,
            serial=self.serial,
            firmware=FIRMWARE,
            rates=SUPPORTED_RATES,
            rate_hz=self._rate,
            gain=DEFAULT_GAIN,
            channels=3,
            uv_per_lsb=DEFAULT_UV_PER_LSB,
        )

    def counters(self) -> EmulatorCounters:
        with self._lock:
            return EmulatorCounters(
                self.frames_sent, self.frames_corrupted, self.frames_dropped,
                self.frames_overflowed, self.garbage_bytes, self.commands, self.naks,
                self.link_drops, self.commands_ignored, self.boots, self.bytes_lost_booting,
            )

    def expected_counts(self) -> np.ndarray:
        """int32 (n, 3) ADC counts the box streams at the current rate (what a host should get)."""
        return self._signal.copy()

    # ------------------------------------------------------------------------------- transports

    def open_pty(self, link: str | None = None) -> str:
        """Open a pseudo-terminal; return the slave path a host opens with pyserial.

        ``link``: keep a symlink there pointing at the current slave (as a udev rule would);
        it disappears on :meth:`unplug` and points at the new pty after :meth:`replug`.
        """
        with self._lock:
            if self._listener is not None:
                raise RuntimeError("this emulator already serves TCP; use one transport per box")
            if self._master is not None:
                raise RuntimeError(f"pty already open at {self._slave_path}")
            self._link = link
            self._open_pty_locked()
            assert self._slave_path is not None
            self._wake()
            return self._slave_path

    def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on TCP (one host at a time; a new connection replaces the old); return the port."""
        with self._lock:
            if self._master is not None:
                raise RuntimeError("this emulator already has a pty; use one transport per box")
            if self._listener is not None:
                raise RuntimeError("already serving TCP")
            self._tcp_addr = (host, port)
            self._listen_locked()
            self._wake()
            assert self._tcp_addr is not None
            return self._tcp_addr[1]

    def unplug(self) -> None:
        """Pull the cable: close the pty master (the host sees EIO/hang-up; the link goes) or
        drop the TCP connection and stop listening. The box resets to idle."""
        with self._lock:
            self._stop_streaming_locked()
            if self._master is not None:
                self._close_pty_locked()
            elif self._listener is not None or self._client is not None:
                self._close_tcp_locked()
            else:
                raise RuntimeError("nothing to unplug: no transport is open")
            self._wake()

    def replug(self) -> str | int:
        """Plug back in: a NEW pty (path may differ; link updated) or listen again on the same
        TCP port. Returns the new slave path or the port. The box is idle until START."""
        with self._lock:
            if self._master is not None or self._listener is not None:
                raise RuntimeError("still plugged in; call unplug() first")
            self._decoder = Decoder()
            if self._tcp_addr is not None:
                self._listen_locked()
                self._wake()
                return self._tcp_addr[1]
            self._open_pty_locked()
            self._wake()
            assert self._slave_path is not None
            return self._slave_path

    def _open_pty_locked(self) -> None:
        master, slave = os.openpty()
        # Raw mode on the slave side now, so nothing (echo, CR/LF mapping) touches the bytes
        # even before the host's pyserial sets its own termios (the kernel keeps the settings
        # while the master is open).
        tty.setraw(slave)
        self._slave_path = os.ttyname(slave)
        # The box does not hold its own slave open: only then does the master see a host closing
        # the port (POLLHUP/EIO), which must put the box back to IDLE (spec section 6).
        os.close(slave)
        os.set_blocking(master, False)
        self._master = master
        self._host_attached = False
        self._decoder = Decoder()
        if self._link:
            tmp = f"{self._link}.tmp-{os.getpid()}"
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(self._slave_path, tmp)
            os.replace(tmp, self._link)  # atomic, like udev moving a symlink

    def _close_pty_locked(self) -> None:
        if self._link and os.path.islink(self._link):
            os.unlink(self._link)
        if self._master is not None:
            os.close(self._master)
        self._master = None
        self._host_attached = False
        self._slave_path = None

    def _listen_locked(self) -> None:
        assert self._tcp_addr is not None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # After unplug() the old connection may sit in FIN_WAIT for a moment, which blocks the
        # port even with SO_REUSEADDR; a replug waits for it rather than moving port.
        deadline = time.monotonic() + 3.0
        while True:
            try:
                listener.bind(self._tcp_addr)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    listener.close()
                    raise OSError(
                        exc.errno, f"cannot listen on {self._tcp_addr[0]}:{self._tcp_addr[1]}: "
                        f"{exc.strerror}; pick another port (0 = any free one)"
                    ) from exc
                time.sleep(0.05)
        listener.listen(1)
        listener.setblocking(False)
        self._listener = listener
        self._tcp_addr = (self._tcp_addr[0], listener.getsockname()[1])

    def _close_tcp_locked(self) -> None:
        for sock in (self._client, self._listener):
            if sock is not None:
                sock.close()
        self._client = self._listener = None

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> "EcgBoxEmulator":
        """Power on: start the background thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return self
            self._running = True
            self._thread = threading.Thread(target=self._run, name="ecg-box-emulator", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Power off: stop the thread; transports stay open."""
        with self._lock:
            self._running = False
            thread, self._thread = self._thread, None
            self._wake()
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            self._stop_streaming_locked()

    def close(self) -> None:
        """Stop and release everything (pty, link, sockets)."""
        self.stop()
        with self._lock:
            if self._master is not None:
                self._close_pty_locked()
            self._close_tcp_locked()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "EcgBoxEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- fault injection

    def inject_garbage(self, n_bytes: int) -> None:
        """Write ``n_bytes`` of line noise between two frames. The noise never contains the sync
        word's first byte, so its effect on a host decoder is exact: n discarded bytes, one resync."""
        noise = self._rng.integers(0, 256, n_bytes, dtype=np.uint8)
        noise[noise == SYNC[0]] = 0x00
        with self._lock:
            self._pending_garbage.append(noise.tobytes())
            self._wake()

    def corrupt_next(self, n_frames: int = 1) -> None:
        """Send the next ``n_frames`` DATA frames with a broken CRC."""
        with self._lock:
            self._corrupt_pending += n_frames

    def drop_next(self, n_frames: int = 1) -> None:
        """Skip the next ``n_frames`` DATA frames (their sequence numbers are used up)."""
        with self._lock:
            self._drop_pending += n_frames

    def ignore_next(self, command: Command, n: int = 1) -> None:
        """Hear the next ``n`` copies of ``command`` and neither act on nor answer them (a copy
        lost on the line, or a box busy past the reply deadline): what a host's retry (spec
        section 6: again after 250 ms, unresponsive after 3 tries) is for. Counted in
        ``commands_ignored``, not ``commands``."""
        with self._lock:
            self._ignore[Command(command)] = self._ignore.get(Command(command), 0) + n

    def set_recording(self, recording: Recording | str) -> None:
        """Another person's ECG from the next frame on, at the same rate, from its start: the
        box stays plugged in and streaming while the wearer changes (electrodes moved from one
        person to the next), as on a hub where the box lives on the shelf."""
        if isinstance(recording, str):
            recording = load_recording(recording)
        with self._lock:
            self.recording = recording
            self._inherent_off = _inherent_lead_off(recording.lead_present)
            self._present = recording.lead_present.copy()
            self._signal = self._make_signal(self._rate)
            self._pos = 0
            self._finished = False

    def set_lead_off(self, mask: Electrode) -> None:
        """Report these electrodes off (replaces the previous mask; the recording's absent leads
        stay flagged regardless)."""
        with self._lock:
            self._injected_off = Electrode(int(mask))

    # ------------------------------------------------------------------------------- the device

    def _make_signal(self, rate_hz: int) -> np.ndarray:
        mv = resample_recording(self.recording, rate_hz)
        mv[:, ~self._present] = 0.0  # absent leads carry no signal, only their lead-off bit
        self._schedule = self._make_schedule(rate_hz, len(mv))
        return _to_counts(mv, DEFAULT_UV_PER_LSB)

    def _make_schedule(self, rate_hz: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The recording's lead-off bits and link gaps per sample at ``rate_hz`` (None if it has
        none): sample j at rate_hz is at j * fs / rate_hz in the recording."""
        rec = self.recording
        if rec.lead_off_bits is None and rec.link_gap is None:
            return None
        m = rec.leads_mv.shape[0]
        src = np.minimum(np.arange(n, dtype=np.int64) * rec.fs_hz // rate_hz, m - 1)
        bits = rec.lead_off_bits if rec.lead_off_bits is not None else np.zeros(m, np.uint8)
        gap = rec.link_gap if rec.link_gap is not None else np.zeros(m, bool)
        return bits[src], gap[src]

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _frame_period_s(self) -> float:
        return self.samples_per_frame / self._rate / self.speed

    def _start_streaming_locked(self) -> None:
        now = time.monotonic()
        if not self._streaming:
            self._device_us += int((now - self._idle_since) * 1e6 * self.speed)
        self._streaming = True
        self._stream_base_us = self._device_us
        if self.loop:  # a demo starts at the top; a replay resumes (see the class docstring)
            self._pos = 0
        self._samples_streamed = 0
        self._t_anchor = now
        self._frames_scheduled = 0

    def _stop_streaming_locked(self) -> None:
        if self._streaming:
            self._device_us = self._stream_base_us + self._samples_streamed * 1_000_000 // self._rate
            self._idle_since = time.monotonic()
        self._streaming = False

    def _handle(self, event: object) -> bytes:
        """Device-side state machine: one decoded host frame in, the reply bytes out."""
        if isinstance(event, ProtocolError):
            self.naks += 1
            if event.version != 1:
                return encode_nak(event.frame_type, ErrorCode.UNSUPPORTED_VERSION, event.seq)
            if 0x10 <= event.frame_type <= 0x1F:
                return encode_nak(event.frame_type, ErrorCode.UNKNOWN_COMMAND, event.seq)
            return encode_nak(event.frame_type, ErrorCode.BAD_LENGTH, event.seq)
        if not isinstance(event, HostCommand):
            return b""  # device->host frames looped back: not for us
        if self._ignore.get(event.command, 0) > 0:
            self._ignore[event.command] -= 1
            self.commands_ignored += 1
            return b""
        self.commands += 1
        cmd, arg, seq = event.command, event.argument, event.seq
        if cmd == Command.PING:
            return encode_pong(arg, seq)
        if cmd == Command.SET_RATE:
            if self._streaming:
                self.naks += 1
                return encode_nak(cmd, ErrorCode.BUSY, seq)
            if arg not in SUPPORTED_RATES:
                self.naks += 1
                return encode_nak(cmd, ErrorCode.UNSUPPORTED_RATE, seq)
            if arg != self._rate:
                self._signal = self._make_signal(arg)
                self._pos = self._pos * arg // self._rate  # the same place in the recording
                self._rate = arg
            return encode_ack(cmd, seq)
        if arg != 0:
            self.naks += 1
            return encode_nak(cmd, ErrorCode.BAD_ARGUMENT, seq)
        if cmd == Command.GET_INFO:
            return encode_device_info(self.device_info, seq)
        if cmd == Command.START:
            reply = encode_ack(cmd, seq)
            if not self._streaming and not self._finished:  # a finished replay has nothing to send
                self._start_streaming_locked()
            return reply
        if cmd == Command.STOP:
            self._stop_streaming_locked()
            return encode_ack(cmd, seq)
        self.naks += 1  # pragma: no cover - every Command is handled above
        return encode_nak(cmd, ErrorCode.UNKNOWN_COMMAND, seq)

    def _next_frame_locked(self) -> bytes | None:
        """Produce the next DATA frame (or None when it was dropped or the recording ended).
        Without ``loop`` the last frame holds the samples left, fewer than ``samples_per_frame``
        when the recording is not a whole number of frames (the spec allows 1..255 a frame)."""
        n = self.samples_per_frame
        total = self._signal.shape[0]
        if not self.loop:
            n = min(n, total - self._pos)
            if n <= 0:
                return None
        idx = (self._pos + np.arange(n)) % total
        samples = self._signal[idx]
        lead_off = self.lead_off
        if self._schedule is not None:
            # A frame carries one set of bits: an electrode off on any of its samples is off for
            # the frame (with the box's 10 samples a frame, the frames ``biod record`` saw live).
            bits, gap = self._schedule
            lead_off |= Electrode(int(np.bitwise_or.reduce(bits[idx])))
            if gap[idx].all():
                self._drop_pending += 1  # lost on the link live: the host sees the same sequence gap
        ts = (self._stream_base_us + self._samples_streamed * 1_000_000 // self._rate) & 0xFFFFFFFF
        seq = self._data_seq
        self._data_seq = (seq + 1) & 0xFFFF
        self._pos = (self._pos + n) % total if self.loop else self._pos + n
        self._samples_streamed += n
        if self._drop_pending:
            self._drop_pending -= 1
            self.frames_dropped += 1
            return None
        frame = encode_data_frame(seq, ts, lead_off, samples)
        if self._corrupt_pending:
            self._corrupt_pending -= 1
            self.frames_corrupted += 1
            frame = frame[:-1] + bytes([frame[-1] ^ 0x01])
        return frame

    # -------------------------------------------------------------------------------- I/O loop

    def _input_fd(self) -> int | socket.socket | None:
        if self._master is not None:
            return self._master if self._host_attached else None
        return self._client

    def _poll_attach_locked(self) -> None:
        """Notice a host opening the pty: the master stops reporting POLLHUP once somebody holds
        the slave open. Called every ``_ATTACH_POLL_S`` while nobody does."""
        if self._master is None or self._host_attached:
            return
        poller = select.poll()
        poller.register(self._master, select.POLLIN)
        if not any(ev & select.POLLHUP for _, ev in poller.poll(0)):
            self._host_attached = True
            self._reset_on_open_locked()

    def _reset_on_open_locked(self) -> None:
        """A host opened the link: a board that resets on open (``boot_s``) boots now."""
        if self.boot_s > 0:
            self.boots += 1
            self._booting_until = time.monotonic() + self.boot_s
            self._stop_streaming_locked()
            self._data_seq = 0
            self._decoder = Decoder()

    def _host_hung_up_locked(self) -> None:
        """The host closed the port (the pty's last slave opener is gone): back to IDLE, as the
        spec requires when the link drops, so a host that opens it again hears nothing before
        its START. Bytes the box wrote since the close are flushed: the kernel would otherwise
        hand them to the next opener that does not flush its input (pyserial does; ``cat`` does
        not)."""
        self._host_attached = False
        self.link_drops += 1
        self._stop_streaming_locked()
        self._decoder = Decoder()
        self._pending_garbage.clear()
        if self._master is not None:
            try:
                termios.tcflush(self._master, termios.TCIOFLUSH)
            except (termios.error, OSError):
                pass

    def _write(self, data: bytes) -> bool:
        """Write all of ``data`` to the link; False if the host is gone or not reading."""
        deadline = time.monotonic() + _WRITE_TIMEOUT_S
        view = memoryview(data)
        while view:
            try:
                if self._master is not None:
                    if not self._host_attached:
                        return False  # nobody has the port open: the bytes would reach the next opener
                    n = os.write(self._master, view)
                elif self._client is not None:
                    n = self._client.send(view)
                else:
                    return False
                view = view[n:]
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                target = self._master if self._master is not None else self._client
                if left <= 0 or target is None:
                    return False
                select.select([], [target], [], left)
            except OSError:
                if self._client is not None:
                    self._drop_client_locked()
                return False
        return True

    def _drop_client_locked(self) -> None:
        """The TCP link dropped (the host closed it, it failed, or a new host replaced it): back
        to IDLE, as on a pty."""
        if self._client is not None:
            self._client.close()
            self._client = None
            self.link_drops += 1
        self._stop_streaming_locked()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._running:
                    return
                self._poll_attach_locked()
                rlist: list = [self._wake_r]
                src = self._input_fd()
                if src is not None:
                    rlist.append(src)
                if self._listener is not None:
                    rlist.append(self._listener)
                if self._pending_garbage:
                    timeout = 0.0
                elif self._streaming:
                    due = self._t_anchor + (self._frames_scheduled + 1) * self._frame_period_s()
                    timeout = max(0.0, due - time.monotonic())
                else:
                    timeout = 1.0
                if self._master is not None and not self._host_attached:
                    timeout = min(timeout, _ATTACH_POLL_S)
            try:
                readable, _, _ = select.select(rlist, [], [], timeout)
            except (OSError, ValueError):
                readable = []  # a descriptor was closed under us (unplug); loop re-reads state
            with self._lock:
                if not self._running:
                    return
                self._service(readable)

    def _service(self, readable: list) -> None:
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass
        if self._listener is not None and self._listener in readable:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                conn = None
            if conn is not None:
                if self._client is not None:
                    self._drop_client_locked()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(False)
                self._client = conn
                self._decoder = Decoder()
                self._reset_on_open_locked()
        src = self._input_fd()
        if src is not None and src in readable:
            self._read_host(src)
        for noise in self._pending_garbage:
            if self._write(noise):
                self.garbage_bytes += len(noise)
        self._pending_garbage.clear()
        if self._streaming:
            self._stream_due_frames()

    def _read_host(self, src: int | socket.socket) -> None:
        try:
            data = os.read(src, 4096) if isinstance(src, int) else src.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.EIO and isinstance(src, int):  # the host closed the pty slave
                self._host_hung_up_locked()
                return
            data = b""
        if not data:
            if not isinstance(src, int):
                self._drop_client_locked()  # host closed the TCP connection
            return
        if time.monotonic() < self._booting_until:  # the bootloader hears it, not the protocol
            self.bytes_lost_booting += len(data)
            return
        crc_before = self._decoder.stats.crc_errors
        replies = [self._handle(ev) for ev in self._decoder.feed(data)]
        for _ in range(self._decoder.stats.crc_errors - crc_before):
            self.naks += 1
            replies.insert(0, encode_nak(0, ErrorCode.BAD_CRC))
        reply = b"".join(replies)
        if reply:
            self._write(reply)

    def _stream_due_frames(self) -> None:
        now = time.monotonic()
        period = self._frame_period_s()
        behind = int((now - self._t_anchor) / period) - self._frames_scheduled
        if behind > _MAX_CATCH_UP_FRAMES:  # the machine stalled: keep the device pace, re-anchor
            self._t_anchor = now - self._frames_scheduled * period
            behind = 0
        for _ in range(max(0, behind)):
            if not self._streaming:
                break
            self._frames_scheduled += 1
            frame = self._next_frame_locked()
            if frame is not None:
                if self._write(frame):
                    self.frames_sent += 1
                else:
                    self.frames_overflowed += 1
            if not self.loop and self._pos >= self._signal.shape[0]:
                # Set only now, after the write: a host that sees ``finished`` and then reads
                # nothing has read the last frame.
                self._finished = True
                self._stop_streaming_locked()


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    from .recordings import list_recordings

    parser = argparse.ArgumentParser(
        prog="python -m firmware_protocol.emulators.ecg_box",
        description="Emulated serial ECG box (biod ECG serial protocol v1) playing a real recording.",
    )
    parser.add_argument("--recording", required=True, choices=list_recordings(), metavar="NAME",
                        help="shipped recording: " + ", ".join(list_recordings()))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pty", action="store_true", help="serve on a pseudo-terminal (default)")
    mode.add_argument("--tcp", type=int, metavar="PORT", help="serve on TCP 127.0.0.1:PORT")
    parser.add_argument("--link", metavar="PATH", help="with --pty: keep a symlink to the pty here")
    parser.add_argument("--rate", type=int, default=500, choices=SUPPORTED_RATES)
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    parser.add_argument("--serial", default="BIOD-EMU-0001")
    parser.add_argument("--samples-per-frame", type=int, default=10)
    parser.add_argument("--boot-s", type=float, default=0.0,
                        help="boot this long after each open, deaf (an Arduino-style board reset by DTR)")
    args = parser.parse_args(argv)
    if args.link and args.tcp is not None:
        parser.error("--link only applies to --pty")

    stop = threading.Event()
    # Handlers, not KeyboardInterrupt: Ctrl-C at any point must still close the pty and link.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    emu = EcgBoxEmulator(args.recording, rate_hz=args.rate, speed=args.speed,
                         serial=args.serial, samples_per_frame=args.samples_per_frame, boot_s=args.boot_s)
    with emu:
        if args.tcp is not None:
            port = emu.serve_tcp(port=args.tcp)
            print(f"tcp://127.0.0.1:{port}", flush=True)
        else:
            path = emu.open_pty(args.link)
            print(args.link or path, flush=True)
            if args.link:
                print(f"  -> {path}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
