"""daemon/inference/runtime.py + manifest.py against a real exported model (no TensorFlow)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.inference.manifest import ManifestError, load_manifest, sha256_file
from daemon.inference.runtime import ModelError, load_model, quantise

FIX = Path(__file__).parent / "fixtures" / "inference"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIX / "windows.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    for name in ("tiny.tflite", "tiny.json", "tiny_float.tflite", "tiny_float.json"):
        shutil.copy(FIX / name, tmp_path / name)
    return tmp_path


def test_float_model_matches_keras(ref):
    model = load_model(FIX / "tiny_float.tflite")
    out = model.run(window=ref["windows"])
    np.testing.assert_allclose(out["embedding"], ref["embedding"], atol=1e-5)
    np.testing.assert_allclose(out["probabilities"], ref["probabilities"], atol=1e-5)


def test_int8_model_close_to_keras_and_outputs_by_name(ref):
    model = load_model(FIX / "tiny.tflite")
    out = model.run(window=ref["windows"])
    assert set(out) == {"embedding", "probabilities"}
    assert out["embedding"].shape == (64, 8) and out["probabilities"].shape == (64, 3)
    assert all(v.dtype == np.float32 for v in out.values())
    emb_range = np.ptp(ref["embedding"])
    assert np.abs(out["embedding"] - ref["embedding"]).max() < 0.05 * emb_range
    assert np.abs(out["probabilities"] - ref["probabilities"]).max() < 0.05
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=0.02)


def test_single_window_equals_batch_row(ref):
    model = load_model(FIX / "tiny.tflite")
    batch = model.run(window=ref["windows"][:4])
    single = model.run(window=ref["windows"][2])
    assert single["embedding"].shape == (8,)
    np.testing.assert_array_equal(single["embedding"], batch["embedding"][2])


def test_prequantised_int8_input_passes_through(ref):
    model = load_model(FIX / "tiny.tflite")
    spec = model.input_spec["window"]
    q = quantise(spec.normalisation.apply(ref["windows"][:3]), spec.quantisation.scale,
                 spec.quantisation.zero_point)
    np.testing.assert_array_equal(model.run(window=q)["embedding"],
                                  model.run(window=ref["windows"][:3])["embedding"])


def test_input_spec_comes_from_manifest():
    model = load_model(FIX / "tiny.tflite")
    spec = model.input_spec["window"]
    assert spec.rate_hz == 100.0 and spec.shape == [20, 3] and spec.placement == "waist"
    assert spec.dtype == "int8" and spec.quantisation is not None
    assert model.manifest.sha256 == sha256_file(FIX / "tiny.tflite")


def test_wrong_input_shape_or_name_is_a_clear_error(ref):
    model = load_model(FIX / "tiny.tflite")
    with pytest.raises(ValueError, match=r"shape \(20, 3\)"):
        model.run(window=ref["windows"][:, :10])
    with pytest.raises(ValueError, match="expected inputs"):
        model.run(signal=ref["windows"])
    bad = ref["windows"][:2].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.run(window=bad)


def test_sha256_mismatch_is_refused(model_dir):
    manifest = json.loads((model_dir / "tiny.json").read_text())
    manifest["sha256"] = "0" * 64
    (model_dir / "tiny.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="sha256") as exc:
        load_model(model_dir / "tiny.tflite")
    assert "tiny.tflite" in str(exc.value) and "python -m training.train" in str(exc.value)


def test_flipped_byte_is_refused(model_dir):
    data = bytearray((model_dir / "tiny.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir / "tiny.tflite").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(model_dir / "tiny.tflite")


def test_truncated_file_is_refused(model_dir):
    data = (model_dir / "tiny.tflite").read_bytes()
    (model_dir / "tiny.tflite").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        load_model(model_dir / "tiny.tflite")


def test_garbage_with_matching_hash_is_refused_by_the_interpreter(model_dir):
    """A manifest re-written for a garbage file: the hash passes, the parser must still refuse."""
    garbage = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (model_dir / "tiny.tflite").write_bytes(garbage)
    manifest = json.loads((model_dir / "tiny.json").read_text())
    manifest.update(sha256=sha256_file(model_dir / "tiny.tflite"), size_bytes=len(garbage))
    (model_dir / "tiny.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not a loadable LiteRT model"):
        load_model(model_dir / "tiny.tflite")


def test_manifest_input_spec_must_match_model_tensors(model_dir):
    manifest = json.loads((model_dir / "tiny.json").read_text())
    manifest["inputs"][0]["shape"] = [40, 3]
    (model_dir / "tiny.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"manifest shape \[40, 3\]"):
        load_model(model_dir / "tiny.tflite")
    manifest["inputs"][0]["shape"] = [20, 3]
    manifest["inputs"][0]["quantisation"]["scale"] *= 2
    (model_dir / "tiny.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="quantisation"):
        load_model(model_dir / "tiny.tflite")


def test_manifest_of_float_model_does_not_fit_int8_model(model_dir):
    """Even with a matching hash, a float32 input spec must not describe an int8 tensor."""
    manifest = json.loads((model_dir / "tiny_float.json").read_text())
    manifest.update(sha256=sha256_file(model_dir / "tiny.tflite"),
                    size_bytes=(model_dir / "tiny.tflite").stat().st_size)
    (model_dir / "other.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="manifest says float32, model tensor is int8"):
        load_model(model_dir / "tiny.tflite", model_dir / "other.json")


def test_manifest_unknown_key_is_rejected(model_dir):
    manifest = json.loads((model_dir / "tiny.json").read_text())
    manifest["inputs"][0]["rate_Hz"] = 50
    (model_dir / "tiny.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="rate_Hz"):
        load_manifest(model_dir / "tiny.json")
    with pytest.raises(ModelError, match="rate_Hz"):
        load_model(model_dir / "tiny.tflite")


def test_missing_manifest_names_the_fix(model_dir):
    (model_dir / "tiny.json").unlink()
    with pytest.raises(ModelError, match="manifest not found.*re-install"):
        load_model(model_dir / "tiny.tflite")


def test_runtime_never_imports_tensorflow():
    code = (
        "import sys; from pathlib import Path; import numpy as np\n"
        "from daemon.inference.runtime import load_model\n"
        f"m = load_model(Path({str(FIX / 'tiny.tflite')!r}))\n"
        "m.run(window=np.zeros((20, 3), np.float32))\n"
        "assert not any(k == 'tensorflow' or k.startswith('tensorflow.') for k in sys.modules), "
        "'tensorflow imported'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_litert_info_line_follows_the_log_level_and_other_stderr_is_kept():
    """LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate" to fd 2 on a model's
    first invoke, whatever --log-level says. load_model's warm-up routes it to the DEBUG log;
    anything else written to fd 2 in that window (here by the test itself) still reaches stderr."""
    code = (
        "import logging, os, sys; from pathlib import Path\n"
        "logging.basicConfig(level=getattr(logging, sys.argv[1]), format='%(levelname)s %(message)s')\n"
        "from daemon.inference import runtime\n"
        "real = runtime.Model.__init__\n"
        "def init(self, *a):\n"
        "    real(self, *a); run = self._runner\n"
        "    def noisy(**feed):\n"
        "        os.write(2, b'another thread wrote this\\n'); return run(**feed)\n"
        "    self._runner = noisy\n"
        "runtime.Model.__init__ = init\n"
        "runtime.load_model(Path('daemon/models/ecg_dualtask.tflite'))\n"
    )
    for level, shown in (("WARNING", False), ("DEBUG", True)):
        res = subprocess.run([sys.executable, "-c", code, level], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        assert "another thread wrote this" in res.stderr
        assert ("DEBUG LiteRT: Created TensorFlow Lite XNNPACK delegate" in res.stderr) is shown
        assert "INFO: Created" not in res.stderr


@pytest.mark.parametrize("damage", ["bad_utf8", "directory"])
def test_an_unreadable_manifest_is_a_model_error_naming_it(model_dir, damage):
    """A flipped high bit gave UnicodeDecodeError and a folder in the manifest's place
    IsADirectoryError, out of load_model and `biod doctor` alike."""
    manifest = model_dir / "tiny.json"
    if damage == "bad_utf8":
        raw = bytearray(manifest.read_bytes())
        raw[10] |= 0x80
        manifest.write_bytes(bytes(raw))
    else:
        manifest.unlink()
        manifest.mkdir()
    with pytest.raises(ManifestError, match="tiny.json.*(not UTF-8|cannot read)"):
        load_manifest(manifest)
    with pytest.raises(ModelError, match="tiny.json"):
        load_model(model_dir / "tiny.tflite")


def test_without_a_litert_runtime_the_daemon_imports_and_says_what_to_install():
    """No ai_edge_litert and no tflite_runtime: importing the daemon raised ImportError, so
    `biod doctor` and heart rate died with it."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name.split('.')[0] in ('ai_edge_litert', 'tflite_runtime'):\n"
        "        raise ImportError('blocked: ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "from pathlib import Path\n"
        "import daemon.app\n"
        "from daemon.inference.runtime import ModelError, load_model\n"
        "try:\n"
        f"    load_model(Path({str(FIX / 'tiny.tflite')!r}))\n"
        "except ModelError as exc:\n"
        "    print('ModelError:', exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ModelError:" in res.stdout and "pip install ai-edge-litert" in res.stdout
