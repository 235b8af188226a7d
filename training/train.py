"""``python -m training.train --data DIR --out daemon/models``: retrain every shipped model.

Runs the ECG dual-task model (training/train_ecg.py), the beat-morphology model fused with it
(training/train_beats.py), the never-enrolled impostor set (training/impostors.py), the IMU models
(training/train_imu.py) and the gait identity projections (training/train_gait.py), each exporting int8 ``.tflite`` + manifest (and a float twin under
``float/``), printing progress with elapsed time. Sized to finish within ~30 min on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _progress(t0: float):
    def say(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)
    return say


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder in the shared/data format")
    ap.add_argument("--out", type=Path, default=Path("daemon/models"))
    ap.add_argument("--only", choices=("ecg", "imu"), help="train just one family")
    ap.add_argument("--ecg-steps", type=int, default=None, help="override ECG training steps")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder (expected the shared/data format)",
              file=sys.stderr)
        return 2
    say = _progress(time.time())
    summary: dict = {}
    if args.only in (None, "ecg"):
        from training.train_ecg import TrainConfig, train_ecg
        cfg = TrainConfig() if args.ecg_steps is None else TrainConfig(steps=args.ecg_steps)
        say("ECG dual-task model: start")
        summary["ecg"] = train_ecg(args.data, args.out, say, cfg)
        from training.train_beats import train_beats  # fused with the CNN: threshold needs it

        say("ECG beat-morphology model: start")
        summary["ecg_beats"] = train_beats(args.data, args.out, say)
        from training.impostors import build as build_impostors  # the set belongs to these models

        build_impostors(Path(args.data), Path(args.out))
        say("ECG dual-task model: done (and its never-enrolled impostor set)")
    if args.only in (None, "imu"):
        from training.train_imu import train_imu
        say("IMU models: start")
        summary["imu"] = train_imu(args.data, args.out, say)
        from training.train_gait import train as train_gait

        say("gait identity models: start")
        summary["gait"] = train_gait(Path(args.data), Path(args.out))
        say("IMU models: done (and the gait identity models)")
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
