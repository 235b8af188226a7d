"""Configuration is validated once, with the YAML line and a fix for every problem."""
from __future__ import annotations

import re
from pathlib import Path

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


@pytest.mark.parametrize("key,quoted,value", [("rate_hz: 500", 'rate_hz: "1000"', 1000),
                                               ("mqtt:", 'mqtt:\n  qos: "2"', 2)])
def test_a_quoted_number_is_the_number_on_every_numeric_key(key: str, quoted: str, value: int) -> None:
    """`mqtt.port: "1883"` was accepted and `ecg.rate_hz: "500"` refused: a choice of numbers
    now reads a quoted number as the number, as a plain number field always did."""
    text = GOOD.replace(key, quoted, 1) if key in GOOD else GOOD + quoted + "\n"
    cfg = parse_config(text)
    assert (cfg.ecg.rate_hz if "rate_hz" in key else cfg.mqtt.qos) == value
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace("rate_hz: 500", 'rate_hz: "300"'), "biod.yaml")
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


@pytest.mark.parametrize("key,value,why", [
    ("topic_prefix", "biod/kitchen/", "no '/' at the start or end"),
    ("topic_prefix", "home//biod", "none empty"),
    ("topic_prefix", "home/+/biod", "wildcards"),
    ("discovery_prefix", "homeassistant/#", "wildcards"),
    ("discovery_prefix", "", "none empty"),
])
def test_mqtt_prefixes_must_be_publishable_topics(key: str, value: str, why: str) -> None:
    """Passed check-config before, then gave Home Assistant topics with '//' (every entity
    unavailable) or a will topic the broker refuses (no connection at all)."""
    with pytest.raises(ConfigError, match=why) as err:
        parse_config(f"hub:\n  id: k\nmqtt:\n  {key}: '{value}'\n")
    assert f"<config>:4: mqtt.{key}: '{value}'" in str(err.value)
    assert parse_config(f"hub:\n  id: k\nmqtt:\n  {key}: home/hub-1\n").mqtt.model_dump()[key] == "home/hub-1"


def test_two_password_sources_are_rejected() -> None:
    with pytest.raises(ConfigError, match="only one of"):
        parse_config("mqtt:\n  password: x\n  password_env: Y\n")


@pytest.mark.parametrize("source", ["password: x", "password_env: Y", "password_credential: mqtt_password"])
def test_a_password_without_a_username_is_rejected(source) -> None:
    """MQTT sends a password only with a user name: paho dropped it without a word and the
    broker refused the hub as 'not authorised'."""
    with pytest.raises(ConfigError, match=r"<config>:1: mqtt: mqtt.password(_env|_credential)? needs mqtt.username"):
        parse_config(f"mqtt:\n  {source}\n")


