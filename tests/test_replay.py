"""`source: replay` plays a household's own `biod record` files through the emulated devices:
what the daemon makes of a replay is what it makes of the same signal live."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from daemon.app import BiodApp
from daemon.config import ConfigError, parse_config
from daemon.dsp.rpeaks import detect_rpeaks
from daemon.record import WfdbSignal, WfdbWriter, imu_signals
from firmware_protocol.emulators.imu_recordings import load_imu_recording
from firmware_protocol.emulators.recordings import load_recording
from tests.conftest import until


def _write_records(folder) -> tuple[str, str, np.ndarray]:
    """An ECG and an IMU record as `biod record` writes them (format 24 at 1 uV, format 16 at
    the configured ranges), made from real shipped recordings (LUDB 16; SisFall SA01 walking)."""
    ecg = load_recording("ludb-16")
    with WfdbWriter(folder, "ecg_20261122_100000", ecg.fs_hz, [WfdbSignal(n, "mV", 1000.0, 24) for n in ("I", "II", "III")],
                    comments=["person ann"]) as w:
        w.write_physical(ecg.leads_mv)
    imu = load_imu_recording("SA01_D01_walking")
    with WfdbWriter(folder, "imu_20261122_100000", imu.fs_hz, imu_signals(8, 1000), comments=["placement waist"]) as w:
        w.write_physical(np.concatenate([imu.acc_g, imu.gyro_dps], axis=1))
    return str(folder / "ecg_20261122_100000.hea"), str(folder / "imu_20261122_100000.hea"), ecg.leads_mv


@pytest.mark.timeout(90)
def test_replay_of_recorded_files_streams_both_sensors_like_live(tmp_path, mosquitto) -> None:
    ecg_path, imu_path, leads = _write_records(tmp_path / "rec")
    cfg = parse_config(
        f"hub:\n  id: rp\nstate_dir: {tmp_path / 'state'}\n"
        f"ecg:\n  source: replay\n  replay:\n    path: {ecg_path}\n    speed: 4\n    loop: true\n"
        f"imu:\n  enabled: true\n  source: replay\n  replay:\n    path: {imu_path}\n    speed: 4\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n")
    app = BiodApp(cfg)
    hr: list[float] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(stop))
        try:
            await until(lambda: app.stats.ecg_samples > 12 * 500 and app.stats.imu_samples > 12 * 100, 40,
                        "12 s of both replays")
            await until(lambda: app.stats.heart_rate_bpm is not None, 20, "a heart rate")
            hr.append(app.stats.heart_rate_bpm)
        finally:
            stop.set()
            await task

    asyncio.run(scenario())
    # the same signal, detected offline on lead II: the replayed stream gives the same rhythm
    beats = detect_rpeaks(leads[:, 1:2], 500.0)
    offline_bpm = 60.0 / float(np.median(np.diff(beats))) * 500.0
    assert abs(hr[0] - offline_bpm) < 3.0, (hr[0], offline_bpm)
    assert app.ecg_source.health.device is not None and app.ecg_source.health.lost_frames == 0
    assert app.imu_source.health.lost_samples == 0


def test_replay_errors_name_the_key_and_the_fix(tmp_path) -> None:
    with pytest.raises(ConfigError, match="ecg.source is 'replay' but there is no ecg.replay section"):
        parse_config("ecg:\n  source: replay\n")
    from daemon.sources.replay import ecg_recording, imu_recording

    _, imu_path, _ = _write_records(tmp_path)
    with pytest.raises(ConfigError, match=r"ecg.replay.path: .*no lead named I, II or III .*acc_x"):
        ecg_recording(imu_path)
    with pytest.raises(ConfigError, match=r"imu.replay.path: .*cannot read the WFDB header"):
        imu_recording(tmp_path / "nothing.hea")


# --- what the box said about its samples: lead-off, frames lost on the link, reconnects --------------

def _record_live(tmp_path, monkeypatch, seconds: float, events) -> tuple[list, object, object]:
    """`biod record` from an emulated box on a real pty (``source: serial``, as on a hub), with
    ``events``: (sample count the hub has received, action on the box) done as the stream passes
    them. Returns the chunks the recorder got, in order, the .hea it wrote, and the box."""
    import threading
    import time

    import daemon.record_cli as record_cli
    from firmware_protocol.emulators.ecg_box import EcgBoxEmulator

    box = EcgBoxEmulator(load_recording("ludb-16"), rate_hz=500, speed=4.0, loop=True)
    link = tmp_path / "box"
    box.open_pty(link=str(link))
    box.start()
    cfg = parse_config(f"hub: {{id: t}}\necg: {{source: serial, port: {link}}}\nstate_dir: {tmp_path / 'state'}\n")
    live: list = []
    real_open = record_cli.open_ecg_source
    monkeypatch.setattr(record_cli, "open_ecg_source",
                        lambda c, put: real_open(c, lambda chunk: (live.append(chunk), put(chunk))))
    done = threading.Event()

    def drive() -> None:
        for at, action in events:
            while sum(len(c.samples_mv) for c in live) < at and not done.is_set():
                time.sleep(0.005)
            if done.is_set():
                return
            action(box)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        assert record_cli.run_record(cfg, tmp_path / "rec", seconds, "walking", None) == 0
    finally:
        done.set()
        driver.join(5)
        box.close()
    (hea,) = (tmp_path / "rec").glob("ecg_*.hea")
    return live, hea, box


def _as_samples(chunks) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample lead validity (n, 3) and mV of a chunk stream, lost frames as invalid rows
    (what the record must hold: the sample index is the time)."""
    valid, mv = [], []
    for c in chunks:
        if c.lost_frames_before:
            k = c.lost_frames_before * len(c.samples_mv)
            valid.append(np.zeros((k, 3), bool))
            mv.append(np.zeros((k, 3), np.float32))
        valid.append(np.tile(np.asarray(c.lead_valid, bool), (len(c.samples_mv), 1)))
        mv.append(c.samples_mv)
    return np.concatenate(valid), np.concatenate(mv)


