"""`biod doctor` names each problem with its fix and changes nothing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from daemon.config import parse_config
from daemon.doctor import check_models, check_serial, check_state_dir

REPO = Path(__file__).resolve().parents[1]


def test_models_verified_and_a_corrupt_one_named(tmp_path) -> None:
    for f in (REPO / "daemon" / "models").glob("imu_gender.*"):
        shutil.copy(f, tmp_path / f.name)
    assert [c.ok for c in check_models(tmp_path)] == [True]
    data = bytearray((tmp_path / "imu_gender.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "imu_gender.tflite").write_bytes(bytes(data))
    (check,) = check_models(tmp_path)
    assert not check.ok and "sha256" in check.detail and "re-install" in check.detail


def test_missing_serial_device_and_open_state_dir(tmp_path) -> None:
    cfg = parse_config(f"ecg:\n  source: serial\n  port: {tmp_path / 'ttyACM9'}\nstate_dir: {tmp_path}\n")
    (serial,) = check_serial(cfg)
    assert not serial.ok and "udev" in (serial.fix or "")
    tmp_path.chmod(0o755)
    (state,) = check_state_dir(cfg)
    assert not state.ok and "0700" in (state.fix or "")
    tmp_path.chmod(0o700)
    (state,) = check_state_dir(cfg)
    assert state.ok


def test_doctor_command_reports_an_unreachable_broker(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"mqtt:\n  host: 127.0.0.1\n  port: 9\nstate_dir: {tmp_path}\n")
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "doctor", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "[FAIL] MQTT broker: 127.0.0.1:9" in res.stdout and "fix:" in res.stdout
