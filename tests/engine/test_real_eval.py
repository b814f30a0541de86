"""The real-data evaluation kit (`nightsift evaluate --real`): populations and their figures on a
hand-built set with known scores, the reliability curve against a direct computation, the CLI on
the real ZTF drb and Rubin folders, and the real-data rule (a listed training candid is dropped;
a measurement set refused for training).

The figures measured on the real packets are measurements, not targets: the asserts check what
must hold whatever the model.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nightsift.engine.classify.metrics import binomial_ci, paired_auc_difference, reliability_curve, roc_auc
from nightsift.engine.classify.realeval import (
    MEASUREMENT_SETS, TRAINING_CANDIDS_KEY, drop_trained, population_metrics, populations, real_figures,
    refuse_measurement_sets, training_candids,
)
from nightsift.engine.errors import InputError

from ..conftest import shared_data


def _ztf(candid, own, *, distnr=5.0, magnr=19.0, sign="t", nid=1, jd=2458000.5):
    return {"survey": "ztf", "candid": candid, "own_score_name": "drb", "own_score": own, "distnr": distnr,
            "magnr": magnr, "isdiffpos": sign, "nid": nid, "jd": jd}


def _pairs_auc(real, bogus):
    """P(real score > bogus score), ties 1/2: the definition, pair by pair."""
    return np.mean([1.0 if r > b else 0.5 if r == b else 0.0 for r in real for b in bogus])


# ----------------------------------------------------------------------------- populations

def test_populations_exact_on_hand_built_records():
    recs = [_ztf(1, 0.9, distnr=0.5, magnr=16.0),            # bright
            _ztf(2, 0.9, distnr=1.0, magnr=16.0),            # distnr not < 1": not bright
            _ztf(3, 0.1, distnr=0.5, magnr=17.0),            # magnr not < 17: not bright
            _ztf(4, 0.1, distnr=None, magnr=15.0, sign="f"),  # unknown
            _ztf(5, 0.2, distnr=-999.0, magnr=-999.0, sign="f", nid=2, jd=2458001.5)]  # ZTF's "none": unknown
    tmpl = np.random.default_rng(0).normal(0, 1, (2, 63, 63))
    tmpl[0, 31, 32] = 150.0  # a template peak 1 px from the source at ~150 sigma: bright
    tmpl[1, 31, 31] = 50.0
    trips = np.zeros((7, 63, 63, 3), np.float32)
    trips[5:, :, :, 1] = tmpl
    recs += [{"survey": "rubin", "candid": 6, "own_score_name": "reliability", "own_score": 0.9, "isdiffpos": "t",
              "visit": 7}, {"survey": "rubin", "candid": 7, "own_score_name": "reliability", "own_score": 0.3,
                            "isdiffpos": "f", "visit": 8}]
    p = populations(recs, trips)
    assert p["bright_star"] == ["bright", "not bright", "not bright", "unknown", "unknown", "bright", "not bright"]
    assert p["sign"] == ["positive"] * 3 + ["negative"] * 2 + ["positive", "negative"]
    assert p["exposure"][:5] == ["nid 1 jd 2458000.50000"] * 4 + ["nid 2 jd 2458001.50000"]
    assert p["exposure"][5:] == ["visit 7", "visit 8"]
    assert recs[5]["template_snr"] == pytest.approx(150.0, rel=0.05) and recs[6]["template_snr"] < 100


def test_science_dip_population_flags_a_hole_below_the_sky():
    """A science cutout that dips below the sky at the source (no fading source does that) is
    flagged; a source, plain sky, or a cutout without noise is not."""
    from nightsift.engine.classify.realeval import SCIENCE_DIP_SIGMA, science_dip_snr

    rng = np.random.default_rng(4)
    sky = rng.normal(100.0, 2.0, (4, 63, 63))
    yy, xx = np.mgrid[:63, :63] - 31
    g = np.exp(-(xx ** 2 + yy ** 2) / (2 * 1.5 ** 2))
    sky[0] -= 4.0 * g  # a hole: box mean ~ -1.4 per px, noise of the mean 0.4: ~ -3.5 sigma, not enough
    sky[1] -= 10.0 * g  # ~ -9 sigma: a dip
    sky[2] += 30.0 * g  # a source
    trips = np.zeros((5, 63, 63, 3), np.float32)
    trips[:4, :, :, 0] = sky
    recs = [_ztf(i, 0.9) for i in range(5)]
    p = populations(recs, trips)
    assert p["science_dip"] == ["no dip", "dip", "no dip", "no dip", "unknown"]
    assert science_dip_snr(sky[1]) < -SCIENCE_DIP_SIGMA < science_dip_snr(sky[0]) < 0 < science_dip_snr(sky[2])
    assert populations(recs)["science_dip"] == ["unknown"] * 5  # no triplets: unknown


def test_population_figures_exact_on_known_scores():
    """Two exposures, real and bogus own scores, known nightsift scores: every figure by hand."""
    own = [0.9, 0.8, 0.7, 0.2, 0.1, 0.95, 0.6, 0.3, 0.55]
    ns = np.array([0.9, 0.3, 0.6, 0.5, 0.1, 0.2, 0.8, 0.7, 0.4])
    sign = ["t", "t", "f", "t", "f", "f", "t", "t", "f"]
    nid = [1, 1, 1, 1, 1, 2, 2, 2, 2]
    recs = [_ztf(i, o, sign=s, nid=n, jd=2458000.5 + n) for i, (o, s, n) in enumerate(zip(own, sign, nid))]
    g = real_figures(recs, ns, threshold=0.5, n_boot=0)["ztf:drb"]
    real = np.array(own) >= 0.5
    o = g["overall"]
    assert o["n"] == 9 and (o["vs_own"]["n_pos"], o["vs_own"]["n_neg"]) == (6, 3)
    assert o["vs_own"]["roc_auc"] == pytest.approx(_pairs_auc(ns[real], ns[~real]))
    assert o["vs_own"]["roc_auc"] == pytest.approx(11 / 18)  # by hand: 11 of the 18 pairs ordered right
    cb = o["own_real_called_bogus"]  # own-real with ns < 0.5: 0.3, 0.2, 0.4
    assert (cb["n"], cb["k"], cb["fraction"]) == (6, 3, 0.5) and cb["ci95"] == pytest.approx(list(binomial_ci(3, 6)))
    cr = o["own_bogus_called_real"]  # own-bogus (0.2, 0.1, 0.3) with ns >= 0.5: 0.5 (at the threshold), 0.7
    assert (cr["n"], cr["k"], cr["fraction"]) == (3, 2, 2 / 3) and cr["ci95"] == pytest.approx(list(binomial_ci(2, 3)))
    assert o["called_real"] == pytest.approx(5 / 9)  # 0.9, 0.6, 0.5, 0.8, 0.7
    for name, want in (("positive", [0, 1, 3, 6, 7]), ("negative", [2, 4, 5, 8])):
        m = g["populations"]["sign"][name]
        sel = np.array(want)
        assert m["n"] == len(sel)
        assert m["vs_own"]["roc_auc"] == pytest.approx(_pairs_auc(ns[sel][real[sel]], ns[sel][~real[sel]]))
    e1 = g["populations"]["exposure"]["nid 1 jd 2458001.50000"]
    assert e1["vs_own"]["roc_auc"] == pytest.approx(_pairs_auc(ns[:5][real[:5]], ns[:5][~real[:5]]))
    # a one-class population: null figures with the reason, its called-bogus fraction still counted
    m = g["populations"]["bright_star"]["not bright"]
    assert m["n"] == 9
    recs1 = [_ztf(i, 0.9) for i in range(4)]
    m1 = real_figures(recs1, np.array([0.1, 0.6, 0.7, 0.8]), threshold=0.5, n_boot=50)["ztf:drb"]["overall"]
    assert m1["vs_own"]["roc_auc"] is None and m1["vs_own"]["aucpr"] is None
    assert "one class only (4 real, 0 bogus" in m1["vs_own"]["null_reason"]
    assert m1["own_real_called_bogus"]["k"] == 1
    assert m1["own_bogus_called_real"] == {"n": 0, "k": 0, "fraction": None, "ci95": None}


def test_bootstrap_interval_brackets_and_braai_figures():
    rng = np.random.default_rng(1)
    own = rng.uniform(size=200)
    ns = np.clip(own + rng.normal(0, 0.3, 200), 0, 1)
    braai = np.clip(own + rng.normal(0, 0.1, 200), 0, 1)
    braai[:10] = np.nan  # not scored
    m = population_metrics(own, ns, 0.5, braai=braai, n_boot=300, seed=0)
    lo, hi = m["vs_own"]["roc_auc_ci95"]
    assert lo < m["vs_own"]["roc_auc"] < hi and hi - lo < 0.2
    b = m["vs_braai"]
    fb = np.isfinite(braai)
    assert b["n_pos"] + b["n_neg"] == 190
    assert b["roc_auc"] == pytest.approx(_pairs_auc(ns[fb][braai[fb] >= 0.5], ns[fb][braai[fb] < 0.5]))
    assert m["braai_real_called_bogus"]["k"] == int(np.sum(ns[fb][braai[fb] >= 0.5] < 0.5))
    assert m["braai_bogus_called_real"]["k"] == int(np.sum(ns[fb][braai[fb] < 0.5] >= 0.5))
    assert m["braai_bogus_called_real"]["n"] == int(np.sum(braai[fb] < 0.5))


# ----------------------------------------------------------------------------- reliability curve

def test_reliability_curve_against_a_direct_computation():
    rng = np.random.default_rng(3)
    p = np.r_[rng.uniform(size=500), 0.0, 1.0, 0.1, 0.5]  # edges: 0 in the first bin, 1 in the last
    y = rng.uniform(size=len(p)) < p ** 2
    c = reliability_curve(y, p, n_bins=10)
    edges = np.linspace(0, 1, 11)
    count, mean, frac = np.zeros(10), np.zeros(10), np.zeros(10)
    for pi, yi in zip(p, y):
        b = 9 if pi == 1 else next(k for k in range(10) if edges[k] <= pi < edges[k + 1])
        count[b] += 1
        mean[b] += pi
        frac[b] += yi
    np.testing.assert_array_equal(c["count"], count)
    np.testing.assert_allclose(c["mean_score"], mean / count)
    np.testing.assert_allclose(c["fraction_real"], frac / count)
    assert c["ece"] == pytest.approx(np.sum(count * np.abs(frac / count - mean / count)) / len(p))
    assert c["edges"][0] == 0.0 and c["edges"][-1] == 1.0 and sum(c["count"]) == len(p)
    empty = reliability_curve([1, 0], [0.05, 0.07], n_bins=4)
    assert empty["count"] == [2, 0, 0, 0] and np.isnan(empty["mean_score"][1])
    assert empty["ece"] == pytest.approx(abs(0.5 - 0.06))


def test_paired_auc_difference():
    rng = np.random.default_rng(4)
    y = rng.uniform(size=60) < 0.7
    a = rng.uniform(size=60)
    b = np.where(y, a + 0.3, a)  # b ranks every real higher than a does
    d = paired_auc_difference(y, a, b, n_boot=400, seed=1)
    assert d["delta"] == pytest.approx(roc_auc(y, b) - roc_auc(y, a)) and d["delta"] > 0.1
    assert 0 < d["delta_ci95"][0] <= d["delta"] <= d["delta_ci95"][1] and d["p_b_not_better"] == 0.0
    assert (d["n_pos"], d["n_neg"]) == (int(y.sum()), int((~y).sum()))
    same = paired_auc_difference(y, a, a, n_boot=100)
    assert same["delta"] == 0.0 and same["delta_ci95"] == [0.0, 0.0] and same["p_b_not_better"] == 1.0
    flip = paired_auc_difference(y, b, a, n_boot=100)
    assert flip["delta"] == pytest.approx(-d["delta"]) and flip["delta_ci95"][1] < 0
    one = paired_auc_difference(np.ones(5, bool), a[:5], b[:5])
    assert one["delta"] is None and one["delta_ci95"] is None
    # both classes, but the only resample (seed 0 draws rows [1, 1]) holds one: no interval, no NaN
    tiny = paired_auc_difference(np.array([False, True]), np.array([0.2, 0.6]), np.array([0.1, 0.9]), n_boot=1, seed=0)
    assert tiny["delta"] == 0.0 and tiny["delta_ci95"] is None and tiny["p_b_not_better"] is None
    with pytest.raises(ValueError, match="length"):
        paired_auc_difference(y, a[:3], b)


def test_binomial_interval_exact():
    lo, hi = binomial_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = binomial_ci(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    assert all(np.isnan(binomial_ci(0, 0)))


# ----------------------------------------------------------------------------- the real-data rule

def test_training_candids_and_drop():
    assert training_candids({}) == set() and training_candids({TRAINING_CANDIDS_KEY: []}) == set()
    assert training_candids({TRAINING_CANDIDS_KEY: [5, "7"]}) == {5, 7}
    with pytest.raises(InputError, match=TRAINING_CANDIDS_KEY):
        training_candids({TRAINING_CANDIDS_KEY: "123"})
    recs = [{"candid": 5}, {"candid": 6}, {"candid": None}, {"candid": 7}]
    np.testing.assert_array_equal(drop_trained(recs, {5, 7}), [1, 2])


def test_measurement_sets_refused_for_training(tmp_path):
    assert MEASUREMENT_SETS == ("ztf/alerts", "ztf/alerts_drb", "rubin/alerts")
    for s in MEASUREMENT_SETS:
        d = tmp_path / "data" / s
        d.mkdir(parents=True)
        with pytest.raises(InputError, match="must not touch training"):
            refuse_measurement_sets(d)
        with pytest.raises(InputError, match="must not touch training"):
            refuse_measurement_sets([tmp_path, d / "x.avro"])
    refuse_measurement_sets([tmp_path / "data" / "ztf" / "my_labelled", tmp_path / "alerts"])  # others: fine


def test_train_refuses_labels_on_a_measurement_set(tmp_path, capsys):
    from nightsift.engine.cli import main

    d = tmp_path / "data" / "ztf" / "alerts_drb"
    d.mkdir(parents=True)
    rc = main(["train", "--with-labels", str(tmp_path / "labels.sqlite"), "--label-alerts", str(d),
               "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "must not touch training" in err and not (tmp_path / "ds").exists()


# ----------------------------------------------------------------------------- the CLI on real packets

@pytest.fixture
def no_braai(monkeypatch, tmp_path):
    """braai's weights nowhere to be found: `evaluate --real` must not need them."""
    monkeypatch.setenv("NIGHTSIFT_BRAAI_DIR", str(tmp_path / "no-braai-here"))


