"""sd_notify without a dependency: READY=1 when streaming, WATCHDOG=1 only while healthy.

systemd's notify protocol is one datagram to ``$NOTIFY_SOCKET``; outside systemd the variable is
unset and every call is a no-op, so the daemon runs the same under a terminal and a unit.
"""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        if path and path.startswith("@"):
            path = "\0" + path[1:]  # abstract namespace socket
        self._path = path or None
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if usec and usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def notify(self, *fields: str) -> bool:
        if not self._path:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._path)
            return True
        except OSError:
            return False

    def ready(self, status: str = "streaming") -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
