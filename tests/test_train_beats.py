"""The beat model's session-compensated LDA (training/train_beats.py: ``record_scatter``,
``session_lda_scalings``), on small synthetic cases whose answer is known: WHY it exists is that
directions which move with the recording (electrodes, days) must count as noise even when a
single recording's beats barely vary along them."""
from __future__ import annotations

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from training.train_beats import record_scatter, session_lda_scalings


def test_record_scatter_is_the_between_recording_part_of_the_within_person_scatter() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(90, 3))
    person = np.repeat([0, 1, 2], 30)
    rec = np.repeat([0, 1, 2, 3, 4, 5], 15)       # persons 0-2 have two recordings each
    # by hand: per beat, (recording mean - person mean) outer itself, averaged over all beats
    want = np.zeros((3, 3))
    for p in range(3):
        mu = z[person == p].mean(axis=0)
        for r in (2 * p, 2 * p + 1):
            d = z[rec == r].mean(axis=0) - mu
            want += 15 * np.outer(d, d)
    np.testing.assert_allclose(record_scatter(z, rec, person), want / 90, atol=1e-12)
    # a person with a single recording adds nothing
    one = record_scatter(z, np.repeat([0, 1, 2], 30), person)
    np.testing.assert_allclose(one, 0.0, atol=1e-12)


def test_weight_zero_is_sklearns_own_lda() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(6), 50)
    z = rng.normal(size=(300, 8)) + 0.5 * y[:, None] * rng.normal(size=8)
    rec = np.repeat(np.arange(12), 25)
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(z, y)
    got = session_lda_scalings(lda, z, rec, y, 0.0)
    np.testing.assert_allclose(np.abs(got[:, :5]), np.abs(lda.scalings_[:, :5]), atol=1e-9)


def _recordings(rng, means: np.ndarray, n_recs: list[int], beats: int = 40):
    """Person p gets ``n_recs[p]`` recordings of ``beats`` beats around ``means[p]`` (6 dims):
    dims 0-2 are stable (beat noise 1, no recording shift), dims 3-5 drift (beat noise 0.1,
    every recording shifted by N(0, 2))."""
    z, y, rec = [], [], []
    for p, (mu, n) in enumerate(zip(means, n_recs)):
        for _ in range(n):
            shift = np.concatenate([np.zeros(3), rng.normal(0, 2.0, 3)])
            noise = np.concatenate([rng.normal(0, 1, (beats, 3)), rng.normal(0, 0.1, (beats, 3))], axis=1)
            z.append(mu + shift + noise)
            y += [p] * beats
            rec += [len(z)] * beats
    return np.concatenate(z), np.array(y), np.array(rec)


def _accuracy(scalings: np.ndarray, z, y, zt, yt, k: int = 3) -> float:
    """Nearest person mean (from z, y) in the k leading directions, over the beats (zt, yt)."""
    proj, projt = z @ scalings[:, :k], zt @ scalings[:, :k]
    means = np.stack([proj[y == p].mean(axis=0) for p in np.unique(y)])
    d = ((projt[:, None, :] - means[None]) ** 2).sum(axis=2)
    return float((np.argmin(d, axis=1) == yt).mean())


def test_raising_the_recording_scatter_moves_the_projection_to_stable_directions() -> None:
    """As in the beat model's training data, most persons have ONE recording (LUDB, MIT-BIH),
    so the pooled within-person covariance hardly sees the recording shift, and plain LDA
    prefers the drifting dims (persons 3 apart, beat noise 0.1); on a new recording, though,
    the stable dims (persons 2 apart, beat noise 1, no shift) are the better ones."""
    rng = np.random.default_rng(2)
    means = np.concatenate([rng.normal(0, 2, (36, 3)), rng.normal(0, 3, (36, 3))], axis=1)
    n_recs = [1] * 30 + [3] * 6
    z, y, rec = _recordings(rng, means, n_recs)
    zt, yt, _ = _recordings(np.random.default_rng(3), means, [1] * 36)   # a new day for everyone
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(z, y)
    plain = session_lda_scalings(lda, z, rec, y, 0.0)
    comp = session_lda_scalings(lda, z, rec, y, 10.0)

    def stable_share(s: np.ndarray) -> float:
        """How much of the leading directions' output variance comes from the stable dims."""
        stable = np.var(z[:, :3] @ s[:3, :3], axis=0).sum()
        return float(stable / (stable + np.var(z[:, 3:] @ s[3:, :3], axis=0).sum()))

    assert stable_share(plain) < 0.5 < stable_share(comp), (stable_share(plain), stable_share(comp))
    acc_plain, acc_comp = _accuracy(plain, z, y, zt, yt), _accuracy(comp, z, y, zt, yt)
    assert acc_comp > acc_plain + 0.1, (acc_plain, acc_comp)
