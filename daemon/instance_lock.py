"""One ``biod run`` per state directory.

WHY: two daemons on one ``state_dir`` (``sudo biod run`` typed while the service runs, a second
unit on the same config) share its template store, spool and open-session record, and, with one
``hub.id``, its MQTT client id: the broker then drops each connection as soon as the other one
connects, both spool and resend, and the second one's start ended a wearing session the first
still held ("the last run ended without ending ..."). A lock held for the process's life makes
the second one refuse to start instead. ``flock`` is released by the kernel when the process
ends however it ends, so a crash or a power cut never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "biod.pid"


class AlreadyRunning(RuntimeError):
    """Another process holds the state directory's lock."""


def hold(state_dir: Path) -> int:
    """Lock ``state_dir`` for this process and write its pid into the lock file; returns the
    file descriptor, which must stay open for as long as the lock is wanted. Raises
    :class:`AlreadyRunning` (naming the holder's pid) when another process holds it."""
    path = Path(state_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(
            f"another biod is already running on state_dir {state_dir} (pid {holder}): stop it first "
            "(sudo systemctl stop biod, or end the other `biod run`), or give this one its own state_dir "
            "and hub.id") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
