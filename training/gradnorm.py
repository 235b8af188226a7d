"""Loss-weight balancing for the ECG dual-task model (identity + activity).

Two published rules, both as plain numpy so that they are testable by hand and independent of
the training framework; the training loop feeds them the gradient norms of each task's loss with
respect to the last shared layer (the place where the tasks compete).

* ``DT4ECGGradNorm`` — DT4ECG, Algorithm 1: ``Δw_i = g_i / Σ_j g_j`` with ``g_i`` the norm of
  the gradient of the *weighted* loss ``w_i·L_i``, then ``w_i ← w_i · exp(α (Δw_i − 1))`` with
  α = 2. As printed, every factor is < 1, so the weights only shrink; we therefore renormalise
  them to sum to T (the number of tasks) afterwards (``renormalise=True``, our choice, documented
  in docs/MODELS.md) — the ratio between the weights is exactly the paper's. The rule favours
  the task with the larger gradient share, a positive feedback: applied every step it drives
  the smaller task's weight to ~0 within a few dozen steps, so the trainer applies it once per
  "epoch" (``update_every`` steps, on mean gradient norms) and ``min_weight`` can floor it.
* ``ChenGradNorm`` — Chen et al. 2018 (GradNorm, ICML): ``G_i = w_i·‖∇_W L_i‖``,
  ``Ḡ = mean G_i``, ``r_i = L̃_i / mean L̃`` with ``L̃_i = L_i(t)/L_i(0)`` (inverse training rate),
  target ``Ḡ·r_i^α`` held constant, ``L_grad = Σ |G_i − target_i|`` (L1), one gradient step on
  the weights (``∂L_grad/∂w_i = sign(G_i − target_i)·‖∇_W L_i‖``), clamp to > 0, renormalise to
  sum T.
* ``FixedWeights`` — the multimodal paper's 0.65 / 0.35, the ablation's control.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _renormalise(w: np.ndarray, total: float) -> np.ndarray:
    return (w * (total / float(np.sum(w)))).astype(np.float64)


@dataclass
class FixedWeights:
    """Constant loss weights (control arm of the ablation)."""

    weights: np.ndarray = field(default_factory=lambda: np.array([0.65, 0.35]))

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)

    def update(self, grad_norms: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return self.weights


@dataclass
class DT4ECGGradNorm:
    """DT4ECG Algorithm 1. ``grad_norms`` are norms of ∇_W(w_i·L_i) (weighted losses)."""

    n_tasks: int = 2
    alpha: float = 2.0
    renormalise: bool = True
    min_weight: float = 0.0
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = np.ones(self.n_tasks, dtype=np.float64)
        self.weights = np.asarray(self.weights, dtype=np.float64)

    def update(self, grad_norms: np.ndarray, losses: np.ndarray | None = None) -> np.ndarray:
        g = np.asarray(grad_norms, dtype=np.float64)
        if g.shape != self.weights.shape:
            raise ValueError(f"expected {self.weights.shape[0]} gradient norms, got {g.shape}")
        share = g / max(float(np.sum(g)), 1e-12)
        w = self.weights * np.exp(self.alpha * (share - 1.0))
        w = _renormalise(w, float(self.n_tasks)) if self.renormalise else w
        # Optional floor (not in the paper), then renormalise again: the renormalisation can
        # take a floored weight slightly below it (0.096 for a floor of 0.1 seen in training),
        # so it is a guard against a task vanishing, not an exact bound.
        if self.min_weight > 0:
            w = np.maximum(w, self.min_weight)
            w = _renormalise(w, float(self.n_tasks)) if self.renormalise else w
        self.weights = w
        return self.weights


@dataclass
class ChenGradNorm:
    """Chen et al. 2018 GradNorm. ``grad_norms`` are norms of ∇_W L_i (unweighted losses)."""

    n_tasks: int = 2
    alpha: float = 1.5
    lr: float = 0.025
    weights: np.ndarray | None = None
    initial_losses: np.ndarray | None = None
    last_grad_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = np.ones(self.n_tasks, dtype=np.float64)
        self.weights = np.asarray(self.weights, dtype=np.float64)

    def update(self, grad_norms: np.ndarray, losses: np.ndarray) -> np.ndarray:
        g = np.asarray(grad_norms, dtype=np.float64)
        loss = np.asarray(losses, dtype=np.float64)
        if g.shape != self.weights.shape or loss.shape != self.weights.shape:
            raise ValueError("grad_norms and losses need one entry per task")
        if self.initial_losses is None:
            self.initial_losses = np.maximum(loss, 1e-12)
        big_g = self.weights * g
        ratio = loss / self.initial_losses
        rel = ratio / max(float(np.mean(ratio)), 1e-12)
        target = float(np.mean(big_g)) * rel ** self.alpha
        diff = big_g - target
        self.last_grad_loss = float(np.sum(np.abs(diff)))
        grad_w = np.sign(diff) * g
        w = np.maximum(self.weights - self.lr * grad_w, 1e-3)
        self.weights = _renormalise(w, float(self.n_tasks))
        return self.weights


def make_balancer(name: str, min_weight: float = 0.1):
    """``fixed`` | ``dt4ecg`` | ``chen`` -> a balancer with ``update(grad_norms, losses)``."""
    if name == "fixed":
        return FixedWeights()
    if name == "dt4ecg":
        return DT4ECGGradNorm(min_weight=min_weight)
    if name == "chen":
        return ChenGradNorm()
    raise ValueError(f"unknown loss balancing {name!r}: use fixed, dt4ecg or chen")


#: which gradient each balancer wants: of the weighted loss (DT4ECG) or of the raw loss (Chen).
WANTS_WEIGHTED_GRADIENT = {"fixed": False, "dt4ecg": True, "chen": False}
