"""``biod``: the command line. Sub-commands stay thin; the work lives in the modules they call."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from daemon.config import ConfigError, load_config

log = logging.getLogger("biod")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    cfg.mqtt.resolve_password()
    print(f"{args.file}: OK (hub {cfg.hub.id}, ECG source {cfg.ecg.source}, broker {cfg.mqtt.host}:{cfg.mqtt.port}, prefix {cfg.topic_prefix})")
    return 0


async def _run_until_signal(cfg) -> int:
    from daemon.app import BiodApp

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await BiodApp(cfg).run(stop)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    _setup_logging(args.log_level or cfg.log_level)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run_until_signal(cfg))


def _cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    _setup_logging(args.log_level or "warning")
    return asyncio.run(run_demo(seconds=args.seconds, speed=args.speed))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from daemon.doctor import run_checks

    cfg = load_config(args.config)
    checks = run_checks(cfg, broker=not args.no_broker)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biod", description="Biometric daemon: who wears the sensors and what they are doing")
    parser.add_argument("--version", action="version", version="biod 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon (default config: the ECG emulator and a broker on localhost)")
    p.add_argument("--config", "-c", type=Path, default=None, help="YAML config (see deploy/biod.example.yaml)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("file", type=Path)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("demo", help="end-to-end demo: embedded broker + emulated ECG box + daemon, prints MQTT traffic")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to stream (default 20)")
    p.add_argument("--speed", type=float, default=1.0, help="emulator speed-up factor (default real time)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("doctor", help="check adapter, serial device, broker, models and state directory")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.add_argument("--no-broker", action="store_true", help="skip the broker check")
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"biod: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
