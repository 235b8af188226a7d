"""`python -m training.eval latency [--json FILE] [--md FILE] [--speeds 1 20] [--cycles N]`

The daemon as deployed, measured from outside: ``biod run`` in its own process reads an
emulated ECG box (3 channels at 500 Hz; ECG-ID recordings carry lead I, the box flags II/III off)
through pyserial on a real pty, and an emulated MetaMotion (IMU at 100 Hz, in the daemon's process since BLE cannot be
emulated across processes) while three persons enrolled with ``biod calibrate`` take turns
wearing the sensors. Reported: time from the first clean beat of a wearing session to the
identity ``new`` event (median, p95, in seconds of ECG), the daemon's CPU % of one core and peak
RSS, at real time and replayed faster. Uses the shipped emulator recordings only, so it needs
no data folder; the broker is Mosquitto if installed, else the embedded amqtt.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
ENROL = {"alice": "ecgid-p02-r1", "bob": "ecgid-p26-r1", "carol": "ecgid-p34-r1"}
WEAR = {"alice": "ecgid-p02-r4", "bob": "ecgid-p26-r3", "carol": "ecgid-p34-r3"}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if Path(exe).exists():
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        code = ("import asyncio,sys;from daemon.demo import start_embedded_broker\n"
                "async def m():\n b=await start_embedded_broker(int(sys.argv[1]));await asyncio.Event().wait()\n"
                "asyncio.run(m())")
        proc = subprocess.Popen([sys.executable, "-c", code, str(port)], cwd=REPO)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the broker did not start")


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _config(tmp: Path, body: str) -> Path:
    path = tmp / f"cfg-{time.monotonic_ns()}.yaml"
    path.write_text(f"hub:\n  id: bench\nstate_dir: {tmp / 'state'}\nidentity:\n  min_enrol_windows: 12\n" + body)
    return path


def _measure(speed: float, cycles: int, tmp: Path, port: int) -> dict:
    from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
    from firmware_protocol.emulators.recordings import load_recording

    link = tmp / f"ecg-{speed:g}"
    cfg = _config(tmp, f"ecg:\n  source: serial\n  port: {link}\n  stall_timeout_s: {max(0.5, 3 / speed):.2f}\n"
                       f"imu:\n  enabled: true\n  source: emulator\n  emulator:\n    speed: {speed:g}\n"
                       f"mqtt:\n  host: 127.0.0.1\n  port: {port}\nlog_level: info\n")
    log_path = tmp / f"daemon-{speed:g}.log"
    log_file = open(log_path, "w")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)], cwd=REPO,
                              stdout=log_file, stderr=subprocess.STDOUT)
    latencies: list[float] = []
    correct = 0
    try:
        time.sleep(3)
        cpu0, t0 = _proc_cpu_s(daemon.pid), time.monotonic()
        for cycle in range(cycles):
            for name, rec in WEAR.items():
                emu = EcgBoxEmulator(load_recording(rec), rate_hz=500, speed=speed, loop=True)
                emu.open_pty(link=str(link))
                mark = log_path.stat().st_size
                emu.start()
                deadline = time.monotonic() + 40 / speed + 10
                got = None
                while time.monotonic() < deadline and got is None:
                    time.sleep(0.05)
                    got = _latency(log_path, mark)
                if got is not None:
                    lat, who = got
                    latencies.append(lat * speed)  # seconds of ECG
                    correct += who == name
                emu.close()
                time.sleep(max(0.5, 6 / speed))  # the sensors are off between wearers
        wall = time.monotonic() - t0
        cpu = _proc_cpu_s(daemon.pid) - cpu0
        peak = _peak_rss_mb(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(20)
        log_file.close()
    arr = np.array(latencies)
    return {
        "speed": speed, "trials": cycles * len(WEAR), "identified": len(latencies), "correct": correct,
        "latency_median_s": float(np.median(arr)) if len(arr) else None,
        "latency_p95_s": float(np.percentile(arr, 95)) if len(arr) else None,
        "cpu_percent_of_one_core": 100 * cpu / wall, "peak_rss_mb": peak, "wall_s": wall,
    }


def _latency(log_path: Path, offset: int) -> tuple[float, str] | None:
    """(first clean beat -> `new` event, wearer) from the daemon's log after ``offset``."""
    with open(log_path) as f:
        f.seek(offset)
        lines = f.read().splitlines()
    beat_at = None
    for line in lines:
        m = LOG_TIME.match(line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
        if "first clean beat" in line and beat_at is None:
            beat_at = t
        elif "event new:" in line and beat_at is not None:
            who = line.split("event new:")[1].split("(")[0].strip()
            return t - beat_at, who
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--speeds", type=float, nargs="+", default=[1.0, 20.0])
    parser.add_argument("--cycles", type=int, default=2, help="rounds of the three wearers per speed")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--md", type=Path, default=None, metavar="FILE",
                        help="also (re)write this markdown page (the committed one: "
                        "docs/benchmarks/latency.md); default: print only")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="biod-latency-"))
    for name, rec in ENROL.items():
        cfg = _config(tmp, f"ecg:\n  source: emulator\n  emulator:\n    recording: {rec}\n    speed: 10\n    loop: false\n")
        res = subprocess.run([sys.executable, "-m", "daemon.cli", "calibrate", "--name", name, "--seconds", "20",
                              "--no-walk", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stdout, res.stderr, file=sys.stderr)
            return 1
        print(f"enrolled {name} from {rec}", flush=True)
    broker, port = _start_broker(tmp)
    results = []
    try:
        for speed in args.speeds:
            r = _measure(speed, args.cycles, tmp, port)
            results.append(r)
            print(f"speed {r['speed']:>4g}x: identified {r['identified']}/{r['trials']} ({r['correct']} correct), "
                  f"first clean beat -> identity median {r['latency_median_s']:.1f} s, p95 {r['latency_p95_s']:.1f} s of ECG; "
                  f"CPU {r['cpu_percent_of_one_core']:.1f}% of one core, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        broker.terminate()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "cpu": _cpu_model(), "nproc": os.cpu_count()}, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(args.md, results, args)
    return 0


def write_markdown(path: Path, results: list[dict], args: argparse.Namespace) -> None:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    rows = [f"| {r['speed']:g}× | {r['identified']}/{r['trials']} ({r['correct']} correct) | "
            f"{fmt(r['latency_median_s'], '.1f')} | {fmt(r['latency_p95_s'], '.1f')} | "
            f"{r['cpu_percent_of_one_core']:.1f} | {r['peak_rss_mb']:.0f} |" for r in results]
    load = os.getloadavg()
    path.write_text(
        "# The daemon end to end: identity latency, CPU and memory\n\n"
        "Generated by `training/eval/latency.py`; do not edit by hand.\n\n"
        f"Command: `{command(args)}`  \n"
        f"Machine: {os.cpu_count()} vCPU, {_cpu_model()}; load average at the end {load[0]:.1f}; "
        f"date {time.strftime('%Y-%m-%d', time.gmtime())}.\n\n"
        "Setup: `biod run` in its own process reads an emulated ECG box through pyserial on a real pty "
        "(3 channels at 500 Hz) and an emulated MetaMotionR over the BLE code path (6 axes at 100 Hz, in the "
        "daemon's process), and publishes to a real broker. Three persons are enrolled with `biod calibrate` "
        "from one ECG-ID recording each (20 s, lead I); then each wears the sensors in turn with a recording "
        "made on another day. ECG-ID persons 2, 26 and 34 are held out of the model's training.\n\n"
        "Latency = from the daemon's first clean beat of a wearing session to its identity `new` event, in "
        "seconds of ECG (wall seconds × replay speed). CPU = the daemon process's user+system time over the "
        "wall time of the run, in % of one core (it includes the in-process IMU emulator). Peak RSS = VmHWM.\n\n"
        "| replay speed | wearers identified | latency median (s of ECG) | latency p95 (s of ECG) | CPU % of one core | peak RSS MB |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "The consensus (3 agreeing decisions over pools of 5 clean 3 s windows) sets most of the latency: "
        "a window is released 2.5 s after its end so that late search-back beats are in it.\n")


def command(args: argparse.Namespace) -> str:
    """The command line that regenerates the page, its output flags included."""
    out = (f" --json {args.json}" if args.json else "") + (f" --md {args.md}" if args.md else "")
    return (f"python -m training.eval latency --speeds {' '.join(f'{s:g}' for s in args.speeds)} "
            f"--cycles {args.cycles}{out}")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"