@pytest.mark.data
@pytest.mark.parametrize("folder, key, n, n_files", [("ztf/alerts_drb", "ztf:drb", 137, 139),  # 2 packets twice
                                                      ("rubin/alerts", "rubin:reliability", 100, 100)])
def test_evaluate_real_writes_json_and_pngs(tmp_path, capsys, no_braai, folder, key, n, n_files):
    pytest.importorskip("ai_edge_litert")
    from nightsift.engine.cli import main

    out = tmp_path / "out"
    assert main(["evaluate", "--real", str(shared_data(folder)), "--out", str(out), "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    assert f"{n} alerts from {n_files} packet files ({n_files - n} skipped, 0 dropped as trained-on)" in text
    assert f"{key}: nightsift vs" in text and "bright_star: bright" in text and "sign: positive" in text
    res = json.loads((out / "real_evaluation.json").read_text())
    g = res["groups"][key]
    assert list(res["groups"]) == [key] and g["n"] == n and res["dropped_trained"] == 0
    for dim in ("bright_star", "sign", "exposure"):  # populations partition the group
        assert sum(m["n"] for m in g["populations"][dim].values()) == n
    for m in [g["overall"], *g["populations"]["sign"].values()]:
        v = m["vs_own"]
        if v["roc_auc"] is None:
            assert v["null_reason"].startswith("one class only")
        else:
            assert v["roc_auc_ci95"][0] <= v["roc_auc"] <= v["roc_auc_ci95"][1]
    assert sum(g["reliability"]["count"]) == g["overall"]["vs_own"]["n_pos"] + g["overall"]["vs_own"]["n_neg"] == n
    for png in ("real_reliability.png", "real_worst.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    print(f"\n{folder}: ROC AUC vs own {g['overall']['vs_own']['roc_auc']:.3f} {g['overall']['vs_own']['roc_auc_ci95']}")


@pytest.mark.data
def test_listed_training_candid_is_dropped_and_all_listed_refused(tmp_path, capsys, no_braai):
    """A model whose metadata lists the candid of a real packet it trained on: that packet is dropped
    (loudly); when every packet is listed, nothing is measured (exit 2, one line)."""
    pytest.importorskip("ai_edge_litert")
    from nightsift.engine.classify.model import MODELS_DIR
    from nightsift.engine.cli import main
    from nightsift.engine.io.packets import read_packets

    files = sorted(shared_data("ztf/alerts_drb").glob("*.avro"))[:4]
    candids = [r["candid"] for r in read_packets(files).records]
    model = tmp_path / "model"
    shutil.copytree(MODELS_DIR, model, ignore=shutil.ignore_patterns("__pycache__"))
    meta_path = model / "nightsift_rb.json"
    meta = json.loads(meta_path.read_text())
    meta[TRAINING_CANDIDS_KEY] = [candids[1]]
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert main(["evaluate", "--real", *map(str, files), "--model", str(meta_path), "--out", str(out),
                 "--bootstrap", "0"]) == 0
    text = capsys.readouterr().out
    assert "warning: 1 of 4 packets DROPPED" in text and "3 alerts from 4 packet files" in text
    res = json.loads((out / "real_evaluation.json").read_text())
    assert res["dropped_trained"] == 1 and res["n"] == 3 and res["groups"]["ztf:drb"]["n"] == 3
    meta[TRAINING_CANDIDS_KEY] = candids
    meta_path.write_text(json.dumps(meta))
    assert main(["evaluate", "--real", *map(str, files), "--model", str(meta_path), "--out", str(tmp_path / "o2"),
                 "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "touched training" in err and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- expert labels

def test_expert_labels_become_the_reference_of_the_packets_they_name(tmp_path):
    from nightsift.engine.classify.realeval import apply_expert_labels
    from nightsift.engine.discover.labels import LabelStore

    db = tmp_path / "labels.sqlite"
    store = LabelStore(db)
    for candid, lab in ((1, "bogus"), (1, "real"), (2, "bogus"), (3, "interesting"), (99, "real")):
        store.add(candid, lab, user="expert")  # the latest label of each candidate counts
    recs = [_ztf(i, 0.3) for i in range(1, 5)]
    counts = apply_expert_labels(recs, db)
    assert counts == {"n_labels": 4, "n_used": 2, "n_interesting_left": 1, "n_not_in_packets": 1}
    assert [(r["own_score_name"], r["own_score"]) for r in recs] == [("expert", 1.0), ("expert", 0.0),
                                                                      ("drb", 0.3), ("drb", 0.3)]
    assert recs[0]["survey_score"] == {"name": "drb", "value": 0.3}
    g = real_figures(recs, np.array([0.9, 0.2, 0.5, 0.5]), threshold=0.5, n_boot=0)
    assert list(g) == ["ztf:expert", "ztf:drb"] and g["ztf:expert"]["overall"]["vs_own"]["roc_auc"] == 1.0
    with pytest.raises(InputError, match="none of the expert labels"):
        apply_expert_labels([_ztf(7, 0.5)], db)
    with pytest.raises(InputError, match="no such label database"):
        apply_expert_labels(recs, tmp_path / "missing.sqlite")


def test_cli_real_with_expert_labels(tmp_path, capsys):
    from nightsift.engine.cli import main
    from nightsift.engine.discover.labels import LabelStore
    from nightsift.engine.io.packets import read_packets

    files = sorted(shared_data("ztf/alerts_drb").glob("*.avro"))[:6]
    candids = [int(r["candid"]) for r in read_packets(files).records]
    store = LabelStore(tmp_path / "labels.sqlite")
    for c, lab in zip(candids, ("real", "bogus", "real", "bogus")):
        store.add(c, lab, user="expert")
    out = tmp_path / "ev"
    assert main(["evaluate", "--real", *map(str, files), "--labels", str(tmp_path / "labels.sqlite"),
                 "--out", str(out), "--bootstrap", "0"]) == 0
    res = json.loads((out / "real_evaluation.json").read_text())
    assert res["expert_labels"]["n_used"] == 4
    e = res["groups"]["ztf:expert"]["overall"]
    assert e["n"] == 4 and (e["vs_own"]["n_pos"], e["vs_own"]["n_neg"]) == (2, 2)
    assert res["groups"]["ztf:drb"]["overall"]["n"] == len(candids) - 4
    assert "expert labels (" in capsys.readouterr().out
