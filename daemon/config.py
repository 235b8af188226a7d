"""biod configuration: one YAML file, validated once at the edge.

Everything the daemon does is decided by this file, so it is validated completely before any
device is opened: unknown keys are rejected (a typo must not silently fall back to a default),
and every error names the YAML line it comes from and how to fix it. Secrets never have to live
in the file: they can come from an environment variable or a systemd credential
(``$CREDENTIALS_DIRECTORY``), which is how the hardened unit in ``deploy/`` passes them.
"""
from __future__ import annotations

import os
import re
import ssl
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

if TYPE_CHECKING:
    from daemon.identity.engine import IdentityConfig

__all__ = [
    "BiodConfig",
    "ConfigError",
    "load_config",
    "parse_config",
    "default_config",
]


class ConfigError(Exception):
    """A configuration problem, already phrased for a person: where it is and how to fix it."""


class _Strict(BaseModel):
    # allow_inf_nan: `.inf` is valid YAML and passed every `gt=0`; an infinite stall timeout
    # meant a box that stops sending was never re-opened (review, 2026-11-24)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _digits_as_int(value: Any) -> Any:
    """``"500"`` read as 500. Why: YAML gives a quoted number as a string; pydantic coerces it for a
    plain ``int`` field (``mqtt.port: "1883"`` works) but not for a choice of ints, so the same
    quoting was accepted on one key and refused on the next."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdecimal():
        return int(value.strip())
    return value


def _choice(*values: int) -> Any:
    """One of ``values``; a quoted number counts as the number."""
    return Annotated[Literal[values], BeforeValidator(_digits_as_int)]  # type: ignore[valid-type]


def _where(path: Path) -> str:
    """``path`` for an error message; a relative one says which directory it is relative to."""
    return str(path) if path.is_absolute() else f"{path} (relative to the working directory {Path.cwd()})"


def _absolute(value: Path | None, what: str) -> Path | None:
    """``~`` expanded; a relative path refused. Why: ``biod run`` under systemd works in ``/``,
    ``sudo biod`` in ``/var/lib/biod`` and a shell wherever it is, so a relative state or template
    path would name a different folder for each: calibrate would save templates the service never
    reads."""
    if value is None:
        return None
    value = value.expanduser()
    if not value.is_absolute():
        raise ValueError(f"{what} must be an absolute path (it was {str(value)!r}, which each biod command "
                         f"would resolve against its own working directory); write e.g. {Path('/var/lib/biod') / value}")
    return value


def _shipped_recording(value: str, names: Sequence[str]) -> str:
    if value not in names:
        raise ValueError(f"no shipped recording {value!r}; choose one of {', '.join(names)}")
    return value


class HubConfig(_Strict):
    id: str = Field("biod", description="Unique per hub: MQTT topics and Home Assistant ids derive from it")
    name: str = "biod hub"

    @field_validator("id")
    @classmethod
    def _id_is_topic_safe(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise ValueError("hub.id must be 1-64 characters of letters, digits, '_' or '-' (it becomes an MQTT topic level)")
        return value


class EmulatorConfig(_Strict):
    recording: str = "ludb-16"
    speed: float = Field(1.0, gt=0, le=1000)
    loop: bool = True

    @field_validator("recording")
    @classmethod
    def _shipped_ecg(cls, value: str) -> str:
        """A name the emulator ships, checked here so that check-config and doctor say so at the
        line (it failed only at `biod run`, without one)."""
        from firmware_protocol.emulators.recordings import list_recordings

        return _shipped_recording(value, list_recordings())


class ReplayConfig(_Strict):
    """A recorded file played through the emulated device (``source: replay``)."""

    path: Path = Field(description="WFDB record written by `biod record` (the .hea file)")
    speed: float = Field(1.0, gt=0, le=1000, description="1 = real time")
    loop: bool = False

    @field_validator("path")
    @classmethod
    def _record_exists(cls, value: Path) -> Path:
        """Checked here, at the key's line: found missing only by ``biod run``, it made systemd
        restart the service every few seconds with no line to fix."""
        value = value.expanduser()
        where = _where(value)
        if not value.is_file():
            raise ValueError(f"{where} is not a file; give the .hea file `biod record` wrote, or remove the "
                             "replay section")
        if not os.access(value, os.R_OK):
            raise ValueError(f"{where} is not readable by this user; fix its permissions")
        return value


class EcgConfig(_Strict):
    enabled: bool = True
    source: Literal["emulator", "serial", "tcp", "replay"] = "emulator"
    port: str | None = Field(None, description="serial device, e.g. /dev/biod-ecg (udev symlink) or /dev/ttyACM0; "
                             "leave out to find a USB box by match_serial in /dev/serial/by-id")
    host: str = "127.0.0.1"
    tcp_port: int | None = Field(None, ge=1, le=65535)
    match_serial: str | None = Field(None, description="only accept a box reporting this serial number")
    baud: int = Field(460800, ge=9600, description="the box's baud rate (protocol v1 default 460800)")
    rate_hz: _choice(250, 500, 1000) = 500
    mains_hz: _choice(50, 60) | None = 50
    stall_timeout_s: float = Field(3.0, gt=0)
    boot_wait_s: float = Field(2.0, ge=0, le=30, description=(
        "how long after opening the port the box may take to answer: a board whose USB-serial chip resets the "
        "microcontroller on open (Arduino-style) boots for 1-2 s; 0 for a box that answers at once"))
    emulator: EmulatorConfig = EmulatorConfig()
    replay: ReplayConfig | None = None

    @model_validator(mode="after")
    def _source_needs_address(self) -> "EcgConfig":
        # The default source is the emulator (a bare checkout's demo). A hub config that names
        # its box but leaves out `source` streamed the emulator's ECG as the wearer's, heart
        # rate and "unknown" wearer included, and ignored the port without a word.
        device_keys = [k for k in ("port", "match_serial", "tcp_port", "replay") if k in self.model_fields_set]
        if self.enabled and "source" not in self.model_fields_set and device_keys:
            raise ValueError(f"ecg.{device_keys[0]} is set but ecg.source is not, and the default source is the "
                             "emulator (it would stream a recording as the wearer's ECG and ignore "
                             f"ecg.{device_keys[0]}): set source: serial (or tcp, replay), or source: emulator "
                             "to try the emulator")
        if self.enabled and self.source == "serial" and not (self.port or self.match_serial):
            raise ValueError("ecg.source is 'serial' but neither ecg.port nor ecg.match_serial is set: give the device "
                             "path (e.g. port: /dev/biod-ecg) or the USB box's serial number (match_serial: ...)")
        if self.enabled and self.source == "tcp" and not self.tcp_port:
            raise ValueError("ecg.source is 'tcp' but ecg.tcp_port is not set")
        if self.enabled and self.source == "replay" and self.replay is None:
            raise ValueError("ecg.source is 'replay' but there is no ecg.replay section: give replay: {path: <record>.hea}")
        return self


class ImuEmulatorConfig(_Strict):
    model: Literal["MetaMotionR", "MetaMotionS"] = "MetaMotionR"
    recording: str = "SA01_D01_walking"
    speed: float = Field(1.0, gt=0, le=1000)

    @field_validator("recording")
    @classmethod
    def _shipped_imu(cls, value: str) -> str:
        """As for the ECG's: `biod run` died of a KeyError traceback on an unknown name."""
        from firmware_protocol.emulators.imu_recordings import list_imu_recordings

        return _shipped_recording(value, list_imu_recordings())


