"""The event spool: durable, ordered, bounded, and exactly-once through a broker outage (real Mosquitto)."""
from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from daemon.config import MqttConfig
from daemon.publish.mqtt import MqttPublisher
from daemon.publish.spool import EventSpool, SpoolError, SpoolSender
from tests.conftest import REPO, Broker, free_port

TOPIC = "biod/t/events"


# -- storage -------------------------------------------------------------------------------------
def test_append_is_ordered_and_survives_reopening(tmp_path: Path) -> None:
    before_ms = int(time.time() * 1000)
    spool = EventSpool(tmp_path / "spool")
    seqs = [spool.append(TOPIC, {"event_id": f"e{i}", "type": "new"}) for i in range(5)]
    # a new spool counts on from the clock in ms: one made after the old file was deleted or moved
    # aside must not reuse numbers a consumer has seen
    b = seqs[0] - 1
    assert b >= before_ms and seqs == [b + 1, b + 2, b + 3, b + 4, b + 5]
    spool.remove([b + 1, b + 2])
    spool.close()
    again = EventSpool(tmp_path / "spool")
    pending = again.pending()
    assert [e.seq for e in pending] == [b + 3, b + 4, b + 5] and len(again) == 3
    assert json.loads(pending[0].payload) == {"seq": b + 3, "event_id": "e2", "type": "new"}
    assert again.append(TOPIC, {"event_id": "e5"}) == b + 6, "seq must never be reused, even after deletions"
    assert [e.seq for e in again.pending(after_seq=b + 4, limit=1)] == [b + 5]
    again.close()
    for f in (tmp_path / "spool").iterdir():  # the user deletes the spool (or moves it aside)
        f.unlink()
    assert EventSpool(tmp_path / "spool").append(TOPIC, {"event_id": "e6"}) > b + 6


