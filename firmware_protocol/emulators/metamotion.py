"""MetaMotionR / MetaMotionS emulator: the board side of the MetaWear protocol, plus a bleak facade.

Why: the daemon's BLE source must be tested end to end (handshake, discovery, configuration,
streaming, battery, link loss) on machines without a radio or a board. The emulator answers every
byte the way the firmware does as far as MbientLab's SDK tests pin it down (answers are copied from
SDK:test/common.py, see docs/metawear-protocol.md), and streams a *real* IMU recording
(SisFall excerpts) quantised to int16 exactly like the chip at the configured range.

Two layers:

* :class:`MetaMotionEmulator` — transport-agnostic state machine. ``write(uuid, data)`` in,
  notifications out through listeners; time advances only when told (:meth:`advance`/:meth:`pump`)
  or in real time × speed through :meth:`run_realtime` (an asyncio task).
* :class:`EmulatedBleakClient` — the subset of ``bleak.BleakClient`` the daemon uses
  (connect/disconnect/is_connected/start_notify/stop_notify/write_gatt_char/read_gatt_char,
  ``disconnected_callback``), so the BLE source runs unchanged against the emulator.

Model of a disconnect (``fe 06``, :meth:`MetaMotionEmulator.drop` or a host disconnect): the link
state is lost — notifications disabled, data subscriptions cleared, both sensors put in standby
with interrupts off and their configuration back to power-on defaults. The host must re-enable
notifications and re-send configure + start commands after reconnecting, which is what the SDK does
(it re-runs initialisation on every connection). This is deliberately the conservative model.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from bleak.exc import BleakError

from firmware_protocol import metawear as mw
from firmware_protocol.emulators.imu_recordings import ImuRecording, load_imu_recording

__all__ = [
    "MetaMotionEmulator", "EmulatedBleakClient", "EmulatedCharacteristic", "EmulatorError",
    "BOARD_PROFILES",
]


class EmulatorError(BleakError):
    """Host misuse of the emulated board (e.g. writing while disconnected). A ``BleakError`` so the
    daemon's error handling is exercised exactly as with a real adapter."""


@dataclass(frozen=True)
class _BoardProfile:
    name: str
    chip: mw.Chip
    model_number: str  # 2a24, SDK:test/common.py read_gatt_char: MMR '5', MMS '8'
    discovery: dict[int, bytes]
    acc_default: bytes  # power-on accelerometer config payload
    gyro_default: bytes


def _answers(pairs: dict[int, str]) -> dict[int, bytes]:
    return {k: bytes.fromhex(v) for k, v in pairs.items()}


# Module-discovery answers, byte for byte from SDK:test/common.py metawear_motion_r_services and
# metawear_motion_s_services. Modules not listed answer [id, 0x80] (absent).
_MMR_DISCOVERY = _answers({
    0x01: "01800000", 0x02: "02800000", 0x03: "03800101", 0x04: "0480010000030102",
    0x05: "058000010303030301", 0x06: "06800000", 0x07: "07800000", 0x08: "08800000",
    0x09: "098000001c", 0x0A: "0a8000001c", 0x0B: "0b80000208802b0000",
    0x0C: "0c80000008", 0x0D: "0d800001", 0x0F: "0f80000108", 0x10: "1080",
    0x11: "11800003", 0x12: "12800000", 0x13: "13800001", 0x14: "14800000", 0x15: "15800001",
    0x16: "1680", 0x17: "1780", 0x18: "1880", 0x19: "198000000300060002000100", 0xFE: "fe800002",
})
_MMS_DISCOVERY = _answers({
    0x01: "01800000", 0x02: "028000010300", 0x03: "03800400", 0x04: "0480010000030102",
    0x05: "0580000203030303030301", 0x06: "06800000", 0x07: "07800000", 0x08: "08800000",
    0x09: "098000001c", 0x0A: "0a8000001c", 0x0B: "0b800003080000fb030002",
    0x0C: "0c80000008", 0x0D: "0d800001", 0x0E: "0e80", 0x0F: "0f8000020800", 0x10: "1080",
    0x11: "118000090700", 0x12: "12800000", 0x13: "13800100", 0x14: "14800000", 0x15: "15800002",
    0x16: "1680", 0x17: "1780", 0x18: "1880", 0x19: "198000030300060002000100", 0xFE: "fe80000503",
})

