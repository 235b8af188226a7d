"""Intervals of the IMU subject-level metrics (training/eval/imu.py): few held-out persons."""
from __future__ import annotations

import numpy as np
import pytest

from training.eval.imu import age_metrics, clopper_pearson, gender_metrics


def test_clopper_pearson_known_answers() -> None:
    # k = n: lower bound solves p^n = 0.025; k = 0 mirrors it
    assert clopper_pearson(5, 5) == pytest.approx((100 * 0.025 ** (1 / 5), 100.0))
    assert clopper_pearson(0, 5) == pytest.approx((0.0, 100 * (1 - 0.025 ** (1 / 5))))
    lo, hi = clopper_pearson(4, 5)
    assert lo == pytest.approx(28.36, abs=0.01) and hi == pytest.approx(99.49, abs=0.01)


def test_gender_and_age_metrics_carry_person_intervals() -> None:
    subject = np.repeat(np.array(["p1", "p2", "p3", "p4", "p5"]), 4)
    female = np.repeat(np.array([1, 0, 1, 0, 1]), 4)
    p = np.where(female == 1, 0.9, 0.1)
    g = gender_metrics(subject, female, p)
    assert g["subject_accuracy"] == 100.0
    assert g["subject_accuracy_lo"] == pytest.approx(47.82, abs=0.01)
    assert g["subject_accuracy_hi"] == 100.0
    # four persons estimated exactly, one 40 years off: MAE 8, and the interval spans from
    # draws without that person (0) to draws with it several times
    age = np.repeat(np.array([23.0, 25.0, 66.0, 70.0, 65.0]), 4)
    pred = age.copy()
    pred[subject == "p5"] = 25.0
    a = age_metrics(subject, age, pred)
    assert a["subject_mae_years"] == pytest.approx(8.0)
    assert a["subject_mae_years_lo"] == pytest.approx(0.0)
    assert 16.0 <= a["subject_mae_years_hi"] <= 24.0
