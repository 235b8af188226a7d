"""biod ECG serial protocol v1: frame encoders and a sans-I/O decoder.

The wire format is specified in ``docs/ecg-serial-protocol.md``; this module is its reference
implementation. Like h11 it does no I/O: bytes go in with :meth:`Decoder.feed`, typed events come
out, so the same code runs in the daemon (pyserial/asyncio), in the emulator (device side) and in
tests fed one byte at a time.

Frame (all multi-byte fields little-endian)::

    sync 0xA5 0x5A | version u8 | type u8 | seq u16 | length u16 | payload[length] | crc16 u16

The CRC (CRC-16/CCITT-FALSE) covers version..payload, i.e. everything but the sync word and the
CRC itself.

Why the decoder restarts its sync search one byte after a failed candidate, not after the
candidate's claimed length: the length of a frame that failed its CRC is untrustworthy (it may be
garbage that happens to contain the sync word), and a valid frame can start inside those bytes.
Skipping the bogus length would silently drop that valid frame.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .crc import crc16_ccitt

__all__ = [
    "DEFAULT_BAUD",
    "DEFAULT_UV_PER_LSB",
    "HEADER_SIZE",
    "LEAD_NAMES",
    "MAX_CHANNELS",
    "MAX_FRAME_SIZE",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "SAMPLE_MAX",
    "SAMPLE_MIN",
    "SUPPORTED_RATES",
    "SYNC",
    "Ack",
    "Command",
    "DataFrame",
    "Decoder",
    "DecoderStats",
    "DeviceInfo",
    "Electrode",
    "ErrorCode",
    "Event",
    "FrameType",
    "HostCommand",
    "Nak",
    "Pong",
    "ProtocolError",
    "encode_ack",
    "frames_missing",
    "SEQ_RESTART_DELTA",
    "SeqStep",
    "seq_step",
    "encode_command",
    "encode_data_frame",
    "encode_device_info",
    "encode_frame",
    "encode_nak",
    "encode_pong",
]

PROTOCOL_VERSION: int = 1
SUPPORTED_RATES: tuple[int, ...] = (250, 500, 1000)
#: 3 ch x 1000 Hz x 24 bit in 10-sample frames = 112 B per 10 ms = 11 200 B/s = 112 000 bit/s on
#: an 8N1 UART (10 bits per byte); 460 800 baud leaves 4.1x headroom (1.5x even for 1-sample
#: frames, 31 B each at 1000 Hz = 310 000 bit/s). See the spec, section "Timing and baud rate".
DEFAULT_BAUD: int = 460_800

SYNC = b"\xa5\x5a"
HEADER_SIZE = 8  # sync(2) version(1) type(1) seq(2) length(2)
CRC_SIZE = 2
#: Longest payload any v1 frame may declare; anything longer is rejected from the header alone.
MAX_PAYLOAD = 1024
MAX_FRAME_SIZE = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE
MAX_CHANNELS = 3
SAMPLE_MIN = -(1 << 23)
SAMPLE_MAX = (1 << 23) - 1
#: ADS1298-class front end, VREF 2.4 V, PGA gain 6: LSB = 2 * VREF / gain / 2**24
#: = 0.0476837158203125 uV (exact in binary32, so it survives the wire unchanged).
DEFAULT_GAIN = 6.0
DEFAULT_UV_PER_LSB = 2 * 2.4e6 / DEFAULT_GAIN / (1 << 24)

LEAD_NAMES = ("I", "II", "III")  # I = LA-RA, II = LL-RA, III = LL-LA

_HEADER = struct.Struct("<2sBBHH")
_DATA_HEAD = struct.Struct("<IBBBBf")  # timestamp, lead_off, channels, n_samples, reserved, uV/LSB
_DATA_HEAD_SIZE = _DATA_HEAD.size  # 12
_INFO_HEAD = struct.Struct("<BBHff")  # channels, n_rates, rate_hz, gain, uV/LSB
_U32 = struct.Struct("<I")
_NAK = struct.Struct("<BB")


class FrameType(enum.IntEnum):
    """Frame type byte. 0x10-0x1F host->device commands, 0x80-0x8F device->host."""

    GET_INFO = 0x10
    START = 0x11
    STOP = 0x12
    SET_RATE = 0x13
    PING = 0x14
    DATA = 0x80
    DEVICE_INFO = 0x81
    ACK = 0x82
    NAK = 0x83
    PONG = 0x84


class Command(enum.IntEnum):
    """Host->device commands; the value is the frame type byte that carries the command."""

    GET_INFO = 0x10
    START = 0x11
    STOP = 0x12
    SET_RATE = 0x13
    PING = 0x14


class ErrorCode(enum.IntEnum):
    """Reason byte of a NAK."""

    BAD_CRC = 0x01  #: a host frame failed its CRC (NAK.command is 0: the type is untrusted)
    UNKNOWN_COMMAND = 0x02  #: frame type not a v1 command (NAK.command echoes the type byte)
    BAD_ARGUMENT = 0x03  #: argument invalid for the command (e.g. non-zero where 0 is required)
    UNSUPPORTED_RATE = 0x04  #: SET_RATE to a rate not in DEVICE_INFO.rates
    BUSY = 0x05  #: command not allowed in the current state (SET_RATE while streaming)
    BAD_LENGTH = 0x06  #: payload length wrong for the command
    UNSUPPORTED_VERSION = 0x07  #: version byte is not one the device speaks
    INTERNAL = 0xFF  #: device fault (ADC not responding, ...)


class Electrode(enum.IntFlag):
    """Lead-off bits of a DATA frame: a set bit means that electrode is OFF (not in contact)."""

    NONE = 0
    RA = 0x01
    LA = 0x02
    LL = 0x04
    RL = 0x08


_ALL_ELECTRODES = int(Electrode.RA | Electrode.LA | Electrode.LL | Electrode.RL)
# Which electrodes make up each lead, in channel order I, II, III.
_LEAD_ELECTRODES = (
    int(Electrode.LA | Electrode.RA),
    int(Electrode.LL | Electrode.RA),
    int(Electrode.LL | Electrode.LA),
)
_COMMAND_TYPES = frozenset(int(c) for c in Command)
_CONTROL_REPLY_LENGTH = {FrameType.ACK: 1, FrameType.NAK: 2, FrameType.PONG: 4}


# --------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class DataFrame:
    """One DATA frame: ``samples[i, c]`` is sample i of channel c (leads I, II, III) in ADC counts.

    ``timestamp_us`` is the device clock (u32, wraps every 2**32 us = 71.6 min) at sample 0.
    """

    seq: int
    timestamp_us: int
    lead_off: Electrode
    samples: np.ndarray  # int32 (n_samples, n_channels)
    uv_per_lsb: float = DEFAULT_UV_PER_LSB

    def millivolts(self) -> np.ndarray:
        """Samples in mV, float32 (n_samples, n_channels)."""
        return self.samples.astype(np.float32) * np.float32(self.uv_per_lsb / 1000.0)

    def lead_valid(self) -> np.ndarray:
        """bool (n_channels,): False where either electrode of that lead is off.

        RL (driven right leg) is the reference and belongs to no lead; the host may still treat
        RL-off as a quality warning for every lead.
        """
        off = int(self.lead_off)
        return np.array(
            [off & _LEAD_ELECTRODES[c] == 0 for c in range(self.samples.shape[1])], dtype=bool
        )

    def __eq__(self, other: object) -> bool:  # ndarray fields need an explicit comparison
        if not isinstance(other, DataFrame):
            return NotImplemented
        return (
            self.seq == other.seq
            and self.timestamp_us == other.timestamp_us
            and int(self.lead_off) == int(other.lead_off)
            and self.uv_per_lsb == other.uv_per_lsb
            and self.samples.shape == other.samples.shape
            and bool(np.array_equal(self.samples, other.samples))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class DeviceInfo:
    """Answer to GET_INFO: who the device is and how to scale its samples."""

    model: str
    serial: str
    firmware: str
    rates: tuple[int, ...]
    rate_hz: int
    gain: float
    channels: int
    uv_per_lsb: float
    seq: int = field(default=0, compare=False)  #: echoes the GET_INFO frame's seq


@dataclass(frozen=True)
class Ack:
    """Command accepted. ``seq`` echoes the seq of the command frame (not compared)."""

    command: Command | int
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Nak:
    """Command refused. ``command`` is 0 for BAD_CRC; the raw type byte for UNKNOWN_COMMAND."""

    command: Command | int
    error: ErrorCode | int
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Pong:
    """Answer to PING, echoing its 32-bit token."""

    token: int
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class HostCommand:
    """A host->device command, as the device side of the decoder sees it."""

    command: Command
    argument: int = 0
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class ProtocolError:
    """A frame that passed its CRC but breaks the spec (wrong version, unknown type, bad payload).

    It is a real frame from a misbehaving peer, so it is reported rather than skipped silently;
    ``reason`` says what is wrong and what to do about it.
    """

    frame_type: int
    seq: int
    version: int
    reason: str


Event = Union[DataFrame, DeviceInfo, Ack, Nak, Pong, HostCommand, ProtocolError]


@dataclass
class DecoderStats:
    """Counters of one Decoder (mutable: the decoder updates them in place).

    * ``frames``: frames that passed the CRC (duplicates and protocol errors included).
    * ``crc_errors``: candidate frames (sync + plausible header, all bytes present) whose CRC
      failed.
    * ``lost_frames``: DATA sequence numbers skipped (gap sizes summed, u16 wrap handled).
    * ``duplicates``: DATA frames repeating the previous seq; they are counted and NOT emitted.
    * ``seq_restarts``: DATA seq went backwards (device reset); emitted, no loss counted.
    * ``resyncs``: valid frames that were preceded by discarded bytes (sync had been lost).
    * ``discarded_bytes``: bytes that were not part of any CRC-valid frame.
    * ``protocol_errors``: CRC-valid frames that break the spec (see :class:`ProtocolError`).
    """

    bytes_fed: int = 0
    frames: int = 0
    data_frames: int = 0
    crc_errors: int = 0
    lost_frames: int = 0
    duplicates: int = 0
    seq_restarts: int = 0
    resyncs: int = 0
    discarded_bytes: int = 0
    protocol_errors: int = 0


def frames_missing(last_seq: int, seq: int) -> int:
    """DATA frames the device produced between the frame ``last_seq`` and the frame ``seq``
    (section 5: the u16 counter wraps 65535 -> 0; 0 means ``seq`` follows on)."""
    return (seq - last_seq - 1) & 0xFFFF


#: A forward step of the u16 DATA seq at least this large is a backwards jump (section 5).
SEQ_RESTART_DELTA: int = 0x8000


@dataclass(frozen=True)
class SeqStep:
    """How one DATA frame's seq follows the previous one (section 5).

    ``lost``: frames the device produced in between that never arrived; ``duplicate``: the same
    seq again (drop it); ``restart``: the counter jumped back (the device reset), which is no
    loss: the time between is unknown, not measured in frames."""

    lost: int = 0
    duplicate: bool = False
    restart: bool = False


_IN_ORDER = SeqStep()
_DUPLICATE = SeqStep(duplicate=True)
_RESTART = SeqStep(restart=True)


def seq_step(last_seq: int | None, seq: int) -> SeqStep:
    """The section 5 rule for consecutive DATA frames, in ONE place for every consumer.

    WHY shared: the decoder's statistics and the loss the host hands on with each frame must
    agree. When each kept its own arithmetic, a device reset (seq 1099 -> 0) was a restart with no
    loss for the decoder but ~64 000 lost frames for the source, and ``biod record`` filled the
    rest of the recording with "no sample". ``last_seq`` None (first frame) is in order."""
    if last_seq is None:
        return _IN_ORDER
    delta = (seq - last_seq) & 0xFFFF
    if delta == 1:
        return _IN_ORDER
    if delta == 0:
        return _DUPLICATE
    if delta >= SEQ_RESTART_DELTA:
        return _RESTART
    return SeqStep(lost=delta - 1)


# ------------------------------------------------------------------------------------- encoders


def encode_frame(frame_type: int, seq: int, payload: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    """Wrap ``payload`` in sync, header and CRC."""
    if not 0 <= seq <= 0xFFFF:
        raise ValueError(f"seq must be a u16 (0..65535), got {seq}; wrap it with seq & 0xFFFF")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}; "
            "send fewer samples per frame"
        )
    body = _HEADER.pack(SYNC, version, frame_type, seq, len(payload))[2:] + payload
    return SYNC + body + crc16_ccitt(body).to_bytes(2, "little")


def _pack_int24(samples: np.ndarray) -> bytes:
    """int32 array -> little-endian 24-bit two's complement, row-major (vectorised)."""
    as_bytes = np.ascontiguousarray(samples, dtype="<i4").reshape(-1).view(np.uint8).reshape(-1, 4)
    return as_bytes[:, :3].tobytes()