class ImuSourceConfig(_Strict):
    enabled: bool = False
    source: Literal["ble", "emulator", "replay"] = "ble"
    address: str | None = Field(None, description="BLE MAC (Linux) of the MetaMotion; or give name")
    name: str | None = Field(None, description="advertised name to scan for, e.g. MetaWear")
    odr_hz: _choice(25, 50, 100, 200, 400, 800) = 100
    acc_range_g: _choice(2, 4, 8, 16) = 8
    gyro_range_dps: _choice(125, 250, 500, 1000, 2000) = 1000
    packed: bool | None = Field(None, description="packed notifications; default: on at >= 100 Hz when the board supports it")
    placement: Literal["waist", "shin", "thigh", "wrist"] = "waist"
    scan_timeout_s: float = Field(10.0, gt=0)
    stall_timeout_s: float = Field(3.0, gt=0)
    emulator: ImuEmulatorConfig = ImuEmulatorConfig()
    replay: ReplayConfig | None = Field(None, description="a `biod record` IMU record played by the emulated board "
                                        "(model from imu.emulator.model)")

    @model_validator(mode="after")
    def _ble_needs_target(self) -> "ImuSourceConfig":
        if self.enabled and self.source == "ble" and not (self.address or self.name):
            raise ValueError("imu.source is 'ble' but neither imu.address nor imu.name is set: give the board's MAC address (find it with `bluetoothctl scan on`: MetaWear boards advertise as 'MetaWear')")
        if self.enabled and self.source == "replay" and self.replay is None:
            raise ValueError("imu.source is 'replay' but there is no imu.replay section: give replay: {path: <record>.hea}")
        return self