def test_password_from_env_and_credentials(tmp_path, monkeypatch) -> None:
    cfg = parse_config(GOOD)
    monkeypatch.delenv("BIOD_MQTT_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="BIOD_MQTT_PASSWORD is not set"):
        cfg.mqtt.resolve_password()
    monkeypatch.setenv("BIOD_MQTT_PASSWORD", "s3cret")
    assert cfg.mqtt.resolve_password() == "s3cret"
    (tmp_path / "mqtt_password").write_text("fromcred\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cred = parse_config("mqtt:\n  username: biod\n  password_credential: mqtt_password\n")
    assert cred.mqtt.resolve_password() == "fromcred"
    # install.sh leaves the file empty for the owner to fill: sent as is, the broker refused
    (tmp_path / "mqtt_password").write_text("\n")
    with pytest.raises(ConfigError, match=r"mqtt_password is empty; write the broker password of user 'biod'"):
        cred.mqtt.resolve_password()


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


def test_a_config_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path) -> None:
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes(b"hub:\n  id: kitchen\n  name: K\xfcche\n")  # "Küche" saved as Latin-1
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{cfg}:3: not UTF-8")
    assert "0xfc" in msg and "byte offset 28" in msg and "save it as UTF-8" in msg


def test_a_utf8_config_is_read_as_utf8_whatever_the_locale(tmp_path) -> None:
    cfg = tmp_path / "utf8.yaml"
    cfg.write_bytes("hub:\n  id: kitchen\n  name: Küche\n".encode())
    assert load_config(cfg).hub.name == "Küche"


def test_a_section_given_twice_is_rejected_with_both_lines() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("hub:\n  id: x\nhub:\n  id: y\n", "biod.yaml")
    assert str(err.value).startswith("biod.yaml:3: hub: duplicate key, already given on line 1")


def test_a_second_mqtt_block_cannot_silently_drop_the_credentials() -> None:
    text = GOOD + "mqtt:\n  host: other.local\n"
    with pytest.raises(ConfigError, match=r"biod.yaml:11: mqtt: duplicate key, already given on line 7"):
        parse_config(text, "biod.yaml")


def test_a_duplicate_key_deep_down_is_named_by_its_full_path() -> None:
    text = "ecg:\n  source: replay\n  replay:\n    path: a.hea\n    speed: 2\n    speed: 3\n"
    with pytest.raises(ConfigError, match=r"x.yaml:6: ecg.replay.speed: duplicate key, already given on line 5"):
        parse_config(text, "x.yaml")


def test_keys_that_yaml_reads_as_the_same_value_are_duplicates() -> None:
    # `yes` and `true` are both the boolean true in YAML 1.1, so one would silently replace the other.
    with pytest.raises(ConfigError, match="duplicate key"):
        parse_config("identity:\n  adapt: false\nfoo:\n  yes: 1\n  true: 2\n")


def test_merge_keys_may_still_be_overridden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Overriding a key brought in by `<<:` is what merge keys are for, not a duplicate.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.hea").write_text("a 3 500 10\n")
    text = "ecg:\n  source: replay\n  replay:\n    <<: {path: a.hea, speed: 2}\n    speed: 3\n"
    replay = parse_config(text).ecg.replay
    assert replay is not None and replay.speed == 3 and str(replay.path) == "a.hea"


def test_a_missing_replay_record_is_an_error_at_its_line(tmp_path: Path) -> None:
    """check-config said OK and `biod run` then exited with no line to fix (systemd restarted it
    every few seconds)."""
    text = f"ecg:\n  source: replay\n  replay:\n    path: {tmp_path}/gone.hea\n"
    with pytest.raises(ConfigError, match=r"biod.yaml:4: ecg.replay.path: .*gone.hea is not a file; give the .hea file"):
        parse_config(text, "biod.yaml")
    (tmp_path / "rec.hea").write_text("rec 3 500 10\n")
    text = "imu:\n  source: replay\n  replay:\n    path: ~/rec.hea\n"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path))
        replay = parse_config(text).imu.replay
    assert replay is not None and replay.path == tmp_path / "rec.hea"


@pytest.mark.parametrize("key,text", [
    ("state_dir", "state_dir: biod-state\n"),
    ("identity.store_path", "identity:\n  store_path: identity/templates.json\n"),
    ("models_dir", "models_dir: models\n"),
])
def test_relative_state_paths_are_refused(key: str, text: str) -> None:
    """`state_dir: ~/biod` was taken literally and relative paths resolved per command: calibrate
    saved templates under its own working directory that the service never read."""
    with pytest.raises(ConfigError, match=rf"biod.yaml:\d+: {re.escape(key)}: {re.escape(key)} must be an absolute path"):
        parse_config(text, "biod.yaml")


def test_home_in_state_dir_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_config("state_dir: ~/biod\n").state_dir == tmp_path / "biod"


def test_unknown_key_in_an_optional_section_lists_the_known_keys() -> None:
    text = "ecg:\n  source: replay\n  replay:\n    path: a.hea\n    bogus: 1\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "biod.yaml")
    msg = str(err.value)
    assert "biod.yaml:5: ecg.replay.bogus: unknown key (typo?); known keys here: loop, path, speed" in msg
    with pytest.raises(ConfigError, match=r"imu.replay.spede: unknown key \(typo\?\); known keys here: loop, path, speed"):
        parse_config("imu:\n  replay:\n    path: a.hea\n    spede: 2\n")


def _tls_config(**files: object) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in files.items())
    return f"mqtt:\n  host: broker.local\n  tls:\n    enabled: true\n{lines}"


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_enabled_tls_with_a_missing_file_is_a_config_error_at_its_line(tmp_path, key: str) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as err:
        parse_config(_tls_config(insecure="false", **{key: str(missing)}), "biod.yaml")
    msg = str(err.value)
    assert msg.startswith(f"biod.yaml:6: mqtt.tls.{key}: {missing} does not exist; give the path of ")
    assert "mqtt.tls.enabled: false" in msg