def test_an_appended_event_survives_a_crash(tmp_path: Path) -> None:
    """The process dies (os._exit: no close, no atexit) right after append returns."""
    code = ("import os, sys; from daemon.publish.spool import EventSpool; "
            f"s = EventSpool({str(tmp_path / 'spool')!r}); s.append('t', {{'event_id': 'x'}}); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=30)
    assert [json.loads(e.payload)["event_id"] for e in EventSpool(tmp_path / "spool").pending()] == ["x"]


def test_files_are_private(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path / "state" / "spool")
    spool.append(TOPIC, {"event_id": "a"})
    assert stat.S_IMODE(os.stat(spool.directory).st_mode) == 0o700
    files = list(spool.directory.iterdir())
    assert any(f.name.endswith("-wal") for f in files), files
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_full_spool_drops_the_oldest_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = EventSpool(tmp_path / "spool", max_events=3)
    with caplog.at_level(logging.WARNING, logger="daemon.publish.spool"):
        for i in range(5):
            spool.append(TOPIC, {"event_id": f"e{i}"})
    b = spool.pending()[0].seq - 3
    assert [e.seq for e in spool.pending()] == [b + 3, b + 4, b + 5]
    assert spool.stats.dropped_full == 2 and len(spool) == 3
    assert any("full" in r.message and "oldest" in r.message for r in caplog.records)
    small = EventSpool(tmp_path / "bytes", max_bytes=1024)
    for i in range(40):
        small.append(TOPIC, {"event_id": f"e{i}", "pad": "x" * 40})
    assert small.size_bytes <= 1024 and small.pending()[-1].seq - small.pending()[0].seq == len(small) - 1


def test_a_corrupt_spool_is_moved_aside_and_replaced(tmp_path: Path, caplog) -> None:
    """Not a crash at every start (systemd would restart the daemon for ever): the damaged file
    is kept aside, said so, and a fresh spool takes the events."""
    d = tmp_path / "spool"
    d.mkdir()
    junk = b"this is not sqlite" * 100
    (d / "events.sqlite3").write_bytes(junk)
    before_ms = int(time.time() * 1000)
    with caplog.at_level("ERROR", logger="daemon.publish.spool"):
        spool = EventSpool(d)
    # the counter is lost with the file: seq goes on from the clock in ms, above any number used
    # before (from 1 again, consumers deduplicating on seq dropped every new event)
    assert len(spool) == 0 and spool.append(TOPIC, {"event_id": "e1"}) >= before_ms
    aside = [p for p in d.iterdir() if p.name.startswith("events.sqlite3.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == junk
    assert any("moved the file aside" in r.getMessage() and aside[0].name in r.getMessage() for r in caplog.records)


def _spool_with_big_events(d: Path, n: int = 120) -> None:
    """``n`` events of ~5 kB (each spills onto overflow pages, where SD-card damage hides from COUNT(*))."""
    spool = EventSpool(d)
    for i in range(n):
        seq = spool.append(TOPIC, {"event_id": f"e{i}", "pad": "x" * 5000})
        if i == 0:
            (d.parent / f"{d.name}.first_seq").write_text(str(seq))
    spool.close()
    con = sqlite3.connect(d / "events.sqlite3")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def _first_seq(d: Path) -> int:
    """The seq ``_spool_with_big_events`` gave its first event (recorded beside the spool)."""
    return int((d.parent / f"{d.name}.first_seq").read_text())


def _damage_page(path: Path, page: int) -> None:
    with open(path, "r+b") as f:
        f.seek(page * 4096)
        f.write(b"\xff" * 4096)


def test_a_damaged_event_row_costs_that_event_not_the_spool(tmp_path: Path, caplog) -> None:
    """One unreadable overflow page passed the open check (COUNT(*) does not read it), then every
    ``pending`` raised and nothing was ever delivered again. Now the damage is found on open, the
    events that can be read are kept, in order, and ``seq`` goes on where it was."""
    d = tmp_path / "spool"
    _spool_with_big_events(d)
    pages = (d / "events.sqlite3").stat().st_size // 4096
    _damage_page(d / "events.sqlite3", pages // 2)
    with caplog.at_level("ERROR", logger="daemon.publish.spool"):
        spool = EventSpool(d)
    kept = spool.pending(0, 1000)
    assert 100 <= len(kept) < 120 and len(spool) == len(kept)
    assert [e.seq for e in kept] == sorted(e.seq for e in kept)
    b = _first_seq(d)
    assert all(json.loads(e.payload)["event_id"] == f"e{e.seq - b}" for e in kept)
    assert spool.append(TOPIC, {"event_id": "new"}) == b + 120, "seq is never reused"
    assert any(p.name.startswith("events.sqlite3.corrupt-") for p in d.iterdir())
    assert any(f"kept the {len(kept)} undelivered" in r.getMessage() for r in caplog.records)


def test_a_row_damaged_while_open_is_skipped_not_a_stop(tmp_path: Path) -> None:
    """Damage after the open check: ``pending`` skips (and deletes) the unreadable rows and
    returns the events after them, instead of raising on every pass for good."""
    d = tmp_path / "spool"
    _spool_with_big_events(d)
    spool = EventSpool(d)
    spool._db.execute("PRAGMA cache_size=1")  # read the pages from the file again, as after eviction
    pages = (d / "events.sqlite3").stat().st_size // 4096
    _damage_page(d / "events.sqlite3", pages // 2)
    got = spool.pending(0, 1000)
    assert 100 <= len(got) < 120
    assert got[-1].seq == _first_seq(d) + 119, "the events after the damaged one still go out"


def test_a_row_deleted_as_unreadable_leaves_the_byte_count_exact(tmp_path: Path) -> None:
    """The deleted row's bytes leave the size bound's count too: it kept them, and the bound
    dropped events earlier than ``max_bytes`` for the rest of the run."""
    d = tmp_path / "spool"
    _spool_with_big_events(d)
    spool = EventSpool(d)
    spool._db.execute("PRAGMA cache_size=1")
    pages = (d / "events.sqlite3").stat().st_size // 4096
    _damage_page(d / "events.sqlite3", pages // 2)
    got = spool.pending(0, 1000)
    assert len(got) < 120, "the damage must cost at least one row for this test to mean anything"
    assert len(spool) == len(got)
    assert spool.size_bytes == sum(len(e.payload) for e in got)
    spool.remove([e.seq for e in got])
    assert (len(spool), spool.size_bytes) == (0, 0)


def test_an_unwritable_spool_directory_is_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.write_text("a file where the spool directory should be")
    with pytest.raises(SpoolError, match="make state_dir writable"):
        EventSpool(d)


# -- delivery through a real broker --------------------------------------------------------------
@pytest.fixture
def durable_broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto that keeps sessions across restarts (and saves at every change, so even SIGKILL keeps
    the subscriber's subscription): the test subscriber then misses nothing while it reconnects."""
    work = tmp_path / "broker"
    work.mkdir()
    broker = Broker(port=free_port(), workdir=work, extra_conf=(
        f"persistence true\npersistence_location {work}/\nautosave_interval 1\nautosave_on_changes true\nuser {getpass.getuser()}\n"))
    broker.start()
    try:
        yield broker
    finally:
        if broker.proc and broker.proc.poll() is None:
            os.kill(broker.proc.pid, signal.SIGCONT)
        broker.stop()


class DurableSubscriber:
    """A persistent-session QoS 1 subscriber: what a consumer of the event stream should be."""

    def __init__(self, port: int) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"durable-{port}", clean_session=False)
        self.client.on_message = self._on_message
        ready = threading.Event()

        def on_connect(client, userdata, flags, reason, props=None):
            client.subscribe(TOPIC, qos=1)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a, **k: ready.set()
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(5), "durable subscriber did not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.events.append(json.loads(msg.payload))

    def wait_count(self, n: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.events) >= n:
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # a late duplicate would show up here
        with self.lock:
            return list(self.events)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _publisher(port: int, tag: str) -> MqttPublisher:
    return MqttPublisher(MqttConfig(host="127.0.0.1", port=port, discovery=False), "biod/t", client_id=f"biod-spool-{tag}")


def _assert_exactly_once_in_order(received: list[dict], expected_ids: list[str]) -> None:
    ids = [e["event_id"] for e in received]
    assert sorted(ids) == sorted(expected_ids), f"missing {set(expected_ids) - set(ids)}, duplicated {[i for i in set(ids) if ids.count(i) > 1]}"
    assert ids == expected_ids, "events arrived out of order"
    seqs = [e["seq"] for e in received]
    assert seqs == sorted(seqs)


@pytest.mark.timeout(60)
def test_outage_mid_stream_delivers_everything_in_order_once(tmp_path: Path, durable_broker: Broker) -> None:
    sub = DurableSubscriber(durable_broker.port)
    pub = _publisher(durable_broker.port, "outage")
    pub.start()
    assert pub.wait_connected(5)
    sender = SpoolSender(EventSpool(tmp_path / "spool"), pub)
    sender.start()
    try:
        ids = [f"before-{i}" for i in range(10)]
        for i in ids:
            sender.submit(TOPIC, {"event_id": i})
        assert sender.flush(10), "events before the outage were not acknowledged"
        assert len(sub.wait_count(10, 10)) == 10  # else the broker re-delivers its own unacked ones to the subscriber
        durable_broker.stop()
        during = [f"during-{i}" for i in range(50)]
        for i in during:
            sender.submit(TOPIC, {"event_id": i})
        assert len(sender.spool) == 50, "events must wait on disk while the broker is away"
        durable_broker.start()
        assert sender.flush(30), f"{len(sender.spool)} events still spooled after the broker came back"
        _assert_exactly_once_in_order(sub.wait_count(60, 10), ids + during)
        assert sender.handed == 60
    finally:
        sender.stop()
        pub.close()
        sub.close()


@pytest.mark.timeout(60)
def test_paho_resends_its_in_flight_events_and_the_spool_does_not(tmp_path: Path, durable_broker: Broker) -> None:
    """The broker freezes (SIGSTOP: TCP still accepts, no PUBACK comes) while events are in flight,
    then dies (SIGKILL) and restarts. paho (clean_session=False) re-sends what it holds; the spool
    must neither re-send those (duplicates) nor let newer events overtake them (order)."""
    sub = DurableSubscriber(durable_broker.port)
    pub = _publisher(durable_broker.port, "inflight")
    pub.start()
    assert pub.wait_connected(5)
    sender = SpoolSender(EventSpool(tmp_path / "spool"), pub, window=5)
    sender.start()
    try:
        time.sleep(1.5)  # let the broker autosave the subscriber's session
        assert durable_broker.proc is not None
        os.kill(durable_broker.proc.pid, signal.SIGSTOP)
        first = [f"inflight-{i}" for i in range(5)]
        for i in first:
            sender.submit(TOPIC, {"event_id": i})
        deadline = time.monotonic() + 5
        while sender.in_flight < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sender.in_flight == 5, "the window's events should be in paho, waiting for PUBACK"
        later = [f"later-{i}" for i in range(15)]
        for i in later:
            sender.submit(TOPIC, {"event_id": i})
        os.kill(durable_broker.proc.pid, signal.SIGKILL)
        durable_broker.proc.wait(5)
        durable_broker.proc = None
        durable_broker.start()
        assert sender.flush(30), f"{len(sender.spool)} events still spooled"
        _assert_exactly_once_in_order(sub.wait_count(20, 10), first + later)
        assert sender.handed == 20, "the spool handed paho an event twice"
    finally:
        sender.stop()
        pub.close()
        sub.close()


@pytest.mark.timeout(60)
def test_undelivered_events_are_sent_after_a_publisher_restart(tmp_path: Path, durable_broker: Broker) -> None:
    sub = DurableSubscriber(durable_broker.port)
    durable_broker.stop()
    pub = _publisher(durable_broker.port, "restart")
    pub.start()
    sender = SpoolSender(EventSpool(tmp_path / "spool"), pub)
    sender.start()
    ids = [f"e{i}" for i in range(10)]
    for i in ids:
        sender.submit(TOPIC, {"event_id": i})
    sender.stop()
    pub.close()
    sender.spool.close()

    durable_broker.start()
    pub2 = _publisher(durable_broker.port, "restart")
    spool2 = EventSpool(tmp_path / "spool")
    assert len(spool2) == 10
    sender2 = SpoolSender(spool2, pub2)
    pub2.start()
    sender2.start()
    try:
        assert sender2.flush(20)
        _assert_exactly_once_in_order(sub.wait_count(10, 10), ids)
        assert len(EventSpool(tmp_path / "spool")) == 0, "delivered events must be gone from disk"
    finally:
        sender2.stop()
        pub2.close()
        sub.close()


@pytest.mark.timeout(60)
def test_acknowledged_events_whose_delete_failed_are_deleted_at_the_next_step(tmp_path: Path, durable_broker: Broker) -> None:
    """The spool's delete of acknowledged events fails once (a full disk): they were already out
    of the in-flight map, so they stayed in the spool for the rest of the run, counted as pending,
    and were sent again after a restart (review, 2026-11-24). Now the delete is retried."""
    pub = _publisher(durable_broker.port, "remove")
    pub.start()
    assert pub.wait_connected(5)
    spool = EventSpool(tmp_path / "spool")
    remove, failures, disk_full = spool.remove, [], threading.Event()
    disk_full.set()

    def remove_unless_full(seqs: list[int]) -> None:
        if seqs and disk_full.is_set():
            failures.append(list(seqs))
            raise sqlite3.OperationalError("database or disk is full")
        remove(seqs)

    spool.remove = remove_unless_full  # type: ignore[method-assign]
    sender = SpoolSender(spool, pub)
    sender.start()
    try:
        for i in range(5):
            sender.submit(TOPIC, {"event_id": f"e{i}"})
            time.sleep(0.05)
        # while the delete keeps failing, new events still go out (they did not: every step
        # retried the delete first and raised before sending)
        deadline = time.monotonic() + 10
        while sender.handed < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sender.handed == 5 and len(failures) >= 2 and len(spool) == 5
        disk_full.clear()
        assert sender.flush(10), f"{len(spool)} acknowledged events stayed in the spool after the failed delete"
        assert len(spool) == 0 and spool.stats.delivered == 5 and sender.handed == 5
    finally:
        sender.stop()
        pub.close()
