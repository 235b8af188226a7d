"""``biod demo``: the whole path on a machine with no hardware and no broker installed.

It starts a real MQTT broker in-process (amqtt, a complete MQTT 3.1.1 broker, not a fake),
enrols three persons with the same code as ``biod calibrate`` from one real ECG recording each,
then runs the daemon exactly as ``biod run`` runs it, reading an emulated ECG box through
pyserial on a real pseudo-terminal and an emulated MetaMotion over the BLE code path. The three
persons take turns wearing the sensors, using recordings made on another day, and then a
stranger does. It subscribes as Home Assistant would and prints what arrives: availability,
discovery, wearing-session events, the current wearer with activity, and heart rate.
"""
from __future__ import annotations

import asyncio
import io
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from daemon.config import default_config

HOUSEHOLD = {"alice": ("ecgid-p02-r1", "ecgid-p02-r4"),
             "bob": ("ecgid-p26-r1", "ecgid-p26-r3"),
             "carol": ("ecgid-p34-r1", "ecgid-p34-r3")}
STRANGER = "ecgid-p05-r1"


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


class Viewer:
    """Subscribes like Home Assistant and prints a readable line per interesting message."""

    def __init__(self, port: int, prefix: str) -> None:
        self.t0 = time.monotonic()
        self.prefix = prefix
        self.events: list[dict] = []
        self.heart_rates = 0
        self._last_hr = 0.0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="biod-demo-viewer")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{prefix}/#", 1), ("homeassistant/#", 1)])
        self.client.loop_start()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {text}", flush=True)

    def _on_message(self, client, userdata, msg) -> None:
        topic, text = msg.topic, msg.payload.decode(errors="replace")
        if topic.startswith("homeassistant/"):
            if text:
                name = json.loads(text).get("name")
                self.say(f"discovery {topic.split('/')[1]}: {name!r}")
            return
        short = topic[len(self.prefix) + 1:]
        if short == "events":
            e = json.loads(text)
            with self._lock:
                self.events.append(e)
            a = e["after"]
            self.say(f"EVENT {e['type']:<6} wearer={a['wearer']!r} confidence={a['confidence']:.2f} "
                     f"activity={a.get('activity')} heart_rate={a.get('heart_rate_bpm')}")
        elif short == "sensor/heart_rate/state":
            self.heart_rates += 1
            if time.monotonic() - self._last_hr > 3:
                self._last_hr = time.monotonic()
                self.say(f"heart rate {text} bpm")
        elif short in ("availability", "wearer") or short.startswith("person/"):
            self.say(f"{short}: {text}")

    def wait_event(self, predicate, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [e for e in self.events if predicate(e)]
            if found:
                return found[0]
            time.sleep(0.1)
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def enrol_household(state: Path, speed: float) -> None:
    from daemon.calibrate import run_calibrate

    for name, (enrol_rec, _) in HOUSEHOLD.items():
        cfg = default_config(state_dir=str(state), hub={"id": "demo", "name": "biod demo hub"},
                             identity={"min_enrol_windows": 12},
                             ecg={"source": "emulator", "emulator": {"recording": enrol_rec, "speed": 10 * speed, "loop": False}})
        out = io.StringIO()
        code = run_calibrate(cfg, name, seconds=20, walk=False, out=out)
        summary = [line.strip() for line in out.getvalue().splitlines() if line.strip().startswith(("accepted", "REFUSED", "threshold"))]
        print(f"biod demo: calibrate {name} from {enrol_rec}: " + " | ".join(summary), flush=True)
        if code != 0:
            raise SystemExit(f"biod demo: enrolling {name} failed:\n{out.getvalue()}")


async def run_demo(speed: float = 4.0, hold_s: float = 12.0) -> int:
    """The demo in a state folder of its own, removed at the end: it holds the demo household's
    biometric templates (unencrypted) and the event spool, which must not pile up in /tmp."""
    with tempfile.TemporaryDirectory(prefix="biod-demo-") as state:
        return await _demo(Path(state), speed, hold_s)


async def _demo(state: Path, speed: float, hold_s: float) -> int:
    from daemon.app import BiodApp
    from firmware_protocol.ecg_serial import Electrode
    from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
    from firmware_protocol.emulators.recordings import load_recording

    port = free_port()
    broker = await start_embedded_broker(port)
    print(f"biod demo: embedded MQTT broker on 127.0.0.1:{port}; state in {state} (removed at the end); "
          f"recordings replayed at {speed:g}x", flush=True)
    await asyncio.to_thread(enrol_household, state, speed)

    link = state / "biod-ecg"
    cfg = default_config(
        hub={"id": "demo", "name": "biod demo hub"}, state_dir=str(state), identity={"min_enrol_windows": 12},
        mqtt={"host": "127.0.0.1", "port": port},
        ecg={"source": "serial", "port": str(link), "stall_timeout_s": 1.5},
        imu={"enabled": True, "source": "emulator", "emulator": {"speed": speed}},
    )
    viewer = Viewer(port, cfg.topic_prefix)
    stop = asyncio.Event()
    app_task = asyncio.create_task(BiodApp(cfg).run(stop))
    outcome: list[tuple[str, str | None]] = []
    # One box on the shelf, plugged in all along: wearers change by taking the electrodes off
    # and the next person putting them on (serial unplug/replug is exercised by the tests).
    all_off = Electrode.RA | Electrode.LA | Electrode.LL
    box = EcgBoxEmulator(load_recording(STRANGER), rate_hz=500, speed=speed, loop=True)
    box.set_lead_off(all_off)
    box.open_pty(link=str(link))
    box.start()
    try:
        await asyncio.sleep(1.0)
        for who, recording in [*((n, r[1]) for n, r in HOUSEHOLD.items()), ("a stranger", STRANGER)]:
            when = "never enrolled" if who == "a stranger" else "another day than the enrolment"
            viewer.say(f"--- {who} puts the sensors on (recording {recording}, {when})")
            rec = load_recording(recording)
            box.set_recording(rec)
            box.set_lead_off(Electrode.NONE)
            # take the electrodes off before the recording would loop: ECG-ID records start with
            # a second or two of flat line, which the daemon rightly reads as electrodes off
            off_at = time.monotonic() + (rec.leads_mv.shape[0] / rec.fs_hz - 0.5) / speed
            n0 = len(viewer.events)
            ev = await asyncio.to_thread(viewer.wait_event, lambda e: e["type"] == "new" and e in viewer.events[n0:]
                                         and e["after"]["wearer"] is not None, 60 / speed + 15)
            if ev and ev["after"]["wearer"] == "unknown" and who in HOUSEHOLD:
                ev = await asyncio.to_thread(viewer.wait_event, lambda e: e in viewer.events[n0:] and
                                             e["after"]["wearer"] == who, 30 / speed + 5) or ev
            outcome.append((who, ev["after"]["wearer"] if ev else None))
            await asyncio.sleep(max(0.0, min(hold_s / speed, off_at - time.monotonic())))
            viewer.say(f"--- {who} takes the electrodes off")
            box.set_lead_off(all_off)
            await asyncio.sleep(8 / speed + 2)
    finally:
        stop.set()
        code = await app_task
        box.close()
        await asyncio.sleep(0.5)
        viewer.close()
        await broker.shutdown()
    print("\nbiod demo: who was identified (all four persons are outside the model's training data)")
    for who, got in outcome:
        expected = who if who in HOUSEHOLD else "unknown"
        verdict = "correct" if got == expected else ("FALSE ACCEPT" if who not in HOUSEHOLD else "WRONG")
        print(f"  {who:<11} -> {got!s:<8} {verdict}")
    if any(got != (who if who in HOUSEHOLD else "unknown") for who, got in outcome):
        print("  (the ECG model misses its identity targets on unseen persons: see docs/MODELS.md)")
    print(f"biod demo: {len(viewer.events)} events, {viewer.heart_rates} heart-rate updates; daemon exit code {code}")
    return 0 if code == 0 and viewer.heart_rates > 0 and all(got is not None for _, got in outcome) else 1