def test_enabled_tls_with_existing_files_passes_and_disabled_tls_is_not_checked(tmp_path) -> None:
    from tests.conftest import make_test_ca, sign_test_cert

    make_test_ca(tmp_path)
    sign_test_cert(tmp_path, "client", "extendedKeyUsage=clientAuth\n")
    cfg = parse_config(_tls_config(ca_file=tmp_path / "ca.crt", cert_file=tmp_path / "client.crt",
                                   key_file=tmp_path / "client.key"))
    assert cfg.mqtt.tls.ca_file == tmp_path / "ca.crt"
    off = parse_config(f"mqtt:\n  tls:\n    enabled: false\n    ca_file: {tmp_path / 'missing.pem'}\n")
    assert off.mqtt.tls.ca_file == tmp_path / "missing.pem"


def test_tls_files_that_are_not_what_they_should_be_are_config_errors(tmp_path) -> None:
    """A CA file that holds no certificate, a key that is not the certificate's, or a key
    without a certificate passed check-config; `biod run` then died with ssl.SSLError (or
    silently dropped the key)."""
    from tests.conftest import make_test_ca, sign_test_cert

    make_test_ca(tmp_path)
    sign_test_cert(tmp_path, "client", "extendedKeyUsage=clientAuth\n")
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"biod.yaml:5: mqtt.tls.ca_file: .*notes.txt holds no usable "
                                          r"PEM certificate .*give the path of the CA certificate"):
        parse_config(_tls_config(ca_file=tmp_path / "notes.txt"), "biod.yaml")
    with pytest.raises(ConfigError, match=r"mqtt.tls: key_file is set without cert_file"):
        parse_config(_tls_config(key_file=tmp_path / "client.key"), "biod.yaml")
    with pytest.raises(ConfigError, match=r"mqtt.tls: cert_file .*client.crt and key_file .*ca.key "
                                          r"are not a PEM client certificate and its .*private key"):
        parse_config(_tls_config(cert_file=tmp_path / "client.crt", key_file=tmp_path / "ca.key"), "biod.yaml")


def test_enabled_tls_with_a_directory_instead_of_a_file_says_so(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"biod.yaml:5: mqtt.tls.ca_file: .* is not a file"):
        parse_config(_tls_config(ca_file=tmp_path), "biod.yaml")


def test_check_config_reports_a_missing_tls_file_instead_of_crashing(tmp_path, capsys) -> None:
    from daemon.cli import main

    cfg = tmp_path / "hub.yaml"
    cfg.write_text(_tls_config(ca_file=tmp_path / "ca.pem"))
    assert main(["check-config", str(cfg)]) == 2
    assert f"{cfg}:5: mqtt.tls.ca_file: {tmp_path / 'ca.pem'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["record", "--out", "x", "--seconds", "0"], ["record", "--out", "x", "--seconds", "-5"],
                                  ["calibrate", "--name", "z", "--seconds", "nan"],
                                  ["calibrate", "--name", "z", "--seconds", "inf"], ["demo", "--speed", "0"]])
def test_durations_and_speeds_on_the_command_line_are_checked_at_the_edge(argv, capsys) -> None:
    """`--seconds 0` had failed later as "no DEVICE_INFO: is the box on?" or "check the
    electrodes", and nan/inf with a traceback; argparse now refuses them (exit 2)."""
    from daemon.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "above 0 and below a million" in capsys.readouterr().err
    assert build_parser().parse_args(argv[:-1] + ["2.5"]).__dict__[argv[-2].lstrip("-")] == 2.5


@pytest.mark.parametrize("yaml_text,line,key", [
    ("ecg:\n  source: emulator\n  emulator:\n    recording: ludb-99\n", 4, "ecg.emulator.recording"),
    ("imu:\n  enabled: true\n  source: emulator\n  emulator:\n    recording: nope\n", 5, "imu.emulator.recording")])
def test_an_emulator_recording_that_is_not_shipped_is_named_at_its_line(yaml_text, line, key) -> None:
    """check-config and doctor said OK; `biod run` then failed without a line (ECG) or with a
    KeyError traceback (IMU)."""
    with pytest.raises(ConfigError, match=rf"<config>:{line}: {key}: no shipped recording .*; choose one of .*"):
        parse_config(yaml_text)