class IdentitySection(_Strict):
    """Open-set identity knobs (defaults and their measurements: docs/identity.md)."""

    store_path: Path | None = Field(None, description="default: <state_dir>/identity/templates.json")
    store_key_credential: str | None = Field(None, description="encrypt templates with the key in $CREDENTIALS_DIRECTORY/<name>")
    window: int = Field(5, ge=1, le=60, description="clean windows pooled per score")
    min_pool: int = Field(5, ge=1, le=60)
    margin: float = Field(0.05, ge=0, le=1)
    history: int = Field(8, ge=1, le=100)
    confirm: int = Field(3, ge=1, le=100, description="agreeing decisions before a wearer is announced")

    @field_validator("store_path")
    @classmethod
    def _store_path_absolute(cls, value: Path | None) -> Path | None:
        return _absolute(value, "identity.store_path")
    unknown: int = Field(5, ge=1, le=100, description="rejecting decisions before 'unknown' is announced")
    switch: int = Field(8, ge=1, le=100)
    target_far: float = Field(0.01, gt=0, lt=1)
    far_confidence: float = Field(0.95, ge=0, lt=1, description=(
        "target_far must hold at this percentile of a bootstrap over the impostor persons "
        "(0: the plain impostor quantile); docs/identity.md 'Per-person open-set thresholds'"))
    min_enrol_windows: int = Field(20, ge=5, le=10000)
    enrol_seconds: float = Field(90.0, ge=10, le=600, description="length of an enrolment started from Home Assistant "
                                 "(the enrol command's own limit: 10 to 600 s)")
    adapt: bool = Field(False, description="add confidently identified wearing sessions as extra prototypes of the wearer "
                        "(follows slow ECG drift; docs/identity.md 'Template adaptation' has the measured effect)")
    adapt_max_prototypes: int = Field(3, ge=1, le=20, description="adapted prototypes kept per person, oldest dropped first")

    @model_validator(mode="after")
    def _consistent(self) -> "IdentitySection":
        if self.min_pool > self.window:
            raise ValueError(f"identity.min_pool ({self.min_pool}) cannot exceed identity.window ({self.window})")
        for knob in ("confirm", "unknown", "switch"):
            if getattr(self, knob) > self.history:
                raise ValueError(f"identity.{knob} ({getattr(self, knob)}) cannot exceed identity.history ({self.history})")
        return self

    def engine_config(self) -> "IdentityConfig":
        from daemon.identity.engine import IdentityConfig

        return IdentityConfig(window=self.window, min_pool=self.min_pool, margin=self.margin, history=self.history,
                              confirm=self.confirm, unknown=self.unknown, switch=self.switch,
                              target_far=self.target_far, far_confidence=self.far_confidence,
                              min_enrol_windows=self.min_enrol_windows,
                              adapt=self.adapt, adapt_max_prototypes=self.adapt_max_prototypes)


_TLS_FILE_ROLES = {
    "ca_file": "the CA certificate (PEM) that signed the broker's certificate",
    "cert_file": "this hub's client certificate (PEM)",
    "key_file": "the private key (PEM) of the client certificate",
}


