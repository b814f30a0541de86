"""Anomaly scores: the numpy isolation forest and kNN against slow oracles, the model file, features."""
from __future__ import annotations

import numpy as np
import pytest

from nightsift.engine.discover.anomaly import (
    FEATURES, IsolationForest, average_path_length, candidate_features, fit_anomaly, load_anomaly, save_anomaly,
)


def test_average_path_length():
    np.testing.assert_allclose(average_path_length([1, 2, 3]), [0.0, 1.0, 2 * (np.log(2) + np.euler_gamma) - 4 / 3])
    # c(n) ~ 2 ln n for large n, and c(psi) is the normaliser of the score
    assert abs(average_path_length(256) - (2 * (np.log(255) + np.euler_gamma) - 2 * 255 / 256)) < 1e-12


def _slow_path_length(forest: IsolationForest, tree: int, x: np.ndarray) -> float:
    """The oracle: walk one tree node by node for one point."""
    node = int(forest.roots[tree])
    while forest.feature[node] >= 0:
        node = int(forest.left[node] if x[forest.feature[node]] < forest.threshold[node] else forest.right[node])
    return float(forest.depth[node]) + float(average_path_length(forest.size[node]))


def test_isolation_forest_matches_slow_walk(rng):
    x = rng.normal(size=(500, 4))
    f = IsolationForest.fit(x, n_trees=7, subsample=64, seed=3)
    q = np.vstack([rng.normal(size=(30, 4)), rng.normal(size=(5, 4)) * 5])
    fast = f.path_lengths(q)
    slow = np.array([[_slow_path_length(f, t, p) for t in range(7)] for p in q])
    np.testing.assert_allclose(fast, slow)
    # each tree holds every subsample point in exactly one leaf
    for t, root in enumerate(f.roots):
        end = f.roots[t + 1] if t + 1 < len(f.roots) else len(f.feature)
        leaves = (f.feature[root:end] < 0)
        assert f.size[root:end][leaves].sum() == 64
    assert f.depth.max() <= np.ceil(np.log2(64))


def test_isolation_forest_ranks_outliers(rng):
    x = rng.normal(size=(2000, 6))
    f = IsolationForest.fit(x, n_trees=100, subsample=256, seed=0)
    inl = rng.normal(size=(400, 6))
    out = rng.normal(size=(20, 6)) + 5.0
    s = f.score(np.vstack([inl, out]))
    assert ((s > 0) & (s < 1)).all()
    assert np.median(s[:400]) < 0.5 < np.median(s[400:])
    assert (np.argsort(-s)[:20] >= 400).mean() == 1.0
    # deterministic for a seed, different for another
    g = IsolationForest.fit(x, n_trees=100, subsample=256, seed=0)
    np.testing.assert_array_equal(g.score(inl), f.score(inl))
    assert not np.array_equal(IsolationForest.fit(x, n_trees=100, seed=1).score(inl), f.score(inl))


def test_isolation_forest_weights_choose_columns(rng):
    x = rng.normal(size=(300, 3))
    f = IsolationForest.fit(x, n_trees=20, subsample=64, seed=0, weights=[1.0, 0.0, 0.0])
    assert set(np.unique(f.feature)) <= {-1, 0}
    with pytest.raises(ValueError, match="weights"):
        IsolationForest.fit(x, weights=[1.0, 1.0])


def test_isolation_forest_input_checks():
    with pytest.raises(ValueError, match="finite"):
        IsolationForest.fit(np.array([[0.0], [np.nan], [1.0]]))
    with pytest.raises(ValueError, match="n >= 2"):
        IsolationForest.fit(np.zeros((1, 3)))


def test_knn_score_equals_brute_force(rng):
    emb = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    feat = np.column_stack([rng.normal(size=(300, 6)), rng.integers(0, 2, 300)])
    m = fit_anomaly(emb, feat, method="knn", n_components=5, k=7)
    qe, qf = rng.normal(size=(25, 12)), np.column_stack([rng.normal(size=(25, 6)), rng.integers(0, 2, 25)])
    z_ref, z_q = m.transform(emb, feat), m.transform(qe, qf)
    w = np.sqrt(m.column_weight) / m.space_scale
    d = np.sqrt((((z_q[:, None, :] - z_ref[None, :, :]) * w) ** 2).sum(-1))
    want = np.sort(d, axis=1)[:, :7].mean(axis=1)
    np.testing.assert_allclose(m.score(qe, qf), want, rtol=1e-10)
    # balanced blocks: the 5 embedding columns share half the weight, the 7 features the other half
    np.testing.assert_allclose(m.column_weight, np.r_[np.full(5, 0.1), np.full(7, 0.5 / 7)])


def test_fit_anomaly_pca_and_missing_features(rng):
    emb = rng.normal(size=(200, 20))
    emb[:, 3] = 1.0  # a dead ReLU unit: constant
    feat = rng.normal(size=(200, len(FEATURES)))
    m = fit_anomaly(emb, feat, n_components=4, n_trees=20)
    c = m.components
    assert c.shape == (20, 4)
    np.testing.assert_allclose(c.T @ c, np.eye(4), atol=1e-10)
    f = feat[:3].copy()
    f[0, 1] = np.nan
    z = m.transform(emb[:3], f)
    assert np.isfinite(z).all()
    assert z[0, 4 + 1] == pytest.approx(0.0)  # a missing feature sits at the reference median
    from nightsift.engine.errors import InputError

    with pytest.raises(InputError, match="embedding"):
        m.score(None, feat[:2])
    with pytest.raises(InputError, match=r"\(n, 20\)"):
        m.score(emb[:2, :5], feat[:2])


