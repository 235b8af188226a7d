"""One ``biod run`` per state directory (daemon.instance_lock): a second one on the same
state_dir refuses to start and names the first; the lock dies with its process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import instance_lock
from daemon.cli import main
from tests.conftest import free_port


def _config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "biod.yaml"
    cfg.write_text(f"hub: {{id: lockhub}}\nstate_dir: {tmp_path / 'state'}\n"
                   f"mqtt: {{host: 127.0.0.1, port: {port}}}\n"
                   "ecg: {source: emulator, emulator: {recording: ludb-16}}\n")
    return cfg


def _wait_for_pid_in(path: Path, pid: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip() == str(pid):
            return
        if proc.poll() is not None:
            pytest.fail(f"the first biod run ended with {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.1)
    pytest.fail(f"{path} never held pid {pid}")


def test_a_second_biod_run_on_the_same_state_dir_refuses_and_names_the_first(tmp_path, capsys) -> None:
    cfg = _config(tmp_path, free_port())  # no broker there: the first one spools, which is fine
    first = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_pid_in(tmp_path / "state" / instance_lock.LOCK_NAME, first.pid, first)
        assert main(["run", "--config", str(cfg)]) == 1
        err = capsys.readouterr().err
        assert f"another biod is already running on state_dir {tmp_path / 'state'} (pid {first.pid})" in err, err
        assert "sudo systemctl stop biod" in err
        assert first.poll() is None  # the first one goes on untouched
    finally:
        first.send_signal(signal.SIGKILL)  # no clean exit: the kernel still drops the lock
        first.wait(30)
    fd = instance_lock.hold(tmp_path / "state")
    try:
        assert (tmp_path / "state" / instance_lock.LOCK_NAME).read_text().strip() == str(os.getpid())
        assert oct((tmp_path / "state" / instance_lock.LOCK_NAME).stat().st_mode & 0o777) == "0o600"
    finally:
        os.close(fd)
