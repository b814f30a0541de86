"""`nightsift score PACKETS...`: ZTF and Rubin packets, without braai's weights, broken packets, and
braai's comparisons only when its weights are given.

The figures measured on the real packets (nightsift vs Rubin's reliability, vs ZTF's drb/rb) are
measurements, not targets: the asserts check what must hold whatever the model (the plumbing, the
intervals bracket the value, braai reproduces ZTF's own drb).
"""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from ..conftest import shared_data

pytest.importorskip("ai_edge_litert")

from nightsift.engine.cli import main  # noqa: E402


@pytest.fixture
def no_braai(monkeypatch, tmp_path):
    """braai's weights nowhere to be found: `score` must not need them."""
    monkeypatch.setenv("NIGHTSIFT_BRAAI_DIR", str(tmp_path / "no-braai-here"))


@pytest.mark.data
def test_score_ztf_and_rubin_folders_without_braai(tmp_path, capsys, no_braai):
    from nightsift.engine.classify.runtime import load_scorer
    from nightsift.engine.config import ClassifyConfig
    from nightsift.engine.io.avro import iter_ztf_packets

    rubin, ztf = shared_data("rubin") / "alerts", shared_data("ztf") / "alerts_drb"
    out = tmp_path / "out"
    assert main(["score", str(rubin), str(ztf), "--out", str(out), "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    # alerts_drb holds two packets twice (139 files, 137 candids): each alert counts once
    assert "237 alerts scored from 239 packet files, 2 skipped" in text and "nightsift vs reliability >= 0.5" in text
    res = json.loads((out / "packet_scores.json").read_text())
    assert list(res["metrics"]) == ["rubin:reliability", "ztf:drb"]
    assert len(res["skipped"]) == 2 and all("(duplicate packet)" in line for line in res["skipped"])
    r, z = res["metrics"]["rubin:reliability"], res["metrics"]["ztf:drb"]
    assert (r["n"], r["vs_own"]["n_pos"], r["n_negative"]) == (100, 67, 56)
    assert z["n"] == 137 and "vs_braai" not in z and "braai_vs_own" not in z
    for m in (r["vs_own"], z["vs_own"]):
        for k in ("roc_auc", "aucpr", "agreement"):
            lo, hi = m[f"{k}_ci95"]
            assert 0.0 <= lo <= m[k] <= hi <= 1.0
    rows = list(csv.DictReader((out / "packet_scores.csv").read_text().splitlines()))
    assert len(rows) == 237 and {x["survey"] for x in rows} == {"rubin", "ztf"} and all(x["braai"] == "" for x in rows)
    assert (out / "packets_most_wrong.png").read_bytes()[:4] == b"\x89PNG"
    # the ZTF scores are the shipped scorer's on the ZTF reader's triplets, in the same order
    first = {}  # a candid's first packet, in file order (the reader's rule for duplicates)
    for _, t, cand in iter_ztf_packets(ztf):
        first.setdefault(cand["candid"], t)
    trips = np.stack(list(first.values()))
    want = load_scorer(ClassifyConfig()).score(trips)
    got = np.array([float(x["nightsift"]) for x in rows if x["survey"] == "ztf"])
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the measurement for the record (printed with -s): nightsift vs Rubin's reliability
    print(f"\nnightsift vs Rubin reliability >= 0.5: ROC AUC {r['vs_own']['roc_auc']:.3f} "
          f"{r['vs_own']['roc_auc_ci95']}; vs ZTF drb: {z['vs_own']['roc_auc']:.3f}")


@pytest.mark.data
def test_broken_packets_are_one_line_each_and_the_rest_scored(tmp_path, capsys, no_braai):
    for f in sorted((shared_data("rubin") / "alerts").glob("*.avro"))[:2]:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "random.avro").write_bytes(b"\x00" * 300)
    raw = next(iter(sorted(tmp_path.glob("5*.avro")))).read_bytes()
    (tmp_path / "truncated.avro").write_bytes(raw[:4000])
    assert main(["score", str(tmp_path), "--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.out.splitlines() if line.startswith("skipped ")]
    assert sorted(s.split()[1] for s in skipped) == ["random.avro:", "truncated.avro:"]
    assert "2 alerts scored from 4 packet files, 2 skipped" in captured.out and "Traceback" not in captured.err
    assert len(json.loads((tmp_path / "out" / "packet_scores.json").read_text())["skipped"]) == 2


def test_nothing_readable_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "x.avro").write_bytes(b"garbage")
    assert main(["score", str(tmp_path / "x.avro"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "x.avro" in err and "could be read" in err
    assert main(["score", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 2
    assert main(["score", str(tmp_path), "--braai-rubin", "--out", str(tmp_path / "out")]) == 2
    assert "--braai-rubin needs --braai" in capsys.readouterr().err


@pytest.mark.data
def test_score_ztf_is_an_alias(tmp_path, capsys, no_braai):
    files = sorted((shared_data("ztf") / "alerts").glob("*.avro"))[:20]
    assert main(["score-ztf", *map(str, files), "--out", str(tmp_path), "--bootstrap", "50"]) == 0
    res = json.loads((tmp_path / "packet_scores.json").read_text())
    assert list(res["metrics"]) == ["ztf:rb"] and res["n"] == 20


@pytest.mark.data
@pytest.mark.slow
def test_braai_only_when_given_and_not_on_rubin_unless_asked(tmp_path, capsys):
    """With --braai: braai's score of ZTF's drb packets reproduces their drb (ZTF's drb *is* braai
    d6_m7), Rubin packets get none (a warning says why); --braai-rubin scores them too, warned."""
    pytest.importorskip("keras")
    braai = shared_data("ztf") / "braai"
    rubin = sorted((shared_data("rubin") / "alerts").glob("*.avro"))[:10]
    args = ["score", str(shared_data("ztf") / "alerts_drb"), *map(str, rubin), "--braai", str(braai),
            "--bootstrap", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "braai not run on the 10 Rubin packets" in capsys.readouterr().out
    res = json.loads((tmp_path / "a" / "packet_scores.json").read_text())
    z = res["metrics"]["ztf:drb"]
    assert z["braai_vs_own"]["agreement"] > 0.97 and z["braai_vs_own"]["roc_auc"] > 0.97
    assert "vs_braai" not in res["metrics"]["rubin:reliability"]
    rows = list(csv.DictReader((tmp_path / "a" / "packet_scores.csv").read_text().splitlines()))
    assert all((x["braai"] == "") == (x["survey"] == "rubin") for x in rows)
    drb = np.array([float(x["own_score"]) for x in rows if x["survey"] == "ztf"])
    bs = np.array([float(x["braai"]) for x in rows if x["survey"] == "ztf"])
    assert np.median(np.abs(bs - drb)) < 0.01

    assert main([*args, "--braai-rubin", "--out", str(tmp_path / "b")]) == 0
    assert "outside its domain" in capsys.readouterr().out
    res = json.loads((tmp_path / "b" / "packet_scores.json").read_text())
    assert "vs_braai" in res["metrics"]["rubin:reliability"]
