"""LiteRT model runtime: load a ``.tflite`` only after its manifest vouches for it.

WHY this shape:
- The sha256 and size in the manifest are checked on the bytes actually handed to the
  interpreter (read once, then ``model_content=``), so a file swapped between check and load,
  a truncated download or a corrupt copy is refused instead of producing wrong numbers.
- The manifest's input spec is compared with the model's real signature tensors (name, dtype,
  per-example shape, int8 scale/zero-point): a model exported for 100 Hz 2 s windows cannot be
  silently fed something else because someone edited one of the two files.
- Outputs are read by signature name, never by tensor index (indices change between converter
  versions; names are the contract).
- Float inputs are normalised as the manifest states and quantised to int8 here, with the
  scale/zero-point the model itself carries, so callers pass physical values.
- ``num_threads=1``: the hub shares its cores with the DSP and the MQTT loop.
Never imports TensorFlow (checked by tests).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.inference.manifest import (
    InputSpec,
    Manifest,
    ManifestError,
    load_manifest,
    manifest_path_for,
    sha256_bytes,
)

#: WHY not fail at import: heart rate, MQTT and `biod doctor` need no model; without a runtime
#: the daemon must still start and say what to install (load_model raises ModelError then).
_NO_RUNTIME: str | None = None
try:  # LiteRT is the maintained runtime; tflite_runtime is the older wheel for some boards.
    from ai_edge_litert.interpreter import Interpreter as _Interpreter
except ImportError as _litert_exc:  # pragma: no cover - depends on the installed wheel
    try:
        from tflite_runtime.interpreter import Interpreter as _Interpreter  # type: ignore[no-redef]
    except ImportError as _tflite_exc:
        _Interpreter = None  # type: ignore[assignment,misc]
        _NO_RUNTIME = (f"no LiteRT runtime is installed (ai_edge_litert: {_litert_exc}; "
                       f"tflite_runtime: {_tflite_exc}); install it with "
                       "`pip install ai-edge-litert` (or tflite-runtime on boards it lacks)")

log = logging.getLogger(__name__)

_FIX = "re-install the package or run `python -m training.train` to re-export the model"
_SCALE_RTOL = 1e-4


class ModelError(RuntimeError):
    """A model cannot be trusted or run; the message names the file, the cause and the fix."""


def _np_dtype(name: str) -> np.dtype:
    return np.dtype({"int8": np.int8, "float32": np.float32}[name])


@dataclass(frozen=True)
class _Tensor:
    """What the interpreter says about one signature tensor."""

    dtype: np.dtype
    shape: tuple[int, ...]  # per example, batch axis removed
    scale: float
    zero_point: int


def _tensor_info(details: dict[str, Any]) -> _Tensor:
    shape = tuple(int(d) for d in details.get("shape_signature", details["shape"]))
    q = details.get("quantization_parameters", {})
    scales = list(q.get("scales", []))
    zps = list(q.get("zero_points", []))
    return _Tensor(
        dtype=np.dtype(details["dtype"]),
        shape=shape[1:],
        scale=float(scales[0]) if scales else 0.0,
        zero_point=int(zps[0]) if zps else 0,
    )


def quantise(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float -> int8 as TFLite's Quantize op does: round half away from zero, then clip."""
    v = np.asarray(x, dtype=np.float32) / np.float32(scale)
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def dequantise(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)


