"""``biod demo``: the whole path on a machine with no hardware and no broker installed.

It starts a real MQTT broker in-process (amqtt, a complete MQTT 3.1.1 broker, not a fake), the
emulated ECG box on a real pseudo-terminal, and the daemon exactly as ``biod run`` would run it,
then subscribes like Home Assistant would and prints every message that arrives.
"""
from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from daemon.config import default_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_embedded_broker(port: int):
    """A real broker in this process; returns the amqtt Broker (``await broker.shutdown()``)."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise SystemExit("biod demo needs the embedded broker: pip install 'biod[demo]'") from exc
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    return broker


def _short(payload: bytes, limit: int = 110) -> str:
    text = payload.decode(errors="replace")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and "unique_id" in obj:
            return f"<discovery {obj.get('name')!r} unique_id={obj['unique_id']}>"
    except ValueError:
        pass
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def run_demo(seconds: float = 20.0, speed: float = 1.0) -> int:
    from daemon.app import BiodApp

    port = free_port()
    broker = await start_embedded_broker(port)
    state = Path(tempfile.mkdtemp(prefix="biod-demo-"))
    cfg = default_config(
        hub={"id": "demo", "name": "biod demo hub"},
        mqtt={"host": "127.0.0.1", "port": port},
        ecg={"source": "emulator", "emulator": {"speed": speed}},
        state_dir=str(state),
    )
    print(f"biod demo: embedded MQTT broker on 127.0.0.1:{port}; emulated ECG box on a pseudo-terminal; "
          f"streaming for {seconds:.0f} s (Ctrl-C to stop)")
    t0 = time.monotonic()
    seen: list[str] = []
    lock = threading.Lock()

    def on_message(client, userdata, msg) -> None:
        line = f"[{time.monotonic() - t0:6.1f} s] {msg.topic}{' (retained)' if msg.retain else ''}: {_short(msg.payload)}"
        with lock:
            seen.append(msg.topic)
        print(line, flush=True)

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="biod-demo-viewer")
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe([("biod/#", 1), ("homeassistant/#", 1)])
    sub.loop_start()

    stop = asyncio.Event()
    app_task = asyncio.create_task(BiodApp(cfg).run(stop))
    try:
        await asyncio.wait_for(asyncio.shield(app_task), timeout=seconds)
    except asyncio.TimeoutError:
        pass
    stop.set()
    code = await app_task
    await asyncio.sleep(0.5)
    sub.loop_stop()
    sub.disconnect()
    await broker.shutdown()
    hr = sum(1 for t in seen if t.endswith("/heart_rate/state"))
    print(f"biod demo: done; {len(seen)} messages, {hr} heart-rate updates; daemon exit code {code}")
    return 0 if code == 0 and hr > 0 else 1
