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