@pytest.mark.parametrize("under_systemd", [False, True])
def test_a_state_dir_that_cannot_be_made_says_what_to_do_where_biod_runs(tmp_path, monkeypatch, capsys, under_systemd) -> None:
    """Under the unit only /var/lib/biod is writable (ProtectSystem=strict): there the advice
    to "run biod as its service" was wrong; it names ReadWritePaths= instead."""
    from daemon.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("state_dir: /proc/biod-nowhere/state\n")
    if under_systemd:
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    else:
        monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "state_dir: cannot create or write /proc/biod-nowhere/state" in err
    assert ("ReadWritePaths=" in err) == under_systemd
    assert ("sudo systemctl start biod" in err) != under_systemd


def test_a_state_dir_that_exists_but_cannot_be_written_is_said_at_start(tmp_path, monkeypatch, capsys) -> None:
    """A folder that exists but is read-only for the daemon (outside the unit's ReadWritePaths=,
    a read-only mount) passed the start and failed at the first enrolment or spooled event.
    /proc exists and takes no files, even for root (the tests run as root in CI)."""
    from daemon.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("state_dir: /proc\n")
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "state_dir: cannot create or write /proc" in err and "ReadWritePaths=" in err


def test_enrol_seconds_stays_within_the_enrol_commands_limit_and_a_folder_is_not_a_config(tmp_path) -> None:
    """identity.enrol_seconds accepted up to 1800 while the enrol command refuses above 600 (every
    JSON request without seconds was then refused with a number its sender never sent); and
    check-config on a folder said 'Is a directory; check permissions'."""
    with pytest.raises(ConfigError, match=r"biod.yaml:2: identity.enrol_seconds"):
        parse_config("identity:\n  enrol_seconds: 900\n", "biod.yaml")
    assert parse_config("identity:\n  enrol_seconds: 600\n").identity.enrol_seconds == 600
    with pytest.raises(ConfigError, match="is a folder; give the config file itself"):
        load_config(tmp_path)


def test_a_box_named_without_a_source_is_not_silently_the_emulator() -> None:
    """`ecg: {port: /dev/ttyACM0}` ran the emulator (the default source) and published its
    recording as the wearer's heart rate, ignoring the port."""
    for key in ("port: /dev/ttyACM0", "match_serial: BX-1", "tcp_port: 5000"):
        with pytest.raises(ConfigError, match=rf"biod.yaml:1: ecg: ecg.{key.split(':')[0]} is set but ecg.source is not"):
            parse_config(f"ecg:\n  {key}\n", "biod.yaml")
    assert parse_config("ecg:\n  source: serial\n  port: /dev/ttyACM0\n").ecg.source == "serial"
    assert parse_config("ecg:\n  source: emulator\n  port: /dev/ttyACM0\n").ecg.source == "emulator"  # said, so meant


def test_mqtt_host_is_a_host_not_a_url_or_host_port() -> None:
    """`host: mqtt://127.0.0.1` passed and failed at the first connect as 'Name or service not known'."""
    for bad in ("mqtt://127.0.0.1", "127.0.0.1:1883", "broker/x"):
        with pytest.raises(ConfigError, match=r"biod.yaml:2: mqtt.host: .*not a host name or address.*mqtt.port"):
            parse_config(f"mqtt:\n  host: '{bad}'\n", "biod.yaml")
    for good in ("127.0.0.1", "homeassistant.local", "::1", "[::1]", "bücher.local"):
        assert parse_config(f"mqtt:\n  host: '{good}'\n").mqtt.host == good
    # what the resolver refuses with UnicodeError, which killed paho's network thread for good
    for bad in ("homeassistant..local", "a" * 64 + ".local", ".local"):
        with pytest.raises(ConfigError, match=r"biod.yaml:2: mqtt.host: .*not a valid host name.*empty part"):
            parse_config(f"mqtt:\n  host: '{bad}'\n", "biod.yaml")


def test_infinite_and_nan_numbers_are_refused_and_a_self_referencing_alias_is_an_error() -> None:
    """`.inf` is valid YAML and passed every `gt=0`: an infinite stall timeout never re-opened a
    box that stopped sending. A self-containing alias was a RecursionError traceback."""
    for key in ("ecg:\n  stall_timeout_s: .inf", "imu:\n  scan_timeout_s: .inf", "identity:\n  margin: .nan"):
        with pytest.raises(ConfigError, match=r"biod.yaml:2: .*finite number"):
            parse_config(key + "\n", "biod.yaml")
    with pytest.raises(ConfigError, match=r"biod.yaml:1: mqtt: Input should be a valid dictionary|biod.yaml:1: mqtt"):
        parse_config("mqtt: &a [*a]\n", "biod.yaml")
