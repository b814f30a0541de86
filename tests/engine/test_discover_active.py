"""Active learning: expert labels as training rows, `nightsift train --with-labels`, the queue's batch
selection and the labeled-vs-random batch evaluation loop."""
from __future__ import annotations

import numpy as np
import pytest

from nightsift.engine.discover.active import labeled_dataset, select_batch
from nightsift.engine.discover.app import priority
from nightsift.engine.discover.labels import LabelStore

from .test_discover_label import _write_alerts


@pytest.fixture
def labeled(tmp_path):
    alerts = _write_alerts(tmp_path / "alerts" / "visit00000003_ccd001.avro")
    db = tmp_path / "labels.sqlite"
    s = LabelStore(db)
    cid = [int(a["candid"]) for a in alerts]
    s.add(cid[0], "real", user="a")
    s.add(cid[1], "bogus", user="a")
    s.add(cid[1], "real", user="b")  # relabelled: the latest counts
    s.add(cid[2], "interesting", user="a")
    s.add(cid[3], "bogus", user="a")
    s.add(999, "real", user="a")  # no such alert
    return tmp_path, alerts, db


def test_labeled_dataset_rows(labeled):
    from nightsift.engine.io.avro import cutout_to_array

    tmp, alerts, db = labeled
    data, counts = labeled_dataset(db, tmp / "alerts")
    assert counts == {"n_labels": 5, "n_used": 3, "n_interesting_skipped": 1, "n_missing_alert": 1}
    assert data.labels.tolist() == [1.0, 1.0, 0.0]
    assert set(data.domain["split"]) == {"train"} and set(data.domain["instrument"]) == {"expert"}
    # the triplet is the packet's cutouts, standardised like the simulated training data
    x = data.loc[0] + data.scale[0] * data.z[0].astype(np.float32)
    want = cutout_to_array(alerts[0]["cutoutDifference"])
    np.testing.assert_allclose(x[..., 2], want, rtol=2e-3, atol=2e-3 * data.scale[0, 2])
    assert data.features["xpos"][0] == pytest.approx(alerts[0]["candidate"]["xpos"] - 1.0)
    assert data.features["isdiffpos"][0]
    assert data.inputs().shape == (3, 63, 63, 3)
    data2, counts2 = labeled_dataset(db, tmp / "alerts", interesting="real")
    assert counts2["n_used"] == 4 and data2.labels.tolist() == [1.0, 1.0, 1.0, 0.0]
    both = data.append(data2)
    assert len(both) == 7 and both.meta == data.meta


def test_labeled_dataset_nothing_usable(tmp_path):
    from nightsift.engine.errors import InputError

    _write_alerts(tmp_path / "a.avro")
    LabelStore(tmp_path / "l.sqlite").add(1, "real", user="x")
    with pytest.raises(InputError, match="no usable expert label"):
        labeled_dataset(tmp_path / "l.sqlite", tmp_path / "a.avro")


def test_select_batch_is_the_queue_order():
    rng = np.random.default_rng(3)
    rb, an = rng.random(200), rng.random(200)
    idx = select_batch(rb, an, threshold=0.3, size=20)
    p, _, _ = priority(rb, an, threshold=0.3)
    assert len(idx) == 20 and len(set(idx)) == 20
    assert p[idx].min() >= np.sort(p)[-20]
    np.testing.assert_array_equal(select_batch(rb, an, threshold=0.3, size=20, weight=1.0),
                                  np.argsort(np.abs(rb - 0.3), kind="stable")[:20])


