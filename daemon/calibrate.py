"""``biod calibrate --name NAME``: guided enrolment in the terminal.

The person sits still, then walks; the command streams from the configured ECG source through
exactly the daemon's pipeline and model, shows a live progress bar with the signal quality and
what is wrong when windows are rejected, then builds the templates, reports how separable the
new person is (expected false-accept/false-reject rates, margins to the people already
enrolled and to never-enrolled persons) and saves atomically (0600). With ``imu.enabled`` the
MetaMotion streams too, and the walking windows of the walking phase (gait gate on) build a
gait template stored with the person (fused with the ECG score later; never an identity on its
own). It opens the devices
itself, so stop the daemon first (``systemctl stop biod``) or use the enrol button in Home
Assistant, which runs the same enrolment inside the daemon.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from daemon.app import load_ecg_model, open_store
from daemon.biometrics import MODELS_DIR
from daemon.config import BiodConfig, ConfigError
from daemon.dsp.imu_pipeline import SensorImuPipeline
from daemon.ecg_stream import EcgStream
from daemon.enrol import ContinuityWatch, EnrolmentRefused, check_before_recording, enrol_one_lead_set
from daemon.identity.gait import GaitModel, GaitModelError, load_gait_models
from daemon.identity.engine import EnrolmentReport
from daemon.identity.store import StoreError
from daemon.sources.factory import open_ecg_source
from daemon.sources.serial_ecg import EcgChunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    label: str        # activity label stored with the windows (prototype per activity)
    seconds: float
    instruction: str


def phases(total_s: float, walk: bool = True) -> list[Phase]:
    if not walk:
        return [Phase("rest", total_s, "sit still, breathe normally")]
    rest = total_s / 2
    return [Phase("rest", rest, "sit still, breathe normally"),
            Phase("walking", total_s - rest, "now walk around at your usual pace")]


class ImuCollector:
    """The configured MetaMotion in a thread with its own asyncio loop (calibrate is synchronous),
    its samples through the daemon's ``ImuPipeline``, and the gait embeddings of walking windows.

    ``drain(collect)`` is called from the ECG loop; only windows drained with ``collect`` True
    (the walking phase) and with the gait gate on count.
    """

    def __init__(self, cfg: BiodConfig, model: GaitModel) -> None:
        from daemon.sources.imu_thread import ImuThread

        self.model = model
        self.imu = ImuThread(cfg.imu)
        self.pipeline = SensorImuPipeline(cfg.imu.acc_range_g, cfg.imu.gyro_range_dps, cfg.imu.odr_hz)
        self.embeddings: list[np.ndarray] = []
        self.windows = 0

    def start(self) -> None:
        self.imu.start()

    def stop(self) -> None:
        self.imu.stop()

    def drain(self, collect: bool) -> None:
        for chunk in self.imu.drain():
            update = self.pipeline.push(chunk.t_s, chunk.acc_g, chunk.gyro_dps)
            walking = [w.data for w in update.windows if w.gait.walking and not w.clipped]
            self.windows += len(update.windows)
            if collect and walking:
                try:
                    self.embeddings.extend(self.model.embed(np.stack(walking)))
                except GaitModelError as exc:
                    log.warning("calibrate: no gait template: %s", exc)


class EnrolmentInterrupted(Exception):
    """The ECG stopped part-way through the recording (``daemon.enrol.ContinuityWatch``)."""


def open_imu_collector(cfg: BiodConfig, out: TextIO = sys.stdout) -> ImuCollector | None:
    """An IMU collector when ``imu.enabled`` and a gait model for ``imu.placement`` ships."""
    if not cfg.imu.enabled:
        return None
    try:
        model = load_gait_models(cfg.models_dir or MODELS_DIR).get(cfg.imu.placement)
    except GaitModelError as exc:
        print(f"  no gait template: {exc}", file=out)
        return None
    if model is None:
        print(f"  no gait template: no gait model for an IMU worn at the {cfg.imu.placement}", file=out)
        return None
    return ImuCollector(cfg, model)


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = min(width, int(width * done / max(total, 1)))
    return "#" * filled + "." * (width - filled)


def collect(cfg: BiodConfig, plan: list[Phase], out: TextIO = sys.stdout, silence_s: float = 5.0,
            imu: ImuCollector | None = None) -> tuple[np.ndarray, list[str], dict[str, int], list[int]]:
    """Stream and return (embeddings (n, D), activity label per window, rejection reasons,
    how many leads were on in each clean window). ``imu``: also drained, walking phase
    gait embeddings end up in ``imu.embeddings``."""
    model = load_ecg_model(cfg)
    if model is None:
        raise ConfigError("calibrate: no usable ECG model (see the error above); re-install biod")
    chunks: queue.Queue[EcgChunk] = queue.Queue(maxsize=5000)
    source, emulator = open_ecg_source(cfg, chunks.put)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    if imu is not None:
        imu.start()
    stream = EcgStream(cfg.ecg.mains_hz, model.pipeline_kwargs())
    embeddings: list[np.ndarray] = []
    labels: list[str] = []
    rejected: dict[str, int] = {}
    leads: list[int] = []
    watch = ContinuityWatch()
    stream_s = 0.0  # sample time since the start: the watch's clock
    total = sum(p.seconds for p in plan)
    tty = out.isatty()
    try:
        for i, phase in enumerate(plan):
            print(f"\nstep {i + 1}/{len(plan)}: {phase.instruction} ({phase.seconds:.0f} s of ECG)", file=out, flush=True)
            phase_samples = 0  # counted in samples: 1000 chunks of 0.02 s do not add up to 20.0
            last_data = time.monotonic()
            hr = quality = None
            reason = ""
            while True:
                try:
                    chunk = chunks.get(timeout=0.25)
                except queue.Empty:
                    if time.monotonic() - last_data > silence_s:
                        print(f"\n  the ECG stopped ({source.health.last_error or 'no data'}); finishing with what was recorded",
                              file=out, flush=True)
                        return _result(embeddings, labels, rejected, leads)
                    continue
                last_data = time.monotonic()
                if imu is not None:
                    imu.drain(collect=phase.label == "walking")
                # the daemon's rule for lost frames, reconnects and box restarts: a template is
                # enrolled only from windows the daemon would identify from
                update = stream.push(chunk, source.health.connects)
                phase_samples += len(chunk.samples_mv)
                stream_s += len(chunk.samples_mv) / chunk.rate_hz
                watch.feed(stream_s, update.live, bool(embeddings))
                if watch.broken is not None:
                    raise EnrolmentInterrupted(watch.broken)
                done_s = phase_samples / chunk.rate_hz
                hr = update.heart_rate_bpm or hr
                for window in update.windows:
                    quality = window.quality.index
                    if window.quality.ok_for_identity and window.lead_mask.any():
                        emb, _ = model.infer(window)
                        embeddings.append(np.asarray(emb, dtype=np.float32))
                        leads.append(int(window.lead_mask.sum()))
                        labels.append(phase.label)
                        reason = ""
                    else:
                        reason = window.quality.reason or "no lead on"
                        rejected[reason] = rejected.get(reason, 0) + 1
                    line = (f"  [{_bar(int(done_s), int(phase.seconds))}] {len(embeddings):3d} clean windows"
                            f"  quality {0 if quality is None else quality:.2f}"
                            f"  HR {'--' if hr is None else f'{hr:.0f}'} bpm"
                            + (f"  gait {len(imu.embeddings)}" if imu is not None else "")
                            + (f"  rejected: {reason}" if reason else ""))
                    print(("\r" + line) if tty else line, end="" if tty else "\n", file=out, flush=True)
                if phase_samples >= round(phase.seconds * chunk.rate_hz):
                    break
        print("", file=out)
        return _result(embeddings, labels, rejected, leads)
    finally:
        stop.set()
        thread.join(5)
        if imu is not None:
            imu.stop()
        if emulator is not None:
            emulator.close()
        log.debug("calibrate: collected %.0f s plan", total)


def _result(embeddings: list[np.ndarray], labels: list[str], rejected: dict[str, int], leads: list[int]):
    """(embeddings (n, D), phase label per window, rejection reasons counted, lead count per window)."""
    dim = embeddings[0].shape[0] if embeddings else 0
    return (np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32)), labels, rejected, leads


def describe(report: EnrolmentReport, out: TextIO = sys.stdout) -> None:
    print(f"\n{'accepted' if report.accepted else 'REFUSED'}: {report.reason}", file=out)
    selfsim = report.median_self_similarity
    print(f"  clean windows: {report.n_windows}"
          + (f", median self-similarity {selfsim:.3f}" if np.isfinite(selfsim) else ""), file=out)
    if report.accepted:
        print(f"  threshold {report.threshold:.3f}; expected false-accept rate {100 * report.expected_far:.2f}% "
              f"(up to {100 * report.expected_far_upper:.2f}%) over {report.n_impostor} impostor segments, "
              f"expected false-reject rate {100 * report.expected_frr:.2f}% (same session; expect more on another day)",
              file=out)
        for name, margin in sorted(report.margins.items(), key=lambda kv: kv[1]):
            risk = report.accepted_by.get(name)
            extra = f", {name}'s template would accept {100 * risk:.1f}% of these windows" if risk else ""
            print(f"  margin to {name}: {margin:+.3f}{extra}", file=out)
        gait = report.person.gait if report.person is not None else None
        if gait is not None:
            print(f"  gait template from {gait.n_windows} walking windows ({gait.model}); it only adds to the ECG score, "
                  "never identifies on its own", file=out)
    for warning in report.warnings:
        print(f"  warning: {warning}", file=out)


def run_calibrate(cfg: BiodConfig, name: str, seconds: float, walk: bool = True, out: TextIO = sys.stdout) -> int:
    # Everything that can refuse the enrolment is checked before the person is asked to record.
    model = load_ecg_model(cfg)
    if model is None:
        print("biod calibrate: no usable ECG model; re-install biod's models (`sudo deploy/install.sh` from the biod checkout)", file=sys.stderr)
        return 2
    try:
        store = open_store(cfg)
        engine, impostors = check_before_recording(store, cfg.identity.engine_config(), model.ref,
                                                   cfg.models_dir or MODELS_DIR, name)
    except (StoreError, EnrolmentRefused) as exc:
        print(f"biod calibrate: {exc}", file=sys.stderr)
        return 2
    # persons enrolled with another ECG model are not identified; enrolling one of them again replaces them
    stale = [n for n in engine.stale if n != name.strip()]
    if len(stale) < len(engine.stale):
        print(f"{name.strip()!r} was enrolled with another ECG model than the one installed now: this enrolment "
              "replaces their old templates.", file=out)
    if stale:
        print(f"Not identified until each is re-enrolled with `sudo biod calibrate --name NAME` (templates of another "
              f"ECG model): {', '.join(stale)}.", file=out)
    imu = open_imu_collector(cfg, out) if walk else None
    if imu is not None:
        engine.attach_gait({imu.model.placement: imu.model}, imu.model.placement)
    print(f"Enrolling {name!r}: attach the electrodes (RA, LA, LL), then follow the steps. "
          f"{len(engine.people) + len(engine.stale)} person(s) already enrolled.", file=out)
    try:
        embeddings, labels, rejected, lead_counts = collect(cfg, phases(seconds, walk), out, imu=imu)
    except EnrolmentInterrupted as exc:
        print(f"\nREFUSED: {exc}", file=out)
        return 1
    if rejected:
        print("  rejected windows: " + ", ".join(f"{k} ×{v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])), file=out)
    if len(embeddings) == 0:
        worst = max(rejected, key=rejected.get) if rejected else "no ECG arrived"
        fixes = {"signal_lost": "frames were lost between the box and the hub: check the cable and the USB port, "
                                "and that the hub is not overloaded",
                 "no ECG arrived": "the box sent nothing: check that it is plugged in and switched on "
                                   "(`biod doctor` checks the serial device)"}
        fix = fixes.get(worst, "check the electrodes' contact and keep still")
        print(f"\nREFUSED: no clean ECG window (most common problem: {worst}); {fix}, then run biod calibrate again",
              file=out)
        return 1
    report = enrol_one_lead_set(engine, name, embeddings, lead_counts, labels, impostors,
                                np.stack(imu.embeddings) if imu is not None and imu.embeddings else None)
    describe(report, out)
    if not report.accepted or report.person is None:
        return 1
    try:
        store.add(report.person, replace_stale=True)
    except StoreError as exc:  # e.g. the same name enrolled from Home Assistant meanwhile
        print(f"biod calibrate: not saved: {exc}", file=sys.stderr)
        return 2
    print(f"saved to {cfg.store_path} (mode 0600); the running daemon picks it up within seconds", file=out)
    return 0
