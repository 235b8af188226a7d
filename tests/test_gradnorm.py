"""Both GradNorm variants against one update step computed by hand (numbers in comments)."""
import numpy as np
import pytest

from training.gradnorm import ChenGradNorm, DT4ECGGradNorm, FixedWeights, make_balancer


def test_dt4ecg_algorithm1_one_step_as_printed():
    # g = [3, 1] -> Δw = [0.75, 0.25]; w_i = 1·exp(2(Δw_i − 1)) = [e^-0.5, e^-1.5]
    b = DT4ECGGradNorm(renormalise=False)
    w = b.update(np.array([3.0, 1.0]))
    np.testing.assert_allclose(w, [0.6065306597, 0.2231301601], rtol=1e-9)


def test_dt4ecg_renormalised_to_task_count():
    # [e^-0.5, e^-1.5] * 2 / (e^-0.5 + e^-1.5) = [1.4621171573, 0.5378828427]
    b = DT4ECGGradNorm()
    w = b.update(np.array([3.0, 1.0]))
    np.testing.assert_allclose(w, [1.4621171573, 0.5378828427], rtol=1e-9)
    assert w.sum() == pytest.approx(2.0)
    # the task with the larger gradient share gains weight on the next step too
    w2 = b.update(np.array([3.0, 1.0]))
    assert w2[0] > w[0]


def test_dt4ecg_floor():
    # renormalised [1.46212, 0.53788] -> floor 0.6 -> [1.46212, 0.6] * 2 / 2.06212
    b = DT4ECGGradNorm(min_weight=0.6)
    w = b.update(np.array([3.0, 1.0]))
    np.testing.assert_allclose(w, [1.4180738, 0.5819262], rtol=1e-6)


def test_chen_gradnorm_two_steps_by_hand():
    b = ChenGradNorm(alpha=1.5, lr=0.025)
    # step 1: L(0) = L = [2, 1] -> r = [1, 1]; G = w·g = [2, 1], Ḡ = 1.5, target [1.5, 1.5]
    # ∂|G−t|/∂w = sign(G−t)·g = [+2, −1]; w = [1 − 0.05, 1 + 0.025] = [0.95, 1.025]
    # renormalise to 2: [0.95, 1.025]·2/1.975
    w = b.update(np.array([2.0, 1.0]), np.array([2.0, 1.0]))
    np.testing.assert_allclose(w, [0.9620253165, 1.0379746835], rtol=1e-9)
    assert b.last_grad_loss == pytest.approx(1.0)
    # step 2: L = [1, 1] -> L̃ = [0.5, 1], r = [2/3, 4/3]; G = w, Ḡ = 1
    # target = [(2/3)^1.5, (4/3)^1.5] = [0.5443311, 1.5396007]; signs [+, −], g = [1, 1]
    # w = [0.9620253 − 0.025, 1.0379747 + 0.025] (sum already 2)
    w = b.update(np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(w, [0.9370253165, 1.0629746835], rtol=1e-9)
    assert b.last_grad_loss == pytest.approx((0.9620253165 - 0.5443310540)
                                             + (1.5396007178 - 1.0379746835), rel=1e-7)


def test_chen_slow_task_gains_weight():
    b = ChenGradNorm()
    b.update(np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    for _ in range(20):  # task 0 trains fast, task 1 stalls
        w = b.update(np.array([1.0, 1.0]), np.array([0.2, 1.0]))
    assert w[1] > w[0] and w.sum() == pytest.approx(2.0)


def test_fixed_and_factory():
    np.testing.assert_allclose(FixedWeights().update(np.ones(2), np.ones(2)), [0.65, 0.35])
    assert isinstance(make_balancer("chen"), ChenGradNorm)
    with pytest.raises(ValueError, match="unknown loss balancing"):
        make_balancer("nope")
    with pytest.raises(ValueError):
        DT4ECGGradNorm().update(np.ones(3))