# Power-on sensor configs: the SDK's defaults for a fresh board (SDK:.../accelerometer_bosch.cpp
# BMI160_DEFAULT_CONFIG starts 0x28,0x03 = 100 Hz ±2 g; BMI270_DEFAULT_CONFIG starts 0xa8,0x02 =
# 100 Hz ±8 g; SDK:.../gyro_bosch.cpp init_gyro_module: bwp 2, 100 Hz, ±2000 °/s = 0x28,0x00).
BOARD_PROFILES: dict[str, _BoardProfile] = {
    "MetaMotionR": _BoardProfile("MetaMotion R", mw.Chip.BMI160, "5", _MMR_DISCOVERY,
                                 bytes((0x28, 0x03)), bytes((0x28, 0x00))),
    "MetaMotionS": _BoardProfile("MetaMotion S", mw.Chip.BMI270, "8", _MMS_DISCOVERY,
                                 bytes((0xA8, 0x02)), bytes((0x28, 0x00))),
}
_ALIASES = {"metamotionr": "MetaMotionR", "metamotion r": "MetaMotionR", "mmr": "MetaMotionR",
            "metamotions": "MetaMotionS", "metamotion s": "MetaMotionS", "mms": "MetaMotionS"}

# Device-information strings the SDK test harness serves (SDK:test/common.py read_gatt_char and
# firmware_revision). Overridable per emulator instance.
_DEFAULT_DEVICE_INFO = {
    mw.FIRMWARE_REVISION_UUID: "1.1.3",
    mw.HARDWARE_REVISION_UUID: "0.1",
    mw.MANUFACTURER_UUID: "deadbeef",
    mw.SERIAL_NUMBER_UUID: "cafebabe",
}
# SDK:src/metawear/core/cpp/logging.cpp TICK_TIME_STEP = (48 / 32768) * 1000 ms.
_TICK_MS = 48.0 / 32768.0 * 1000.0


class _SensorStream:
    """One sensor's sample clock, subscriptions and packing buffer."""

    def __init__(self, module: int, chip: mw.Chip, payload: bytes) -> None:
        self.module = module
        self.chip = chip
        self.payload = payload
        self.powered = False
        self.interrupt = False
        self.subscribed: set[int] = set()
        self.start_s = 0.0  # emulated time of sample 0
        self.rec_pos0 = 0  # recording sample at sample 0
        self.next_k = 0
        self.pending: list[bytes] = []  # packed samples waiting for a full notification

    @property
    def odr_hz(self) -> float:
        if self.module == mw.Module.ACCELEROMETER:
            return mw.parse_acc_config(self.chip, self.payload)[0]
        return mw.parse_gyro_config(self.payload)[0]

    @property
    def lsb_per_unit(self) -> float:
        if self.module == mw.Module.ACCELEROMETER:
            return mw.acc_scale_lsb_per_g(mw.parse_acc_config(self.chip, self.payload)[1])
        return mw.gyro_scale_lsb_per_dps(mw.parse_gyro_config(self.payload)[1])

    @property
    def normal_register(self) -> int:
        if self.module == mw.Module.ACCELEROMETER:
            return mw.acc_data_register(self.chip, False)
        return mw.gyro_data_register(self.chip, False)

    @property
    def packed_register(self) -> int:
        if self.module == mw.Module.ACCELEROMETER:
            return mw.acc_data_register(self.chip, True)
        return mw.gyro_data_register(self.chip, True)

    @property
    def active(self) -> bool:
        return self.powered and self.interrupt


