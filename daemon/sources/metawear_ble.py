"""The MetaMotionR/S source: MetaWear over BLE (bleak), with the SDK's handshake and recovery.

The bytes live in ``firmware_protocol.metawear`` (sans-I/O); this module owns the I/O and time:
scan, connect, initialise exactly like ``mbl_mw_metawearboard_initialize`` (notifications on,
device information, module discovery one read at a time, logger clock), ask for a short connection
interval, configure and start accelerometer + gyro, and turn notifications into ``ImuChunk``s.
When anything goes wrong (board not advertising, link loss, silent board) it logs one line that
names the cause and the fix, waits with back-off and starts again with the *full* configuration:
the board forgets its streaming set-up on every disconnect. It never gives up.

Why sample times are reconstructed, not taken from arrival: BLE delivers notifications in bursts
(several per connection event, and a backlog after a radio hiccup), so arrival time says little
about when a sample was taken. The sensor runs at a fixed output data rate, so sample ``k`` of a
streaming session was taken at ``anchor + k / odr``. Arrival time is only used to notice samples
the board threw away (the count falls behind the wall clock), see :class:`_LossDetector`.

Runs in the daemon's event loop (``await source.run(stop)``); ``on_samples`` is called from it.
``cfg.source == "emulator"`` runs the same code against ``MetaMotionEmulator`` through
``EmulatedBleakClient`` (the ``client_factory`` seam), so tests and the demo exercise this logic.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon.config import ImuSourceConfig
from daemon.sources.failure_log import FailureLog
from daemon.sources.serial_ecg import SourceError  # one error type for every source: cause + fix, retried
from firmware_protocol import metawear as mw

log = logging.getLogger(__name__)

__all__ = ["ImuChunk", "ImuHealth", "MetaWearSource", "SourceError", "EmulatorScanner",
           "connection_parameters_for"]


@dataclass(frozen=True, eq=False)
class ImuChunk:
    """Paired accelerometer + gyro samples, in sensor units, on the reconstructed sample clock.

    ``t_s`` are host-clock seconds (``time.time()`` epoch), strictly increasing across sessions:
    anchored at the first sample of a streaming session, then advanced by sample counts times the
    board's sample period as measured against the host clock (``_ClockServo``: the nominal
    ``1/odr_hz`` corrected by the oscillator's error, so times never drift off the host clock).
    ``gap`` is set on the
    first chunk after samples were lost (an estimate of how many in ``lost_samples``) and on the
    first chunk of a new session after a reconnect; consumers must not bridge it.
    """

    t_s: np.ndarray  # float64 (n,)
    acc_g: np.ndarray  # float32 (n, 3)
    gyro_dps: np.ndarray  # float32 (n, 3)
    odr_hz: float
    first_index: int  # sample index within the session of t_s[0] (lost samples included)
    session: int  # 1 for the first connection, +1 per reconnect
    gap: bool = False
    lost_samples: int = 0


@dataclass
class ImuHealth:
    """What ``biod doctor``, the stats topic and the watchdog look at."""

    state: str = "connecting"  # connecting | streaming | stalled | disconnected
    address: str | None = None
    board: str | None = None  # "MetaMotion R" / "MetaMotion RL" / "MetaMotion S"
    chip: str | None = None  # "BMI160" / "BMI270"
    firmware: str | None = None
    hardware: str | None = None
    serial: str | None = None
    odr_hz: float | None = None
    packed: bool | None = None
    battery_percent: int | None = None
    battery_mv: int | None = None
    battery_at: float | None = None
    connects: int = 0
    reconnects: int = 0
    notifications: int = 0
    samples: int = 0  # paired samples handed to on_samples
    unpaired: int = 0  # acc or gyro samples dropped because the other sensor had no partner
    lost_samples: int = 0  # estimated samples the board dropped (count behind the wall clock)
    gaps: int = 0
    unknown_notifications: int = 0
    last_sample_at: float | None = None
    last_error: str | None = None
    errors: list[str] = field(default_factory=list)


class Scanner(Protocol):
    """The part of ``bleak.BleakScanner`` used here (the class itself satisfies it)."""

    async def find_device_by_address(self, device_identifier: str, timeout: float = 10.0) -> Any: ...
    async def find_device_by_filter(self, filterfunc: Callable[[Any, Any], bool], timeout: float = 10.0) -> Any: ...


ClientFactory = Callable[[Any, Callable[[Any], None]], Any]


def connection_parameters_for(odr_hz: float) -> bytes:
    """``11 09`` request: 7.5-15 ms at >= 100 Hz (two sensors' notifications must fit in the
    connection events), 15-30 ms below; no slave latency (it would add bursts); 6 s supervision
    timeout, the SDK examples' value, so a short radio fade does not end the link."""
    if odr_hz >= 100.0:
        return mw.connection_parameters(7.5, 15.0, 0, 6000.0)
    return mw.connection_parameters(15.0, 30.0, 0, 6000.0)