def test_save_load_roundtrip(tmp_path, rng):
    emb, feat = rng.normal(size=(150, 8)), rng.normal(size=(150, len(FEATURES)))
    for method in ("iforest", "knn"):
        m = fit_anomaly(emb, feat, method=method, n_components=3, n_trees=30, meta={"rb_model": "x.keras"})
        p = save_anomaly(m, tmp_path / f"{method}.npz")
        back = load_anomaly(p)
        assert back.method == method and back.meta["rb_model"] == "x.keras"
        np.testing.assert_array_equal(back.score(emb[:20], feat[:20]), m.score(emb[:20], feat[:20]))
        with np.load(p, allow_pickle=False) as f:  # nothing in the file needs pickle
            assert all(f[k].dtype != object for k in f.files)
    from nightsift.engine.errors import InputError

    with pytest.raises(InputError, match="not found"):
        load_anomaly(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "something else"}'))
    with pytest.raises(InputError, match="other.npz"):
        load_anomaly(tmp_path / "other.npz")


def test_candidate_features_table_and_packets():
    from nightsift.engine.records import empty_candidates

    c = empty_candidates(3)
    c["snr"] = [10.0, 100.0, 5.0]
    c["fwhm"] = [3.0, -999.0, 4.0]
    c["elong"] = [1.2, 1.0, 0.0]
    c["scorr"] = [-10.0, 50.0, 6.0]
    c["nbad"] = [0, 2, 0]
    c["distnr"] = [0.5, -999.0, 9.0]
    c["isdiffpos"] = [False, True, True]
    a = candidate_features(c)
    packets = [{"snr": 10.0, "fwhm": 3.0, "elong": 1.2, "scorr": -10.0, "nbad": 0, "distnr": 0.5, "isdiffpos": "f"},
               {"snr": 100.0, "fwhm": None, "elong": 1.0, "scorr": 50.0, "nbad": 2, "distnr": None, "isdiffpos": "t"},
               {"snr": 5.0, "fwhm": 4.0, "elong": 0.0, "scorr": 6.0, "nbad": 0, "distnr": 9.0, "isdiffpos": "t"}]
    b = candidate_features(packets)
    np.testing.assert_allclose(a, b, equal_nan=True)
    np.testing.assert_allclose(a[:, 0], [1, 2, np.log10(5)])
    assert np.isnan(a[1, 1]) and np.isnan(a[2, 2])  # unmeasured fwhm, elong
    np.testing.assert_allclose(a[:, 5], np.log10(1 + np.array([0.5, 100, 9])))
    np.testing.assert_allclose(a[:, 6], [0, 1, 1])


def test_annotate_alerts_features_only(tmp_path, rng):
    from nightsift.engine.cli import main
    from nightsift.engine.io.avro import read_alerts

    from .test_discover_label import _write_alerts

    alerts = _write_alerts(tmp_path / "a" / "visit00000003_ccd001.avro")
    m = fit_anomaly(None, rng.normal(size=(300, len(FEATURES))) + [1.3, 3.5, 1.1, 1.0, 0.0, 2.0, 0.5])
    save_anomaly(m, tmp_path / "an.npz")
    assert main(["anomaly", str(tmp_path / "a"), "--model", str(tmp_path / "an.npz")]) == 0
    back = read_alerts(tmp_path / "a" / "visit00000003_ccd001.avro")
    want = m.score(None, candidate_features([a["candidate"] for a in alerts]))
    np.testing.assert_allclose([a["candidate"]["anomaly_score"] for a in back], want, rtol=1e-6)  # float32 field
    assert [a["candid"] for a in back] == [a["candid"] for a in alerts]


@pytest.mark.slow
def test_annotate_alerts_with_embedding_checks_the_cnn(tmp_path, rng):
    pytest.importorskip("keras")
    from nightsift.engine.classify.model import build_model, embedding_model, save_keras_model
    from nightsift.engine.classify.preprocess import preprocess
    from nightsift.engine.discover.anomaly import annotate_alerts
    from nightsift.engine.io.atomic import file_sha256
    from nightsift.engine.errors import InputError
    from nightsift.engine.io.avro import cutout_to_array, read_alerts

    from .test_discover_label import _write_alerts

    alerts = _write_alerts(tmp_path / "a.avro")
    cnn = build_model(filters=(4, 8), dense=16, seed=1)
    path = save_keras_model(cnn, tmp_path / "rb.keras")
    ref = preprocess(rng.normal(0, 10, (40, 63, 63, 3)).astype(np.float32))
    em = embedding_model(cnn)
    emb_ref = em.predict(ref, verbose=0)
    m = fit_anomaly(emb_ref, rng.normal(size=(40, len(FEATURES))), n_components=3,
                    meta={"rb_model": str(path), "rb_model_sha256": file_sha256(path)})
    r = annotate_alerts(tmp_path / "a.avro", m)
    assert r["n_alerts"] == len(alerts)
    trip = np.stack([np.stack([cutout_to_array(a[k]) for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")],
                              axis=-1) for a in alerts])
    want = m.score(em.predict(preprocess(trip), verbose=0), candidate_features([a["candidate"] for a in alerts]))
    got = [a["candidate"]["anomaly_score"] for a in read_alerts(tmp_path / "a.avro")]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    other = save_keras_model(build_model(filters=(4, 8), dense=16, seed=2), tmp_path / "other.keras")
    with pytest.raises(InputError, match="not the CNN"):
        annotate_alerts(tmp_path / "a.avro", m, rb_model=other)