def _unpack_int24(raw: bytes | memoryview, n_samples: int, n_channels: int) -> np.ndarray:
    """Little-endian 24-bit two's complement -> int32 (n_samples, n_channels), sign-extended."""
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
    wide = np.empty((b.shape[0], 4), dtype=np.uint8)
    wide[:, :3] = b
    wide[:, 3] = np.where(b[:, 2] & 0x80, 0xFF, 0x00)
    return wide.view("<i4").reshape(n_samples, n_channels).astype(np.int32, copy=False)


def encode_data_frame(
    seq: int,
    timestamp_us: int,
    lead_off: Electrode,
    samples: np.ndarray,
    uv_per_lsb: float = DEFAULT_UV_PER_LSB,
) -> bytes:
    """Encode a DATA frame. ``samples``: integer counts (n_samples, n_channels), 24-bit range."""
    samples = np.asarray(samples)
    if samples.ndim != 2:
        raise ValueError(f"samples must be 2-D (n_samples, n_channels), got shape {samples.shape}")
    n, ch = samples.shape
    if not 1 <= ch <= MAX_CHANNELS:
        raise ValueError(f"v1 carries 1..{MAX_CHANNELS} channels (leads I, II, III), got {ch}")
    if not 1 <= n <= 255 or _DATA_HEAD_SIZE + 3 * n * ch > MAX_PAYLOAD:
        raise ValueError(
            f"{n} samples x {ch} channels does not fit one frame (1..255 samples and "
            f"{MAX_PAYLOAD} payload bytes); split it into several frames"
        )
    if not np.issubdtype(samples.dtype, np.integer):
        raise TypeError(f"samples must be integer ADC counts, got dtype {samples.dtype}")
    if n and (samples.min() < SAMPLE_MIN or samples.max() > SAMPLE_MAX):
        raise ValueError(
            f"samples out of the 24-bit range [{SAMPLE_MIN}, {SAMPLE_MAX}]: "
            f"min {samples.min()}, max {samples.max()}; clip them before encoding"
        )
    if not 0 <= timestamp_us <= 0xFFFFFFFF:
        raise ValueError(f"timestamp_us must be a u32, got {timestamp_us}; wrap with & 0xFFFFFFFF")
    if int(lead_off) & ~_ALL_ELECTRODES:
        raise ValueError(f"lead_off has bits outside RA|LA|LL|RL: {int(lead_off):#x}")
    head = _DATA_HEAD.pack(timestamp_us, int(lead_off), ch, n, 0, uv_per_lsb)
    return encode_frame(FrameType.DATA, seq, head + _pack_int24(samples))


