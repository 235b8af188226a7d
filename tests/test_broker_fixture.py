"""The tests' own broker start: a port taken between the pick and mosquitto's bind (a CI
failure: "Address already in use") is re-picked instead of failing an unrelated test."""
from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import Broker, _ephemeral_range, free_port


def test_a_port_taken_before_the_first_start_is_re_picked(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    try:
        occupied = taken.getsockname()[1]
        broker = Broker(port=occupied, workdir=tmp_path, tls_port=free_port(exclude=(occupied,)))
        broker.start()
        try:
            assert broker.port != occupied
            for port in (broker.port, broker.tls_port):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        finally:
            broker.stop()
    finally:
        taken.close()


def test_picked_ports_avoid_the_range_outgoing_connections_take_theirs_from() -> None:
    lo, hi = _ephemeral_range()
    ports = {free_port() for _ in range(50)}
    assert not any(lo <= p <= hi for p in ports)
    assert free_port(exclude=tuple(ports)) not in ports
