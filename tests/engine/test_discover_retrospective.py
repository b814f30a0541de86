"""Retrospective search: ranking statistics, the anomaly method's margin over random on held-out
nuclear transients, and the whole loop (hold out, retrain, fit, rank) on a tiny simulated dataset."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nightsift.engine.discover.anomaly import fit_anomaly, load_anomaly
from nightsift.engine.discover.retrospective import percentiles, rank_report

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "retro_nuclear_tiny.npz"


def _rank_oracle(scores, target) -> dict:
    """:func:`rank_report` from its definitions, by brute force: a target's percentile is the
    fraction of the other candidates scoring lower (ties half); the recall in the top ``ceil(p n)``
    counts ties against the targets; AUC = Mann-Whitney U / (k (n - k))."""
    from scipy.stats import mannwhitneyu

    s, t = np.asarray(scores, np.float64), np.asarray(target, bool)
    n, k = s.size, int(t.sum())
    pct = [((s < s[i]).sum() + 0.5 * ((s == s[i]).sum() - 1)) / (n - 1) for i in np.flatnonzero(t)]
    ranked = sorted(range(n), key=lambda i: (-s[i], t[i], i))
    out = {"n": n, "n_target": k, "median_percentile": float(np.median(pct)), "mean_percentile": float(np.mean(pct)),
           "auc": mannwhitneyu(s[t], s[~t]).statistic / (k * (n - k))}
    for p, name in ((0.01, "1"), (0.05, "5")):
        recall = sum(t[i] for i in ranked[:math.ceil(p * n)]) / k
        out[f"recall_top_{name}pct"], out[f"lift_top_{name}pct"] = recall, recall / p
    return out


def test_rank_oracle_agrees_on_ties(rng):
    s = rng.integers(0, 5, 300).astype(float)  # many ties
    t = rng.random(300) < 0.1
    assert rank_report(s, t) == pytest.approx(_rank_oracle(s, t), rel=1e-12)


def test_percentiles_with_ties():
    np.testing.assert_allclose(percentiles([1.0, 2.0, 3.0]), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(percentiles([1.0, 1.0, 3.0]), [0.25, 0.25, 1.0])
    assert percentiles([5.0]).tolist() == [0.5]


def test_rank_report_perfect_and_random(rng):
    s = np.arange(1000.0)
    t = s >= 990  # the 10 highest
    r = rank_report(s, t)
    assert r["recall_top_1pct"] == 1.0 and r["recall_top_5pct"] == 1.0 and r["auc"] == 1.0
    assert r["median_percentile"] > 0.99 and r["lift_top_1pct"] == pytest.approx(100.0)
    # ties never favour the targets
    r = rank_report(np.zeros(100), np.arange(100) < 5)
    assert r["recall_top_5pct"] == 0.0 and r["median_percentile"] == pytest.approx(0.5)
    # a random ranking: expectations 0.5 / 0.01 / 0.05
    reps = [rank_report(rng.random(2000), rng.random(2000) < 0.05) for _ in range(100)]
    assert np.mean([x["median_percentile"] for x in reps]) == pytest.approx(0.5, abs=0.02)
    assert np.mean([x["recall_top_5pct"] for x in reps]) == pytest.approx(0.05, abs=0.01)
    assert np.mean([x["auc"] for x in reps]) == pytest.approx(0.5, abs=0.02)


def test_anomaly_method_beats_random_on_held_out_nuclear_transients():
    """Embeddings and features of a retrospective run (a CNN trained without nuclear transients).

    The fixture is ``embeddings.npz`` of::

        nightsift retrospective --data DIR --units 40 --size 256 --profiles ztf --transients 40,60 \\
            --test-fraction 0.3 --data-seed 41 --tiny --epochs 10 --threads 2 --keep-embeddings

    (1668 reference candidates, a held-out night of 923 with 34 nuclear transients). Random
    ranking gives a median percentile of 0.5 (sd ~0.06 for 34 events), recall 0.05 in the top 5 %
    (P(>= 0.2) ~ 0.5 %) and AUC 0.5.
    """
    f = np.load(FIXTURE, allow_pickle=False)
    t = f["target"]
    assert t.sum() == 34 and t.size == 923
    m = fit_anomaly(f["emb_ref"].astype(np.float64), f["feat_ref"])
    r = rank_report(m.score(f["emb_night"].astype(np.float64), f["feat_night"]), t)
    assert r["median_percentile"] >= 0.75, r
    assert r["recall_top_5pct"] >= 0.20, r
    assert r["auc"] >= 0.80, r
    # the isolation forest is weaker here, but still better than random
    r_if = rank_report(fit_anomaly(f["emb_ref"].astype(np.float64), f["feat_ref"], method="iforest")
                       .score(f["emb_night"].astype(np.float64), f["feat_night"]), t)
    assert r_if["median_percentile"] >= 0.6, r_if


@pytest.mark.slow
def test_retrospective_loop_on_tiny_data(tmp_path, capsys):
    pytest.importorskip("keras")
    from nightsift.engine.classify.dataset import DatasetSpec, build_dataset, load_dataset
    from nightsift.engine.cli import main
    from nightsift.engine.discover.retrospective import run_retrospective

    spec = DatasetSpec(n_units=6, profiles=("ztf",), size=256, transients=(40, 60), test_fraction=0.5, seed=41)
    data = load_dataset(build_dataset(tmp_path / "data", spec, progress=False))
    held = (data.truth["label"] == 1) & (data.truth["kind"] == "nuclear")
    if not held[data.domain["split"] == "test"].any():
        pytest.skip("the tiny held-out night drew no nuclear transient")
    rep = run_retrospective(holdout="nuclear", data=data, out_dir=tmp_path / "out", epochs=1,
                            model_kwargs={"filters": (4, 8), "dense": 16}, threads=2, keep_embeddings=True)
    # the held-out kind is out of training entirely
    train_rows = data.domain["split"] == "train"
    assert rep["n_train"] == int((train_rows & ~held).sum())
    assert rep["n_removed_from_training"] == int((held & (data.domain["split"] != "test")).sum())
    assert rep["n_night_target"] == int((held & (data.domain["split"] == "test")).sum())
    # the ranks, recomputed by brute force from what the run saved: its night's rb scores, the
    # features, and the anomaly model with the CNN it was fitted on
    night = data.split("test")
    f = np.load(tmp_path / "out" / "embeddings.npz", allow_pickle=False)
    target = f["target"]
    np.testing.assert_array_equal(target, held[data.domain["split"] == "test"])
    m = load_anomaly(tmp_path / "out" / "anomaly.npz")
    from nightsift.engine.classify.model import load_keras_model
    from nightsift.engine.io.atomic import file_sha256
    from nightsift.engine.discover.retrospective import embed_data

    assert m.meta["rb_model_sha256"] == file_sha256(tmp_path / "out" / "rb_holdout.keras")
    cnn = load_keras_model(tmp_path / "out" / "rb_holdout.keras")
    rb = np.asarray(cnn.predict(night.inputs(), batch_size=512, verbose=0), np.float64).reshape(-1)
    np.testing.assert_allclose(rb, f["rb_night"], rtol=0, atol=1e-6)
    oracle = {"one_minus_rb": 1.0 - f["rb_night"].astype(np.float64),
              "features": fit_anomaly(None, f["feat_ref"]).score(None, f["feat_night"]),
              "anomaly": m.score(embed_data(cnn, night), f["feat_night"])}
    for k, s in oracle.items():
        assert rep["rank"][k] == pytest.approx(_rank_oracle(s, target), rel=1e-12), k
    saved = json.loads((tmp_path / "out" / "retrospective.json").read_text())
    assert saved["rank"] == rep["rank"]
    assert (tmp_path / "out" / "retrospective.png").stat().st_size > 5000
    # the command line on the cached dataset
    assert main(["retrospective", "--data", str(tmp_path / "data"), "--units", "6", "--size", "256", "--profiles",
                 "ztf", "--transients", "40,60", "--test-fraction", "0.5", "--data-seed", "41", "--tiny",
                 "--epochs", "1", "--threads", "2", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "median pct" in out and "random" in out and (tmp_path / "cli" / "retrospective.json").exists()