def _replay(hea, n: int) -> tuple[list, object]:
    """The record played as ``biod run`` plays it (``source: replay`` through the source factory:
    the emulated box on a real pty, the serial source); the chunks until ``n`` samples (lost ones
    counted) came, and the source."""
    import threading
    import time

    from daemon.config import parse_config
    from daemon.sources.factory import open_ecg_source

    cfg = parse_config(f"ecg:\n  source: replay\n  rate_hz: 500\n  replay:\n    path: {hea}\n    speed: 8\n")
    got: list = []
    source, box = open_ecg_source(cfg, got.append)
    assert box is not None
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while sum((c.lost_frames_before + 1) * len(c.samples_mv) for c in list(got)) < n:
            assert time.monotonic() < deadline, "the replay did not deliver the whole record"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(5)
        box.close()
    return got, source


@pytest.mark.timeout(120)
def test_lead_off_recorded_live_is_lead_off_on_replay_sample_for_sample(tmp_path, monkeypatch) -> None:
    """Electrodes off live (LL alone: only lead I valid; all three; LA alone: only lead II) are
    stored as WFDB 'no sample' on exactly the samples the box flagged, and the replayed box
    flags exactly those samples again: the daemon sees the same lead-off as live."""
    from firmware_protocol.ecg_serial import Electrode

    from daemon.record import read_wfdb

    all_off = Electrode.RA | Electrode.LA | Electrode.LL
    events = [(1000, lambda b: b.set_lead_off(Electrode.LL)), (2000, lambda b: b.set_lead_off(all_off)),
              (3000, lambda b: b.set_lead_off(Electrode.NONE)), (4000, lambda b: b.set_lead_off(Electrode.LA)),
              (4600, lambda b: b.set_lead_off(Electrode.NONE))]
    live, hea, _ = _record_live(tmp_path, monkeypatch, 12.0, events)
    rec = read_wfdb(hea)
    n = rec.physical.shape[0]
    live_valid, live_mv = _as_samples(live)
    live_valid, live_mv = live_valid[:n], live_mv[:n]
    patterns = {tuple(r) for r in live_valid.tolist()}
    assert {(True, True, True), (True, False, False), (False, False, False), (False, True, False)} <= patterns
    np.testing.assert_array_equal(rec.valid, live_valid)  # stored sample for sample
    np.testing.assert_allclose(rec.physical[rec.valid], live_mv[live_valid], atol=1e-3)

    replayed, source = _replay(hea, n)
    replay_valid, replay_mv = _as_samples(replayed)
    assert source.health.lost_frames == 0
    np.testing.assert_array_equal(replay_valid[:n], live_valid)  # the daemon sees what it saw live
    np.testing.assert_allclose(replay_mv[:n][live_valid], live_mv[live_valid], atol=1e-3)


