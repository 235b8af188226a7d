"""Inference -> identity -> fusion: the synchronous stage between the DSP and the events.

It takes what the DSP pipelines release (ECG windows with quality, IMU windows with gait
state), runs the int8 models on the clean ones, feeds the identity engine, fuses ECG and IMU
activity with the sum rule, gates age/gender on walking, and returns ``Observation``s for the
event tracker. No threads, no I/O: the asyncio wiring in ``app.py`` calls it, and tests and
the latency benchmark can drive it directly.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.dsp.ecg_pipeline import EcgUpdate, EcgWindow
from daemon.dsp.imu import MOTION_CLASSES, motion_activity
from daemon.dsp.imu_pipeline import ImuUpdate, ImuWindow
from daemon.events import Observation
from daemon.identity.engine import IdentityEngine, IdentityState
from daemon.identity.fusion import ActivityEstimate, FusedActivity, FusionConfig, fuse_activity, gate_walking_only
from daemon.identity.gait import GaitModel, GaitModelError, load_gait_models
from daemon.identity.store import ModelRef
from daemon.inference.beatmorph import BEATS_FILE, BeatMorphModel, fuse_embeddings
from daemon.inference.manifest import ManifestError, load_manifest
from daemon.inference.runtime import Model, ModelError, load_model

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class EcgModelRunner:
    """The ECG dual-task model and what its manifest says it expects."""

    model: Model
    input_name: str
    length: int
    n_leads: int
    rate_hz: float
    window_s: float
    activity_labels: tuple[str, ...]
    #: beat-morphology model fused into the identity embedding (``ecg_beats.tflite`` beside the
    #: ECG model); None: the CNN embedding alone (an older model folder)
    beats: BeatMorphModel | None = None

    @classmethod
    def load(cls, path: Path, beats: bool = True) -> "EcgModelRunner":
        model = load_model(path)
        spec = model.manifest.inputs[0]
        if spec.rate_hz is None or spec.window_s is None or len(spec.shape) != 2:
            raise ModelError(f"{path}: the manifest's input must state rate_hz, window_s and a (samples, leads) shape")
        # WHY: the pipeline cuts windows of rate_hz x window_s samples from these two numbers;
        # a manifest whose numbers disagree with the model's own input would be fed windows of
        # another length (cut to fit, silently), i.e. another time scale than it was trained on
        if int(round(spec.rate_hz * spec.window_s)) != int(spec.shape[0]):
            raise ModelError(f"{path}: the manifest states {spec.rate_hz:g} Hz x {spec.window_s:g} s "
                             f"windows but an input of {spec.shape[0]} samples; re-install biod's models")
        beat_path = Path(path).with_name(BEATS_FILE)
        beat_model = BeatMorphModel.load(beat_path) if beats and beat_path.exists() else None
        return cls(model, spec.name, int(spec.shape[0]), int(spec.shape[1]), float(spec.rate_hz),
                   float(spec.window_s), tuple(model.manifest.labels.get("activity", ())), beat_model)

    @property
    def ref(self) -> ModelRef:
        """What enrolled templates were made with: a template is only comparable with
        embeddings of the same model(s), so the beat model is part of the name."""
        m = self.model.manifest
        dim = int(next(o.shape[-1] for o in m.outputs if o.name == "embedding"))
        if self.beats is None:
            return ModelRef(name=m.name, version=m.version, dim=dim, weights=m.sha256[:12])
        b = self.beats.model.manifest
        return ModelRef(name=f"{m.name}+{b.name}", version=f"{m.version}+{b.version}",
                        dim=dim + self.beats.dim, weights=f"{m.sha256[:12]}+{b.sha256[:12]}")

    def pipeline_kwargs(self) -> dict[str, float]:
        """EcgPipeline arguments that make its windows exactly this model's input."""
        kw = {"model_fs": self.rate_hz, "window_s": self.window_s}
        if self.beats is not None:
            kw.update(self.beats.pipeline_kwargs())
        return kw

    def identity_embedding(self, cnn_embedding: np.ndarray, morph: np.ndarray,
                           lead_mask: np.ndarray) -> np.ndarray:
        """The CNN embedding fused with the beat-morphology one of the window's beats
        ``morph`` (``EcgWindow.morph``), when that model is loaded."""
        if self.beats is None:
            return cnn_embedding
        return fuse_embeddings(cnn_embedding, self.beats.embed(morph, lead_mask), self.beats.weight)

    def infer(self, window: EcgWindow) -> tuple[np.ndarray, np.ndarray]:
        """(identity embedding (D,), activity probabilities (K,)) for one window; leads the
        pipeline marked unusable are zeros already, which is what the model saw in lead-dropout
        training."""
        if window.data.shape[0] != self.length or window.data.shape[1] < self.n_leads:
            raise ModelError(f"the ECG window is {window.data.shape}, the model expects "
                             f"({self.length}, {self.n_leads}): build the pipeline with "
                             "this model's pipeline_kwargs()")
        x = window.data[None, :, : self.n_leads].astype(np.float32)
        out = self.model.run(**{self.input_name: x})
        return (self.identity_embedding(out["embedding"][0], window.morph, window.lead_mask),
                out["activity"][0])


