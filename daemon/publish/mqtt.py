"""MQTT publisher: availability with last will, retained state, discovery re-sent on demand.

paho-mqtt runs its own network thread (``loop_start``) and reconnects by itself with back-off;
this class adds what a hub needs on top: a retained availability topic whose last will says
``offline`` if the hub dies and ``stopped`` on a clean exit, Home Assistant discovery re-sent
whenever Home Assistant announces ``online`` (it forgets non-retained state on restart), and
one-line, actionable log messages for the ways a broker connection fails.
"""
from __future__ import annotations

import json
import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from daemon.config import MqttConfig, TlsConfig

log = logging.getLogger(__name__)

ONLINE, OFFLINE, STOPPED = "online", "offline", "stopped"


@dataclass(frozen=True)
class Message:
    """One MQTT publication, as plain data so that builders stay pure and testable."""

    topic: str
    payload: str
    retain: bool = False
    qos: int | None = None  # None: the configured QoS


@dataclass
class PublisherStats:
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    refused: int = 0
    connect_failures: int = 0  # attempts that reached no broker (nothing listening, no route, DNS)
    dropped_offline: int = 0  # non-retained messages not queued while the broker was away (stale on arrival)
    superseded_offline: int = 0  # retained states replaced by a newer one of the same topic while away
    restored_after_resend: int = 0  # newest states sent again after paho re-sent an older one over them
    last_error: str | None = None
    connected_since: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_CONNACK_FIXES = {
    "Not authorized": "the broker refused the credentials: check mqtt.username and the password source",
    "Bad user name or password": "the broker refused the credentials: check mqtt.username and the password source",
    "Client identifier not valid": "the broker refused the client id: set mqtt.client_id to something unique",
    "Unsupported protocol version": "the broker does not speak MQTT 3.1.1/5: upgrade it",
}


def _not_sent() -> mqtt.MQTTMessageInfo:
    info = mqtt.MQTTMessageInfo(0)
    info.rc = mqtt.MQTT_ERR_NO_CONN
    return info


def configure_tls(client: mqtt.Client, tls: TlsConfig) -> None:
    """Set ``mqtt.tls`` on a paho client (nothing when it is off): the CA, the client certificate
    and key, and ``insecure``. WHY one function: ``biod doctor`` connects with its own client, and
    when it set only the CA it reported FAIL for a broker that requires the client certificate the
    daemon sends (or that ``insecure`` lets it reach). Both use this, so the check tests the
    connection the daemon makes. paho raises ``ssl.SSLError`` (an ``OSError``) for a certificate
    and key that do not belong together."""
    if not tls.enabled:
        return
    client.tls_set(
        ca_certs=str(tls.ca_file) if tls.ca_file else None,
        certfile=str(tls.cert_file) if tls.cert_file else None,
        keyfile=str(tls.key_file) if tls.key_file else None,
        cert_reqs=ssl.CERT_REQUIRED,
    )
    client.tls_insecure_set(tls.insecure)


@dataclass(frozen=True)
class _Subscription:
    handler: Callable[[str, bytes], None]
    qos: int
    retained: bool | None  # None: every message; True: only retained replays; False: only live ones


