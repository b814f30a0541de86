"""Domain-adversarial training on unlabelled real triplets (issue #13): the gradient reversal, the
mixed batches, a tiny run whose exported model is the plain CNN, and the real-data rule."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from nightsift.engine.classify.adapt import domain_model, gradient_reversal, ramp_weight, reversal_ramp  # noqa: E402
from nightsift.engine.classify.metrics import roc_auc  # noqa: E402
from nightsift.engine.classify.model import build_model, configure_tensorflow  # noqa: E402
from nightsift.engine.classify.preprocess import compress  # noqa: E402
from nightsift.engine.classify.train import _batches, predict_keras, train_model  # noqa: E402

from .test_classify_model import TINY, as_data, separable_triplets  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_gradient_reversal_is_identity_forwards_and_flips_the_gradient():
    layer = gradient_reversal(0.4)
    x = tf.constant([[1.0, -2.0, 3.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.constant([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [[-0.4, -0.8, -1.2]])


def test_reversal_weight_ramps_up_from_zero():
    assert ramp_weight(0.3, 0.0) == 0.0
    assert ramp_weight(0.3, 0.1) == pytest.approx(0.3 * (2 / (1 + np.exp(-1.0)) - 1))
    assert ramp_weight(0.3, 1.0) == pytest.approx(0.3, rel=1e-4) and ramp_weight(0.3, 2.0) == ramp_weight(0.3, 1.0)
    d = domain_model(build_model(seed=0, **TINY), 0.3)
    cb = reversal_ramp(d, 0.3, epochs=10)
    layer = d.get_layer("gradient_reversal")
    x = tf.ones((1, 16))
    for epoch, want in ((0, 0.0), (5, ramp_weight(0.3, 0.5))):
        cb.on_epoch_begin(epoch)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x))
        np.testing.assert_allclose(tape.gradient(y, x).numpy(), -want, rtol=1e-6)  # the gradient follows the ramp


def test_domain_model_shares_the_cnn_and_adds_only_a_head():
    m = build_model(seed=0, **TINY)
    d = domain_model(m, 0.3)
    x = np.zeros((2, 63, 63, 3), np.float32)
    out = d(x)
    assert out["score"].shape == (2, 1) and out["domain"].shape == (2, 1)
    np.testing.assert_allclose(out["score"].numpy(), m(x).numpy())  # the same layers, the same score
    own = {id(v) for v in m.weights}
    extra = [v for v in d.weights if id(v) not in own]
    assert len(extra) == 5  # the head's two dense layers (kernels, biases) and the reversal weight
    with pytest.raises(ValueError, match="> 0"):
        domain_model(m, 0.0)


def test_mixed_batches_label_and_weight_each_row_for_its_output():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(10, 63, 63, 3)).astype(np.float16)
    zr = rng.normal(size=(3, 63, 63, 3)).astype(np.float16)
    y = np.r_[np.ones(4), np.zeros(6)].astype(np.uint8)
    w = np.linspace(0.5, 1.4, 10)
    b = _batches(z, y, w, batch_size=4, augment=True, seed=1, adapt_z=zr)
    x, lab, wt = b[0]
    assert x.shape == (8, 63, 63, 3)
    np.testing.assert_array_equal(lab["domain"], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(wt["domain"], np.ones(8))
    np.testing.assert_array_equal(wt["score"][4:], 0)  # real rows never enter the real/bogus loss
    assert np.all(wt["score"][:4] > 0)
    # the real rows are the given ones (up to the dihedral symmetry): their pixel sets match
    given = [np.sort(compress(zr[j:j + 1]).ravel()) for j in range(3)]
    for k in range(4, 8):
        assert any(np.allclose(np.sort(x[k].ravel()), g) for g in given)
    plain = _batches(z, y, w, batch_size=4, augment=False, seed=1)[0]
    assert len(plain) == 3 and plain[0].shape == (4, 63, 63, 3)


@pytest.mark.slow
def test_tiny_adversarial_run_exports_the_plain_cnn():
    configure_tensorflow(2)
    rng = np.random.default_rng(5)
    tr = as_data(*separable_triplets(rng, 320), "train")
    va = as_data(*separable_triplets(rng, 120), "val")
    te = as_data(*separable_triplets(rng, 200), "test")
    t, _ = separable_triplets(rng, 64)
    yy, xx = np.mgrid[:63, :63]
    t += (8.0 * np.sin(xx / 3.0))[None, :, :, None].astype(np.float32)  # a shifted domain: stripes
    real = as_data(t, np.zeros(64, np.uint8), "train")
    kw = dict(epochs=3, batch_size=32, patience=3, seed=3, verbose=0, model_kwargs=TINY, learning_rate=3e-3)
    model, hist = train_model(tr, va, adapt=real, adapt_weight=0.5, **kw)
    base, _ = train_model(tr, va, **kw)
    assert model.output_shape == (None, 1)
    assert not any(layer.name.startswith("domain") or layer.name == "gradient_reversal" for layer in model.layers)
    assert hist["adapt"] == {"weight": 0.5, "n_rows": 64}
    assert "val_tnr_at_target" in hist and "domain_loss" in hist
    assert hist["best_epoch"] == int(np.argmax(hist["val_tnr_at_target"])) + 1
    p = predict_keras(model, te.inputs())
    assert roc_auc(te.labels, p) > 0.85  # still a real/bogus model
    # the domain head's reversed gradient reached the shared layers
    assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), base.get_weights()))


def test_adapt_packets_obey_the_real_data_rule(tmp_path, capsys):
    from nightsift.engine.cli import main

    drb = tmp_path / "data" / "ztf" / "alerts_drb"  # the rule goes by the set's folder, not its content
    drb.mkdir(parents=True)
    rc = main(["train", "--units", "3", "--data", str(tmp_path / "d"), "--adapt-packets", str(drb)])
    assert rc == 2
    assert "measurement set 'ztf/alerts_drb' must not touch training" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before any dataset was built
    ok = tmp_path / "data" / "ztf" / "alerts"
    ok.mkdir(parents=True)
    assert main(["train", "--units", "3", "--data", str(tmp_path / "d"), "--adapt-packets", str(ok),
                 "--adapt-weight", "0"]) == 2
    assert "--adapt-weight must be > 0" in capsys.readouterr().err


def test_adapt_rows_list_every_packet():
    from nightsift.engine.classify.adapt import ADAPT_KIND, adapt_rows

    if not (SHARED / "ztf" / "alerts").exists():
        pytest.skip("../shared/data/ztf/alerts not present (the shared real data beside the clone)")
    rows = adapt_rows(SHARED / "ztf" / "alerts")
    assert len(rows) == rows.meta["n_packets"] == len(rows.meta["candids"]) == 499
    assert set(rows.truth["kind"]) == {ADAPT_KIND} and rows.z.shape[1:] == (63, 63, 3)
    assert set(rows.domain["instrument"]) == {"ztf-real"}
    assert np.isfinite(compress(rows.z)).all()  # NaN pixels (off the CCD) enter as 0, as the scorer has them
