"""systemd integration: the unit verifies, and `biod run` speaks sd_notify: READY=1 once a sensor
streams (or after a grace period, saying what is missing), WATCHDOG=1 only while healthy,
STOPPING=1 on SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.app import BiodApp
from daemon.config import parse_config
from daemon.systemd import Notifier
from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
from firmware_protocol.emulators.recordings import load_recording
from tests.conftest import running, until

REPO = Path(__file__).resolve().parents[1]


def test_unit_file_verifies_and_is_hardened(tmp_path) -> None:
    unit = (REPO / "deploy" / "biod.service").read_text()
    for directive in ("Type=notify", "WatchdogSec=", "User=biod", "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "StateDirectory=biod", "LoadCredential=mqtt_password", "RestartPreventExitStatus=2",
                      "StartLimitBurst="):
        assert directive in unit, directive
    exe = Path(sys.executable).parent / "biod"
    (tmp_path / "biod.service").write_text(unit.replace("/opt/biod/venv/bin/biod", str(exe)))
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to verify the unit (Debian package systemd)"
    res = subprocess.run([analyze, "verify", str(tmp_path / "biod.service")], capture_output=True, text=True)
    problems = [l for l in res.stderr.splitlines() if "biod.service" in l and "not executable" not in l]
    assert not problems, res.stderr


@pytest.mark.parametrize("script", ["install.sh", "check-install.sh"])
def test_deploy_scripts_are_valid_bash(script: str) -> None:
    # install.sh itself is run for real, on a fresh debootstrapped bookworm, by
    # deploy/check-install.sh (needs root and the network: docs/deploy-check.md), not here
    assert subprocess.run(["bash", "-n", str(REPO / "deploy" / script)]).returncode == 0


@pytest.mark.timeout(90)
def test_ready_watchdog_and_stopping_over_notify_socket(tmp_path, mosquitto) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    emu = EcgBoxEmulator(load_recording("ludb-16"), rate_hz=500, speed=2.0)
    link = tmp_path / "ecg"
    emu.open_pty(link=str(link))
    emu.start()
    cfg = tmp_path / "biod.yaml"
    cfg.write_text(f"hub:\n  id: sd\necg:\n  source: serial\n  port: {link}\n"
                   f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\nstate_dir: {tmp_path / 'state'}\n")
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got: list[str] = []
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and got.count("WATCHDOG=1") < 2:
            try:
                got += sock.recv(4096).decode().splitlines()
            except socket.timeout:
                pass
        assert "READY=1" in got
        assert got.count("WATCHDOG=1") >= 2, got
        assert got.index("READY=1") < got.index("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        deadline = time.monotonic() + 5
        while "STOPPING=1" not in got and time.monotonic() < deadline:
            try:
                got += sock.recv(4096).decode().splitlines()
            except socket.timeout:
                pass
        assert "STOPPING=1" in got
    finally:
        if proc.poll() is None:
            proc.kill()
        emu.close()
        sock.close()


class _NotifySocket:
    """The receiving end of sd_notify, as systemd holds it: one datagram per notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.lines += self.sock.recv(4096).decode().splitlines()
            except BlockingIOError:
                return self.lines

    def close(self) -> None:
        self.sock.close()


def _notified_app(tmp_path: Path, ecg_yaml: str, broker_port: int) -> tuple[BiodApp, _NotifySocket]:
    """A daemon in this process whose sd_notify datagrams land on a socket the test reads, with
    a 0.2 s watchdog interval."""
    cfg = parse_config(f"hub:\n  id: sd\necg:\n{ecg_yaml}"
                       f"mqtt:\n  host: 127.0.0.1\n  port: {broker_port}\nstate_dir: {tmp_path / 'state'}\n")
    ns = _NotifySocket(tmp_path / "notify.sock")
    notifier = Notifier(str(ns.path))
    notifier.watchdog_interval_s = 0.2
    return BiodApp(cfg, notifier), ns


async def _withheld(ns: _NotifySocket, caplog, timeout: float) -> None:
    """Wait for the daemon's unhealthy verdict, then check that no WATCHDOG=1 comes for 7
    intervals. The socket is read while waiting: the daemon's datagrams block once its buffer is
    full."""
    await until(lambda: ns.read() is not None and any("withholding the watchdog" in r.getMessage()
                                                       for r in caplog.records), timeout, "the unhealthy verdict")
    n = ns.read().count("WATCHDOG=1")
    await asyncio.sleep(1.5)  # 7 watchdog intervals
    assert ns.read().count("WATCHDOG=1") == n, "the watchdog was petted while a part of the daemon was dead"