class _RetainedOrder:
    """Which retained state of each topic the broker ends up holding.

    WHY: on a reconnect paho calls ``on_connect`` first and only then re-sends the QoS 1 messages
    the broker had not acknowledged before the link dropped. A state published just before a drop
    (``wearer: Alice``) therefore reached the broker *after* the newer state held while it was away
    (``wearer: null``), and the broker kept the stale wearer. Each retained publication gets a
    generation number per topic; the broker acknowledges in the order it stored, so an ack of an
    older generation after a newer one means the older one is what it holds now, and the newest is
    sent again. Thread-safe; the lock is never held while calling paho (paho calls ``on_publish``
    with its own message lock held, so holding ours around ``publish`` could deadlock)."""

    EARLY_ACK_S = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._latest: dict[str, tuple[int, Message]] = {}
        self._acked: dict[str, int] = {}  # the newest generation per topic the broker acknowledged
        self._in_flight: dict[int, tuple[str, int]] = {}  # paho message id -> (topic, generation)
        self._early: dict[int, float] = {}  # acks that came before ``sent`` recorded their id -> when

    def newest(self, msg: Message) -> int:
        """``msg`` is now the newest state of its topic; its generation."""
        with self._lock:
            return self._newest_locked(msg)

    def claim_if_unwritten(self, msg: Message) -> int | None:
        """``newest(msg)`` if nothing was published on its topic yet, else None."""
        with self._lock:
            return None if msg.topic in self._latest else self._newest_locked(msg)

    def _newest_locked(self, msg: Message) -> int:
        self._generation += 1
        self._latest[msg.topic] = (self._generation, msg)
        return self._generation

    def latest(self, topic: str) -> tuple[int, Message] | None:
        with self._lock:
            return self._latest.get(topic)

    def all_latest(self) -> list[tuple[int, Message]]:
        """The newest state of every topic written, oldest generation first."""
        with self._lock:
            return sorted(self._latest.values(), key=lambda gm: gm[0])

    def sent(self, mid: int, topic: str, generation: int) -> list[str]:
        """paho took it as ``mid``; the topics whose newest state must be sent again (an ack that
        raced ahead of this call is applied now)."""
        with self._lock:
            self._in_flight[mid] = (topic, generation)
            acked_at = self._early.pop(mid, None)
            if acked_at is not None and time.monotonic() - acked_at < self.EARLY_ACK_S:
                return self._ack_locked(mid)
            return []

    def acked(self, mid: int) -> list[str]:
        with self._lock:
            if mid not in self._in_flight:
                # not a tracked retained message, or its ack beat ``sent`` (a thread switch between
                # paho's publish and ``sent``): remembered for a few seconds, never long enough
                # for paho's message ids to wrap round to it
                now = time.monotonic()
                if len(self._early) >= 64:
                    self._early = {m: t for m, t in self._early.items() if now - t < self.EARLY_ACK_S}
                self._early[mid] = now
                return []
            return self._ack_locked(mid)

    def _ack_locked(self, mid: int) -> list[str]:
        topic, generation = self._in_flight.pop(mid)
        newest_acked = self._acked.get(topic, 0)
        if generation < newest_acked:
            return [topic]  # an older state was stored after a newer one
        self._acked[topic] = generation
        return []


