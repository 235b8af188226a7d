"""training/export.py: Keras -> int8/float32 LiteRT + manifest, checked through the daemon runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402  (the training extra)

from daemon.inference.manifest import load_manifest, sha256_file  # noqa: E402
from daemon.inference.runtime import load_model  # noqa: E402
from training.export import ExportError, export_float, export_int8, update_manifest  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "inference"
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    with np.load(FIX / "windows.npz") as z:
        return z["windows"]


def _model() -> keras.Model:
    keras.utils.set_random_seed(3)
    inp = keras.Input((20, 3), name="window")
    x = keras.layers.Conv1D(6, 5, activation="relu")(inp)
    x = keras.layers.GlobalMaxPooling1D()(x)
    emb = keras.layers.Dense(4)(x)
    prob = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(inp, [emb, prob])  # a list: export names the outputs


def _fields(windows: np.ndarray) -> dict:
    flat = windows.reshape(-1, 3)
    return {
        "version": "1.0.0",
        "tasks": ["activity"],
        "inputs": [{"name": "window", "shape": [20, 3], "rate_hz": 100.0, "window_s": 0.2,
                    "channels": ["x", "y", "z"], "placement": "waist",
                    "normalisation": {"kind": "zscore", "mean": flat.mean(0).tolist(),
                                      "std": flat.std(0).tolist()}}],
        "outputs": [{"name": "embedding", "meaning": "4-d"},
                    {"name": "probabilities", "meaning": "p(rest), p(moving)"}],
        "labels": {"probabilities": ["rest", "moving"]},
        "thresholds": {"moving": 0.5},
        "training": {"datasets": ["sisfall"], "persons": {"sisfall": ["SA01"]}},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory, windows):
    out = tmp_path_factory.mktemp("export")
    model = _model()
    fields = _fields(windows)
    p8 = export_int8(model, windows, out, "act", fields)
    pf = export_float(model, out, "act_float", fields)
    spec = fields["inputs"][0]["normalisation"]
    x = (windows - np.float32(spec["mean"])) / np.float32(spec["std"])
    ref = [np.asarray(t) for t in model(x.astype(np.float32), training=False)]
    return p8, pf, ref


def test_files_and_manifest(exported):
    p8, pf, _ = exported
    for path in (p8, pf):
        m = load_manifest(path.with_suffix(".json"))
        assert m.sha256 == sha256_file(path) and m.size_bytes == path.stat().st_size
        assert m.file == path.name and [o.name for o in m.outputs] == ["embedding", "probabilities"]
        assert m.outputs[1].shape == [2] and m.training.persons == {"sisfall": ["SA01"]}
    m8 = load_manifest(p8.with_suffix(".json"))
    assert m8.inputs[0].dtype == "int8" and m8.inputs[0].quantisation.scale > 0
    assert load_manifest(pf.with_suffix(".json")).inputs[0].quantisation is None


def test_int8_model_is_full_integer_with_float_outputs(exported):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(exported[0]))
    runner = interp.get_signature_runner("serving_default")
    assert [d["dtype"] for d in runner.get_input_details().values()] == [np.int8]
    outs = runner.get_output_details()
    assert sorted(outs) == ["embedding", "probabilities"]
    assert all(d["dtype"] == np.float32 for d in outs.values())
    conv_weights = [d for d in interp.get_tensor_details()
                    if d["dtype"] == np.int8 and len(d["shape"]) == 3]
    assert conv_weights, "no int8 conv weights: the model was not quantised"


def test_parity_with_keras(exported, windows):
    p8, pf, (emb, prob) = exported
    outf = load_model(pf).run(window=windows)
    np.testing.assert_allclose(outf["embedding"], emb, atol=1e-5)
    np.testing.assert_allclose(outf["probabilities"], prob, atol=1e-5)
    out8 = load_model(p8).run(window=windows)
    assert np.abs(out8["embedding"] - emb).max() < 0.05 * np.ptp(emb)
    assert np.abs(out8["probabilities"] - prob).max() < 0.05
    assert (out8["probabilities"].argmax(1) == prob.argmax(1)).mean() > 0.9


def test_update_manifest_keeps_hash(exported):
    p8 = exported[0]
    m = update_manifest(p8, metrics={"int8": {"macro_f1": 0.5}})
    assert load_manifest(p8.with_suffix(".json")).metrics == {"int8": {"macro_f1": 0.5}}
    assert m.sha256 == sha256_file(p8)
    load_model(p8)
    with pytest.raises(ExportError, match="re-export"):
        update_manifest(p8, sha256="0" * 64)


def test_bad_fields_are_refused(tmp_path, windows):
    fields = _fields(windows)
    with pytest.raises(ExportError, match="fill"):
        export_float(_model(), tmp_path, "x", {**fields, "sha256": "0" * 64})
    with pytest.raises(ExportError, match="shape"):
        export_int8(_model(), windows[:, :10], tmp_path, "x", fields)
    with pytest.raises(ExportError, match="2 outputs"):
        export_float(_model(), tmp_path, "x", {**fields, "outputs": fields["outputs"][:1]})
    assert not list(tmp_path.glob("*.tflite"))


def test_clip_percentile_gives_ordinary_windows_a_finer_step(tmp_path, windows):
    """One calibration window with a 40x spike stretches every activation range under min/max
    calibration, so ordinary windows are quantised coarsely; percentile ranges ignore the spike.
    Measured on the ordinary windows against the Keras model: the clipped export's error must be
    clearly smaller, and the file stays full-integer with float outputs."""
    model, fields = _model(), _fields(windows)
    spiky = windows.copy()
    spiky[0, 10] *= 40.0  # one sample of one window, far outside everything else
    p_minmax = export_int8(model, spiky, tmp_path / "minmax", "act", fields)
    p_clip = export_int8(model, spiky, tmp_path / "clip", "act", fields, clip_percentile=99.0)
    spec = fields["inputs"][0]["normalisation"]
    ordinary = windows[1:]
    x = (ordinary - np.float32(spec["mean"])) / np.float32(spec["std"])
    emb = np.asarray(model(x.astype(np.float32), training=False)[0])
    err = {name: np.sqrt(np.mean((load_model(p).run(window=ordinary)["embedding"] - emb) ** 2))
           for name, p in (("minmax", p_minmax), ("clip", p_clip))}
    assert err["clip"] < 0.5 * err["minmax"], err
    m = load_manifest(p_clip.with_suffix(".json"))
    assert m.inputs[0].dtype == "int8" and {o.dtype for o in m.outputs} == {"float32"}
    with pytest.raises(ExportError, match="clip_percentile"):
        export_int8(model, windows, tmp_path / "bad", "act", fields, clip_percentile=30.0)
