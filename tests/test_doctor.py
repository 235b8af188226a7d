"""`biod doctor` names each problem with its fix and changes nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import parse_config
from daemon.doctor import check_models, check_serial, check_state_dir
from tests.conftest import Broker, sign_test_cert, start_tls_broker

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


def _identity_checks(cfg) -> dict[str, "Check"]:  # noqa: F821
    from daemon.doctor import check_identity

    return {c.name: c for c in check_identity(cfg)}


def test_identity_assets_in_step_with_the_installed_model(tmp_path) -> None:
    import numpy as np

    from daemon.biometrics import MODELS_DIR, EcgModelRunner
    from daemon.identity.store import ModelRef, Person, TemplateStore, slugify

    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR, models)
    cfg = parse_config(f"state_dir: {tmp_path / 'state'}\nmodels_dir: {models}\n"
                       "imu:\n  enabled: true\n  source: emulator\n  placement: wrist\n")
    checks = _identity_checks(cfg)
    assert all(c.ok for c in checks.values()), [c.line() for c in checks.values()]
    assert "nobody enrolled" in checks["enrolled persons"].detail
    assert "none for imu.placement 'wrist'" in checks["gait identity model"].detail
    # no IMU model is trained for the wrist: none is used, and doctor says why
    imu = checks["IMU models"].detail
    assert ": none;" in imu and "imu_activity is trained for an IMU at the thigh" in imu
    assert "imu_age is trained for an IMU at the waist" in imu

    ref = EcgModelRunner.load(models / "ecg_dualtask.tflite").ref
    rng = np.random.default_rng(0)

    def person(name: str, model: ModelRef) -> Person:
        return Person(id=f"id-{name}", name=name, slug=slugify(name), created="2026-01-01T00:00:00+00:00",
                      model=model, prototypes=rng.normal(size=(2, model.dim)).astype(np.float32),
                      prototype_labels=("rest", "walking"), threshold=0.6, stats={})

    store = TemplateStore(cfg.store_path)
    store.add(person("Ann", ref))
    assert _identity_checks(cfg)["enrolled persons"].ok
    store.add(person("Old", ModelRef("ecg_dualtask", "0.9.0", 64)))  # enrolled before a model update
    bad = _identity_checks(cfg)["enrolled persons"]
    assert not bad.ok and "'Old'" in bad.detail and "calibrate" in (bad.fix or "")

    z = dict(np.load(models / "ecg_impostors.npz"))
    z["model_version"] = np.array("ecg_dualtask 0.9.0 0123456789ab")
    np.savez(models / "ecg_impostors.npz", **z)
    stale = _identity_checks(cfg)["impostor set"]
    assert not stale.ok and "0.9.0" in stale.detail and "training.impostors" in (stale.fix or "")
    (models / "ecg_impostors.npz").write_bytes((models / "ecg_impostors.npz").read_bytes()[:2000])  # a half copy
    broken = _identity_checks(cfg)["impostor set"]
    assert not broken.ok and "unreadable" in broken.detail and "BadZipFile" in broken.detail
    (models / "ecg_impostors.npz").unlink()
    assert "missing" in _identity_checks(cfg)["impostor set"].detail


def test_ble_adapter_check_finds_missing_and_blocked_adapters(tmp_path) -> None:
    from daemon.doctor import check_ble_adapter

    sys_class = tmp_path / "class"
    (sys_class / "bluetooth").mkdir(parents=True)
    (missing,) = check_ble_adapter(sys_class)
    assert not missing.ok and "no Bluetooth adapter" in missing.detail and "bluez" in (missing.fix or "")
    (sys_class / "bluetooth" / "hci0").mkdir()
    wifi, bt = sys_class / "rfkill" / "rfkill0", sys_class / "rfkill" / "rfkill1"
    for d, kind, soft in ((wifi, "wlan", "1"), (bt, "bluetooth", "1")):
        d.mkdir(parents=True)
        (d / "type").write_text(kind + "\n")
        (d / "soft").write_text(soft + "\n")
        (d / "hard").write_text("0\n")
    (blocked,) = check_ble_adapter(sys_class)
    assert not blocked.ok and "rfkill1 (soft)" in blocked.detail and "rfkill0" not in blocked.detail
    assert "rfkill unblock bluetooth" in (blocked.fix or "")
    (bt / "soft").write_text("0\n")
    (ok,) = check_ble_adapter(sys_class)
    assert ok.ok and ok.detail == "hci0"


@pytest.fixture
def client_cert_broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto with a TLS listener that requires a client certificate signed by its own CA,
    and whose server certificate names ``broker.invalid``, not 127.0.0.1 (so only
    ``tls.insecure`` reaches it by address). Files in ``broker.tls_dir``: ca.crt, client.crt/.key."""
    broker = start_tls_broker(tmp_path, "subjectAltName=DNS:broker.invalid\nextendedKeyUsage=serverAuth\n",
                              listener_conf="require_certificate true\n")
    sign_test_cert(broker.tls_dir, "client", "extendedKeyUsage=clientAuth\n")  # type: ignore[attr-defined]
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.timeout(60)
def test_broker_check_connects_as_the_daemon_does_with_a_client_certificate(client_cert_broker: Broker) -> None:
    """doctor set only the CA: it reported FAIL for a broker that requires the client certificate
    the daemon sends (mqtt.tls.cert_file/key_file) and ignored mqtt.tls.insecure, so it told
    people to fix a setup that worked. Now it connects with the daemon's own TLS setup."""
    from daemon.doctor import check_broker
    from daemon.publish.mqtt import MqttPublisher

    d = client_cert_broker.tls_dir  # type: ignore[attr-defined]

    def cfg(client_cert: bool = True, insecure: bool = True):
        tls = f"    enabled: true\n    ca_file: {d / 'ca.crt'}\n    insecure: {str(insecure).lower()}\n"
        if client_cert:
            tls += f"    cert_file: {d / 'client.crt'}\n    key_file: {d / 'client.key'}\n"
        return parse_config(f"mqtt:\n  host: 127.0.0.1\n  port: {client_cert_broker.tls_port}\n"  # type: ignore[attr-defined]
                            f"  tls:\n{tls}")

    good = cfg()
    (check,) = check_broker(good, timeout=5)
    assert check.ok, check.line()
    daemon = MqttPublisher(good.mqtt, "biod/doctor-test", client_id="biod-doctor-test")  # and the daemon agrees
    daemon.start()
    try:
        assert daemon.wait_connected(10), daemon.stats.last_error
    finally:
        daemon.close()

    (no_cert,) = check_broker(cfg(client_cert=False), timeout=3)  # the broker requires one: a real FAIL
    assert not no_cert.ok and "cert_file/key_file" in (no_cert.fix or ""), no_cert.line()
    (no_insecure,) = check_broker(cfg(insecure=False), timeout=3)  # the certificate names broker.invalid
    assert not no_insecure.ok and "insecure" in (no_insecure.fix or ""), no_insecure.line()