class TlsConfig(_Strict):
    # ``enabled`` must stay declared before the file fields: their validator reads it from info.data.
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(False, description="skip hostname verification (testing only)")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _file_is_readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Check the TLS files here, at the key's line, rather than let paho's tls_set crash ``biod run`` later.

        Only when TLS is enabled: a commented-out broker setup may keep paths that do not exist on this
        machine. A relative path is opened from the daemon's working directory, so the error says which one.
        """
        if value is None or not info.data.get("enabled"):
            return value
        role = _TLS_FILE_ROLES[info.field_name or ""]
        where = _where(value)
        if not value.exists():
            raise ValueError(f"{where} does not exist; give the path of {role}, "
                             "or set mqtt.tls.enabled: false")
        if not value.is_file():
            raise ValueError(f"{where} is not a file; give the path of {role} itself")
        if not os.access(value, os.R_OK):
            raise ValueError(f"{where} is not readable by this user; fix its permissions so the user biod "
                             "runs as can read it (e.g. chgrp biod + chmod g+r)")
        if info.field_name == "ca_file":  # what paho's tls_set would load when biod run starts
            try:
                ssl.create_default_context().load_verify_locations(cafile=str(value))
            except (ssl.SSLError, ValueError) as exc:
                raise ValueError(f"{where} holds no usable PEM certificate ({_ssl_reason(exc)}); give "
                                 f"the path of {role}") from None
        return value

    @model_validator(mode="after")
    def _client_certificate_and_key(self) -> "TlsConfig":
        """The client certificate and its key load together, as paho's tls_set will load them:
        a key without a certificate was silently ignored, and a certificate that is not one, or a
        key that does not belong to it, crashed ``biod run`` with ssl.SSLError."""
        if not self.enabled:
            return self
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file: give both (this hub's client "
                             "certificate and its private key) or neither")
        if self.cert_file is not None:
            try:
                ssl.create_default_context().load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None,
                    password=lambda: b"")  # an encrypted key fails here instead of prompting
            except (ssl.SSLError, ValueError) as exc:
                files = (f"cert_file {self.cert_file} and key_file {self.key_file} are" if self.key_file
                         else f"cert_file {self.cert_file} (no key_file: the key inside it) is")
                raise ValueError(
                    f"{files} not a PEM client certificate and its unencrypted private key "
                    f"({_ssl_reason(exc)}); give "
                    f"{_TLS_FILE_ROLES['cert_file']} and {_TLS_FILE_ROLES['key_file']}") from None
        return self


def _ssl_reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc).replace("_", " ").lower()


class MqttConfig(_Strict):
    host: str = Field("localhost", description="the broker's host name or address, without scheme or port")
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    password_env: str | None = Field(None, description="read the password from this environment variable")
    password_credential: str | None = Field(None, description="read the password from $CREDENTIALS_DIRECTORY/<name>")
    tls: TlsConfig = TlsConfig()
    topic_prefix: str | None = Field(None, description="default: biod/<hub.id>")
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    qos: _choice(0, 1, 2) = Field(1, description=(
        "QoS of the live heart-rate readings only: every state, event, availability and discovery message is "
        "QoS 1 whatever this says (events are delivered at least once, states must arrive)"))
    keepalive_s: int = Field(30, ge=5, le=3600)
    client_id: str | None = None

    @field_validator("host")
    @classmethod
    def _plain_host(cls, value: str) -> str:
        """A URL or host:port here passed and failed at the first connect as "Name or service not
        known", which does not say that the scheme or port was the problem."""
        v = value.strip()
        if "://" in v or "/" in v or (v.count(":") == 1 and not v.startswith("[")) or not v:
            raise ValueError(f"{value!r} is not a host name or address: give the host alone (e.g. 192.168.1.10 or "
                             "homeassistant.local); the port goes in mqtt.port and TLS in mqtt.tls.enabled")
        if not v.startswith("["):
            # What the resolver does first. WHY here: an empty label (`homeassistant..local`) or one
            # over 63 characters raised UnicodeError inside paho's network thread, which catches
            # OSError only: the thread died, nothing retried and the stats said "connecting"
            # (review, 2026-11-24).
            try:
                v.encode("idna")
            except UnicodeError as exc:
                raise ValueError(f"{value!r} is not a valid host name ({exc}): no empty part between dots, "
                                 "at most 63 characters between dots") from None
        return v

    @field_validator("topic_prefix", "discovery_prefix")
    @classmethod
    def _topic_levels(cls, v: str | None) -> str | None:
        """A prefix is where every topic starts: a wildcard in it makes the last-will topic
        invalid (the broker drops every connect) and a '/' at either end or an empty level makes
        topics that differ from those given to Home Assistant, so say so here, not at run time."""
        if v is None:
            return v
        if not v or v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError(f"{v!r}: topic levels separated by single '/', none empty, "
                             "no '/' at the start or end (e.g. biod/kitchen)")
        if any(c in v for c in "+#\0"):
            raise ValueError(f"{v!r}: '+' and '#' are subscription wildcards, not allowed in a "
                             "topic that is published to")
        return v

    @model_validator(mode="after")
    def _one_password_source(self) -> "MqttConfig":
        given = [n for n in ("password", "password_env", "password_credential") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"mqtt: give only one of password, password_env, password_credential (got {', '.join(given)})")
        if given and not self.username:
            # MQTT sends no password without a user name: it was dropped without a word and the
            # broker refused the hub with "not authorised"
            raise ValueError(f"mqtt.{given[0]} needs mqtt.username: MQTT sends a password only with a user name")
        return self

    def resolve_password(self, credentials_dir: str | os.PathLike[str] | None = None) -> str | None:
        """The password from wherever the config says it lives; a clear error if it is missing.
        ``credentials_dir``: where the credential files are (default ``$CREDENTIALS_DIRECTORY``)."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: environment variable {self.password_env} is not set; export it or use password_credential")
            return value
        if self.password_credential:
            directory = credentials_dir or os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ConfigError("mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set; on an installed hub "
                                  "run the command as `sudo biod ...` (it reads /etc/biod/credentials), or "
                                  "export CREDENTIALS_DIRECTORY=<folder holding the password file>; the service "
                                  "gets it from the unit's LoadCredential=")
            path = Path(directory) / self.password_credential
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"mqtt.password_credential: cannot read {path}: {exc.strerror}; put the "
                                  f"broker password of user {self.username!r} there (under systemd the unit's "
                                  "LoadCredential= names the file it is copied from)") from exc
            if not value:
                # WHY an error: install.sh leaves this file empty for the owner to fill; an empty
                # password was sent as is and the broker answered "not authorised"
                hub_file = "/etc/biod/credentials/mqtt_password"
                raise ConfigError(f"mqtt.password_credential: {path} is empty; write the broker password "
                                  f"of user {self.username!r} into it"
                                  + ("" if str(path) == hub_file else f" (on an installed hub: {hub_file})"))
            return value
        return self.password


class BiodConfig(_Strict):
    hub: HubConfig = HubConfig()
    ecg: EcgConfig = EcgConfig()
    imu: ImuSourceConfig = ImuSourceConfig()
    identity: IdentitySection = IdentitySection()
    mqtt: MqttConfig = MqttConfig()
    state_dir: Path = Field(Path("/var/lib/biod"), description="spool and templates; must be writable")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    models_dir: Path | None = Field(None, description="default: the models shipped in the package")

    @field_validator("state_dir", "models_dir")
    @classmethod
    def _paths_absolute(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _absolute(value, info.field_name or "path")

    @field_validator("models_dir")
    @classmethod
    def _models_there(cls, value: Path | None) -> Path | None:
        """A folder with the ECG model's manifest in it. WHY at the line: a wrong models_dir passed
        check-config, and `biod run` then ran without identity (one ERROR at start, heart rate
        still flowing), which a user reads as "nobody recognised"."""
        if value is not None and not (value / "ecg_dualtask.json").is_file():
            raise ValueError(f"{_where(value)} holds no ecg_dualtask.json: give the folder with biod's models "
                             "(the .tflite files and their .json manifests), or leave models_dir out to use the "
                             "ones shipped with biod")
        return value

    @property
    def store_path(self) -> Path:
        return self.identity.store_path or self.state_dir / "identity" / "templates.json"

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix or f"biod/{self.hub.id}"


def default_config(**overrides: Any) -> BiodConfig:
    """The embedded default: the ECG emulator, a broker on localhost, state in the user's cache."""
    data: dict[str, Any] = {"state_dir": str(Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "biod")}
    data.update(overrides)
    return BiodConfig.model_validate(data)


