"""Shared test fixtures: a real Mosquitto broker on a free port, MQTT capture, free ports."""
from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parents[1]


async def until(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    """Await ``predicate()`` becoming true (tests that drive the daemon in-process)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(poll)


@contextlib.asynccontextmanager
async def running(app):
    """``app`` (a ``BiodApp``) running in this event loop for the ``async with`` body, then
    stopped cleanly as ``biod run`` stops on SIGTERM."""
    import asyncio

    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        yield app
    finally:
        stop.set()
        await task


def retained_snapshot(port: int, pattern: str, timeout: float = 10.0) -> dict[str, str]:
    """What a subscriber arriving now gets (Home Assistant after a restart): only retained
    messages, the last one per topic (a fresh client sees nothing else).

    Complete, not sampled: the client subscribes to ``pattern`` and to a sentinel topic of its
    own, and publishes to the sentinel once subscribed; the broker sends a subscription's
    retained messages before anything published after it, so when the sentinel comes back
    every retained message is in. (Sleeping a fixed time returned ``{}`` for a slow broker, and
    an assert of "nothing retained" then passed without looking.)"""
    got: dict[str, str] = {}
    sentinel = f"biod-test-snapshot/{time.monotonic_ns()}"
    done = threading.Event()

    def on_message(cl, u, m) -> None:
        if m.topic == sentinel:
            done.set()
        elif m.retain:
            got[m.topic] = m.payload.decode()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"snap-{time.monotonic_ns()}")
    c.on_message = on_message
    c.on_connect = lambda cl, u, f, r, p=None: cl.subscribe([(pattern, 1), (sentinel, 1)])
    c.on_subscribe = lambda cl, u, mid, codes, p=None: cl.publish(sentinel, b"", qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        if not done.wait(timeout):
            raise AssertionError(f"retained_snapshot: the broker on port {port} did not answer within {timeout} s")
    finally:
        c.loop_stop()
        c.disconnect()
    return dict(got)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_test_ca(d: Path) -> None:
    """A throw-away CA in ``d`` (ca.crt, ca.key) for the TLS brokers of the tests."""
    assert shutil.which("openssl"), "openssl is needed to make test certificates: apt-get install openssl"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", "/CN=biod test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)


def sign_test_cert(d: Path, name: str, extensions: str) -> None:
    """``<name>.crt``/``<name>.key`` in ``d``, signed by :func:`make_test_ca`'s CA, with the given
    X.509 extension lines (e.g. subjectAltName for a server, extendedKeyUsage=clientAuth)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN=biod {name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.cnf").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.cnf", "-out", f"{name}.crt", cwd=d)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(exclude: tuple[int, ...] = ()) -> int:
    """A port nothing listens on, for a server the test starts next.

    Picked *below* the kernel's ephemeral range: ``bind(0)`` hands out a port from that range,
    and so does every outgoing connection (the tests' MQTT clients), so between this pick and
    mosquitto's bind another test's client could take it ("Address already in use", seen in CI).
    Outside the range only a listener can take it, and the broker start re-picks on a clash."""
    import random

    lo, _ = _ephemeral_range()
    rng = random.Random(time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(10000, lo) if lo > 11000 else 0
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            got = int(s.getsockname()[1])
            if got not in exclude:
                return got
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def _mosquitto_binary() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise RuntimeError("mosquitto is not installed: run ./dev test (it installs Debian's mosquitto) or apt-get install mosquitto")
    return exe


@dataclass
class Broker:
    """A real Mosquitto started by the test; ``stop()``/``start()`` simulate an outage.

    ``tls_port``/``tls_conf``: a second listener (its lines after ``listener <tls_port>``)."""

    port: int
    workdir: Path
    proc: subprocess.Popen | None = None
    extra_conf: str = ""
    tls_port: int | None = None
    tls_conf: str = ""
    tls_dir: Path | None = None
    _started_once: bool = field(default=False, init=False, repr=False)

    def _write_conf(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        tls = f"listener {self.tls_port} 127.0.0.1\n{self.tls_conf}" if self.tls_port is not None else ""
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n{self.extra_conf}{tls}"
        )
        return conf

    def _log(self) -> str:
        """What mosquitto said: its log file and its stderr (where it reports a failed bind)."""
        files = (self.workdir / "mosquitto.log", self.workdir / "mosquitto.stderr")
        return "".join(f.read_text(errors="replace") for f in files if f.exists())

    def start(self) -> None:
        """Start and wait until every listener accepts. On the first start a port another
        process took since :func:`free_port` picked it is re-picked (up to 5 times); a restart
        keeps its ports, since the clients under test are configured for them."""
        for attempt in range(5):
            (self.workdir / "mosquitto.log").unlink(missing_ok=True)
            conf = self._write_conf()
            with open(self.workdir / "mosquitto.stderr", "wb") as err:  # bind errors go here, not to the log
                self.proc = subprocess.Popen([_mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err)
            try:
                listening = self._wait_listening()
            except RuntimeError:
                self.stop()  # not left running behind a failed start
                raise
            if listening:
                self._started_once = True
                return
            log = self._log()
            if self._started_once or "Address already in use" not in log or attempt == 4:
                raise RuntimeError(f"mosquitto exited: {log}")
            self.port = free_port()
            if self.tls_port is not None:
                self.tls_port = free_port(exclude=(self.port,))

    def _wait_listening(self) -> bool:
        """True once every listener accepts; False if mosquitto exited first."""
        assert self.proc is not None
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        deadline = time.monotonic() + 10
        while ports and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", ports[0]), timeout=0.2):
                    ports.pop(0)
            except OSError:
                if self.proc.poll() is not None:
                    return False
                time.sleep(0.05)
        if ports:
            raise RuntimeError("mosquitto did not start listening within 10 s")
        return True

    def stop(self) -> None:
        """Terminate, and kill if it does not go (a test may have SIGSTOPped it): a stop that
        raised left the process behind and hid the test's own failure."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def start_tls_broker(tmp_path: Path, server_extensions: str, extra_conf: str = "", listener_conf: str = "") -> Broker:
    """A started Mosquitto with a TLS listener on ``broker.tls_port`` whose server certificate,
    signed by a throw-away CA, carries ``server_extensions``; its files (ca.crt, server.crt/.key)
    are in ``broker.tls_dir``. ``extra_conf``: lines before the listener (authentication);
    ``listener_conf``: lines of the TLS listener (e.g. require_certificate)."""
    d = tmp_path / "tls"
    d.mkdir()
    make_test_ca(d)
    sign_test_cert(d, "server", server_extensions)
    port = free_port()
    broker = Broker(port=port, workdir=tmp_path, extra_conf=f"{extra_conf}user {getpass.getuser()}\n",
                    tls_port=free_port(exclude=(port,)), tls_dir=d,
                    tls_conf=f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n{listener_conf}")
    broker.start()
    return broker


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(port=free_port(), workdir=tmp_path)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@dataclass
class Capture:
    """Subscribes to everything and records (topic, payload, retain) in arrival order."""

    port: int
    messages: list[tuple[str, str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: mqtt.Client | None = None

    def start(self, topics: list[str]) -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"capture-{self.port}-{time.monotonic_ns()}")
        c.on_message = self._on_message
        connected = threading.Event()
        c.on_connect = lambda *a, **k: (c.subscribe([(t, 1) for t in topics]), connected.set())
        c.reconnect_delay_set(0.2, 1)
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        assert connected.wait(5), "capture client could not connect"
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload.decode(errors="replace"), bool(msg.retain)))

    def on(self, topic: str) -> list[str]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                snapshot = list(self.messages)
            result = predicate(snapshot)
            if result:
                return result
            time.sleep(0.05)
        with self.lock:
            topics = sorted({t for t, _, _ in self.messages})
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; topics seen: {topics}")

    def stop(self) -> None:
        if self.client:
            self.client.loop_stop()
            self.client.disconnect()


@pytest.fixture
def capture(mosquitto: Broker) -> Iterator[Capture]:
    cap = Capture(mosquitto.port)
    cap.start(["#"])
    try:
        yield cap
    finally:
        cap.stop()