def test_an_encrypted_store_without_its_key_is_not_a_reason_to_re_enrol(tmp_path) -> None:
    """Re-enrolling fails the same way while the key is missing; the fix is in the message."""
    import os

    from daemon.identity.store import TemplateStore

    cfg = parse_config(f"state_dir: {tmp_path / 'state'}\n")
    TemplateStore(cfg.store_path, os.urandom(32)).save({})
    check = _identity_checks(cfg)["enrolled persons"]
    assert not check.ok and "key" in check.detail
    assert check.fix is None and "re-enrol" not in check.line()


def _as_the_biod_user(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python without root's power to ignore file permissions (as the
    biod user runs): setpriv drops DAC override and chown from the child's capabilities."""
    return subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner,-chown",
                           sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder owned by another user needs root (CI runs as root)")
@pytest.mark.parametrize("sub", ["spool", "identity"])
def test_a_state_folder_the_biod_user_cannot_write_is_named_before_run_or_calibrate(tmp_path, sub) -> None:
    """A spool/ or identity/ left owned by another user (a biod command run as root) passed the
    top folder's check, and `biod run` failed on it; `biod calibrate` found out only after the
    person had recorded for 90 s, and the enrolment was lost."""
    state = tmp_path / "state"
    (state / sub).mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    (state / sub).chmod(0o755)
    os.chown(state / sub, 65534, 65534)  # nobody's: the biod user may look in, not write
    code = f"""
from pathlib import Path
from daemon.calibrate import run_calibrate
from daemon.config import parse_config
from daemon.doctor import check_state_dir
cfg = parse_config("state_dir: {state}\\n")
for c in check_state_dir(cfg):
    print(c.ok, c.name, c.detail)
if {sub!r} == "identity":
    print("calibrate", run_calibrate(cfg, "Zoe", 40.0, walk=False))
"""
    res = _as_the_biod_user(code)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("True state directory")
    assert lines[1].startswith(f"False state files cannot write {state / sub}"), res.stdout
    if sub == "identity":  # refused before the person is asked to record anything
        assert lines[-1] == "calibrate 2" and "attach the electrodes" not in res.stdout
        assert res.stderr.startswith(f"biod calibrate: {state / sub}") and "biod user" in res.stderr


