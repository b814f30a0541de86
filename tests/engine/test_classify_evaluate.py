"""Real/bogus metrics against brute force, the FNR threshold, breakdowns and plots; the layers of classify/."""
from __future__ import annotations

import numpy as np
import pytest

from nightsift.engine.classify.dataset import DOMAIN_DTYPE, TRUTH_DTYPE
from nightsift.engine.classify.metrics import (
    average_precision, operating_point, pr_curve, report, roc_auc, threshold_for_fnr,
)
from nightsift.engine.classify.reports import plot_report, write_json


def _scores(rng, n=400, ties=False):
    y = rng.uniform(size=n) < 0.35
    p = np.clip(rng.normal(np.where(y, 0.7, 0.35), 0.2), 0, 1)
    if ties:
        p = np.round(p, 1)
    return y, p


def _ap_brute(y, p):
    # precision at each distinct threshold times the recall gained there
    total = 0.0
    prev_r = 0.0
    for t in np.sort(np.unique(p))[::-1]:
        pred = p >= t
        tp = (pred & y).sum()
        r = tp / y.sum()
        total += (r - prev_r) * tp / pred.sum()
        prev_r = r
    return total


def _auc_brute(y, p):
    a, b = p[y], p[~y]
    return ((a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()) / (len(a) * len(b))


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_brute_force(rng, ties):
    y, p = _scores(rng, ties=ties)
    assert average_precision(y, p) == pytest.approx(_ap_brute(y, p), abs=1e-12)
    assert roc_auc(y, p) == pytest.approx(_auc_brute(y, p), abs=1e-12)


def test_metric_limits(rng):
    y = np.r_[np.ones(10, bool), np.zeros(30, bool)]
    assert average_precision(y, y * 0.9 + 0.05) == 1.0
    assert roc_auc(y, y * 0.9 + 0.05) == 1.0
    assert roc_auc(y, np.full(40, 0.5)) == 0.5
    assert average_precision(y, np.full(40, 0.5)) == pytest.approx(0.25)
    assert np.isnan(average_precision(np.zeros(5), np.arange(5.0)))
    assert np.isnan(roc_auc(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="length"):
        roc_auc(y[:3], np.arange(4.0))
    with pytest.raises(ValueError, match="finite"):
        average_precision(y, np.full(40, np.nan))


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
def test_threshold_for_fnr_is_the_highest_meeting_the_target(rng, target):
    y, p = _scores(rng, n=1000, ties=True)
    t = threshold_for_fnr(y, p, target)
    op = operating_point(y, p, t)
    assert op["fnr"] <= target + 1e-12
    higher = np.unique(p[p > t])
    if len(higher):  # any higher threshold misses more than the target
        assert operating_point(y, p, higher[0])["fnr"] > target
    with pytest.raises(ValueError, match="no real"):
        threshold_for_fnr(np.zeros(5), np.arange(5.0), 0.01)


def test_threshold_confidence_bounds_the_fnr_on_new_data(rng):
    """Real scores uniform on [0, 1] make the true FNR of a threshold t equal to t. The point rule
    (confidence 0) lands above a 1% target about half the time; the Clopper-Pearson rule at 90%
    keeps it at or below the target in >= 90% of draws, and is the highest threshold that does."""
    from scipy.stats import beta

    n, target = 2000, 0.01
    draws = [rng.uniform(size=n) for _ in range(400)]
    ones = np.ones(n, bool)
    point = np.array([threshold_for_fnr(ones, p, target) for p in draws])
    safe = np.array([threshold_for_fnr(ones, p, target, confidence=0.9) for p in draws])
    assert 0.3 < np.mean(point <= target) < 0.7
    assert np.mean(safe <= target) >= 0.88
    assert np.all(safe <= point)
    p = draws[0]
    t = threshold_for_fnr(ones, p, target, confidence=0.9)
    m = int(np.sum(p < t))  # misses at the threshold, and one more just above it
    assert beta.ppf(0.9, m + 1, n - m) <= target < beta.ppf(0.9, m + 2, n - m - 1)
    # too few real examples for any bound under the target: the lowest real score
    assert threshold_for_fnr(np.ones(20, bool), np.arange(20.0), target, confidence=0.9) == 0.0
    with pytest.raises(ValueError, match="confidence"):
        threshold_for_fnr(ones, p, target, confidence=1.0)


def test_operating_point_counts(rng):
    y, p = _scores(rng)
    op = operating_point(y, p, 0.5)
    pred = p >= 0.5
    assert (op["tp"], op["fp"], op["fn"], op["tn"]) == ((pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum(),
                                                      (~pred & ~y).sum())
    assert op["fnr"] == pytest.approx(1 - op["recall"])
    assert op["fpr"] == pytest.approx(op["fp"] / (op["fp"] + op["tn"]))


def test_report_breakdowns_and_files(rng, tmp_path):
    y, p = _scores(rng, n=300)
    dom = np.zeros(300, DOMAIN_DTYPE)
    dom["instrument"] = np.where(np.arange(300) % 2, "decam", "ztf")
    dom["ccd"] = np.arange(300) % 3
    dom["filter"] = "r"
    dom["fwhm_px"] = np.where(np.arange(300) % 3 == 0, 2.5, 4.5)
    truth = np.zeros(300, TRUTH_DTYPE)
    truth["label"] = y
    truth["kind"] = np.where(y, "isolated", "star")
    r = report(y, p, 0.5, domain=dom, truth=truth)
    assert set(r["per_instrument"]) == {"decam", "ztf"}
    assert len(r["per_ccd"]) == 6 and "decam:1" in r["per_ccd"]
    assert set(r["per_seeing_bin"]) == {"2-3px", "4-6px"}
    assert set(r["per_filter"]) == {"decam:r", "ztf:r"}
    assert r["per_kind"]["isolated"]["n_bogus"] == 0
    n = sum(v["n"] for v in r["per_instrument"].values())
    assert n == 300 == r["overall"]["n"]
    paths = plot_report(y, p, 0.5, tmp_path, prefix="x_")
    assert [q.name for q in paths] == ["x_pr_curve.png", "x_score_hist.png", "x_confusion.png"]
    assert all(q.stat().st_size > 1000 for q in paths)
    j = write_json(tmp_path / "r.json", r)
    import json

    back = json.loads(j.read_text())
    assert back["overall"]["n"] == 300 and back["per_kind"]["isolated"]["fpr"] is None  # NaN -> null


def test_pr_curve_is_the_curve_average_precision_sums(rng):
    y, p = _scores(rng, ties=True)
    rec, prec = pr_curve(y, p)
    assert rec[0] == 0.0 and rec[-1] == 1.0 and np.all(np.diff(rec) >= 0)
    assert np.sum(np.diff(rec) * prec[1:]) == pytest.approx(average_precision(y, p), abs=1e-12)


def test_metrics_are_a_layer_below_the_drivers():
    """metrics imports no driver, model or plotting library; train and evaluate import each other
    at most one way (evaluate -> train), read from their imports, lazy ones included."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import nightsift.engine.classify as pkg

    code = ("import sys, nightsift.engine.classify.metrics as m, nightsift.engine.classify.reports as r; "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'matplotlib', "
            "'ai_edge_litert') or k.startswith('nightsift.engine.classify.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert ast.literal_eval(out) == ["nightsift.engine.classify.metrics", "nightsift.engine.classify.reports"]
    folder = Path(pkg.__file__).parent

    def imports(name):
        tree = ast.parse((folder / f"{name}.py").read_text())
        return {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1
                and n.module}

    assert imports("metrics") == set()
    assert imports("reports") == {"metrics"}
    assert "evaluate" not in imports("train") and "train" in imports("evaluate")
