"""Person-bootstrap intervals of the identity protocol (training/eval/identity.py)."""
from __future__ import annotations

import numpy as np
import pytest

from training.eval.identity import Tests as IdTests, identity_metrics, person_bootstrap

NAMES = ["a", "b", "c", "d"]
TEMPLATES = np.eye(4, dtype=np.float32)


def _tests(wrong_for_a: bool = True) -> IdTests:
    """Person a: 10 tests, all closest to b's template when ``wrong_for_a``; b, c, d: 2 right
    tests each. Rank-1 per test 6/16, per person 3/4."""
    person = np.array(["a"] * 10 + ["b", "b", "c", "c", "d", "d"])
    emb = np.zeros((16, 4), np.float32)
    for i, p in enumerate(person):
        j = NAMES.index("b") if (p == "a" and wrong_for_a) else NAMES.index(p)
        emb[i, j] = 0.9
        emb[i, (j + 1) % 4] = 0.3  # some impostor score, so EER / FRR are not degenerate
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cross = np.array([True] * 5 + [False] * 5 + [True, False] * 3)
    return IdTests(emb, person, cross)


def test_intervals_resample_persons_not_tests() -> None:
    t = _tests()
    out = person_bootstrap(NAMES, {"m": (TEMPLATES, t)}, n_boot=2000, seed=0)
    point = identity_metrics(NAMES, TEMPLATES, t)
    assert point["rank1"] == pytest.approx(100 * 6 / 16)
    assert out["m_rank1_person_mean"] == pytest.approx(75.0)
    # a draw without person a (p = (3/4)^4 = 0.32) scores 100 %: the upper end must reach it,
    # which resampling the 16 tests independently (binomial, n = 16) would practically never do
    assert out["m_rank1_hi"] == pytest.approx(100.0)
    assert out["m_rank1_lo"] < point["rank1"] < out["m_rank1_hi"]
    assert out["m_eer_lo"] <= point["eer"] <= out["m_eer_hi"]
    # cross-session subset: persons a (5 tests), b, c, d (1 each)
    assert out["m_cross_rank1_person_mean"] == pytest.approx(75.0)
    assert "m_cross_rank1_lo" in out


def test_paired_difference_of_identical_runs_is_exactly_zero() -> None:
    t = _tests()
    out = person_bootstrap(NAMES, {"x": (TEMPLATES, t), "y": (TEMPLATES, t)}, (("x", "y"),),
                           n_boot=300, seed=1)
    for m in ("rank1", "eer", "frr_at_far1"):
        assert out[f"x_minus_y_{m}"] == out[f"x_minus_y_{m}_lo"] == out[f"x_minus_y_{m}_hi"] == 0.0


def test_paired_difference_point_and_sign() -> None:
    bad, good = _tests(True), _tests(False)
    out = person_bootstrap(NAMES, {"bad": (TEMPLATES, bad), "good": (TEMPLATES, good)},
                           (("bad", "good"),), n_boot=500, seed=2)
    assert out["bad_minus_good_rank1"] == pytest.approx(100 * 6 / 16 - 100.0)
    # a draw without person a shows no difference; one with it always a loss
    assert out["bad_minus_good_rank1_hi"] == pytest.approx(0.0)
    assert out["bad_minus_good_rank1_lo"] < -50.0


def test_same_seed_same_numbers_and_mismatched_runs_refused() -> None:
    t = _tests()
    a = person_bootstrap(NAMES, {"m": (TEMPLATES, t)}, n_boot=200, seed=5)
    assert a == person_bootstrap(NAMES, {"m": (TEMPLATES, t)}, n_boot=200, seed=5)
    other = IdTests(t.emb[1:], t.person[1:], t.cross[1:])
    with pytest.raises(ValueError, match="other tests"):
        person_bootstrap(NAMES, {"m": (TEMPLATES, t), "n": (TEMPLATES, other)})