class MqttPublisher:
    """Owns the paho client. Thread-safe: ``publish`` may be called from any thread."""

    def __init__(
        self,
        cfg: MqttConfig,
        topic_prefix: str,
        client_id: str,
        discovery: Callable[[], Iterable[Message]] | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.prefix = topic_prefix.rstrip("/")
        self.availability_topic = f"{self.prefix}/availability"
        self._discovery = discovery
        self._on_connected_hook = on_connected
        self.stats = PublisherStats()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._handlers: dict[str, _Subscription] = {}
        # topics whose retained state changed while the broker was away (``_order`` has the newest
        # message of every topic; all are sent at the next connect)
        self._held: set[str] = set()
        self._order = _RetainedOrder()
        self._closing = False
        self._started = False
        self.client_id = cfg.client_id or client_id
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,  # QoS 1 messages queued for us survive our reconnects
        )
        password = cfg.resolve_password()
        if cfg.username:
            self._client.username_pw_set(cfg.username, password)
        configure_tls(self._client, cfg.tls)
        self._client.will_set(self.availability_topic, OFFLINE, qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(10000)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._fail_logged_at = float("-inf")
        self._connected_at = float("-inf")  # monotonic time of the last accepted connection
        self._quick_drops = 0  # connections in a row the broker dropped within QUICK_DROP_S
        self._clash_logged_at = float("-inf")  # not reset by a connect, unlike _fail_logged_at
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._publish_hooks: list[Callable[[int], None]] = []
        self._connection_hooks: list[Callable[[bool], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; failures are logged and retried with back-off, never fatal."""
        log.info("mqtt: connecting to %s:%d (prefix %s)", self.cfg.host, self.cfg.port, self.prefix)
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self._client.loop_start()
        self._started = True

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def network_thread_alive(self) -> bool:
        """False once paho's network thread has ended while it should run. WHY: paho retries on
        OSError only; anything else raised in its thread (a resolver's UnicodeError, a bug) ends
        it for good, silently: nothing reconnects and events pile up in the spool. The daemon's
        watchdog counts it as a stopped part, so systemd restarts the daemon."""
        if not self._started or self._closing:
            return True
        thread = getattr(self._client, "_thread", None)  # paho's loop_start thread; it sets None as it ends
        return thread is not None and thread.is_alive()

    def close(self, final_state: str = STOPPED, timeout: float = 3.0) -> None:
        """Say ``stopped`` (retained) so nobody mistakes a clean exit for a crash, then disconnect."""
        self._closing = True
        if self._connected.is_set():
            info = self._client.publish(self.availability_topic, final_state, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("mqtt: could not confirm the '%s' availability message", final_state)
        self._client.disconnect()
        self._client.loop_stop()

    # -- publishing ----------------------------------------------------------------------------
    def publish(self, msg: Message, *, queue_if_offline: bool | None = None) -> mqtt.MQTTMessageInfo:
        """Hand ``msg`` to paho. While the broker is away, a retained message is held, only the
        newest per topic, and sent on reconnect (the newest state must arrive); a non-retained one
        is dropped and counted (a heart rate from an hour ago is noise, and thousands of them
        would sit in front of the spooled events). Pass ``queue_if_offline=True`` to hand it to
        paho anyway: the event spool does, and paho owns what it was given.

        WHY hold retained states here rather than in paho's queue: the sensor states alone are
        ~800 retained messages an hour; queued in paho, a day-long outage filled its 10 000-slot
        queue, after which every publish failed, the session's final ``wearer`` state among them,
        and the broker kept the stale wearer after the reconnect."""
        if not self._connected.is_set():
            with self._lock:  # _on_connect sends what is held and sets _connected under this lock
                if not self._connected.is_set():
                    if queue_if_offline is None and msg.retain:
                        if msg.topic in self._held:
                            self.stats.superseded_offline += 1
                        self._held.add(msg.topic)
                        self._order.newest(msg)
                        return _not_sent()
                    if not queue_if_offline:
                        self.stats.dropped_offline += 1
                        return _not_sent()
        info = self._send(msg, self._order.newest(msg) if msg.retain else None)
        self.stats.published += 1
        return info

    def _send(self, msg: Message, generation: int | None) -> mqtt.MQTTMessageInfo:
        """Hand ``msg`` to paho; a retained one is remembered by message id until the broker acks it."""
        qos = self._qos(msg)
        info = self._client.publish(msg.topic, msg.payload, qos=qos, retain=msg.retain)
        # NO_CONN: the link dropped after ``publish`` saw it up; paho keeps a QoS>0 message and
        # re-sends it after the held states, so it is tracked like a sent one
        if generation is not None and (info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0)):
            self._settle(self._order.sent(info.mid, msg.topic, generation))
        return info

    def _settle(self, stale_topics: list[str]) -> None:
        """The broker now holds an older state than the newest of these topics: send the newest again."""
        for topic in stale_topics:
            latest = self._order.latest(topic)
            if latest is not None:
                self.stats.restored_after_resend += 1
                log.info("mqtt: paho re-sent an older retained %s after its newest state; sending the newest again", topic)
                self._send(latest[1], latest[0])

    def _qos(self, msg: Message) -> int:
        return self.cfg.qos if msg.qos is None else msg.qos

    def publish_json(self, topic: str, payload: Any, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.publish(Message(topic, json.dumps(payload, separators=(",", ":")), retain))

    def add_publish_hook(self, hook: Callable[[int], None]) -> None:
        """Called with the message id when the broker acknowledged a QoS>0 publication."""
        self._publish_hooks.append(hook)

    def add_connection_hook(self, hook: Callable[[bool], None]) -> None:
        """Called on paho's network thread with True after every (re)connect and False on every loss.

        On a reconnect it runs *before* paho re-sends the QoS 1 messages it still holds; the
        event spool relies on that to hold new events back until the re-sent ones are acked.
        Keep hooks short and never block in them on a lock held around ``publish``."""
        self._connection_hooks.append(hook)

    def subscribe(self, topic: str, handler: Callable[[str, bytes], None], *, qos: int = 1,
                  retained: bool | None = None) -> None:
        """Subscribe now and again after every reconnect.

        ``qos=0`` for commands: with our persistent session the broker queues QoS 1 messages for
        us while the hub is away, and an enrol command pressed hours ago would open an enrolment
        window for whoever wears the sensors when the hub comes back. ``retained``: ``True``
        hands ``handler`` only the retained messages the broker replays on subscribing (what a
        previous run left), ``False`` only live ones (a retained command would run at every
        connect), ``None`` both."""
        with self._lock:
            self._handlers[topic] = _Subscription(handler, qos, retained)
        if self._connected.is_set():
            self._client.subscribe(topic, qos=qos)

    def publish_unless_written(self, msg: Message) -> bool:
        """Publish retained ``msg`` only if this process has not published on its topic: for
        correcting what a previous run left on the broker without overwriting a state of ours
        (the check and the claim are one step, so a state of ours published meanwhile wins)."""
        generation = self._order.claim_if_unwritten(msg)
        if generation is None:
            return False
        with self._lock:  # as in ``publish``: _on_connect sends what is held and sets _connected under it
            if not self._connected.is_set():
                self._held.add(msg.topic)
                return True
        self._send(msg, generation)
        self.stats.published += 1
        return True

    # -- paho callbacks (network thread) ---------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if reason.is_failure:
            text = str(reason)
            fix = _CONNACK_FIXES.get(text, "check mqtt.host/port and the broker's log")
            self.stats.refused += 1
            self.stats.last_error = f"{text}: {fix}"
            log.error("mqtt: broker %s:%d refused the connection (%s); %s; retrying with back-off",
                      self.cfg.host, self.cfg.port, text, fix)
            return
        self.stats.connects += 1
        self.stats.connected_since = time.time()
        self._connected_at = time.monotonic()
        self._fail_logged_at = float("-inf")  # the next outage is reported at once
        log.info("mqtt: connected to %s:%d", self.cfg.host, self.cfg.port)
        client.publish(self.availability_topic, ONLINE, qos=1, retain=True)
        with self._lock:
            topics = [(t, sub.qos) for t, sub in self._handlers.items()]
        if self.cfg.discovery:
            topics.append((f"{self.cfg.discovery_prefix}/status", 1))
        for topic, qos in topics:
            client.subscribe(topic, qos=qos)
        discovery_topics = self._send_discovery()
        # The hooks first: the event spool's hook marks a new connection, and its sender (another
        # thread) must not see us connected before that, or new events would overtake those paho
        # re-sends from the last connection.
        self._call_connection_hooks(True)
        # The newest state of EVERY topic written, not only of those that changed while the broker
        # was away. WHY: a broker that restarts loses its retained messages (no persistence) or
        # rolls them back to its last autosave (persistence), and states are published only when
        # they change: the wearer of an hour ago came back, or nothing did (review, 2026-11-24).
        with self._lock:
            n_held, self._held = len(self._held), set()
            newest = [(g, m) for g, m in self._order.all_latest() if m.topic not in discovery_topics]
            for generation, msg in newest:  # before anything published after
                self._send(msg, generation)
                self.stats.published += 1
            self._connected.set()
        if newest:
            log.info("mqtt: sent the newest of %d retained states (%d %s)", len(newest), n_held,
                     "changed while the broker was away" if self.stats.connects > 1
                     else "set before the first connection")
        if self._on_connected_hook:
            self._on_connected_hook()

    CONNECT_FAIL_LOG_EVERY_S = 300.0

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """No broker answered. paho retries with back-off by itself but says nothing, so a hub
        whose broker is down, or whose mqtt.host is wrong, looked healthy in the journal. Say so
        at once, then every few minutes while it lasts (paho calls this inside its except)."""
        exc = sys.exc_info()[1]
        cause = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) if exc else "no answer"
        fix = "is it running, and are mqtt.host/port right?"
        if self.cfg.tls.enabled and self.cfg.port == 1883:
            fix += " (mqtt.tls is on but the port is 1883, a broker's plain port: its TLS port is usually 8883)"
        elif not self.cfg.tls.enabled and self.cfg.port == 8883:
            fix += " (the port is 8883, a broker's usual TLS port, but mqtt.tls is off)"
        self._connect_failed(f"cannot reach the broker at {self.cfg.host}:{self.cfg.port} ({cause})", fix)

    def _connect_failed(self, what: str, fix: str) -> None:
        """Count, keep for the stats and STATUS=, and log at once and then every few minutes."""
        self.stats.connect_failures += 1
        self.stats.last_error = what
        now = time.monotonic()
        if now - self._fail_logged_at >= self.CONNECT_FAIL_LOG_EVERY_S:
            self._fail_logged_at = now
            log.error("mqtt: %s: %s retrying with back-off; events are spooled on disk meanwhile", what, fix)

    #: a connection the broker drops this soon after accepting it counts as a quick drop
    QUICK_DROP_S = 5.0
    #: quick drops in a row that make the client-id clash worth saying
    QUICK_DROPS_TO_WARN = 3

    def _note_quick_drop(self, quick: bool) -> None:
        """Say what a run of connections dropped within seconds of each connect means. WHY: an
        MQTT broker closes a client's connection when another client connects with the same
        client id (two hubs left at the same ``hub.id``, a second biod on one hub); both then
        reconnect and knock each other off every second or so, and paho reports each drop only
        as "Unspecified error", so the journal said nothing a user could act on."""
        self._quick_drops = self._quick_drops + 1 if quick else 0
        if self._quick_drops >= self.QUICK_DROPS_TO_WARN:
            what = (f"the broker dropped the connection within {self.QUICK_DROP_S:g} s of accepting it "
                    f"{self._quick_drops} times in a row")
            self.stats.last_error = what
            now = time.monotonic()
            if now - self._clash_logged_at >= self.CONNECT_FAIL_LOG_EVERY_S:
                self._clash_logged_at = now
                log.error("mqtt: %s: another client is probably connected with the same client id %r (a "
                          "second hub with the same hub.id: give each hub its own; or mqtt.client_id set "
                          "the same on two clients); check the broker's log", what, self.client_id)

    def _call_connection_hooks(self, connected: bool) -> None:
        for hook in self._connection_hooks:
            try:
                hook(connected)
            except Exception:  # never let a hook kill paho's network thread
                log.exception("mqtt: connection hook failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._call_connection_hooks(False)
        if was and not self._closing:
            self.stats.disconnects += 1
            why = "" if str(reason) == "Unspecified error" else f" ({reason})"  # paho's word for a dropped link
            self.stats.last_error = f"lost the broker at {self.cfg.host}:{self.cfg.port}{why}"
            log.warning("mqtt: lost the broker %s:%d (%s); reconnecting with back-off, events are spooled meanwhile",
                        self.cfg.host, self.cfg.port, reason)
            self._note_quick_drop(time.monotonic() - self._connected_at < self.QUICK_DROP_S)
        elif not was and not self._closing:
            # The link came up but the broker dropped it before its CONNACK: a TLS client
            # certificate it wants, a client id or will topic it refuses. paho retries for ever
            # and, unlike a refused CONNACK, nothing else would ever say so.
            self._connect_failed(f"the broker at {self.cfg.host}:{self.cfg.port} closed the connection before "
                                 f"accepting it ({reason})",
                                 "check mqtt.tls (a client certificate it requires: cert_file/key_file), "
                                 "mqtt.client_id and the broker's log;")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.cfg.discovery and msg.topic == f"{self.cfg.discovery_prefix}/status":
            if msg.payload.decode(errors="replace").strip() == "online":
                log.info("mqtt: Home Assistant came online; re-sending discovery")
                self._send_discovery()
            return
        with self._lock:
            matching = [sub for t, sub in self._handlers.items() if mqtt.topic_matches_sub(t, msg.topic)]
        handlers = [sub.handler for sub in matching if sub.retained in (None, bool(msg.retain))]
        if msg.retain and msg.payload and any(sub.retained is False for sub in matching):
            log.warning("mqtt: ignored a retained command on %s (it would run again at every connect); clear it "
                        "with: mosquitto_pub -r -n -t '%s'", msg.topic, msg.topic)
        for handler in handlers:
            try:
                handler(msg.topic, msg.payload)
            except Exception:  # a bad command must never kill the network thread
                log.exception("mqtt: handler for %s failed", msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any = None, props: Any = None) -> None:
        try:
            self._settle(self._order.acked(mid))
        except Exception:  # never let it kill paho's network thread or keep the ack from the spool
            log.exception("mqtt: could not re-send the newest retained state")
        for hook in self._publish_hooks:
            hook(mid)

    def _send_discovery(self) -> set[str]:
        """Send every discovery config; their topics (not sent again as newest states)."""
        if not (self.cfg.discovery and self._discovery):
            return set()
        topics = set()
        for msg in self._discovery():
            # tracked like any retained state: a person's removal (empty config) published before
            # the link dropped, and re-sent by paho after this, must not overwrite the config of
            # someone enrolled again meanwhile (the newest is then sent again, ``_settle``)
            self._send(msg, self._order.newest(msg) if msg.retain else None)
            topics.add(msg.topic)
        return topics