async def _unless_stopped(aw: Awaitable[Any], stop: asyncio.Event) -> tuple[bool, Any]:
    """(True, result) when ``aw`` finishes first (its exception propagates); (False, None) when
    ``stop`` is set first, ``aw`` then cancelled. WHY: a scan waits out its timeout (10 s) when
    the board is away and bleak's connect up to 20 s; a stop in the middle had to wait for them,
    so ``ImuThread.stop`` gave up at 5 s and the source went on to connect and stream after it."""
    task = asyncio.ensure_future(aw)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False, None
    return True, task.result()


class EmulatorScanner:
    """Finds only the emulated board (by its MAC or any name): the scan step of emulator mode."""

    def __init__(self, emulator: Any, name: str = "MetaWear") -> None:
        self.emulator = emulator
        self.name = name

    def _device(self) -> Any:
        from bleak.backends.device import BLEDevice

        return BLEDevice(self.emulator.mac, self.name, details=None)

    async def find_device_by_address(self, device_identifier: str, timeout: float = 10.0) -> Any:
        await asyncio.sleep(0)
        return self._device() if device_identifier.upper() == self.emulator.mac.upper() else None

    async def find_device_by_filter(self, filterfunc: Callable[[Any, Any], bool], timeout: float = 10.0) -> Any:
        from bleak.backends.scanner import AdvertisementData

        await asyncio.sleep(0)
        device = self._device()
        adv = AdvertisementData(local_name=self.name, manufacturer_data={}, service_data={},
                                service_uuids=[mw.SERVICE_UUID], tx_power=None, rssi=-50, platform_data=())
        return device if filterfunc(device, adv) else None


