"""``biod doctor``: check the hub's setup and say, for each problem, how to fix it.

Every check is a small function returning ``Check`` results, so the command prints a list a
person can act on: the BLE adapter, the serial device, the broker, the models and the state
directory. It changes nothing.
"""
from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.config import BiodConfig, ConfigError
from daemon.durable import probe_writable



@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        text = f"[{mark}] {self.name}: {self.detail}"
        return text + (f"\n       fix: {self.fix}" if self.fix and not self.ok else "")


def check_state_dir(cfg: BiodConfig) -> Iterator[Check]:
    d = cfg.state_dir
    if not d.exists():
        # `biod run` and `biod calibrate` create it (mode 0700): not a fault if they can (a fresh
        # checkout's ~/.local/state/biod failed this check while everything worked)
        parent = next(p for p in d.parents if p.exists())
        try:
            probe_writable(parent, ".doctor.")
        except OSError as exc:
            yield Check("state directory", False, f"{d} does not exist and {parent} cannot be written ({exc.strerror})",
                        f"mkdir -m 0700 {d} and chown it to the biod user (systemd's StateDirectory= creates it)")
            return
        yield Check("state directory", True, f"{d} does not exist yet; biod creates it (mode 0700) at its first run")
        return
    mode = stat.S_IMODE(d.stat().st_mode)
    writable = os.access(d, os.W_OK)
    yield Check("state directory", writable and mode & 0o077 == 0, f"{d} mode {mode:04o}, writable={writable}",
                f"chmod 0700 {d} and make it owned by the biod user")
    # WHY the folders inside too: a spool/ or identity/ left owned by root (a biod command run
    # as root) passed the check above, and `biod run` then failed on it
    unwritable = []
    for sub in (d / "spool", cfg.store_path.parent):
        if sub.is_dir():
            try:
                probe_writable(sub, ".doctor.")
            except OSError as exc:
                unwritable.append(f"{sub} ({exc.strerror})")
    for f in (d / "spool" / "events.sqlite3", cfg.store_path):
        try:
            f.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:  # a folder on the way that the biod user cannot enter
            unwritable.append(f"{f} ({exc.strerror})")
            continue
        if not os.access(f, os.R_OK | os.W_OK):
            unwritable.append(f"{f} (not readable and writable)")
    if unwritable:
        yield Check("state files", False, "cannot write " + ", ".join(unwritable),
                    f"chown -R biod:biod {d} (biod commands run as `sudo biod ...`, never as root)")


def check_serial(cfg: BiodConfig) -> Iterator[Check]:
    e = cfg.ecg
    if not e.enabled:
        yield Check("ECG source", True, "disabled in the config")
        return
    if e.source == "emulator":
        yield Check("ECG source", True, f"emulator (recording {e.emulator.recording!r})")
        return
    if e.source == "replay":
        from daemon.sources.replay import ecg_recording
        from firmware_protocol.ecg_serial import LEAD_NAMES

        assert e.replay is not None
        try:
            rec = ecg_recording(e.replay.path)
        except ConfigError as exc:
            yield Check("ECG source", False, str(exc), "give ecg.replay.path an ECG record written by `biod record`")
            return
        yield Check("ECG source", True, f"replay of {e.replay.path} ({rec.duration_s:.0f} s at {rec.fs_hz} Hz, "
                    f"leads {', '.join(l for l, p in zip(LEAD_NAMES, rec.lead_present) if p)})")
        return
    if e.source == "tcp":
        try:
            with socket.create_connection((e.host, int(e.tcp_port or 0)), timeout=2):
                yield Check("ECG source", True, f"tcp://{e.host}:{e.tcp_port} accepts connections")
        except OSError as exc:
            yield Check("ECG source", False, f"tcp://{e.host}:{e.tcp_port}: {exc}", "check the box's network and ecg.host/tcp_port")
        return
    if e.port is None:
        from daemon.sources.serial_ecg import SourceError, find_by_serial

        assert e.match_serial is not None
        try:
            port = find_by_serial(e.match_serial)
        except SourceError as exc:
            yield Check("ECG serial device", False, str(exc),
                        "plug the box in; a box behind a USB-UART bridge reports the bridge's serial: use ecg.port "
                        "with the udev symlink of deploy/99-biod.rules instead")
            return
    else:
        port = Path(str(e.port))
    if not port.exists():
        yield Check("ECG serial device", False, f"{port} does not exist",
                    "plug the box in; check deploy/99-biod.rules matches its idVendor/idProduct (udevadm info -a -n /dev/ttyACM0)")
        return
    real = port.resolve()
    ok = os.access(real, os.R_OK | os.W_OK)
    yield Check("ECG serial device", ok, f"{port} -> {real}, read/write={ok}", "add the biod user to the dialout group")


