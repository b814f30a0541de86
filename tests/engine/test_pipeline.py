"""The chain end to end through its user interfaces: ``nightsift simulate`` -> ``nightsift subtract``,
``nightsift run`` (local engine), idempotent reruns, a night that survives a bad CCD, and clear errors
for bad input files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from nightsift.engine.cli import main
from nightsift.engine.config import Config
from nightsift.engine.io.avro import read_alerts
from nightsift.engine.io.fits import read_exposure, write_exposure
from nightsift.engine.orchestration import local
from nightsift.engine.pipeline import process_pair
from nightsift.engine.records import Exposure
from nightsift.engine.truth import match_candidates


@pytest.fixture(scope="module")
def simulated_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--out", str(out), "--size", "512", "--seed", "7"]) == 0
    stem = out / "visit0000_ccd000"
    return stem


def test_simulate_writes_a_pair_that_subtract_reads(simulated_files, tmp_path, capsys):
    stem = simulated_files
    for suffix in ("_raw.fits", "_calib.fits", "_sci.fits", "_ref.fits", "_truth.ecsv"):
        assert (stem.parent / (stem.name + suffix)).exists(), suffix
    out = tmp_path / "sub"
    rc = main(["subtract", f"{stem}_sci.fits", f"{stem}_ref.fits", "--out", str(out), "--visit", "3", "--ccd", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "candidates" in printed
    for name in ("D.fits", "difference.fits", "scorr.fits", "candidates.ecsv"):
        assert (out / name).exists(), name
    scorr = fits.getdata(out / "scorr.fits")
    assert scorr.shape == (512, 512)
    cands = Table.read(out / "candidates.ecsv")
    truth = Table.read(f"{stem}_truth.ecsv")
    m = match_candidates(np.asarray(cands.as_array()), np.asarray(truth.as_array()))
    bright = np.asarray(truth["snr"]) >= 10
    assert bright.sum() >= 5
    assert m.found[bright].mean() >= 0.9
    alerts = read_alerts(out / "visit00000003_ccd005.avro")
    assert len(alerts) == len(cands)
    assert {a["candid"] for a in alerts} == set(np.asarray(cands["candid"]).tolist())


def test_rerun_replaces_the_alert_file(simulated_files, tmp_path):
    stem = simulated_files
    sci = read_exposure(f"{stem}_sci.fits")
    ref = read_exposure(f"{stem}_ref.fits")
    cfg = Config().replace(package={"output_dir": str(tmp_path)})
    r1 = process_pair(sci, ref, config=cfg, visit=1, ccd=2)
    first = read_alerts(r1.alerts_path)
    r2 = process_pair(sci, ref, config=cfg, visit=1, ccd=2)
    assert r2.alerts_path == r1.alerts_path
    second = read_alerts(r2.alerts_path)
    assert [a["candid"] for a in second] == [a["candid"] for a in first]
    assert len(list(tmp_path.glob("*.avro"))) == 1
    assert not list(tmp_path.glob("*.tmp*"))


def _bad_files(stem, tmp_path):
    """Each entry: (name, science path, reference path, words the error must contain)."""
    sci = read_exposure(f"{stem}_sci.fits")
    ref = f"{stem}_ref.fits"
    cases = []

    trunc = tmp_path / "truncated.fits"
    raw = (stem.parent / (stem.name + "_sci.fits")).read_bytes()
    trunc.write_bytes(raw[: len(raw) // 3])
    cases.append(("truncated", trunc, ref, ["truncated.fits"]))

    nowcs = tmp_path / "nowcs.fits"
    hdr = fits.Header()
    hdr["GAIN"] = 1.0
    hdr["BUNIT"] = "electron"
    fits.PrimaryHDU(np.asarray(sci.image), hdr).writeto(nowcs)
    cases.append(("no WCS", nowcs, ref, ["nowcs.fits", "WCS"]))

    nan = tmp_path / "nan.fits"
    write_exposure(nan, Exposure(image=np.full(sci.shape, np.nan, np.float32), variance=np.asarray(sci.variance),
                                 mask=np.asarray(sci.mask), header=sci.header, wcs=sci.wcs))
    cases.append(("NaN-only", nan, ref, ["nan.fits"]))

    far = tmp_path / "elsewhere.fits"
    w = sci.wcs.deepcopy()
    w.wcs.crval = [(w.wcs.crval[0] + 40.0) % 360, w.wcs.crval[1]]
    write_exposure(far, Exposure(image=np.asarray(sci.image), variance=np.asarray(sci.variance),
                                 mask=np.asarray(sci.mask), header=sci.header, wcs=w))
    cases.append(("no overlap", far, ref, ["overlap"]))

    blank = tmp_path / "nostars.fits"
    rng = np.random.default_rng(0)
    noise = rng.normal(1000.0, 30.0, sci.shape).astype(np.float32)
    write_exposure(blank, Exposure(image=noise, variance=np.full(sci.shape, 900.0, np.float32),
                                   mask=np.zeros(sci.shape, np.uint16), header=sci.header, wcs=sci.wcs))
    cases.append(("no stars", blank, ref, ["nostars.fits", "PSF stars"]))
    return cases


def test_bad_inputs_give_clear_errors(simulated_files, tmp_path, capsys):
    for name, sci, ref, words in _bad_files(simulated_files, tmp_path):
        rc = main(["subtract", str(sci), str(ref), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert err.startswith("nightsift: error:"), (name, err)
        for word in words:
            assert word in err, (name, word, err)
        assert "Traceback" not in err


def test_night_records_a_bad_ccd_and_goes_on(tmp_path, monkeypatch):
    """One CCD-visit with a NaN-only raw frame fails with its reason; the others finish and the
    failed one writes no alert file."""
    from nightsift.engine.orchestration.sources import SimulatedNight

    real = SimulatedNight.load_frame

    def broken(self, visit, ccd, static):
        frame = real(self, visit, ccd, static)
        if (visit, ccd) == (1, 0):
            frame.raw.data[...] = np.nan
        return frame

    monkeypatch.setattr(SimulatedNight, "load_frame", broken)
    cfg = Config().replace(simulate={"ny": 512, "nx": 512, "n_visits": 2, "n_ccds": 2, "n_transients": 8},
                           package={"output_dir": str(tmp_path)})
    summary = local.run_simulated_night(cfg, workers=1, progress=False)
    assert summary.n_tasks == 4
    assert summary.n_done == 3
    assert summary.n_failed + summary.n_skipped == 1
    bad = [r for r in summary.per_ccd if r["status"] != "done"]
    assert (bad[0]["visit"], bad[0]["ccd"]) == (1, 0)
    assert "Traceback" not in bad[0]["error"].splitlines()[0]
    avro = sorted(p.name for p in tmp_path.glob("*.avro"))
    assert avro == ["visit00000000_ccd000.avro", "visit00000000_ccd001.avro", "visit00000001_ccd001.avro"]
    records = sorted(tmp_path.rglob("*.json"))
    statuses = [json.loads(p.read_text())["status"] for p in records if "visit" in p.name]
    assert sorted(statuses).count("done") == 3


def test_run_command_on_a_tiny_night(tmp_path, capsys):
    out = tmp_path / "night"
    rc = main(["run", "--engine", "local", "--visits", "1", "--ccds", "2", "--size", "512", "--workers", "1",
               "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 done, 0 failed" in text
    assert "completeness" in text
    summary = json.loads((out / "night_summary.json").read_text())
    assert summary["n_done"] == 2
    n = sum(len(read_alerts(p)) for p in out.glob("*.avro"))
    assert n == summary["n_alerts"] > 0


def test_clipped_star_cores_in_calibrated_inputs_are_masked(tmp_path, capsys):
    """Issue #14 item 1: a calibrated pair whose star cores are clipped at SATURATE (e-) and whose
    MASK does not say so. ``nightsift subtract`` must flag those cores from the header's SATURATE:
    no candidate sits on a clipped star with nbad == 0 (before the fix 5 of 8 candidates did),
    and the real transients away from clipped stars are still found."""
    from scipy.ndimage import binary_dilation

    from nightsift.engine.simulate import simulate_ccd_pair

    level = 3000.0  # e-: the sky is ~1400 e-, so the cores of the brighter stars clip
    s = simulate_ccd_pair("decam", shape=(512, 512), seed=3, n_transients=4, artifacts=False)

    def clipped(e, name):
        h = e.header.copy()
        h["SATURATE"] = (level, "e- (BUNIT = electron)")
        exp = Exposure(image=np.minimum(e.image, level).astype(np.float32), variance=e.variance,
                       mask=np.zeros(e.shape, np.uint16), wcs=e.wcs, header=h)
        write_exposure(tmp_path / name, exp)
        return np.asarray(e.image) >= level

    cut = clipped(s.science_exposure(), "sci.fits") | clipped(s.reference, "ref.fits")
    assert cut.sum() > 50  # several stars clip
    out = tmp_path / "o"
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "ref.fits"), "--out", str(out)]) == 0
    capsys.readouterr()
    c = Table.read(out / "candidates.ecsv")
    near = binary_dilation(cut, iterations=4)
    on_clipped = near[np.rint(c["ypos"]).astype(int), np.rint(c["xpos"]).astype(int)]
    assert not np.any(on_clipped & (np.asarray(c["nbad"]) == 0)), c[on_clipped]
    truth = s.transients
    free = ~near[np.rint(truth["y"]).astype(int), np.rint(truth["x"]).astype(int)] & (truth["snr"] >= 10)
    m = match_candidates(np.asarray(c.as_array()), np.asarray(truth))
    assert free.sum() >= 2 and m.found[free].all()


def test_a_degenerate_subtraction_is_refused_naming_both_files(simulated_files, tmp_path):
    """The science frame as its own reference, with round-off-sized noise added: before, S_corr
    came out with std ~0, was renormalised to 1 and gave 'transients' made of round-off. Now the
    raw std is checked; a sound pair passes the same check."""
    from dataclasses import replace

    from nightsift.engine.errors import AlgorithmFailure

    stem = simulated_files
    sci = read_exposure(f"{stem}_sci.fits")
    rng = np.random.default_rng(1)
    twin = replace(sci, image=sci.image + rng.normal(0, 1e-3, sci.image.shape).astype(np.float32),
                   path=str(tmp_path / "twin.fits"))
    cfg = Config().replace(package={"output_dir": str(tmp_path)})
    with pytest.raises(AlgorithmFailure, match=r"twin\.fits.*S_corr std") as err:
        process_pair(twin, sci, config=cfg, write=False)
    assert str(sci.path) in str(err.value)
    # the same check on the real pair: within [0.5, 2]
    res = process_pair(sci, read_exposure(f"{stem}_ref.fits"), config=cfg, write=False)
    assert 0.9 < res.qa["scorr_std_raw"] < 1.1
    # the bounds are configuration: a band that leaves out the pair's own std fails it
    v = res.qa["scorr_std_raw"]
    band = {"scorr_std_max": (1 + v) / 2} if v > 1 else {"scorr_std_min": (1 + v) / 2}
    with pytest.raises(AlgorithmFailure, match="outside"):
        process_pair(sci, read_exposure(f"{stem}_ref.fits"), write=False, config=cfg.replace(subtract=band))