class _Pairer:
    """Pairs acc and gyro samples by per-session sample index (both sensors run at one ODR).

    Why by index: the two sensors notify separately and in no fixed interleaving, and MetaWear
    data carries no sequence number; counting samples is the only pairing the board allows. The
    buffer is bounded (``max_skew`` samples ahead of the other sensor): beyond it the oldest are
    dropped and counted, never paired with the wrong partner.
    """

    def __init__(self, max_skew: int) -> None:
        self.max_skew = max_skew
        self.bufs = [np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)]
        self.starts = [0, 0]  # sample index of bufs[i][0]
        self.unpaired = 0
        self._lo: int | None = None  # min / max of (acc buffered - gyro buffered) since take_imbalance
        self._hi: int | None = None

    def push(self, which: int, values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Add samples of sensor ``which`` (0 acc, 1 gyro); return (first_index, acc, gyro) newly paired."""
        bufs, starts = self.bufs, self.starts
        bufs[which] = np.concatenate([bufs[which], values]) if len(bufs[which]) else values
        lo = max(starts)
        for i in (0, 1):  # samples older than the partner's oldest can never be paired
            d = min(lo - starts[i], len(bufs[i]))
            if d > 0:
                bufs[i], starts[i] = bufs[i][d:], starts[i] + d
                self.unpaired += d
        out = None
        n = min(len(bufs[0]), len(bufs[1]))
        if n > 0 and starts[0] == starts[1]:
            out = (starts[0], bufs[0][:n], bufs[1][:n])
            for i in (0, 1):
                bufs[i], starts[i] = bufs[i][n:], starts[i] + n
        for i in (0, 1):  # bound: a sensor far ahead of a silent partner loses its oldest samples
            excess = len(bufs[i]) - self.max_skew
            if excess > 0:
                bufs[i], starts[i] = bufs[i][excess:], starts[i] + excess
                self.unpaired += excess
        imbalance = (starts[0] + len(bufs[0])) - (starts[1] + len(bufs[1]))
        self._lo = imbalance if self._lo is None else min(self._lo, imbalance)
        self._hi = imbalance if self._hi is None else max(self._hi, imbalance)
        return out

    def take_imbalance(self) -> int:
        """Samples by which one sensor stayed ahead of the other at every push since the last
        call: > 0 acc ahead, < 0 gyro ahead, 0 if they were level at some point (or nothing came).

        Why the extreme that is closest to zero: notifications of the two sensors interleave in
        bursts, so either may be momentarily ahead; only a lead that never closes means the other
        sensor lost notifications (the board's queue overflowed unevenly)."""
        lo, hi = self._lo, self._hi
        self._lo = self._hi = None
        if lo is None or hi is None:
            return 0
        return lo if lo > 0 else hi if hi < 0 else 0

    def realign(self, behind: int, samples: int) -> None:
        """Number the lagging sensor ``behind`` (0 acc, 1 gyro) ``samples`` further on: its
        notifications that were lost are skipped, and the other sensor's samples of that span,
        which now have no partner, are dropped and counted at the next push."""
        self.starts[behind] += samples


class _LossDetector:
    """Estimates samples the board dropped from how far the sample count lags the wall clock.

    ``lag`` = arrival clock - nominal time of the newest sample. Its floor is the link latency;
    BLE bursts lift it briefly, dropped samples lift it for good. The floor follows ``lag`` down at
    once and up at most ``drift`` s/s (sensor oscillators are off by up to ~1 %), so slow clock
    drift is absorbed. A loss is declared only when the excess stays above ``tolerance_s`` on two
    consecutive checks while samples keep arriving *and the excess has stopped shrinking*: a
    backlog still being delivered (faster than the sensor rate, by more than ``drain_s`` per
    check) is not mistaken for loss, however many checks its delivery spans. Why not per
    notification: mid-burst every notification looks late.
    """

    def __init__(self, odr_hz: float, tolerance_s: float, drift: float = 0.02, drain_s: float = 0.03) -> None:
        self.odr_hz = odr_hz
        self.tolerance_s = tolerance_s
        self.drift = drift
        self.drain_s = drain_s
        self.floor: float | None = None
        self.floor_at = 0.0
        self.suspect: float | None = None  # excess seen at the previous check, if above tolerance

    def check(self, now: float, newest_nominal: float | None, flowing: bool) -> int:
        """Return samples to declare lost (0 if none)."""
        if newest_nominal is None:
            return 0
        lag = now - newest_nominal
        if self.floor is None:
            self.floor, self.floor_at = lag, now
            return 0
        self.floor = min(lag, self.floor + self.drift * max(0.0, now - self.floor_at))
        self.floor_at = now
        excess = lag - self.floor
        if excess <= self.tolerance_s or not flowing:
            self.suspect = excess if (excess > self.tolerance_s and flowing) else None
            return 0
        if self.suspect is None or excess < self.suspect - self.drain_s:
            self.suspect = excess  # first sight, or a backlog still draining: look again
            return 0
        # The smaller of the two: host scheduling jitter only ever adds lag.
        lost = int(round(min(self.suspect, excess) * self.odr_hz))
        self.suspect = None
        return lost


class _ClockServo:
    """The board's sample period in host seconds, tracked so sample times stay on the host clock.

    Sample times are counted (``first + k * period``), so a board oscillator that is off by 1 %
    (the BMI160's ODR tolerance allows it) would otherwise put them 36 s ahead of or behind the
    host clock after an hour; a reconnect, anchored on the host clock again, would then go back in
    time or book the drift as lost samples. The loss detector's lag floor (arrival time minus
    sample time at the lowest link latency seen) is the error signal: a proportional-integral loop
    holds it at its first value, critically damped with time constant ``tau_s`` and the
    correction bounded at ``max_rate_error``. Losses are not drift: they are declared separately
    and skip sample times forward.
    """

    def __init__(self, odr_hz: float, tau_s: float = 30.0, max_rate_error: float = 0.03) -> None:
        self.nominal = 1.0 / odr_hz
        self.period = self.nominal
        self.kp, self.ki = 2.0 / tau_s, 1.0 / tau_s**2
        self.max_rate_error = max_rate_error
        self.ref: float | None = None
        self.integral = 0.0
        self.at: float | None = None

    def update(self, floor: float | None, now: float) -> float:
        """Feed the current lag floor; returns the period to time the next samples with."""
        if floor is None:
            return self.period
        if self.ref is None or self.at is None:
            self.ref, self.at = floor, now
            return self.period
        dt, self.at = max(0.0, now - self.at), now
        err = floor - self.ref  # > 0: sample times fall behind the host clock (board slow)
        self.integral = float(np.clip(self.integral + self.ki * err * dt, -self.max_rate_error,
                                      self.max_rate_error))
        rate = float(np.clip(self.kp * err + self.integral, -self.max_rate_error, self.max_rate_error))
        self.period = self.nominal * (1.0 + rate)
        return self.period


@dataclass
class _Session:
    """Per-connection state: rebuilt on every connect (the board forgot everything anyway)."""

    client: Any
    decoder: mw.NotificationDecoder
    pairer: _Pairer | None = None
    imu: mw.ImuConfig | None = None
    loss: _LossDetector | None = None
    servo: _ClockServo | None = None
    t_next: float | None = None  # host time of the sample numbered next_index; None until streaming
    next_index: int = 0
    skip: int = 0  # lost samples declared so far: shifts later sample indices
    realign_suspect: int = 0  # a sensor's persistent lead at the previous check (take_imbalance)
    newest_nominal: float | None = None
    pending_gap: int = 0
    first_chunk: bool = True
    samples_since_check: int = 0
    waiters: dict[bytes, asyncio.Future[Any]] = field(default_factory=dict)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


class BoardNotFound(SourceError):
    """The scan worked and the board was not among what it saw (a scan that failed is a plain
    SourceError): the two have different fixes."""


def describe_board(cfg: ImuSourceConfig) -> str:
    if cfg.address:
        return f"MetaMotion {cfg.address}"
    return f"MetaMotion named {cfg.name!r}" if cfg.name else "MetaMotion (any)"


async def find_board(cfg: ImuSourceConfig, scanner: Scanner | None = None) -> Any:
    """The BLEDevice of the configured board (``cfg.address``, else ``cfg.name``; neither: any
    board, emulator mode); SourceError naming the likely causes when none is seen. Shared by the
    source and ``biod doctor --scan``, so the doctor looks for the board exactly as biod does."""
    timeout = cfg.scan_timeout_s
    if scanner is None:
        from bleak import BleakScanner

        scanner = BleakScanner  # type: ignore[assignment]
    try:
        if cfg.address:
            device = await scanner.find_device_by_address(cfg.address, timeout=timeout)
        else:
            want = cfg.name.casefold() if cfg.name else None  # None: emulator mode, any board
            device = await scanner.find_device_by_filter(
                lambda d, adv: want is None or (adv.local_name or d.name or "").casefold() == want,
                timeout=timeout)
    except Exception as exc:  # BleakError, D-Bus errors, no adapter
        raise SourceError(f"BLE scan failed ({exc}): is bluetoothd running and the adapter powered "
                          "('bluetoothctl power on')? does the biod user have access to BlueZ?") from None
    if device is None:
        raise BoardNotFound(f"{describe_board(cfg)} not found within {timeout:g} s: is it charged and advertising? "
                            "is another host connected to it?")
    return device


class MetaWearSource:
    """MetaMotionR/S over BLE: ``await run(stop)``; paired samples go to ``on_samples``.

    ``client_factory(device_or_address, disconnected_callback)`` builds a ``BleakClient``-like
    object (default: ``bleak.BleakClient``); ``scanner`` finds the board (default:
    ``bleak.BleakScanner``). In emulator mode both default to the emulator (``self.emulator``).
    ``clock`` gives host seconds for sample times; in emulator mode it runs ``speed`` times faster,
    like the emulated board.
    """

    BACKOFF_S: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    REQUEST_TIMEOUT_S = 1.0
    REQUEST_ATTEMPTS = 3
    BATTERY_INTERVAL_S = 300.0
    CHECK_INTERVAL_S = 0.1

    def __init__(
        self,
        cfg: ImuSourceConfig,
        on_samples: Callable[[ImuChunk], None],
        client_factory: ClientFactory | None = None,
        scanner: Scanner | None = None,
        *,
        clock: Callable[[], float] | None = None,
        backoff_s: tuple[float, ...] | None = None,
        battery_interval_s: float | None = None,
        gap_tolerance_s: float = 0.5,
    ) -> None:
        self.cfg = cfg
        self._on_samples = on_samples
        self.emulator: Any = None
        speed = 1.0
        if cfg.source in ("emulator", "replay"):
            from firmware_protocol.emulators.metamotion import EmulatedBleakClient, MetaMotionEmulator

            recording: Any = cfg.emulator.recording
            speed, loop = cfg.emulator.speed, True
            if cfg.source == "replay":  # a household's own `biod record` file, played by the emulated board
                from daemon.sources.replay import imu_recording

                assert cfg.replay is not None
                recording, speed, loop = imu_recording(cfg.replay.path), cfg.replay.speed, cfg.replay.loop
            self.emulator = MetaMotionEmulator(cfg.emulator.model, recording=recording, loop=loop,
                                               **({"mac": cfg.address} if cfg.address else {}))
            emu = self.emulator
            client_factory = client_factory or (
                lambda _dev, cb: EmulatedBleakClient(emu, disconnected_callback=cb, speed=speed))
            scanner = scanner or EmulatorScanner(emu, cfg.name or "MetaWear")
        self._client_factory = client_factory or _bleak_client
        self._scanner = scanner
        if clock is None:
            wall0, mono0 = time.time(), time.monotonic()
            clock = lambda: wall0 + (time.monotonic() - mono0) * speed  # noqa: E731
        self._clock = clock
        self.backoff_s = backoff_s or self.BACKOFF_S
        self.battery_interval_s = battery_interval_s or self.BATTERY_INTERVAL_S
        self.gap_tolerance_s = gap_tolerance_s
        self.health = ImuHealth(address=cfg.address)
        self._session: _Session | None = None
        self._last_t: float | None = None  # t_s of the last emitted sample, across sessions
        self._sessions = 0
        self._failures = FailureLog(log, "imu")
        self._streamed = False  # the current/last connection delivered samples

    @property
    def describe(self) -> str:
        return describe_board(self.cfg)

    # -- the loop --------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._streamed = False
            try:
                await self._connection(stop)
            except SourceError as exc:
                loud = self._fail(str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one odd failure end a months-long run
                loud = self._fail(f"unexpected error: {exc!r}")
                if loud:  # the traceback with the line that says it, not at every retry
                    log.error("imu: where that unexpected error came from", exc_info=True)
            else:
                loud = True
            if stop.is_set():
                break
            # Back-off is for consecutive failures: a session that streamed and then lost the link
            # (hours later, usually) starts the count again, whatever ended it.
            failures = 0 if self._streamed else failures + 1
            delay = self.backoff_s[min(max(failures - 1, 0), len(self.backoff_s) - 1)]
            log.log(logging.WARNING if loud else logging.DEBUG, "imu: reconnecting to %s in %.1f s", self.describe,
                    delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        self.health.state = "disconnected"

    def _fail(self, message: str) -> bool:
        """Record a failed try in the health record; True when the log said it out loud."""
        if self.health.state != "stalled":
            self.health.state = "disconnected"
        self.health.last_error = message
        self.health.errors = (self.health.errors + [message])[-20:]
        return self._failures.failed(message)

    async def _connection(self, stop: asyncio.Event) -> None:
        """One scan/connect/handshake/stream cycle; ``self._streamed`` says whether samples came."""
        self.health.state = "connecting"
        found, device = await _unless_stopped(find_board(self.cfg, self._scanner), stop)
        if not found:
            return
        session = _Session(client=None, decoder=mw.NotificationDecoder(mw.ImuConfig(mw.Chip.BMI160)))
        self._session = session

        def on_disconnect(_client: Any) -> None:
            session.disconnected.set()

        session.client = client = self._client_factory(device, on_disconnect)
        address = getattr(device, "address", None) or str(device)
        self.health.address = address
        try:
            try:
                connected, _ = await _unless_stopped(client.connect(), stop)
            except Exception as exc:
                raise SourceError(f"cannot connect to {self.describe} ({exc}): move it closer, check it is not "
                                  "connected to a phone (MetaBase) and that bluetoothd is running") from None
            if not connected:
                return  # (finally: disconnect)
            try:
                ready, _ = await _unless_stopped(self._handshake(session), stop)
            except SourceError:
                raise
            except Exception as exc:  # BleakError / EOFError when the link goes mid set-up
                raise SourceError(f"{self.describe}: link lost during set-up ({exc}); retrying") from None
            if not ready:
                return  # (finally: stop what was started, fe 06, disconnect)
            self.health.connects += 1
            self._sessions += 1
            if self._sessions > 1:
                self.health.reconnects += 1
            self.health.state = "streaming"
            await self._stream(session, stop)
        finally:
            await self._close(session, graceful=stop.is_set())
            self._session = None

    async def _close(self, session: _Session, graceful: bool) -> None:
        client = session.client
        connected = bool(getattr(client, "is_connected", False)) and not session.disconnected.is_set()
        if graceful and connected and session.imu is not None:
            # Stop both sensors, then fe 06 so the board drops the link itself and advertises again.
            try:
                for cmd in mw.stop_commands(session.imu):
                    await self._write(session, cmd)
                await self._write(session, mw.disconnect())
            except Exception as exc:  # the link may go as fe 06 is written; that is the point
                log.debug("imu: during shutdown: %s", exc)
        with contextlib.suppress(Exception):
            await client.disconnect()
        for fut in session.waiters.values():
            fut.cancel()
        if self.health.state != "stalled":  # keep "stalled" visible until the next attempt
            self.health.state = "disconnected"

    # -- handshake -------------------------------------------------------------------------------
    async def _write(self, session: _Session, cmd: bytes) -> None:
        await session.client.write_gatt_char(mw.COMMAND_UUID, cmd, response=False)

    async def _request(self, session: _Session, cmd: bytes, what: str) -> Any:
        """Write a read command and wait for the answer with the same header (SDK: one at a time)."""
        key = bytes(cmd[:2])
        loop = asyncio.get_running_loop()
        for _attempt in range(self.REQUEST_ATTEMPTS):
            fut: asyncio.Future[Any] = loop.create_future()
            session.waiters[key] = fut
            await self._write(session, cmd)
            try:
                return await asyncio.wait_for(fut, self.REQUEST_TIMEOUT_S)
            except asyncio.TimeoutError:
                if session.disconnected.is_set():
                    break
            finally:
                session.waiters.pop(key, None)
        raise SourceError(f"{self.describe} did not answer the {what} read ({cmd.hex(' ')}): "
                          "is it a MetaWear board with recent firmware? power-cycle it if it persists")

    async def _handshake(self, session: _Session) -> None:
        client = session.client
        try:
            await client.start_notify(mw.NOTIFY_UUID, self._on_notification)
            info: dict[str, str] = {}
            for uuid in mw.DEVICE_INFO_READ_ORDER:
                info[uuid] = bytes(await client.read_gatt_char(uuid)).decode("ascii", "replace").strip("\x00 ")
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{self.describe}: GATT set-up failed ({exc}); it is probably not a MetaWear board "
                              "or the link dropped: retrying") from None
        self.health.firmware = info.get(mw.FIRMWARE_REVISION_UUID)
        self.health.hardware = info.get(mw.HARDWARE_REVISION_UUID)
        self.health.serial = info.get(mw.SERIAL_NUMBER_UUID)
        infos: dict[int, mw.ModuleInfo] = {}
        for cmd in mw.discovery_reads():
            answer = await self._request(session, cmd, f"module 0x{cmd[0]:02x} discovery")
            infos[answer.module] = answer
        logging_mod = infos.get(mw.Module.LOGGING)
        if logging_mod is not None and logging_mod.present:
            await self._request(session, mw.logging_time_read(), "logger clock")
        try:
            board = mw.identify(infos, info.get(mw.MODEL_NUMBER_UUID))
        except mw.UnsupportedBoardError as exc:
            raise SourceError(f"{self.describe}: {exc}; set imu.address to a MetaMotionR/RL/S") from None
        self.health.board, self.health.chip = board.name, board.chip.value
        imu = self._imu_config(board)
        self.health.odr_hz, self.health.packed = imu.odr_hz, imu.packed
        settings = infos.get(mw.Module.SETTINGS)
        if settings is not None and settings.present:
            await self._write(session, connection_parameters_for(imu.odr_hz))
        session.decoder = mw.NotificationDecoder(imu)
        # Skew bound: one second of samples, at least two packed notifications.
        session.pairer = _Pairer(max_skew=max(6, int(imu.odr_hz)))
        session.loss = _LossDetector(imu.odr_hz, self.gap_tolerance_s)
        session.servo = _ClockServo(imu.odr_hz)
        session.imu = imu
        for cmd in mw.configure_commands(imu) + mw.start_commands(imu):
            await self._write(session, cmd)
        if settings is not None and settings.present:
            await self._write(session, mw.battery_read())
        self._failures.recovered()
        log.info("imu: streaming from %s (%s %s, firmware %s) at %g Hz%s, ±%g g, ±%g °/s",
                 self.health.address, board.name, board.chip.value, self.health.firmware, imu.odr_hz,
                 " packed" if imu.packed else "", imu.acc_range_g, imu.gyro_range_dps)

    def _imu_config(self, board: mw.BoardModel) -> mw.ImuConfig:
        odr = mw.nearest_odr(float(self.cfg.odr_hz))
        can_pack = board.packed_acc and board.packed_gyro
        packed = self.cfg.packed if self.cfg.packed is not None else (odr >= 100.0 and can_pack)
        if packed and not can_pack:
            # Not fatal: normal notifications carry the same samples, only less efficiently.
            log.warning("imu: imu.packed is true but this %s has no packed data (module revision 0); "
                        "streaming unpacked. Set imu.packed to null to silence this", board.name)
            packed = False
        return mw.ImuConfig(chip=board.chip, odr_hz=odr, acc_range_g=float(self.cfg.acc_range_g),
                            gyro_range_dps=float(self.cfg.gyro_range_dps), packed=packed)

    # -- streaming -------------------------------------------------------------------------------
    async def _stream(self, session: _Session, stop: asyncio.Event) -> None:
        assert session.imu is not None and session.loss is not None
        stop_wait = asyncio.ensure_future(stop.wait())
        drop_wait = asyncio.ensure_future(session.disconnected.wait())
        last_samples, last_progress = self.health.samples, time.monotonic()
        next_battery = time.monotonic() + self.battery_interval_s
        try:
            while True:
                done, _ = await asyncio.wait({stop_wait, drop_wait}, timeout=self.CHECK_INTERVAL_S)
                if stop_wait in done:
                    return
                if drop_wait in done:
                    raise SourceError(f"{self.describe} dropped the BLE link (out of range or battery flat?); "
                                      "reconnecting and re-applying the configuration")
                now = time.monotonic()
                if self.health.samples != last_samples:
                    last_samples, last_progress = self.health.samples, now
                elif now - last_progress > self.cfg.stall_timeout_s:
                    self.health.state = "stalled"
                    raise SourceError(f"{self.describe} sent no samples for {self.cfg.stall_timeout_s:g} s (stalled); "
                                      "reconnecting and re-applying the configuration")
                flowing = session.samples_since_check > 0
                session.samples_since_check = 0
                clock_now = self._clock()
                lost = session.loss.check(clock_now, session.newest_nominal, flowing)
                if lost > 0:
                    session.pending_gap += lost
                    session.skip += lost
                    log.warning("imu: about %d samples (%.2f s) lost by %s", lost, lost / session.imu.odr_hz,
                                self.describe)
                elif flowing and session.servo is not None:
                    session.servo.update(session.loss.floor, clock_now)
                if flowing:
                    self._realign(session)
                if now >= next_battery:
                    next_battery = now + self.battery_interval_s
                    with contextlib.suppress(Exception):
                        await self._write(session, mw.battery_read())
        finally:
            stop_wait.cancel()
            drop_wait.cancel()

    def _realign(self, session: _Session) -> None:
        """Re-pair after one sensor lost more notifications than the other (checked twice, like
        losses: a lead that persists over two checks is no interleaving burst)."""
        assert session.pairer is not None and session.imu is not None
        lead = session.pairer.take_imbalance()
        threshold = max(4, int(round(0.05 * session.imu.odr_hz)))
        prev, session.realign_suspect = session.realign_suspect, lead
        if abs(lead) < threshold or abs(prev) < threshold or (lead > 0) != (prev > 0):
            return
        shift = min(abs(lead), abs(prev))
        behind = 1 if lead > 0 else 0
        session.pairer.realign(behind, shift)
        session.realign_suspect = 0
        log.warning("imu: %s lost %d more %s than %s samples; re-paired from here", self.describe, shift,
                    ("acc", "gyro")[behind], ("gyro", "acc")[behind])

    def _on_notification(self, _char: Any, data: bytearray) -> None:
        session = self._session
        if session is None:
            return
        self.health.notifications += 1
        for event in session.decoder.feed(data):
            if isinstance(event, mw.AccSamples):
                self._samples(session, 0, event.values_g)
            elif isinstance(event, mw.GyroSamples):
                self._samples(session, 1, event.dps)
            elif isinstance(event, mw.Battery):
                self.health.battery_percent, self.health.battery_mv = event.percent, event.voltage_mv
                self.health.battery_at = time.time()
                self._resolve(session, bytes(data[:2]), event)
            elif isinstance(event, (mw.ModuleInfo, mw.LoggingTime, mw.ConfigReadback)):
                self._resolve(session, bytes(data[:2]), event)
            else:
                self.health.unknown_notifications += 1
                log.debug("imu: unhandled notification %s (%s)", bytes(data).hex(" "),
                          getattr(event, "reason", ""))

    @staticmethod
    def _resolve(session: _Session, key: bytes, event: Any) -> None:
        fut = session.waiters.get(key)
        if fut is not None and not fut.done():
            fut.set_result(event)

    def _samples(self, session: _Session, which: int, values: np.ndarray) -> None:
        if session.pairer is None or session.imu is None:
            return  # stray data from before this connection's start: no index to give it
        before = session.pairer.unpaired
        paired = session.pairer.push(which, values)
        self.health.unpaired += session.pairer.unpaired - before
        if paired is None:
            return
        index, acc, gyro = paired
        odr = session.imu.odr_hz
        n = acc.shape[0]
        period = session.servo.period if session.servo is not None else 1.0 / odr
        if session.t_next is None:
            # The newest sample of the first batch was taken about now.
            session.t_next, session.next_index = self._clock() - (n - 1) * period, index
        first = index + session.skip
        # samples the pairer dropped (index jump) and losses declared since the last chunk
        t0 = session.t_next + (index - session.next_index + session.pending_gap) * period
        gap, lost = session.pending_gap > 0, session.pending_gap
        if session.first_chunk and self._last_t is not None:
            # Never before what was already sent: a consumer's timeline must not go backwards.
            t0 = max(t0, self._last_t + period)
            gap = True
            lost = max(0, int(round((t0 - self._last_t) * odr)) - 1)
        t = t0 + np.arange(n, dtype=np.float64) * period
        session.t_next, session.next_index = float(t[-1] + period), index + n
        self._streamed = True
        session.first_chunk = False
        session.pending_gap = 0
        session.newest_nominal = float(t[-1])
        session.samples_since_check += n
        h = self.health
        h.samples += n
        h.lost_samples += lost
        h.gaps += int(gap)
        h.last_sample_at = time.time()
        if h.state != "streaming":
            h.state = "streaming"
        self._last_t = float(t[-1])
        self._on_samples(ImuChunk(t_s=t, acc_g=acc, gyro_dps=gyro, odr_hz=odr, first_index=first,
                                  session=self._sessions, gap=gap, lost_samples=lost))


def _bleak_client(device: Any, disconnected_callback: Callable[[Any], None]) -> Any:
    from bleak import BleakClient

    return BleakClient(device, disconnected_callback=disconnected_callback, timeout=20.0)