def check_ble_adapter(sys_class: Path = Path("/sys/class")) -> Iterator[Check]:
    """A Bluetooth adapter exists and rfkill does not block it (a blocked adapter is the usual
    reason a Pi 'has Bluetooth' yet bleak finds nothing)."""
    bt = sys_class / "bluetooth"
    adapters = sorted(p.name for p in bt.glob("hci*")) if bt.exists() else []
    if not adapters:
        yield Check("BLE adapter", False, f"no Bluetooth adapter found in {bt}",
                    "enable Bluetooth (Pi: dtoverlay, rfkill unblock bluetooth) and install bluez")
        return
    blocked = []
    for kill in sorted((sys_class / "rfkill").glob("rfkill*")):
        try:
            if (kill / "type").read_text().strip() != "bluetooth":
                continue
            how = [k for k in ("soft", "hard") if (kill / k).read_text().strip() == "1"]
        except OSError:
            continue
        if how:
            blocked.append(f"{kill.name} ({' and '.join(how)})")
    if blocked:
        yield Check("BLE adapter", False, f"{', '.join(adapters)} blocked by rfkill: {', '.join(blocked)}",
                    "sudo rfkill unblock bluetooth (a hard block is a switch or the firmware)")
    else:
        yield Check("BLE adapter", True, ", ".join(adapters))


def check_ble_sensor(cfg: BiodConfig, scanner: object | None = None) -> Iterator[Check]:
    """The configured MetaMotion is seen advertising (``biod doctor --scan``), found exactly as
    the daemon finds it (``metawear_ble.find_board``). WHY: an adapter that works says nothing
    about the board: flat, out of range, or held by a phone's MetaBase app, the daemon only
    logs retries. Opt-in because it waits up to ``imu.scan_timeout_s``, and a board that biod
    is connected to does not advertise."""
    import asyncio

    from daemon.sources.metawear_ble import BoardNotFound, describe_board, find_board
    from daemon.sources.serial_ecg import SourceError

    imu = cfg.imu
    if not imu.enabled or imu.source != "ble":
        yield Check("MetaMotion sensor", True, f"not scanned: imu is {'off' if not imu.enabled else imu.source}")
        return
    try:
        device = asyncio.run(find_board(imu, scanner))  # type: ignore[arg-type]
    except BoardNotFound as exc:
        yield Check("MetaMotion sensor", False, str(exc),
                    "charge it (USB: the LED blinks) and bring it within a few metres; if biod is running "
                    "it may hold the connection (a connected board does not advertise): sudo systemctl stop biod, "
                    "then scan again; if a phone's MetaBase app is connected, close it")
        return
    except SourceError as exc:
        yield Check("MetaMotion sensor", False, str(exc),
                    "sudo systemctl start bluetooth, then bluetoothctl power on (see the BLE adapter check)")
        return
    address = getattr(device, "address", None) or str(device)
    name = getattr(device, "name", None)
    yield Check("MetaMotion sensor", True, f"{describe_board(imu)} seen: {address}" + (f" ({name})" if name else ""))


