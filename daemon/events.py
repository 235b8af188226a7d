"""Wearing sessions: turn a stream of identity/activity/heart-rate observations into events.

A *wearing session* is one uninterrupted stretch of a live ECG on one wearer. Home automations
want to know when it starts, when something about it changes enough to matter, and when it ends,
not a verdict every second, so this module emits Frigate-style events::

    {"id": <session id>, "type": "new" | "update" | "end", "before": {...} | null, "after": {...}}

The identity engine decides who is wearing and whether the ECG is live; this module only turns
those decisions into sessions. It is pure (no clock, no I/O): time comes in with every
observation, so it is deterministic and testable, and ``expire(now)`` ends a session whose
observations stopped arriving (the pipeline stalled or the hub lost the box).

Rules (docs/mqtt.md repeats them for consumers):

* ``new`` when the ECG is live and the identity engine has named a wearer (``"unknown"`` counts:
  somebody is wearing it, we just don't know who).
* ``update`` only on a meaningful change against the last *emitted* state: wearer confidence
  band (low/medium/high), activity label, heart rate by more than ``hr_delta_bpm``, or an
  ``"unknown"`` session being identified; at most one every ``min_update_interval_s`` (changes
  are never lost, only coalesced: the next update carries the latest state).
* ``end`` when the ECG stops being live, when observations stop for ``stale_after_s``, and
  before a ``new`` when the wearer changes to a different named person (a new id). A session a
  crashed run left open is ended by the next run (``reason: "daemon_restart"``; the tracker
  never sees it: ``publish.state.SessionPublisher.end_crashed_session``).
* ``"unknown"`` becoming a named wearer keeps the session id (an ``update``): the leads never
  came off, so it is the same person being recognised, the way Frigate assigns a sub label.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

UNKNOWN = "unknown"
EventType = Literal["new", "update", "end"]


@dataclass(frozen=True)
class Observation:
    """What the identity engine concluded at time ``t`` (seconds; only differences matter to the
    tracker). The daemon gives monotonic seconds and converts the session's times to epoch seconds
    as they are published (``SessionPublisher(epoch=...)``, ``daemon.clock``)."""

    t: float
    wearer: str | None  # a person's name, "unknown", or None: no verdict in this observation
    confidence: float
    activity: str | None
    activity_confidence: float | None
    heart_rate_bpm: float | None
    quality: float
    live: bool  # the ECG is on a body: leads on and beats detected
    sensors: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionState:
    """One wearing session as consumers see it in ``before``/``after``."""

    id: str
    wearer: str
    confidence: float
    confidence_band: str
    activity: str | None
    activity_confidence: float | None
    heart_rate_bpm: float | None
    quality: float
    start_time: float
    last_seen: float
    end_time: float | None
    sensors: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sensors"] = dict(self.sensors)
        for key in ("confidence", "activity_confidence", "heart_rate_bpm", "quality"):
            if d[key] is not None:
                d[key] = round(float(d[key]), 3 if key != "heart_rate_bpm" else 1)
        return d


@dataclass(frozen=True)
class Event:
    """One session event. ``event_id`` is unique per event (``<session id>:<n>``) so that a consumer
    can drop the rare duplicate that at-least-once delivery allows.

    ``reason`` is set only on an ``end`` that a later run sent for a session the run that held it
    could not end (``"daemon_restart"``: it crashed or lost power); the tracker's own events have
    none, and their payload has no such key."""

    id: str
    event_id: str
    type: EventType
    before: SessionState | None
    after: SessionState
    reason: str | None = None

    @property
    def number(self) -> int:
        """``n`` of ``event_id`` (``<session id>:<n>``): the events of a session count 1, 2, ..."""
        return int(self.event_id.rpartition(":")[2])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "event_id": self.event_id,
            "type": self.type,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict(),
        }
        if self.reason is not None:
            d["reason"] = self.reason
        return d


@dataclass(frozen=True)
class TrackerConfig:
    hr_delta_bpm: float = 5.0
    min_update_interval_s: float = 10.0
    stale_after_s: float = 30.0
    confidence_bands: tuple[float, float] = (0.5, 0.8)  # below: low; between: medium; above: high


def confidence_band(confidence: float, bands: tuple[float, float]) -> str:
    low, high = bands
    return "high" if confidence >= high else "medium" if confidence >= low else "low"


def _new_id() -> str:
    return uuid.uuid4().hex


class EventTracker:
    """Feed ``observe()`` in time order; it returns the events (zero, one or two) each causes."""

    def __init__(self, config: TrackerConfig | None = None, id_factory: Callable[[], str] = _new_id) -> None:
        self.config = config or TrackerConfig()
        self._new_id = id_factory
        self._emitted: SessionState | None = None  # the state last sent to consumers
        self._current: SessionState | None = None  # the latest state, maybe not sent yet
        self._last_emit_t = float("-inf")
        self._counter = 0  # events emitted in the current session

    @property
    def session(self) -> SessionState | None:
        """The latest state of the open session, or None."""
        return self._current

    def observe(self, obs: Observation) -> list[Event]:
        events = self.expire(obs.t)
        cur = self._current
        if cur is None:
            if obs.live and obs.wearer is not None:
                events.append(self._start(obs))
            return events
        if not obs.live:
            events.append(self._end(obs.t))
            return events
        if obs.wearer is not None and obs.wearer != cur.wearer and cur.wearer != UNKNOWN:
            events.append(self._end(obs.t))
            events.append(self._start(obs))
            return events
        self._current = self._merge(cur, obs)
        update = self._maybe_update(obs.t)
        if update:
            events.append(update)
        return events

    def expire(self, now: float) -> list[Event]:
        """End the session if nothing was observed for ``stale_after_s`` (call it on a timer too)."""
        cur = self._current
        if cur is not None and now - cur.last_seen > self.config.stale_after_s:
            return [self._end(cur.last_seen)]
        return []

    def close(self, now: float) -> list[Event]:
        """End the open session on shutdown, so no consumer is left believing somebody is wearing it."""
        return [self._end(now)] if self._current is not None else []

    # -- internals ---------------------------------------------------------------------------------
    def _merge(self, cur: SessionState, obs: Observation) -> SessionState:
        wearer = obs.wearer if obs.wearer is not None else cur.wearer
        confidence = obs.confidence if obs.wearer is not None else cur.confidence
        return replace(
            cur,
            wearer=wearer,
            confidence=confidence,
            confidence_band=confidence_band(confidence, self.config.confidence_bands),
            activity=obs.activity if obs.activity is not None else cur.activity,
            activity_confidence=obs.activity_confidence if obs.activity is not None else cur.activity_confidence,
            heart_rate_bpm=obs.heart_rate_bpm if obs.heart_rate_bpm is not None else cur.heart_rate_bpm,
            quality=obs.quality,
            last_seen=obs.t,
            sensors=dict(obs.sensors),
        )

    def _meaningful(self, before: SessionState, after: SessionState) -> bool:
        if before.wearer != after.wearer or before.confidence_band != after.confidence_band:
            return True
        if before.activity != after.activity:
            return True
        if (before.heart_rate_bpm is None) != (after.heart_rate_bpm is None):
            return True
        if before.heart_rate_bpm is not None and after.heart_rate_bpm is not None:
            return abs(after.heart_rate_bpm - before.heart_rate_bpm) > self.config.hr_delta_bpm
        return False

    def _maybe_update(self, t: float) -> Event | None:
        assert self._emitted is not None and self._current is not None
        if t - self._last_emit_t < self.config.min_update_interval_s:
            return None
        if not self._meaningful(self._emitted, self._current):
            return None
        return self._emit("update", self._emitted, self._current, t)

    def _start(self, obs: Observation) -> Event:
        self._counter = 0
        state = SessionState(
            id=self._new_id(), wearer=obs.wearer or UNKNOWN, confidence=obs.confidence,
            confidence_band=confidence_band(obs.confidence, self.config.confidence_bands),
            activity=obs.activity, activity_confidence=obs.activity_confidence if obs.activity else None,
            heart_rate_bpm=obs.heart_rate_bpm, quality=obs.quality, start_time=obs.t, last_seen=obs.t,
            end_time=None, sensors=dict(obs.sensors),
        )
        self._current = state
        return self._emit("new", None, state, obs.t)

    def _end(self, t: float) -> Event:
        assert self._current is not None
        before = self._emitted
        after = replace(self._current, end_time=t)
        event = self._emit("end", before, after, t)
        self._current = None
        self._emitted = None
        return event

    def _emit(self, kind: EventType, before: SessionState | None, after: SessionState, t: float) -> Event:
        self._counter += 1
        self._emitted = after
        self._last_emit_t = t
        return Event(id=after.id, event_id=f"{after.id}:{self._counter}", type=kind, before=before, after=after)