class Model:
    """A verified LiteRT model. Use :func:`load_model`; not constructed directly."""

    def __init__(self, path: Path, manifest: Manifest, interpreter: Any) -> None:
        self.path = path
        self.manifest = manifest
        self._interpreter = interpreter
        self._runner = interpreter.get_signature_runner(manifest.signature)
        self._inputs = {k: _tensor_info(v) for k, v in self._runner.get_input_details().items()}
        self._outputs = {k: _tensor_info(v) for k, v in self._runner.get_output_details().items()}
        self._check_spec()

    def warm_up(self) -> None:
        """One invoke on zeros, at load time rather than on the first live window.

        WHY: the interpreter allocates its tensors and builds the XNNPACK delegate on the first
        invoke; doing it here keeps that cost out of the stream, refuses a file that loads but
        cannot run (as :func:`load_model` promises), and lets LiteRT's INFO line be routed
        to the debug log (:func:`_native_info_to_debug`).
        """
        # a dimension the model leaves open (-1 in its signature) gets 1
        feed = {name: np.zeros((1, *(max(d, 1) for d in t.shape)), dtype=t.dtype)
                for name, t in self._inputs.items()}
        try:
            with _native_info_to_debug():
                self._runner(**feed)
        except (ValueError, RuntimeError) as exc:
            raise self._fail(f"the model loads but does not run ({exc})") from None

    @property
    def input_spec(self) -> dict[str, InputSpec]:
        """Input name -> spec (rate, window, channels, normalisation, placement ...)."""
        return {spec.name: spec for spec in self.manifest.inputs}

    def _fail(self, cause: str) -> ModelError:
        return ModelError(f"{self.path}: {cause}; {_FIX}")

    def _check_spec(self) -> None:
        m = self.manifest
        want, have = sorted(s.name for s in m.inputs), sorted(self._inputs)
        if want != have:
            raise self._fail(f"manifest inputs {want} but the model's signature has {have}")
        for spec in m.inputs:
            t = self._inputs[spec.name]
            if t.dtype != _np_dtype(spec.dtype):
                raise self._fail(
                    f"input {spec.name!r}: manifest says {spec.dtype}, model tensor is {t.dtype}"
                )
            if list(t.shape) != list(spec.shape):
                raise self._fail(
                    f"input {spec.name!r}: manifest shape {spec.shape}, model tensor {list(t.shape)}"
                )
            if spec.quantisation is not None:
                q = spec.quantisation
                if not (
                    np.isclose(q.scale, t.scale, rtol=_SCALE_RTOL, atol=0)
                    and q.zero_point == t.zero_point
                ):
                    raise self._fail(
                        f"input {spec.name!r}: manifest quantisation scale={q.scale} "
                        f"zero_point={q.zero_point}, model has scale={t.scale} "
                        f"zero_point={t.zero_point}"
                    )
        want_out = sorted(o.name for o in m.outputs)
        have_out = sorted(self._outputs)
        if want_out != have_out:
            raise self._fail(f"manifest outputs {want_out} but the model's signature has {have_out}")
        for out in m.outputs:
            t = self._outputs[out.name]
            if t.dtype != _np_dtype(out.dtype) or list(t.shape) != list(out.shape):
                raise self._fail(
                    f"output {out.name!r}: manifest {out.dtype}{out.shape}, "
                    f"model {t.dtype}{list(t.shape)}"
                )

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run on physical (float) values, single example or batch; outputs by name, float32.

        Each input is normalised as the manifest states, then quantised if the model's input is
        int8 (int8 arrays are passed through untouched: already quantised by the caller).
        A single example (no batch axis) gives outputs without a batch axis.
        """
        missing = set(self._inputs) - set(inputs)
        extra = set(inputs) - set(self._inputs)
        if missing or extra:
            raise ValueError(
                f"{self.path.name}: expected inputs {sorted(self._inputs)}, got {sorted(inputs)}"
            )
        feed: dict[str, np.ndarray] = {}
        single: bool | None = None
        for name, value in inputs.items():
            spec, t = self.input_spec[name], self._inputs[name]
            arr = np.asarray(value)
            is_single = arr.shape == tuple(spec.shape)
            if not is_single and arr.shape[1:] != tuple(spec.shape):
                raise ValueError(
                    f"{self.path.name}: input {name!r} must have shape {tuple(spec.shape)} or "
                    f"(batch, *{tuple(spec.shape)}), got {arr.shape}"
                )
            if single is not None and single != is_single:
                raise ValueError(f"{self.path.name}: mix of batched and single inputs")
            single = is_single
            if is_single:
                arr = arr[None]
            if t.dtype == np.int8 and arr.dtype == np.int8:
                feed[name] = np.ascontiguousarray(arr)
                continue
            x = spec.normalisation.apply(arr)
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{self.path.name}: input {name!r} contains NaN or inf")
            feed[name] = quantise(x, t.scale, t.zero_point) if t.dtype == np.int8 else x
        raw = self._runner(**feed)
        result: dict[str, np.ndarray] = {}
        for name, t in self._outputs.items():
            y = raw[name]
            y = dequantise(y, t.scale, t.zero_point) if t.dtype == np.int8 else y.astype(np.float32)
            result[name] = y[0] if single else y
        return result


def load_model(path: Path, manifest_path: Path | None = None) -> Model:
    """Verify ``path`` against its manifest (default: same name, ``.json``) and load it.

    Raises :class:`ModelError` for a missing/invalid manifest, a size or sha256 mismatch, a
    file the interpreter cannot parse, or a manifest that does not describe the model's tensors.
    """
    path = Path(path)
    if _Interpreter is None:
        raise ModelError(f"{path}: {_NO_RUNTIME}")
    manifest_path = Path(manifest_path) if manifest_path is not None else manifest_path_for(path)
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        raise ModelError(str(exc)) from None
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror}); {_FIX}") from None
    if len(content) != manifest.size_bytes:
        raise ModelError(
            f"{path}: file is {len(content)} bytes but {manifest_path.name} states "
            f"{manifest.size_bytes} (truncated or replaced); {_FIX}"
        )
    digest = sha256_bytes(content)
    if digest != manifest.sha256:
        raise ModelError(
            f"{path}: sha256 {digest[:16]}... does not match {manifest_path.name} "
            f"({manifest.sha256[:16]}...): corrupt or not the model the manifest describes; {_FIX}"
        )
    try:
        interpreter = _Interpreter(model_content=content, num_threads=1)
        if manifest.signature not in interpreter.get_signature_list():
            raise ModelError(
                f"{path}: no signature {manifest.signature!r} in the model "
                f"(has {sorted(interpreter.get_signature_list())}); {_FIX}"
            )
    except ModelError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: not a loadable LiteRT model ({exc}); {_FIX}") from None
    model = Model(path, manifest, interpreter)
    model.warm_up()
    return model


#: one capture of fd 2 at a time: a second one would save the first one's temp file as "stderr"
#: and put it back, leaving the process writing its stderr into a deleted file
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_info_to_debug() -> Iterator[None]:
    """Route what native code writes to stderr meanwhile through Python: its ``INFO:`` lines to
    this module's DEBUG log, everything else back to stderr unchanged.

    WHY: LiteRT's C++ logger prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on
    each model's first invoke, straight to file descriptor 2, whatever ``--log-level`` says; the
    runtime offers no switch (LiteRT issue 7420). The capture goes to a file, not a pipe (a full
    pipe would block a writer), and other threads' output written in the window is written back,
    so nothing is lost, only delayed by the few milliseconds of one invoke (a line written across
    the end of the window may come out split). When the capture cannot be set up (no temp
    space, no free descriptor) nothing is routed: the line then simply shows.
    """
    with _STDERR_LOCK:
        try:
            capture = tempfile.TemporaryFile()
        except OSError:
            yield
            return
        with capture:
            try:
                saved = os.dup(2)
            except OSError:  # no stderr at all, or no free descriptor
                yield
                return
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                for line in capture.read().splitlines(keepends=True):
                    if line.startswith(b"INFO: "):
                        log.debug("LiteRT: %s", line[6:].decode(errors="replace").rstrip())
                    else:
                        _write_all(2, line)


def _write_all(fd: int, data: bytes) -> None:
    """``data`` to ``fd`` whole; a stderr that is gone must not hide the invoke's own error."""
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data):]
