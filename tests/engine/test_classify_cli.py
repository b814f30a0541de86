"""`nightsift train` and `nightsift evaluate` end to end on a tiny simulated dataset (plumbing only)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from nightsift.engine.cli import main  # noqa: E402


@pytest.mark.slow
def test_train_then_evaluate(tmp_path, capsys):
    data, out, rep, ev = tmp_path / "data", tmp_path / "model", tmp_path / "report", tmp_path / "eval"
    common = ["--data", str(data), "--units", "3", "--profiles", "decam", "--size", "448", "--data-seed", "21",
              "--epochs", "1", "--threads", "2", "--quiet"]
    assert main(["train", *common, "--out", str(out), "--report", str(rep), "--batch-size", "32", "--ema", "0.99"]) == 0
    meta = json.loads((out / "nightsift_rb.json").read_text())
    assert meta["training"]["command"].startswith("nightsift train --data")
    assert "--ema 0.99" in meta["training"]["command"] and meta["training"]["ema"] == 0.99
    # the threshold rule comes from the configuration unless given: 90% confidence on the target FNR
    assert "--threshold-confidence 0.9" in meta["training"]["command"] and meta["threshold_confidence"] == 0.9
    assert "--units 3" in meta["training"]["command"] and "--profiles decam" in meta["training"]["command"]
    assert (out / meta["files"]["keras"]).exists() and (out / meta["files"]["tflite_int8"]).exists()
    assert meta["int8"]["edgetpu_problems"] == []
    for k in ("aucpr", "roc_auc", "fnr", "fpr", "precision", "recall", "threshold"):
        assert k in meta["metrics"]["float"] and k in meta["metrics"]["int8"]
    assert {p.name for p in rep.glob("*.png")} >= {"float_pr_curve.png", "int8_confusion.png"}
    assert json.loads((rep / "evaluation.json").read_text())["history"]["epochs_run"] == 1

    assert main(["evaluate", *common, "--model", str(out / "nightsift_rb.json"), "--out", str(ev)]) == 0
    res = json.loads((ev / "evaluation.json").read_text())
    assert set(res["models"]) == {"float", "int8"} and res["threshold_confidence"] == 0.9
    r = res["models"]["float"]
    assert {"overall", "per_instrument", "per_ccd", "per_seeing_bin", "per_filter", "per_kind",
            "at_stored_threshold"} <= set(r)
    assert r["overall"]["n"] == res["dataset"]["summary"]["per_split"]["test"]["n"]
    assert (ev / "int8_score_hist.png").exists()
    assert "AUCPR" in capsys.readouterr().out


def test_bad_threshold_confidence_is_refused_before_any_work(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "data"), "--units", "3", "--threshold-confidence", "1.5"])
    assert rc != 0 and "classify.threshold_confidence" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing simulated


@pytest.mark.slow
def test_train_with_domain_adaptation_lists_the_packets(tmp_path, capsys):
    """``--adapt-packets``: unlabelled real triplets in a domain-adversarial fit; the exported model is
    the plain CNN, every packet is listed in the metadata, and the real-data kit then refuses the set."""
    from pathlib import Path

    alerts = Path(__file__).resolve().parents[3] / "shared" / "data" / "ztf" / "alerts"
    if not alerts.exists():
        pytest.skip("../shared/data/ztf/alerts not present (the shared real data beside the clone)")
    out = tmp_path / "model"
    assert main(["train", "--data", str(tmp_path / "data"), "--units", "3", "--profiles", "decam", "--size", "448",
                 "--data-seed", "21", "--epochs", "1", "--threads", "2", "--quiet", "--out", str(out),
                 "--batch-size", "32", "--adapt-packets", str(alerts), "--adapt-weight", "0.2"]) == 0
    meta = json.loads((out / "nightsift_rb.json").read_text())
    assert f"--adapt-packets {alerts} --adapt-weight 0.2" in meta["training"]["command"]
    assert meta["training"]["adapt"] == {"weight": 0.2, "n_rows": 499}
    assert len(meta["real_training_candids"]) == 499
    assert meta["int8"]["edgetpu_problems"] == []
    capsys.readouterr()
    assert main(["evaluate", "--real", str(alerts), "--model", str(out / "nightsift_rb.json"),
                 "--out", str(tmp_path / "ev")]) == 2
    assert "touched training" in capsys.readouterr().err
