"""Home Assistant MQTT discovery payloads, built as pure data.

Every entity belongs to one hub device, carries a ``unique_id`` derived from the hub id (so a
second hub never collides) and an ``origin`` block naming biod, and points at the retained
availability topic, so Home Assistant greys the entities out when the hub dies (last will
``offline``) or stops. One config topic per entity (``<discovery>/<component>/biod_<hub>/<key>/config``)
rather than one device-wide config: deleting one person's entity is then one empty retained
payload on that topic, exactly as Home Assistant's discovery docs describe. Payloads are retained
and re-sent when Home Assistant announces ``online``: see ``MqttPublisher``.

``default_entity_id`` replaces ``object_id`` (deprecated in Home Assistant 2025.10, ignored from
2026.4).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from daemon.dsp.quality import REASONS
from daemon.identity.store import slugify
from daemon.publish.mqtt import Message
from daemon.publish.state import NO_SIGNAL, VERSION, Topics

__all__ = ["VERSION", "Topics", "HubDiscovery", "device_block", "origin_block", "sensor_config", "heart_rate_config", "removal"]

SUPPORT_URL = "https://github.com/biod/biod"
EVENT_TYPES = ("new", "update", "end")



AVAILABILITY_TEMPLATE = "{{ 'online' if value == 'online' else 'offline' }}"

def entity_object_id(hub_id: str, key: str) -> str:
    """The object id of an entity's ``default_entity_id``, valid as Home Assistant requires
    (lowercase letters, digits and single underscores, none at either end). WHY: ``hub.id``
    may be ``Living-Room``, and ``sensor.biod_Living_Room_wearer`` is not an entity id."""
    return re.sub(r"[^a-z0-9]+", "_", f"biod_{hub_id}_{key}".lower()).strip("_")


def device_block(hub_id: str, hub_name: str) -> dict[str, Any]:
    return {
        "identifiers": [f"biod_{hub_id}"],
        "name": hub_name,
        "manufacturer": "biod",
        "model": "biod biometric hub",
        "sw_version": VERSION,
    }


def origin_block() -> dict[str, Any]:
    return {"name": "biod", "sw_version": VERSION, "support_url": SUPPORT_URL}


def sensor_config(
    discovery_prefix: str,
    hub_id: str,
    hub_name: str,
    topics: Topics,
    key: str,
    name: str,
    *,
    unit: str | None = None,
    device_class: str | None = None,
    state_class: str | None = "measurement",
    icon: str | None = None,
    component: str = "sensor",
    state_topic: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Message:
    """One retained discovery config; the state topic defaults to ``<prefix>/sensor/<key>/state``.

    ``state_topic=""`` leaves it out (buttons and other command-only entities have none)."""
    payload: dict[str, Any] = {
        "name": name,
        "unique_id": f"biod_{hub_id}_{key}",
        "default_entity_id": f"{component}.{entity_object_id(hub_id, key)}",
        "availability_topic": topics.availability,
        # biod says `stopped` on a clean exit (`offline` is the last will of a crash); Home
        # Assistant ignores any payload but these two, so map everything else to offline
        "availability_template": AVAILABILITY_TEMPLATE,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device_block(hub_id, hub_name),
        "origin": origin_block(),
    }
    st = topics.sensor_state(key) if state_topic is None else state_topic
    if st:
        payload["state_topic"] = st
    if unit:
        payload["unit_of_measurement"] = unit
    if device_class:
        payload["device_class"] = device_class
    if state_class and component == "sensor":
        payload["state_class"] = state_class
    if icon:
        payload["icon"] = icon
    if extra:
        payload.update(extra)
    topic = f"{discovery_prefix}/{component}/biod_{hub_id}/{key}/config"
    return Message(topic, json.dumps(payload, separators=(",", ":")), retain=True, qos=1)


#: seconds without a heart rate after which Home Assistant shows it unavailable: it is published
#: about once a second while the ECG is live, and "None" when it stops being live
HEART_RATE_EXPIRE_AFTER_S = 10


def heart_rate_config(discovery_prefix: str, hub_id: str, hub_name: str, topics: Topics) -> Message:
    return sensor_config(discovery_prefix, hub_id, hub_name, topics, "heart_rate", "Heart rate",
                         unit="bpm", icon="mdi:heart-pulse", extra={"expire_after": HEART_RATE_EXPIRE_AFTER_S})


def removal(config: Message) -> Message:
    """An empty retained payload on a discovery topic deletes the entity in Home Assistant."""
    return Message(config.topic, "", retain=True, qos=1)


# Templates: Home Assistant renders these against each state payload (docs/mqtt.md has the schemas).
_WEARER_TPL = "{{ value_json.wearer if value_json.wearer is not none else 'nobody' }}"
_ACTIVITY_TPL = "{{ value_json.activity if value_json.activity is not none else 'None' }}"
_QUALITY_TPL = "{{ (value_json.signal_quality * 100) | round(0) if value_json.signal_quality is not none else 'None' }}"
#: the ECG signal sensor's states: fine, each quality check that can reject a window, nothing sent
SIGNAL_STATES = ("ok", *REASONS, NO_SIGNAL)
_PROBLEM_TPL = "{{ value_json.signal_problem or 'ok' }}"
_BATTERY_TPL = "{{ value_json.battery_pct if value_json.battery_pct is not none else 'None' }}"
_CONNECTED_TPL = "{{ 'ON' if value_json.connected else 'OFF' }}"
_WEARING_TPL = "{{ 'ON' if value_json.wearing else 'OFF' }}"
#: WHY the times: after a broker outage the spool delivers hours-old events in a burst, and Home
#: Assistant stamps each with its arrival; an automation on "a session started" needs
#: ``start_time``/``last_seen``/``end_time`` (epoch s) to tell them from live ones (review, 2026-11-24).
_EVENT_TPL = ("{{ {'event_type': value_json.type, 'session_id': value_json.id, 'event_id': value_json.event_id, "
              "'seq': value_json.seq, 'wearer': value_json.after.wearer, 'activity': value_json.after.activity, "
              "'heart_rate_bpm': value_json.after.heart_rate_bpm, 'start_time': value_json.after.start_time, "
              "'last_seen': value_json.after.last_seen, 'end_time': value_json.after.end_time} | to_json }}")


#: the physical sensors biod has entities for (connectivity), and those with a battery
KNOWN_SENSORS = ("ecg", "imu")
KNOWN_BATTERY_SENSORS = ("imu",)


@dataclass(frozen=True)
class HubDiscovery:
    """All discovery configs of one hub. ``messages(persons)`` is what ``MqttPublisher`` re-sends.

    ``activities`` are the activity model's labels (the enum sensor's options); ``sensors`` the
    physical sensors with a connectivity entity, ``battery_sensors`` those that also report a battery;
    ``signal_sensor`` is the one whose signal quality is shown (the ECG)."""

    discovery_prefix: str
    hub_id: str
    hub_name: str
    topics: Topics
    activities: tuple[str, ...]
    sensors: tuple[str, ...] = ("ecg", "imu")
    battery_sensors: tuple[str, ...] = ("imu",)
    signal_sensor: str = "ecg"

    def _cfg(self, key: str, name: str, **kw: Any) -> Message:
        return sensor_config(self.discovery_prefix, self.hub_id, self.hub_name, self.topics, key, name, **kw)

    def hub_messages(self) -> list[Message]:
        t = self.topics
        out = [
            self._cfg("wearer", "Wearer", state_topic=t.wearer, state_class=None, icon="mdi:account-heart",
                      extra={"value_template": _WEARER_TPL, "json_attributes_topic": t.wearer}),
            self._cfg("activity", "Activity", state_topic=t.wearer, device_class="enum", state_class=None, icon="mdi:run",
                      extra={"value_template": _ACTIVITY_TPL, "options": list(self.activities)}),
            heart_rate_config(self.discovery_prefix, self.hub_id, self.hub_name, t),
            self._cfg("signal_quality", "Signal quality", state_topic=t.sensor_state(self.signal_sensor), unit="%",
                      icon="mdi:sine-wave", extra={"value_template": _QUALITY_TPL}),
            self._cfg(f"{self.signal_sensor}_signal", f"{self.signal_sensor.upper()} signal",
                      state_topic=t.sensor_state(self.signal_sensor), device_class="enum", state_class=None,
                      icon="mdi:heart-pulse", extra={"value_template": _PROBLEM_TPL, "options": list(SIGNAL_STATES),
                                                     "entity_category": "diagnostic"}),
            self._cfg("wearing_session", "Wearing session", component="event", state_topic=t.events,
                      extra={"event_types": list(EVENT_TYPES), "value_template": _EVENT_TPL}),
            self._cfg("enrol", "Enrol", component="button", state_topic="", icon="mdi:account-plus",
                      extra={"command_topic": t.enrol_set, "payload_press": "PRESS", "entity_category": "config"}),
            self._cfg("enrol_name", "Enrol name", component="text", state_topic=t.enrol_name, icon="mdi:form-textbox",
                      extra={"command_topic": t.enrol_name_set, "min": 0, "max": 64, "mode": "text", "retain": False,
                             "entity_category": "config"}),
        ]
        # Every sensor biod knows gets its entities; a disabled one gets them removed (an empty
        # retained config). WHY: after `imu.enabled: false` its connectivity and battery entities
        # stayed in Home Assistant, retained on the broker, showing a sensor that no longer exists.
        for sensor in KNOWN_SENSORS:
            cfg = self._cfg(f"{sensor}_connectivity", f"{sensor.upper()} connectivity", component="binary_sensor",
                            state_topic=t.sensor_state(sensor), device_class="connectivity",
                            extra={"value_template": _CONNECTED_TPL, "json_attributes_topic": t.sensor_state(sensor),
                                   "entity_category": "diagnostic"})
            out.append(cfg if sensor in self.sensors else removal(cfg))
        for sensor in KNOWN_BATTERY_SENSORS:
            cfg = self._cfg(f"{sensor}_battery", f"{sensor.upper()} battery", state_topic=t.sensor_state(sensor),
                            unit="%", device_class="battery",
                            extra={"value_template": _BATTERY_TPL, "entity_category": "diagnostic"})
            out.append(cfg if sensor in self.battery_sensors else removal(cfg))
        return out

    def person_messages(self, name: str) -> list[Message]:
        slug = slugify(name)
        state = self.topics.person_state(slug)
        return [self._cfg(f"person_{slug}_wearing", f"{name} wearing", component="binary_sensor", state_topic=state,
                          icon="mdi:heart-pulse", extra={"value_template": _WEARING_TPL, "json_attributes_topic": state})]

    def messages(self, persons: Iterable[str]) -> list[Message]:
        out = self.hub_messages()
        for name in persons:
            out.extend(self.person_messages(name))
        return out

    def person_removal(self, name: str) -> list[Message]:
        """Empty retained configs: Home Assistant deletes the person's entities."""
        return [removal(m) for m in self.person_messages(name)]

    @property
    def person_config_pattern(self) -> str:
        """MQTT subscription matching this hub's per-person config topics (and its other
        binary sensors, which :meth:`person_slug_of` tells apart)."""
        return f"{self.discovery_prefix}/binary_sensor/biod_{self.hub_id}/+/config"

    def person_slug_of(self, topic: str) -> str | None:
        """The person slug of one of this hub's per-person config topics, else None."""
        parts = topic.split("/")
        if (len(parts) != 5 or parts[0] != self.discovery_prefix or parts[1] != "binary_sensor"
                or parts[2] != f"biod_{self.hub_id}" or parts[4] != "config"):
            return None
        key = parts[3]
        if not (key.startswith("person_") and key.endswith("_wearing")) or len(key) <= len("person__wearing"):
            return None
        return key[len("person_"):-len("_wearing")]

    def rename(self, old: str, new: str) -> list[Message]:
        """A rename is a removal plus a new entity (the unique_id derives from the name)."""
        return self.person_removal(old) + self.person_messages(new)
