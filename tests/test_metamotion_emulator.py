"""MetaMotionR/S emulator: handshake, discovery, configuration, streaming of a real recording,
battery, fe 06, and the bleak facade end to end (asyncio), including drop + reconnect."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from bleak.exc import BleakError

from firmware_protocol import metawear as mw
from firmware_protocol.emulators.imu_recordings import list_imu_recordings, load_imu_recording
from firmware_protocol.emulators.metamotion import EmulatedBleakClient, EmulatorError, MetaMotionEmulator
from firmware_protocol.metawear import Chip, ImuConfig, NotificationDecoder

H = bytes.fromhex
MODELS = [("MetaMotionR", Chip.BMI160, "5", "MetaMotion R"), ("MetaMotionS", Chip.BMI270, "8", "MetaMotion S")]


def _connected(model: str, recording: str = "SA01_D01_walking") -> tuple[MetaMotionEmulator, list[bytes]]:
    emu = MetaMotionEmulator(model, recording=recording)
    got: list[bytes] = []
    emu.add_notification_listener(got.append)
    emu.connect()
    emu.enable_notifications()
    return emu, got


def _send(emu: MetaMotionEmulator, cmds: list[bytes]) -> None:
    for c in cmds:
        emu.write(mw.COMMAND_UUID, c)


def _decode(cfg: ImuConfig, notes: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[mw.ImuEvent]]:
    dec = NotificationDecoder(cfg)
    events = [e for n in notes for e in dec.feed(n)]
    acc = [e.values_g for e in events if isinstance(e, mw.AccSamples)]
    gyro = [e.dps for e in events if isinstance(e, mw.GyroSamples)]
    return (np.concatenate(acc) if acc else np.zeros((0, 3), np.float32),
            np.concatenate(gyro) if gyro else np.zeros((0, 3), np.float32), events)


def _resampled(x: np.ndarray, fs: float, odr: float, n: int) -> np.ndarray:
    """Independent reference: linear interpolation of the recording at k * fs / odr (looping)."""
    pos = np.arange(n) * (fs / odr)
    idx = np.arange(2 * x.shape[0])
    xx = np.concatenate([x, x]).astype(np.float64)
    return np.stack([np.interp(pos % x.shape[0], idx, xx[:, j]) for j in range(3)], axis=1)


# --- fixture ------------------------------------------------------------------------------------
def test_recording_fixture_is_real_sisfall() -> None:
    names = list_imu_recordings()
    assert {"SA01_D01_walking", "SA02_D01_walking", "SA01_D07_sitting", "SA02_D07_sitting"} <= set(names)
    rec = load_imu_recording("SA01_D01_walking")
    assert rec.fs_hz == 100.0 and rec.acc_g.shape == (2000, 3) and rec.acc_g.dtype == np.float32
    assert rec.person == "SA01" and "SisFall" in rec.source
    # ADXL345 counts are integers: g * 256 must be whole numbers (the documented conversion).
    np.testing.assert_array_equal(rec.acc_g * 256, np.round(rec.acc_g * 256))
    # Real walking at the waist: ~1 g mean magnitude with visible step dynamics.
    mag = np.linalg.norm(rec.acc_g, axis=1)
    assert 0.85 < mag.mean() < 1.15 and mag.std() > 0.1
    with pytest.raises(KeyError, match="choose one of"):
        load_imu_recording("nope")


# --- handshake / discovery ----------------------------------------------------------------------
@pytest.mark.parametrize("model,chip,number,name", MODELS)
def test_handshake_identifies_board(model: str, chip: Chip, number: str, name: str) -> None:
    emu, got = _connected(model)
    info = [emu.read_gatt_char(u).decode() for u in mw.DEVICE_INFO_READ_ORDER]
    assert info[1] == number and info[0] == "1.1.3"  # SDK:test/common.py harness values
    _send(emu, mw.discovery_reads())
    assert len(got) == len(mw.discovery_reads())
    infos = {i.module: i for i in map(mw.parse_module_info, got)}
    board = mw.identify(infos, model_number=number)
    assert (board.name, board.chip, board.packed_acc, board.packed_gyro) == (name, chip, True, True)
    _send(emu, [mw.logging_time_read()])
    assert isinstance(NotificationDecoder(ImuConfig(chip)).feed(got[-1])[0], mw.LoggingTime)


def test_discovery_answers_are_sdk_bytes() -> None:
    emu, got = _connected("MetaMotionR")
    _send(emu, [H("0380"), H("1380"), H("1180"), H("0e80"), H("fe80")])
    assert got == [H("03800101"), H("13800001"), H("11800003"), H("0e80"), H("fe800002")]
    emu, got = _connected("MetaMotionS")
    _send(emu, [H("0380"), H("1380"), H("1180")])
    assert got == [H("03800400"), H("13800100"), H("118000090700")]


def test_no_notifications_before_cccd_enabled() -> None:
    emu = MetaMotionEmulator("MetaMotionR")
    got: list[bytes] = []
    emu.add_notification_listener(got.append)
    emu.connect()
    _send(emu, mw.discovery_reads()[:3])
    assert got == []


# --- streaming round trip -----------------------------------------------------------------------
ROUND_TRIPS = [
    (Chip.BMI160, 100.0, 2.0, 125.0, False),
    (Chip.BMI160, 200.0, 16.0, 2000.0, True),
    (Chip.BMI160, 50.0, 4.0, 500.0, True),
    (Chip.BMI270, 100.0, 8.0, 1000.0, False),
    (Chip.BMI270, 25.0, 4.0, 250.0, True),
    (Chip.BMI270, 400.0, 2.0, 125.0, False),
]


@pytest.mark.parametrize("chip,odr,acc_range,gyro_range,packed", ROUND_TRIPS)
def test_round_trip_within_one_lsb(chip: Chip, odr: float, acc_range: float, gyro_range: float,
                                   packed: bool) -> None:
    model = "MetaMotionR" if chip is Chip.BMI160 else "MetaMotionS"
    emu, got = _connected(model, "SA02_D01_walking")
    cfg = ImuConfig(chip, odr, acc_range, gyro_range, packed)
    _send(emu, mw.configure_commands(cfg) + mw.start_commands(cfg))
    n = 600
    notes = emu.pump(n)
    assert notes == got  # pump returns exactly what was delivered
    acc, gyro, events = _decode(cfg, notes)
    assert not [e for e in events if isinstance(e, mw.Unknown)]
    assert len(notes) == (2 * n // 3 if packed else 2 * n)
    assert acc.shape == gyro.shape == (n, 3)
    rec = emu.recording
    lsb_acc = 1.0 / mw.acc_scale_lsb_per_g(acc_range)
    lsb_gyro = 1.0 / mw.gyro_scale_lsb_per_dps(gyro_range)
    ref_acc = _resampled(rec.acc_g, rec.fs_hz, odr, n)
    ref_gyro = _resampled(rec.gyro_dps, rec.fs_hz, odr, n)
    assert np.abs(acc - ref_acc).max() <= lsb_acc
    assert np.abs(gyro - ref_gyro).max() <= lsb_gyro
    # Interleaving: samples of both sensors arrive in time order (acc then gyro per instant).
    assert notes[0][0] == 0x03 and notes[1][0] == 0x13


def test_quantiser_saturates_like_int16() -> None:
    rec = load_imu_recording("SA01_D01_walking")
    loud = replace(rec, acc_g=(rec.acc_g * 3.0).astype(np.float32))  # 5.2 g peaks > ±2 g range
    emu = MetaMotionEmulator("MetaMotionR", recording=loud)
    got: list[bytes] = []
    emu.add_notification_listener(got.append)
    emu.connect()
    emu.enable_notifications()
    cfg = ImuConfig(Chip.BMI160, 100, 2.0, 2000.0)
    _send(emu, mw.configure_commands(cfg) + mw.start_commands(cfg))
    acc, _, _ = _decode(cfg, emu.pump(2000))
    expected = np.clip(loud.acc_g, -32768 / 16384, 32767 / 16384)
    assert np.abs(acc - expected).max() <= 1 / 16384
    saturated = np.abs(loud.acc_g) >= 2.0
    assert saturated.sum() > 10
    assert set(np.unique(acc[saturated]).tolist()) <= {-2.0, 32767 / 16384}


def test_config_readback_and_defaults_after_reconnect() -> None:
    emu, got = _connected("MetaMotionS")
    _send(emu, [H("0383"), H("1383")])
    assert got == [H("0383a802"), H("13832800")]  # SDK default configs
    cfg = ImuConfig(Chip.BMI270, 200, 16.0, 250.0)
    _send(emu, mw.configure_commands(cfg) + [H("0383"), H("1383")])
    assert got[-2:] == [H("0383a903"), H("13832903")]
    emu.drop()
    emu.connect()
    emu.enable_notifications()
    _send(emu, [H("0383")])
    assert got[-1] == H("0383a802")


def test_stop_commands_stop_the_stream() -> None:
    emu, _ = _connected("MetaMotionR")
    cfg = ImuConfig(Chip.BMI160, 100)
    _send(emu, mw.configure_commands(cfg) + mw.start_commands(cfg))
    assert len(emu.pump(10)) == 20
    _send(emu, mw.stop_commands(cfg))
    assert not emu.streaming and emu.advance(1.0) == []


def test_battery_and_connection_parameters() -> None:
    emu, got = _connected("MetaMotionR")
    emu.battery_percent, emu.battery_mv = 57, 3871
    _send(emu, [mw.battery_read(), mw.connection_parameters(7.5, 15.0, 0, 6000)])
    assert got == [H("118c39") + (3871).to_bytes(2, "little")]
    assert NotificationDecoder(ImuConfig(Chip.BMI160)).feed(got[0]) == [mw.Battery(57, 3871)]
    assert emu.connection_params == (7.5, 15.0, 0, 6000.0)


def test_fe06_disconnects_and_blocks_writes() -> None:
    emu, _ = _connected("MetaMotionS")
    reasons: list[str] = []
    emu.add_disconnect_listener(reasons.append)
    _send(emu, [mw.disconnect()])
    assert reasons == ["debug-disconnect"] and not emu.connected
    with pytest.raises(BleakError, match="not connected"):
        emu.write(mw.COMMAND_UUID, mw.battery_read())


def test_bad_host_input_is_named() -> None:
    with pytest.raises(ValueError, match="MetaMotionR"):
        MetaMotionEmulator("MetaWearC")
    emu, _ = _connected("MetaMotionR")
    with pytest.raises(EmulatorError, match="COMMAND_UUID"):
        emu.write(mw.NOTIFY_UUID, mw.battery_read())
    with pytest.raises(EmulatorError, match="nothing is streaming"):
        emu.pump(3)
    emu.write(mw.COMMAND_UUID, H("0a02ff"))
    assert emu.unhandled == [H("0a02ff")]


# --- bleak facade, asyncio ----------------------------------------------------------------------
class _Host:
    """A minimal host written only against the bleak API, like the daemon's BLE source."""

    def __init__(self, client: EmulatedBleakClient) -> None:
        self.client = client
        self.notes: list[bytes] = []
        self.waiters: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self.last_wall_s = 0.0
        self.last_emulated_s = 0.0
        self.acc_stream_s = 0.0

    def on_notify(self, _char: object, data: bytearray) -> None:
        self.notes.append(bytes(data))
        for prefix, fut in list(self.waiters):
            if bytes(data[:2]) == prefix and not fut.done():
                fut.set_result(bytes(data))
                self.waiters.remove((prefix, fut))

    async def request(self, cmd: bytes) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters.append((cmd[:2], fut))
        await self.client.write_gatt_char(mw.COMMAND_UUID, cmd, response=False)
        return await asyncio.wait_for(fut, 1.0)

    async def handshake(self) -> mw.BoardModel:
        await self.client.start_notify(mw.NOTIFY_UUID, self.on_notify)
        number = (await self.client.read_gatt_char(mw.MODEL_NUMBER_UUID)).decode()
        infos = {}
        for cmd in mw.discovery_reads():
            info = mw.parse_module_info(await self.request(cmd))
            infos[info.module] = info
        return mw.identify(infos, model_number=number)

    async def stream(self, cfg: ImuConfig, seconds: float) -> list[bytes]:
        for cmd in mw.configure_commands(cfg) + mw.start_commands(cfg):
            await self.client.write_gatt_char(mw.COMMAND_UUID, cmd, response=False)
        loop, emu = asyncio.get_running_loop(), self.client.emulator
        start, t0, e0 = len(self.notes), loop.time(), emu.now_s
        await asyncio.sleep(seconds)
        self.last_emulated_s = emu.now_s - e0
        self.acc_stream_s = emu.now_s - emu.acc.start_s  # sample 0 was due at acc.start_s
        self.last_wall_s = loop.time() - t0
        await asyncio.sleep(0)  # let the emulator's already-emitted notifications arrive
        return self.notes[start:]