PLACEMENTS = ("waist", "shin", "thigh", "wrist")


def _plain(value: object) -> float | list:
    """A model output for the event JSON: a number when it holds one (``age_years`` 22.97, not
    ``[22.97]``), else a list, rounded to what the estimate can carry."""
    a = np.asarray(value, dtype=np.float64)
    return round(float(a.reshape(-1)[0]), 3) if a.size == 1 else np.round(a, 3).tolist()


def placement_of(text: str | None) -> str | None:
    """A manifest's free-text placement ('right thigh (HuGaDB: ...)') as one of PLACEMENTS;
    None when the manifest states none or one biod does not know."""
    head = (text or "").split("(")[0].lower()
    return next((p for p in PLACEMENTS if p in head), None)


def activity_output(outputs) -> str:
    """The IMU activity model's output in the top-level classes (rest / walking / vigorous).

    WHY by name: the model also has a ``fine`` head (HuGaDB's activities) that never saw
    bicycling; taking the first output, as the runtime happened to order them, read ``fine``
    and no bicycling window was ever vigorous. ``outputs``: the output names (or a dict of
    outputs); checked when the model is loaded, so a model without one fails at start-up."""
    for key in ("top_level", "activity"):
        if key in outputs:
            return key
    raise ModelError(f"the IMU activity model has no 'top_level' or 'activity' output (it has "
                     f"{', '.join(sorted(outputs))}): re-install biod's models")


@dataclass(frozen=True)
class ImuModelSet:
    """IMU models keyed by task; each takes ACF features of an IMU window (manifest-stated).
    ``gait``: gait identity projections keyed by placement (``gait_<placement>.npz``)."""

    models: dict[str, Model]
    gait: dict[str, GaitModel] = field(default_factory=dict)
    #: task -> why it is not used (trained for another placement than the IMU is worn at)
    skipped: dict[str, str] = field(default_factory=dict)
    #: task -> why it could not be loaded (damaged file or manifest): the other IMU models,
    #: gait identity and the movement rules go on without it
    failed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load_dir(cls, directory: Path = MODELS_DIR, placement: str | None = None) -> "ImuModelSet":
        """Every ``imu_*`` model of ``directory``; with ``placement`` (config ``imu.placement``)
        only those trained for that placement. WHY: a thigh strap and a waist belt see different
        movements (the thigh swings through ~60 degrees per stride, the belt barely tilts), so a
        model fed another placement's signal answers with confident nonsense; leaving it out
        makes the daemon fall back on what it can trust (ECG activity, no age/gender)."""
        models, skipped, failed = {}, {}, {}
        for manifest in sorted(directory.glob("imu_*.json")):
            task = manifest.stem.removeprefix("imu_")
            try:  # read the placement before loading: a model that will not run is not loaded
                trained_for = placement_of(load_manifest(manifest).inputs[0].placement)
                if placement is not None and trained_for not in (None, placement):
                    skipped[task] = (f"imu_{task} is trained for an IMU at the {trained_for}, this one "
                                     f"is worn at the {placement} (imu.placement)")
                    continue
                model = load_model(manifest.with_suffix(".tflite"))
                if task == "activity":
                    activity_output([o.name for o in model.manifest.outputs])
            except (ManifestError, ModelError) as exc:
                # WHY per model: a damaged imu_age must not take away activity, gait identity
                # and walking/cadence, which need no age model
                failed[task] = str(exc)
                continue
            models[task] = model
        try:
            gait = load_gait_models(directory)
        except GaitModelError as exc:  # gait identity is optional: ECG identity goes on without it
            log.error("imu: %s; identity from the ECG alone", exc)
            gait = {}
        return cls(models, gait, skipped, failed)

    def run(self, task: str, window: ImuWindow, cache: dict | None = None) -> dict[str, np.ndarray] | None:
        """Run ``task``'s model on ``window``. ``cache`` (one dict per window) keeps features
        computed for one model so the others needing the same variant reuse them."""
        model = self.models.get(task)
        if model is None:
            return None
        spec = model.manifest.inputs[0]
        x = window.features
        if spec.features is not None and spec.features.params.get("variant", "biodeep") != "biodeep":
            from daemon.dsp.imu import acf_features

            params = dict(spec.features.params)
            key = (str(params.get("variant")), int(params.get("max_lag", 10)))
            cache = {} if cache is None else cache
            if key not in cache:
                cache[key] = acf_features(window.data.astype(np.float32), max_lag=key[1], variant=key[0])
            x = cache[key]
        x = np.asarray(x, dtype=np.float32).reshape((1, *spec.shape))
        return {k: v[0] for k, v in model.run(**{spec.name: x}).items()}

    def labels(self, task: str, output: str) -> tuple[str, ...]:
        model = self.models.get(task)
        return tuple(model.manifest.labels.get(output, ())) if model else ()


