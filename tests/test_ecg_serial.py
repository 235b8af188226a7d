"""Tests of the ECG serial protocol v1 codec (firmware_protocol.ecg_serial, firmware_protocol.crc)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from firmware_protocol.crc import crc16_ccitt
from firmware_protocol.ecg_serial import (
    DEFAULT_UV_PER_LSB,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    SUPPORTED_RATES,
    SYNC,
    Ack,
    Command,
    DataFrame,
    Decoder,
    DeviceInfo,
    Electrode,
    ErrorCode,
    FrameType,
    HostCommand,
    Nak,
    Pong,
    ProtocolError,
    encode_ack,
    encode_command,
    encode_data_frame,
    encode_device_info,
    encode_frame,
    encode_nak,
    encode_pong,
)


def _crc_bitwise(data: bytes) -> int:
    """Independent textbook CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _frame(seq: int, n: int = 10, ch: int = 3, seed: int = 0, lead_off: Electrode = Electrode.NONE) -> bytes:
    rng = np.random.default_rng(seed)
    samples = rng.integers(-(1 << 23), 1 << 23, size=(n, ch), dtype=np.int32)
    return encode_data_frame(seq, (seq * 20_000) & 0xFFFFFFFF, lead_off, samples)


def _seqs(events: list) -> list[int]:
    return [e.seq for e in events if isinstance(e, DataFrame)]


# ------------------------------------------------------------------------------------------ CRC


def test_crc_check_value() -> None:
    assert crc16_ccitt(b"123456789") == 0x29B1


@given(st.binary(max_size=300), st.integers(0, 300))
def test_crc_matches_bitwise_reference_and_chains(data: bytes, cut: int) -> None:
    assert crc16_ccitt(data) == _crc_bitwise(data)
    a, b = data[:cut], data[cut:]
    assert crc16_ccitt(b, crc16_ccitt(a)) == crc16_ccitt(data)


def test_worked_example_frame_from_spec() -> None:
    """The PING frame printed in docs/ecg-serial-protocol.md, byte for byte."""
    frame = encode_command(Command.PING, 0x01020304, seq=1)
    assert frame.hex(" ") == "a5 5a 01 14 01 00 04 00 04 03 02 01 fd e5"
    assert crc16_ccitt(frame[2:-2]) == 0xE5FD
    assert Decoder().feed(frame) == [HostCommand(Command.PING, 0x01020304)]


def test_spec_examples_match_the_encoder() -> None:
    """Every hex example in docs/ecg-serial-protocol.md is what the encoder produces."""
    from pathlib import Path

    raw_doc = (Path(__file__).resolve().parents[1] / "docs/ecg-serial-protocol.md").read_text()
    doc = " ".join(raw_doc.split())
    data = encode_data_frame(
        0x0102, 20_000, Electrode.LL,
        np.array([[20971, -20971, (1 << 23) - 1], [-(1 << 23), -1, 0]], dtype=np.int32),
    )
    assert crc16_ccitt(data[2:-2]) == 0xA849
    info = DeviceInfo("BIOD-EMU-ECG3", "BIOD-EMU-0001", "emu-1.0.0", (250, 500, 1000), 500, 6.0, 3,
                      DEFAULT_UV_PER_LSB)
    examples = [
        encode_command(Command.PING, 0x01020304, seq=1),
        encode_command(Command.GET_INFO, seq=1),
        encode_command(Command.START, seq=1),
        encode_command(Command.SET_RATE, 1000, seq=1),
        encode_ack(Command.START, seq=2),
        encode_nak(Command.SET_RATE, ErrorCode.UNSUPPORTED_RATE, seq=3),
        encode_device_info(info, seq=1),
    ]
    for frame in examples:
        assert frame.hex(" ") in doc, frame.hex(" ")
    # The DATA example is an annotated table: each line is hex bytes, then a comment.
    lines = raw_doc[raw_doc.index("a5 5a 01 80 02 01 1e 00") : raw_doc.index("49 a8") + 5].splitlines()
    hex_bytes = []
    for line in lines:
        for tok in line.split():
            if len(tok) != 2 or any(c not in "0123456789abcdef" for c in tok):
                break
            hex_bytes.append(tok)
    assert "".join(hex_bytes) == data.hex()


