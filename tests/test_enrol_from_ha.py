"""Enrolment started from Home Assistant: the text entity sets the name, the button starts a
time-boxed window (as ESPresense does); the daemon enrols from the live ECG, saves the template
privately and announces the new person's entity."""
from __future__ import annotations

import asyncio
import json
import stat

import pytest

from daemon.app import BiodApp
from daemon.config import parse_config
from daemon.identity.store import TemplateStore
from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
from firmware_protocol.emulators.recordings import load_recording
from tests.conftest import until


@pytest.mark.timeout(120)
def test_enrol_from_home_assistant(tmp_path, mosquitto, capture) -> None:
    link = tmp_path / "ecg"
    cfg = parse_config(
        f"hub:\n  id: ha\nstate_dir: {tmp_path / 'state'}\nidentity:\n  min_enrol_windows: 12\n"
        f"ecg:\n  source: serial\n  port: {link}\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {mosquitto.port}\n")
    box = EcgBoxEmulator(load_recording("ecgid-p46-r1"), rate_hz=500, speed=2.0, loop=False)
    box.open_pty(link=str(link))

    async def scenario() -> None:
        app = BiodApp(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(stop))
        try:
            await until(lambda: any(t == "biod/ha/availability" and p == "online" for t, p, _ in capture.messages),
                        20, "availability online")
            capture.client.publish("biod/ha/enrol/name/set", "Dana", qos=1)
            await until(lambda: [p for t, p, _ in capture.messages if t == "biod/ha/enrol/name" and p == "Dana"],
                        10, "the enrol name echoed")
            # an automation's time-boxed enrolment: 10 s (the button uses identity.enrol_seconds)
            capture.client.publish("biod/ha/enrol/set", json.dumps({"name": "Dana", "seconds": 10}), qos=1)
            await asyncio.sleep(0.3)
            box.start()  # Dana sits down with the electrodes on: 20 s of ECG at 2x
            await until(lambda: [p for t, p, _ in capture.messages if t == "biod/ha/enrol/state" and '"done"' in p],
                        40, "enrolment done", poll=0.1)
            # the same name again: refused, and Home Assistant is told why
            capture.client.publish("biod/ha/enrol/set", json.dumps({"name": "Dana", "seconds": 10}), qos=1)
            await until(lambda: [p for t, p, _ in capture.messages if t == "biod/ha/enrol/state" and '"refused"' in p],
                        40, "second enrolment refused", poll=0.1)
        finally:
            stop.set()
            await task

    try:
        asyncio.run(scenario())
    finally:
        box.close()
    states = [json.loads(p) for t, p, _ in capture.messages if t == "biod/ha/enrol/state"]
    assert [s["state"] for s in states][:2] == ["enrolling", "done"]
    assert states[-1]["state"] == "refused" and states[-1]["name"] == "Dana" and len(states[-1]["reason"]) > 10
    assert any(t.endswith("/person_dana_wearing/config") and p for t, p, _ in capture.messages)
    store_path = tmp_path / "state" / "identity" / "templates.json"
    assert [p.name for p in TemplateStore(store_path).list()] == ["Dana"]
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
