"""BioDeep-style CNN on IMU autocorrelation features, and its random-forest baseline.

WHY this architecture: BioDeep (gender/age from gait autocorrelation) runs two small 1-D
convolutions over the ACF features, one dense layer and dropout; it is a few thousand
parameters, which int8-quantises to a few KB and runs in microseconds on a Pi. The feature
vector is axis-major (axis 0 lags 0..L, axis 1 ...; see ``daemon.dsp.imu``), so the model
reshapes it to (lags, axes): the convolution slides along the lag axis with the six sensor axes
as channels, which is the structure the ACF actually has.

Heads (named; the names are the signature output names the daemon reads):
- ``gender``: ``p_female`` (sigmoid).
- ``age``: ``age_years`` (the last layer rescales to years with the training mean/std, so the
  output is physical and int8 calibration sees the real range). ``build_age_groups`` instead
  learns young vs elderly (``p_elderly``, binary cross-entropy) and maps it to years between the
  two groups' mean ages: SisFall's ages are two clusters (19-27, 60-75), so the age error is
  decided by the cluster, and a regression loss pulls uncertain windows into the empty middle.
- Feature variants with gait statistics after the ACF (``CnnConfig.n_extra``): the ACF part
  goes through the convolutions, the statistics join at the dense layer.
- ``activity``: ``top_level`` (softmax over rest/walking/vigorous) and ``fine`` (softmax over
  HuGaDB's classes), trained jointly.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from training.seeding import seed_everything  # noqa: E402


def limit_threads(n: int = 1) -> None:
    """The build machines and the hub share few cores: keep TF to ``n`` threads."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:  # already initialised: the setting from the first call stays
        pass


@dataclass(frozen=True)
class CnnConfig:
    n_axes: int = 6
    n_lags: int = 11
    conv: tuple[int, int] = (16, 32)
    kernel: int = 3
    dense: int = 64
    dropout: float = 0.3
    n_extra: int = 0  # features after the (lags x axes) ACF block, e.g. the "gait" statistics
    use_acf: bool = True  # False: the dense layer sees only the n_extra statistics


