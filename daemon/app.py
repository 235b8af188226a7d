"""The daemon's wiring: the one place where threads, asyncio and the stages meet.

Data flows one way: source thread -> bounded queue -> DSP -> publisher. Each stage is plain,
synchronous and testable on its own; this module only connects them, owns their lifetimes and
decides what "healthy" means for the systemd watchdog.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

from daemon.config import BiodConfig
from daemon.dsp.ecg_pipeline import EcgPipeline
from daemon.publish import homeassistant as ha
from daemon.publish.mqtt import Message, MqttPublisher
from daemon.sources.serial_ecg import EcgChunk, EcgSource, serial_opener, tcp_opener
from daemon.systemd import Notifier

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 2000  # ~40 s of 10-sample frames at 500 Hz: absorbs a slow consumer, bounds memory


@dataclass
class AppStats:
    started_at: float = field(default_factory=time.time)
    chunks: int = 0
    dropped_chunks: int = 0
    beats: int = 0
    heart_rate_bpm: float | None = None


class BiodApp:
    """One running daemon. ``await run(stop)`` returns the process exit code."""

    HR_PUBLISH_INTERVAL_S = 1.0

    def __init__(self, cfg: BiodConfig, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.stats = AppStats()
        self.topics = ha.Topics(cfg.topic_prefix)
        self._emulator = None
        self._queue: asyncio.Queue[EcgChunk] | None = None

    # -- discovery --------------------------------------------------------------------------------
    def discovery_messages(self) -> list[Message]:
        m = self.cfg.mqtt
        return [ha.heart_rate_config(m.discovery_prefix, self.cfg.hub.id, self.cfg.hub.name, self.topics)]

    # -- sources ----------------------------------------------------------------------------------
    def _ecg_source(self, on_chunk) -> EcgSource:
        e = self.cfg.ecg
        if e.source == "emulator":
            from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
            from firmware_protocol.emulators.recordings import load_recording

            self._emulator = EcgBoxEmulator(load_recording(e.emulator.recording), rate_hz=e.rate_hz,
                                            speed=e.emulator.speed, loop=e.emulator.loop)
            path = self._emulator.open_pty()
            self._emulator.start()
            log.info("ecg: emulated box streaming recording %r on %s", e.emulator.recording, path)
            return EcgSource(serial_opener(path, e.baud), f"emulator {path}", on_chunk, rate_hz=e.rate_hz,
                             match_serial=e.match_serial, stall_timeout_s=e.stall_timeout_s, baud=e.baud)
        if e.source == "serial":
            assert e.port
            return EcgSource(serial_opener(e.port, e.baud), e.port, on_chunk, rate_hz=e.rate_hz,
                             match_serial=e.match_serial, stall_timeout_s=e.stall_timeout_s, baud=e.baud)
        assert e.tcp_port
        return EcgSource(tcp_opener(e.host, e.tcp_port), f"tcp://{e.host}:{e.tcp_port}", on_chunk,
                         rate_hz=e.rate_hz, match_serial=e.match_serial, stall_timeout_s=e.stall_timeout_s)

    # -- main loop --------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        publisher = MqttPublisher(self.cfg.mqtt, self.cfg.topic_prefix, client_id=f"biod-{self.cfg.hub.id}",
                                  discovery=self.discovery_messages)
        publisher.start()

        def on_chunk(chunk: EcgChunk) -> None:  # source thread
            loop.call_soon_threadsafe(self._enqueue, chunk)

        thread_stop = threading.Event()
        source = self._ecg_source(on_chunk)
        thread = threading.Thread(target=source.run, args=(thread_stop,), name="ecg-source", daemon=True)
        thread.start()
        consumer = asyncio.create_task(self._consume(publisher, source))
        watchdog = asyncio.create_task(self._watchdog(publisher, source, thread, consumer))
        try:
            await stop.wait()
        finally:
            log.info("biod: stopping")
            self.notifier.stopping()
            consumer.cancel()
            watchdog.cancel()
            for task in (consumer, watchdog):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            thread_stop.set()
            await asyncio.to_thread(thread.join, 5.0)
            if self._emulator is not None:
                self._emulator.close()
            await asyncio.to_thread(publisher.close)
        return 0

    def _enqueue(self, chunk: EcgChunk) -> None:
        assert self._queue is not None
        if self._queue.full():  # keep the newest data: a live biometric stream has no use for stale samples
            self._queue.get_nowait()
            self.stats.dropped_chunks += 1
        self._queue.put_nowait(chunk)

    async def _consume(self, publisher: MqttPublisher, source: EcgSource) -> None:
        assert self._queue is not None
        pipeline: EcgPipeline | None = None
        last_hr_publish = 0.0
        ready = False
        while True:
            chunk = await self._queue.get()
            if pipeline is None or pipeline.fs != chunk.rate_hz or pipeline.n_leads != chunk.samples_mv.shape[1]:
                pipeline = EcgPipeline(fs=chunk.rate_hz, n_leads=chunk.samples_mv.shape[1], mains_hz=self.cfg.ecg.mains_hz)
            if not ready:
                self.notifier.ready("streaming ECG")
                ready = True
            self.stats.chunks += 1
            update = pipeline.push(chunk.samples_mv, chunk.lead_valid)
            self.stats.beats += len(update.beats)
            now = time.monotonic()
            if update.heart_rate_bpm is not None:
                self.stats.heart_rate_bpm = update.heart_rate_bpm
                if now - last_hr_publish >= self.HR_PUBLISH_INTERVAL_S:
                    publisher.publish(Message(self.topics.sensor_state("heart_rate"), f"{update.heart_rate_bpm:.1f}"))
                    last_hr_publish = now

    async def _watchdog(self, publisher: MqttPublisher, source: EcgSource, thread: threading.Thread,
                        consumer: asyncio.Task[None]) -> None:
        """WATCHDOG=1 only while healthy: loop responsive, source thread alive, consumer alive, and
        not wedged (claiming to stream with no frame for three stall timeouts). A device that is
        unplugged is not unhealthy: the source is retrying and a restart would not help."""
        interval = self.notifier.watchdog_interval_s or 5.0
        wedge_s = self.cfg.ecg.stall_timeout_s * 3
        while True:
            await asyncio.sleep(interval)
            h = source.health
            wedged = h.state == "streaming" and h.last_frame_at is not None and time.time() - h.last_frame_at > wedge_s
            if thread.is_alive() and not consumer.done() and not wedged:
                self.notifier.watchdog()
            else:
                log.error("biod: unhealthy (source thread alive=%s, consumer alive=%s, wedged=%s); withholding the watchdog",
                          thread.is_alive(), not consumer.done(), wedged)
