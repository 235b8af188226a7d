"""End to end: emulated ECG box on a real pty -> `biod run` -> real Mosquitto -> subscriber."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Capture

from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
from firmware_protocol.emulators.recordings import list_recordings, load_recording

REPO = Path(__file__).resolve().parents[1]


def _reference_hr(recording) -> float:
    """Heart rate of the recording from an independent batch detector on lead I (neurokit2-free)."""
    from scipy.signal import butter, find_peaks, sosfiltfilt

    x = recording.leads_mv[:, 0]
    sos = butter(2, [5, 20], btype="band", fs=recording.fs_hz, output="sos")
    y = np.abs(sosfiltfilt(sos, x))
    peaks, _ = find_peaks(y, height=0.35 * np.percentile(y, 99.5), distance=int(0.3 * recording.fs_hz))
    return 60.0 / float(np.median(np.diff(peaks) / recording.fs_hz))


@pytest.mark.timeout(120)
def test_biod_run_publishes_availability_discovery_and_heart_rate(tmp_path, mosquitto, capture) -> None:
    name = next(n for n in list_recordings() if n.startswith("ludb"))
    rec = load_recording(name)
    emulator = EcgBoxEmulator(rec, rate_hz=500, speed=2.0)
    link = tmp_path / "biod-ecg"
    emulator.open_pty(link=str(link))
    emulator.start()
    cfg = tmp_path / "biod.yaml"
    cfg.write_text(
        "hub:\n  id: e2e\n"
        f"ecg:\n  source: serial\n  port: {link}\n  rate_hz: 500\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        capture.wait_for(lambda m: any(t == "biod/e2e/availability" and p == "online" for t, p, r in m), 30, "availability online")
        disc = capture.wait_for(
            lambda m: [json.loads(p) for t, p, r in m if t.startswith("homeassistant/sensor/") and t.endswith("/heart_rate/config")],
            30, "heart-rate discovery")[0]
        # A subscriber arriving later (Home Assistant starting after the hub) gets both as retained messages.
        late = Capture(mosquitto.port)
        late.start(["biod/e2e/availability", "homeassistant/#"])
        try:
            late.wait_for(lambda m: ("biod/e2e/availability", "online", True) in m, 10, "retained availability")
            late.wait_for(lambda m: any(t.endswith("/heart_rate/config") and r for t, _, r in m), 10, "retained discovery")
        finally:
            late.stop()
        assert disc["unique_id"] == "biod_e2e_heart_rate"
        assert disc["availability_topic"] == "biod/e2e/availability"
        assert disc["device"]["identifiers"] == ["biod_e2e"]
        hr_topic = disc["state_topic"]
        values = capture.wait_for(lambda m: [float(p) for t, p, _ in m if t == hr_topic][2:] or None, 40, "three heart-rate values")
        ref = _reference_hr(rec)
        assert abs(values[-1] - ref) < 5.0, (values, ref)

        # Home Assistant restarts: discovery is sent again.
        n_before = len([1 for t, *_ in capture.messages if t.endswith("/heart_rate/config")])
        capture.client.publish("homeassistant/status", "online", qos=1)
        capture.wait_for(lambda m: len([1 for t, *_ in m if t.endswith("/heart_rate/config")]) > n_before, 10, "discovery re-sent")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        capture.wait_for(lambda m: [p for t, p, _ in m if t == "biod/e2e/availability"][-1:] == ["stopped"], 10, "availability stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if proc.stdout else ""
        emulator.close()
    assert "Traceback" not in out, out


def test_check_config_reports_line_and_exit_code(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ecg:\n  sourse: serial\n")
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{bad}:2: ecg.sourse: unknown key" in res.stderr
