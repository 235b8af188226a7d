"""`python -m training.eval soak [--minutes M] [--speed S] [--json FILE] [--md FILE]`

Does the daemon run for months? Measured the only way a benchmark can in minutes: ``biod run``
in its own process, fed by an emulated ECG box (pyserial on a real pty, 3 channels at 500 Hz)
and an emulated MetaMotion (100 Hz) replayed ``--speed`` times faster than real time, with a
real broker, one enrolled person and wearers changing all the time (each wearing session a
different shipped ECG-ID recording; electrodes off between sessions), so that every path that
could accumulate runs: DSP state, windows, inference, identity pools and sessions, events,
MQTT publishing. Sampled every few seconds: the daemon's RSS (VmRSS), its CPU time, and its
log (events, errors).

Reported: RSS after warm-up and at the end, the least-squares growth in MB per hour of signal
over the run after warm-up, the CPU % of one core, events published, and every ERROR line. A
leak of a few hundred bytes per window shows: at 50× a 10-minute run is 8 hours of signal,
about 29 000 windows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from training.eval.latency import REPO, _config, _cpu_model, _proc_cpu_s, _start_broker

WEARERS = ("ecgid-p02-r4", "ecgid-p26-r3", "ecgid-p34-r3", "ecgid-p05-r1", "ecgid-p25-r4", "ecgid-p53-r4")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(minutes: float, speed: float, tmp: Path, sample_s: float = 5.0, warmup_frac: float = 0.15) -> dict:
    from firmware_protocol.ecg_serial import Electrode
    from firmware_protocol.emulators.ecg_box import EcgBoxEmulator
    from firmware_protocol.emulators.recordings import load_recording

    enrol = _config(tmp, "ecg:\n  source: emulator\n  emulator:\n    recording: ecgid-p02-r1\n    speed: 10\n    loop: false\n")
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "calibrate", "--name", "alice", "--seconds", "20",
                          "--no-walk", "--config", str(enrol)], cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"enrolment failed:\n{res.stdout}\n{res.stderr}")
    broker, port = _start_broker(tmp)
    link = tmp / "ecg"
    box = EcgBoxEmulator(load_recording(WEARERS[0]), rate_hz=500, speed=speed, loop=True)
    box.open_pty(link=str(link))
    box.start()
    cfg = _config(tmp, f"ecg:\n  source: serial\n  port: {link}\n  stall_timeout_s: {max(0.5, 3 / speed):.2f}\n"
                       f"imu:\n  enabled: true\n  source: emulator\n  emulator:\n    speed: {speed:g}\n"
                       f"mqtt:\n  host: 127.0.0.1\n  port: {port}\nlog_level: info\n")
    log_path = tmp / "daemon.log"
    log_file = open(log_path, "w")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)], cwd=REPO,
                              stdout=log_file, stderr=subprocess.STDOUT)
    samples: list[tuple[float, float]] = []  # (hours of signal, RSS MB)
    sessions = 0
    try:
        time.sleep(3)
        cpu0, t0 = _proc_cpu_s(daemon.pid), time.monotonic()
        end = t0 + 60 * minutes
        next_sample = t0
        on_s, off_s = 15.0 / speed, 6.0 / speed  # 15 s on, 6 s off, in seconds of signal
        k = 0
        while time.monotonic() < end:
            box.set_recording(WEARERS[k % len(WEARERS)])
            box.set_lead_off(Electrode.NONE)
            sessions += 1
            phase_end = time.monotonic() + on_s
            for off in (False, True):
                while time.monotonic() < min(phase_end, end):
                    now = time.monotonic()
                    if now >= next_sample:
                        if daemon.poll() is not None:
                            raise RuntimeError(f"the daemon exited with {daemon.returncode}; see {log_path}")
                        samples.append(((now - t0) * speed / 3600.0, _rss_mb(daemon.pid)))
                        next_sample += sample_s
                    time.sleep(min(0.05, max(0.0, phase_end - now)))
                if not off:
                    box.set_lead_off(Electrode.RA | Electrode.LA | Electrode.LL)
                    phase_end = time.monotonic() + off_s
            k += 1
        wall = time.monotonic() - t0
        cpu = _proc_cpu_s(daemon.pid) - cpu0
    finally:
        daemon.terminate()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:  # reported below as a failure to stop; never left running
            daemon.kill()
            daemon.wait(5)
            samples.append((samples[-1][0] if samples else 0.0, float("nan")))
        log_file.close()
        box.close()
        broker.terminate()
    if not samples:
        raise RuntimeError(f"no RSS sample was taken; see {log_path}")
    log = log_path.read_text().splitlines()
    hours = np.array([h for h, _ in samples])
    rss = np.array([r for _, r in samples])
    after = hours >= warmup_frac * hours[-1]
    slope = float(np.polyfit(hours[after], rss[after], 1)[0]) if after.sum() >= 3 else float("nan")
    # the allocator settles over the first hours of signal: the second half says whether it stopped
    late = hours >= 0.5 * hours[-1]
    slope_late = float(np.polyfit(hours[late], rss[late], 1)[0]) if late.sum() >= 3 else float("nan")
    return {
        "speed": speed, "wall_minutes": wall / 60.0, "signal_hours": float(hours[-1]) if len(hours) else 0.0,
        "wearing_sessions": sessions, "rss_mb_after_warmup": float(rss[after][0]), "rss_mb_end": float(rss[-1]),
        "rss_mb_max": float(rss.max()), "rss_growth_mb_per_signal_hour": slope,
        "rss_growth_mb_per_signal_hour_second_half": slope_late,
        "cpu_percent_of_one_core": 100.0 * cpu / wall,
        "events_new": sum("event new:" in line for line in log),
        "error_lines": [line for line in log if " ERROR " in line][:20],
        "samples": [[round(h, 4), round(r, 2)] for h, r in samples],
    }


def write_markdown(path: Path, r: dict, args: argparse.Namespace) -> None:
    path.write_text(
        "# Soak: does the daemon's memory stay flat?\n\n"
        "Generated by `training/eval/soak.py`; do not edit by hand.\n\n"
        f"Command: `{command(args)}`  \n"
        f"Machine: {os.cpu_count()} vCPU, {_cpu_model()}; date {time.strftime('%Y-%m-%d', time.gmtime())}.\n\n"
        "`biod run` in its own process; emulated ECG box on a pty (3 channels, 500 Hz) and MetaMotion "
        "(100 Hz), replayed faster than real time; a real broker; one enrolled person; wearers change "
        "every 15 s of signal with 6 s electrodes-off between (each session a different ECG-ID recording).\n\n"
        "| replay speed | wall | signal | wearing sessions | identity `new` events | RSS after warm-up | RSS at the end | RSS max | growth after warm-up / in the second half (least squares) | CPU % of one core | ERROR lines |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['speed']:g}× | {r['wall_minutes']:.1f} min | {r['signal_hours']:.2f} h | {r['wearing_sessions']} | "
        f"{r['events_new']} | {r['rss_mb_after_warmup']:.1f} MB | {r['rss_mb_end']:.1f} MB | {r['rss_mb_max']:.1f} MB | "
        f"{r['rss_growth_mb_per_signal_hour']:+.2f} / {r['rss_growth_mb_per_signal_hour_second_half']:+.2f} MB per hour "
        f"of signal | {r['cpu_percent_of_one_core']:.1f} | "
        f"{len(r['error_lines'])} |\n\n"
        "RSS is sampled every 5 s of wall time (VmRSS); the first 15 % of the run is warm-up (imports, "
        "first allocations of the interpreter and LiteRT).\n"
        + ("".join(f"\n    {line}" for line in r["error_lines"]) + "\n" if r["error_lines"] else ""))


def command(args: argparse.Namespace) -> str:
    """The command line that regenerates the page, its output flags included."""
    out = (f" --json {args.json}" if args.json else "") + (f" --md {args.md}" if args.md else "")
    return f"python -m training.eval soak --minutes {args.minutes:g} --speed {args.speed:g}{out}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock length of the run")
    ap.add_argument("--speed", type=float, default=50.0, help="replay speed (50: 10 min = 8.3 h of signal)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--md", type=Path, default=None, metavar="FILE",
                    help="also (re)write this markdown page (the committed one: "
                    "docs/benchmarks/soak.md); default: print only")
    args = ap.parse_args(argv)
    r = soak(args.minutes, args.speed, Path(tempfile.mkdtemp(prefix="biod-soak-")))
    print(f"{r['signal_hours']:.2f} h of signal at {r['speed']:g}x in {r['wall_minutes']:.1f} min: RSS "
          f"{r['rss_mb_after_warmup']:.1f} -> {r['rss_mb_end']:.1f} MB (max {r['rss_mb_max']:.1f}), growth "
          f"{r['rss_growth_mb_per_signal_hour']:+.2f} MB per signal hour (second half "
          f"{r['rss_growth_mb_per_signal_hour_second_half']:+.2f}); CPU {r['cpu_percent_of_one_core']:.1f}%; "
          f"{r['wearing_sessions']} sessions, {r['events_new']} identity events, {len(r['error_lines'])} ERROR lines")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(args.md, r, args)
    return 0