# ---------------------------------------------------------------------------------- round trips


def test_round_trip_every_frame_type() -> None:
    info = DeviceInfo("BIOD-ECG3", "SN-0042", "1.2.3", SUPPORTED_RATES, 500, 6.0, 3, DEFAULT_UV_PER_LSB)
    samples = np.array([[1, -2, 3], [-4, 5, -6]], dtype=np.int32)
    wire = (
        encode_data_frame(7, 123_456, Electrode.LA | Electrode.RL, samples)
        + encode_device_info(info, seq=3)
        + encode_ack(Command.START, seq=4)
        + encode_nak(Command.SET_RATE, ErrorCode.UNSUPPORTED_RATE, seq=5)
        + encode_pong(0xDEADBEEF, seq=6)
        + b"".join(encode_command(c, arg, seq=i) for i, (c, arg) in enumerate(
            [(Command.GET_INFO, 0), (Command.START, 0), (Command.STOP, 0),
             (Command.SET_RATE, 1000), (Command.PING, 77)]))
    )
    d = Decoder()
    events = d.feed(wire)
    expected = [
        DataFrame(7, 123_456, Electrode.LA | Electrode.RL, samples, DEFAULT_UV_PER_LSB),
        info,
        Ack(Command.START),
        Nak(Command.SET_RATE, ErrorCode.UNSUPPORTED_RATE),
        Pong(0xDEADBEEF),
        HostCommand(Command.GET_INFO, 0),
        HostCommand(Command.START, 0),
        HostCommand(Command.STOP, 0),
        HostCommand(Command.SET_RATE, 1000),
        HostCommand(Command.PING, 77),
    ]
    assert events == expected
    assert [getattr(e, "seq", None) for e in events[1:5]] == [3, 4, 5, 6]  # replies echo seq
    assert isinstance(events[1].rates, tuple) and events[1].uv_per_lsb == DEFAULT_UV_PER_LSB
    assert d.stats.frames == 10 and d.stats.discarded_bytes == 0 and d.stats.crc_errors == 0
    assert d.buffered == 0


def test_millivolts_and_lead_valid() -> None:
    counts = np.array([[20_971, -20_971, 0]], dtype=np.int32)  # ~ +1 mV, -1 mV, 0
    (frame,) = Decoder().feed(encode_data_frame(0, 0, Electrode.LL, counts))
    mv = frame.millivolts()
    assert mv.dtype == np.float32 and mv.shape == (1, 3)
    np.testing.assert_allclose(mv, counts * DEFAULT_UV_PER_LSB / 1000, rtol=1e-6)
    assert abs(mv[0, 0] - 1.0) < 1e-4
    # LL off invalidates II (LL-RA) and III (LL-LA) but not I (LA-RA).
    assert frame.lead_valid().tolist() == [True, False, False]
    assert frame.lead_off == Electrode.LL
    lead_valid = lambda off: DataFrame(0, 0, off, np.zeros((1, 3), np.int32)).lead_valid().tolist()  # noqa: E731
    assert lead_valid(Electrode.RA) == [False, False, True]
    assert lead_valid(Electrode.LA) == [False, True, False]
    assert lead_valid(Electrode.RL) == [True, True, True]
    assert lead_valid(Electrode.NONE) == [True, True, True]


def test_24bit_sign_extension_at_extremes() -> None:
    extremes = np.array([[(1 << 23) - 1, -(1 << 23), -1], [0, 1, -(1 << 23) + 1]], dtype=np.int32)
    (frame,) = Decoder().feed(encode_data_frame(0, 0, Electrode.NONE, extremes))
    assert frame.samples.dtype == np.int32
    np.testing.assert_array_equal(frame.samples, extremes)
    with pytest.raises(ValueError, match="24-bit range"):
        encode_data_frame(0, 0, Electrode.NONE, np.array([[1 << 23]], dtype=np.int32))
    with pytest.raises(ValueError, match="24-bit range"):
        encode_data_frame(0, 0, Electrode.NONE, np.array([[-(1 << 23) - 1]], dtype=np.int64))


