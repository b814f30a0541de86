"""nightsift's real/bogus CNN: braai's architecture (Duev et al. 2019, MNRAS 489, 3582) in Keras 3.

braai d6_m7 is a small VGG-like stack on the 63x63x3 triplet (science, reference, difference)::

    conv 16 3x3 ReLU, conv 16 3x3 ReLU, max-pool 2, dropout 0.25
    conv 32 3x3 ReLU, conv 32 3x3 ReLU, max-pool 4, dropout 0.25
    flatten (6x6x32 = 1152) -> dense 256 ReLU -> dropout 0.5 -> dense 1 sigmoid

nightsift keeps these layers and sizes with one change of form, not of function: the
``flatten -> dense 256`` pair is written as a 6x6 ``valid`` convolution with 256 filters followed
by a global average over its 1x1 output. That is the same linear map (same 295,168 weights) but it
has no dynamic-shape ops (Keras' Flatten exports SHAPE/STRIDED_SLICE/PACK to TFLite), so the int8
model maps entirely onto Edge TPU ops and still runs with any batch size on the CPU.

Layer names: ``conv1`` .. ``conv4``, ``fc`` (the 6x6 convolution), ``embedding`` (its (n, 256)
output: the penultimate layer, the feature vector anomaly scoring uses, see :func:`embedding_model`)
and ``score`` (sigmoid). No Lambda or custom layers: the ``.keras`` file loads with
``keras.models.load_model(path, safe_mode=True)``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["INPUT_SHAPE", "EMBEDDING_LAYER", "MODELS_DIR", "DEFAULT_MODEL", "build_model", "embedding_model",
           "save_keras_model", "load_keras_model", "configure_tensorflow"]

INPUT_SHAPE = (63, 63, 3)
EMBEDDING_LAYER = "embedding"
#: the models shipped with nightsift
MODELS_DIR = Path(__file__).resolve().parent / "models"
#: stem of the shipped model: ``<stem>.keras`` (float), ``<stem>_int8.tflite``, ``<stem>.json`` (metadata)
DEFAULT_MODEL = MODELS_DIR / "nightsift_rb"


def configure_tensorflow(threads: int | None = None, *, quiet: bool = True):
    """Import TensorFlow with ``threads`` intra-op threads (default: all cores) and 1 inter-op
    thread; quiet its C++ logging. Call before any model is built. Returns the ``tensorflow`` module."""
    if quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialised: keep what is set
            pass
    return tf


def build_model(*, input_shape=INPUT_SHAPE, filters=(16, 32), dense: int = 256, dropout=(0.25, 0.25, 0.5),
                batch_size: int | None = None, seed: int = 0):
    """The braai-style CNN (see the module docstring), uncompiled.

    Parameters
    ----------
    input_shape : (63, 63, 3)
        The network needs ``(ny - 4) // 2 - 4`` divisible by 4 (63 -> 6x6 before ``fc``).
    filters : (int, int)
        Filters of the two convolution blocks (braai: 16, 32).
    dense : int
        Width of the embedding (braai: 256).
    dropout : (float, float, float)
        After block 1, block 2 and the embedding.
    batch_size : int, optional
        Fix the batch dimension (the int8 export uses 1: Edge TPU tensors are static).
    seed : int
        Seeds the initialisers and dropout layers.

    Returns
    -------
    keras.Model, input ``(n, 63, 63, 3)`` float32 (see :mod:`.preprocess`), output ``(n, 1)``
    the probability of being real.
    """
    import keras
    from keras import layers

    ny, nx, nc = input_shape
    side = ((ny - 4) // 2 - 4) // 4
    if side < 1 or ny != nx or nc != 3:
        raise ValueError(f"input_shape must be square (n, n, 3) with n >= 28, got {input_shape}")
    init = lambda k: keras.initializers.GlorotUniform(seed=seed + k)  # noqa: E731
    inp = keras.Input(shape=tuple(input_shape), batch_size=batch_size, name="triplet")
    x = layers.Conv2D(filters[0], 3, activation="relu", kernel_initializer=init(1), name="conv1")(inp)
    x = layers.Conv2D(filters[0], 3, activation="relu", kernel_initializer=init(2), name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Dropout(dropout[0], seed=seed + 11, name="drop1")(x)
    x = layers.Conv2D(filters[1], 3, activation="relu", kernel_initializer=init(3), name="conv3")(x)
    x = layers.Conv2D(filters[1], 3, activation="relu", kernel_initializer=init(4), name="conv4")(x)
    x = layers.MaxPooling2D(4, name="pool2")(x)
    x = layers.Dropout(dropout[1], seed=seed + 12, name="drop2")(x)
    x = layers.Conv2D(dense, side, activation="relu", kernel_initializer=init(5), name="fc")(x)
    x = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(x)
    x = layers.Dropout(dropout[2], seed=seed + 13, name="drop3")(x)
    out = layers.Dense(1, activation="sigmoid", kernel_initializer=init(6), name="score")(x)
    return keras.Model(inp, out, name="nightsift_rb")


def embedding_model(model):
    """A model sharing ``model``'s layers that returns the ``(n, 256)`` embedding (issue #4's features)."""
    import keras

    return keras.Model(model.inputs, model.get_layer(EMBEDDING_LAYER).output, name="nightsift_rb_embedding")


def save_keras_model(model, path) -> Path:
    """Save the architecture and weights only (no optimizer state: a third of the size) as ``.keras``."""
    import keras

    clean = keras.Model.from_config(model.get_config())  # uncompiled: no optimizer variables
    clean.set_weights(model.get_weights())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    clean.save(p)
    return p


def load_keras_model(path=None):
    """Load a float ``.keras`` model in Keras safe mode (no pickle, no arbitrary code).

    Parameters
    ----------
    path : path, optional
        Default the shipped model ``models/nightsift_rb.keras``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    import keras

    p = Path(path) if path is not None else DEFAULT_MODEL.with_suffix(".keras")
    if not p.exists():
        raise FileNotFoundError(f"{p}: real/bogus model not found (train one with `nightsift train`)")
    return keras.models.load_model(p, safe_mode=True, compile=False)
