"""Losses for the ECG dual-task model.

Identity uses AM-Softmax (additive margin, Wang et al. 2018): cosine logits between the
L2-normalised embedding and L2-normalised class centres, the true class's cosine reduced by a
margin ``m`` and everything scaled by ``s``. The margin makes classes compact and separated in
angle, which is what open-set verification by a cosine threshold needs (a plain softmax only
separates the training persons). Activity uses ordinary categorical cross-entropy.
"""
from __future__ import annotations

import tensorflow as tf


class AMSoftmaxHead(tf.Module):
    """Class centres for AM-Softmax; trained with the model, never exported."""

    def __init__(self, embedding_dim: int, n_classes: int, scale: float = 30.0,
                 margin: float = 0.3, seed: int = 0) -> None:
        super().__init__(name="am_softmax")
        init = tf.random.stateless_normal((embedding_dim, n_classes), seed=(seed, 1))
        self.centres = tf.Variable(init, name="centres")
        self.scale = float(scale)
        self.margin = float(margin)

    def logits(self, embedding: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        w = tf.math.l2_normalize(self.centres, axis=0)
        cos = tf.matmul(tf.math.l2_normalize(embedding, axis=1), w)
        onehot = tf.one_hot(labels, tf.shape(w)[1], dtype=cos.dtype)
        return self.scale * (cos - self.margin * onehot)

    def loss(self, embedding: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=self.logits(embedding, labels)))


def activity_loss(probs: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Cross-entropy on softmax outputs (the model's activity head ends in a softmax)."""
    return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, probs))
