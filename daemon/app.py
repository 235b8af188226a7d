"""The daemon's wiring: the one place where threads, asyncio and the stages meet.

Data flows one way:

    ECG source thread ─► bounded queue ─► EcgPipeline ─┐
    IMU source task ───► bounded queue ─► ImuPipeline ─┴─► Biometrics (models, identity, fusion)
        ─► SessionPublisher (events, spooled on disk) ─► MqttPublisher (+ retained state, discovery)

Each stage is plain, synchronous and testable on its own; this module only connects them, owns
their lifetimes, runs enrolments started from Home Assistant, and decides what "healthy" means
for the systemd watchdog.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from daemon.biometrics import MODELS_DIR, Biometrics, EcgModelRunner, ImuModelSet
from daemon.clock import to_epoch
from daemon.config import BiodConfig
from daemon.dsp.imu_pipeline import SensorImuPipeline
from daemon.ecg_stream import EcgStream
from daemon.enrol import Enrolment, EnrolmentRefused, ImpostorsError, check_before_recording, load_impostors
from daemon.events import EventTracker
from daemon.identity.engine import IdentityEngine
from daemon.identity.fusion import ACTIVITY_CLASSES
from daemon.identity.store import StoreError, TemplateStore, key_from_credential, slugify
from daemon.inference.runtime import ModelError
from daemon.publish import homeassistant as ha
from daemon.publish.mqtt import Message, MqttPublisher
from daemon.publish.spool import EventSpool, SessionRecordFile, SpoolSender
from daemon.publish.state import (
    NO_SIGNAL,
    EnrolCommands,
    EnrolRequest,
    HeartRateSensor,
    SensorState,
    SessionPublisher,
    StatsReporter,
    Topics,
    enrol_state_message,
    iso8601,
    person_state_removal,
    sensor_state_message,
    wearer_message,
)
from daemon.sources.factory import open_ecg_source
from daemon.sources.serial_ecg import EcgChunk, EcgSource
from daemon.systemd import Notifier
from firmware_protocol.ecg_serial import frames_missing

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 2000  # ~40 s of 10-sample frames at 500 Hz: absorbs a slow consumer, bounds memory
VERSION = "0.1.0"


@dataclass
class AppStats:
    started_at: float = field(default_factory=time.monotonic)  # monotonic: uptime
    ecg_chunks: int = 0
    ecg_samples: int = 0
    dropped_chunks: int = 0
    imu_chunks: int = 0
    imu_samples: int = 0
    dropped_imu_chunks: int = 0
    imu_errors: int = 0
    beats: int = 0
    heart_rate_bpm: float | None = None
    first_clean_beat_at: float | None = None


def load_ecg_model(cfg: BiodConfig) -> EcgModelRunner | None:
    path = (cfg.models_dir or MODELS_DIR) / "ecg_dualtask.tflite"
    try:
        return EcgModelRunner.load(path)
    except (ModelError, OSError, ValueError) as exc:
        log.error("identity: the ECG model cannot be used (%s); heart rate still works, identity does not. "
                  "Fix: re-install biod's models (`sudo deploy/install.sh` from the biod checkout)", exc)
        return None


def load_imu_models(cfg: BiodConfig) -> ImuModelSet | None:
    try:
        models = ImuModelSet.load_dir(cfg.models_dir or MODELS_DIR, cfg.imu.placement)
    except (ModelError, OSError, ValueError) as exc:
        log.error("imu: the IMU models cannot be used (%s); activity comes from the ECG alone", exc)
        return None
    if not cfg.imu.enabled:  # nothing to say about models no IMU will feed
        return models
    for why in models.skipped.values():  # a consequence of the placement chosen, not a fault
        log.info("imu: %s: not used", why)
    for task, why in models.failed.items():
        log.error("imu: the %s model cannot be used (%s); the other IMU models, gait identity and "
                  "walking/cadence go on. Fix: re-install biod's models (`sudo deploy/install.sh` from the biod checkout)",
                  task, why)
    return models  # even with no model for this placement: walking, cadence, activity from motion


def open_store(cfg: BiodConfig) -> TemplateStore:
    key = key_from_credential(cfg.identity.store_key_credential) if cfg.identity.store_key_credential else None
    return TemplateStore(cfg.store_path, key)


class ThreadHandoff:
    """Items from a source thread to the event loop, with ONE loop wakeup per burst.

    WHY: ``loop.call_soon_threadsafe`` writes a byte to the loop's self-pipe on every call, and
    the signal handlers share that pipe. One call per 20 ms ECG frame filled it whenever the
    loop fell behind (a loaded hub, a fast replay): then a SIGTERM's byte was dropped and the
    daemon did not stop (measured: the soak benchmark at 50x, while training ran). Here the
    thread appends to a deque and wakes the loop only when no wakeup is pending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver, maxlen: int = QUEUE_CHUNKS, on_drop=None) -> None:
        self._loop, self._deliver = loop, deliver
        # bounded like the queues behind it: a loop that stops draining (wedged, or so loaded the
        # watchdog is about to fire) must not grow memory without limit; the oldest item goes
        self._items: collections.deque = collections.deque(maxlen=maxlen)
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._pending = False

    def put(self, item) -> None:  # source thread
        with self._lock:
            if len(self._items) == self._items.maxlen and self._on_drop is not None:
                self._on_drop()
            self._items.append(item)
            if self._pending:
                return
            self._pending = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # loop thread
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._pending = False
        for item in items:
            self._deliver(item)


