"""What is published where: the topic layout and the retained state payloads, as pure data.

docs/mqtt.md is the contract; this module is its implementation, in one place so that a topic
is spelled once. Builders return ``Message`` values and never touch the network, so every
payload is testable without a broker. Also here: ``SessionPublisher`` (tracker -> spool ->
retained state, the daemon's one call per identity verdict), the enrol command parser (the only
topics the hub listens to besides Home Assistant's birth message) and ``StatsReporter``.
"""
from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from daemon.events import UNKNOWN, Event, EventTracker, Observation, SessionState
from daemon.identity.store import name_problem, slugify  # one name rule, one slug rule: store, topics, entity ids
from daemon.publish.mqtt import Message
from daemon.publish.spool import SessionRecordFile

log = logging.getLogger(__name__)

VERSION = "0.1.0"
RESERVED_SENSOR_KEYS = frozenset({"heart_rate"})  # <prefix>/sensor/heart_rate/state carries the live heart rate


def _json(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), sort_keys=False)


def iso8601(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with an offset: what Home Assistant's ``timestamp`` device class parses."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Topics:
    """The topic layout under the hub's prefix (default ``biod/<hub.id>``)."""

    prefix: str

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    @property
    def events(self) -> str:
        return f"{self.prefix}/events"

    @property
    def wearer(self) -> str:
        return f"{self.prefix}/wearer"

    @property
    def stats(self) -> str:
        return f"{self.prefix}/stats"

    @property
    def enrol_set(self) -> str:
        return f"{self.prefix}/enrol/set"

    @property
    def enrol_name_set(self) -> str:
        return f"{self.prefix}/enrol/name/set"

    @property
    def enrol_name(self) -> str:
        return f"{self.prefix}/enrol/name"

    @property
    def enrol_state(self) -> str:
        return f"{self.prefix}/enrol/state"

    def sensor_state(self, key: str) -> str:
        return f"{self.prefix}/sensor/{key}/state"

    def person_state(self, slug: str) -> str:
        return f"{self.prefix}/person/{slug}/state"

    @property
    def person_state_pattern(self) -> str:
        return f"{self.prefix}/person/+/state"

    def person_slug_of(self, topic: str) -> str | None:
        """The slug in a ``<prefix>/person/<slug>/state`` topic, else None."""
        head, sep, rest = topic.partition(f"{self.prefix}/person/")
        if head or not sep or not rest.endswith("/state") or "/" in rest[:-len("/state")]:
            return None
        return rest[:-len("/state")] or None


# -- retained state ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PersonState:
    name: str
    wearing: bool
    activity: str | None = None
    heart_rate_bpm: float | None = None
    session_id: str | None = None
    last_seen: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wearing": self.wearing,
            "activity": self.activity,
            "heart_rate_bpm": None if self.heart_rate_bpm is None else round(float(self.heart_rate_bpm), 1),
            "session_id": self.session_id,
            "last_seen": iso8601(self.last_seen),
        }


#: ``SensorState.signal_problem`` of a sensor that sends nothing (unplugged, not streaming)
NO_SIGNAL = "no_signal"


@dataclass(frozen=True)
class SensorState:
    """One physical sensor (``ecg`` box, ``imu`` MetaMotion): what Home Assistant shows as its health."""

    sensor: str
    connected: bool
    battery_pct: float | None = None
    signal_quality: float | None = None  # 0..1, from the DSP quality index
    sample_rate_hz: float | None = None  # measured, not nominal
    #: why the newest window failed the quality check (a ``daemon.dsp.quality.REASONS`` name:
    #: electrodes off, frames lost on the link, motion, ...), ``NO_SIGNAL`` when the sensor
    #: sends nothing, None when the signal is fine. WHY: "signal quality 0 %" does not tell a
    #: household whether to press the electrodes, check the cable or sit still.
    signal_problem: str | None = None

    def __post_init__(self) -> None:
        if self.sensor in RESERVED_SENSOR_KEYS or not re.fullmatch(r"[a-z0-9_]{1,32}", self.sensor):
            raise ValueError(f"sensor key {self.sensor!r} must be 1-32 of a-z, 0-9, '_' and not one of {sorted(RESERVED_SENSOR_KEYS)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "battery_pct": None if self.battery_pct is None else round(float(self.battery_pct)),
            "signal_quality": None if self.signal_quality is None else round(float(self.signal_quality), 3),
            "sample_rate_hz": None if self.sample_rate_hz is None else round(float(self.sample_rate_hz), 1),
            "signal_problem": self.signal_problem,
        }