def check_broker(cfg: BiodConfig, timeout: float = 5.0) -> Iterator[Check]:
    """Connect as the daemon does: same credentials, and TLS set by the daemon's own
    ``configure_tls`` (client certificate and ``insecure`` included), so a PASS here is a
    connection the daemon gets and a FAIL one it does not."""
    import paho.mqtt.client as mqtt

    from daemon.publish.mqtt import configure_tls

    m = cfg.mqtt
    try:
        password = m.resolve_password()
    except ConfigError as exc:
        yield Check("MQTT credentials", False, str(exc))
        return
    result: dict[str, str] = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"biod-doctor-{os.getpid()}")
    if m.username:
        client.username_pw_set(m.username, password)
    tls_fix = ("check mqtt.tls: ca_file must be the CA that signed the broker's certificate, the certificate must "
               "name mqtt.host (tls.insecure skips that, for testing only), and a broker with require_certificate "
               "needs cert_file/key_file")
    try:
        configure_tls(client, m.tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a certificate and key that do not match
        yield Check("MQTT broker", False, f"cannot use the TLS files of mqtt.tls: {exc}",
                    "give cert_file and key_file of the same client certificate (PEM), and ca_file the CA's certificate")
        return

    def on_connect(c, userdata, flags, reason, props=None) -> None:
        result["reason"] = str(reason)
        result["ok"] = "yes" if not reason.is_failure else ""
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(m.host, m.port, keepalive=10)
    except OSError as exc:
        fix = tls_fix if m.tls.enabled and isinstance(exc, ssl.SSLError) else "start the broker or fix mqtt.host/mqtt.port"
        yield Check("MQTT broker", False, f"{m.host}:{m.port}: {exc}", fix)
        return
    client.loop_start()
    done.wait(timeout)
    client.loop_stop()
    client.disconnect()
    if not done.is_set():
        yield Check("MQTT broker", False, f"{m.host}:{m.port} did not answer CONNECT within {timeout:.0f} s",
                    tls_fix if m.tls.enabled else "check the port: is it a TLS listener (then set mqtt.tls)?")
    elif result.get("ok"):
        yield Check("MQTT broker", True, f"{m.host}:{m.port} accepted the connection")
    else:
        yield Check("MQTT broker", False, f"{m.host}:{m.port} refused: {result.get('reason')}", "check mqtt.username and the password source")


def check_models(models_dir: Path | None = None) -> Iterator[Check]:
    from daemon.biometrics import MODELS_DIR

    models_dir = models_dir or MODELS_DIR
    manifests = sorted(models_dir.glob("*.json"))
    if not manifests:
        yield Check("models", False, f"no model manifests in {models_dir}", "re-install biod's models: `sudo deploy/install.sh` from the biod checkout")
        return
    from daemon.inference.runtime import ModelError, load_model

    for manifest in manifests:
        model_path = manifest.with_suffix(".tflite")
        try:
            model = load_model(model_path, manifest)
            yield Check(f"model {manifest.stem}", True, f"sha256 verified, version {model.manifest.version}")
        except ModelError as exc:
            yield Check(f"model {manifest.stem}", False, str(exc))


def check_identity(cfg: BiodConfig) -> Iterator[Check]:
    """What identification needs beyond verified model files: an impostor set made with the ECG
    model that is installed (``biod calibrate`` sets thresholds from it), a gait model for the
    placement the IMU is worn at, and enrolled templates that the installed model can score.
    A model update without these in step fails silently otherwise: every wearer 'unknown'."""
    from daemon.biometrics import MODELS_DIR, EcgModelRunner, ImuModelSet
    from daemon.enrol import IMPOSTORS_FILE, ImpostorsError, load_impostors
    from daemon.identity.gait import GaitModelError, load_gait_models
    from daemon.identity.store import StoreError, TemplateMismatchError, check_compatible
    from daemon.inference.runtime import ModelError

    models_dir = cfg.models_dir or MODELS_DIR
    # WHY not pip: biod is installed from its checkout (PyPI has no biod), and training needs
    # TensorFlow, which a hub does not carry
    reinstall = ("re-install biod's models: `sudo deploy/install.sh` from the biod checkout "
                 "(or point models_dir at a folder that holds them)")
    try:
        runner = EcgModelRunner.load(models_dir / "ecg_dualtask.tflite")
    except (ModelError, OSError, ValueError) as exc:
        yield Check("ECG identity model", False, str(exc), reinstall)
        return
    ref = runner.ref
    try:
        imp = load_impostors(models_dir)
    except ImpostorsError as exc:
        imp = None
        yield Check("impostor set", False, str(exc), reinstall)
    else:
        if imp is None:
            yield Check("impostor set", False, f"{models_dir / IMPOSTORS_FILE} is missing: biod calibrate cannot "
                        "estimate false accepts of strangers", reinstall)
        elif not imp.made_with(ref):
            yield Check("impostor set", False, f"made with {imp.model_version!r} (D={imp.embeddings.shape[1]}), but the "
                        f"installed ECG model is {ref}", "rebuild it: python -m training.impostors --data DIR, or " + reinstall)
        else:
            yield Check("impostor set", True, f"{len(set(imp.labels.tolist()))} never-enrolled persons, "
                        f"{len(imp.embeddings)} windows, made with the installed model")
    if cfg.imu.enabled:
        placement = cfg.imu.placement
        try:
            imu = ImuModelSet.load_dir(models_dir, placement)
        except (ModelError, OSError, ValueError) as exc:
            yield Check("IMU models", False, str(exc), reinstall)
        else:
            used = ", ".join(f"imu_{t}" for t in sorted(imu.models)) or "none"
            yield Check("IMU models", True, f"for an IMU at the {placement}: {used}"
                        + "".join(f"; {why}: not used" for why in imu.skipped.values()))
        try:
            gait = load_gait_models(models_dir)
        except (GaitModelError, OSError, ValueError) as exc:
            yield Check("gait identity model", False, str(exc), reinstall)
        else:
            if placement in gait:
                yield Check("gait identity model", True, f"gait_{placement} (version {gait[placement].version}); "
                            "fused with ECG identity while walking")
            else:
                yield Check("gait identity model", True, f"none for imu.placement {placement!r} (have: "
                            f"{', '.join(sorted(gait)) or 'none'}): identity comes from the ECG alone")
    try:
        from daemon.app import open_store
        people = open_store(cfg).load()
        check_compatible(people, ref)
    except TemplateMismatchError as exc:
        yield Check("enrolled persons", False, str(exc), "re-enrol with biod calibrate --name NAME")
        return
    except (StoreError, OSError, ValueError) as exc:
        # the message names the fix (a key to give, a backup to restore, permissions to mend):
        # re-enrolling would fail the same way while the store cannot be read
        yield Check("enrolled persons", False, str(exc))
        return
    if people:
        yield Check("enrolled persons", True, f"{len(people)} ({', '.join(sorted(people))}), templates match the "
                    f"installed ECG model")
    else:
        yield Check("enrolled persons", True, f"nobody enrolled yet in {cfg.store_path}: "
                    "everyone will be 'unknown' until biod calibrate --name NAME")


def check_imu_replay(cfg: BiodConfig) -> Iterator[Check]:
    """An IMU replay is read as the daemon reads it (an ECG record given there passed)."""
    imu = cfg.imu
    if not (imu.enabled and imu.source == "replay" and imu.replay is not None):
        return
    from daemon.sources.replay import imu_recording

    try:
        rec = imu_recording(imu.replay.path)
    except ConfigError as exc:
        yield Check("IMU source", False, str(exc), "give imu.replay.path an IMU record written by `biod record`")
        return
    yield Check("IMU source", True, f"replay of {imu.replay.path} ({rec.duration_s:.0f} s at {rec.fs_hz:g} Hz)")


def run_checks(cfg: BiodConfig, broker: bool = True, scan: bool = False) -> list[Check]:
    checks: list[Check] = []
    checks += check_state_dir(cfg)
    checks += check_serial(cfg)
    checks += check_imu_replay(cfg)
    if cfg.imu.enabled and cfg.imu.source == "ble":  # a hub with the ECG box only needs no Bluetooth
        checks += check_ble_adapter()
    if scan:
        checks += check_ble_sensor(cfg)
    if broker:
        checks += check_broker(cfg)
    checks += check_models(cfg.models_dir)
    checks += check_identity(cfg)
    return _said_once(checks)


def _said_once(checks: list[Check]) -> list[Check]:
    """A failure already reported above is named, not repeated. WHY: a damaged model file fails
    its own check and then every check that needs it with the same message; the list read as
    two problems when there was one. The repeat keeps its name and loses its fix (the first
    one's fix is the fix)."""
    first: dict[str, str] = {}
    out = []
    for c in checks:
        if not c.ok and c.detail in first:
            c = Check(c.name, False, f"cannot be checked: it needs what failed in '{first[c.detail]}' above")
        elif not c.ok:
            first[c.detail] = c.name
        out.append(c)
    return out
