"""A models_dir that is wrong or holds a damaged ECG model: said at the config's line, or,
when the daemon runs without identity, said where a user looks (stats topic, systemd STATUS)."""
from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

from daemon.app import BiodApp
from daemon.biometrics import MODELS_DIR
from daemon.config import ConfigError, parse_config
from daemon.publish.mqtt import MqttPublisher
from daemon.publish.spool import EventSpool
from tests.conftest import Broker, retained_snapshot, running


def test_a_models_dir_without_the_ecg_model_is_refused_at_its_line(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(ConfigError, match=rf"biod.yaml:2: models_dir: .*{where} holds no ecg_dualtask.json"):
            parse_config(f"hub: {{id: m}}\nmodels_dir: {where}\n", "biod.yaml")
    shutil.copytree(MODELS_DIR, tmp_path / "models")
    assert parse_config(f"models_dir: {tmp_path / 'models'}\n").models_dir == tmp_path / "models"


def test_a_damaged_ecg_model_turns_identity_off_visibly(tmp_path, mosquitto: Broker) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR, models)
    model = models / "ecg_dualtask.tflite"
    model.write_bytes(model.read_bytes()[:1000])  # a copy cut short
    cfg = parse_config(f"hub: {{id: broken}}\nstate_dir: {tmp_path / 'state'}\nmodels_dir: {models}\n"
                       f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
                       "ecg: {source: emulator, emulator: {recording: ludb-16}}\n")

    app = BiodApp(cfg)
    assert app.ecg_model is None  # heart rate goes on without it; identity cannot

    async def main() -> dict:
        async with running(app):
            deadline = time.monotonic() + 30
            stats: dict = {}
            while time.monotonic() < deadline and "identity_available" not in stats:
                await asyncio.sleep(0.2)
                got = await asyncio.to_thread(retained_snapshot, mosquitto.port, "biod/broken/stats")
                stats = json.loads(got.get("biod/broken/stats", "{}"))
            return stats

    stats = asyncio.run(main())
    assert stats.get("identity_available") is False, stats
    # what systemd's STATUS= shows (the line run() hands the notifier), first of all
    status = app.status_line(MqttPublisher(cfg.mqtt, cfg.topic_prefix, client_id="status-only"),
                             EventSpool(tmp_path / "spool"))
    assert status.startswith("identity OFF: the ECG model cannot be used"), status