class HeartRateSensor:
    """What ``<prefix>/sensor/heart_rate/state`` says, decided from each ECG update (no I/O).

    A value at most every ``interval_s`` and only from a clean beat newer than the one behind the
    last value. WHY: while the wearer moves, no beat may be clean for seconds and the stream
    stays live; repeating the last clean median then showed a rate up to 8 s old as current.
    Without fresh beats nothing is sent and Home Assistant's ``expire_after`` shows unknown.
    ``"None"`` (unknown) once the ECG stops being live, once per shown value: the rate is not
    retained, and the last one stayed on screen for hours after the electrodes came off.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = float(interval_s)
        self._sent_at = -math.inf
        self._beat: float | None = None  # EcgUpdate.heart_rate_at_s behind the last value sent
        self.shown = False

    def on_update(self, bpm: float | None, live: bool, beat_at_s: float | None, now: float) -> str | None:
        """The payload to publish now, or None. ``now``: a monotonic clock, seconds."""
        if not live:
            return self.clear()
        if bpm is None or beat_at_s == self._beat or now - self._sent_at < self.interval_s:
            return None
        self._sent_at, self._beat, self.shown = now, beat_at_s, True
        return f"{bpm:.1f}"

    def clear(self) -> str | None:
        """``"None"`` if a value is on screen, else None (nothing to send)."""
        if not self.shown:
            return None
        self.shown, self._beat = False, None
        return "None"


def person_state_message(topics: Topics, state: PersonState) -> Message:
    return Message(topics.person_state(slugify(state.name)), _json(state.to_dict()), retain=True, qos=1)


def person_state_removal(topics: Topics, name: str) -> Message:
    """Clear the retained state of a deleted/renamed person (an empty retained payload deletes it)."""
    return Message(topics.person_state(slugify(name)), "", retain=True, qos=1)


def sensor_state_message(topics: Topics, state: SensorState) -> Message:
    return Message(topics.sensor_state(state.sensor), _json(state.to_dict()), retain=True, qos=1)


def wearer_message(topics: Topics, session: SessionState | None) -> Message:
    """``<prefix>/wearer``: who wears the hub's sensors now (``wearer: null`` when nobody)."""
    if session is None or session.end_time is not None:
        payload: dict[str, Any] = {"wearer": None, "slug": None, "confidence": None, "activity": None,
                                   "session_id": None, "since": None}
    else:
        payload = {
            "wearer": session.wearer,
            "slug": slugify(session.wearer),
            "confidence": round(float(session.confidence), 3),
            "activity": session.activity,
            "session_id": session.id,
            "since": iso8601(session.start_time),
        }
    return Message(topics.wearer, _json(payload), retain=True, qos=1)


def messages_for_event(topics: Topics, event: Event) -> list[Message]:
    """The retained state an event changes: the wearer topic and the wearer's person topic.

    ``unknown`` wearers have no person topic (there is nobody to attach it to)."""
    after = event.after
    ended = event.type == "end"
    out = [wearer_message(topics, None if ended else after)]
    if event.before is not None and event.before.wearer != after.wearer and event.before.wearer != UNKNOWN:
        out.append(person_state_message(topics, PersonState(event.before.wearer, False, last_seen=after.last_seen)))
    if after.wearer != UNKNOWN:
        out.append(person_state_message(topics, PersonState(
            name=after.wearer, wearing=not ended, activity=None if ended else after.activity,
            heart_rate_bpm=None if ended else after.heart_rate_bpm, session_id=after.id,
            last_seen=after.end_time if ended else after.last_seen)))
    return out