def encode_command(command: Command, argument: int = 0, seq: int = 0) -> bytes:
    """Encode a host->device command; ``argument`` is the rate for SET_RATE, the token for PING."""
    if not 0 <= argument <= 0xFFFFFFFF:
        raise ValueError(f"command argument must be a u32, got {argument}")
    return encode_frame(int(command), seq, _U32.pack(argument))


def _encode_str(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"DeviceInfo.{what} is {len(raw)} UTF-8 bytes; the limit is 255")
    return bytes([len(raw)]) + raw


def encode_device_info(info: DeviceInfo, seq: int = 0) -> bytes:
    """Encode DEVICE_INFO (the answer to GET_INFO; ``seq`` echoes the request's seq)."""
    if len(info.rates) > 255:
        raise ValueError("DeviceInfo.rates has more than 255 entries")
    payload = (
        _INFO_HEAD.pack(info.channels, len(info.rates), info.rate_hz, info.gain, info.uv_per_lsb)
        + struct.pack(f"<{len(info.rates)}H", *info.rates)
        + _encode_str(info.model, "model")
        + _encode_str(info.serial, "serial")
        + _encode_str(info.firmware, "firmware")
    )
    return encode_frame(FrameType.DEVICE_INFO, seq, payload)


def encode_ack(command: Command | int, seq: int = 0) -> bytes:
    """Encode ACK for ``command`` (``seq`` echoes the command frame's seq)."""
    return encode_frame(FrameType.ACK, seq, bytes([int(command)]))