@pytest.mark.parametrize("model,chip,packed", [("MetaMotionR", Chip.BMI160, False),
                                               ("MetaMotionS", Chip.BMI270, True)])
def test_bleak_facade_end_to_end(model: str, chip: Chip, packed: bool) -> None:
    async def scenario() -> None:
        emu = MetaMotionEmulator(model, mac="EE:51:C0:DE:00:02")
        disconnected: list[EmulatedBleakClient] = []
        speed = 10.0
        async with EmulatedBleakClient(emu, disconnected_callback=disconnected.append, speed=speed) as client:
            assert client.is_connected and client.address == "EE:51:C0:DE:00:02"
            host = _Host(client)
            board = await host.handshake()
            assert board.chip is chip
            battery = NotificationDecoder(ImuConfig(chip)).feed(await host.request(mw.battery_read()))
            assert battery == [mw.Battery(99, 4148)]
            cfg = ImuConfig(chip, 100.0, 4.0, 500.0, packed)
            notes = await host.stream(cfg, 0.5)
            acc, gyro, _ = _decode(cfg, notes)
            # Rate: exactly one sample per 1/ODR of emulated time (packing holds back <= 2)...
            due = int(np.floor(host.acc_stream_s * cfg.odr_hz + 1e-9)) + 1
            assert due - (2 if packed else 0) <= acc.shape[0] <= due
            acc_notes = sum(1 for n in notes if n[0] == 0x03)
            assert acc_notes == (due // 3 if packed else due)
            # ...and emulated time follows the event loop's clock × speed (0.5 s × 10 × 100 Hz ≈ 500
            # samples). Loose bounds: a loaded box may delay the emulator's ticker at either end.
            assert 0.5 <= host.last_emulated_s / (host.last_wall_s * speed) <= 1.5
            assert acc.shape[0] >= 0.5 * 0.5 * speed * cfg.odr_hz
            assert abs(acc.shape[0] - gyro.shape[0]) <= 3
            # Streamed values are the real recording, in order.
            rec = emu.recording
            n = acc.shape[0]
            first = np.flatnonzero(np.all(np.abs(rec.acc_g - acc[0]) <= 1 / 8192, axis=1))
            assert first.size
            k = first[0] + np.arange(n)
            assert np.abs(acc - rec.acc_g[k % rec.n_samples]).max() <= 1 / 8192
            for cmd in mw.stop_commands(cfg):
                await client.write_gatt_char(mw.COMMAND_UUID, cmd)
            await asyncio.sleep(0.05)
            before = len(host.notes)
            await asyncio.sleep(0.1)
            assert len(host.notes) == before
            await client.write_gatt_char(mw.COMMAND_UUID, mw.disconnect())
            await asyncio.sleep(0)
            assert not client.is_connected
            await asyncio.sleep(0.01)
            assert disconnected == [client]
            with pytest.raises(BleakError):
                await client.write_gatt_char(mw.COMMAND_UUID, mw.battery_read())

    asyncio.run(scenario())


def test_drop_reconnect_requires_reconfigure() -> None:
    async def scenario() -> None:
        emu = MetaMotionEmulator("MetaMotionR", recording="SA02_D07_sitting")
        drops: list[EmulatedBleakClient] = []
        client = EmulatedBleakClient(emu, speed=20.0)
        client.set_disconnected_callback(drops.append)
        await client.connect()
        host = _Host(client)
        await host.handshake()
        cfg = ImuConfig(Chip.BMI160, 50.0, 8.0, 1000.0)
        assert len(await host.stream(cfg, 0.2)) > 0

        emu.drop()  # link loss
        await asyncio.sleep(0.01)
        assert drops == [client] and not client.is_connected
        with pytest.raises(BleakError):
            await client.read_gatt_char(mw.MODEL_NUMBER_UUID)

        await client.connect()
        host2 = _Host(client)
        await host2.handshake()  # notifications re-enabled, discovery re-run
        await asyncio.sleep(0.2)
        assert not [n for n in host2.notes if n[0] in (0x03, 0x13) and n[1] < 0x80]  # nothing streams
        cfg2 = ImuConfig(Chip.BMI160, 100.0, 2.0, 250.0, packed=True)
        notes = await host2.stream(cfg2, 0.2)
        acc, gyro, events = _decode(cfg2, notes)
        assert acc.shape[0] >= 0.5 * 0.2 * 20 * 100 and all(
            e.packed for e in events if isinstance(e, (mw.AccSamples, mw.GyroSamples)))
        assert np.abs(acc).max() < 2.0  # decoded with the new ±2 g scale: sitting stays near 1 g
        await client.disconnect()
        await asyncio.sleep(0.01)
        assert drops == [client, client]

    asyncio.run(scenario())


def test_notification_queue_and_async_callback() -> None:
    async def scenario() -> None:
        emu = MetaMotionEmulator("MetaMotionS")
        queue = emu.notification_queue()
        seen: list[bytes] = []

        async def on_notify(_char: object, data: bytearray) -> None:
            await asyncio.sleep(0)
            seen.append(bytes(data))

        client = EmulatedBleakClient(emu, speed=1.0)
        await client.connect()
        await client.start_notify(mw.NOTIFY_UUID, on_notify)
        await client.write_gatt_char(mw.COMMAND_UUID, H("0380"))
        assert await asyncio.wait_for(queue.get(), 1.0) == H("03800400")
        await asyncio.sleep(0.01)
        assert seen == [H("03800400")]
        await client.disconnect()

    asyncio.run(scenario())


def test_a_replay_that_does_not_loop_ends_with_the_recording() -> None:
    """loop=False (a replay of a household recording): the board streams the recording once,
    sample for sample at its own rate, then goes quiet."""
    rec = load_imu_recording("SA01_D01_walking")
    short = replace(rec, acc_g=rec.acc_g[:250], gyro_dps=rec.gyro_dps[:250])
    emu = MetaMotionEmulator("MetaMotionR", recording=short, loop=False)
    got: list[bytes] = []
    emu.add_notification_listener(got.append)
    emu.connect()
    emu.enable_notifications()
    cfg = ImuConfig(Chip.BMI160, 100, 16.0, 2000.0)  # the recording's own rate: one sample per sample
    _send(emu, mw.configure_commands(cfg) + mw.start_commands(cfg))
    acc, gyro, _ = _decode(cfg, emu.pump(400) + emu.advance(2.0))
    assert len(acc) == len(gyro) == 250
    assert np.abs(acc - short.acc_g).max() <= 1 / 2048 and np.abs(gyro - short.gyro_dps).max() <= 1 / 16.4