@pytest.mark.timeout(120)
def test_frames_lost_live_are_a_noted_gap_and_are_lost_again_on_replay(tmp_path, monkeypatch) -> None:
    """100 frames lost on the link and a re-plugged box: the record keeps the sample index as
    the time (the lost samples are 'no sample', noted in the header), labels cover the time, and
    a replay loses the same 100 frames at the same place (the daemon sees the same
    lost_frames_before) and marks the reconnect with every lead off instead of splicing it."""
    import time

    from daemon.record import read_wfdb

    def replug(box) -> None:
        box.unplug()
        time.sleep(0.3)
        box.replug()

    live, hea, box = _record_live(tmp_path, monkeypatch, 10.0,
                                  [(1500, lambda b: b.drop_next(100)), (3500, replug)])
    assert box.frames_dropped == 100
    rec = read_wfdb(hea)
    n = rec.physical.shape[0]
    assert n == 5000
    at = sum(len(c.samples_mv) for c in live[:next(i for i, c in enumerate(live) if c.lost_frames_before)])
    gap = [c for c in rec.comments if c.startswith("gap samples")]
    assert gap == [f"gap samples {at}-{at + 1000} (100 frames, 1000 samples, lost on the link; "
                   "stored as WFDB 'no sample')"], rec.comments
    assert not rec.valid[at:at + 1000].any() and rec.valid[:at].all() and rec.valid[at + 1000:].all()
    (joint,) = [int(c.split()[3]) for c in rec.comments if c.startswith("reconnected before sample")]
    assert at + 1000 < joint < n
    labels = hea.with_name(hea.stem + ".labels.csv").read_text().splitlines()[1:]
    assert labels == [f"0,{n},activity,walking"]

    replayed, source = _replay(hea, n)
    assert source.health.lost_frames == 100
    lost_at = [(sum((c.lost_frames_before + 1) * len(c.samples_mv) for c in replayed[:i]), c.lost_frames_before)
               for i, c in enumerate(replayed) if c.lost_frames_before]
    assert lost_at == [(at, 100)]  # the same frames, at the same sample, as live
    replay_valid, _ = _as_samples(replayed)
    frame = joint // 10 * 10
    assert not replay_valid[frame:frame + 10].any()  # the joint: every lead off, not a silent splice
    off = ~replay_valid[:n].all(axis=1)
    off[at:at + 1000] = False
    off[frame:frame + 10] = False
    assert not off.any()  # nothing else is off