def test_cli_train_with_labels_passes_expert_rows(labeled, monkeypatch):
    """`nightsift train --with-labels DB --label-alerts DIR` hands the expert rows to run_training."""
    import nightsift.engine.classify.train as train_mod
    from nightsift.engine.cli import main

    tmp, _, db = labeled
    seen = {}

    def fake_run_training(**kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(train_mod, "run_training", fake_run_training)
    assert main(["train", "--with-labels", str(db), "--label-alerts", str(tmp / "alerts"), "--out", str(tmp / "m"),
                 "--quiet"]) == 0
    extra = seen["extra_train"]
    assert len(extra) == 3 and extra.labels.sum() == 2
    assert "--with-labels" in seen["command"]
    assert main(["train", "--with-labels", str(db), "--out", str(tmp / "m"), "--quiet"]) == 2  # needs --label-alerts


TINY_SPEC = dict(n_units=6, profiles=("ztf",), size=256, transients=(30, 40), seed=41, val_fraction=0.2,
                 test_fraction=0.2)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """One small simulated dataset for the slow tests (built once; run_training finds it cached)."""
    pytest.importorskip("keras")
    from nightsift.engine.classify.dataset import DatasetSpec, build_dataset, load_dataset

    d = tmp_path_factory.mktemp("active-data")
    spec = DatasetSpec(**TINY_SPEC)
    return spec, d, load_dataset(build_dataset(d, spec, progress=False))


@pytest.mark.slow
def test_run_training_adds_extra_rows(labeled, tiny_data, monkeypatch):
    """run_training(extra_train=...) trains on the training split plus the extra rows, and the model
    metadata lists the candids of those real packets (the real-data kit drops them from its figures)."""
    import json

    import nightsift.engine.classify.train as train_mod
    from nightsift.engine.classify.realeval import TRAINING_CANDIDS_KEY

    tmp, alerts, db = labeled
    spec, data_dir, data = tiny_data
    extra, _ = labeled_dataset(db, tmp / "alerts")
    got = {}
    real_train_model = train_mod.train_model

    def one_epoch(train, val, **kw):
        got["train"] = train
        return real_train_model(train, val, **(kw | {"epochs": 1}))

    monkeypatch.setattr(train_mod, "train_model", one_epoch)
    train_mod.run_training(spec=spec, data_dir=data_dir, out_dir=tmp / "m", extra_train=extra, progress=False,
                           name="with_labels")
    tr = got["train"]
    assert len(tr) == len(data.split("train")) + 3
    assert (tr.domain["instrument"] == "expert").sum() == 3
    meta = json.loads((tmp / "m" / "with_labels.json").read_text())
    assert meta[TRAINING_CANDIDS_KEY] == sorted(extra.meta["candids"])
    assert len(meta[TRAINING_CANDIDS_KEY]) == 3 and set(meta[TRAINING_CANDIDS_KEY]) <= {int(a["candid"]) for a in alerts}


def _metrics_oracle(model, val, test, target_fnr):
    """Test metrics of a Keras model written out from their definitions (brute force, no nightsift
    code): threshold = the lowest validation real score that leaves at most ``floor(target_fnr *
    n_real)`` real scores below it; AUCPR = mean over real examples of the precision among the
    candidates scoring at least as high; ROC AUC = Mann-Whitney U / (n_real n_bogus)."""
    from scipy.stats import mannwhitneyu

    def scores(d):
        return np.asarray(model.predict(d.inputs().astype(np.float32), batch_size=512, verbose=0),
                          np.float64).reshape(-1)

    yv, pv = val.labels.astype(bool), scores(val)
    thr = np.sort(pv[yv])[int(np.floor(target_fnr * yv.sum() + 1e-9))]
    y, p = test.labels.astype(bool), scores(test)
    ap = np.mean([(y & (p >= p[i])).sum() / (p >= p[i]).sum() for i in np.flatnonzero(y)])
    auc = mannwhitneyu(p[y], p[~y]).statistic / (y.sum() * (~y).sum())
    return {"aucpr": ap, "roc_auc": auc, "fnr": np.mean(p[y] < thr), "fpr": np.mean(p[~y] >= thr),
            "threshold": thr}


@pytest.mark.slow
def test_active_learning_loop_tiny(tmp_path, tiny_data, monkeypatch):
    """The loop's report against what it trained: the batches it added (their real fraction, drawn
    from the pool, not the initial set) and each model's test metrics recomputed from scratch."""
    import json

    import nightsift.engine.classify.train as train_mod
    from nightsift.engine.discover.active import run_active_learning

    _, _, data = tiny_data
    trained = []  # (training rows, model) of every train_model call, in order

    def recording_train_model(train, val, **kw):
        model, hist = real_train_model(train, val, **kw)
        trained.append((train, model))
        return model, hist

    real_train_model = train_mod.train_model
    monkeypatch.setattr(train_mod, "train_model", recording_train_model)
    rep = run_active_learning(data=data, out_dir=tmp_path / "out", initial_fraction=0.5, batch_size=15, seeds=(0,),
                              epochs=1, model_kwargs={"filters": (4, 8), "dense": 16}, threads=2)
    r = rep["runs"][0]
    n_train = len(data.split("train"))
    assert r["n_initial"] + r["n_pool"] == n_train and r["batch_size"] == 15
    # three models: the initial set, then the initial set plus the queue's batch, plus the random batch
    assert [len(t) for t, _ in trained] == [r["n_initial"], r["n_initial"] + 15, r["n_initial"] + 15]
    initial = trained[0][0]
    init_units = set(initial.domain["unit"].tolist())
    assert len(init_units) == round(0.5 * len(np.unique(data.split("train").domain["unit"])))
    for name, (rows, _) in zip(("queue", "random"), trained[1:]):
        np.testing.assert_array_equal(rows.z[:len(initial)], initial.z)
        batch = rows.select(np.arange(len(initial), len(rows)))
        assert not init_units & set(batch.domain["unit"].tolist())  # drawn from the pool
        assert r[f"{name}_batch_real_fraction"] == batch.labels.mean()
    val, test = data.split("val"), data.split("test")
    for name, (_, model) in zip(("initial", "initial+queue", "initial+random"), trained):
        want = _metrics_oracle(model, val, test, rep["target_fnr"])
        for k, v in want.items():
            assert r[name][k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), (name, k)
    for m in ("aucpr", "roc_auc", "fnr", "fpr"):
        g = rep["gain"][m]
        assert g["queue_minus_random_mean"] == pytest.approx(r["initial+queue"][m] - r["initial+random"][m])
        assert g["queue_minus_initial_mean"] == pytest.approx(r["initial+queue"][m] - r["initial"][m])
        assert g["random_minus_initial_mean"] == pytest.approx(r["initial+random"][m] - r["initial"][m])
        assert np.isnan(g["queue_minus_random_sd"])  # one seed: no spread
    assert json.loads((tmp_path / "out" / "active_learning.json").read_text())["runs"][0]["seed"] == 0