def _ble_cfg(tmp_path, address: str):
    return parse_config(f"imu:\n  enabled: true\n  source: ble\n  address: '{address}'\n  scan_timeout_s: 1\n"
                        f"state_dir: {tmp_path}\n")


def test_scan_finds_the_configured_board_as_the_daemon_does_and_names_the_fix_when_it_is_away(tmp_path) -> None:
    """`biod doctor --scan` looks for the board with the daemon's own scan step
    (metawear_ble.find_board), here against the emulated MetaMotion's scanner."""
    from daemon.doctor import check_ble_sensor
    from daemon.sources.metawear_ble import EmulatorScanner
    from firmware_protocol.emulators.metamotion import MetaMotionEmulator

    emu = MetaMotionEmulator(mac="EE:51:C0:DE:00:07")
    (seen,) = check_ble_sensor(_ble_cfg(tmp_path, "ee:51:c0:de:00:07"), EmulatorScanner(emu))
    assert seen.ok and "EE:51:C0:DE:00:07" in seen.detail
    (away,) = check_ble_sensor(_ble_cfg(tmp_path, "EE:51:C0:DE:00:08"), EmulatorScanner(emu))
    assert not away.ok and "not found within 1 s" in away.detail
    assert "systemctl stop biod" in (away.fix or "")  # a board biod holds does not advertise


def test_scan_that_cannot_run_says_so_and_not_that_the_board_is_away(tmp_path) -> None:
    """The real bleak scanner, told to use an adapter that does not exist (hci99): on CI, which
    has no Bluetooth at all, and on a hub with one alike, the scan itself fails, and the fix is
    the adapter's, not the board's."""
    import functools

    from bleak import BleakScanner

    from daemon.doctor import check_ble_sensor

    class NoSuchAdapter:
        find_device_by_address = functools.partial(BleakScanner.find_device_by_address, bluez={"adapter": "hci99"})

    (check,) = check_ble_sensor(_ble_cfg(tmp_path, "C8:4B:AA:11:22:33"), NoSuchAdapter())
    assert not check.ok and check.detail.startswith("BLE scan failed")
    assert "bluetoothctl power on" in (check.fix or "") and "charge" not in (check.fix or "")


def test_doctor_scans_only_when_asked_and_only_a_ble_source(tmp_path) -> None:
    from daemon.doctor import run_checks

    cfg = _ble_cfg(tmp_path, "C8:4B:AA:11:22:33")
    assert "MetaMotion sensor" not in {c.name for c in run_checks(cfg, broker=False)}
    emulated = parse_config(f"imu:\n  enabled: true\n  source: emulator\nstate_dir: {tmp_path}\n")
    (scan,) = [c for c in run_checks(emulated, broker=False, scan=True) if c.name == "MetaMotion sensor"]
    assert scan.ok and "not scanned: imu is emulator" in scan.detail


def test_a_state_dir_biod_will_create_passes_and_one_it_cannot_fails(tmp_path) -> None:
    """A fresh checkout's ~/.local/state/biod does not exist until the first `biod run`, which
    creates it: doctor had failed it. Under a folder nobody may write (/proc), it still fails."""
    from daemon.doctor import check_state_dir

    (new,) = check_state_dir(parse_config(f"state_dir: {tmp_path / 'a' / 'b'}\n"))
    assert new.ok and "biod creates it" in new.detail
    (bad,) = check_state_dir(parse_config("state_dir: /proc/biod-nowhere/state\n"))
    assert not bad.ok and "cannot be written" in bad.detail


def test_a_damaged_model_is_one_failure_not_one_per_check_that_needs_it(tmp_path) -> None:
    from daemon.biometrics import MODELS_DIR
    from daemon.doctor import run_checks

    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR, models)
    blob = bytearray((models / "ecg_dualtask.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (models / "ecg_dualtask.tflite").write_bytes(bytes(blob))
    cfg = parse_config(f"state_dir: {tmp_path / 'state'}\nmodels_dir: {models}\n")
    failed = [c for c in run_checks(cfg, broker=False) if not c.ok]
    assert [c.name for c in failed] == ["model ecg_dualtask", "ECG identity model"]
    assert "sha256" in failed[0].detail and failed[0].fix is None and "re-install" in failed[0].detail
    assert failed[1].detail == "cannot be checked: it needs what failed in 'model ecg_dualtask' above"
    assert "sha256" not in failed[1].line()