@dataclass(frozen=True)
class _Located:
    """Line numbers (1-based) of every key path in a YAML document."""

    lines: dict[tuple[str | int, ...], int]

    def line_for(self, loc: tuple[str | int, ...]) -> int | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None


def _locate(node: yaml.Node, path: tuple[str | int, ...], out: dict[tuple[str | int, ...], int],
            seen: frozenset[int] = frozenset()) -> None:
    """Line of every key path. ``seen``: the nodes on the way down; an alias that contains itself
    (``x: &a [*a]``) is followed once, not until Python's recursion limit."""
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:
        return
    seen = seen | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (str(key.value),)
            out[child] = key.start_mark.line + 1
            _locate(value, child, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _locate(item, path + (i,), out, seen)


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice; carries the dotted key and both 1-based lines."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(f"duplicate key {key}")
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys at any depth.

    Plain YAML keeps the last of two equal keys, so a second ``mqtt:`` block would silently drop the
    first one's credentials; in a config file a repeated key is always a mistake. Keys merged in with
    ``<<: *anchor`` are exempt: overriding them is what the merge key is for.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_duplicates(node, (), set())
        return super().construct_document(node)

    def _check_duplicates(self, node: yaml.Node, path: tuple[str, ...], seen_nodes: set[int]) -> None:
        if id(node) in seen_nodes:  # an alias (possibly recursive) was already checked where it was defined
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    child = path
                elif isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)  # so that `yes` and `true` are one key, `1` and '1' two
                    child = path + (str(key),)
                    try:
                        earlier = first.setdefault(key, key_node)
                    except TypeError:  # unhashable: SafeConstructor reports it with its own message
                        earlier = key_node
                    if earlier is not key_node:
                        raise _DuplicateKeyError(".".join(child), earlier.start_mark.line + 1,
                                                 key_node.start_mark.line + 1)
                else:
                    child = path + (str(key_node.value),)
                self._check_duplicates(value_node, child, seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicates(item, path + (str(i),), seen_nodes)


def _load_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct in one pass, so that line numbers and data come from the same parse."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def parse_config(text: str, source: str = "<config>") -> BiodConfig:
    """Validate YAML text; raise ConfigError with one line per problem: ``file:line: key: message``."""
    try:
        node, data = _load_yaml(text)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{source}:{exc.second_line}: {exc.key}: duplicate key, already given on line {exc.first_line}; "
                          "YAML would silently keep only the last one, so merge the two into one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); check indentation and quoting") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping of sections (hub:, ecg:, mqtt:, ...)")
    lines: dict[tuple[str | int, ...], int] = {}
    if node is not None:
        _locate(node, (), lines)
    located = _Located(lines)
    try:
        return BiodConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(err, located, source) for err in exc.errors())) from None


