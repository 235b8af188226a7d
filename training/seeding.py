"""One seed for a training run, and TensorFlow's deterministic op implementations.

WHY both: ``keras.utils.set_random_seed`` fixes the Python, NumPy and TensorFlow random streams,
but on a GPU (and for a few CPU kernels) TensorFlow may still pick op implementations whose
floating-point sums run in a varying order, and a few thousand training steps turn that into
another network. ``enable_op_determinism`` makes those ops use deterministic kernels, or raise
instead of silently varying, so the same command, data and seed give the same model file on
the same machine (checked by ``tests/test_ecg_model.py``). Different CPUs can still differ:
oneDNN picks kernels by instruction set.
"""
from __future__ import annotations


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