@pytest.mark.timeout(60)
def test_a_lead_never_measured_replays_off_and_a_two_lead_record_gets_its_third(tmp_path) -> None:
    """A lead-I-only box's record (II and III 'no sample' throughout) replays, through the same
    factory `biod run` uses, with leads II and III off as live, not as valid zero channels. A
    two-lead record (III never measured) cannot be said with electrode bits; its III is II - I."""
    import queue
    import threading
    import time

    from daemon.sources.factory import open_ecg_source
    from daemon.sources.replay import ecg_recording

    ecg = load_recording("ludb-16")
    sigs = [WfdbSignal(n, "mV", 1000.0, 24) for n in ("I", "II", "III")]
    with WfdbWriter(tmp_path, "ecg_lead1", ecg.fs_hz, sigs) as w:
        w.write_physical(ecg.leads_mv, np.array([True, False, False]))
    with WfdbWriter(tmp_path, "ecg_2ch", ecg.fs_hz, sigs) as w:
        w.write_physical(ecg.leads_mv, np.array([True, True, False]))
    two = ecg_recording(tmp_path / "ecg_2ch.hea")
    assert two.lead_present.all()
    np.testing.assert_allclose(two.leads_mv[:, 2], two.leads_mv[:, 1] - two.leads_mv[:, 0], atol=1e-6)

    cfg = parse_config(f"hub: {{id: t}}\nstate_dir: {tmp_path / 'state'}\n"
                       f"ecg: {{source: replay, replay: {{path: {tmp_path / 'ecg_lead1.hea'}, speed: 8}}}}\n")
    got: queue.Queue = queue.Queue()
    source, box = open_ecg_source(cfg, got.put)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    valid, deadline = [], time.monotonic() + 30
    try:
        while len(valid) < 100:
            assert time.monotonic() < deadline, "no frames from the replay"
            try:
                valid.append(tuple(got.get(timeout=0.5).lead_valid.tolist()))
            except queue.Empty:
                pass
    finally:
        stop.set()
        thread.join(5)
        box.close()
    assert set(valid) == {(True, False, False)}


# --- a replay that does not loop plays once ---------------------------------------------------------

def _short_record(folder, n: int = 1003) -> tuple[object, np.ndarray]:
    """The first ``n`` samples of LUDB 16 as `biod record` writes them (the box's gain): not a
    whole number of 10-sample frames, so the last frame is a short one."""
    from firmware_protocol.ecg_serial import DEFAULT_UV_PER_LSB

    leads = load_recording("ludb-16").leads_mv[:n]
    sigs = [WfdbSignal(name, "mV", 1000.0 / DEFAULT_UV_PER_LSB, 24) for name in ("I", "II", "III")]
    with WfdbWriter(folder, "ecg_once", 500, sigs) as w:
        w.write_physical(leads)
    from daemon.record import read_wfdb

    return folder / "ecg_once.hea", read_wfdb(folder / "ecg_once.hea").physical


@pytest.mark.timeout(60)
def test_a_replay_that_does_not_loop_delivers_each_sample_once_and_says_it_finished(tmp_path, caplog) -> None:
    """`loop: false` used to replay for ever: at the end the box went quiet, the source re-opened
    it after stall_timeout_s and said START, and the box rewound to sample 0. Now every sample of
    the record arrives exactly once, the source logs "replay finished" once and stays idle with
    the ECG not live (state ``finished``, its thread alive: ``biod run`` keeps running)."""
    import threading
    import time

    from daemon.sources.factory import open_ecg_source

    hea, expected = _short_record(tmp_path)
    cfg = parse_config(f"hub: {{id: t}}\nstate_dir: {tmp_path / 'state'}\n"
                       f"ecg: {{source: replay, stall_timeout_s: 1, replay: {{path: {hea}, speed: 8, loop: false}}}}\n")
    got: list = []
    source, box = open_ecg_source(cfg, got.append)
    source.BACKOFF_S = (0.2,)
    caplog.set_level("INFO", logger="daemon.sources.serial_ecg")
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    delivered = lambda: sum(len(c.samples_mv) for c in list(got))  # noqa: E731
    try:
        deadline = time.monotonic() + 30
        while source.health.state != "finished" and delivered() <= len(expected):
            assert time.monotonic() < deadline, f"{delivered()} samples, state {source.health.state}"
            time.sleep(0.05)
        assert delivered() == len(expected), "the recording was played more than once"
        time.sleep(2 * cfg.ecg.stall_timeout_s)  # a stall, a re-open and a START would fit in here
        assert delivered() == len(expected) and thread.is_alive() and source.health.state == "finished"
    finally:
        stop.set()
        thread.join(5)
        box.close()
    assert not thread.is_alive()
    mv = np.concatenate([c.samples_mv for c in got])
    np.testing.assert_allclose(mv, expected, rtol=0, atol=1e-6)  # sample for sample, the last 3 included
    assert [len(c.samples_mv) for c in got][-1] == 3 and not any(c.lost_frames_before for c in got)
    assert source.health.connects == 1 and source.health.errors == [] and box.finished
    finished = [r.getMessage() for r in caplog.records if "replay finished" in r.getMessage()]
    assert len(finished) == 1, finished


