"""Export Keras models to LiteRT ``.tflite`` files with a manifest the daemon can verify.

WHY:
- ``export_int8`` produces a full-integer model (int8 weights and activations, int8 input)
  calibrated on a representative set of *real* windows, so the hub runs integer kernels. The
  outputs stay float32 (the converter appends a dequantize), because embeddings are compared by
  cosine distance and probabilities against thresholds: int8 outputs would only add a step
  every caller could get wrong. Both properties are checked on the converted file, not assumed.
- Signature inputs/outputs get the names stated in the manifest; the runtime reads by name.
- Calibration data go through the manifest's normalisation (``Normalisation.apply``), the same
  code the runtime uses, so what the quantiser saw is what the hub feeds.
- After writing, the file is loaded back through the daemon's own runtime (``load_model``):
  an export that the daemon would refuse fails here, on the training machine.
- ``export_float`` writes the float32 twin for the float-vs-int8 comparison in evaluations.
- ``clip_percentile`` (optional): the converter sets each activation's int8 range to the
  minimum and maximum the calibration windows produce, so one rare extreme value stretches the
  step of every other value of that tensor. In a deep network the rounding noise of ~60
  activation tensors adds up (the ECG CNN's last block carries ~19 % relative error with min/max
  ranges). With ``clip_percentile=p`` the ranges are the p-th and (100-p)-th percentiles of what
  the calibration windows produce instead: a tiny share of values saturates, all the others get
  a finer step (docs/MODELS.md measures it on the ECG CNN).

``manifest_fields`` holds everything the exporter cannot know: ``version``, ``tasks``,
``inputs`` (list of dicts: ``name``, ``shape`` and optionally ``rate_hz``, ``window_s``,
``channels``, ``units``, ``normalisation``, ``placement``, ``description``), ``outputs`` (list of
dicts: ``name``, ``meaning``; shape and dtype are read from the model), ``labels``,
``thresholds``, ``training``, ``metrics``, ``notes``. ``dtype``, ``quantisation``, ``sha256``,
``size_bytes``, ``created`` and ``file`` are filled in here.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from daemon.inference.manifest import (
    InputSpec,
    Manifest,
    manifest_path_for,
    sha256_bytes,
    utc_now,
)
from daemon.inference.runtime import ModelError, load_model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402  (after the log level is set)

# manifest fields that export fills in (an input spec may, and must, carry its "name")
RESERVED_FIELDS = frozenset({"dtype", "quantisation", "sha256", "size_bytes", "created", "file", "name"})
_MAX_CALIBRATION = 500
_CLIP_SAMPLES_PER_WINDOW = 1024  # values per tensor and window kept for the percentile ranges


class ExportError(RuntimeError):
    """The converted model does not have the properties the daemon relies on."""


def _input_specs(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    inputs = list(fields.get("inputs") or [])
    if not inputs:
        raise ExportError("manifest_fields['inputs'] must list the model inputs (name, shape)")
    for spec in inputs:
        bad = set(spec) & RESERVED_FIELDS - {"name"}
        if bad:
            raise ExportError(f"input {spec.get('name')!r}: {sorted(bad)} are filled in by export")
    return [dict(spec) for spec in inputs]


def _saved_model(model: Any, inputs: list[dict[str, Any]], output_names: list[str], tmp: Path) -> Path:
    """Write a SavedModel whose ``serving_default`` has named inputs and named float32 outputs.

    Keras 3's ``ExportArchive`` tracks the model's variables so the converter can freeze them
    (a bare ``tf.function`` + ``from_concrete_functions`` leaves READ_VARIABLE ops behind).
    """
    import keras

    signature = [
        tf.TensorSpec([None, *spec["shape"]], tf.float32, name=spec["name"]) for spec in inputs
    ]
    names = [spec["name"] for spec in inputs]

    def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        x = args[0] if len(args) == 1 else dict(zip(names, args))
        y = model(x, training=False)
        if isinstance(y, Mapping):
            missing = set(output_names) - set(y)
            if missing:
                raise ExportError(f"model outputs {sorted(y)} lack {sorted(missing)}")
            return {k: tf.cast(y[k], tf.float32) for k in output_names}
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        if len(ys) != len(output_names):
            raise ExportError(f"model has {len(ys)} outputs, manifest names {output_names}")
        return {k: tf.cast(v, tf.float32) for k, v in zip(output_names, ys)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=signature)
    archive.write_out(str(tmp), verbose=False)
    return tmp


def reexport_fields(manifest: Any) -> dict[str, Any]:
    """A loaded manifest as ``manifest_fields`` for exporting the same model again (fine-tuned,
    or re-made to check it): without what the exporter writes itself (name, file, sha256,
    size, creation time, tensor dtypes, quantisation and output shapes)."""
    fields = manifest.model_dump(mode="json")
    for k in ("name", "created", "file", "sha256", "size_bytes", "schema_version"):
        fields.pop(k)
    for spec in fields["inputs"]:
        spec.pop("dtype"), spec.pop("quantisation")
    for o in fields["outputs"]:
        o.pop("dtype"), o.pop("shape")
    return fields


def calibration_rows(count: int) -> np.ndarray:
    """Which of ``count`` representative windows the int8 calibration reads (a fixed draw)."""
    return np.random.default_rng(0).permutation(count)[:_MAX_CALIBRATION]


def save_calibration_windows(out_dir: Path, name: str, representative: np.ndarray) -> Path:
    """``<out_dir>/<name>.representative.npz``: the raw windows an int8 export of ``name``
    calibrated on (``features``). WHY: a fine-tune (training.finetune_imu) on a household's few
    recordings must calibrate on these plus its own; on its own windows alone the int8 input
    range shrank to what the household recorded (training.experiments.finetune_int8_range)."""
    rows = np.asarray(representative, np.float32)[calibration_rows(len(representative))]
    path = Path(out_dir) / f"{name}.representative.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, features=rows)
    return path


def _representative(
    representative: np.ndarray | Mapping[str, np.ndarray], specs: list[InputSpec]
) -> Iterator[dict[str, np.ndarray]]:
    arrays = (
        {k: np.asarray(v) for k, v in representative.items()}
        if isinstance(representative, Mapping)
        else {specs[0].name: np.asarray(representative)}
    )
    if sorted(arrays) != sorted(s.name for s in specs):
        raise ExportError(f"representative data for {sorted(arrays)}, inputs are {[s.name for s in specs]}")
    n = {len(a) for a in arrays.values()}
    if len(n) != 1 or n.pop() == 0:
        raise ExportError("representative arrays must be non-empty and of equal length")
    count = len(next(iter(arrays.values())))
    idx = calibration_rows(count)
    normalised = {s.name: s.normalisation.apply(arrays[s.name]) for s in specs}
    for spec in specs:
        if normalised[spec.name].shape[1:] != tuple(spec.shape):
            raise ExportError(
                f"representative {spec.name!r} has windows of shape "
                f"{normalised[spec.name].shape[1:]}, input shape is {tuple(spec.shape)}"
            )
    for i in idx:
        yield {name: a[i : i + 1].astype(np.float32) for name, a in normalised.items()}


def _convert(
    model: Any,
    fields: Mapping[str, Any],
    representative: np.ndarray | Mapping[str, np.ndarray] | None,
    clip_percentile: float | None = None,
) -> bytes:
    inputs = _input_specs(fields)
    output_names = [o["name"] for o in fields.get("outputs") or []]
    if not output_names:
        raise ExportError("manifest_fields['outputs'] must name the outputs (name, meaning)")
    with tempfile.TemporaryDirectory(prefix="biod_export_") as tmp:
        saved = _saved_model(model, inputs, output_names, Path(tmp) / "saved_model")
        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(saved), signature_keys=["serving_default"]
        )
        if representative is not None:
            _make_int8(converter, representative, inputs)
        with warnings.catch_warnings():  # TF's calibrator uses its own deprecated Interpreter
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            if representative is None or clip_percentile is None:
                return converter.convert()
            converter._experimental_calibrate_only = True  # noqa: SLF001  (documented TF hook)
            calibrated = converter.convert()
            specs = [InputSpec.model_validate({**s, "dtype": "float32"}) for s in inputs]
            clipped = _clip_ranges(calibrated, _representative(representative, specs), clip_percentile)
            from tensorflow.lite.python.convert import mlir_quantize

            return mlir_quantize(clipped, input_data_type=tf.int8, output_data_type=tf.float32)


def _clip_ranges(
    calibrated: bytes, windows: Iterator[dict[str, np.ndarray]], percentile: float
) -> bytes:
    """Replace every per-tensor (min, max) the calibrator recorded by the ``percentile``-th and
    ``(100 - percentile)``-th percentiles of the values the same windows produce, the model's
    inputs included. WHY the inputs too: one calibration window with a spike would otherwise set
    the input step for every window (tests/test_export.py); the price, the tallest R peaks of a
    few windows saturating, was measured and is within noise (docs/MODELS.md, "The input's
    range"). A tensor that
    never goes negative (ReLU outputs, sigmoids) keeps 0 as its lower end; 0 always stays inside
    the range (the quantiser needs an exact zero). Deterministic: a fixed-seed subsample of
    ``_CLIP_SAMPLES_PER_WINDOW`` values per tensor and window."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    graph = model.subgraphs[0]
    ranged = [
        i for i, t in enumerate(graph.tensors)
        if t.quantization is not None and t.quantization.min is not None
        and len(t.quantization.min) == 1
    ]
    interp = tf.lite.Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    details = interp.get_signature_runner("serving_default").get_input_details()
    feed = {name: d["index"] for name, d in details.items()}
    rng = np.random.default_rng(0)
    values: dict[int, list[np.ndarray]] = {i: [] for i in ranged}
    for window in windows:
        for name, array in window.items():
            interp.set_tensor(feed[name], array)
        interp.invoke()
        for i in ranged:
            a = interp.get_tensor(i).ravel()
            if a.size > _CLIP_SAMPLES_PER_WINDOW:
                a = a[rng.choice(a.size, _CLIP_SAMPLES_PER_WINDOW, replace=False)]
            values[i].append(a.astype(np.float32))
    for i in ranged:
        v = np.concatenate(values[i])
        lo = 0.0 if v.min() >= 0 else min(float(np.percentile(v, 100.0 - percentile)), 0.0)
        hi = max(float(np.percentile(v, percentile)), 0.0)
        if hi - lo <= 0:  # a constant tensor: keep what the calibrator found
            continue
        q = graph.tensors[i].quantization
        q.min, q.max = [np.float32(lo)], [np.float32(hi)]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _make_int8(
    converter: Any,
    representative: np.ndarray | Mapping[str, np.ndarray],
    inputs: list[dict[str, Any]],
) -> None:
    # Calibration only needs the normalisation; the quantisation is not known yet.
    specs = [InputSpec.model_validate({**s, "dtype": "float32"}) for s in inputs]
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: _representative(representative, specs)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.float32


def _inspect(content: bytes) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    from daemon.inference.runtime import _Interpreter  # the daemon's interpreter, not TF's

    interp = _Interpreter(model_content=content, num_threads=1)
    runner = interp.get_signature_runner("serving_default")
    return runner.get_input_details(), runner.get_output_details()


def _write(
    content: bytes,
    out_dir: Path,
    name: str,
    fields: Mapping[str, Any],
    int8: bool,
) -> Path:
    bad = set(fields) & RESERVED_FIELDS
    if bad:
        raise ExportError(f"manifest_fields must not set {sorted(bad)}: export fills them in")
    in_details, out_details = _inspect(content)
    inputs = []
    for spec in _input_specs(fields):
        d = in_details.get(spec["name"])
        if d is None:
            raise ExportError(f"converted model has no input named {spec['name']!r}: {sorted(in_details)}")
        want = np.int8 if int8 else np.float32
        if d["dtype"] != want:
            raise ExportError(f"input {spec['name']!r} converted to {d['dtype']}, wanted {want}")
        q = d["quantization_parameters"]
        quant = (
            {"scale": float(q["scales"][0]), "zero_point": int(q["zero_points"][0])}
            if int8
            else None
        )
        inputs.append({**spec, "dtype": "int8" if int8 else "float32", "quantisation": quant})
    outputs = []
    for out in fields["outputs"]:
        d = out_details.get(out["name"])
        if d is None:
            raise ExportError(f"converted model has no output named {out['name']!r}: {sorted(out_details)}")
        if d["dtype"] != np.float32:
            raise ExportError(f"output {out['name']!r} is {d['dtype']}, the daemon expects float32")
        shape = [int(s) for s in d["shape_signature"][1:]]
        outputs.append({**out, "dtype": "float32", "shape": shape})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.tflite"
    manifest = Manifest.model_validate(
        {
            **fields,
            "name": name,
            "created": utc_now(),
            "file": path.name,
            "inputs": inputs,
            "outputs": outputs,
            "sha256": sha256_bytes(content),
            "size_bytes": len(content),
        }
    )
    path.write_bytes(content)
    manifest.write(manifest_path_for(path))
    try:
        load_model(path)
    except ModelError as exc:  # pragma: no cover - would be a bug in export or runtime
        raise ExportError(f"the daemon refuses the exported model: {exc}") from exc
    return path


def export_int8(
    model: Any,
    representative: np.ndarray | Mapping[str, np.ndarray],
    out_dir: Path,
    name: str,
    manifest_fields: Mapping[str, Any],
    clip_percentile: float | None = None,
) -> Path:
    """Full-integer int8 export (int8 input, float32 outputs) + manifest; returns the .tflite path.

    ``representative``: real raw windows ``(n, *input_shape)`` (or a dict per input name),
    before normalisation; up to 500 are used for calibration. ``clip_percentile``: activation
    ranges from percentiles of the calibration values instead of their min/max (module
    docstring); None keeps the converter's min/max.
    """
    if clip_percentile is not None and not 50.0 < clip_percentile <= 100.0:
        raise ExportError(f"clip_percentile {clip_percentile} must lie in (50, 100]")
    content = _convert(model, manifest_fields, representative, clip_percentile)
    return _write(content, Path(out_dir), name, manifest_fields, int8=True)


def export_float(
    model: Any,
    out_dir: Path,
    name: str,
    manifest_fields: Mapping[str, Any],
) -> Path:
    """Float32 export + manifest (for the float-vs-int8 comparison); returns the .tflite path."""
    content = _convert(model, manifest_fields, None)
    return _write(content, Path(out_dir), name, manifest_fields, int8=False)


def update_manifest(model_path: Path, **fields: Any) -> Manifest:
    """Rewrite fields such as ``metrics`` after evaluation; sha256/size stay those of the file."""
    path = manifest_path_for(Path(model_path))
    from daemon.inference.manifest import load_manifest

    manifest = load_manifest(path)
    bad = set(fields) & {"sha256", "size_bytes", "file", "inputs", "outputs"}
    if bad:
        raise ExportError(f"{sorted(bad)} describe the file itself; re-export instead")
    updated = Manifest.model_validate({**manifest.model_dump(mode="json"), **fields})
    updated.write(path)
    return updated
