"""Model manifest: the JSON file next to every ``.tflite`` the daemon may load.

WHY: the daemon trusts nothing about a model that the manifest does not state. Input rate,
window length, channel order, normalisation, the int8 scale/zero-point, the sensor placement,
what each named output means, the class labels, the persons it was trained on (so an
evaluation can exclude them) and the sha256 of the exact file all live here, so that a model
is never fed data it was not trained for and a swapped or corrupt file is refused.

Unknown keys are rejected (``extra="forbid"``): a typo such as ``"rate_Hz"`` must fail loudly
rather than silently fall back to a default. This module has no TensorFlow dependency; the
training exporter (``training/export.py``) and the runtime (``daemon/inference/runtime.py``)
both import it, so the normalisation applied at export (calibration) and at inference is the
same code.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """A manifest file is missing, not JSON, or does not follow the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quantisation(_Strict):
    """Affine int8 quantisation of one tensor: ``q = round(x / scale) + zero_point``."""

    scale: float = Field(gt=0)
    zero_point: int = Field(ge=-128, le=127)


class Normalisation(_Strict):
    """What the caller's raw values go through before the model sees them.

    ``none``: fed as is. ``zscore``: ``(x - mean) / std`` along the last axis (``mean``/``std``
    have ``shape[-1]`` entries, or one entry for all). ``in_model``: the model normalises
    itself; ``description`` says how. The runtime applies ``zscore`` itself, then quantises.
    """

    kind: Literal["none", "zscore", "in_model"] = "none"
    mean: list[float] | None = None
    std: list[float] | None = None
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> "Normalisation":
        if self.kind == "zscore":
            if self.mean is None or self.std is None or len(self.mean) != len(self.std):
                raise ValueError("zscore normalisation needs mean and std of equal length")
            if any(s <= 0 for s in self.std):
                raise ValueError("zscore std entries must be > 0")
        elif self.mean is not None or self.std is not None:
            raise ValueError(f"normalisation kind {self.kind!r} takes no mean/std")
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` as float32 with this normalisation applied (broadcast on the last axis)."""
        x = np.asarray(x, dtype=np.float32)
        if self.kind != "zscore":
            return x
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return (x - mean) / std


class FeatureSpec(_Strict):
    """The model's input is computed from a raw window by a daemon function, not fed raw.

    ``kind`` names the function (``"acf"`` = ``daemon.dsp.imu.acf_features_batch``), ``params``
    its keyword arguments (e.g. ``variant``, ``max_lag``), ``source_shape``/``source_channels``
    the raw window it takes (per example) at the input's ``rate_hz``.
    """

    kind: str
    params: dict[str, float | int | str] = Field(default_factory=dict)
    source_shape: list[int]
    source_channels: list[str] = Field(default_factory=list)
    source_units: str = ""


class InputSpec(_Strict):
    """One signature input. ``shape`` is per example: the batch axis (first) is not listed."""

    name: str
    dtype: Literal["int8", "float32"]
    shape: list[int]
    rate_hz: float | None = None
    window_s: float | None = None
    channels: list[str] = Field(default_factory=list, description="leads or axes, in order")
    units: str = ""
    normalisation: Normalisation = Field(default_factory=Normalisation)
    quantisation: Quantisation | None = None
    placement: str | None = Field(default=None, description="sensor placement (IMU)")
    features: FeatureSpec | None = None
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"input {self.name!r}: shape entries must be > 0, got {self.shape}")
        if self.dtype == "int8" and self.quantisation is None:
            raise ValueError(f"input {self.name!r}: int8 input needs quantisation scale/zero_point")
        if self.dtype == "float32" and self.quantisation is not None:
            raise ValueError(f"input {self.name!r}: float32 input takes no quantisation")
        n = self.normalisation
        if n.kind == "zscore" and self.shape and len(n.mean or []) not in (1, self.shape[-1]):
            raise ValueError(
                f"input {self.name!r}: zscore mean/std need 1 or {self.shape[-1]} entries"
            )
        return self


class OutputSpec(_Strict):
    """One signature output, read by name. ``shape`` is per example (no batch axis)."""

    name: str
    dtype: Literal["float32", "int8"] = "float32"
    shape: list[int]
    meaning: str


class TrainingData(_Strict):
    """Which persons the model has seen, per dataset: evaluations must exclude them."""

    datasets: list[str]
    persons: dict[str, list[str]] = Field(description="dataset -> person ids used for training")
    held_out: dict[str, list[str]] = Field(default_factory=dict)
    fingerprints: list[str] = Field(default_factory=list, description=(
        "content fingerprints of the listed persons' recordings (training.data.ecg.fingerprint): an "
        "evaluation excludes a person by what was recorded, not by a number another folder may reuse"))
    description: str = ""


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    created: str = Field(description="ISO 8601 UTC")
    file: str = Field(description="the .tflite file name, in the manifest's folder")
    tasks: list[str]
    signature: str = "serving_default"
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: list[OutputSpec] = Field(min_length=1)
    labels: dict[str, list[str]] = Field(
        default_factory=dict, description="output name -> class label per index"
    )
    thresholds: dict[str, float] = Field(default_factory=dict)
    training: TrainingData
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="e.g. {'float': {...}, 'int8': {...}}"
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    notes: str = ""

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        outs = {o.name: o for o in self.outputs}
        for key, labels in self.labels.items():
            if key not in outs:
                raise ValueError(f"labels given for unknown output {key!r}")
            if outs[key].shape and outs[key].shape[-1] != len(labels):
                raise ValueError(
                    f"output {key!r} has {outs[key].shape[-1]} values but {len(labels)} labels"
                )
        return self

    def input(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


def manifest_path_for(model_path: Path) -> Path:
    """The manifest sits next to the model: ``imu_activity.tflite`` -> ``imu_activity.json``."""
    return Path(model_path).with_suffix(".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; every failure names the file and what to do."""
    path = Path(path)
    fix = "re-install the package or re-export the model (`python -m training.train`)"
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found; {fix}") from None
    except UnicodeDecodeError as exc:  # a flipped bit in a JSON file: corrupt, not a crash
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): "
                            f"corrupt; {fix}") from None
    except OSError as exc:  # a folder in its place, no permission, an I/O error
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror or exc}); {fix}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}); {fix}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{path}: does not follow the manifest schema: {exc}; {fix}") from None
