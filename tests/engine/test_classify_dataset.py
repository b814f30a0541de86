"""Training data from the chain: unit plan, labels from the truth, triplets as the pipeline cuts them, cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nightsift.engine.classify.dataset import (
    BOGUS_CAUSES, DatasetSpec, build_dataset, load_dataset, plan_units, simulate_unit, summarize,
)
from nightsift.engine.errors import AlgorithmFailure, ConfigError, SkipCCD


def test_plan_is_deterministic_and_representative():
    spec = DatasetSpec(n_units=30, seed=4)
    a, b = plan_units(spec), plan_units(spec)
    assert a == b
    assert plan_units(DatasetSpec(n_units=30, seed=5)) != a
    assert [u.instrument for u in a[:6]] == ["decam", "ztf", "lsst"] * 2
    for prof in ("decam", "ztf", "lsst"):
        us = [u for u in a if u.instrument == prof]
        assert {u.split for u in us} == {"train", "val", "test"}
        assert len({u.ccd for u in us}) == len(us)  # distinct CCDs until the focal plane is used up
        assert len({u.seed for u in us}) == len(us)
    sizes = {u.instrument: u.size for u in a}
    assert sizes["ztf"] == 512 and sizes["lsst"] > 512  # 0.2"/px needs more pixels for a 2.4' field
    from nightsift.engine.simulate import PROFILES

    for u in a:
        p = PROFILES[u.instrument]
        assert 0.69 * p.seeing_fwhm <= u.seeing <= 1.81 * p.seeing_fwhm
        assert u.filter in p.filters
    with pytest.raises(ConfigError, match="profiles"):
        DatasetSpec(profiles=("hst",))
    with pytest.raises(ConfigError, match="fraction"):
        DatasetSpec(val_fraction=0.6, test_fraction=0.5)


def test_sky_options_reach_every_unit_from_the_command_line():
    """``--star-psf-scatter``, ``--proper-motion`` and ``--bright-variables`` of ``nightsift train``
    end up in the dataset spec, its key and every unit's simulation options."""
    from nightsift.engine.cli import _dataset_spec, build_parser

    args = build_parser().parse_args(["train", "--units", "6", "--star-psf-scatter", "0.04", "--proper-motion",
                                      "0.01", "--bright-variables", "0.5"])
    spec = _dataset_spec(args)
    assert (spec.star_psf_scatter, spec.proper_motion, spec.bright_variables) == (0.04, 0.01, 0.5)
    assert spec.key() != DatasetSpec(n_units=6, star_psf_scatter=0.04, proper_motion=0.01).key()
    for u in plan_units(spec):
        assert (u.star_psf_scatter, u.proper_motion, u.bright_variables) == (0.04, 0.01, 0.5)
    plain = _dataset_spec(build_parser().parse_args(["train", "--units", "6"]))
    assert plain == DatasetSpec(n_units=6)


@pytest.fixture(scope="module")
def unit_result():
    spec = DatasetSpec(n_units=1, profiles=("decam",), size=448, min_field_arcmin=0.0, seed=11, transients=(40, 40))
    unit = plan_units(spec)[0]
    return unit, simulate_unit(unit)


@pytest.mark.slow
def test_unit_labels_and_triplets_match_the_pipeline(unit_result):
    """The stored triplets are exactly what process_ccd hands a scorer; labels follow the truth."""
    from nightsift.engine.config import Config
    from nightsift.engine.pipeline import process_ccd
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.calibrate import make_master

    unit, r = unit_result
    assert r["status"] == "done", r["error"]
    n = len(r["truth"])
    assert n > 20 and r["z"].dtype == np.float16 and r["z"].shape == (n, 63, 63, 3)
    lab = r["truth"]["label"].astype(bool)
    assert 5 <= lab.sum() <= r["n_found"] + 5 and (~lab).sum() >= 5
    assert set(r["truth"]["kind"][lab]) <= {"isolated", "nuclear", "variable"}
    assert set(r["truth"]["kind"][~lab]) <= set(BOGUS_CAUSES)
    assert np.isfinite(r["truth"]["mag"][lab]).all() and np.isnan(r["truth"]["mag"][~lab]).all()
    d = r["domain"]
    assert (d["instrument"] == "decam").all() and (d["ccd"] == unit.ccd).all() and (d["split"] == unit.split).all()
    # real candidates are bright in the centre of the difference (ZTF's sign convention: also the
    # negative ones, whose difference stamp is reference minus science)
    cen = r["z"][:, 31, 31, 2].astype(np.float64)
    pos = r["features"]["isdiffpos"]
    assert np.median(cen[lab & pos]) > 3
    if (lab & ~pos).sum() >= 3:
        assert np.median(cen[lab & ~pos]) > 1

    # the same CCD through process_ccd with a capturing scorer
    sim = simulate_ccd_pair(unit.instrument, shape=(unit.size, unit.size), seed=unit.seed, visit=unit.visit,
                            ccd=unit.ccd, n_transients=unit.n_transients, artifacts=True, seeing=unit.seeing,
                            sky=unit.sky, filter=unit.filter, n_saturated=unit.n_saturated, edge=unit.edge)
    cfg = Config()
    got = []

    def scorer(t):
        got.append(np.asarray(t))
        return {}

    res = process_ccd(sim.science_raw, make_master(sim.calibration, header=sim.science_raw.header,
                                                   config=cfg.calibrate),
                      sim.reference, config=cfg, visit=unit.visit, ccd=unit.ccd, write=False, scorer=scorer)
    assert len(res.candidates) == n
    np.testing.assert_array_equal(res.candidates["xpos"], r["features"]["xpos"])
    t = got[0]
    back = r["loc"][:, None, None, :] + r["scale"][:, None, None, :] * r["z"].astype(np.float32)
    fin = np.isfinite(t)
    np.testing.assert_array_equal(fin, np.isfinite(back))
    err = np.abs(back[fin] - t[fin]) / np.broadcast_to(r["scale"][:, None, None, :], t.shape)[fin]
    assert err.max() < 0.05 + 1e-3 * np.abs(r["z"].astype(np.float32)[fin]).max()