def test_sequence_wrap_counts_no_loss_and_gaps_across_wrap() -> None:
    d = Decoder()
    events = d.feed(b"".join(_frame(s) for s in (65534, 65535, 0, 1)))
    assert _seqs(events) == [65534, 65535, 0, 1]
    assert d.stats.lost_frames == 0
    events = d.feed(_frame(65533 + 10 & 0xFFFF))  # 1 -> 7: 5 lost
    assert d.stats.lost_frames == 5
    d.feed(_frame(65530))  # backwards: device restart, not loss
    assert d.stats.seq_restarts == 1 and d.stats.lost_frames == 5
    d.feed(_frame(3))  # 65530 -> 3 across the wrap: 65531..2 = 8 lost
    assert d.stats.lost_frames == 13


def test_duplicate_is_counted_and_not_emitted() -> None:
    d = Decoder()
    events = d.feed(_frame(5) + _frame(5) + _frame(6))
    assert _seqs(events) == [5, 6]
    assert d.stats.duplicates == 1 and d.stats.frames == 3 and d.stats.lost_frames == 0


def test_byte_at_a_time_equals_whole() -> None:
    wire = b"\x00\xa5" + _frame(1) + b"\xa5\x5a\x01" + _frame(2) + encode_pong(9) + _frame(4)
    whole = Decoder()
    ev_whole = whole.feed(wire)
    single = Decoder()
    ev_single = [e for i in range(len(wire)) for e in single.feed(wire[i : i + 1])]
    assert ev_single == ev_whole
    assert single.stats == whole.stats
    assert _seqs(ev_whole) == [1, 2, 4] and whole.stats.lost_frames == 1


def test_absurd_length_rejected_from_header_alone() -> None:
    """A sync word followed by a length > MAX_PAYLOAD must not make the decoder wait for it."""
    d = Decoder()
    bogus = SYNC + bytes([PROTOCOL_VERSION, FrameType.DATA]) + b"\x00\x00" + (60000).to_bytes(2, "little")
    events = d.feed(bogus + _frame(1))
    assert _seqs(events) == [1]  # delivered at once, not after 60 kB
    assert d.stats.crc_errors == 0 and d.stats.resyncs == 1 and d.stats.discarded_bytes == len(bogus)
    # A v1 command frame must be exactly 4 payload bytes; anything else is a false sync.
    bogus_cmd = SYNC + bytes([1, Command.START, 0, 0, 200, 0])
    assert _seqs(d.feed(bogus_cmd + _frame(2))) == [2]


