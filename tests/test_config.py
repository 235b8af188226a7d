"""Configuration is validated once, with the YAML line and a fix for every problem."""
from __future__ import annotations

import pytest

from daemon.config import ConfigError, load_config, parse_config

GOOD = """\
hub:
  id: living-room
ecg:
  source: serial
  port: /dev/biod-ecg
  rate_hz: 500
mqtt:
  host: broker.local
  username: biod
  password_env: BIOD_MQTT_PASSWORD
"""


def test_valid_config_parses_with_defaults() -> None:
    cfg = parse_config(GOOD)
    assert cfg.hub.id == "living-room"
    assert cfg.ecg.port == "/dev/biod-ecg"
    assert cfg.topic_prefix == "biod/living-room"
    assert cfg.mqtt.qos == 1 and cfg.mqtt.discovery_prefix == "homeassistant"


def test_unknown_key_names_its_line_and_the_known_keys() -> None:
    text = GOOD.replace("  rate_hz: 500", "  rate_hz: 500\n  baudrate: 115200")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "biod.yaml")
    msg = str(err.value)
    assert "biod.yaml:7: ecg.baudrate: unknown key" in msg
    assert "baud" in msg.split("known keys here:")[1]


def test_bad_value_names_its_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace("rate_hz: 500", "rate_hz: 300"), "biod.yaml")
    assert str(err.value).startswith("biod.yaml:6: ecg.rate_hz:")


def test_serial_source_without_port_explains_the_fix() -> None:
    with pytest.raises(ConfigError, match="ecg.port is not set"):
        parse_config("ecg:\n  source: serial\n")


def test_invalid_yaml_is_reported_with_a_line() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml:[23]: not valid YAML"):
        parse_config("hub:\n  id: [unclosed\n", "x.yaml")


def test_hub_id_must_be_topic_safe() -> None:
    with pytest.raises(ConfigError, match="hub.id"):
        parse_config("hub:\n  id: 'a/b'\n")


def test_two_password_sources_are_rejected() -> None:
    with pytest.raises(ConfigError, match="only one of"):
        parse_config("mqtt:\n  password: x\n  password_env: Y\n")


def test_password_from_env_and_credentials(tmp_path, monkeypatch) -> None:
    cfg = parse_config(GOOD)
    monkeypatch.delenv("BIOD_MQTT_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="BIOD_MQTT_PASSWORD is not set"):
        cfg.mqtt.resolve_password()
    monkeypatch.setenv("BIOD_MQTT_PASSWORD", "s3cret")
    assert cfg.mqtt.resolve_password() == "s3cret"
    (tmp_path / "mqtt_password").write_text("fromcred\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cred = parse_config("mqtt:\n  password_credential: mqtt_password\n")
    assert cred.mqtt.resolve_password() == "fromcred"


def test_missing_file_says_what_to_do(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_example_config_in_deploy_is_valid() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "deploy" / "biod.example.yaml"
    cfg = load_config(example)
    assert cfg.hub.id