def encode_nak(command: Command | int, error: ErrorCode | int, seq: int = 0) -> bytes:
    """Encode NAK; ``command`` is 0 when the offending frame's type cannot be trusted (BAD_CRC)."""
    return encode_frame(FrameType.NAK, seq, _NAK.pack(int(command), int(error)))


def encode_pong(token: int, seq: int = 0) -> bytes:
    """Encode PONG echoing a PING's token."""
    return encode_frame(FrameType.PONG, seq, _U32.pack(token))


# -------------------------------------------------------------------------------------- decoder


def _enum_or_int(enum_cls: type[enum.IntEnum], value: int) -> enum.IntEnum | int:
    try:
        return enum_cls(value)
    except ValueError:
        return value


def _plausible_header(version: int, frame_type: int, length: int) -> bool:
    """Cheap header check that rejects most false sync words before waiting for a payload.

    Why so strict: a false sync with a plausible length makes the decoder wait for up to
    MAX_PAYLOAD bytes before the CRC can reject it, delaying (never losing) the real frames
    behind it. So a v1 header must name a known type with a length that type allows; the only
    unknown v1 types accepted are in the command range 0x10-0x1F with the command length, so a
    device can NAK UNKNOWN_COMMAND. Versions 2..7 are accepted with any bounded length, so a
    newer device is recognised and reported (ProtocolError) instead of looking like noise.
    """
    if length > MAX_PAYLOAD or not 1 <= version <= 7:
        return False
    if version != PROTOCOL_VERSION:
        return True
    if 0x10 <= frame_type <= 0x1F:
        return length == 4
    if frame_type == FrameType.DATA:
        return length >= _DATA_HEAD_SIZE + 3 and (length - _DATA_HEAD_SIZE) % 3 == 0
    if frame_type == FrameType.DEVICE_INFO:
        return length >= _INFO_HEAD.size + 3
    return _CONTROL_REPLY_LENGTH.get(frame_type) == length  # type: ignore[call-overload]