def test_buffer_is_bounded_whatever_is_fed() -> None:
    d = Decoder()
    rng = np.random.default_rng(1)
    for _ in range(50):
        d.feed(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
        assert d.buffered < MAX_FRAME_SIZE
    d.flush()
    # The worst case: a plausible header claiming the longest DATA payload, never completed.
    longest = MAX_PAYLOAD - (MAX_PAYLOAD - 12) % 3
    header = SYNC + bytes([1, FrameType.DATA, 0, 0]) + longest.to_bytes(2, "little")
    d.feed(header + b"\x00" * 500)
    assert d.buffered == HEADER_SIZE + 500
    d.feed(b"\x00" * 5000)  # completes the candidate, which fails CRC; nothing more is held
    assert d.buffered < MAX_FRAME_SIZE and d.stats.crc_errors == 1
    assert _seqs(d.feed(_frame(9))) == [9]


def test_valid_frame_inside_failed_candidate_is_recovered() -> None:
    """A bogus header whose length swallows a real frame must not cost that frame."""
    real = _frame(42)
    bogus = SYNC + bytes([1, FrameType.DATA, 0, 0]) + (12 + 3 * 3 * 30).to_bytes(2, "little")
    d = Decoder()
    events = d.feed(bogus + real + bytes(300))
    assert _seqs(events) == [42]
    assert d.stats.crc_errors == 1


def test_flush_recovers_frame_behind_incomplete_candidate() -> None:
    real = _frame(3)
    bogus = SYNC + bytes([1, FrameType.DATA, 0, 0]) + (12 + 9 * 100).to_bytes(2, "little")
    d = Decoder()
    assert d.feed(bogus + real) == []  # still waiting for the bogus candidate's 1 kB
    assert _seqs(d.flush()) == [3]
    assert d.buffered == 0 and d.stats.discarded_bytes == len(bogus)


def test_protocol_errors_are_reported_not_swallowed() -> None:
    d = Decoder()
    wrong_version = encode_frame(FrameType.PONG, 1, b"\x00\x00\x00\x00", version=2)
    unknown_type = encode_frame(0x1E, 2, b"\x01\x00\x00\x00")
    bad_data = encode_frame(FrameType.DATA, 3, bytes(12 + 3 * 3))  # 0 channels declared
    events = d.feed(wrong_version + unknown_type + bad_data)
    assert [type(e) for e in events] == [ProtocolError] * 3
    assert "version 2" in events[0].reason and "version 1" in events[0].reason
    assert events[1].frame_type == 0x1E and "unknown command" in events[1].reason
    assert "channel" in events[2].reason
    assert d.stats.protocol_errors == 3 and d.stats.frames == 3 and d.stats.discarded_bytes == 0


def test_encoder_rejects_bad_input_with_reason() -> None:
    with pytest.raises(ValueError, match="channels"):
        encode_data_frame(0, 0, Electrode.NONE, np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="split it"):
        encode_data_frame(0, 0, Electrode.NONE, np.zeros((200, 3), np.int32))
    with pytest.raises(TypeError, match="integer"):
        encode_data_frame(0, 0, Electrode.NONE, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="u16"):
        encode_command(Command.PING, 0, seq=70000)


# ---------------------------------------------------------------------- resynchronisation property


def _naive_decode(wire: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Deliberately naive reference scanner: at each offset, is there a complete valid frame?

    Returns (offset, raw bytes) of the valid frames and how many plausible candidates failed their CRC. It shares
    the header plausibility rule with the spec, nothing else.
    """
    from firmware_protocol.ecg_serial import _plausible_header  # the spec's rule, by design

    frames, crc_errors, i = [], 0, 0
    while i + HEADER_SIZE <= len(wire):
        if wire[i : i + 2] == SYNC:
            ver, typ, length = wire[i + 2], wire[i + 3], int.from_bytes(wire[i + 6 : i + 8], "little")
            total = HEADER_SIZE + length + 2
            if _plausible_header(ver, typ, length) and i + total <= len(wire):
                if _crc_bitwise(wire[i + 2 : i + total - 2]) == int.from_bytes(wire[i + total - 2 : i + total], "little"):
                    frames.append((i, wire[i : i + total]))
                    i += total
                    continue
                crc_errors += 1
        i += 1
    return frames, crc_errors


_plain_garbage = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(SYNC, b"\xa5\x00"))


@st.composite
def _evil_garbage(draw: st.DrawFn) -> bytes:
    """Garbage with sync words and plausible v1 headers (DATA with a real length, commands, ...)."""
    kind = draw(st.sampled_from(["data", "cmd", "ack", "bare_sync", "truncated_real"]))
    if kind == "data":
        n = draw(st.integers(1, 30))
        head = SYNC + bytes([1, FrameType.DATA]) + draw(st.binary(min_size=2, max_size=2)) + (12 + 9 * n).to_bytes(2, "little")
        return head + draw(st.binary(max_size=12 + 9 * n + 4))
    if kind == "cmd":
        return SYNC + bytes([1, draw(st.sampled_from(list(Command)))]) + b"\x00\x00\x04\x00" + draw(st.binary(max_size=6))
    if kind == "ack":
        return SYNC + bytes([1, FrameType.ACK, 0, 0, 1, 0]) + draw(st.binary(max_size=3))
    if kind == "bare_sync":
        return SYNC * draw(st.integers(1, 3))
    real = _frame(draw(st.integers(0, 65535)), n=draw(st.integers(1, 5)), seed=draw(st.integers(0, 9)))
    return real[: draw(st.integers(1, len(real) - 1))]


@st.composite
def _stream(draw: st.DrawFn, evil: bool) -> tuple[bytes, list[int], int, int, int]:
    """Valid frames with skipped/repeated seqs, corrupted frames and garbage in between."""
    seq = draw(st.integers(0, 65535))  # start anywhere, so wraps happen
    wire = bytearray()
    sent: list[int] = []
    lost = dups = corrupted = pending_lost = 0
    last = None
    garbage = _evil_garbage() if evil else _plain_garbage
    for k in range(draw(st.integers(1, 12))):
        action = draw(st.sampled_from(["ok", "ok", "skip", "dup", "corrupt", "garbage"]))
        if action == "skip" and last is not None:
            gap = draw(st.integers(1, 5))
            seq = (seq + gap) & 0xFFFF
            pending_lost += gap
        if action == "dup" and last is not None:
            wire += _frame(last, n=3, seed=k)
            dups += 1
        if action == "corrupt":
            bad = bytearray(_frame(seq, n=draw(st.integers(1, 8)), seed=k))
            bad[-1] ^= 1 << draw(st.integers(0, 7))
            if not evil:
                assume(SYNC not in bytes(bad[1:]))  # one corrupted frame = exactly one candidate
            wire += bad
            corrupted += 1
            seq = (seq + 1) & 0xFFFF  # the device sent it: its seq is used up
            pending_lost += 1
            continue
        if action == "garbage":
            wire += draw(garbage)
        wire += _frame(seq, n=draw(st.integers(1, 12)), seed=seq)
        if last is not None:  # a gap is only visible once a later frame arrives
            lost += pending_lost
        pending_lost = 0
        sent.append(seq)
        last = seq
        seq = (seq + 1) & 0xFFFF
    if draw(st.booleans()):
        wire += draw(garbage)
    return bytes(wire), sent, lost, dups, corrupted


def _feed_in_chunks(wire: bytes, cuts: list[int]) -> tuple[Decoder, list]:
    d = Decoder()
    events, prev = [], 0
    for cut in sorted(c % (len(wire) + 1) for c in cuts) + [len(wire)]:
        events += d.feed(wire[prev:cut])
        prev = cut
    events += d.flush()
    return d, events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(_stream(evil=False), st.lists(st.integers(0, 10**6), max_size=20))
def test_resync_recovers_every_frame_exact_counters(stream, cuts) -> None:
    wire, sent, lost, dups, corrupted = stream
    d, events = _feed_in_chunks(wire, cuts)
    assert _seqs(events) == sent
    assert d.stats.lost_frames == lost
    assert d.stats.duplicates == dups
    assert d.stats.crc_errors == corrupted
    valid_bytes = sum(len(f) for _, f in _naive_decode(wire)[0])
    assert d.stats.frames == len(sent) + dups
    assert d.stats.discarded_bytes == len(wire) - valid_bytes
    assert d.buffered == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stream(evil=True), st.lists(st.integers(0, 10**6), max_size=20))
def test_resync_with_sync_words_and_plausible_headers_in_garbage(stream, cuts) -> None:
    wire, sent, lost, dups, corrupted = stream
    ref_frames, ref_crc_errors = _naive_decode(wire)
    assume(len(ref_frames) == len(sent) + dups)  # garbage did not, by a 2**-16 fluke, hold a frame
    d, events = _feed_in_chunks(wire, cuts)
    assert _seqs(events) == sent
    assert d.stats.lost_frames == lost
    assert d.stats.duplicates == dups
    assert d.stats.crc_errors >= corrupted
    assert d.stats.crc_errors == ref_crc_errors
    assert d.stats.discarded_bytes == len(wire) - sum(len(f) for _, f in ref_frames)
    # Every valid frame preceded by discarded bytes is one resync.
    expected_resyncs, at = 0, 0
    for start, f in ref_frames:
        expected_resyncs += start > at
        at = start + len(f)
    assert d.stats.resyncs == expected_resyncs