SESSION_RECORD_EVERY_S = 10.0  # how stale a crashed session's end time may be, at most (plus one observation)
CRASH_END_REASON = "daemon_restart"
_RECORD_VERSION = 1


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a time")
    return float(value)


def _session_state(doc: Any) -> SessionState:
    """A ``SessionState.to_dict()`` read back; ValueError/TypeError/KeyError when it is not one."""
    if not isinstance(doc, dict):
        raise TypeError(f"a session state must be an object, not {type(doc).__name__}")
    state = SessionState(**doc)
    if not (isinstance(state.id, str) and state.id and isinstance(state.wearer, str) and state.wearer):
        raise ValueError("no session id or wearer")
    if _finite(state.last_seen, "last_seen") < _finite(state.start_time, "start_time") or state.end_time is not None:
        raise ValueError("not the state of an open session")
    if not isinstance(state.sensors, dict):
        raise TypeError("sensors must be an object")
    return state


def _parse_session_record(doc: Any) -> tuple[int, SessionState, SessionState]:
    """(number of the session's last event, its state in that event, its latest state)."""
    if not isinstance(doc, dict) or doc.get("version") != _RECORD_VERSION:
        raise ValueError(f"not a version-{_RECORD_VERSION} record")
    n = doc["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"event number {n!r}")
    before, after = _session_state(doc["before"]), _session_state(doc["after"])
    if before.id != after.id:
        raise ValueError("two sessions in one record")
    return n, before, after


class SessionPublisher:
    """The one call the daemon makes per identity verdict: track sessions, spool the events (on
    disk before anything is sent), and publish the retained state they change.

    ``sender`` is a ``SpoolSender`` (anything with ``submit(topic, event_dict)``), ``publisher`` an
    ``MqttPublisher``. ``observe`` fsyncs once per event (rare), so calling it on the event loop is fine.

    ``epoch`` turns the tracker's times into the epoch seconds consumers read: the daemon tracks on
    the monotonic clock (``daemon.clock.to_epoch``); without it the times go out as given.

    ``record`` keeps the open session on disk so that the next run can end it when this one
    dies mid-session (``end_crashed_session``): written before each of the session's events is
    spooled, again at most every ``record_every_s`` of observations (the end time a crash leaves
    is at most that stale), and removed once its ``end`` is spooled. WHY before: a crash between
    the two then leaves a record whose event number is ahead of the spool, never behind it, so
    the end sent for it cannot reuse an ``event_id`` consumers already have (and dedupe away)."""

    def __init__(self, tracker: EventTracker, sender: Any, publisher: Any, topics: Topics,
                 epoch: Callable[[float], float] | None = None, record: SessionRecordFile | None = None,
                 record_every_s: float = SESSION_RECORD_EVERY_S) -> None:
        self.tracker = tracker
        self._sender = sender
        self._publisher = publisher
        self._topics = topics
        self._epoch = epoch
        self._record = record
        self._record_every_s = record_every_s
        self._recorded_at = float("-inf")  # tracker time of the last record write
        self._last_sent: tuple[int, SessionState] | None = None  # the open session's last event: (n, its state in epoch s)
        self._record_failing = False
        #: session id -> its start_time in epoch s as last published. WHY: the monotonic-to-epoch
        #: offset is re-read at every conversion, so the same start moved by microseconds between
        #: the events of one session; it is kept unless the clock really stepped (NTP on a Pi
        #: without RTC), when it follows the corrected clock so the duration stays what elapsed
        self._start_epoch: dict[str, float] = {}

    def observe(self, obs: Observation) -> list[Event]:
        events = self._emit(self.tracker.observe(obs))
        self._refresh_record(obs.t)
        return events

    def expire(self, now: float) -> list[Event]:
        """Call every few seconds: ends a session whose observations stopped arriving."""
        return self._emit(self.tracker.expire(now))

    def close(self, now: float) -> list[Event]:
        """On shutdown, before the sender and the publisher stop: ends the open session."""
        return self._emit(self.tracker.close(now))

    def end_crashed_session(self) -> Event | None:
        """At start, before anything is observed: the ``end`` of the session a previous run left
        open (it crashed or lost power), spooled and published like any end, or None.

        The end is dated by the last observation that run recorded, carries ``reason:
        "daemon_restart"`` and the event number after the last one recorded. A crash after the
        run spooled its own end but before it removed the record gives the same ``event_id``
        twice, which consumers dedupe."""
        if self._record is None:
            return None
        found = self._record.load(_parse_session_record)
        if found is None:
            return None
        n, before, after = found
        end = Event(id=after.id, event_id=f"{after.id}:{n + 1}", type="end", before=before,
                    after=replace(after, end_time=after.last_seen), reason=CRASH_END_REASON)
        self._send(end)
        log.warning("events: the last run ended without ending %s's wearing session %s (a crash or a power cut); "
                    "sent its end, dated %s (the last observation that run recorded)",
                    after.wearer, after.id, iso8601(after.last_seen))
        self._clear_record()
        return end

    def _emit(self, events: list[Event]) -> list[Event]:
        for event in events:
            stamped = self._stamped(event)
            if event.type != "end":
                self._last_sent = (event.number, stamped.after)
                self._save_record(stamped.after, event.after.last_seen)
            self._send(stamped)
            if event.type == "end":
                self._last_sent = None
                self._clear_record()
                self._start_epoch.pop(event.after.id, None)
        return events

    def _send(self, stamped: Event) -> None:
        """Spool ``stamped`` (times already in epoch seconds) and publish the retained state it changes."""
        try:
            self._sender.submit(self._topics.events, stamped.to_dict())
        except (sqlite3.Error, OSError) as exc:
            # A full or failing state_dir must not end the ECG pipeline (the wearer's state
            # would stop too): the event goes straight to paho, without the spool's
            # guarantee (lost if the broker is away and the daemon stops), and it is said.
            log.error("spool: could not store the %s event of session %s (%s); sent it without the spool: "
                      "free space in state_dir or fix its permissions", stamped.type, stamped.after.id, exc)
            self._publisher.publish(Message(self._topics.events, _json(stamped.to_dict()), retain=False, qos=1),
                                    queue_if_offline=True)
        for msg in messages_for_event(self._topics, stamped):
            self._publisher.publish(msg)

    # -- the open-session record -------------------------------------------------------------------
    def _refresh_record(self, t: float) -> None:
        """Move the record's last observation on, at most every ``record_every_s`` (an fsync each)."""
        current = self.tracker.session
        if current is None or self._last_sent is None or t - self._recorded_at < self._record_every_s:
            return
        self._save_record(self._stamp_state(current), t)

    def _save_record(self, current: SessionState, t: float) -> None:
        if self._record is None or self._last_sent is None:
            return
        n, sent = self._last_sent
        try:
            self._record.save({"version": _RECORD_VERSION, "n": n, "before": sent.to_dict(), "after": current.to_dict()})
        except OSError as exc:
            if not self._record_failing:
                log.error("events: cannot record the open wearing session in %s (%s); if the daemon dies now, that "
                          "session gets no end event: free space in state_dir or fix its permissions",
                          self._record.path, exc.strerror or exc)
            self._record_failing = True
            # An older record would give the session's end an event number it already used.
            self._clear_record()
            self._recorded_at = t  # tried again no sooner than a good write would be
            return
        if self._record_failing:
            log.info("events: recording the open wearing session in %s works again", self._record.path)
        self._record_failing = False
        self._recorded_at = t

    def _clear_record(self) -> None:
        if self._record is None:
            return
        try:
            self._record.clear()
        except OSError as exc:
            log.error("events: cannot remove %s (%s); the next start may send an end for a session that ended: "
                      "fix state_dir's permissions", self._record.path, exc.strerror or exc)
        self._recorded_at = float("-inf")

    # -- times -------------------------------------------------------------------------------------
    def _stamp_state(self, s: SessionState) -> SessionState:
        epoch = self._epoch
        if epoch is None:
            return s
        start, now = self._start_epoch.get(s.id), epoch(s.start_time)
        if start is None or abs(now - start) > CLOCK_STEP_S:
            start = self._start_epoch[s.id] = now
        return replace(s, start_time=start, last_seen=epoch(s.last_seen),
                       end_time=None if s.end_time is None else epoch(s.end_time))

    def _stamped(self, event: Event) -> Event:
        """The event with its times in epoch seconds, converted now, as it leaves the process."""
        if self._epoch is None:
            return event
        return replace(event, before=None if event.before is None else self._stamp_state(event.before),
                       after=self._stamp_state(event.after))


#: a change of the monotonic-to-epoch offset larger than this is a clock step, not jitter
CLOCK_STEP_S = 1.0


# -- enrol command -------------------------------------------------------------------------------
ENROL_DEFAULT_S = 90
ENROL_MAX_S = 600


@dataclass(frozen=True)
class EnrolRequest:
    name: str
    seconds: int


class EnrolCommandError(ValueError):
    """A malformed enrol command, phrased for the person who sent it."""


def parse_enrol_command(payload: bytes | str, current_name: str | None, default_seconds: float = ENROL_DEFAULT_S) -> EnrolRequest:
    """``<prefix>/enrol/set`` accepts ``PRESS`` (Home Assistant's button: use the name last set on
    ``<prefix>/enrol/name/set``) or JSON ``{"name": "Alice", "seconds": 90}`` (scripts, automations)."""
    text = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else payload
    text = text.strip()
    if text == "PRESS":
        if not current_name:
            raise EnrolCommandError("enrol pressed but no name is set: type the name into the 'Enrol name' text entity "
                                    "first, or publish {\"name\": \"...\", \"seconds\": 90} to the enrol topic")
        return EnrolRequest(_valid_name(current_name), int(default_seconds))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise EnrolCommandError(f"enrol payload {text[:60]!r} is neither PRESS nor JSON; send {{\"name\": \"Alice\", \"seconds\": 90}}") from None
    if not isinstance(data, dict) or "name" not in data:
        raise EnrolCommandError("enrol JSON must be an object with a \"name\" (and optional \"seconds\"), e.g. {\"name\": \"Alice\", \"seconds\": 90}")
    seconds = data.get("seconds", default_seconds)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 10 <= seconds <= ENROL_MAX_S:
        raise EnrolCommandError(f"enrol \"seconds\" must be a number from 10 to {ENROL_MAX_S} (got {seconds!r})")
    return EnrolRequest(_valid_name(data["name"]), int(seconds))


def _valid_name(name: Any) -> str:
    """The enrol name, stripped, if the store's one name rule (``store.name_problem``) takes it.
    WHY the store's: a name this topic accepted and ``biod people rename`` or ``biod calibrate``
    refused (or the reverse) made "unknown" enrollable by one path and not the other."""
    problem = name_problem(name)
    if problem is not None:
        raise EnrolCommandError(f"enrol name: {problem}")
    return name.strip()


class EnrolCommands:
    """Listens on the enrol topics and calls ``on_enrol`` with a validated request.

    The name typed into Home Assistant's text entity is echoed (retained) on ``<prefix>/enrol/name``
    so the entity shows it and a restarted daemon gets it back from the broker."""

    def __init__(self, publisher: Any, topics: Topics, on_enrol: Callable[[EnrolRequest], None],
                 default_seconds: float = ENROL_DEFAULT_S) -> None:
        self._default_seconds = default_seconds
        self._publisher = publisher
        self._topics = topics
        self._on_enrol = on_enrol
        self._name: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._publisher.subscribe(self._topics.enrol_name, self._on_name_echo)
        # commands: live only, never queued for us while the hub is away (see MqttPublisher.subscribe)
        self._publisher.subscribe(self._topics.enrol_name_set, self._on_name_set, qos=0, retained=False)
        self._publisher.subscribe(self._topics.enrol_set, self._on_enrol_set, qos=0, retained=False)

    @property
    def name(self) -> str | None:
        with self._lock:
            return self._name

    def _on_name_echo(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if self._name is None:
                self._name = payload.decode("utf-8", errors="replace").strip() or None

    def _on_name_set(self, topic: str, payload: bytes) -> None:
        name = payload.decode("utf-8", errors="replace").strip()
        with self._lock:
            self._name = name or None
        self._publisher.publish(Message(self._topics.enrol_name, name, retain=True, qos=1))

    def _on_enrol_set(self, topic: str, payload: bytes) -> None:
        if not payload.strip():
            # WHY ignored: an empty message is how MQTT clears a retained one
            # (`mosquitto_pub -r -n -t .../enrol/set`); it is nobody's enrol request
            log.debug("enrol: empty message on %s ignored", topic)
            return
        try:
            request = parse_enrol_command(payload, self.name, self._default_seconds)
        except EnrolCommandError as exc:
            log.error("enrol: %s", exc)
            self._publisher.publish(Message(self._topics.enrol_state, _json({"state": "error", "error": str(exc)}), retain=False, qos=1))
            return
        log.info("enrol: starting a %d s enrolment window for %r", request.seconds, request.name)
        self._on_enrol(request)


def enrol_state_message(topics: Topics, state: str, name: str | None = None, until: float | None = None,
                        reason: str | None = None, retain: bool = True) -> Message:
    """``<prefix>/enrol/state``: ``{"state": "idle"|"enrolling"|"done"|"refused", "name", "until",
    "reason"}``; ``reason`` says why an enrolment was refused and what to do. Retained, so a
    restarted Home Assistant sees the enrolment in progress or the last outcome; ``idle`` (no
    enrolment since the daemon started) replaces an ``enrolling`` left by a crash. ``retain=False``
    answers a request without replacing that state (a request refused while another runs)."""
    payload = {"state": state, "name": name, "until": iso8601(until)}
    if reason is not None:
        payload["reason"] = reason
    return Message(topics.enrol_state, _json(payload), retain=retain, qos=1)


# -- stats ---------------------------------------------------------------------------------------
class StatsReporter:
    """Publishes ``collect()`` plus uptime and version on ``<prefix>/stats`` every ``interval_s``.

    ``collect`` is called on the reporter's thread: it must be cheap and thread-safe (read
    counters, no locks held for long). A failing ``collect`` is logged and skipped, never fatal."""

    def __init__(self, publisher: Any, topics: Topics, collect: Callable[[], Mapping[str, Any]],
                 interval_s: float = 60.0, version: str = VERSION, clock: Callable[[], float] = time.monotonic) -> None:
        self._publisher = publisher
        self._topic = topics.stats
        self._collect = collect
        self._interval = interval_s
        self._version = version
        self._clock = clock
        self._started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> dict[str, Any]:
        data = dict(self._collect())
        data["uptime_s"] = round(self._clock() - self._started, 1)
        data["version"] = self._version
        return data

    def publish_once(self) -> None:
        try:
            payload = self.snapshot()
        except Exception:  # a stats bug must not take the daemon down
            log.exception("stats: collecting failed; skipping this report")
            return
        self._publisher.publish(Message(self._topic, _json(payload), retain=True, qos=1))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="biod-stats", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self.publish_once()
            if self._stop.wait(self._interval):
                return