@pytest.mark.timeout(60)
def test_a_box_that_played_its_recording_once_stays_at_the_end(tmp_path) -> None:
    """A real device does not rewind on START. The non-looping emulated box resumes where it
    was after a STOP, and once the recording is over it ACKs START and streams nothing."""
    import time

    import serial

    from daemon.sources.replay import ecg_recording
    from firmware_protocol.ecg_serial import Ack, Command, DataFrame, Decoder, encode_command
    from firmware_protocol.emulators.ecg_box import EcgBoxEmulator

    hea, expected = _short_record(tmp_path)
    box = EcgBoxEmulator(ecg_recording(hea), rate_hz=500, speed=4.0, loop=False)
    path = box.open_pty()
    box.start()
    port = serial.Serial(path, 460800, timeout=0.05)
    dec, events = Decoder(), []

    def command(cmd: Command, seq: int) -> None:
        port.write(encode_command(cmd, seq=seq))
        deadline = time.monotonic() + 5
        while Ack(cmd) not in events:
            assert time.monotonic() < deadline, f"no ACK for {cmd.name}"
            events.extend(dec.feed(port.read(4096)))

    def samples() -> int:
        return sum(len(e.samples) for e in events if isinstance(e, DataFrame))

    try:
        command(Command.START, 1)
        while samples() < 300:
            events.extend(dec.feed(port.read(4096)))
        command(Command.STOP, 2)
        events.extend(dec.feed(port.read(4096)))
        command(Command.START, 3)  # resumes: no sample twice
        deadline = time.monotonic() + 20
        while not box.finished:
            assert time.monotonic() < deadline and samples() <= len(expected)
            events.extend(dec.feed(port.read(4096)))
        events.extend(dec.feed(port.read(4096)))
        assert samples() == len(expected)
        mv = np.concatenate([e.millivolts() for e in events if isinstance(e, DataFrame)])
        np.testing.assert_allclose(mv, expected, rtol=0, atol=1e-6)  # each sample once, in order
        events.clear()
        command(Command.START, 4)  # a host re-opening the finished box
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            events.extend(dec.feed(port.read(4096)))
        assert not [e for e in events if isinstance(e, DataFrame)] and not box.streaming
    finally:
        port.close()
        box.close()


@pytest.mark.timeout(60)
def test_biod_record_of_a_replay_that_does_not_loop_ends_with_the_replay(tmp_path) -> None:
    """`biod record` from `source: replay` stops when the replay has played once, with exactly
    the record's samples, rather than recording repeats until --seconds (or waiting for ever)."""
    import daemon.record_cli as record_cli
    from daemon.record import read_wfdb

    hea, expected = _short_record(tmp_path)
    cfg = parse_config(f"hub: {{id: t}}\nstate_dir: {tmp_path / 'state'}\n"
                       f"ecg: {{source: replay, stall_timeout_s: 1, replay: {{path: {hea}, speed: 8}}}}\n")
    assert record_cli.run_record(cfg, tmp_path / "again", 60.0, None, None) == 0
    (copy,) = (tmp_path / "again").glob("ecg_*.hea")
    np.testing.assert_array_equal(read_wfdb(copy).physical, expected)  # bit-exact: the gain too


