"""Cross-domain comparison on real ZTF alerts: the metrics, and the plumbing end to end."""
from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from nightsift.engine.classify.crossdomain import average_precision, roc_auc

from ..conftest import shared_data


def _auc_pairs(y, s):
    """Oracle: fraction of (positive, negative) pairs ordered right, ties one half."""
    pos, neg = s[y], s[~y]
    return np.mean([(p > n) + 0.5 * (p == n) for p, n in product(pos, neg)])


def _ap_thresholds(y, s):
    """Oracle: for every distinct threshold t (high to low), precision/recall of s >= t."""
    ap, prev_r = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        pred = s >= t
        r = (pred & y).sum() / y.sum()
        p = (pred & y).sum() / pred.sum()
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def test_metrics_against_brute_force(rng):
    for _ in range(20):
        n = rng.integers(5, 40)
        y = rng.random(n) < 0.4
        if y.all() or not y.any():
            continue
        s = np.round(rng.random(n) + 0.5 * y, 1)  # coarse: plenty of ties
        assert roc_auc(y, s) == pytest.approx(_auc_pairs(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(_ap_thresholds(y, s), abs=1e-12)
    y = np.array([True, False, True, False])
    assert roc_auc(y, [0.9, 0.1, 0.8, 0.2]) == 1.0 and average_precision(y, [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert roc_auc(y, [0.1, 0.9, 0.2, 0.8]) == 0.0
    assert np.isnan(roc_auc([True, True], [0.1, 0.2])) and np.isnan(average_precision([False], [0.3]))


@pytest.mark.data
def test_score_packets_braai_against_itself(tmp_path):
    """nightsift's scorer set to braai: AUC 1 against braai's own decisions, and braai against rb the
    same as nightsift-as-braai against rb; JSON, CSV and PNG written."""
    pytest.importorskip("keras")
    from nightsift.engine.classify.crossdomain import score_packets
    from nightsift.engine.config import ClassifyConfig

    d = shared_data("ztf")
    res = score_packets(d / "alerts", config=ClassifyConfig(backend="braai", model=str(d / "braai")),
                        braai_model=d / "braai", out_dir=tmp_path, n_worst=2, n_boot=0)
    assert res.n == 499
    m = res.metrics["ztf:rb"]
    assert m["n"] == 499 and m["n_negative"] == 185
    assert m["vs_braai"]["roc_auc"] == 1.0 and m["vs_braai"]["aucpr"] == 1.0
    assert m["vs_braai"]["agreement"] > 0.99  # ZTF's padding vs nightsift's reader: scores differ < 1e-6
    assert 0.5 < m["vs_own"]["roc_auc"] < 1.0
    assert m["vs_own"]["roc_auc"] == pytest.approx(m["braai_vs_own"]["roc_auc"], abs=1e-3)
    saved = json.loads((tmp_path / "packet_scores.json").read_text())
    assert saved["n"] == 499 and saved["metrics"]["ztf:rb"]["n"] == 499
    rows = (tmp_path / "packet_scores.csv").read_text().splitlines()
    assert len(rows) == 500 and rows[1].split(",")[3].startswith("ZTF")
    png = (tmp_path / "packets_most_wrong.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
