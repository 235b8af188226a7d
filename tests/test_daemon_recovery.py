"""The assembled daemon recovers by itself: a BLE drop of the MetaMotion and an unplugged ECG box
both resume streaming without a restart, with the losses counted in the published stats; a
wall-clock step leaves the wearing session alone."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.app import BiodApp
from daemon.config import parse_config
from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
from firmware_protocol.emulators.recordings import load_recording
from tests.conftest import REPO, Capture, running, until


@contextlib.asynccontextmanager
async def daemon_on_box(cfg, link, **box_kwargs) -> AsyncIterator[tuple[BiodApp, EcgBoxEmulator]]:
    """An emulated ECG box (ludb-16, 500 Hz) on a pty behind ``link`` and the daemon reading it,
    in this process; both stopped on the way out."""
    box = EcgBoxEmulator(load_recording("ludb-16"), rate_hz=500, **box_kwargs)
    box.open_pty(link=str(link))
    box.start()
    try:
        async with running(BiodApp(cfg)) as app:
            yield app, box
    finally:
        box.close()


@pytest.mark.timeout(120)
def test_ble_drop_and_serial_unplug_resume_by_themselves(tmp_path, mosquitto, capture) -> None:
    link = tmp_path / "ecg"
    cfg = parse_config(
        f"hub:\n  id: rec\nstate_dir: {tmp_path / 'state'}\n"
        f"ecg:\n  source: serial\n  port: {link}\n  stall_timeout_s: 1.0\n"
        "imu:\n  enabled: true\n  source: emulator\n  emulator:\n    speed: 2\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n")

    async def scenario() -> None:
        async with daemon_on_box(cfg, link, speed=2.0) as (app, box):
            await until(lambda: app.stats.imu_samples > 200 and app.stats.ecg_samples > 2000, 30, "both streams")
            # BLE drop: the board goes out of range for a moment
            app.imu_source.emulator.drop()
            await until(lambda: app.imu_source.health.reconnects >= 1, 30, "the BLE reconnect")
            n = app.stats.imu_samples
            await until(lambda: app.stats.imu_samples > n + 200, 30, "IMU samples after the reconnect")
            assert app.imu_source.health.state == "streaming"
            # the ECG box is unplugged and plugged in again (a new /dev/pts behind the symlink)
            box.unplug()
            await asyncio.sleep(1.5)
            m = app.stats.ecg_samples
            box.replug()
            await until(lambda: app.stats.ecg_samples > m + 2000, 30, "ECG samples after the replug")
            assert app.ecg_source.health.connects >= 2

    asyncio.run(scenario())
    stats = [json.loads(p) for t, p, _ in capture.messages if t == "biod/rec/stats"]
    assert stats, "no stats were published"
    last = stats[-1]
    assert last["imu"]["reconnects"] >= 1 and last["ecg"]["reconnects"] >= 1
    # the replug may bring another box or wearer: the DSP started afresh, and the stats say so
    assert last["ecg"]["dsp_restarts"] >= 1 and last["ecg"]["lost_s"] == 0.0
    # measured arrival rates, not configured ones: the box plays 500 Hz at 2x, the board 100 Hz at 2x,
    # both with an outage in between, so each lies between zero and the emulated rate
    assert 0 < last["ecg"]["rate_hz"] <= 1000 * 1.1, last["ecg"]
    assert 0 < last["imu"]["rate_hz"] <= 200 * 1.1, last["imu"]
    assert last["spool_dropped"] == 0 and last["spool_pending"] == 0
    assert [p for t, p, _ in capture.messages if t == "biod/rec/availability"][-1] == "stopped"
    # privacy: no raw biosignal leaves the hub; nothing published carries a run of samples
    def longest_number_list(node) -> int:
        if isinstance(node, list):
            own = len(node) if node and all(isinstance(v, (int, float)) for v in node) else 0
            return max([own] + [longest_number_list(v) for v in node])
        if isinstance(node, dict):
            return max([0] + [longest_number_list(v) for v in node.values()])
        return 0

    for topic, payload, _ in capture.messages:
        try:
            doc = json.loads(payload) if payload else None
        except ValueError:
            doc = payload
        assert longest_number_list(doc) <= 8 and len(payload) < 4096, (topic, payload[:200])


def test_thread_handoff_delivers_everything_in_order_with_few_wakeups() -> None:
    """Source thread -> loop: every chunk, in order, and one self-pipe write per burst (one per
    frame filled the pipe when the loop fell behind, and a SIGTERM sharing it was lost)."""
    import asyncio
    import threading

    from daemon.app import ThreadHandoff

    got: list[int] = []
    wakeups = 0

    async def main() -> None:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal wakeups
            wakeups += 1
            return real(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        handoff = ThreadHandoff(loop, got.append, maxlen=20000)  # the bound is tested below
        t = threading.Thread(target=lambda: [handoff.put(i) for i in range(20000)])
        t.start()
        await asyncio.to_thread(t.join)
        while len(got) < 20000:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert got == list(range(20000))
    assert wakeups < 2000, wakeups  # bursts coalesce (one per call was 20000)


def test_thread_handoff_is_bounded_and_counts_what_it_drops() -> None:
    """A loop that stops draining must not let a source thread grow memory without limit: the
    oldest items go, each counted."""
    import asyncio

    from daemon.app import ThreadHandoff

    got: list[int] = []
    dropped = 0

    def count() -> None:
        nonlocal dropped
        dropped += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handoff = ThreadHandoff(loop, got.append, maxlen=100, on_drop=count)
        for i in range(250):  # the loop does not run in between: nothing is drained
            handoff.put(i)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert got == list(range(150, 250)) and dropped == 150


def test_frames_dropped_in_the_hand_off_are_a_gap_not_a_splice(tmp_path) -> None:
    """When the loop falls behind, the hand-off drops the oldest frames; the next frame still
    says nothing was lost on the wire. Sequence numbers tell: the batch must stop at the hole,
    and the consumer must see the hole in seconds (it restarts the DSP past ECG_MAX_SPLICE_S)."""
    import numpy as np

    from daemon.app import QUEUE_CHUNKS
    from daemon.ecg_stream import EcgStream, gap_s
    from daemon.sources.serial_ecg import EcgChunk

    def frame(seq: int, n: int = 10) -> EcgChunk:
        return EcgChunk(seq=seq % 65536, t_device_s=seq * n / 500, samples_mv=np.full((n, 3), float(seq), np.float32),
                        lead_valid=np.ones(3, bool), rate_hz=500)

    app = BiodApp(parse_config(f"hub:\n  id: gap\nstate_dir: {tmp_path / 'state'}\n"))

    async def scenario() -> None:
        app._ecg_queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        for seq in range(1, QUEUE_CHUNKS + 601):  # 600 more than the queue holds: the oldest 600 go
            app._enqueue(app._ecg_queue, frame(seq), "ecg")
        assert app.stats.dropped_chunks == 600
        first = await app._ecg_queue.get()
        assert first.seq == 601 and first.lost_frames_before == 0
        assert gap_s(0, first) == pytest.approx(600 * 10 / 500)  # 12 s missing after frame 0
        assert gap_s(0, first) > EcgStream.MAX_SPLICE_S
        # a hole inside the queue ends a batch there
        while not app._ecg_queue.empty():
            app._ecg_queue.get_nowait()
        for seq in (5, 6, 7, 9, 10):
            app._ecg_queue.put_nowait(frame(seq))
        batch = app._batch(await app._ecg_queue.get())
        assert batch.seq == 7 and batch.frames == 3 and batch.first_seq == 5 and batch.samples_mv.shape == (30, 3)
        assert gap_s(4, batch) == 0.0 and gap_s(3, batch) == pytest.approx(10 / 500)  # counted from its first frame
        nxt = await app._ecg_queue.get()
        assert gap_s(batch.seq, nxt) == pytest.approx(10 / 500)  # frame 8, 20 ms: joined over
        assert app._batch(nxt).seq == 10
        # the u16 counter wraps without a gap
        assert gap_s(65535, frame(65536)) == 0.0
        # long frames: 112 samples a frame at 250 Hz, 20 frames missing is 9 s, not '20 frames'
        long = EcgChunk(seq=21, t_device_s=0.0, samples_mv=np.zeros((112, 3), np.float32), lead_valid=np.ones(3, bool),
                        rate_hz=250)
        assert gap_s(0, long) == pytest.approx(20 * 112 / 250)

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_a_wall_clock_step_neither_ends_the_session_nor_dates_it_wrong(tmp_path, mosquitto, capture, monkeypatch) -> None:
    """NTP steps the clock of a Pi (no RTC) by hours once the network is up. The session, the
    identity pools and an enrolment's deadline run on the monotonic clock, so the step changes
    nothing but the epoch times published after it, which follow the corrected clock."""
    link = tmp_path / "ecg"
    cfg = parse_config(
        f"hub:\n  id: clk\nstate_dir: {tmp_path / 'state'}\n"
        f"ecg:\n  source: serial\n  port: {link}\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n")
    step_s = 3 * 3600.0
    real_time = time.time

    def events() -> list[dict]:
        return [json.loads(p) for t, p, _ in capture.messages if t == "biod/clk/events"]

    async def scenario() -> tuple[float, float]:
        async with daemon_on_box(cfg, link, speed=2.0, loop=True):
            await until(lambda: any(e["type"] == "new" for e in events()), 60, "a wearing session")
            stepped_at = real_time()
            monkeypatch.setattr(time, "time", lambda: real_time() + step_s)  # the NTP step, forward
            await asyncio.sleep(4.0)  # four ticks: each would have expired the session on the wall clock
        return stepped_at, real_time()

    stepped_at, stopped_at = asyncio.run(scenario())
    evs = events()
    assert [e["type"] for e in evs if e["type"] != "update"] == ["new", "end"], evs
    new, end = evs[0], evs[-1]
    assert end["id"] == new["id"]
    # the end is dated by the stepped clock, the start as it was published before the step
    assert stopped_at + step_s - 5 <= end["after"]["end_time"] <= stopped_at + step_s + 1
    assert new["after"]["start_time"] <= stepped_at
    # and its duration is what really elapsed, not three hours more
    lasted = end["after"]["end_time"] - end["after"]["start_time"]
    assert abs(lasted - (stopped_at - new["after"]["start_time"])) < 3, end["after"]


def _biod_run(cfg: Path, log: Path) -> subprocess.Popen:
    """``biod run`` as systemd starts it: its own process, so it can be killed like a crash."""
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def _session_events(capture: Capture, topic: str) -> list[dict]:
    return [json.loads(p) for p in capture.on(topic)]


@pytest.mark.timeout(240)
def test_a_session_cut_by_a_crash_is_ended_at_the_next_start(tmp_path, mosquitto, capture) -> None:
    """The daemon dies (SIGKILL: no shutdown code runs, as in a power cut) while somebody wears
    the sensors: its session's ``new`` went out, its ``end`` never could. The next start sends
    that ``end`` (through the spool), for the same session id, dated by the last observation
    the dead run recorded, with a fresh ``event_id`` and ``reason: daemon_restart``."""
    link = tmp_path / "ecg"
    record = tmp_path / "state" / "spool" / "open-session.json"
    cfg = tmp_path / "biod.yaml"
    cfg.write_text(f"hub:\n  id: crash\nstate_dir: {tmp_path / 'state'}\n"
                   f"ecg:\n  source: serial\n  port: {link}\n"
                   f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n")
    topic = "biod/crash/events"
    box = EcgBoxEmulator(load_recording("ludb-16"), rate_hz=500, speed=2.0)
    box.open_pty(link=str(link))
    box.start()
    daemon = _biod_run(cfg, tmp_path / "biod.log")
    try:
        new = capture.wait_for(lambda m: [e for e in _session_events(capture, topic) if e["type"] == "new"],
                               90, "a wearing session")[0]
        assert record.exists() and stat.S_IMODE(record.stat().st_mode) == 0o600
        # the run moves the record's last observation on as the session goes (every 10 s)
        deadline = time.monotonic() + 60
        while (seen := json.loads(record.read_text())["after"]["last_seen"]) <= new["after"]["start_time"]:
            assert time.monotonic() < deadline, "the open-session record never moved on"
            time.sleep(0.2)
        daemon.kill()  # SIGKILL
        daemon.wait(10)
        killed_at = time.time()
        assert not [e for e in _session_events(capture, topic) if e["type"] == "end"]

        daemon = _biod_run(cfg, tmp_path / "biod.log")
        end = capture.wait_for(lambda m: [e for e in _session_events(capture, topic)
                                          if e["type"] == "end" and e["id"] == new["id"]], 60, "the crashed session's end")[0]
        assert end["reason"] == "daemon_restart"
        assert end["after"]["wearer"] == new["after"]["wearer"]
        assert end["after"]["start_time"] == new["after"]["start_time"]
        assert seen <= end["after"]["end_time"] == end["after"]["last_seen"] <= killed_at
        # the dead run's own events may arrive twice (at-least-once: it died before recording the
        # broker's ack, so the next run re-sends them from the spool); the end's id is new
        others = {e["event_id"] for e in _session_events(capture, topic) if e["id"] == new["id"] and e["type"] != "end"}
        assert end["event_id"] not in others, "the end reuses an event_id consumers already have"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert not record.exists(), "a clean stop ends its session and leaves no record behind"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        box.close()
    out = (tmp_path / "biod.log").read_text()
    assert "Traceback" not in out, out[-4000:]
    ends = [e for e in _session_events(capture, topic) if e["type"] == "end" and e["id"] == new["id"]]
    assert len({e["event_id"] for e in ends}) == 1, ends


def test_a_garbage_open_session_record_is_a_warning_not_a_crash(tmp_path, mosquitto, capture, caplog) -> None:
    """A record torn by damage (SD card) or written by something else: the start goes on, says
    so, and removes it, rather than failing at every start (systemd would restart it for ever)."""
    state = tmp_path / "state"
    record = state / "spool" / "open-session.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(b"\x00{not json")
    cfg = parse_config(f"hub:\n  id: junk\nstate_dir: {state}\necg:\n  enabled: false\n"
                       f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n")

    async def scenario() -> None:
        async with running(BiodApp(cfg)):
            await until(lambda: any(t == "biod/junk/availability" and p == "online" for t, p, _ in capture.messages),
                        30, "the daemon online")

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert not record.exists()
    assert any("open-session.json" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert not capture.on("biod/junk/events")


def test_a_short_frame_loss_keeps_the_sample_clock_and_is_never_identified_from() -> None:
    """Review finding: frames lost on the wire (up to EcgStream.MAX_SPLICE_S) were spliced out
    unmarked, so the windows across the hole came out clean and were identified from, and every
    beat after it was dated early. Real LUDB ECG (3 leads), 20 ms frames, 0.5 s lost at 6 s,
    joined in 0.2 s batches as the daemon pushes them. The windows holding the hole say
    ``signal_lost`` (the link, not the electrodes)."""
    import numpy as np

    from daemon.dsp.ecg_pipeline import EcgPipeline
    from daemon.ecg_stream import EcgStream
    from daemon.sources.serial_ecg import EcgChunk

    fx = np.load(Path(__file__).parent / "fixtures" / "ecg_pipeline" / "ludb_3lead.npz")
    x = np.concatenate([fx["signals"][0].astype(np.float32) / fx["adc_gain"][0][None, :]] * 3)  # 30 s
    stream = EcgStream(50.0)
    lost = set(range(300, 325))  # frames of 10 samples at 500 Hz: 6.0 to 6.5 s
    beats, windows, live = [], [], []
    kept = [seq for seq in range(len(x) // 10) if seq not in lost]
    for i in range(0, len(kept), 10):  # ten frames a push, joined only where they follow on
        run = kept[i:i + 10]
        for part in np.split(run, np.flatnonzero(np.diff(run) != 1) + 1):
            chunk = EcgChunk(seq=int(part[-1]), t_device_s=part[0] / 50,
                             samples_mv=np.concatenate([x[q * 10:(q + 1) * 10] for q in part]),
                             lead_valid=np.ones(3, bool), rate_hz=500, frames=len(part))
            update = stream.push(chunk)
            beats += update.beats
            windows += update.windows
            live.append((part[-1] / 50, update.live))
    assert stream.lost_samples == 250 and stream.lost_s == pytest.approx(0.5) and stream.restarts == 0
    reference = EcgPipeline(500.0)
    ref_updates = [reference.push(x), reference.flush()]
    ref_beats = [b for u in ref_updates for b in u.beats]
    ref_windows = [w for u in ref_updates for w in u.windows]
    after = np.array([b.time_s for b in beats if b.time_s > 9.0])
    ref = np.array([b.time_s for b in ref_beats if 9.0 < b.time_s < after.max() + 0.1])
    assert len(after) == len(ref) and np.abs(after - ref).max() <= 0.01  # dated as if nothing was lost
    across = [w for w in windows if w.t_end_s > 6.0 and w.t_end_s - 3.0 < 6.5]
    assert across and not any(w.quality.ok_for_identity for w in across)
    # the wearer's ECG stays live through the hole: as "lead off" (heart rate forgotten, 2 s of
    # settling) one lost frame had taken it off for 9.5 s, and ended the identity session
    first_live = min(t for t, on in live if on)
    assert first_live < 6.0 and all(on for t, on in live if t >= first_live)
    assert {w.quality.reason for w in across} == {"signal_lost"}
    assert all(not w.lead_mask.any() for w in across)
    # no settling (the electrodes never moved): from the first window after the hole on, the
    # verdicts are those of the same ECG with nothing lost
    after_hole = {round(w.t_end_s, 3): w.quality.reason for w in windows if w.t_end_s - 3.0 >= 6.5}
    ref_reasons = {round(w.t_end_s, 3): w.quality.reason for w in ref_windows if round(w.t_end_s, 3) in after_hole}
    assert len(after_hole) >= 15 and after_hole == ref_reasons and "ok" in after_hole.values()


def test_a_long_loss_a_reconnect_or_a_box_restart_starts_a_fresh_pipeline() -> None:
    """Beyond MAX_SPLICE_S, after a reconnect or a box restart the sample clock is broken: a new
    pipeline (no beats of before, no window across), in biod run and biod calibrate alike."""
    import numpy as np

    from daemon.ecg_stream import EcgStream
    from daemon.sources.serial_ecg import EcgChunk

    def frame(seq: int, restarted: bool = False) -> EcgChunk:
        return EcgChunk(seq=seq, t_device_s=0.0, samples_mv=np.zeros((10, 3), np.float32),
                        lead_valid=np.ones(3, bool), rate_hz=500, device_restarted=restarted)

    stream = EcgStream(50.0)
    stream.push(frame(0))
    first = stream.pipeline
    stream.push(frame(50))  # 49 frames = 0.98 s: kept
    assert stream.pipeline is first and stream.lost_samples == 490
    stream.push(frame(102))  # 51 frames = 1.02 s: fresh
    assert stream.pipeline is not first and stream.restarts == 1
    second = stream.pipeline
    stream.push(frame(103), connects=2)  # the source opened the device again
    assert stream.pipeline is not second and stream.restarts == 2
    third = stream.pipeline
    stream.push(frame(104, restarted=True), connects=2)
    assert stream.pipeline is not third and stream.restarts == 3
    fourth = stream.pipeline
    stream.push(frame(105), connects=2)  # the same device session, nothing lost: kept
    assert stream.pipeline is fourth and stream.restarts == 3


def test_a_fault_in_the_imu_processing_drops_the_chunk_not_the_daemon(tmp_path, caplog, monkeypatch) -> None:
    """An exception in the IMU path (as _stride_peak raised on one real SisFall window) ended the
    imu-pipeline task; the watchdog was withheld and systemd restarted the whole daemon, ending
    the ECG wearer's session too. Now the chunk is dropped, counted, logged once, and the IMU path
    starts afresh. The fault is injected into gait detection for the first two windows."""
    import logging

    import numpy as np

    import daemon.dsp.imu_pipeline as imu_pipeline
    from daemon.sources.metawear_ble import ImuChunk
    from firmware_protocol.emulators.imu_recordings import load_imu_recording

    real, calls = imu_pipeline.detect_gait, [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= 2:
            raise IndexError("index 0 is out of bounds for axis 0 with size 0")
        return real(*args, **kwargs)

    monkeypatch.setattr(imu_pipeline, "detect_gait", faulty)
    rec = load_imu_recording("SA01_D01_walking")
    t = 1_795_000_000.0 + np.arange(rec.n_samples) / rec.fs_hz
    app = BiodApp(parse_config(f"hub:\n  id: imu\nstate_dir: {tmp_path / 'state'}\n"
                               "imu:\n  enabled: true\n  source: emulator\n  placement: waist\n"))

    async def scenario() -> None:
        app._imu_queue = asyncio.Queue()
        task = asyncio.create_task(app._consume_imu())
        for a in range(0, rec.n_samples - 100, 100):
            app._imu_queue.put_nowait(ImuChunk(t[a:a + 100], rec.acc_g[a:a + 100], rec.gyro_dps[a:a + 100],
                                               rec.fs_hz, a, 1))
        await until(lambda: app._imu_queue.empty() and bool(app.bio.gait.get("walking")), 20, "walking again")
        assert not task.done()
        task.cancel()

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert app.stats.imu_errors == 2
    said = [r for r in caplog.records if "IMU path restarted" in r.getMessage()]
    assert len(said) == 1 and "IndexError" in said[0].getMessage()


def test_the_store_watch_reloads_a_store_mended_by_chmod(tmp_path) -> None:
    """A store the daemon could not read is mended with chmod or chown, which change its ctime
    only: the watch keyed on mtime never reloaded it, and nobody was identified until a restart
    (review, 2026-11-24)."""
    import os

    import numpy as np

    from daemon.identity.store import Person, TemplateStore

    cfg = parse_config(f"state_dir: {tmp_path / 'state'}\necg:\n  enabled: false\n")
    app = BiodApp(cfg)
    ref = app.ecg_model.ref
    TemplateStore(cfg.store_path).add(Person(id="id-bob", name="Bob", slug="bob", created="2026-11-24T00:00:00Z",
                                             model=ref, prototypes=np.eye(1, ref.dim, dtype=np.float32),
                                             prototype_labels=("rest",), threshold=0.6))
    published: list = []

    class Publisher:  # what the watch hands Home Assistant's entity changes to
        def publish(self, msg) -> None:
            published.append(msg)

    # as the daemon is after failing to read this store (root reads a mode-000 file, so the
    # failed read is set up rather than provoked): nobody loaded, the file's state seen
    app.people, app._store_ok, app._store_seen = {}, False, app._store_key()
    mtime = cfg.store_path.stat().st_mtime_ns
    time.sleep(0.05)  # a real mend comes seconds later; kernels before 6.13 tick ctime every few ms
    os.chmod(cfg.store_path, 0o600)  # the mend: ctime changes, mtime does not
    assert cfg.store_path.stat().st_mtime_ns == mtime
    app._watch_store(Publisher())
    assert list(app.people) == ["Bob"] and app._store_ok and [p.name for p in app.bio.engine.people] == ["Bob"]