class MetaMotionEmulator:
    """Device-side MetaWear state machine for a MetaMotionR (BMI160) or MetaMotionS (BMI270)."""

    def __init__(self, model: str = "MetaMotionR", recording: str | ImuRecording = "SA01_D01_walking",
                 mac: str = "EE:51:C0:DE:00:01", *, loop: bool = True, battery_percent: int = 99,
                 battery_mv: int = 4148, device_info: dict[str, str] | None = None) -> None:
        key = _ALIASES.get(model.lower().replace("_", " ").replace("-", " "), model)
        if key not in BOARD_PROFILES:
            raise ValueError(f"unknown model {model!r}; use 'MetaMotionR' (BMI160) or 'MetaMotionS' (BMI270)")
        self.profile = BOARD_PROFILES[key]
        self.recording = recording if isinstance(recording, ImuRecording) else load_imu_recording(recording)
        if self.recording.n_samples < 2:
            raise ValueError("the IMU recording needs at least 2 samples to be streamed")
        self.mac = mac
        self.loop = loop  # False: the board goes quiet at the recording's end (a replay that ends)
        self.battery_percent = battery_percent
        self.battery_mv = battery_mv
        self.device_info = {**_DEFAULT_DEVICE_INFO, mw.MODEL_NUMBER_UUID: self.profile.model_number,
                            **(device_info or {})}
        self.connected = False
        self.notify_enabled = False
        self.now_s = 0.0  # emulated clock, seconds since power-on
        self.connection_params: tuple[float, float, int, float] | None = None
        self.writes: list[bytes] = []  # every command received (tests, debugging)
        self.unhandled: list[bytes] = []  # commands the emulator ignored, like the firmware would
        self._notify_listeners: list[Callable[[bytes], None]] = []
        self._disconnect_listeners: list[Callable[[str], None]] = []
        self._reset_link_state()

    # --- listeners ----------------------------------------------------------------------------
    def add_notification_listener(self, callback: Callable[[bytes], None]) -> None:
        self._notify_listeners.append(callback)

    def remove_notification_listener(self, callback: Callable[[bytes], None]) -> None:
        if callback in self._notify_listeners:
            self._notify_listeners.remove(callback)

    def add_disconnect_listener(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)``; reason is ``'host'``, ``'debug-disconnect'`` or ``'link-loss'``."""
        self._disconnect_listeners.append(callback)

    def remove_disconnect_listener(self, callback: Callable[[str], None]) -> None:
        if callback in self._disconnect_listeners:
            self._disconnect_listeners.remove(callback)

    def notification_queue(self) -> asyncio.Queue[bytes]:
        """An asyncio queue fed with every notification (alternative to a callback)."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.add_notification_listener(queue.put_nowait)
        return queue

    # --- link ---------------------------------------------------------------------------------
    def connect(self) -> None:
        if self.connected:
            raise EmulatorError(f"{self.mac} is already connected; one central at a time")
        self._reset_link_state()
        self.connected = True

    def enable_notifications(self, enabled: bool = True) -> None:
        """The host wrote the CCCD of :data:`~firmware_protocol.metawear.NOTIFY_UUID`."""
        self._require_connected()
        self.notify_enabled = enabled

    def disconnect(self, reason: str = "host") -> None:
        """End the link (host request); listeners are told, state is lost (see module docstring)."""
        if not self.connected:
            return
        self.connected = False
        self._reset_link_state()
        for cb in list(self._disconnect_listeners):
            cb(reason)

    def drop(self) -> None:
        """Simulate a BLE link loss (out of range, interference)."""
        self.disconnect("link-loss")

    def _reset_link_state(self) -> None:
        self.notify_enabled = False
        self.acc = _SensorStream(mw.Module.ACCELEROMETER, self.profile.chip, self.profile.acc_default)
        self.gyro = _SensorStream(mw.Module.GYRO, self.profile.chip, self.profile.gyro_default)

    def _require_connected(self) -> None:
        if not self.connected:
            raise EmulatorError(f"{self.mac} is not connected; connect() first")

    # --- GATT ---------------------------------------------------------------------------------
    def read_gatt_char(self, uuid: str) -> bytes:
        self._require_connected()
        key = uuid.lower()
        if key not in self.device_info:
            raise EmulatorError(f"characteristic {uuid} is not readable on {self.profile.name}; "
                                f"readable: {sorted(self.device_info)}")
        return self.device_info[key].encode("ascii")

    def write(self, char_uuid: str, data: bytes | bytearray) -> None:
        """A host write. Only :data:`COMMAND_UUID` takes commands."""
        self._require_connected()
        if char_uuid.lower() != mw.COMMAND_UUID:
            raise EmulatorError(f"write to {char_uuid}: commands go to COMMAND_UUID {mw.COMMAND_UUID}")
        cmd = bytes(data)
        self.writes.append(cmd)
        if len(cmd) < 2:
            self.unhandled.append(cmd)
            return
        self._dispatch(cmd)

    def _notify(self, data: bytes) -> None:
        if self.connected and self.notify_enabled:
            for cb in list(self._notify_listeners):
                cb(data)

    def _dispatch(self, cmd: bytes) -> None:
        module, reg, body = cmd[0], cmd[1], cmd[2:]
        if reg == mw.READ_BIT and not body:  # module discovery
            self._notify(self.profile.discovery.get(module, bytes((module, mw.READ_BIT))))
            return
        sensor = {mw.Module.ACCELEROMETER: self.acc, mw.Module.GYRO: self.gyro}.get(module)
        if sensor is not None and self._sensor_command(sensor, reg, body):
            return
        if module == mw.Module.SETTINGS and reg & 0x3F == mw.SETTINGS_BATTERY_STATE and reg & mw.READ_BIT:
            self._notify(bytes((module, reg, self.battery_percent)) + int(self.battery_mv).to_bytes(2, "little"))
            return
        if module == mw.Module.SETTINGS and reg == mw.SETTINGS_CONNECTION_PARAMS and len(body) == 8:
            lo, hi, lat, to = np.frombuffer(body, "<u2").tolist()
            self.connection_params = (lo * 1.25, hi * 1.25, lat, to * 10.0)
            return
        if module == mw.Module.LOGGING and reg == mw.READ_BIT | mw.LOGGING_TIME:
            tick = int(self.now_s * 1000.0 / _TICK_MS) & 0xFFFFFFFF
            self._notify(bytes((module, reg)) + tick.to_bytes(4, "little") + b"\x00")
            return
        if module == mw.Module.DEBUG and reg == mw.DEBUG_DISCONNECT:
            self.disconnect("debug-disconnect")
            return
        self.unhandled.append(cmd)

    def _sensor_command(self, s: _SensorStream, reg: int, body: bytes) -> bool:
        config_reg = mw.ACC_DATA_CONFIG if s.module == mw.Module.ACCELEROMETER else mw.GYRO_CONFIG
        if reg == config_reg and len(body) == 2:
            try:
                (mw.parse_acc_config(s.chip, body) if s.module == mw.Module.ACCELEROMETER
                 else mw.parse_gyro_config(body))
            except mw.MetaWearError:
                return False
            s.payload = bytes(body)
            self._restart_clock(s)
            return True
        if reg == mw.READ_BIT | config_reg and not body:
            self._notify(bytes((s.module, reg)) + s.payload)
            return True
        if reg == 0x01 and len(body) == 1:  # POWER_MODE (acc 1 or 2 = on, 0 = standby)
            was = s.active
            s.powered = body[0] != 0
            if s.active and not was:
                self._restart_clock(s)
            return True
        if reg == 0x02 and len(body) == 2:  # DATA_INTERRUPT_ENABLE [enable_mask, disable_mask]
            was = s.active
            if body[0] & 1:
                s.interrupt = True
            if body[1] & 1:
                s.interrupt = False
            if s.active and not was:
                self._restart_clock(s)
            return True
        if reg in (s.normal_register, s.packed_register) and len(body) == 1:
            if body[0]:
                s.subscribed.add(reg)
            else:
                s.subscribed.discard(reg)
                if reg == s.packed_register:
                    s.pending.clear()
            return True
        return False

    def _restart_clock(self, s: _SensorStream) -> None:
        s.start_s = self.now_s
        s.rec_pos0 = int(np.floor(self.now_s * self.recording.fs_hz + 1e-9))
        s.next_k = 0
        s.pending.clear()

    # --- time ---------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        return self.connected and any(s.active and s.subscribed for s in (self.acc, self.gyro))

    def advance(self, seconds: float) -> list[bytes]:
        """Move the emulated clock forward; emit every notification that falls due, in time order."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        end = self.now_s + seconds
        timed: list[tuple[float, int, bytes]] = []
        if self.connected:
            for order, s in enumerate((self.acc, self.gyro)):
                if s.active and s.subscribed:
                    timed.extend((t, order, d) for t, d in self._produce(s, end))
        self.now_s = end
        timed.sort(key=lambda x: (x[0], x[1]))
        out = [d for _, _, d in timed]
        for d in out:
            self._notify(d)
        return out

    def pump(self, n: int) -> list[bytes]:
        """Run ``n`` sample periods of the fastest active sensor as fast as possible (for tests)."""
        rates = [s.odr_hz for s in (self.acc, self.gyro) if s.active and s.subscribed]
        if not self.connected or not rates:
            raise EmulatorError("nothing is streaming: connect, enable notifications and send "
                                "configure_commands() + start_commands() first")
        # Half a period of slack so float rounding never drops the n-th sample.
        return self.advance((n - 0.5) / max(rates) + 1e-12 if n > 0 else 0.0)

    def _produce(self, s: _SensorStream, end_s: float) -> list[tuple[float, bytes]]:
        odr = s.odr_hz
        last_k = int(np.floor((end_s - s.start_s) * odr + 1e-9))
        if last_k < s.next_k:
            return []
        k = np.arange(s.next_k, last_k + 1, dtype=np.int64)
        s.next_k = last_k + 1
        rec = self.recording
        src = rec.acc_g if s.module == mw.Module.ACCELEROMETER else rec.gyro_dps
        pos = s.rec_pos0 + k * (rec.fs_hz / odr)
        n = rec.n_samples
        if not self.loop:
            keep = pos <= n - 1
            k, pos = k[keep], pos[keep]
        i0 = np.floor(pos).astype(np.int64)
        frac = (pos - i0)[:, None]
        a = src[i0 % n].astype(np.float64)
        b = src[(i0 + 1) % n].astype(np.float64)
        values = a + (b - a) * frac
        # Quantise like the chip: int16 LSB at the configured range, saturating.
        raw = np.clip(np.rint(values * s.lsb_per_unit), -32768, 32767).astype("<i2")
        samples = [r.tobytes() for r in raw]
        times = (s.start_s + k / odr).tolist()
        out: list[tuple[float, bytes]] = []
        if s.normal_register in s.subscribed:
            head = bytes((s.module, s.normal_register))
            out.extend((t, head + p) for t, p in zip(times, samples))
        if s.packed_register in s.subscribed:
            head = bytes((s.module, s.packed_register))
            for t, p in zip(times, samples):
                s.pending.append(p)
                if len(s.pending) == 3:
                    out.append((t, head + b"".join(s.pending)))
                    s.pending.clear()
        return out

    async def run_realtime(self, speed: float = 1.0, tick_s: float = 0.005) -> None:
        """Advance the emulated clock with the event loop's clock × ``speed`` until disconnected."""
        if speed <= 0:
            raise ValueError("speed must be > 0")
        loop = asyncio.get_running_loop()
        wall0, emu0 = loop.time(), self.now_s
        while self.connected:
            await asyncio.sleep(tick_s)
            target = emu0 + (loop.time() - wall0) * speed
            if target > self.now_s:
                self.advance(target - self.now_s)


