"""The beat model's export path (training/train_beats.py) through the daemon's runtime
(daemon/inference/beatmorph.py), for a beat model that reads each beat with its slope: the
manifest's ``features.params.slope`` must make the runtime feed (3, 2 x 87) inputs and the int8
file must compute the float map it was exported from."""
from __future__ import annotations

import numpy as np
import pytest

import tensorflow as tf  # noqa: F401  (the training extra)

from daemon.dsp.ecg_pipeline import windows_from_record
from daemon.inference.beatmorph import BeatMorphModel, beat_features, pool_beats
from firmware_protocol.emulators.recordings import load_recording
from training.export import export_int8
from training.train_beats import PIPELINE_KW, keras_model, manifest_fields


def _windows(name: str):
    rec = load_recording(name)
    x = np.where(rec.lead_present[None, :], rec.leads_mv, 0.0).astype(np.float32)
    return windows_from_record(x, float(rec.fs_hz), **PIPELINE_KW).windows


@pytest.mark.parametrize("slope", [False, True])
def test_exported_beat_model_reads_what_its_manifest_states(tmp_path, slope: bool) -> None:
    wins = _windows("ludb-16")
    beats = np.concatenate([w.morph for w in wins if w.morph.shape[0]])
    L = beats.shape[1]
    feats = beat_features(beats, slope=slope)
    assert feats.shape[2] == (2 * L if slope else L)
    rng = np.random.default_rng(0)
    K = 8
    # directions of very different norms, as an LDA gives: each must keep its own int8 scale
    W = (rng.normal(size=(3, feats.shape[2], K)) * np.geomspace(0.05, 5.0, K)).astype(np.float32)
    b = rng.normal(size=(3, K)).astype(np.float32)
    path = export_int8(keras_model(W, b), feats, tmp_path, "ecg_beats",
                       manifest_fields((), [], L, threshold=0.5, slope=slope))
    model = BeatMorphModel.load(path)
    assert model.slope is slope and model.length == L
    for w in wins[:6]:
        got = model.embed(w.morph, w.lead_mask)
        want = pool_beats(np.einsum("bld,ldk->blk", beat_features(w.morph, slope=slope), W) + b,
                          w.lead_mask)
        assert float(got @ want) > 0.99
