"""``biod``: the command line. Sub-commands stay thin; the work lives in the modules they call."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from daemon import instance_lock
from daemon.config import ConfigError, load_config
from daemon.durable import probe_writable
from daemon.identity.store import StoreError
from daemon.publish.spool import SpoolError

log = logging.getLogger("biod")
CONFIG_HELP = ("YAML config (deploy/biod.example.yaml); default: $BIOD_CONFIG, else the embedded default "
               "(the ECG emulator, a broker on localhost)")


def _positive(what: str) -> Callable[[str], float]:
    """An argparse type for a duration or a speed: finite and above 0 (``--seconds 0`` or
    ``nan`` had failed later as a device or electrode fault, ``inf`` with a traceback)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {what}") from None
        if not 0.0 < value < 1e6:
            raise argparse.ArgumentTypeError(f"{text}: give a number of {what} above 0 and below a million")
        return value
    return parse


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config_path(args: argparse.Namespace) -> Path | None:
    """``--config``, else ``$BIOD_CONFIG`` (set by the hub's ``biod`` wrapper from install.sh, so
    that ``biod calibrate`` enrols into the store the service reads), else None: the embedded
    default (the ECG emulator), which is what a bare checkout wants."""
    if args.config is not None:
        return args.config
    env = os.environ.get("BIOD_CONFIG")
    return Path(env) if env else None


