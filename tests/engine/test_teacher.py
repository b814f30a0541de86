"""Teacher labels (`nightsift train --teacher-packets`): real ZTF triplets labelled by braai become
training rows. Checked: the margin and repeat rules on known scores, the rows equal what the scorer
sees, every packet used is listed once by candid, measurement sets are refused, and braai itself
labels the rows when it is present.
"""
from __future__ import annotations

import numpy as np
import pytest

from nightsift.engine.classify import crossdomain
from nightsift.engine.classify.realeval import MEASUREMENT_SETS, TEACHER_SETS, refuse_measurement_sets
from nightsift.engine.classify.teacher import TEACHER_KINDS, teacher_dataset
from nightsift.engine.errors import InputError

from ..conftest import shared_data


def _files(n):
    return sorted(shared_data("ztf/alerts").glob("*.avro"))[:n]


@pytest.mark.data
def test_margin_repeat_and_candids_on_known_scores(monkeypatch):
    from nightsift.engine.classify.preprocess import standardize
    from nightsift.engine.io.packets import read_packets

    files = _files(8)
    scores = np.array([0.05, 0.2, 0.21, 0.5, 0.79, 0.8, 0.95, 1.0])  # bounds inclusive
    monkeypatch.setattr(crossdomain, "_braai_scores", lambda ps, model, rubin, warns: scores[:len(ps.records)])
    rows, counts = teacher_dataset(files, margin=0.2, repeat=3)
    keep = [0, 1, 5, 6, 7]  # <= 0.2 bogus, >= 0.8 real; 0.21, 0.5, 0.79 left out
    assert counts["n_packets"] == 8 and counts["n_used"] == 5 and counts["n_uncertain_left_out"] == 3
    assert (counts["n_real"], counts["n_bogus"], counts["repeat"]) == (3, 2, 3)
    assert sum(counts["braai_score_histogram"]) == 8
    assert len(rows) == 15
    np.testing.assert_array_equal(rows.labels, np.repeat([0, 0, 1, 1, 1], 3))
    assert set(rows.truth["kind"]) == set(TEACHER_KINDS) and set(rows.domain["split"]) == {"train"}
    ps = read_packets(files)
    assert rows.meta["candids"] == sorted(int(ps.records[i]["candid"]) for i in keep)
    z, loc, _ = standardize(ps.triplets[np.repeat(keep, 3)])
    np.testing.assert_allclose(rows.z.astype(np.float32), z, rtol=1e-3, atol=2e-3, equal_nan=True)  # float16
    np.testing.assert_allclose(rows.loc, loc)
    assert np.isfinite(rows.features["magpsf"]).all()


@pytest.mark.data
def test_bad_arguments_and_no_confident_score(monkeypatch):
    files = _files(3)
    monkeypatch.setattr(crossdomain, "_braai_scores", lambda ps, model, rubin, warns: np.full(len(ps.records), 0.5))
    with pytest.raises(InputError, match="no braai score outside"):
        teacher_dataset(files)
    for kw in ({"margin": 0.5}, {"margin": -0.1}, {"repeat": 0}):
        with pytest.raises(ValueError):
            teacher_dataset(files, **kw)


def test_only_the_teacher_set_may_train(tmp_path, capsys):
    from nightsift.engine.cli import main

    assert TEACHER_SETS == ("ztf/alerts",) and set(TEACHER_SETS) <= set(MEASUREMENT_SETS)
    for s in MEASUREMENT_SETS:
        d = tmp_path / "data" / s
        d.mkdir(parents=True)
        if s in TEACHER_SETS:
            refuse_measurement_sets(d, allowed=TEACHER_SETS)
            with pytest.raises(InputError, match="must not touch training"):
                refuse_measurement_sets(d)  # expert labels: still refused
            continue
        with pytest.raises(InputError, match="must not touch training"):
            refuse_measurement_sets(d, allowed=TEACHER_SETS)
        rc = main(["train", "--teacher-packets", str(d), "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "m")])
        assert rc == 2 and "must not touch training" in capsys.readouterr().err
        assert not (tmp_path / "ds").exists()


@pytest.mark.data
def test_braai_labels_the_rows():
    pytest.importorskip("tensorflow")
    braai = shared_data("ztf/braai")
    files = _files(40)
    rows, counts = teacher_dataset(files, braai, margin=0.1)
    assert counts["n_packets"] == 40 and counts["n_used"] + counts["n_uncertain_left_out"] == 40
    assert counts["n_real"] > 0 and counts["n_bogus"] > 0  # 40 packets of ztf/alerts hold both
    assert len(rows) == counts["n_used"] == len(rows.meta["candids"])
