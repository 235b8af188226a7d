"""The MetaMotionR/S BLE source end to end against the real board emulator (bleak facade):
SDK handshake, packed/normal streaming in units within 1 LSB of the recording, reconstructed
sample times, pairing, link drop + reconnect with re-configuration, stall, sample loss vs bursts,
shutdown order (stop, then fe 06), scan failures with retry, battery in health."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from daemon.config import ImuSourceConfig
from daemon.sources.metawear_ble import EmulatorScanner, ImuChunk, MetaWearSource, _Pairer
from firmware_protocol import metawear as mw
from firmware_protocol.emulators.metamotion import EmulatedBleakClient, MetaMotionEmulator

pytestmark = pytest.mark.timeout(30)
SPEED = 10.0
MAC = "EE:51:C0:DE:00:01"


class RecordingClient(EmulatedBleakClient):
    """The emulator's bleak facade, logging the GATT operations in order."""

    def __init__(self, *args: Any, ops: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ops = ops

    async def start_notify(self, char_specifier: Any, callback: Any, **kwargs: Any) -> None:
        self.ops.append(("notify", str(char_specifier)))
        await super().start_notify(char_specifier, callback, **kwargs)

    async def read_gatt_char(self, char_specifier: Any, **kwargs: Any) -> bytearray:
        self.ops.append(("read", str(char_specifier)))
        return await super().read_gatt_char(char_specifier, **kwargs)


class Harness:
    """A MetaWearSource in emulator mode, its chunks, and the recording positions per session."""

    def __init__(self, model: str = "MetaMotionR", odr_hz: int = 100, *, scanner: Any = None,
                 stall_timeout_s: float = 3.0, packed: bool | None = None, speed: float = SPEED,
                 **kwargs: Any) -> None:
        self.cfg = ImuSourceConfig(enabled=True, source="emulator", address=MAC, odr_hz=odr_hz,
                                   acc_range_g=8, gyro_range_dps=1000, packed=packed,
                                   stall_timeout_s=stall_timeout_s,
                                   emulator={"model": model, "speed": speed})
        self.chunks: list[ImuChunk] = []
        self.ops: list[tuple[str, str]] = []
        # per session: the emulator's recording positions when its sensors started, and the
        # session index of the first sample delivered (0 unless the pairer dropped a start skew)
        self.rec_pos0: dict[int, tuple[int, int, int]] = {}
        holder: dict[str, MetaWearSource] = {}

        def factory(_device: Any, cb: Callable[[Any], None]) -> RecordingClient:
            return RecordingClient(holder["src"].emulator, disconnected_callback=cb, speed=speed, ops=self.ops)

        self.src = MetaWearSource(self.cfg, self._on_samples, client_factory=factory, scanner=scanner,
                                  backoff_s=(0.05, 0.1), **kwargs)
        holder["src"] = self.src
        self.emu: MetaMotionEmulator = self.src.emulator
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _on_samples(self, chunk: ImuChunk) -> None:
        if chunk.session not in self.rec_pos0:  # the first chunk of this session
            self.rec_pos0[chunk.session] = (self.emu.acc.rec_pos0, self.emu.gyro.rec_pos0, chunk.first_index)
        self.chunks.append(chunk)

    def start(self) -> None:
        self.task = asyncio.create_task(self.src.run(self.stop))

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; health={self.src.health}")
            await asyncio.sleep(0.01)

    async def samples(self, n: int, session: int = 1, timeout: float = 10.0) -> None:
        await self.until(lambda: sum(len(c.t_s) for c in self.chunks if c.session == session) >= n,
                         timeout, f"{n} samples in session {session}")

    async def shutdown(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)

    def session(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[ImuChunk]]:
        cs = [c for c in self.chunks if c.session == s]
        return (np.concatenate([c.t_s for c in cs]), np.concatenate([c.acc_g for c in cs]),
                np.concatenate([c.gyro_dps for c in cs]), cs)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def reference(x: np.ndarray, fs: float, odr: float, pos0: int, n: int) -> np.ndarray:
    """Independent reference: the recording linearly interpolated at pos0 + k * fs / odr (looping)."""
    pos = (pos0 + np.arange(n) * (fs / odr)) % x.shape[0]
    xx = np.concatenate([x, x[:1]]).astype(np.float64)
    idx = np.arange(xx.shape[0])
    return np.stack([np.interp(pos, idx, xx[:, j]) for j in range(3)], axis=1)


def assert_matches_recording(h: Harness, session: int, odr: float) -> None:
    _t, acc, gyro, _ = h.session(session)
    rec = h.emu.recording
    acc_pos0, gyro_pos0, first = h.rec_pos0[session]
    skip = first * rec.fs_hz / odr  # samples the pairer dropped before the first delivered one
    acc_lsb = 1.0 / mw.acc_scale_lsb_per_g(8.0)
    gyro_lsb = 1.0 / mw.gyro_scale_lsb_per_dps(1000.0)
    ref_acc = reference(rec.acc_g, rec.fs_hz, odr, acc_pos0 + skip, len(acc))
    ref_gyro = reference(rec.gyro_dps, rec.fs_hz, odr, gyro_pos0 + skip, len(gyro))
    assert np.abs(acc - ref_acc).max() <= acc_lsb * 1.001
    assert np.abs(gyro - ref_gyro).max() <= gyro_lsb * 1.001
    assert np.ptp(acc[:, 0]) > 0.2  # a real walking signal, not zeros


MODELS = [("MetaMotionR", "MetaMotion R", "BMI160", 0x1C, 0x07, 0x04, 0x05),
          ("MetaMotionS", "MetaMotion S", "BMI270", 0x05, 0x05, 0x04, 0x04)]


@pytest.mark.parametrize("model,name,chip,acc_packed,gyro_packed,acc_normal,gyro_normal", MODELS)
@pytest.mark.parametrize("odr", [100, 50])
def test_handshake_and_streaming(model: str, name: str, chip: str, acc_packed: int, gyro_packed: int,
                                 acc_normal: int, gyro_normal: int, odr: int) -> None:
    async def scenario() -> None:
        h = Harness(model, odr)
        h.start()
        await h.samples(int(1.5 * odr))
        health = h.src.health
        assert (health.state, health.board, health.chip, health.firmware, health.serial) == (
            "streaming", name, chip, "1.1.3", "cafebabe")
        assert health.battery_percent == 99 and health.battery_mv == 4148
        # SDK initialisation order: notifications on, then device information in SDK order ...
        assert h.ops[:6] == [("notify", mw.NOTIFY_UUID)] + [("read", u) for u in mw.DEVICE_INFO_READ_ORDER]
        # ... then module discovery in SDK order, the logger clock, the connection interval,
        # configuration and start (packed at >= 100 Hz on both boards, normal below).
        packed = odr >= 100
        imu = mw.ImuConfig(mw.Chip[chip], float(odr), 8.0, 1000.0, packed)
        conn = mw.connection_parameters(7.5, 15.0, 0, 6000.0) if packed else mw.connection_parameters(15.0, 30.0, 0, 6000.0)
        expected = (mw.discovery_reads() + [mw.logging_time_read(), conn] + mw.configure_commands(imu)
                    + mw.start_commands(imu) + [mw.battery_read()])
        assert h.emu.writes[:len(expected)] == expected
        assert bytes((0x03, acc_packed if packed else acc_normal, 1)) in h.emu.writes
        assert bytes((0x13, gyro_packed if packed else gyro_normal, 1)) in h.emu.writes
        assert health.packed is packed and h.emu.connection_params == (
            (7.5, 15.0, 0, 6000.0) if packed else (15.0, 30.0, 0, 6000.0))
        t, acc, gyro, chunks = h.session(1)
        # Times come from the sample count: exactly 1/odr apart although notifications arrive in
        # bursts (5 ms emulator ticks x 10 speed = several samples per burst).
        assert np.allclose(np.diff(t), 1.0 / odr, rtol=0, atol=1e-6)  # epoch float64: ulp 2.4e-7 s
        # No gaps from the first delivered sample on. That one is sample 0 unless one sensor's
        # start write reached the board over max_skew samples after the other's (a stalled
        # event loop on a loaded host): the pairer then drops the unpartnered head, counted.
        first = chunks[0].first_index
        assert first <= health.unpaired
        assert np.array_equal(np.concatenate([np.arange(c.first_index, c.first_index + len(c.t_s)) for c in chunks]),
                              np.arange(first, first + len(t)))
        assert acc.dtype == gyro.dtype == np.float32 and t.dtype == np.float64
        assert_matches_recording(h, 1, float(odr))
        per_note = 3 if packed else 1
        assert health.notifications >= 2 * len(t) / per_note - 4
        assert health.unpaired <= 6 and not any(c.gap for c in chunks)
        await h.shutdown()

    run(scenario)


def test_drop_reconnects_and_reapplies_config() -> None:
    async def scenario() -> None:
        h = Harness("MetaMotionR", 100)
        h.start()
        await h.samples(150)
        n_writes = len(h.emu.writes)
        h.emu.drop()  # link loss: the board forgets notifications, subscriptions and config
        await h.samples(150, session=2)
        assert h.src.health.reconnects == 1 and h.src.health.connects == 2
        assert "dropped the BLE link" in (h.src.health.errors[0])
        after = h.emu.writes[n_writes:]
        imu = mw.ImuConfig(mw.Chip.BMI160, 100.0, 8.0, 1000.0, True)
        cfg_start = mw.configure_commands(imu) + mw.start_commands(imu)
        i = after.index(cfg_start[0])
        assert after[i:i + len(cfg_start)] == cfg_start  # full config re-applied after reconnect
        assert after[:len(mw.discovery_reads())] == mw.discovery_reads()  # full SDK handshake again
        assert_matches_recording(h, 2, 100.0)
        t1, _, _, _ = h.session(1)
        t2, _, _, c2 = h.session(2)
        assert c2[0].gap and not any(c.gap for c in c2[1:])
        # the board's period as measured on the host clock (_ClockServo): the nominal within 1 %
        assert t2[0] > t1[-1] and np.allclose(np.diff(t2), 0.01, rtol=0.01, atol=0)
        # the lost estimate matches the hole in the time axis
        assert c2[0].lost_samples == round((t2[0] - t1[-1]) * 100) - 1
        await h.shutdown()

    run(scenario)


def test_shutdown_stops_then_debug_disconnects() -> None:
    async def scenario() -> None:
        h = Harness("MetaMotionS", 100)
        h.start()
        await h.samples(60)
        await h.shutdown()
        imu = mw.ImuConfig(mw.Chip.BMI270, 100.0, 8.0, 1000.0, True)
        tail = mw.stop_commands(imu) + [mw.disconnect()]
        assert h.emu.writes[-len(tail):] == tail
        assert tail[-1] == bytes.fromhex("fe06")
        assert not h.emu.connected and h.src.health.state == "disconnected"
        assert h.src.health.reconnects == 0

    run(scenario)


def test_battery_is_read_periodically() -> None:
    async def scenario() -> None:
        h = Harness("MetaMotionS", 50, battery_interval_s=0.2)
        h.start()
        await h.until(lambda: h.src.health.battery_percent == 99, 5, "the first battery read")
        h.emu.battery_percent, h.emu.battery_mv = 57, 3790
        await h.until(lambda: h.src.health.battery_percent == 57, 5, "a later battery read")
        assert h.src.health.battery_mv == 3790 and h.emu.writes.count(mw.battery_read()) >= 2
        await h.shutdown()

    run(scenario)


class FlakyScanner(EmulatorScanner):
    """Does not see the board for the first ``misses`` scans, like a board that is still asleep."""

    def __init__(self, emulator: MetaMotionEmulator | None, misses: int) -> None:
        super().__init__(emulator)
        self.misses = misses
        self.calls = 0

    async def find_device_by_address(self, device_identifier: str, timeout: float = 10.0) -> Any:
        self.calls += 1
        if self.calls <= self.misses:
            return None
        return await super().find_device_by_address(device_identifier, timeout)


def test_not_found_gives_clear_error_and_retries() -> None:
    async def scenario() -> None:
        scanner = FlakyScanner(None, misses=2)
        h = Harness("MetaMotionR", 50, scanner=scanner)
        scanner.emulator = h.emu
        h.start()
        await h.samples(30)
        errors = h.src.health.errors
        assert errors[:2] == [f"MetaMotion {MAC} not found within 10 s: is it charged and advertising? "
                              "is another host connected to it?"] * 2
        assert scanner.calls == 3 and h.src.health.state == "streaming" and h.src.health.reconnects == 0
        await h.shutdown()

    run(scenario)


class BrokenAdapterScanner(EmulatorScanner):
    """BlueZ is not running / no adapter: bleak raises instead of returning None."""

    async def find_device_by_address(self, device_identifier: str, timeout: float = 10.0) -> Any:
        from bleak.exc import BleakError

        raise BleakError("No Bluetooth adapters found.")


def test_scan_failure_names_the_adapter_and_keeps_retrying() -> None:
    async def scenario() -> None:
        h = Harness("MetaMotionR", 50, scanner=BrokenAdapterScanner(None))
        h.start()
        await h.until(lambda: len(h.src.health.errors) >= 2, 5, "two failed scans")
        err = h.src.health.last_error or ""
        assert "No Bluetooth adapters found" in err and "bluetoothd" in err and "power on" in err
        assert h.src.health.state == "disconnected" and not h.task.done()
        await h.shutdown()

    run(scenario)


class SlowScanner(EmulatorScanner):
    """A board that is not advertising yet: the scan waits out its whole timeout (bleak's
    default 10 s) and then finds it."""

    def __init__(self, emulator: MetaMotionEmulator | None) -> None:
        super().__init__(emulator)
        self.scanning = asyncio.Event()

    async def find_device_by_address(self, device_identifier: str, timeout: float = 10.0) -> Any:
        self.scanning.set()
        await asyncio.sleep(timeout)
        return await super().find_device_by_address(device_identifier, timeout)


def test_a_stop_during_the_scan_ends_the_source_at_once_and_it_never_connects() -> None:
    """``biod record``/``calibrate`` stop the IMU thread with a 5 s join: a stop that had to wait
    for the scan gave up, and the source then connected and streamed after the stop."""
    async def scenario() -> None:
        scanner = SlowScanner(None)
        h = Harness("MetaMotionR", 50, scanner=scanner)
        scanner.emulator = h.emu
        h.start()
        await asyncio.wait_for(scanner.scanning.wait(), 5)
        await h.shutdown()  # within 5 s, or this raises
        await asyncio.sleep(0.3)
        assert not h.emu.connected and h.emu.writes == [] and h.chunks == []
        assert h.src.health.state == "disconnected" and h.src.health.errors == []

    run(scenario)


def test_imu_thread_streams_and_stops_the_board() -> None:
    """The IMU on its own loop in a thread (``biod record``, ``biod calibrate``): chunks arrive
    in its queue, and ``stop()`` ends the thread after the board's stop commands and fe 06."""
    from daemon.sources.imu_thread import ImuThread

    th = ImuThread(ImuSourceConfig(enabled=True, source="emulator", address=MAC, odr_hz=50,
                                   emulator={"speed": SPEED}))
    th.start()
    deadline = time.monotonic() + 10
    got: list[ImuChunk] = []
    while sum(len(c.t_s) for c in got) < 50:
        assert time.monotonic() < deadline, f"no IMU samples: {th.source.health}"
        time.sleep(0.05)
        got += th.drain()
    th.stop()
    assert not th._thread.is_alive()
    assert th.source.emulator.writes[-1] == mw.disconnect() and not th.source.emulator.connected


def test_scan_by_name() -> None:
    async def scenario() -> None:
        cfg = ImuSourceConfig(enabled=True, source="emulator", name="metawear", odr_hz=50,
                              emulator={"speed": SPEED})
        got: list[ImuChunk] = []
        src = MetaWearSource(cfg, got.append)
        stop = asyncio.Event()
        task = asyncio.create_task(src.run(stop))
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert got and src.health.board == "MetaMotion R"
        stop.set()
        await task

    run(scenario)


def test_stall_reconnects() -> None:
    async def scenario() -> None:
        h = Harness("MetaMotionR", 100, stall_timeout_s=0.3)
        h.start()
        await h.samples(60)
        imu = mw.ImuConfig(mw.Chip.BMI160, 100.0, 8.0, 1000.0, True)
        for cmd in mw.stop_commands(imu):  # the board goes silent but keeps the link
            h.emu.write(mw.COMMAND_UUID, cmd)
        await h.samples(60, session=2)
        assert any("sent no samples for 0.3 s (stalled)" in e for e in h.src.health.errors)
        assert h.src.health.reconnects == 1
        assert_matches_recording(h, 2, 100.0)
        await h.shutdown()

    run(scenario)


def test_lost_samples_flagged_but_bursts_are_not() -> None:
    async def scenario() -> None:
        # Speed 2, not 10: the detector works in board seconds, and a faster emulator would turn
        # the test host's scheduling jitter into apparent lag 10x as large.
        h = Harness("MetaMotionR", 100, speed=2.0)
        h.start()
        await h.samples(100)
        # A backlog: the loop is blocked for ~1 s of board time, then everything arrives at once.
        time.sleep(0.5)
        await h.samples(250)
        assert h.src.health.gaps == 0 and h.src.health.lost_samples == 0
        # Real loss: the board discards ~1 s of notifications (its queue overflowed).
        delivered: list[int] = []
        h.emu.add_notification_listener(lambda d: delivered.append(len(d)) if d[0] == 0x03 else None)
        h.emu.notify_enabled = False
        k0 = h.emu.acc.next_k
        await asyncio.sleep(0.5)
        k1 = h.emu.acc.next_k
        h.emu.notify_enabled = True
        await h.until(lambda: h.src.health.gaps == 1, 5, "a gap to be declared")
        await asyncio.sleep(0.1)
        _t, _, _, cs = h.session(1)
        gap_chunks = [c for c in cs if c.gap]
        assert len(gap_chunks) == 1 and h.src.health.reconnects == 0
        true_lost = k1 - k0
        # The loss is estimated from wall time (MetaWear data carries no counter), so a loaded
        # host's scheduling delay enters it: typically within a few samples, bounded here at 30 %.
        assert abs(gap_chunks[0].lost_samples - true_lost) <= 0.3 * true_lost + 3
        i = cs.index(gap_chunks[0])
        step = gap_chunks[0].t_s[0] - cs[i - 1].t_s[-1]
        # the lost samples' span, at the sample period the source has measured (``_ClockServo``:
        # within a fraction of a percent of the nominal 1/100 s on the emulator)
        period = float(np.diff(gap_chunks[0].t_s).mean())
        assert period == pytest.approx(0.01, rel=0.01)
        assert step == pytest.approx((gap_chunks[0].lost_samples + 1) * period, rel=1e-4)
        assert gap_chunks[0].first_index == cs[i - 1].first_index + len(cs[i - 1].t_s) + gap_chunks[0].lost_samples
        await h.shutdown()

    run(scenario)


def test_pairer_never_mismatches_and_counts_unpaired() -> None:
    rng = np.random.default_rng(0)
    p = _Pairer(max_skew=12)
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    nxt = [0, 0]

    def feed(which: int, n: int) -> None:
        vals = np.repeat(np.arange(nxt[which], nxt[which] + n, dtype=np.float32)[:, None], 3, axis=1)
        nxt[which] += n
        out = p.push(which, vals)
        if out is not None:
            first, a, g = out
            assert np.array_equal(a[:, 0], np.arange(first, first + len(a))) and np.array_equal(a, g)
            seen.append((a, g))

    for _ in range(300):  # random interleaving of packed notifications, one sensor <= 9 ahead
        d = nxt[0] - nxt[1]
        feed(1 if d >= 9 else 0 if d <= -9 else int(rng.integers(2)), 3)
    while nxt[0] != nxt[1]:
        feed(int(nxt[0] > nxt[1]), 3)
    assert p.unpaired == 0 and sum(len(a) for a, _ in seen) == nxt[0]
    # The gyro falls silent: acc beyond the bound is dropped and counted, never mis-paired.
    for _ in range(10):
        feed(0, 3)
    assert p.unpaired == 30 - 12
    before = sum(len(a) for a, _ in seen)
    for _ in range(10):
        feed(1, 3)  # gyro resumes with its own (older) indices: those can no longer be paired
    paired_now = sum(len(a) for a, _ in seen) - before
    assert paired_now == 12 and p.unpaired == 18 + 18


@pytest.mark.parametrize("board_rate", [1.01, 0.99])
def test_sample_times_follow_the_host_clock_when_the_board_oscillator_is_off(board_rate: float) -> None:
    """A board 1 % fast (or slow) would put counted sample times 1.2 s ahead (behind) of the host
    after two minutes; the next session, anchored on the host clock, then went back in time and
    the daemon's IMU pipeline raised (or the drift was booked as lost samples). Speed 10, not
    faster: the emulator's speed multiplies the test host's scheduling delays in board time."""
    speed = 10.0

    async def scenario() -> None:
        wall0, mono0 = time.time(), time.monotonic()
        # the host clock as seen from a board whose oscillator runs board_rate times too fast
        clock = lambda: wall0 + (time.monotonic() - mono0) * speed / board_rate  # noqa: E731
        h = Harness("MetaMotionR", 100, speed=speed, clock=clock)
        h.start()
        await h.samples(100 * 120, timeout=25)  # two minutes of board time
        t1, _, _, _ = h.session(1)
        lead = t1[-1] - clock()
        assert abs(lead) < 0.4, f"sample times {lead:+.2f} s off the host clock"
        h.emu.drop()
        await h.samples(100, session=2)
        t2, _, _, c2 = h.session(2)
        assert t2[0] > t1[-1]
        assert abs(t2[-1] - clock()) < 0.4
        await h.shutdown()

    run(scenario)


def test_back_off_starts_again_after_a_session_that_streamed() -> None:
    """Link losses hours apart are not consecutive failures: each one waits the first delay (it
    waited up to 30 s, losing IMU data, after the sixth drop of a daemon's life)."""
    async def scenario() -> None:
        h = Harness("MetaMotionR", 50)
        h.src.backoff_s = (0.05, 0.37, 0.73, 1.93)  # values no other wait uses
        delays: list[float] = []
        orig = asyncio.wait_for

        async def timed_wait_for(aw: Any, timeout: float | None) -> Any:
            if timeout is not None and timeout in h.src.backoff_s:
                delays.append(timeout)
            return await orig(aw, timeout)

        import daemon.sources.metawear_ble as mod
        mod.asyncio.wait_for = timed_wait_for  # type: ignore[attr-defined]
        try:
            h.start()
            for session in range(1, 5):
                await h.samples(20, session=session)
                h.emu.drop()
            await h.samples(20, session=5)
        finally:
            mod.asyncio.wait_for = orig  # type: ignore[attr-defined]
        assert delays == [0.05] * 4
        await h.shutdown()

    run(scenario)


class DelayingClient(EmulatedBleakClient):
    """Holds notifications back while ``hold`` is set, then delivers the backlog a few per 10 ms
    (a radio fade or a busy host: late, not lost)."""

    hold = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backlog: list[bytes] = []

    def _deliver(self, data: bytes) -> None:
        if self.hold or self.backlog:
            self.backlog.append(data)
        else:
            super()._deliver(data)

    async def drain(self, per_10ms: int) -> None:
        while self.backlog:
            for _ in range(per_10ms):
                if self.backlog:
                    super()._deliver(self.backlog.pop(0))
            await asyncio.sleep(0.01)


def test_a_backlog_delivered_over_many_checks_is_not_loss() -> None:
    async def scenario() -> None:
        clients: list[DelayingClient] = []

        def factory(_dev: Any, cb: Callable[[Any], None]) -> DelayingClient:
            clients.append(DelayingClient(src.emulator, disconnected_callback=cb, speed=1.0))
            return clients[-1]

        chunks: list[ImuChunk] = []
        cfg = ImuSourceConfig(enabled=True, source="emulator", address=MAC, odr_hz=100,
                              emulator={"speed": 1.0})
        src = MetaWearSource(cfg, chunks.append, client_factory=factory)
        stop = asyncio.Event()
        task = asyncio.create_task(src.run(stop))
        while src.health.samples < 300:
            await asyncio.sleep(0.01)
        clients[0].hold = True
        await asyncio.sleep(1.0)
        clients[0].hold = False
        assert len(clients[0].backlog) > 50
        await clients[0].drain(per_10ms=2)  # ~0.4 s: spans several of the source's 0.1 s checks
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(task, 5)
        t = np.concatenate([c.t_s for c in chunks])
        assert src.health.lost_samples == 0 and src.health.gaps == 0
        assert np.diff(t).max() < 0.02  # no phantom hole pushing later times into the future
        assert abs(t[-1] - time.time()) < 0.3

    run(scenario)


class UnevenLossClient(EmulatedBleakClient):
    """The board's queue overflows unevenly: ``drop`` notifications of a sensor are discarded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop = {0x03: 0, 0x13: 0}  # acc, gyro (packed data registers' module ids)

    def _deliver(self, data: bytes) -> None:
        if self.drop.get(data[0], 0) > 0:
            self.drop[data[0]] -= 1
            return
        super()._deliver(data)


def test_uneven_loss_of_acc_and_gyro_is_re_paired() -> None:
    """5 more acc than gyro packed notifications lost (15 samples): pairing by count put every
    later gyro sample 150 ms before its acc partner, for the rest of the session, unreported."""
    async def scenario() -> None:
        clients: list[UnevenLossClient] = []
        h = Harness("MetaMotionR", 100, speed=2.0)
        emu = h.emu
        h.src._client_factory = lambda _d, cb: clients.append(  # type: ignore[assignment]
            UnevenLossClient(emu, disconnected_callback=cb, speed=2.0)) or clients[-1]
        h.start()
        await h.samples(300)
        clients[0].drop = {0x03: 10, 0x13: 5}
        await h.samples(1200)
        _t, acc, gyro, _ = h.session(1)
        rec = emu.recording

        def rec_index(x: np.ndarray, y: np.ndarray) -> int:
            return int(np.abs(y.astype(np.float64) - x).max(axis=1).argmin())

        offsets = [rec_index(acc[i], rec.acc_g) - rec_index(gyro[i], rec.gyro_dps) for i in (100, len(acc) - 50)]
        assert offsets[0] == 0
        # re-paired to within one packed notification (3 samples): a one-notification lead cannot
        # be told from the two sensors' interleaving
        assert abs(offsets[1]) <= 3, offsets
        assert h.src.health.unpaired >= 12
        await h.shutdown()

    run(scenario)