def _cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file; check the secrets it names where they can be read from here.

    Credentials (``*_credential``) are handed to the service by systemd (``LoadCredential=``) in
    ``$CREDENTIALS_DIRECTORY``, which a login shell does not have: there they are checked in
    ``--credentials-dir`` (e.g. /etc/biod/credentials, where install.sh puts them) or, without
    it, only named, so that validating the shipped example from a shell does not fail."""
    from daemon.identity.store import StoreError, key_from_credential

    cfg = load_config(args.file)
    # A replay file is read as `biod run` reads it: one the config accepts for existing but that
    # is not a record of the right kind passed here and failed only at the service's start.
    from daemon.sources.replay import ecg_recording, imu_recording

    if cfg.ecg.enabled and cfg.ecg.source == "replay" and cfg.ecg.replay is not None:
        ecg_recording(cfg.ecg.replay.path)
    if cfg.imu.enabled and cfg.imu.source == "replay" and cfg.imu.replay is not None:
        imu_recording(cfg.imu.replay.path)
    # the folder is passed down, not put into os.environ: a process-wide change outlived the call
    creds = str(args.credentials_dir) if args.credentials_dir is not None else os.environ.get("CREDENTIALS_DIRECTORY")
    named = [n for n in (cfg.mqtt.password_credential, cfg.identity.store_key_credential) if n]
    if creds or not cfg.mqtt.password_credential:
        cfg.mqtt.resolve_password(creds)
    if creds and cfg.identity.store_key_credential:
        try:
            key_from_credential(cfg.identity.store_key_credential, creds)
        except StoreError as exc:
            raise ConfigError(f"identity.store_key_credential: {exc}") from None
    print(f"{args.file}: OK (hub {cfg.hub.id}, ECG source {cfg.ecg.source}, broker {cfg.mqtt.host}:{cfg.mqtt.port}, prefix {cfg.topic_prefix})")
    if named and not creds:
        print(f"  credentials {', '.join(named)}: given to the service by systemd (LoadCredential=), not checked "
              "here; add --credentials-dir /etc/biod/credentials to check those files too")
    elif named:
        print(f"  credentials {', '.join(named)}: read from {creds}")
    return 0


async def _run_until_signal(cfg) -> int:
    from daemon.app import BiodApp

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, frame: object) -> None:
        # A Python-level handler, not loop.add_signal_handler: asyncio's own handler only
        # writes the signal number into the loop's self-pipe and the signal is lost when that
        # pipe is full (a loop far behind); this one runs in the main thread regardless.
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return await BiodApp(cfg).run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _warn_unless_store_writable(cfg) -> None:
    """Say at start, not after someone has recorded for an enrolment, that the template store
    cannot be written. WHY: an ``identity.store_path`` outside ``state_dir`` is read-only under
    the unit (ProtectSystem=strict) while ``sudo biod calibrate`` and ``doctor``, run outside the
    sandbox, find it fine (review, 2026-11-24). Identification from the stored templates still
    works, so the daemon runs on."""
    from daemon.app import open_store

    try:
        open_store(cfg).check_writable()
    except StoreError as exc:
        hint = (" (the unit lets biod write /var/lib/biod only: keep identity.store_path there, or add its folder "
                "with ReadWritePaths= in a drop-in: sudo systemctl edit biod)") if os.environ.get("INVOCATION_ID") else ""
        log.error(
            "identity: %s; enrolments and template adaptations cannot be saved until this is fixed%s", exc, hint)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(_config_path(args))
    _setup_logging(args.log_level or cfg.log_level)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # it holds the templates and the spool
        # An existing folder the process may not write (a read-only mount under the unit's
        # ProtectSystem=strict, another owner) passes mkdir and failed later, at the first
        # enrolment or spooled event: write a file now.
        probe_writable(cfg.state_dir, ".biod-run.")
    except OSError as exc:
        if os.environ.get("INVOCATION_ID"):  # a systemd service: the unit allows /var/lib/biod only
            fix = ("the unit lets biod write /var/lib/biod only (ProtectSystem=strict): keep state_dir there, or "
                   "add the folder with ReadWritePaths= in a drop-in (sudo systemctl edit biod)")
        else:
            fix = "run biod as its service (sudo systemctl start biod) or set state_dir to a folder this user can write"
        raise ConfigError(f"state_dir: cannot create or write {cfg.state_dir} ({exc.strerror}); {fix}") from None
    _warn_unless_store_writable(cfg)
    lock = instance_lock.hold(cfg.state_dir)  # held until this process ends
    try:
        return asyncio.run(_run_until_signal(cfg))
    finally:
        os.close(lock)


def _cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    _setup_logging(args.log_level or "warning")
    return asyncio.run(run_demo(speed=args.speed))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from daemon.doctor import run_checks

    cfg = load_config(_config_path(args))
    checks = run_checks(cfg, broker=not args.no_broker, scan=args.scan)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from daemon.calibrate import run_calibrate

    cfg = load_config(_config_path(args))
    _setup_logging(args.log_level or "warning")
    return run_calibrate(cfg, args.name, args.seconds, walk=not args.no_walk)


def _cmd_people(args: argparse.Namespace) -> int:
    from daemon.app import open_store
    from daemon.identity.engine import ADAPTED_PREFIX
    from daemon.identity.store import StoreError

    cfg = load_config(_config_path(args))
    if args.action not in ("list", "encrypt") and not args.name:
        print(f"biod people {args.action}: give the person's name (biod people list shows them)", file=sys.stderr)
        return 2
    takes = {"list": 0, "encrypt": 0, "remove": 1, "rename": 2}[args.action]
    extra = [a for a in (args.name, args.new)[takes:] if a is not None]
    if extra:  # `people remove Alice Bob` removed Alice and ignored Bob without a word
        print(f"biod people {args.action}: unexpected {' '.join(map(repr, extra))}; "
              f"usage: biod people {args.action}{' NAME' if takes >= 1 else ''}{' NEW' if takes == 2 else ''}",
              file=sys.stderr)
        return 2
    try:
        store = open_store(cfg)  # an encrypted store without its key is a StoreError too
        if args.action == "list":
            people = store.list()
            if not people:
                print("nobody is enrolled; enrol with: biod calibrate --name NAME")
            for p in people:
                adapted = sum(lab.startswith(ADAPTED_PREFIX) for lab in p.prototype_labels)
                print(f"{p.name}\t(id {p.id}, enrolled {p.created}, {len(p.prototypes)} prototypes"
                      f"{f' ({adapted} adapted)' if adapted else ''}, threshold {p.threshold:.3f}, model {p.model})")
        elif args.action == "rename":
            if not args.new:
                print("biod people rename OLD NEW: give the new name", file=sys.stderr)
                return 2
            person = store.rename(args.name, args.new)
            print(f"renamed {args.name!r} to {person.name!r}")
        elif args.action == "remove":
            person = store.remove(args.name)
            print(f"removed {person.name!r}; their templates are deleted from {cfg.store_path}")
        elif args.action == "encrypt":
            n = store.encrypt()
            print(f"{cfg.store_path} is encrypted ({n} person(s)); the running daemon picks it up within seconds")
    except StoreError as exc:
        print(f"biod people: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    from daemon.record_cli import run_record

    cfg = load_config(_config_path(args))
    _setup_logging(args.log_level or "info")
    return run_record(cfg, args.out, args.seconds, args.label, args.person, wait_s=args.wait)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biod", description="Biometric daemon: who wears the sensors and what they are doing")
    parser.add_argument("--version", action="version", version="biod 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon (default config: the ECG emulator and a broker on localhost)")
    p.add_argument("--config", "-c", type=Path, default=None, help=CONFIG_HELP)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("file", type=Path, help="the YAML config to check (e.g. /etc/biod/biod.yaml)")
    p.add_argument("--credentials-dir", type=Path, default=None, metavar="DIR",
                   help="where the credentials the config names are (default: $CREDENTIALS_DIRECTORY "
                   "under systemd; e.g. /etc/biod/credentials from a shell)")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("demo", help="end-to-end demo: embedded broker, emulated ECG box and MetaMotion, enrolment, identification over MQTT")
    p.add_argument("--speed", type=_positive("times real time"), default=4.0, help="replay speed of the recordings (default 4x; 1 = real time)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("calibrate", help="enrol a household member (guided: rest, then walking)")
    p.add_argument("--name", required=True,
                   help="the member's name as Home Assistant will show it (e.g. Alice)")
    p.add_argument("--config", "-c", type=Path, default=None, help=CONFIG_HELP)
    p.add_argument("--seconds", type=_positive("seconds"), default=90.0, help="ECG to record (default 90 s: half rest, half walking)")
    p.add_argument("--no-walk", action="store_true", help="rest only")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("people", help="list, rename or remove enrolled persons; encrypt a store made before the key")
    p.add_argument("action", choices=["list", "rename", "remove", "encrypt"])
    p.add_argument("name", nargs="?", help="rename/remove: the enrolled person's name")
    p.add_argument("new", nargs="?", help="rename: the new name")
    p.add_argument("--config", "-c", type=Path, default=None, help=CONFIG_HELP)
    p.set_defaults(func=_cmd_people)

    p = sub.add_parser("record", help="record raw ECG (and IMU) to WFDB with labels, for fine-tuning")
    p.add_argument("--out", type=Path, required=True, help="folder for the WFDB records")
    p.add_argument("--seconds", type=_positive("seconds"), default=60.0,
                   help="seconds of ECG signal to record (default 60), not of wall clock: the devices "
                        "get --wait seconds to appear and to come back after a drop; a record that ends "
                        "short is kept and exits 1")
    p.add_argument("--wait", type=_positive("seconds"), default=None, metavar="SECONDS",
                   help="how long to wait for a device that has not appeared or went quiet before "
                        "ending the record short (default 60: two of the sources' 30 s reconnect "
                        "tries)")
    p.add_argument("--label", default=None, help="activity label, e.g. walking")
    p.add_argument("--person", default=None,
                   help="who wears the sensors (written into each record's header as a `person NAME` comment, which fine-tuning reads)")
    p.add_argument("--config", "-c", type=Path, default=None, help=CONFIG_HELP)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.set_defaults(func=_cmd_record)

    p = sub.add_parser("doctor", help="check adapter, serial device, broker, models and state directory")
    p.add_argument("--config", "-c", type=Path, default=None, help=CONFIG_HELP)
    p.add_argument("--no-broker", action="store_true", help="skip the broker check")
    p.add_argument("--scan", action="store_true",
                   help="also scan for the configured MetaMotion (up to imu.scan_timeout_s; stop biod first: "
                        "a board it is connected to does not advertise)")
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"biod: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except (SpoolError, instance_lock.AlreadyRunning) as exc:  # the message names the path and the fix
        print(f"biod: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:  # e.g. the store's key credential is missing: the message names the fix
        print(f"biod: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