@pytest.mark.timeout(90)
def test_the_ecg_signal_sensor_says_why_there_is_no_identity(tmp_path, mosquitto, capture, monkeypatch) -> None:
    """The ECG sensor state names the problem (Home Assistant's "ECG signal" entity): "ok" on
    real ECG, then ``lead_off`` once the recorded electrodes come off (LUDB 16, every lead
    stored as WFDB 'no sample' after 6 s and for 16 s, as `biod record` stores a box's lead-off
    bits). The
    heart rate goes to unknown ("None") then: it had stayed on screen for hours."""
    import json

    ecg = load_recording("ludb-16")
    off = 6 * int(ecg.fs_hz)
    # 12 s more of electrodes off after the recording's 10 s: the state says lead_off some 4 s
    # (of recording) after they come off, and at 2x the 4 s left of LUDB 16 alone made that a race
    # with the replay's end (then the state says no_signal).
    leads = np.concatenate([ecg.leads_mv, np.zeros((12 * int(ecg.fs_hz), 3), np.float32)])
    valid = np.ones(leads.shape, bool)
    valid[off:] = False
    with WfdbWriter(tmp_path, "ecg_off", ecg.fs_hz, [WfdbSignal(n, "mV", 1000.0, 24) for n in ("I", "II", "III")]) as w:
        w.write_physical(leads, valid)
    cfg = parse_config(f"hub:\n  id: sig\nstate_dir: {tmp_path / 'state'}\n"
                       f"ecg:\n  source: replay\n  replay:\n    path: {tmp_path / 'ecg_off.hea'}\n    speed: 2\n"
                       f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n")
    # a change of problem is published at once, not at the next interval (60 s: never, here)
    monkeypatch.setattr(BiodApp, "SENSOR_STATE_INTERVAL_S", 60.0)
    app = BiodApp(cfg)
    topic = "biod/sig/sensor/ecg/state"

    def problems() -> list:
        return [json.loads(p).get("signal_problem", "absent") for p in capture.on(topic)]

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(stop))
        try:
            await until(lambda: "lead_off" in problems(), 40, "the sensor state saying lead_off")
            await until(lambda: "None" in capture.on("biod/sig/sensor/heart_rate/state"), 20, "the heart rate cleared")
        finally:
            stop.set()
            await task

    asyncio.run(scenario())
    hr = capture.on("biod/sig/sensor/heart_rate/state")
    cleared = hr.index("None")
    assert cleared > 0 and all(40 < float(v) < 120 for v in hr[:cleared]), hr  # real rates, then unknown
    assert hr[cleared:] == ["None"]  # cleared once, and no rate while the electrodes are off
    seen = problems()
    assert None in seen[:seen.index("lead_off")], seen  # real ECG before: no problem
    assert "signal_lost" not in seen and "absent" not in seen


def test_check_config_and_doctor_read_the_replay_as_biod_run_does(tmp_path, capsys) -> None:
    """An IMU replay pointing at an ECG record, or an ECG replay at a file that is no record:
    check-config said OK and doctor '0 failed', and the service then failed at every start."""
    from daemon.cli import main
    from daemon.doctor import run_checks

    ecg_path, imu_path, _ = _write_records(tmp_path)
    garbage = tmp_path / "garbage.hea"
    garbage.write_text("garbage\n")
    state = tmp_path / "state"
    cases = [  # (config, what check-config must say)
        (f"ecg:\n  enabled: false\nimu:\n  enabled: true\n  source: replay\n  replay:\n    path: {ecg_path}\n",
         "imu.replay.path: "),
        (f"ecg:\n  source: replay\n  replay:\n    path: {garbage}\n", "ecg.replay.path: "),
    ]
    for i, (text, said) in enumerate(cases):
        cfg_file = tmp_path / f"c{i}.yaml"
        cfg_file.write_text(f"state_dir: {state}\n" + text)
        assert main(["check-config", str(cfg_file)]) == 2
        assert said in capsys.readouterr().err
        failed = [c for c in run_checks(parse_config(cfg_file.read_text()), broker=False) if not c.ok]
        assert any(c.name in ("IMU source", "ECG source") and said in c.detail for c in failed), \
            [c.line() for c in failed]
    good = tmp_path / "good.yaml"
    good.write_text(f"state_dir: {state}\nimu:\n  enabled: true\n  source: replay\n  replay:\n    path: {imu_path}\n")
    assert main(["check-config", str(good)]) == 0
    assert [c for c in run_checks(parse_config(good.read_text()), broker=False) if c.name == "IMU source"][0].ok
