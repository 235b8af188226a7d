"""`python -m training.eval <command> --data DIR [--json FILE]`: the evaluation entry point.

Each sub-command lives in its own module and exposes ``main(argv) -> int``; this file only
dispatches, so that evaluating R-peaks never imports TensorFlow and vice versa.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "rpeaks": ("training.eval.rpeaks", "R-peak detection vs annotations and peer detectors"),
    "models": ("training.eval.models", "int8 and float models: identity, activity, IMU"),
    "throughput": ("training.eval.throughput", "DSP throughput and peak memory vs neurokit2"),
    "latency": ("training.eval.latency", "daemon: first clean beat -> identity event, CPU, memory"),
    "gait_identity": ("training.eval.gait_identity", "gait identity, open set, held-out persons, cross-trial"),
    "household": ("training.eval.household", "the identity engine on unseen persons: enrol, stream, strangers"),
    "soak": ("training.eval.soak", "daemon memory and CPU over hours of signal replayed fast"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m training.eval {%s} [options]" % "|".join(COMMANDS))
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