def _describe(err: dict[str, Any], located: _Located, source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = located.line_for(loc)
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        parent = loc[:-1]
        fields = _fields_at(parent)
        hint = f"; known keys here: {', '.join(sorted(fields))}" if fields else ""
        return f"{where}: {key}: unknown key (typo?){hint}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {key}: {msg}"


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    """The keys allowed at ``path``, for the "known keys here" hint; [] where that is not a section."""
    model: type[BaseModel] = BiodConfig
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = _section_model(getattr(field, "annotation", None))
        if annotation is None:
            return []
        model = annotation
    return list(model.model_fields)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model behind a field's annotation, seeing through ``X | None`` (optional sections such as ecg.replay)."""
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if a is not type(None)]
        annotation = models[0] if len(models) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def load_config(path: str | os.PathLike[str] | None) -> BiodConfig:
    """Load and validate the YAML file at ``path``; ``None`` gives the embedded default."""
    if path is None:
        return default_config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found; copy deploy/biod.example.yaml there or give the path of your config") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder; give the config file itself (e.g. {p / 'biod.yaml'})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror}); check permissions") from None
    return parse_config(_decode_utf8(raw, p), str(p))


def _decode_utf8(raw: bytes, path: Path) -> str:
    """Decode as UTF-8 whatever the locale says (a service's locale is often C), with a fixable error.

    A file saved in Latin-1 or cp1252 (a name like "Küche") would otherwise surface as a raw traceback.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
                          f"(column {column}) is not valid UTF-8; save it as UTF-8 (the editor's encoding setting, or "
                          f"iconv -f <its encoding, e.g. LATIN1> -t UTF-8)") from None
