"""Home Assistant MQTT discovery payloads, built as pure data.

Every entity belongs to one hub device, carries a ``unique_id`` derived from the hub id (so a
second hub never collides), and points at the retained availability topic, so Home Assistant
greys the entities out when the hub dies (last will ``offline``) or stops. Payloads are retained
and re-sent when Home Assistant announces ``online``: see ``MqttPublisher``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from daemon.publish.mqtt import Message

VERSION = "0.1.0"


@dataclass(frozen=True)
class Topics:
    """The topic layout under the hub's prefix, in one place (docs/mqtt.md describes it)."""

    prefix: str

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    def sensor_state(self, key: str) -> str:
        return f"{self.prefix}/sensor/{key}/state"

    @property
    def stats(self) -> str:
        return f"{self.prefix}/stats"


def device_block(hub_id: str, hub_name: str) -> dict[str, Any]:
    return {
        "identifiers": [f"biod_{hub_id}"],
        "name": hub_name,
        "manufacturer": "biod",
        "model": "biod biometric hub",
        "sw_version": VERSION,
    }


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
    extra: dict[str, Any] | None = None,
) -> Message:
    """One retained discovery config for ``<prefix>/sensor/<key>/state``."""
    payload: dict[str, Any] = {
        "name": name,
        "unique_id": f"biod_{hub_id}_{key}",
        "object_id": f"biod_{hub_id}_{key}",
        "state_topic": topics.sensor_state(key),
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device_block(hub_id, hub_name),
    }
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


def heart_rate_config(discovery_prefix: str, hub_id: str, hub_name: str, topics: Topics) -> Message:
    return sensor_config(discovery_prefix, hub_id, hub_name, topics, "heart_rate", "Heart rate",
                         unit="bpm", icon="mdi:heart-pulse")


def removal(config: Message) -> Message:
    """An empty retained payload on a discovery topic deletes the entity in Home Assistant."""
    return Message(config.topic, "", retain=True, qos=1)