class BiodApp:
    """One running daemon. ``await run(stop)`` returns the process exit code."""

    HR_PUBLISH_INTERVAL_S = 1.0
    SENSOR_STATE_INTERVAL_S = 10.0
    ECG_LOST_AFTER_S = 3.0
    BATCH_S = 0.2
    READY_GRACE_S = 30.0  # READY=1 at the latest this long after start, streaming or not (see _ready_fallback)

    def __init__(self, cfg: BiodConfig, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.stats = AppStats()
        self.topics = Topics(cfg.topic_prefix)
        self._emulator = None
        self._ecg_queue: asyncio.Queue[EcgChunk] | None = None
        self._imu_queue: asyncio.Queue | None = None
        self.ecg_model = load_ecg_model(cfg)
        self.imu_models = load_imu_models(cfg)
        self.store = open_store(cfg)
        loaded = self._load_people()
        self._store_ok = loaded is not None  # False: unreadable; nothing is removed from Home Assistant for it
        self.people = loaded or {}
        self.bio = Biometrics(self.ecg_model, self._engine(), self.imu_models)
        self.bio.gait_placement = cfg.imu.placement
        self.discovery = ha.HubDiscovery(cfg.mqtt.discovery_prefix, cfg.hub.id, cfg.hub.name, self.topics,
                                         activities=ACTIVITY_CLASSES,
                                         sensors=("ecg", "imu") if cfg.imu.enabled else ("ecg",),
                                         battery_sensors=("imu",) if cfg.imu.enabled else ())
        self.enrolment: Enrolment | None = None
        self.ecg_source: EcgSource | None = None
        self.imu_source = None
        self._last_ecg_at = 0.0
        # the one rule for holes, reconnects and box restarts (daemon.ecg_stream); kept here so
        # the stats topic can show how often the DSP started afresh and how much it held
        self.ecg_stream = EcgStream(cfg.ecg.mains_hz, self.ecg_model.pipeline_kwargs() if self.ecg_model else {})
        self.heart_rate = HeartRateSensor(self.HR_PUBLISH_INTERVAL_S)
        self._ready = False
        self._rate_mark = (0, 0, time.monotonic())
        self._store_seen = self._store_key()

    # -- identity ---------------------------------------------------------------------------------
    def _load_people(self) -> dict | None:
        """The enrolled persons, or None when the store cannot be read: not the same as nobody
        enrolled, which removes persons' entities (a backup copied in with ``cp`` is unreadable
        for a moment, and must not delete the household from Home Assistant)."""
        try:
            return self.store.load()
        except StoreError as exc:
            log.error("identity: %s", exc)
            return None

    def _engine(self) -> IdentityEngine:
        model = self.ecg_model.ref if self.ecg_model else None
        # template adaptation re-derives thresholds against the shipped impostor set
        impostors = None
        if self.cfg.identity.adapt:
            try:
                impostors = load_impostors(self.cfg.models_dir or MODELS_DIR)
            except ImpostorsError as exc:
                log.error("identity: %s", exc)
                impostors = None
            if impostors is None:
                log.warning("identity: identity.adapt is on but there is no usable impostor set: templates are not adapted")
            elif model is not None and not impostors.made_with(model):
                log.warning("identity: the impostor set was made with %r, not the installed ECG model %s: templates "
                            "are not adapted (biod doctor says how to fix it)", impostors.model_version, model)
                impostors = None
        try:
            engine = IdentityEngine(self.people, self.cfg.identity.engine_config(), model=model, impostors=impostors)
            if engine.stale:
                log.error("identity: %s enrolled with another ECG model than the installed %s: not identified until "
                          "re-enrolled (`sudo biod calibrate --name NAME` replaces their templates); everyone else is",
                          ", ".join(engine.stale), model)
            return engine
        except StoreError as exc:
            log.error("identity: %s", exc)
            return IdentityEngine({}, self.cfg.identity.engine_config(), model=model)

    def _save_adaptations(self) -> None:
        """Persist the template adaptations the engine made when a wearing session ended
        (``identity.adapt``), so a restart keeps them. The engine already scores with them, so
        the store watch that follows finds nothing new and keeps the engine (and a session that
        started meanwhile) as it is, unless someone else edited the store in between."""
        for a in self.bio.engine.take_adaptations():
            try:
                saved = self.store.update_templates(a.person)
            except StoreError as exc:
                log.error("identity: cannot save %s's adapted templates: %s", a.person.name, exc)
                continue
            if saved is None:
                log.info("identity: %s was removed or re-enrolled meanwhile; adaptation dropped", a.person.name)
            else:
                if saved == a.person and saved.name in self.people:
                    self.people[saved.name] = saved
                log.info("identity: adapted %s's templates from a %d-window session (score %.3f, runner-up %.3f); "
                         "threshold %.3f -> %.3f", saved.name, a.n_windows, a.score, a.runner_up, a.old_threshold,
                         saved.threshold)

    def reload_people(self) -> None:
        """Follow the store. While it cannot be read, the persons loaded before stay (at start:
        nobody is identified, said loudly, until it is fixed)."""
        people = self._load_people()
        if people is None:
            if self._store_ok and self.people:
                log.error("identity: keeping the %d person(s) loaded before until the template store reads again",
                          len(self.people))
            self._store_ok = False
            return
        self._store_ok = True
        if people == self.people:
            # what the engine already scores with (e.g. the adaptation it just made and we
            # saved): rebuilding would only drop the current wearing session's evidence
            return
        self.people = people
        self.bio.engine = self._engine()

    def discovery_messages(self) -> list[Message]:
        return self.discovery.messages(sorted(self.people))

    # -- sources ----------------------------------------------------------------------------------
    # -- main -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        loop = asyncio.get_running_loop()
        self._ecg_queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self._imu_queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        publisher = MqttPublisher(self.cfg.mqtt, self.cfg.topic_prefix, client_id=f"biod-{self.cfg.hub.id}",
                                  discovery=self.discovery_messages)
        spool = EventSpool(self.cfg.state_dir / "spool")
        sender = SpoolSender(spool, publisher)
        sessions = SessionPublisher(EventTracker(), sender, publisher, self.topics, epoch=to_epoch,
                                    record=SessionRecordFile(spool.directory))
        enrol_commands = EnrolCommands(publisher, self.topics,
                                       lambda req: loop.call_soon_threadsafe(self._start_enrolment, req, publisher),
                                       default_seconds=self.cfg.identity.enrol_seconds)
        stats = StatsReporter(publisher, self.topics, lambda: self.stats_snapshot(publisher, spool))
        # retained per-person topics of persons removed while the daemon was not running
        sweep = lambda topic, payload: self._sweep_stale_person(publisher, topic, payload)  # noqa: E731
        if self.cfg.mqtt.discovery:
            publisher.subscribe(self.discovery.person_config_pattern, sweep, retained=True)
        publisher.subscribe(self.topics.person_state_pattern, sweep, retained=True)
        sender.start()
        enrol_commands.start()
        # No enrolment runs in a process that just started: say so, replacing an ``enrolling``
        # state left retained by a daemon that crashed or lost power mid-enrolment (nothing else
        # would ever clear it). Held until the broker connects, and sent before anything newer.
        publisher.publish(enrol_state_message(self.topics, "idle"))
        # Nobody wears the sensors in a process that just started, whatever a run that crashed or
        # lost power left retained (``wearer: Alice`` stayed for ever; the persons' own
        # ``wearing: true`` are corrected by the sweep). Held, so the first session replaces it.
        publisher.publish(wearer_message(self.topics, None))
        # The session such a run left open gets its ``end`` now, spooled (delivered whenever the
        # broker is there) before anything this run observes.
        sessions.end_crashed_session()
        publisher.start()
        stats.start()

        thread_stop = threading.Event()
        threads: list[threading.Thread] = []
        tasks: list[asyncio.Task] = []
        if self.cfg.ecg.enabled:
            handoff = ThreadHandoff(loop, lambda c: self._enqueue(self._ecg_queue, c, "ecg"),
                                    on_drop=self._count_handoff_drop)
            self.ecg_source, self._emulator = open_ecg_source(self.cfg, handoff.put)
            thread = threading.Thread(target=self.ecg_source.run, args=(thread_stop,), name="ecg-source", daemon=True)
            thread.start()
            threads.append(thread)
            tasks.append(asyncio.create_task(self._consume_ecg(publisher, sessions), name="ecg-pipeline"))
        if self.cfg.imu.enabled:
            from daemon.sources.metawear_ble import MetaWearSource

            self.imu_source = MetaWearSource(self.cfg.imu, lambda c: self._enqueue(self._imu_queue, c, "imu"))
            tasks.append(asyncio.create_task(self.imu_source.run(stop), name="imu-source"))
            tasks.append(asyncio.create_task(self._consume_imu(), name="imu-pipeline"))
        tasks.append(asyncio.create_task(self._tick(publisher, sessions, spool), name="tick"))
        tasks.append(asyncio.create_task(self._watchdog(threads, tasks, publisher), name="watchdog"))
        ready_fallback = asyncio.create_task(self._ready_fallback(), name="ready-fallback")  # ends: not watched
        try:
            await stop.wait()
        finally:
            log.info("biod: stopping")
            self.notifier.stopping()
            for task in tasks + [ready_fallback]:
                task.cancel()
            for task in tasks + [ready_fallback]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            thread_stop.set()
            for thread in threads:
                await asyncio.to_thread(thread.join, 5.0)
            if self._emulator is not None:
                self._emulator.close()
            sessions.close(time.monotonic())
            await asyncio.to_thread(sender.flush, 2.0)
            sender.stop()
            stats.stop()
            stats.publish_once()  # the final numbers, retained, for whoever looks after we stopped
            self._abort_enrolment(publisher, "the daemon stopped during the enrolment; nothing was saved: "
                                             "start the enrolment again once biod runs")
            await asyncio.to_thread(publisher.close)
            spool.close()
        return 0

    def _count_handoff_drop(self) -> None:  # source thread; a plain int increment
        self.stats.dropped_chunks += 1

    def _enqueue(self, queue: asyncio.Queue, chunk, kind: str) -> None:
        if queue.full():  # keep the newest data: a live biometric stream has no use for stale samples
            queue.get_nowait()
            if kind == "ecg":
                self.stats.dropped_chunks += 1
            else:
                self.stats.dropped_imu_chunks += 1
        queue.put_nowait(chunk)

    async def _consume_ecg(self, publisher: MqttPublisher, sessions: SessionPublisher) -> None:
        assert self._ecg_queue is not None
        stream = self.ecg_stream
        while True:
            chunk = self._batch(await self._ecg_queue.get())
            self._mark_ready("streaming ECG")
            now = time.monotonic()  # durations only; daemon.clock says why
            self._last_ecg_at = now
            self.stats.ecg_chunks += 1
            self.stats.ecg_samples += len(chunk.samples_mv)
            update = stream.push(chunk, self.ecg_source.health.connects if self.ecg_source else None)
            self.stats.beats += len(update.beats)
            if update.beats and self.stats.first_clean_beat_at is None and update.live:
                self.stats.first_clean_beat_at = now
                log.info("ecg: first clean beat of a wearing session")
            elif not update.live and self.stats.first_clean_beat_at is not None and not self.bio.identity.live:
                self.stats.first_clean_beat_at = None
            for obs in self.bio.on_ecg(update, now):
                self._observe(sessions, obs)
            self._enrolment_ecg(now, update.live, publisher)
            self._save_adaptations()
            await asyncio.sleep(self.BATCH_S)  # let ~0.2 s of frames gather for the next push
            if update.heart_rate_bpm is not None and update.live:
                self.stats.heart_rate_bpm = update.heart_rate_bpm
            payload = self.heart_rate.on_update(update.heart_rate_bpm, update.live, update.heart_rate_at_s, now)
            if payload is not None:
                publisher.publish(Message(self.topics.sensor_state("heart_rate"), payload))

    def _batch(self, first: EcgChunk) -> EcgChunk:
        """Join the frames already waiting into one chunk. The DSP's cost is mostly per call,
        so pushing ~0.2 s at a time instead of every 20 ms frame cuts CPU several-fold for
        ~0.2 s more latency. Frames join only when their sequence numbers follow on (nothing lost
        on the wire or dropped in the hand-off between them) and the lead validity is unchanged,
        so the result is exactly what frame-by-frame pushing gives."""
        assert self._ecg_queue is not None
        parts = [first]
        while not self._ecg_queue.empty():
            nxt = self._ecg_queue._queue[0]  # peek: stop at a gap or a lead change
            if (frames_missing(parts[-1].seq, nxt.seq) or nxt.device_restarted or nxt.rate_hz != first.rate_hz
                    or nxt.samples_mv.shape[1] != first.samples_mv.shape[1]
                    or not np.array_equal(nxt.lead_valid, first.lead_valid)):
                break
            parts.append(self._ecg_queue.get_nowait())
        if len(parts) == 1:
            return first
        return EcgChunk(seq=parts[-1].seq, t_device_s=first.t_device_s,
                        samples_mv=np.concatenate([p.samples_mv for p in parts]), lead_valid=first.lead_valid,
                        rate_hz=first.rate_hz, lost_frames_before=first.lost_frames_before,
                        device_restarted=first.device_restarted, frames=sum(p.frames for p in parts))

    def _clear_heart_rate(self, publisher: MqttPublisher) -> None:
        """The ECG stopped arriving: Home Assistant's heart rate goes to unknown (HeartRateSensor)."""
        payload = self.heart_rate.clear()
        if payload is not None:
            publisher.publish(Message(self.topics.sensor_state("heart_rate"), payload))

    @staticmethod
    def _observe(sessions: SessionPublisher, obs) -> None:
        """One identity verdict -> events (spooled and published), each logged: the latency
        benchmark and a person reading the journal both go by these lines."""
        for event in sessions.observe(obs):
            log.info("event %s: %s (confidence %.2f)", event.type, event.after.wearer, event.after.confidence)

    async def _consume_imu(self) -> None:
        assert self._imu_queue is not None
        def new_pipeline() -> SensorImuPipeline:
            return SensorImuPipeline(self.cfg.imu.acc_range_g, self.cfg.imu.gyro_range_dps, self.cfg.imu.odr_hz)

        pipeline = new_pipeline()
        said: set[str] = set()
        while True:
            chunk = await self._imu_queue.get()
            self._mark_ready("streaming IMU")
            self.stats.imu_chunks += 1
            self.stats.imu_samples += len(chunk.t_s)
            try:
                self.bio.on_imu(pipeline.push(chunk.t_s, chunk.acc_g, chunk.gyro_dps))
            except Exception as exc:  # noqa: BLE001 - see WHY
                # WHY: the IMU is evidence beside the ECG; a fault in its processing (a bug on
                # some window, as _stride_peak had) ended this task, the watchdog was withheld and
                # systemd restarted the whole daemon, ending the ECG wearer's session too. The
                # chunk is dropped, the IMU path starts afresh, and each kind of fault is logged
                # once with its traceback.
                self.stats.imu_errors += 1
                kind = f"{type(exc).__name__}: {exc}"
                if kind not in said:
                    said.add(kind)
                    log.error("imu: processing failed, chunk dropped and the IMU path restarted: %s", kind,
                              exc_info=exc)
                pipeline = new_pipeline()

    async def _tick(self, publisher: MqttPublisher, sessions: SessionPublisher, spool: EventSpool) -> None:
        """Time-driven work: end identity when the ECG stream stops, expire sessions, sensor state,
        and systemd's STATUS= line when it changes."""
        last_sensor = 0.0
        last_ecg_key: tuple[bool, str | None] | None = None
        status = ""
        last = (self.stats.ecg_samples, self.stats.imu_samples, time.monotonic())
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if self._last_ecg_at and now - self._last_ecg_at > self.ECG_LOST_AFTER_S:
                obs = self.bio.ecg_lost(now)
                self.stats.first_clean_beat_at = None
                self._clear_heart_rate(publisher)
                if obs is not None:
                    self._observe(sessions, obs)
                self._save_adaptations()
                # No samples is no live ECG for an enrolment too: a box unplugged and plugged
                # back on someone else must end it, as electrodes coming off do.
                self._enrolment_ecg(now, False, publisher)
            sessions.expire(now)
            if self._ready and (line := self.status_line(publisher, spool)) != status:
                status = line
                self.notifier.status(line)
            self._watch_store(publisher)
            if self.enrolment is not None and self.enrolment.expired(now):
                self._finish_enrolment(publisher)
            mono = time.monotonic()
            h = self.ecg_source.health if self.ecg_source else None
            streaming = bool(h and h.state == "streaming")
            ecg_key = (streaming, self.bio.signal_problem if streaming else NO_SIGNAL)
            # WHY also on a change: "ECG signal" is what the person fixing the electrodes looks
            # at; at the 10 s interval alone it said lead_off for up to 10 s after the fix
            if mono - last_sensor >= self.SENSOR_STATE_INTERVAL_S or ecg_key != last_ecg_key:
                dt = max(mono - last[2], 1e-3)
                ecg_rate = (self.stats.ecg_samples - last[0]) / dt
                imu_rate = (self.stats.imu_samples - last[1]) / dt
                last, last_sensor, last_ecg_key = (self.stats.ecg_samples, self.stats.imu_samples, mono), mono, ecg_key
                publisher.publish(sensor_state_message(self.topics, SensorState(
                    "ecg", streaming, None, self.bio.quality, ecg_rate, signal_problem=ecg_key[1])))
                if self.imu_source is not None:
                    ih = self.imu_source.health
                    publisher.publish(sensor_state_message(self.topics, SensorState(
                        "imu", ih.state == "streaming", ih.battery_percent, None, imu_rate)))

    def _mark_ready(self, status: str) -> None:
        if not self._ready:
            self._ready = True
            self.notifier.ready(status)

    def status_line(self, publisher: MqttPublisher, spool: EventSpool) -> str:
        """What ``systemctl status biod`` shows: each sensor's state and the broker's. WHY the
        broker: with it away the daemon is healthy (events are spooled, nothing is lost) but Home
        Assistant hears nothing, and the person looking needs to see that, and where, at a glance."""
        def sensor(name: str, h) -> str:
            return f"{name} {h.state}" + (f" ({h.last_error})" if h.state != "streaming" and h.last_error else "")

        parts = []
        if self.ecg_model is None and self.cfg.ecg.enabled:
            # WHY first: heart rate still flows, so nothing else shows that nobody can be named
            parts.append("identity OFF: the ECG model cannot be used (run biod doctor)")
        if self.ecg_source is not None:
            parts.append(sensor("ECG", self.ecg_source.health))
        if self.imu_source is not None:
            parts.append(sensor("IMU", self.imu_source.health))
        broker = f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}"
        if publisher.connected:
            parts.append(f"MQTT connected to {broker}")
        else:
            parts.append(f"MQTT not connected ({publisher.stats.last_error or f'connecting to {broker}'})")
        if pending := len(spool):
            parts.append(f"{pending} event{'s' if pending != 1 else ''} spooled until the broker takes them")
        return "; ".join(parts)

    def _waiting_for(self) -> str:
        def state(h) -> str:
            return h.state + (f": {h.last_error}" if h.last_error else "")

        parts = []
        if self.ecg_source is not None:
            parts.append(f"ECG {self.ecg_source.describe} ({state(self.ecg_source.health)})")
        if self.imu_source is not None:
            parts.append(f"{self.imu_source.describe} ({state(self.imu_source.health)})")
        return "; ".join(parts) or "no sensor enabled"

    async def _ready_fallback(self) -> None:
        """READY=1 even when no sensor streams within READY_GRACE_S. WHY: a box unplugged at boot
        (or a board out of range) is not a failed start: the sources keep retrying by themselves,
        MQTT and Home Assistant stay served, and a restart by systemd would not bring the device
        back. Without this, systemd would kill and restart the daemon every start timeout.
        STATUS= says what is missing (``systemctl status biod`` shows it)."""
        await asyncio.sleep(self.READY_GRACE_S)
        if not self._ready:
            waiting = self._waiting_for()
            log.warning("biod: no sensor streams after %.0f s; running and retrying: %s", self.READY_GRACE_S, waiting)
            self._mark_ready(f"running; waiting for {waiting}")

    async def _watchdog(self, threads: list[threading.Thread], tasks: list[asyncio.Task],
                        publisher: MqttPublisher | None = None) -> None:
        """WATCHDOG=1 only while healthy: loop responsive, source threads, consumers and paho's
        network thread alive, and not wedged (claiming to stream with no frame for three stall
        timeouts). An unplugged device or an absent broker is not unhealthy: the source and paho
        are retrying and a restart would not help."""
        interval = self.notifier.watchdog_interval_s or 5.0
        wedge_s = self.cfg.ecg.stall_timeout_s * 3
        reported: set[str] = set()
        while True:
            await asyncio.sleep(interval)
            h = self.ecg_source.health if self.ecg_source else None
            wedged = bool(h and h.state == "streaming" and h.last_frame_at and time.monotonic() - h.last_frame_at > wedge_s)
            dead = [t.name for t in threads if not t.is_alive()] + [
                t.get_name() for t in tasks if t.done() and t is not asyncio.current_task()]
            if publisher is not None and not publisher.network_thread_alive:
                dead.append("mqtt-network")
            for t in tasks:
                if t.done() and not t.cancelled() and t.get_name() not in reported and t.exception() is not None:
                    reported.add(t.get_name())
                    log.error("biod: %s stopped on an error", t.get_name(), exc_info=t.exception())
            if not dead and not wedged:
                self.notifier.watchdog()
            else:
                log.error("biod: unhealthy (stopped: %s, wedged=%s); withholding the watchdog", dead, wedged)

    def _store_key(self) -> tuple[int, ...] | None:
        """What tells the store changed: inode and size (a save renames a new file in), mtime, and
        ctime. WHY ctime: a store the daemon could not read is mended with chmod/chown, which
        change ctime only; keyed on mtime alone, the daemon identified nobody until restarted
        (review, 2026-11-24)."""
        try:
            st = self.cfg.store_path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _watch_store(self, publisher: MqttPublisher) -> None:
        """`biod calibrate` / `biod people` change the store while we run: follow it, and add or
        remove the persons' Home Assistant entities and retained state to match."""
        seen = self._store_key()
        if seen == self._store_seen:
            return
        self._store_seen = seen
        before = set(self.people)
        self.reload_people()
        if not self._store_ok:
            return  # unreadable (being written, damaged): nobody was removed
        after = set(self.people)
        for name in sorted(before - after):
            log.info("identity: %s was removed; deleting their Home Assistant entities", name)
            for msg in self._person_entities(name, remove=True) + [person_state_removal(self.topics, name)]:
                publisher.publish(msg)
        for name in sorted(after - before):
            log.info("identity: %s was enrolled", name)
            for msg in self._person_entities(name):
                publisher.publish(msg)

    def _person_entities(self, name: str, remove: bool = False) -> list[Message]:
        """A person's Home Assistant discovery configs, or their removal; none with
        ``mqtt.discovery: false`` (Home Assistant would create entities nobody asked for, and
        nothing would ever remove them)."""
        if not self.cfg.mqtt.discovery:
            return []
        return self.discovery.person_removal(name) if remove else self.discovery.person_messages(name)

    def _sweep_stale_person(self, publisher: MqttPublisher, topic: str, payload: bytes) -> None:
        """Clear a retained per-person topic (discovery config or state) of someone no longer
        enrolled. WHY: `biod people remove` while the daemon is stopped (or a store restored
        from a backup) leaves that person's Home Assistant entity and last state retained on the
        broker for ever; the running daemon's own removal path (``_watch_store``) never sees it.
        The broker hands every retained message over on (re)subscribe, so each connect sweeps.
        Runs on paho's thread and only reads the enrolled names (the loop thread replaces the
        dict or updates existing entries, never resizes it in place)."""
        if not payload or not self._store_ok:
            return  # already cleared, or we cannot know who is enrolled
        state_slug = self.topics.person_slug_of(topic)  # None for a discovery config
        slug = self.discovery.person_slug_of(topic) or state_slug
        if slug is None:
            return
        if slug in {slugify(name) for name in self.people}:
            if state_slug is not None:
                self._end_stale_wearing(publisher, topic, payload)
            return
        log.info("mqtt: %s belongs to %r, who is not enrolled on this hub; clearing it", topic, slug)
        publisher.publish(Message(topic, "", retain=True, qos=1))

    @staticmethod
    def _end_stale_wearing(publisher: MqttPublisher, topic: str, payload: bytes) -> None:
        """An enrolled person's retained state says ``wearing: true`` but this process never
        published it: a run that crashed or lost power mid-session left it, and Home Assistant
        would show them wearing the sensors until their next session. Say they are not, keeping
        when they were last seen; a state this process publishes on that topic always wins."""
        try:
            state = json.loads(payload)
        except ValueError:
            return
        if not (isinstance(state, dict) and state.get("wearing") is True):
            return
        state.update(wearing=False, activity=None, heart_rate_bpm=None)
        if publisher.publish_unless_written(Message(topic, json.dumps(state, separators=(",", ":")), retain=True, qos=1)):
            log.info("mqtt: %s said 'wearing' from a run that ended without saying otherwise; set it to not wearing", topic)

    # -- enrolment from Home Assistant ------------------------------------------------------------
    def _start_enrolment(self, req: EnrolRequest, publisher: MqttPublisher) -> None:
        if self.ecg_model is None:
            log.error("enrol: no usable ECG model; cannot enrol %s", req.name)
            publisher.publish(enrol_state_message(self.topics, "refused", req.name, reason=(
                "no usable ECG model on the hub: run biod doctor, re-install biod")))
            return
        if self.enrolment is not None:
            # Answered, so whoever asked is not left waiting; NOT retained, so the retained state
            # keeps saying whose enrolment runs (a retained refusal would hide it until it ends).
            busy = (f"already enrolling {self.enrolment.name} until {iso8601(to_epoch(self.enrolment.deadline))}: "
                    f"send the request for {req.name} again after that")
            log.warning("enrol: %s refused: %s", req.name, busy)
            publisher.publish(enrol_state_message(self.topics, "refused", req.name, reason=busy, retain=False))
            return
        # what would refuse the enrolment at its end is said now, before anyone wears the electrodes for it
        problem = impostors = None
        try:
            _, impostors = check_before_recording(self.store, self.cfg.identity.engine_config(), self.ecg_model.ref,
                                                  self.cfg.models_dir or MODELS_DIR, req.name)
        except EnrolmentRefused as exc:
            problem = str(exc)
        if problem is not None:
            log.warning("enrol: %s refused: %s", req.name, problem)
            publisher.publish(enrol_state_message(self.topics, "refused", req.name, reason=problem))
            return
        self.enrolment = Enrolment(req.name, self.bio.engine, impostors, seconds=req.seconds, started=time.monotonic())
        self.bio.embeddings_sink = self.enrolment.sink
        self.bio.gait_sink = self.enrolment.gait_sink
        log.info("enrol: collecting ECG of %s for %.0f s", req.name, req.seconds)
        publisher.publish(enrol_state_message(self.topics, "enrolling", req.name, to_epoch(self.enrolment.deadline)))

    def _enrolment_ecg(self, now: float, live: bool, publisher: MqttPublisher) -> None:
        """Tell an open enrolment whether the ECG is live; end it (refused) when it was not for too long."""
        if self.enrolment is not None:
            self.enrolment.on_ecg(now, live)
            if self.enrolment.interrupted:
                self._finish_enrolment(publisher)

    def _abort_enrolment(self, publisher: MqttPublisher, reason: str) -> None:
        """End an open enrolment without saving it, and say so (retained). WHY: its retained
        ``enrolling`` state would otherwise outlive the daemon, and Home Assistant (or an
        automation waiting for ``done``/``refused``) would wait for an enrolment nobody runs."""
        enrolment, self.enrolment = self.enrolment, None
        if enrolment is None:
            return
        self.bio.embeddings_sink = None
        self.bio.gait_sink = None
        log.warning("enrol: %s refused: %s", enrolment.name, reason)
        publisher.publish(enrol_state_message(self.topics, "refused", enrolment.name, reason=reason))

    def _finish_enrolment(self, publisher: MqttPublisher) -> None:
        enrolment, self.enrolment = self.enrolment, None
        self.bio.embeddings_sink = None
        self.bio.gait_sink = None
        assert enrolment is not None
        try:
            report = enrolment.finish()
        except Exception as exc:  # an enrolment that cannot be built must not end the daemon's tick task
            log.error("enrol: building %s's templates failed", enrolment.name, exc_info=True)
            publisher.publish(enrol_state_message(self.topics, "refused", enrolment.name, reason=(
                f"the templates could not be built ({type(exc).__name__}: {exc}); nothing was saved: run biod doctor")))
            return
        if report.accepted and report.person is not None:
            try:
                replaced = self.store.add(report.person, replace_stale=True)
            except StoreError as exc:
                log.error("enrol: could not save %s: %s", enrolment.name, exc)
                publisher.publish(enrol_state_message(self.topics, "refused", enrolment.name, reason=str(exc)))
                return
            if replaced is not None:
                log.info("enrol: %s's templates of another ECG model were replaced", replaced.name)
            self.reload_people()
            for msg in self._person_entities(enrolment.name):
                publisher.publish(msg)
            log.info("enrol: %s enrolled (threshold %.3f, expected FAR %.2f%%, FRR %.2f%%)", enrolment.name,
                     report.threshold, 100 * report.expected_far, 100 * report.expected_frr)
            publisher.publish(enrol_state_message(self.topics, "done", enrolment.name))
        else:
            log.warning("enrol: %s refused: %s", enrolment.name, report.reason)
            publisher.publish(enrol_state_message(self.topics, "refused", enrolment.name, reason=report.reason))

    # -- stats ------------------------------------------------------------------------------------
    def _rates_since_last_report(self) -> tuple[float, float]:
        """Samples per second that arrived since the previous stats report (or the start): what
        the devices really deliver, so a box streaming 250 Hz instead of 500, or a BLE link
        losing packets, shows as a number and not only as a count."""
        now = time.monotonic()
        ecg0, imu0, t0 = self._rate_mark
        self._rate_mark = (self.stats.ecg_samples, self.stats.imu_samples, now)
        dt = max(now - t0, 1e-3)
        return round((self.stats.ecg_samples - ecg0) / dt, 1), round((self.stats.imu_samples - imu0) / dt, 1)

    def stats_snapshot(self, publisher: MqttPublisher, spool: EventSpool) -> dict:
        h = self.ecg_source.health if self.ecg_source else None
        ih = self.imu_source.health if self.imu_source else None
        ms = self.bio.stats.inference_ms_median()
        ecg_rate, imu_rate = self._rates_since_last_report()
        return {
            "version": VERSION,
            "uptime_s": round(time.monotonic() - self.stats.started_at, 1),
            # False: the ECG model could not be loaded; heart rate goes on, identity does not
            "identity_available": self.ecg_model is not None,
            "ecg": None if h is None else {
                "state": h.state, "rate_hz": ecg_rate, "frames": h.frames, "lost_frames": h.lost_frames, "crc_errors": h.crc_errors,
                "protocol_errors": h.protocol_errors, "resyncs": h.resyncs, "reconnects": max(h.connects - 1, 0), "samples": self.stats.ecg_samples,
                "dropped_chunks": self.stats.dropped_chunks, "last_error": h.last_error,
                "dsp_restarts": self.ecg_stream.restarts,
                "lost_s": round(self.ecg_stream.lost_s, 3)},
            "imu": None if ih is None else {
                "state": ih.state, "rate_hz": imu_rate, "samples": self.stats.imu_samples, "lost_samples": ih.lost_samples,
                "reconnects": ih.reconnects, "battery_pct": ih.battery_percent, "dropped_chunks": self.stats.dropped_imu_chunks,
                "processing_errors": self.stats.imu_errors},
            "beats": self.stats.beats,
            "windows": self.bio.stats.ecg_windows,
            "clean_windows": self.bio.stats.clean_windows,
            "inference_ms_median": None if ms is None else round(ms, 3),
            "enrolled": len(self.people),
            "spool_pending": len(spool),
            "spool_dropped": spool.stats.dropped_full,
            "mqtt_dropped_offline": publisher.stats.dropped_offline,
        }

