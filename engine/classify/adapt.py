"""Domain-adversarial training on unlabelled real triplets (DANN; Ganin et al. 2016).

The teacher (:mod:`.teacher`) adapts the CNN to the sky with braai's labels, so its student learns
braai's judgement too. This module adapts with no label at all:
``nightsift train --adapt-packets PATH [--adapt-weight L]``.

* Real survey triplets are read exactly as the scorer sees them and standardised as training rows
  are. Their labels are never read.
* During training a small domain head sits on the CNN's embedding (the ``fc`` features) behind a
  gradient-reversal layer. It learns to tell simulated rows from real ones; the reversed gradient,
  scaled by ``L``, pushes the shared layers towards features in which the two look alike, while
  the real/bogus loss (simulated rows only) keeps them useful.
* Each training batch holds ``batch_size`` simulated rows and as many real rows (drawn with
  replacement, dihedrally augmented), so the domain loss sees both classes equally.
* The reversal weight ramps up as in the paper, ``L * (2 / (1 + exp(-10 p)) - 1)`` with ``p`` the
  fraction of the epochs done (:func:`reversal_ramp`): at full weight from the first step the
  features run away from the untrained domain head (seen: domain loss 14, training AUCPR 0.5 in the
  first epoch).
* Only the real/bogus path is kept: the exported model is the same single-output graph (int8, Edge
  TPU) as without adaptation. The domain head and its reversal layer are training scaffolding.

What a model trained so can claim (the real-data rule, :mod:`.realeval`): its metadata lists the
candid of every real packet used, so ``nightsift evaluate --real`` drops them; only sets allowed to
train (:data:`.realeval.TEACHER_SETS`) are accepted.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ADAPT_KIND", "adapt_rows", "domain_model", "gradient_reversal", "reversal_ramp", "ramp_weight"]

#: ``truth.kind`` of the unlabelled real rows (their ``label`` field is a placeholder, never used)
ADAPT_KIND = "unlabelled"


def adapt_rows(paths):
    """Unlabelled real triplets as standardised rows (:func:`.dataset.packet_rows`).

    Parameters
    ----------
    paths : path or iterable of paths
        Alert packets (ZTF or Rubin; files or folders of ``*.avro``).

    Returns
    -------
    RBData: ``truth.kind`` :data:`ADAPT_KIND`, ``domain.instrument`` ``"<survey>-real"``,
    ``meta["candids"]`` every packet used.

    Raises
    ------
    InputError
        No readable packet.
    """
    from ..errors import InputError
    from ..io.packets import read_packets
    from .dataset import packet_rows

    ps = read_packets(paths, keep_stamps=False)
    if not len(ps.records):
        raise InputError("no alert packet to adapt to", path=str(paths))
    recs = ps.records
    meta = {"source": "unlabelled real triplets (domain adaptation)",
            "packets": [str(p) for p in np.atleast_1d(paths)], "n_packets": len(recs),
            "candids": sorted({int(r["candid"]) for r in recs})}
    survey = sorted({str(r.get("survey") or "ztf") for r in recs})
    return packet_rows(ps.triplets, np.zeros(len(recs)), recs, kinds=(ADAPT_KIND, ADAPT_KIND),
                       instrument="+".join(survey) + "-real", meta=meta)


def gradient_reversal(weight: float):
    """A Keras layer that is the identity forwards and multiplies the gradient by ``-weight``; the
    weight is a non-trainable variable ``scale`` (:func:`reversal_ramp` changes it)."""
    import keras
    import tensorflow as tf

    @tf.custom_gradient
    def flip(t, s):
        return tf.identity(t), lambda dy: (-s * dy, tf.zeros_like(s))

    class GradientReversal(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(float(weight)),
                                         trainable=False, name="scale")

        def call(self, x):
            return flip(x, tf.cast(tf.convert_to_tensor(self.scale), x.dtype))

    return GradientReversal(name="gradient_reversal")


def ramp_weight(weight: float, progress: float) -> float:
    """The reversal weight at ``progress`` (0-1) of training: ``weight * (2 / (1 + exp(-10 p)) - 1)``."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(weight) * (2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0)


def reversal_ramp(model, weight: float, epochs: int):
    """A Keras callback setting the reversal weight of ``model`` (:func:`domain_model`) to
    :func:`ramp_weight` at the start of each epoch (0 in the first)."""
    import keras

    layer = model.get_layer("gradient_reversal")

    class ReversalRamp(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            layer.scale.assign(ramp_weight(weight, epoch / max(int(epochs), 1)))

    return ReversalRamp()


def domain_model(model, weight: float, *, width: int = 64, seed: int = 0):
    """The training graph: ``model``'s layers with a domain head on its embedding.

    Parameters
    ----------
    model : keras.Model
        The real/bogus CNN (:func:`.model.build_model`); its layers are shared, so training the
        returned graph trains it.
    weight : float
        Gradient-reversal weight (> 0).
    width : int
        Hidden units of the domain head.

    Returns
    -------
    keras.Model with outputs ``{"score": (n, 1), "domain": (n, 1)}`` (domain: P(real survey)).
    """
    import keras
    from keras import layers

    from .model import EMBEDDING_LAYER

    if not weight > 0:
        raise ValueError(f"the adaptation weight must be > 0, got {weight}")
    emb = model.get_layer(EMBEDDING_LAYER).output
    d = gradient_reversal(weight)(emb)
    d = layers.Dense(width, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 21),
                     name="domain_hidden")(d)
    d = layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 22),
                     name="domain_out")(d)
    return keras.Model(model.input, {"score": model.output, "domain": d}, name="nightsift_rb_dann")