def acf_trunk(cfg: CnnConfig, name: str = "features") -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Input (F,) -> (lags, axes) -> Conv1D 16 -> Conv1D 32 -> Flatten [+ extras] -> Dense 64
    -> Dropout."""
    n_acf = cfg.n_axes * cfg.n_lags
    inp = keras.Input((n_acf + cfg.n_extra,), name=name)
    if not cfg.use_acf:
        if not cfg.n_extra:
            raise ValueError("use_acf=False needs n_extra > 0 statistics to learn from")
        x = keras.layers.Dense(cfg.dense, activation="relu", name="fc")(inp[:, n_acf:])
        return inp, keras.layers.Dropout(cfg.dropout)(x)
    acf = inp if not cfg.n_extra else inp[:, :n_acf]
    x = keras.layers.Reshape((cfg.n_axes, cfg.n_lags))(acf)
    x = keras.layers.Permute((2, 1))(x)
    for i, filters in enumerate(cfg.conv):
        x = keras.layers.Conv1D(filters, cfg.kernel, padding="same", activation="relu",
                                name=f"conv{i + 1}")(x)
    x = keras.layers.Flatten()(x)
    if cfg.n_extra:
        extra = inp[:, n_acf:]
        x = keras.layers.Concatenate()([x, extra])
    x = keras.layers.Dense(cfg.dense, activation="relu", name="fc")(x)
    x = keras.layers.Dropout(cfg.dropout)(x)
    return inp, x


def build_gender(cfg: CnnConfig = CnnConfig()) -> keras.Model:
    inp, x = acf_trunk(cfg)
    out = keras.layers.Dense(1, activation="sigmoid", name="head_gender")(x)
    model = keras.Model(inp, {"p_female": out}, name="imu_gender")
    model.compile(keras.optimizers.Adam(1e-3), loss={"p_female": "binary_crossentropy"})
    return model


def build_age(age_mean: float, age_std: float, cfg: CnnConfig = CnnConfig()) -> keras.Model:
    inp, x = acf_trunk(cfg)
    z = keras.layers.Dense(1, name="head_age")(x)
    out = keras.layers.Rescaling(scale=float(age_std), offset=float(age_mean), name="years")(z)
    model = keras.Model(inp, {"age_years": out}, name="imu_age")
    model.compile(keras.optimizers.Adam(1e-3), loss={"age_years": keras.losses.Huber(delta=5.0)})
    return model


def build_age_groups(young_age: float, elderly_age: float, cfg: CnnConfig = CnnConfig(),
                     sharpness: float = 1.0) -> keras.Model:
    """Young/elderly classifier whose ``age_years`` output is ``young + p*(elderly - young)``.

    Trained on ``p_elderly`` only (binary cross-entropy). ``sharpness`` multiplies the logit of
    the ``age_years`` path only: > 1 pushes each window's estimate towards one group's age,
    which is what minimises the absolute error of a two-cluster age (the median of a bimodal
    posterior is a mode), without changing what ``p_elderly`` learns.
    """
    inp, x = acf_trunk(cfg)
    z = keras.layers.Dense(1, name="head_age")(x)
    p = keras.layers.Activation("sigmoid", name="p_old")(z)
    sharp = keras.layers.Rescaling(scale=float(sharpness), name="sharpen")(z)
    q = keras.layers.Activation("sigmoid", name="q_old")(sharp)
    out = keras.layers.Rescaling(scale=float(elderly_age - young_age), offset=float(young_age),
                                 name="years")(q)
    model = keras.Model(inp, {"age_years": out, "p_elderly": p}, name="imu_age")
    model.compile(keras.optimizers.Adam(1e-3), loss={"p_elderly": "binary_crossentropy"})
    return model


def build_activity(n_top: int, n_fine: int, cfg: CnnConfig = CnnConfig()) -> keras.Model:
    inp, x = acf_trunk(cfg)
    top = keras.layers.Dense(n_top, activation="softmax", name="head_top")(x)
    fine = keras.layers.Dense(n_fine, activation="softmax", name="head_fine")(x)
    model = keras.Model(inp, {"top_level": top, "fine": fine}, name="imu_activity")
    compile_activity(model)
    return model


def compile_activity(model: keras.Model, lr: float = 1e-3) -> None:
    model.compile(keras.optimizers.Adam(lr),
                  loss={"top_level": "sparse_categorical_crossentropy",
                        "fine": "sparse_categorical_crossentropy"})


def average_models(members: list[keras.Model], name: str) -> keras.Model:
    """One model whose every named output is the mean of the members' (a seed ensemble).

    Why: with 20-odd training persons one network's decision for a new person depends on its
    random seed; averaging a few seeds removes most of that variance, and it stays one file.
    """
    if len(members) == 1:
        return members[0]
    inp = keras.Input(tuple(members[0].inputs[0].shape[1:]), name="features")
    for i, m in enumerate(members):
        m.name = f"{name}_seed{i}"  # nested models need unique names
    outs = [m(inp) for m in members]
    avg = {k: keras.layers.Average(name=f"mean_{k}")([o[k] for o in outs]) for k in outs[0]}
    return keras.Model(inp, avg, name=name)


def class_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights, inverse class frequency (mean 1): persons/classes are unbalanced."""
    classes, counts = np.unique(y, return_counts=True)
    w = {c: len(y) / (len(classes) * n) for c, n in zip(classes, counts)}
    return np.array([w[c] for c in y], dtype=np.float32)


def fit(model: keras.Model, x: np.ndarray, y: Mapping[str, np.ndarray], epochs: int,
        sample_weight: np.ndarray | None = None, batch_size: int = 256, seed: int = 0) -> float:
    """Train in place; returns the final training loss. Fixed epochs: no peeking at test folds."""
    seed_everything(seed)
    hist = model.fit(x, dict(y), sample_weight=sample_weight, epochs=epochs,
                     batch_size=batch_size, verbose=0, shuffle=True)
    return float(hist.history["loss"][-1])


def predict(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    out = model.predict(x, batch_size=1024, verbose=0)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def random_forest(task: str, seed: int = 0):
    """The baseline of BASELINES.md: 100 trees on the same features (evaluated, not shipped)."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    cls = RandomForestRegressor if task == "age" else RandomForestClassifier
    return cls(n_estimators=100, n_jobs=1, random_state=seed)
