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


def test_template_adaptation_is_opt_in() -> None:
    assert parse_config(GOOD).identity.engine_config().adapt is False
    cfg = parse_config(GOOD + "identity:\n  adapt: true\n  adapt_max_prototypes: 2\n").identity.engine_config()
    assert cfg.adapt is True and cfg.adapt_max_prototypes == 2


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
    with pytest.raises(ConfigError, match="neither ecg.port nor ecg.match_serial is set: give the device path"):
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


def test_check_config_on_the_example_from_a_shell_and_with_the_credentials(tmp_path, monkeypatch, capsys) -> None:
    import base64
    from pathlib import Path

    from daemon.cli import main

    example = Path(__file__).resolve().parents[1] / "deploy" / "biod.example.yaml"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["check-config", str(example)]) == 0  # a login shell has no $CREDENTIALS_DIRECTORY
    out = capsys.readouterr().out
    assert "mqtt_password, template_key" in out and "not checked here" in out
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt_password").write_text("s3cret\n")
    assert main(["check-config", str(example), "--credentials-dir", str(creds)]) == 2  # no template key yet
    assert "template_key" in capsys.readouterr().err
    (creds / "template_key").write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    assert main(["check-config", str(example), "--credentials-dir", str(creds)]) == 0
    assert f"read from {creds}" in capsys.readouterr().out


def test_commands_take_the_config_from_biod_config_when_no_flag_is_given(tmp_path, monkeypatch, capsys) -> None:
    from daemon.cli import main

    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"hub:\n  id: kitchen\nstate_dir: {tmp_path / 'state'}\n")
    monkeypatch.setenv("BIOD_CONFIG", str(cfg))
    main(["doctor", "--no-broker"])  # fails on the missing state dir, which is the point here
    out = capsys.readouterr().out
    assert f"{tmp_path / 'state'}/identity/templates.json" in out  # the hub's store, not the default
    assert "BLE adapter" not in out  # no IMU configured: Bluetooth is not this hub's business
    monkeypatch.setenv("BIOD_CONFIG", str(tmp_path / "missing.yaml"))
    assert main(["people", "list"]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err
