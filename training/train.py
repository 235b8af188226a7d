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


#: the subfolders each part cannot train without (what its loaders read). WHY: a folder in the
#: shared/data format may hold only some datasets; a part that lacks one is skipped with a line
#: saying which, instead of a traceback after the parts before it ran (or, for the ECG activity
#: head without gudb_rpeaks, a head trained on empty windows and shipped).
ECG_NEEDS = ("ecgid", "ludb", "mitdb", "gudb_rpeaks")
IMU_TASK_NEEDS = {"gender": "sisfall", "age": "sisfall", "activity": "hugadb"}


def _missing(data: Path, names) -> list[str]:
    return [n for n in names if not (data / n).is_dir()]


def _train_imu_apart(data: Path, out: Path, tasks: tuple[str, ...]) -> dict:
    """``python -m training.train_imu`` in a child process; its JSON summary. WHY: TensorFlow
    takes its thread count once per process, and the ECG part set 2 where the IMU models train
    on 1: in this process the same seed gave other IMU weights than ``training.train_imu``
    does alone. In a child they are the same models, bit for bit, whichever command made them."""
    import subprocess
    import tempfile

    from training.data.ecg import DataError

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "imu.json"
        run = subprocess.run([sys.executable, "-m", "training.train_imu", "--data", str(data), "--out", str(out),
                              "--tasks", ",".join(tasks), "--json", str(summary)], stdout=subprocess.DEVNULL)
        if run.returncode != 0:
            raise DataError(f"training.train_imu exited with {run.returncode} (its error is above)")
        return json.loads(summary.read_text())


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
    from training.data.ecg import DataError

    data, out = Path(args.data), Path(args.out)
    say = _progress(time.time())
    summary: dict = {}
    ran: list[str] = []
    failed: list[str] = []

    def part(name: str, run) -> None:
        """Run one part; a data problem ends that part with one line, not the whole command."""
        ran.append(name)
        try:
            summary[name] = run()
        except (DataError, FileNotFoundError) as exc:
            say(f"{name}: FAILED: {exc}")
            failed.append(name)

    def ecg() -> dict:
        from training.impostors import build as build_impostors  # the set belongs to these models
        from training.train_beats import train_beats  # fused with the CNN: threshold needs it
        from training.train_ecg import TrainConfig, train_ecg

        cfg = TrainConfig() if args.ecg_steps is None else TrainConfig(steps=args.ecg_steps)
        say("ECG dual-task model: start")
        res = {"cnn": train_ecg(data, out, say, cfg)}
        say("ECG beat-morphology model: start")
        res["beats"] = train_beats(data, out, say)
        build_impostors(data, out)
        say("ECG dual-task model: done (and its never-enrolled impostor set)")
        return res

    if args.only in (None, "ecg"):
        if missing := _missing(data, ECG_NEEDS):
            say(f"ECG models: skipped: {data} has no {', '.join(missing)} (they need {', '.join(ECG_NEEDS)})")
            summary["ecg"] = {"skipped": f"no {', '.join(missing)}"}
        else:
            part("ecg", ecg)
    if args.only in (None, "imu"):
        tasks = tuple(t for t, ds in IMU_TASK_NEEDS.items() if (data / ds).is_dir())
        skipped = sorted({t for t in IMU_TASK_NEEDS if t not in tasks})
        if skipped:
            say(f"IMU models {', '.join(skipped)}: skipped: {data} has no "
                f"{', '.join(sorted({IMU_TASK_NEEDS[t] for t in skipped}))}")
        if tasks:
            say(f"IMU models ({', '.join(tasks)}): start")
            part("imu", lambda: _train_imu_apart(data, out, tasks))
        else:
            summary["imu"] = {"skipped": "no sisfall, no hugadb"}
        from training.eval.gait_identity import DATASET_OF  # placement -> the dataset its projection learns from

        if missing := _missing(data, sorted(set(DATASET_OF.values()))):
            say(f"gait identity models: skipped: {data} has no {', '.join(missing)} (waist from sisfall, "
                "thigh from hugadb)")
            summary["gait"] = {"skipped": f"no {', '.join(missing)}"}
        else:
            from training.train_gait import train as train_gait

            say("gait identity models: start")
            part("gait", lambda: train_gait(data, out))
            say("IMU models: done (and the gait identity models)")
    print(json.dumps(summary, indent=2, default=str))
    if failed:
        return 1
    if not ran:
        print(f"error: nothing to train in {data}: it holds none of the datasets a model needs "
              f"({', '.join(sorted(set(ECG_NEEDS) | set(IMU_TASK_NEEDS.values())))})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
