"""`python -m training.eval throughput [--data DIR] [--json FILE]`: DSP speed and memory.

Measures, on one pinned CPU core with BLAS/OpenMP limited to one thread:

* the whole ECG path (:class:`daemon.dsp.ecg_pipeline.EcgPipeline`: conditioning, R-peak
  detection, resampling, segmentation, quality, heart rate; HRV is computed when an update's
  ``hrv`` is read, which the daemon does not do, nor this benchmark) on 3 leads at 500 Hz, streamed in
  realistic 50 ms frames and in large chunks, in x real time (signal seconds / wall seconds);
* side by side, neurokit2's batch ``ecg_process`` and ``ecg_peaks`` on the same signal (lead II;
  neurokit2 is single-lead, so it does a third of our work);
* the IMU path (:class:`daemon.dsp.imu_pipeline.ImuPipeline`: SI units, resampling of jittered
  timestamps, 2 s windows, ACF features, gait) on 6 axes at 100 Hz, same two chunkings;
* peak memory: tracemalloc peak of a separate traced run, and ru_maxrss of the worker process.

Each measurement runs in its own subprocess (so ru_maxrss is that path's, and no import or
cache of one path helps another). Data: with ``--data DIR`` LUDB leads I, II, III (records
concatenated to ``--minutes``) and SisFall waist recordings (a folder holding only one of
``ludb/``, ``sisfall/`` measures that path and skips the other with a ``skipped:`` line);
without it, the test fixtures tiled to the same length.

Prints the table; writes the page only where asked (``--md FILE``; the committed one:
``--md docs/benchmarks/throughput.md``) and the numbers with ``--json FILE``.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported in this (worker) process

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
ECG_FS = 500.0
IMU_FS = 100.0


# ------------------------------------------------------------------------------ data
def ecg_signal(data: str | None, minutes: float) -> tuple[np.ndarray, str]:
    n = int(minutes * 60 * ECG_FS)
    if data:
        z = np.load(Path(data) / "ludb" / "ludb.npz")
        sig, gain = z["signals"], z["adc_gain"]
        recs = [sig[r, :, :3].astype(np.float32) / gain[r, :3] for r in range(sig.shape[0])]
        src = f"LUDB leads I, II, III ({Path(data) / 'ludb'}), records 1.. concatenated"
    else:
        z = np.load(FIXTURES / "ecg_pipeline" / "ludb_3lead.npz")
        recs = [z["signals"][r].astype(np.float32) / z["adc_gain"][r] for r in range(4)]
        src = "tests/fixtures/ecg_pipeline/ludb_3lead.npz (4 LUDB records, leads I-III), tiled"
    x = np.concatenate(recs)
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.tile(x, (reps, 1))[:n]), src


def imu_signal(data: str | None, minutes: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    n = int(minutes * 60 * IMU_FS)
    if data:
        z = np.load(Path(data) / "sisfall" / "sisfall.npz")
        raw = z["data"][: 4 * n]
        src = f"SisFall waist ADXL345 + ITG3200 ({Path(data) / 'sisfall'}), first recordings"
    else:
        z = np.load(FIXTURES / "imu" / "imu_excerpts.npz")
        raw = np.concatenate([z["sisfall_walking_waist"], z["sisfall_sitting_waist"]])
        src = "tests/fixtures/imu/imu_excerpts.npz (SisFall waist excerpts), tiled"
    raw = np.tile(raw, (-(-n // len(raw)), 1))[:n].astype(np.float64)
    acc_g = raw[:, :3] * (32 / 2**13)
    gyro = raw[:, 3:] * (4000 / 2**16)
    rng = np.random.default_rng(0)  # BLE-like clock jitter, +-2 ms
    t = np.arange(n) / IMU_FS + rng.uniform(-0.002, 0.002, n)
    return t, acc_g, gyro, src


# ------------------------------------------------------------------------------ workers
def served_ecg_kwargs(models: Path = ROOT / "daemon" / "models") -> dict[str, float]:
    """The extra EcgPipeline arguments the shipped beat-morphology model asks for (its 125 Hz
    beat path), read from its manifest without loading the model: what `biod run` adds."""
    from daemon.inference.beatmorph import pipeline_kwargs_of

    m = json.loads((models / "ecg_beats.json").read_text())
    spec = m["inputs"][0]
    fp = spec["features"]["params"]
    return pipeline_kwargs_of(spec["rate_hz"], fp["lowpass_hz"], fp.get("rr_exponent", 0.0),
                              fp.get("rr_ref_s", 1.0))


def _run_ecg(x: np.ndarray, chunk: int, served: bool = False) -> int:
    from daemon.dsp.ecg_pipeline import EcgPipeline

    pipe = EcgPipeline(ECG_FS, n_leads=3, **(served_ecg_kwargs() if served else {}))
    valid = np.ones(3, dtype=bool)
    n_win = 0
    for s in range(0, len(x), chunk):
        n_win += len(pipe.push(x[s:s + chunk], valid).windows)
    return n_win + len(pipe.flush().windows)


def _run_imu(t, acc, gyro, chunk: int) -> int:
    from daemon.dsp.imu_pipeline import ImuPipeline

    pipe = ImuPipeline(fs_out=IMU_FS)
    n_win = 0
    for s in range(0, len(t), chunk):
        n_win += len(pipe.push(t[s:s + chunk], acc[s:s + chunk], gyro[s:s + chunk]).windows)
    return n_win


def _run_nk(x: np.ndarray, what: str) -> int:
    import neurokit2 as nk

    if what == "ecg_process":
        signals, info = nk.ecg_process(x[:, 1], sampling_rate=int(ECG_FS))
    else:
        signals, info = nk.ecg_peaks(x[:, 1], sampling_rate=int(ECG_FS))
    return len(info["ECG_R_Peaks"])


def worker(spec: dict) -> dict:
    """Run one measurement in this process (pinned to one core) and return its numbers."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(spec["cpu"])})
    kind, minutes, data = spec["kind"], spec["minutes"], spec["data"]
    if kind == "ecg" or kind.startswith("nk_"):
        x, _ = ecg_signal(data, minutes)
        if kind == "ecg":
            fn = lambda: _run_ecg(x, int(spec["chunk"]), bool(spec.get("served")))  # noqa: E731
        else:
            fn = lambda: _run_nk(x, kind[3:])  # noqa: E731
    else:
        t, acc, gyro, _ = imu_signal(data, minutes)
        fn = lambda: _run_imu(t, acc, gyro, int(spec["chunk"]))  # noqa: E731
    fn()  # warm-up: imports, caches, lazy scipy modules
    times, cpu = [], []
    for _ in range(int(spec["repeats"])):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    wall = min(times)
    signal_s = minutes * 60.0
    return {"kind": kind, "chunk": spec.get("chunk"), "signal_s": signal_s, "wall_s": wall,
            "cpu_s": min(cpu), "x_realtime": signal_s / wall, "outputs": out,
            "tracemalloc_peak_mib": peak / 2**20,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def profile_ecg(data: str | None, minutes: float, chunk: int) -> list[tuple[str, float]]:
    """cProfile the ECG path; return cumulative seconds per stage, counting only calls made from
    outside the stage's own class (profiler overhead inflates everything; shares are what
    matter)."""
    import cProfile
    import inspect
    import pstats

    from daemon.dsp.ecg_pipeline import EcgPipeline
    from daemon.dsp.filters import EcgConditioner, StreamResampler
    from daemon.dsp.hrv import HeartRateTracker
    from daemon.dsp.quality import QualityAssessor
    from daemon.dsp.rpeaks import RPeakDetector
    from daemon.dsp.segment import SlidingWindower, WindowSegmenter

    stages = [
        ("R-peak detector (RPeakDetector.process, .process_checked, .flush)",
         [RPeakDetector.process, RPeakDetector.process_checked, RPeakDetector.flush]),
        ("conditioning (EcgConditioner.process)", [EcgConditioner.process]),
        ("resampling to 100 Hz (StreamResampler.process)", [StreamResampler.process]),
        ("windows (SlidingWindower.push from the pipeline, WindowSegmenter.push)",
         [SlidingWindower.push, WindowSegmenter.push]),
        ("quality (QualityAssessor.assess)", [QualityAssessor.assess]),
        ("heart rate / HRV (HeartRateTracker)",
         [HeartRateTracker.push, HeartRateTracker.heart_rate_bpm, HeartRateTracker.hrv,
          HeartRateTracker.last_clean_time]),
        ("whole ECG path (EcgPipeline.push, .flush)", [EcgPipeline.push, EcgPipeline.flush]),
    ]
    x, _ = ecg_signal(data, minutes)
    _run_ecg(x, chunk)
    prof = cProfile.Profile()
    prof.runcall(_run_ecg, x, chunk)
    st = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = []
    for label, funcs in stages:
        keys = {(inspect.getsourcefile(f), f.__code__.co_firstlineno, f.__name__) for f in funcs}
        total = 0.0
        for key in keys:
            if key not in st:
                continue
            callers = st[key][4]
            # a call from another of this stage's functions is already inside its time
            total += sum(v[3] for k, v in callers.items() if k not in keys)
        out.append((label, total))
    return out


def _spawn(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "training.eval.throughput", "--_worker",
                           json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"throughput worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_model": model, "nproc": os.cpu_count(), "load_average_1_5_15": load,
            "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}


def table(rows: list[dict]) -> str:
    """Markdown table. "x real time" uses wall time; "(CPU)" uses the process's CPU time, which
    is what the path costs when the core is shared with other work."""
    head = ("| path | chunking | signal | wall s | x real time | CPU s | x real time (CPU) "
            "| tracemalloc peak MiB | ru_maxrss MiB |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['label']} | {r['chunking']} | {r['signal_s'] / 60:g} min "
                     f"| {r['wall_s']:.3f} | {r['x_realtime']:.0f} | {r['cpu_s']:.3f} "
                     f"| {r['signal_s'] / max(r['cpu_s'], 1e-9):.0f} "
                     f"| {r['tracemalloc_peak_mib']:.1f} | {r['ru_maxrss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval throughput",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="folder in the format of ../shared/data (ludb/, sisfall/); "
                    "default: the test fixtures, tiled")
    ap.add_argument("--json", help="write all numbers to this JSON file")
    ap.add_argument("--md", default=None, metavar="FILE",
                    help="also (re)write this markdown page (the committed one: "
                    "docs/benchmarks/throughput.md); default: print only")
    ap.add_argument("--minutes", type=float, default=10.0, help="signal length (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default 3)")
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: last)")
    ap.add_argument("--frame-ms", type=float, default=50.0, help="streaming frame (default 50)")
    ap.add_argument("--large-s", type=float, default=10.0, help="large chunk (default 10 s)")
    ap.add_argument("--no-neurokit", action="store_true", help="skip the neurokit2 runs")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile the ECG path (large chunks) and print time per stage")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        if spec["kind"] == "profile":
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {int(spec["cpu"])})
            print(json.dumps(profile_ecg(spec["data"], spec["minutes"], int(spec["chunk"]))))
        else:
            print(json.dumps(worker(spec)))
        return 0
    has_ecg = has_imu = True
    if args.data:
        if not Path(args.data).is_dir():
            print(f"error: --data {args.data} is not a folder (omit --data to use the test "
                  "fixtures)", file=sys.stderr)
            return 2
        has_ecg = (Path(args.data) / "ludb" / "ludb.npz").is_file()
        has_imu = (Path(args.data) / "sisfall" / "sisfall.npz").is_file()
        if not (has_ecg or has_imu):
            print(f"error: neither {args.data}/ludb/ludb.npz nor {args.data}/sisfall/sisfall.npz "
                  "found; pass a folder in the format of ../shared/data or omit --data to use "
                  "the test fixtures", file=sys.stderr)
            return 2
        if not has_ecg:
            print(f"skipped: ECG path and neurokit2: no {args.data}/ludb/ludb.npz", flush=True)
        if not has_imu:
            print(f"skipped: IMU path: no {args.data}/sisfall/sisfall.npz", flush=True)
    cpu = args.cpu
    if cpu is None:
        cpu = sorted(os.sched_getaffinity(0))[-1] if hasattr(os, "sched_getaffinity") else 0
    # the workers run in the repository root: they get the folder as an absolute path
    base = {"minutes": args.minutes, "data": str(Path(args.data).resolve()) if args.data else None,
            "repeats": args.repeats, "cpu": cpu}
    frame_ecg = max(1, int(round(args.frame_ms / 1000 * ECG_FS)))
    frame_imu = max(1, int(round(args.frame_ms / 1000 * IMU_FS)))
    plan = [
        ("ECG path, 3 leads @ 500 Hz", f"{args.frame_ms:g} ms frames",
         dict(kind="ecg", chunk=frame_ecg)),
        ("ECG path, 3 leads @ 500 Hz", "200 ms batches (what `biod run` pushes)",
         dict(kind="ecg", chunk=int(0.2 * ECG_FS))),
        ("ECG path, 3 leads @ 500 Hz", f"{args.large_s:g} s chunks",
         dict(kind="ecg", chunk=int(args.large_s * ECG_FS))),
        ("ECG path, 3 leads @ 500 Hz", "whole record",
         dict(kind="ecg", chunk=int(args.minutes * 60 * ECG_FS))),
        ("ECG path as served (+ 125 Hz beat path of ecg_beats)", "200 ms batches (what `biod run` pushes)",
         dict(kind="ecg", chunk=int(0.2 * ECG_FS), served=True)),
        ("ECG path as served (+ 125 Hz beat path of ecg_beats)", f"{args.large_s:g} s chunks",
         dict(kind="ecg", chunk=int(args.large_s * ECG_FS), served=True)),
    ]
    if not has_ecg:
        plan = []
    if not args.no_neurokit and has_ecg:
        plan += [("neurokit2 ecg_process, lead II only", "whole record (batch)",
                  dict(kind="nk_ecg_process")),
                 ("neurokit2 ecg_peaks, lead II only", "whole record (batch)",
                  dict(kind="nk_ecg_peaks"))]
    plan += [
        ("IMU path, 6 axes @ 100 Hz", f"{args.frame_ms:g} ms frames",
         dict(kind="imu", chunk=frame_imu)),
        ("IMU path, 6 axes @ 100 Hz", f"{args.large_s:g} s chunks",
         dict(kind="imu", chunk=int(args.large_s * IMU_FS))),
    ] if has_imu else []
    rows = []
    for label, chunking, spec in plan:
        r = _spawn({**base, **spec})
        r.update(label=label, chunking=chunking)
        rows.append(r)
        print(f"{label:<40} {chunking:<22} {r['x_realtime']:>9.0f} x real time  "
              f"({r['wall_s']:.3f} s, tracemalloc {r['tracemalloc_peak_mib']:.1f} MiB, "
              f"maxrss {r['ru_maxrss_mib']:.0f} MiB)", flush=True)
    profile = None
    if args.profile and not has_ecg:
        print("skipped: --profile of the ECG path: no ECG data", flush=True)
    elif args.profile:
        profile = _spawn({**base, "kind": "profile", "chunk": int(args.large_s * ECG_FS)})
        whole = profile[-1][1] or 1.0
        print(f"\nprofile of the ECG path ({args.large_s:g} s chunks, cProfile, cumulative s):")
        for label, sec in profile:
            print(f"  {label:<75} {sec:7.3f} s  {100 * sec / whole:5.1f} %")
    ecg_src = ecg_signal(args.data, 0.01)[1] if has_ecg else "none (skipped)"
    imu_src = imu_signal(args.data, 0.01)[-1] if has_imu else "none (skipped)"
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m training.eval throughput " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "pinned_cpu": cpu, "ecg_data": ecg_src, "imu_data": imu_src,
              "rows": rows, "table_markdown": table(rows), "profile_ecg_s": profile}
    print()
    print(result["table_markdown"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        write_markdown(Path(args.md), result)
    return 0


def write_markdown(path: Path, result: dict) -> None:
    m = result["machine"]
    load = m.get("load_average_1_5_15") or ("?", "?", "?")
    prof = ""
    if result.get("profile_ecg_s"):
        whole = result["profile_ecg_s"][-1][1] or 1.0
        prof = ("\n\n### Where the ECG path spends its time (cProfile, cumulative, large chunks)\n\n"
                "| stage | s | share |\n|---|---|---|\n" + "\n".join(
                    f"| {label} | {sec:.3f} | {100 * sec / whole:.1f} % |" for label, sec in result["profile_ecg_s"]))
    path.write_text(
        "# DSP throughput and memory\n\nGenerated by `training/eval/throughput.py`; do not edit by hand.\n\n"
        f"Command: `{result['command']}`  \nDate: {result['date']}; machine: {m['nproc']} vCPU, {m['cpu_model']}, "
        f"Python {m['python']}, numpy {m['numpy']}; load average when it finished {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.  \n"
        f"ECG data: {result['ecg_data']}; IMU data: {result['imu_data']}.\n\n"
        "What is measured: the **ECG path** is `daemon.dsp.ecg_pipeline.EcgPipeline` — high-pass + mains notch, "
        "multi-lead R-peak detection, resampling 500 → 100 Hz, 3 s windows every 1 s with beat-centred groups, "
        "quality (flat, clipping, lead-off, mains, HF noise, template correlation, RR) and heart rate (HRV is computed "
        "when an update's `hrv` is read: the daemon does not, nor does this run; until 2026-11-23 it was computed on every push) — on 3 leads "
        "at 500 Hz, pushed in 50 ms frames (small pushes; the serial box itself sends 20 ms frames, which the daemon gathers), in the 200 ms batches the daemon actually "
        "pushes, in 10 s chunks and whole. **neurokit2** `ecg_process` (clean + peaks + rate + delineation + quality) "
        "and `ecg_peaks` run in batch on lead II only (a third of the samples). The **IMU path** is "
        "`daemon.dsp.imu_pipeline.ImuPipeline` (SI units, resampling of jittered timestamps to 100 Hz, 2 s windows, "
        "66 ACF features, gait gate) on 6 axes at 100 Hz. Each row runs in its own process pinned to one core with "
        "BLAS threads at 1; best of the timed repeats; x real time = signal seconds / processing seconds; "
        "'(CPU)' uses process CPU time, the better estimate when the machine is shared.\n\n"
        + result["table_markdown"] + prof + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
