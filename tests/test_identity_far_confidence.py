"""Thresholds that keep the FAR over resampled impostor populations (IdentityConfig.far_confidence)."""
from __future__ import annotations

import numpy as np
import pytest

from daemon.identity.engine import IdentityConfig, _confident_threshold, _person_draws


def _scores(rng: np.random.Generator, n_persons: int = 20, per: int = 50) -> tuple[np.ndarray, np.ndarray]:
    s = rng.uniform(0.0, 0.5, size=(n_persons, per))
    return s.ravel().astype(np.float32), np.repeat(np.arange(n_persons), per)


def test_one_look_alike_carrying_the_tail_pushes_the_threshold_past_it():
    """Known answer: 1000 impostor scores, the only 10 high ones (0.9) all from one person.
    The plain 99 % quantile is 0.9 (FAR exactly 1 %); any draw holding that person twice has
    2 %, which a quarter of the draws do, so at 95 % confidence only a threshold above every
    impostor score keeps 1 %."""
    imp, person = _scores(np.random.default_rng(0))
    imp[np.flatnonzero(person == 3)[:10]] = 0.9
    assert float(np.quantile(imp, 0.99, method="higher")) == pytest.approx(0.9)
    thr = _confident_threshold(imp, person, 0.01, 0.95, seed=0)
    assert thr > 0.9 and thr == pytest.approx(0.9, abs=1e-6)
    assert not (imp >= thr).any()


def test_threshold_is_the_lowest_meeting_the_bound():
    rng = np.random.default_rng(1)
    imp, person = _scores(rng)
    # persons differ in how high they score: the tail clusters by person
    imp = imp + 0.3 * rng.uniform(size=20)[person].astype(np.float32)
    target, conf = 0.02, 0.9
    thr = _confident_threshold(imp, person, target, conf, seed=5)
    draws = _person_draws(20, seed=5)
    totals = np.bincount(person).astype(float)

    def bound(t: float) -> float:
        hits = np.bincount(person, weights=(imp >= t).astype(float), minlength=20)
        return float(np.quantile(draws @ hits / (draws @ totals), conf))

    point = float(np.quantile(imp, 1 - target, method="higher"))
    assert thr >= point
    assert bound(thr) <= target
    below = np.unique(imp[(imp >= point) & (imp < thr)])
    assert below.size and bound(float(below.max())) > target  # one step lower breaks the bound


def test_far_confidence_is_validated():
    with pytest.raises(ValueError, match="far_confidence"):
        IdentityConfig(far_confidence=1.0)
    assert IdentityConfig().far_confidence == 0.95


def test_config_section_passes_far_confidence_to_the_engine():
    from daemon.config import IdentitySection

    assert IdentitySection().engine_config().far_confidence == 0.95
    assert IdentitySection(far_confidence=0).engine_config().far_confidence == 0.0
    with pytest.raises(ValueError):
        IdentitySection(far_confidence=1.5)