def _drive(app: BiodApp, scenario) -> None:
    """Run the daemon until ``await scenario()`` returns (or fails), then stop it cleanly."""
    async def main() -> None:
        async with running(app):
            await scenario()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_ready_comes_without_a_device_and_says_what_is_missing(tmp_path, mosquitto, caplog) -> None:
    """A box unplugged at boot is not a failed start: READY=1 after the grace period with STATUS=
    naming the missing device, and the watchdog keeps coming (the source retries by itself)."""
    missing = tmp_path / "no-such-box"
    app, ns = _notified_app(tmp_path, f"  source: serial\n  port: {missing}\n", mosquitto.port)
    app.READY_GRACE_S = 1.0

    async def scenario() -> None:
        await until(lambda: "READY=1" in ns.read(), 20, "READY=1 without a device")
        n = ns.read().count("WATCHDOG=1")
        await until(lambda: ns.read().count("WATCHDOG=1") >= n + 3, 10, "the watchdog while the box is missing")

    with caplog.at_level(logging.WARNING, logger="daemon.app"):
        _drive(app, scenario)
    ns.close()
    status = [l for l in ns.lines if l.startswith("STATUS=")]
    assert status and "waiting for ECG" in status[0] and str(missing) in status[0], status
    assert app.stats.ecg_samples == 0
    assert any("no sensor streams" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_watchdog_is_withheld_once_the_pipeline_dies(tmp_path, mosquitto, caplog) -> None:
    """WATCHDOG=1 only while healthy: when a stage of the pipeline crashes, the daemon stops
    petting the watchdog (so systemd restarts it) and logs why."""
    app, ns = _notified_app(tmp_path, "  source: emulator\n  emulator:\n    speed: 2\n", mosquitto.port)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a pipeline stage")

    async def scenario() -> None:
        await until(lambda: "READY=1" in ns.read() and ns.read().count("WATCHDOG=1") >= 2, 20, "healthy streaming")
        app.bio.on_ecg = broken  # the next ECG push kills the consumer task
        await _withheld(ns, caplog, 10)

    with caplog.at_level(logging.ERROR, logger="daemon.app"):
        _drive(app, scenario)
    ns.close()
    assert ns.lines[ns.lines.index("READY=1") + 1] == "STATUS=streaming ECG"
    causes = [r for r in caplog.records if r.getMessage() == "biod: ecg-pipeline stopped on an error"]
    assert len(causes) == 1 and "a bug in a pipeline stage" in str(causes[0].exc_info[1])  # logged once, with why
    assert any("'ecg-pipeline'" in r.getMessage() for r in caplog.records if "withholding" in r.getMessage())


@pytest.mark.timeout(90)
def test_status_shows_the_broker_going_away_and_coming_back(tmp_path, mosquitto) -> None:
    """``systemctl status biod`` names the broker: with it away the daemon is healthy and spools,
    but Home Assistant hears nothing, and STATUS= must say so with host:port, then say connected."""
    app, ns = _notified_app(tmp_path, "  source: emulator\n  emulator:\n    speed: 2\n", mosquitto.port)
    broker = f"127.0.0.1:{mosquitto.port}"

    def statuses() -> list[str]:
        return [l.removeprefix("STATUS=") for l in ns.read() if l.startswith("STATUS=")]

    async def scenario() -> None:
        await until(lambda: any(f"MQTT connected to {broker}" in s for s in statuses()), 20, "a status with the broker")
        assert any(s.startswith("ECG streaming") for s in statuses()), statuses()
        mosquitto.stop()
        await until(lambda: "MQTT not connected" in statuses()[-1], 20, "the broker's loss in STATUS=")
        assert broker in statuses()[-1], statuses()[-1]
        mosquitto.start()
        await until(lambda: statuses()[-1].endswith(f"MQTT connected to {broker}"), 60, "the broker back in STATUS=")

    _drive(app, scenario)
    ns.close()


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death this test causes
def test_watchdog_is_withheld_when_pahos_network_thread_dies(tmp_path, caplog) -> None:
    """paho retries on OSError only: anything else raised in its network thread ends it for good
    and nothing reconnects (a host with an empty label raised UnicodeError there; the config now
    refuses such a host, so the config is built past its check to make the thread die). The
    daemon used to stay "healthy" while its events piled up in the spool."""
    cfg = parse_config(f"hub:\n  id: sd\necg:\n  source: emulator\nstate_dir: {tmp_path / 'state'}\n")
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"host": "homeassistant..local"})})
    ns = _NotifySocket(tmp_path / "notify.sock")
    notifier = Notifier(str(ns.path))
    notifier.watchdog_interval_s = 0.2
    app = BiodApp(cfg, notifier)

    async def scenario() -> None:
        await _withheld(ns, caplog, 20)

    with caplog.at_level(logging.ERROR, logger="daemon.app"):
        _drive(app, scenario)
    ns.close()
    verdicts = [r.getMessage() for r in caplog.records if "withholding" in r.getMessage()]
    assert verdicts and "'mqtt-network'" in verdicts[0], verdicts