@pytest.mark.parametrize("exc, status, words", [
    (SkipCCD("no overlap"), "skipped", ["SkipCCD: no overlap"]),
    (AlgorithmFailure("too few PSF stars"), "failed", ["AlgorithmFailure: too few PSF stars"]),
    (ZeroDivisionError("a bug"), "failed", ["ZeroDivisionError: a bug at ", "test_classify_dataset.py:"]),
])
def test_a_failed_unit_is_recorded_empty(monkeypatch, exc, status, words):
    """A unit whose chain fails is an empty unit with the status and error every night engine
    records; a bug says where it happened. The build goes on."""
    import nightsift.engine.classify.dataset as ds

    def chain(unit, cfg):
        raise exc

    monkeypatch.setattr(ds, "_run_chain", chain)
    r = simulate_unit(plan_units(DatasetSpec(n_units=1, seed=1))[0])
    assert r["status"] == status and all(w in r["error"] for w in words), r["error"]
    assert len(r["truth"]) == len(r["z"]) == 0 and r["qa"] == {} and r["wall_s"] >= 0


@pytest.mark.slow
def test_build_cache_load_and_summary(tmp_path, monkeypatch):
    spec = DatasetSpec(n_units=2, profiles=("decam",), size=384, min_field_arcmin=0.0, seed=16, transients=(30, 30),
                       val_fraction=0.0, test_fraction=0.4)
    path = build_dataset(tmp_path, spec, progress=False)
    assert path.name == f"rb-{spec.key()}.npz" and path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    data = load_dataset(path)
    assert len(data) == len(data.truth) == len(data.z) > 10
    s = json.loads(path.with_suffix(".json").read_text())["summary"]
    assert s == summarize(data.truth, data.domain)
    assert s["total"]["real"] + s["total"]["bogus"] == len(data)
    assert s["per_split"]["train"]["n"] + s["per_split"]["test"]["n"] == len(data)
    assert len(data.split("train")) == s["per_split"]["train"]["n"]
    x = data.inputs(slice(0, 3))
    assert x.dtype == np.float32 and x.shape == (3, 63, 63, 3) and np.isfinite(x).all()
    # cached: a second call does not simulate again
    import nightsift.engine.classify.dataset as ds

    monkeypatch.setattr(ds, "simulate_unit", lambda *a, **k: pytest.fail("rebuilt a cached dataset"))
    assert build_dataset(tmp_path, spec, progress=False) == path
    # a dataset of another normalisation is refused
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    meta["normalization"] = "old"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match="normalisation"):
        load_dataset(tmp_path / "old.npz")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.npz")


_AFTER_NUMBA_PARALLEL = '''
import tempfile
import numpy as np


def main():
    from nightsift.engine.classify.dataset import DatasetSpec, build_dataset, load_dataset
    from nightsift.engine.classify.preprocess import standardize

    # what `train --teacher-packets` does before the dataset: standardise triplets, a Numba loop
    # parallel over the batch, whose OpenMP threads now exist in this process
    standardize(np.random.default_rng(1).normal(size=(64, 63, 63, 3)).astype(np.float32))
    spec = DatasetSpec(n_units=2, profiles=("decam",), size=256, min_field_arcmin=0.0, seed=16, transients=(5, 5),
                       val_fraction=0.0, test_fraction=0.5)
    with tempfile.TemporaryDirectory() as d:
        print("rows", len(load_dataset(build_dataset(d, spec, workers=2, progress=False))))


if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
def test_parallel_build_after_parallel_numba(tmp_path):
    """A parallel dataset build in a process that has already run a parallel Numba loop (as `train
    --teacher-packets` does when it standardises the real triplets) completes. Forked workers died there
    with "fork() called from a process already using GNU OpenMP"; the pool now spawns them."""
    import subprocess
    import sys

    script = tmp_path / "build_after_numba.py"
    script.write_text(_AFTER_NUMBA_PARALLEL)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "rows " in r.stdout, r.stderr[-3000:]
