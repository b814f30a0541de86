"""The braai-style CNN: architecture, safe-mode round trip, augmentation, and a tiny training run that
must beat chance by far on separable triplets."""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from nightsift.engine.classify.dataset import DOMAIN_DTYPE, TRUTH_DTYPE, RBData  # noqa: E402
from nightsift.engine.classify.metrics import average_precision, roc_auc  # noqa: E402
from nightsift.engine.classify.model import (  # noqa: E402
    EMBEDDING_LAYER, build_model, configure_tensorflow, embedding_model, load_keras_model, save_keras_model,
)
from nightsift.engine.classify.preprocess import standardize  # noqa: E402
from nightsift.engine.classify.train import class_weights, dihedral, predict_keras, sample_weights, train_model  # noqa: E402

TINY = {"filters": (4, 8), "dense": 16}


def separable_triplets(rng, n, size=63):
    """Raw triplets (sky + noise, own offsets per channel): real = a point source in the science
    and the difference, none in the reference; bogus = a star subtracted with a dipole residual, or
    a one-pixel spike in science and difference (a cosmic ray)."""
    y = (rng.uniform(size=n) < 0.4).astype(np.uint8)
    t = rng.normal(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] - size // 2
    for i in range(n):
        dx, dy = rng.uniform(-1, 1, 2)
        w = rng.uniform(1.2, 2.5)
        g = lambda ox, oy: np.exp(-((xx - dx - ox) ** 2 + (yy - dy - oy) ** 2) / (2 * w * w))  # noqa: E731
        amp = rng.uniform(6, 40)
        if y[i]:
            t[i, :, :, 0] += amp * g(0, 0)
            t[i, :, :, 2] += amp * g(0, 0)
        elif rng.uniform() < 0.6:
            t[i, :, :, 0] += 5 * amp * g(0, 0)
            t[i, :, :, 1] += 5 * amp * g(0, 0)
            t[i, :, :, 2] += 0.3 * amp * (g(0.7, 0) - g(-0.7, 0))
        else:
            t[i, 31, 31, 0] += 4 * amp
            t[i, 31, 31, 2] += 4 * amp
    return t * np.float32([5.0, 2.0, 3.0]) + np.float32([100.0, 40.0, 0.0]), y


def as_data(t, y, split):
    z, loc, scale = standardize(t)
    truth = np.zeros(len(y), TRUTH_DTYPE)
    truth["label"] = y
    dom = np.zeros(len(y), DOMAIN_DTYPE)
    dom["split"] = split
    return RBData(z.astype(np.float16), loc, scale, np.zeros(len(y)), truth, dom, {})


def train_tiny(data_seed: int, *, n_val: int, n_test: int, epochs: int, patience: int, seed: int):
    """A TINY model trained on separable triplets (320 training rows, then ``n_val`` and ``n_test``
    drawn with ``data_seed``): ``(model, history, train, val, test)``."""
    configure_tensorflow(2)
    rng = np.random.default_rng(data_seed)
    tr = as_data(*separable_triplets(rng, 320), "train")
    va = as_data(*separable_triplets(rng, n_val), "val")
    te = as_data(*separable_triplets(rng, n_test), "test")
    model, hist = train_model(tr, va, epochs=epochs, batch_size=32, patience=patience, seed=seed, verbose=0,
                              model_kwargs=TINY, learning_rate=3e-3)
    return model, hist, tr, va, te


@pytest.fixture(scope="module")
def tiny_trained():
    return train_tiny(7, n_val=120, n_test=200, epochs=3, patience=3, seed=3)


def test_architecture_is_braai_sized():
    m = build_model(seed=0)
    assert m.input_shape == (None, 63, 63, 3) and m.output_shape == (None, 1)
    names = [layer.name for layer in m.layers]
    for n in ("conv1", "conv2", "conv3", "conv4", "fc", EMBEDDING_LAYER, "score"):
        assert n in names
    # braai d6_m7: conv 448 + 2320 + 4640 + 9248, dense 1152*256 + 256, out 257
    assert m.count_params() == 448 + 2320 + 4640 + 9248 + 295168 + 257
    assert m.get_layer("fc").output.shape[1:] == (1, 1, 256)
    assert embedding_model(m).output_shape == (None, 256)
    assert not any(type(layer).__name__ == "Lambda" for layer in m.layers)
    with pytest.raises(ValueError, match="square"):
        build_model(input_shape=(63, 62, 3))


def test_seeded_build_is_reproducible():
    a = build_model(seed=5, **TINY).get_weights()
    b = build_model(seed=5, **TINY).get_weights()
    c = build_model(seed=6, **TINY).get_weights()
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_dihedral_group(rng):
    x = rng.normal(size=(8, 5, 5, 3)).astype(np.float32)
    out = dihedral(np.repeat(x[:1], 8, axis=0), np.arange(8))
    np.testing.assert_array_equal(out[0], x[0])
    flat = {o.tobytes() for o in out}
    assert len(flat) == 8  # eight distinct symmetries of an asymmetric image
    np.testing.assert_array_equal(out[1], np.rot90(x[0], 1, axes=(0, 1)))
    np.testing.assert_array_equal(out[4], x[0][:, ::-1])
    # channels never mix; each output is a permutation of the input pixels
    np.testing.assert_allclose(np.sort(out.reshape(8, -1, 3), axis=1), np.sort(np.repeat(x[:1], 8, 0).reshape(8, -1, 3), axis=1))