@dataclass
class BiometricsStats:
    ecg_windows: int = 0
    clean_windows: int = 0
    inferences: int = 0
    inference_errors: int = 0
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=200))

    def inference_ms_median(self) -> float | None:
        return float(np.median(self.inference_ms)) if self.inference_ms else None


class Biometrics:
    """One wearer's stream of evidence -> Observations. Not thread-safe: call from one loop."""

    def __init__(self, ecg_model: EcgModelRunner | None, engine: IdentityEngine,
                 imu_models: ImuModelSet | None = None, fusion: FusionConfig = FusionConfig()) -> None:
        self.ecg_model = ecg_model
        self.engine = engine
        self.imu_models = imu_models
        self.fusion = fusion
        self.stats = BiometricsStats()
        self._ecg_activity: ActivityEstimate | None = None
        self._imu_activity: ActivityEstimate | None = None
        self._imu_at: float = -1e9
        self._ecg_at: float = -1e9
        self.gait: dict[str, object] = {}
        self.identity: IdentityState = IdentityState(wearer=None, confidence=1.0, live=False)
        self.heart_rate_bpm: float | None = None
        self.quality: float = 0.0
        self.signal_problem: str | None = None  # the newest window's rejection reason, None when it passed
        self.embeddings_sink: list | None = None  # set by enrolment: (t, embedding, activity, leads on)
        self.gait_sink: list | None = None        # set by enrolment: gait embeddings of walking windows
        self.gait_placement: str = "waist"       # which gait model new enrolments use (config imu.placement)
        self._inference_faults: set[str] = set()  # messages already logged (one line per kind)

    # -- ECG ----------------------------------------------------------------------------------------
    def on_ecg(self, update: EcgUpdate, now: float | None = None) -> list[Observation]:
        now = time.monotonic() if now is None else now
        self.heart_rate_bpm = update.heart_rate_bpm if update.live else None
        observations: list[Observation] = []
        for window in update.windows:
            self.stats.ecg_windows += 1
            self.quality = float(window.quality.index)
            self.signal_problem = None if window.quality.ok else window.quality.reason
            embedding = None
            usable = window.quality.ok_for_identity
            if usable and self.ecg_model is not None and window.lead_mask.any():
                t0 = time.perf_counter()
                try:
                    embedding, activity = self.ecg_model.infer(window)
                except ModelError as exc:
                    # WHY not raise: this runs in the daemon's ECG task, whose death stops heart
                    # rate and identity until a restart that would fail the same way; a window
                    # the model cannot take is evidence lost, said once per kind of fault
                    if str(exc) not in self._inference_faults:
                        self._inference_faults.add(str(exc))
                        log.error("identity: window dropped, the ECG model cannot take it: %s", exc)
                    self.stats.inference_errors += 1
                    usable = False  # the engine sees it as any window without evidence
                else:
                    self.stats.inference_ms.append((time.perf_counter() - t0) * 1e3)
                    self.stats.inferences += 1
                    self.stats.clean_windows += 1
                    self._ecg_activity = ActivityEstimate(np.asarray(activity), self.ecg_model.activity_labels)
                    self._ecg_at = now
                    if self.embeddings_sink is not None:
                        self.embeddings_sink.append((now, np.asarray(embedding, dtype=np.float32),
                                                     self.activity(), int(window.lead_mask.sum())))
            self.identity = self.engine.observe(now, embedding, usable, update.live, window.lead_mask)
            observations.append(self._observation(now, update.live))
        if not update.live and self.identity.live:
            self.identity = self.engine.observe(now, None, False, False)
            observations.append(self._observation(now, False))
        return observations

    def ecg_lost(self, now: float | None = None) -> Observation | None:
        """The ECG stream stopped (unplugged, silent): identity ends at once."""
        now = time.monotonic() if now is None else now
        if not self.identity.live and self.identity.wearer is None:
            return None
        self.identity = self.engine.observe(now, None, False, False)
        self.heart_rate_bpm = None
        return self._observation(now, False)

    # -- IMU ----------------------------------------------------------------------------------------
    def on_imu(self, update: ImuUpdate, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.imu_models is None:
            return
        for window in update.windows:
            features: dict = {}
            # WHY skip clipped windows: the IMU models never saw one (training drops recordings
            # on the rails, the manifests say so); their verdicts on rail-bound data are guesses
            if window.clipped:
                self._imu_activity = None  # no verdict: the ECG alone speaks for this window
            elif (out := self.imu_models.run("activity", window, features)) is not None:
                key = activity_output(out)
                self._imu_activity = ActivityEstimate(np.asarray(out[key]), self.imu_models.labels("activity", key))
                self._imu_at = now
            elif (label := motion_activity(window.data[:, :3], window.gait)) is not None:
                # no activity model for this placement: the movement rule, held at 0.7 so that
                # a confident ECG can still outvote it in the sum rule
                probs = np.full(len(MOTION_CLASSES), 0.15)
                probs[MOTION_CLASSES.index(label)] = 0.7
                self._imu_activity = ActivityEstimate(probs, MOTION_CLASSES)
                self._imu_at = now
            else:
                # no verdict for this window: the ECG alone speaks for it (an older verdict would
                # keep saying "walking" for 10 s after the person sat down)
                self._imu_activity = None
            gait: dict[str, object] = {"walking": bool(window.gait.walking), "cadence_spm": window.gait.cadence_spm}
            for task in ("age", "gender"):
                res = (self.imu_models.run(task, window, features)
                       if window.gait.walking and not window.clipped else None)
                if res:  # one window: one number per output (events carry them as plain numbers)
                    gait[task] = {k: _plain(v) for k, v in res.items()}
            self.gait = gait
            if window.gait.walking and not window.clipped:
                self._gait_identity(window, now)

    def _gait_identity(self, window: ImuWindow, now: float) -> None:
        """Gait embedding of a walking window -> the engine's gait pool (evidence for fusion
        with the ECG only; it never announces anybody) and, while enrolling, the gait sink."""
        if not self.engine.gait_attached and self.imu_models is not None and self.imu_models.gait:
            self.engine.attach_gait(self.imu_models.gait, self.gait_placement)  # engines are rebuilt on reload
        model = self.engine.gait_model
        if model is None:
            return
        try:
            embedding = model.embed(window.data)[0]
        except GaitModelError as exc:  # IMU windows of another length than the model's: no gait
            log.debug("gait identity: %s", exc)
            return
        self.engine.observe_gait(now, embedding)
        if self.gait_sink is not None:
            self.gait_sink.append(embedding)

    # -- fusion ---------------------------------------------------------------------------------------
    def fused_activity(self, now: float | None = None) -> FusedActivity | None:
        now = time.monotonic() if now is None else now
        ecg = self._ecg_activity if now - self._ecg_at < 10 else None  # stale modality drops out
        imu = self._imu_activity if now - self._imu_at < 10 else None
        return fuse_activity(ecg, imu, self.fusion)

    def activity(self) -> str | None:
        fused = self.fused_activity()
        return fused.label if fused else None

    def _observation(self, now: float, live: bool) -> Observation:
        fused = self.fused_activity(now)
        state = self.identity
        wearer = state.wearer
        sensors: dict[str, object] = {}
        gated = gate_walking_only(self.gait or None, fused, self.fusion)
        if gated:
            sensors["gait"] = gated
        return Observation(
            t=now,
            wearer=wearer,
            confidence=float(state.confidence),
            activity=fused.label if fused else None,
            activity_confidence=float(fused.probs.max()) if fused else 0.0,
            heart_rate_bpm=self.heart_rate_bpm,
            quality=self.quality,
            live=bool(live and state.live),
            sensors=sensors,
        )