class Decoder:
    """Sans-I/O decoder of biod ECG serial frames, for either direction.

    ``feed(bytes)`` returns the events completed by those bytes; chunking does not matter
    (one byte at a time gives the same events and stats as everything at once). Between calls
    at most ``MAX_FRAME_SIZE - 1`` bytes are retained, whatever is fed.
    Call :meth:`flush` at end of input (port closed) to give up on a partial candidate and
    recover any valid frame that was hiding behind it.
    """

    def __init__(self) -> None:
        self.stats = DecoderStats()
        self._buf = bytearray()
        self._last_data_seq: int | None = None
        self._discarding = False  # bytes were discarded since the last valid frame

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a candidate frame."""
        return len(self._buf)

    def reset_sequence(self) -> None:
        """Forget the last DATA seq (call after a device reset/replug so no gap is counted)."""
        self._last_data_seq = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Consume ``data``; return the events it completed."""
        self.stats.bytes_fed += len(data)
        self._buf += data
        return self._process(final=False)

    def flush(self) -> list[Event]:
        """End of input: decode what can be decoded and discard the rest."""
        return self._process(final=True)

    # -- internals -----------------------------------------------------------------------------

    def _discard(self, n: int) -> None:
        if n > 0:
            self.stats.discarded_bytes += n
            self._discarding = True

    def _process(self, final: bool) -> list[Event]:
        buf = self._buf
        events: list[Event] = []
        pos = 0
        end = len(buf)
        while True:
            i = buf.find(SYNC, pos)
            if i < 0:
                # Keep a trailing first sync byte: the second may arrive in the next chunk.
                keep = 1 if (not final and end > pos and buf[end - 1] == SYNC[0]) else 0
                self._discard(end - keep - pos)
                pos = end - keep
                break
            self._discard(i - pos)
            pos = i
            if end - i < HEADER_SIZE:
                if final:
                    self._discard(1)
                    pos = i + 1
                    continue
                break
            _, version, frame_type, seq, length = _HEADER.unpack_from(buf, i)
            if not _plausible_header(version, frame_type, length):
                self._discard(1)
                pos = i + 1
                continue
            total = HEADER_SIZE + length + CRC_SIZE
            if end - i < total:
                if final:
                    self._discard(1)
                    pos = i + 1
                    continue
                break
            crc_end = i + HEADER_SIZE + length
            received = buf[crc_end] | (buf[crc_end + 1] << 8)
            if crc16_ccitt(memoryview(buf)[i + 2 : crc_end]) != received:
                self.stats.crc_errors += 1
                self._discard(1)  # restart one byte after the sync: a frame may hide inside
                pos = i + 1
                continue
            self.stats.frames += 1
            if self._discarding:
                self.stats.resyncs += 1
                self._discarding = False
            payload = bytes(buf[i + HEADER_SIZE : crc_end])
            event = self._decode(version, frame_type, seq, payload)
            if event is not None:
                events.append(event)
            pos = i + total
        del buf[:pos]
        return events

    def _error(self, frame_type: int, seq: int, version: int, reason: str) -> ProtocolError:
        self.stats.protocol_errors += 1
        return ProtocolError(frame_type=frame_type, seq=seq, version=version, reason=reason)

    def _decode(self, version: int, frame_type: int, seq: int, payload: bytes) -> Event | None:
        if version != PROTOCOL_VERSION:
            return self._error(
                frame_type, seq, version,
                f"peer speaks ECG serial protocol version {version}; this decoder implements "
                f"version {PROTOCOL_VERSION}: update biod or set the device to protocol v1",
            )
        try:
            if frame_type == FrameType.DATA:
                return self._decode_data(seq, payload)
            if frame_type in _COMMAND_TYPES:
                (argument,) = _U32.unpack(payload)
                return HostCommand(Command(frame_type), argument, seq)
            if 0x10 <= frame_type <= 0x1F:
                return self._error(
                    frame_type, seq, version,
                    f"unknown command {frame_type:#04x}; v1 commands are "
                    + ", ".join(f"{c.name}={c.value:#04x}" for c in Command),
                )
            if frame_type == FrameType.DEVICE_INFO:
                return _decode_device_info(payload, seq)
            if frame_type == FrameType.ACK:
                return Ack(_enum_or_int(Command, payload[0]), seq)
            if frame_type == FrameType.NAK:
                cmd, err = _NAK.unpack(payload)
                return Nak(_enum_or_int(Command, cmd), _enum_or_int(ErrorCode, err), seq)
            if frame_type == FrameType.PONG:
                return Pong(_U32.unpack(payload)[0], seq)
        except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
            return self._error(
                frame_type, seq, version,
                f"malformed {_enum_or_int(FrameType, frame_type)!s} payload "
                f"({len(payload)} bytes): {exc}; the device firmware violates the v1 spec",
            )
        return self._error(
            frame_type, seq, version,
            f"unknown frame type {frame_type:#04x} in a v1 frame; the peer is not speaking the "
            "biod ECG protocol v1 (check the port and the device firmware)",
        )

    def _decode_data(self, seq: int, payload: bytes) -> DataFrame | None:
        ts, lead_off, ch, n, _reserved, uv = _DATA_HEAD.unpack_from(payload)
        if not 1 <= ch <= MAX_CHANNELS:
            raise ValueError(f"channel count {ch} outside 1..{MAX_CHANNELS}")
        if len(payload) != _DATA_HEAD_SIZE + 3 * n * ch or n == 0:
            raise ValueError(f"length {len(payload)} != 12 + 3 x {n} samples x {ch} channels")
        if lead_off & ~_ALL_ELECTRODES:
            raise ValueError(f"reserved lead-off bits set: {lead_off:#04x}")
        if not (uv > 0.0 and np.isfinite(uv)):
            raise ValueError(f"uV/LSB must be a positive finite number, got {uv}")
        self.stats.data_frames += 1
        step = seq_step(self._last_data_seq, seq)
        if step.duplicate:
            self.stats.duplicates += 1
            return None
        self.stats.lost_frames += step.lost
        self.stats.seq_restarts += step.restart
        self._last_data_seq = seq
        samples = _unpack_int24(memoryview(payload)[_DATA_HEAD_SIZE:], n, ch)
        return DataFrame(seq, ts, Electrode(lead_off), samples, float(uv))


def _decode_device_info(payload: bytes, seq: int) -> DeviceInfo:
    ch, n_rates, rate_hz, gain, uv = _INFO_HEAD.unpack_from(payload)
    off = _INFO_HEAD.size
    rates = struct.unpack_from(f"<{n_rates}H", payload, off)
    off += 2 * n_rates
    texts = []
    for _ in range(3):
        n = payload[off]
        raw = payload[off + 1 : off + 1 + n]
        if len(raw) != n:
            raise ValueError("string runs past the end of the payload")
        texts.append(raw.decode("utf-8"))
        off += 1 + n
    if off != len(payload):
        raise ValueError(f"{len(payload) - off} trailing bytes after the firmware string")
    model, serial, firmware = texts
    return DeviceInfo(model, serial, firmware, tuple(rates), rate_hz, float(gain), ch, float(uv), seq)