def test_class_weights_balance():
    w = class_weights(np.r_[np.ones(10), np.zeros(30)])
    assert w[1] * 10 == pytest.approx(w[0] * 30) and w[0] * 30 + w[1] * 10 == pytest.approx(40)
    assert class_weights(np.zeros(4))[1] == 1.0


@pytest.mark.slow
def test_tiny_training_beats_chance(tiny_trained):
    model, hist, tr, va, te = tiny_trained
    assert hist["epochs_run"] >= 1 and 1 <= hist["best_epoch"] <= hist["epochs_run"]
    # early stopping judges the operating point (specificity at the target sensitivity), not AUCPR
    assert hist["best_epoch"] == int(np.argmax(hist["val_tnr_at_target"])) + 1
    assert set(hist["class_weight"]) == {"0", "1"}
    p = predict_keras(model, te.inputs())
    assert p.shape == (len(te),) and np.all((p >= 0) & (p <= 1))
    # chance is AUC 0.5 and AUCPR ~0.4 (the real fraction): a working pipeline is far above
    assert roc_auc(te.labels, p) > 0.9
    assert average_precision(te.labels, p) > 0.8


@pytest.mark.slow
def test_safe_mode_round_trip_and_embedding(tiny_trained, tmp_path):
    model, _, _, _, te = tiny_trained
    path = save_keras_model(model, tmp_path / "m.keras")
    back = load_keras_model(path)
    x = te.inputs(slice(0, 16))
    np.testing.assert_allclose(predict_keras(back, x), predict_keras(model, x), atol=1e-6)
    e = embedding_model(back).predict(x, verbose=0)
    assert e.shape == (16, 16) and np.all(e >= 0)  # ReLU features
    with pytest.raises(FileNotFoundError, match="not found"):
        load_keras_model(tmp_path / "none.keras")


def test_sample_weights_balance_kinds_within_each_class():
    y = np.array([0] * 90 + [0] * 10 + [1] * 60 + [1] * 40)
    kinds = np.array(["saturated"] * 90 + ["star"] * 10 + ["isolated"] * 60 + ["variable"] * 40)
    cw = class_weights(y)
    w0 = sample_weights(y, kinds, kind_balance=0.0)
    np.testing.assert_allclose(w0, np.where(y > 0, cw[1], cw[0]))
    w1 = sample_weights(y, kinds, kind_balance=1.0)
    # each class keeps its total weight; with a = 1 every kind of a class carries the same weight
    for c in (0, 1):
        assert w1[y == c].sum() == pytest.approx(w0[y == c].sum())
    assert w1[kinds == "star"].sum() == pytest.approx(w1[kinds == "saturated"].sum())
    assert w1[kinds == "variable"].sum() == pytest.approx(w1[kinds == "isolated"].sum())
    wh = sample_weights(y, kinds, kind_balance=0.5)  # in between: a star row weighs 3x a saturated one
    assert wh[90] / wh[0] == pytest.approx(3.0)


@pytest.mark.slow
def test_weight_averaging_keeps_the_validated_weights():
    """With ``ema`` validation scores the averaged weights (the same seeded run without it follows the
    same raw path but validates other numbers), and the model returned is the averaged one early
    stopping kept: evaluating it gives back the best epoch's validation AUCPR."""
    configure_tensorflow(2)
    rng = np.random.default_rng(11)
    tr = as_data(*separable_triplets(rng, 256), "train")
    va = as_data(*separable_triplets(rng, 96), "val")
    kw = dict(epochs=3, batch_size=32, patience=3, seed=5, verbose=0, model_kwargs=TINY, learning_rate=3e-3)
    _, raw = train_model(tr, va, **kw)
    model, hist = train_model(tr, va, ema=0.9, **kw)
    assert hist["ema"] == 0.9 and raw["ema"] == 0.0
    assert not np.allclose(hist["val_loss"], raw["val_loss"], rtol=1e-4)
    assert np.allclose(hist["loss"], raw["loss"], rtol=1e-4)  # the same raw training path
    got = model.evaluate(va.inputs(), va.labels, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(hist["val_loss"][hist["best_epoch"] - 1], rel=1e-5)
    with pytest.raises(ValueError, match="ema"):
        train_model(tr, va, epochs=1, verbose=0, model_kwargs=TINY, ema=1.0)


def test_init_model_starts_from_its_weights(tmp_path):
    """``init_model``: the fit starts from that model's weights. With a zero learning rate nothing
    moves, so the result is that model exactly (a fresh start with another seed is not)."""
    configure_tensorflow(2)
    rng = np.random.default_rng(3)
    tr = as_data(*separable_triplets(rng, 64), "train")
    va = as_data(*separable_triplets(rng, 32), "val")
    init = build_model(seed=99, **TINY)
    path = save_keras_model(init, tmp_path / "init.keras")
    kw = dict(epochs=1, batch_size=32, patience=1, seed=5, verbose=0, model_kwargs=TINY, learning_rate=0.0)
    warm, _ = train_model(tr, va, init_model=path, **kw)
    cold, _ = train_model(tr, va, **kw)
    for a, b, c in zip(warm.get_weights(), init.get_weights(), cold.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(b, c) for b, c in zip(init.get_weights(), cold.get_weights()))
