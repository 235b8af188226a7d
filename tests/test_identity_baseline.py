"""The BASELINES.md PCA + LDA beat baseline that `python -m training.eval models --baseline-fit`
scores beside the shipped models, on real ECG-ID recordings (shipped emulator fixtures)."""
from __future__ import annotations

import numpy as np
import pytest

from firmware_protocol.emulators.recordings import load_recording
from training.data.ecg import EcgRecord, record_windows
from training.eval.identity_baseline import fit_baseline, plain_beat_kwargs
from training.train_beats import PIPELINE_KW as SERVED_KW

PIPELINE_KW = plain_beat_kwargs(SERVED_KW)  # BASELINES.md's beats: not heart-rate normalised

PERSONS = {"04": ("ecgid-p04-r1", "ecgid-p04-r2"), "25": ("ecgid-p25-r1", "ecgid-p25-r4"),
           "46": ("ecgid-p46-r1", "ecgid-p46-r3"), "53": ("ecgid-p53-r1", "ecgid-p53-r4")}


def _record(name: str, dataset: str = "ecgid") -> EcgRecord:
    r = load_recording(name)
    person = name.split("-")[1]  # "p04" / "16": the file names carry the person
    return EcgRecord(dataset, f"{dataset}:{person.lstrip('p')}", name, r.date, float(r.fs_hz),
                     r.leads_mv, r.lead_present)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_fitted_projection_separates_persons_on_their_other_recording() -> None:
    fit = record_windows([_record(a) for a, _ in PERSONS.values()], PIPELINE_KW)
    base = fit_baseline(fit)
    assert base.persons == 4 and base.projection.shape[1] == 3  # LDA: classes - 1 directions
    test = record_windows([_record(b) for _, b in PERSONS.values()], PIPELINE_KW)
    emb_fit, emb_test = base.embed_windows(fit), base.embed_windows(test)
    assert np.allclose(np.linalg.norm(emb_test, axis=1), 1.0, atol=1e-5)
    names = sorted(PERSONS)
    person_fit, person_test = fit.persons(), test.persons()
    templates = np.stack([_unit(emb_fit[person_fit == f"ecgid:{p}"].mean(0)) for p in names])
    tests = np.stack([_unit(emb_test[person_test == f"ecgid:{p}"].mean(0)) for p in names])
    # each person's other-day recording is closest to their own enrolment
    assert list((tests @ templates.T).argmax(1)) == [0, 1, 2, 3]


def test_refuses_to_fit_without_ecgid_persons() -> None:
    ws = record_windows([_record("ludb-16", "ludb"), _record("ludb-17", "ludb")], PIPELINE_KW)
    with pytest.raises(ValueError, match="ECG-ID training persons"):
        fit_baseline(ws)
