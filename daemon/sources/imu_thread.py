"""The BLE IMU source on an event loop of its own, for the blocking commands (calibrate, record).

WHY: ``MetaWearSource`` is asyncio (bleak). ``biod run`` awaits it on the daemon's loop, but
``biod calibrate`` and ``biod record`` are plain loops over the ECG queue; they run the IMU on its
own loop in a thread and take its chunks from a bounded queue. A full queue drops the newest
chunk and counts it (``dropped``): the commands say so instead of blocking the BLE callback.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading

from daemon.config import ImuSourceConfig
from daemon.sources.metawear_ble import ImuChunk, MetaWearSource

log = logging.getLogger(__name__)


class ImuThread:
    """``start()``, then ``drain()`` from the caller's loop; ``stop()`` ends the BLE session."""

    def __init__(self, cfg: ImuSourceConfig, maxsize: int = 5000) -> None:
        self.chunks: queue.Queue[ImuChunk] = queue.Queue(maxsize=maxsize)
        self.source = MetaWearSource(cfg, self._put)
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="imu-source", daemon=True)

    def _put(self, chunk: ImuChunk) -> None:
        try:
            self.chunks.put_nowait(chunk)
        except queue.Full:
            self.dropped += 1
            log.warning("imu: queue full, chunk dropped")

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self.source.run(self._stop)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def drain(self) -> list[ImuChunk]:
        out = []
        while True:
            try:
                out.append(self.chunks.get_nowait())
            except queue.Empty:
                return out