@dataclass(frozen=True)
class EmulatedCharacteristic:
    """Stands in for ``bleak.backends.characteristic.BleakGATTCharacteristic`` in callbacks."""

    uuid: str
    description: str = ""
    handle: int = 0


_CHARS = {
    mw.COMMAND_UUID: EmulatedCharacteristic(mw.COMMAND_UUID, "MetaWear command", 0x1B),
    mw.NOTIFY_UUID: EmulatedCharacteristic(mw.NOTIFY_UUID, "MetaWear notify", 0x1D),
}


class _Services:
    def get_characteristic(self, specifier: Any) -> EmulatedCharacteristic | None:
        uuid = _uuid_of(specifier)
        if uuid in _CHARS:
            return _CHARS[uuid]
        if uuid in _DEFAULT_DEVICE_INFO or uuid == mw.MODEL_NUMBER_UUID:
            return EmulatedCharacteristic(uuid, "Device Information")
        return None


def _uuid_of(specifier: Any) -> str:
    return str(getattr(specifier, "uuid", specifier)).lower()


class EmulatedBleakClient:
    """Drop-in for the ``bleak.BleakClient`` calls the daemon makes, backed by an emulator.

    Notifications and the disconnected callback are delivered from the event loop (``call_soon``),
    never from inside ``write_gatt_char``, as with a real adapter.
    """

    def __init__(self, emulator: MetaMotionEmulator,
                 disconnected_callback: Callable[[EmulatedBleakClient], Any] | None = None,
                 *, speed: float = 1.0, **_kwargs: Any) -> None:
        self.emulator = emulator
        self.speed = speed
        self._disconnected_callback = disconnected_callback
        self._notify_callback: Callable[..., Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self.services = _Services()

    # bleak API ----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self.emulator.mac

    @property
    def is_connected(self) -> bool:
        return self.emulator.connected

    def set_disconnected_callback(self, callback: Callable[[EmulatedBleakClient], Any] | None,
                                  **_kwargs: Any) -> None:
        self._disconnected_callback = callback

    async def connect(self, **_kwargs: Any) -> bool:
        self._loop = asyncio.get_running_loop()
        self.emulator.connect()
        self.emulator.add_notification_listener(self._on_notification)
        self.emulator.add_disconnect_listener(self._on_disconnect)
        self._task = self._loop.create_task(self.emulator.run_realtime(self.speed))
        await asyncio.sleep(0)
        return True

    async def disconnect(self) -> bool:
        self.emulator.disconnect("host")
        await asyncio.sleep(0)
        return True

    async def start_notify(self, char_specifier: Any, callback: Callable[..., Any], **_kwargs: Any) -> None:
        self._require_connected()
        if _uuid_of(char_specifier) != mw.NOTIFY_UUID:
            raise EmulatorError(f"characteristic {_uuid_of(char_specifier)} does not notify; use {mw.NOTIFY_UUID}")
        self._notify_callback = callback
        self.emulator.enable_notifications(True)

    async def stop_notify(self, char_specifier: Any) -> None:
        self._require_connected()
        if _uuid_of(char_specifier) == mw.NOTIFY_UUID:
            self.emulator.enable_notifications(False)
            self._notify_callback = None

    async def write_gatt_char(self, char_specifier: Any, data: bytes | bytearray | memoryview,
                              response: bool | None = None) -> None:
        self._require_connected()
        self.emulator.write(_uuid_of(char_specifier), bytes(data))
        await asyncio.sleep(0)

    async def read_gatt_char(self, char_specifier: Any, **_kwargs: Any) -> bytearray:
        self._require_connected()
        value = bytearray(self.emulator.read_gatt_char(_uuid_of(char_specifier)))
        await asyncio.sleep(0)
        return value

    async def __aenter__(self) -> EmulatedBleakClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    # plumbing -----------------------------------------------------------------------------------
    def _require_connected(self) -> None:
        if not self.emulator.connected:
            raise EmulatorError(f"Not connected to {self.address}")

    def _on_notification(self, data: bytes) -> None:
        if self._loop is not None:
            self._loop.call_soon(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        cb = self._notify_callback
        if cb is None:
            return
        result = cb(_CHARS[mw.NOTIFY_UUID], bytearray(data))
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    def _on_disconnect(self, reason: str) -> None:
        self.emulator.remove_notification_listener(self._on_notification)
        self.emulator.remove_disconnect_listener(self._on_disconnect)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._notify_callback = None
        if self._disconnected_callback is not None and self._loop is not None:
            self._loop.call_soon(self._disconnected_callback, self)
