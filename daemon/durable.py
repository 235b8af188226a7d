"""Durable writes, shared by the template store and the spool's open-session record: both
replace a small private file so that a power cut leaves the old content or the new, never half.
"""
from __future__ import annotations

import os
import tempfile


def write_all_and_sync(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer than asked) and fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``directory`` durable: the entry, not only the data, must
    survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(directory: str | os.PathLike[str], prefix: str) -> None:
    """Create and remove a temp file in ``directory``, as a durable write first does; OSError if
    this user cannot. WHY a real file, not ``os.access``: a read-only mount or a folder of another
    owner is found exactly as the write itself would find it (``biod doctor``, ``biod calibrate``
    before the person records)."""
    fd, probe = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    os.close(fd)
    os.unlink(probe)
