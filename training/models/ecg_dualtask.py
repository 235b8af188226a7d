"""DT4ECG-style dual-task ECG network: 1D residual blocks + Sequence-Channel Attention (SCA).

One shared trunk, two heads:

* ``embedding`` — an L2-normalised identity embedding (trained with AM-Softmax, see
  training/losses.py) so that persons never seen in training can be enrolled and compared by
  cosine similarity (open-set use on the hub);
* ``activity`` — softmax over rest / walking / vigorous.

SCA (DT4ECG) is applied after each residual block, in turn:

1. channel attention: average over time -> (B, C) -> 1D conv across the channel axis (kernel k,
   no bias, ECA-style: cheap and int8-friendly) -> sigmoid -> scale each channel;
2. sequence attention: average over channels -> (B, T) -> fully connected T -> T -> sigmoid ->
   scale each time step.

Everything uses ops that the TFLite int8 converter quantises fully (Conv1D/Dense/Mean/Mul/Add).
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

ACTIVITY_LABELS = ("rest", "walking", "vigorous")


@keras.saving.register_keras_serializable(package="biod")
class SequenceChannelAttention(layers.Layer):
    """DT4ECG SCA: channel attention, then sequence attention (see module docstring)."""

    def __init__(self, kernel_size: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)

    def build(self, input_shape) -> None:
        _, steps, channels = input_shape
        self.channel_conv = layers.Conv1D(1, self.kernel_size, padding="same", use_bias=False,
                                          name="channel_conv")
        self.channel_conv.build((None, int(channels), 1))
        self.sequence_fc = layers.Dense(int(steps), name="sequence_fc")
        self.sequence_fc.build((None, int(steps)))
        super().build(input_shape)

    def call(self, x):
        pooled_t = tf.reduce_mean(x, axis=1)                          # (B, C)
        ca = tf.sigmoid(self.channel_conv(tf.expand_dims(pooled_t, -1)))  # (B, C, 1)
        x = x * tf.transpose(ca, [0, 2, 1])                            # (B, 1, C)
        pooled_c = tf.reduce_mean(x, axis=2)                          # (B, T)
        sa = tf.sigmoid(self.sequence_fc(pooled_c))                   # (B, T)
        return x * tf.expand_dims(sa, -1)

    def get_config(self) -> dict:
        return {**super().get_config(), "kernel_size": self.kernel_size}


def sca_reference(x: np.ndarray, conv_kernel: np.ndarray, fc_w: np.ndarray,
                  fc_b: np.ndarray) -> np.ndarray:
    """Plain-numpy SCA for one batch (B, T, C); ``conv_kernel`` (k,), ``fc_w`` (T, T)."""
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    pooled = x.mean(axis=1)                                   # (B, C)
    k = len(conv_kernel)
    pad = np.pad(pooled, ((0, 0), ((k - 1) // 2, k // 2)))
    conv = np.stack([pad[:, i:i + pooled.shape[1]] for i in range(k)], -1) @ conv_kernel
    x = x * sig(conv)[:, None, :]
    pooled_c = x.mean(axis=2)                                 # (B, T)
    return x * sig(pooled_c @ fc_w + fc_b)[:, :, None]


def _res_block(x, filters: int, kernel: int, stride: int, name: str):
    shortcut = x
    y = layers.Conv1D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv1D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    y = SequenceChannelAttention(name=f"{name}_sca")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv1D(filters, 1, strides=stride, use_bias=False,
                                 name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_bnp")(shortcut)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def build_dualtask(input_len: int = 300, n_leads: int = 3, embedding_dim: int = 64,
                   widths: tuple[int, ...] = (16, 32, 48, 56), n_activity: int = 3,
                   strides: tuple[int, ...] = (1, 2, 2, 2),
                   kernels: tuple[int, ...] = (5, 5, 3, 3), stem_stride: int = 2,
                   dropout: float = 0.0) -> keras.Model:
    """Return the dual-task model: input (B, input_len, n_leads) -> {embedding, activity}.

    Default size (~82 k parameters) keeps the int8 file (138 KB) under the 150 KB budget.
    ``dropout`` (training only, no weights, nothing exported) on the pooled shared features
    before the identity head: with ~120 training persons the head otherwise memorises them."""
    inp = keras.Input((input_len, n_leads), name="ecg")
    x = layers.Conv1D(widths[0], 7, strides=stem_stride, padding="same", use_bias=False,
                      name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, w in enumerate(widths):
        x = _res_block(x, w, kernels[i], strides[i], name=f"res{i}")
    shared = layers.GlobalAveragePooling1D(name="shared_pool")(x)
    pre = layers.Dropout(dropout, name="embedding_dropout")(shared) if dropout > 0 else shared
    e = layers.Dense(embedding_dim, name="embedding_dense")(pre)
    emb = layers.UnitNormalization(axis=-1, name="embedding")(e)
    a = layers.Dense(32, activation="relu", name="activity_hidden")(shared)
    act = layers.Dense(n_activity, activation="softmax", name="activity")(a)
    return keras.Model(inp, {"embedding": emb, "activity": act}, name="ecg_dualtask")


def shared_last_layer(model: keras.Model) -> list[tf.Variable]:
    """Weights of the last shared conv: where GradNorm measures the per-task gradient norms."""
    convs = [layer for layer in model.layers if layer.name.endswith("_conv2")]
    return list(convs[-1].trainable_weights)


def keras_from_float_twin(path) -> keras.Model:
    """Rebuild the dual-task Keras model from its float32 LiteRT twin (``float/<name>.tflite``).

    WHY: re-quantising a shipped network (a better int8 calibration, a newer converter) needs
    the Keras model, and the first shipped CNN was exported before ``training.train_ecg`` kept
    it. The float twin holds every weight: the converter folded each BatchNormalization into
    the convolution before it (kernel scaled per output channel, a bias added), so the rebuilt
    model gets the folded kernels and identity BatchNormalization layers carrying the bias
    (gamma 1, mean 0, variance 1 - epsilon, beta = bias). The same function, not an
    approximation: ``training.requantize_ecg`` checks it against the twin before using it.
    Tensors are found by the layer names ``build_dualtask`` gives them.
    """
    from daemon.inference.runtime import _Interpreter

    interp = _Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    tensors: dict[str, np.ndarray] = {}
    for t in interp.get_tensor_details():
        try:
            tensors[t["name"]] = interp.get_tensor(t["index"])
        except ValueError:  # activations have no data before an invoke
            continue

    def unique(part: str, ndim: int) -> np.ndarray:
        """The one constant of ``ndim`` dimensions whose (fused) name contains ``part``."""
        hits = [k for k in tensors if tensors[k].ndim == ndim
                and any(seg.startswith(part) for seg in k.split(";"))]
        if len(hits) != 1:
            raise ValueError(f"{path}: expected one {ndim}-d tensor named {part}, found {len(hits)}")
        return tensors[hits[0]]

    stem_bn = [("stem", "stem_bn")]
    blocks = [(f"res{i}_conv{j}", f"res{i}_bn{j}") for i in range(4) for j in (1, 2)]
    blocks += [(f"res{i}_proj", f"res{i}_bnp") for i in range(4)]
    model = build_dualtask()
    names = {layer.name for layer in model.layers}
    for conv, bn in stem_bn + blocks:
        if conv not in names:
            continue  # a block without a projection shortcut
        base = f"ecg_dualtask_1/{bn}_1/batchnorm/"
        kernel = unique(base + "mul_1", 4)  # (out, 1, k, in)
        bias = unique(base + "add_1", 1)
        model.get_layer(conv).set_weights([np.transpose(kernel[:, 0], (1, 2, 0))])
        bn_layer = model.get_layer(bn)
        n = len(bias)
        bn_layer.set_weights([np.ones(n, np.float32), bias.astype(np.float32),
                              np.zeros(n, np.float32), np.full(n, 1.0 - bn_layer.epsilon, np.float32)])
    for i in range(4):
        sca = model.get_layer(f"res{i}_sca")
        base = f"ecg_dualtask_1/res{i}_sca_1/"
        kernel = tensors[base + "channel_conv_1/convolution"]  # (1, 1, k, 1)
        sca.channel_conv.set_weights([kernel[0, 0].reshape(-1, 1, 1)])
        sca.sequence_fc.set_weights([tensors[base + "sequence_fc_1/MatMul"].T,
                                     tensors[base + "sequence_fc_1/BiasAdd"]])
    for name in ("embedding_dense", "activity_hidden", "activity"):
        base = f"ecg_dualtask_1/{name}_1/"
        model.get_layer(name).set_weights([tensors[base + "MatMul"].T, unique(base + "BiasAdd", 1)])
    return model
