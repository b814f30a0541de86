"""The QA report of a subtraction (issue #12): ``qa.json`` and ``quicklook.png`` beside the products
of ``nightsift subtract``, checked against the CCDResult's QA and the simulation's truth; the
warnings channel end to end; a night's quicklooks and ledger records read as reports; binning for
display (against a slow oracle, and its memory on a 4096^2 frame)."""
from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from nightsift.engine.cli import main
from nightsift.engine.config import Config
from nightsift.engine.errors import InputError
from nightsift.engine.io.fits import read_exposure
from nightsift.engine.pipeline import process_pair
from nightsift.engine.report import (QA_SCHEMA, QA_SCHEMA_VERSION, QUICKLOOK_DPI, QUICKLOOK_INCHES, config_hash,
                                     display_bin, format_qa_summary, quicklook_path, read_qa_report, save_quicklook,
                                     write_qa_report)

WARNING = "sci PSF FWHM 6.1 px implausible: header seeing gives 2.1 px (injected by the test)"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 512x512 simulated pair (as test_fault_injection.py) and ``nightsift subtract``'s run of it."""
    tmp = tmp_path_factory.mktemp("qa")
    assert main(["simulate", "--out", str(tmp / "sim"), "--size", "512", "--seed", "11"]) == 0
    stem = tmp / "sim" / "visit0000_ccd000"
    sci, ref = Path(f"{stem}_sci.fits"), Path(f"{stem}_ref.fits")
    return {"tmp": tmp, "sci": sci, "ref": ref}


@pytest.fixture(scope="module")
def run(pair):
    """The command's output folder and stdout, and the same pair through process_pair (deterministic)."""
    import contextlib
    import io

    out = pair["tmp"] / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["subtract", str(pair["sci"]), str(pair["ref"]), "--out", str(out), "--visit", "3", "--ccd", "7"])
    assert rc == 0
    cfg = Config().replace(package={"output_dir": str(pair["tmp"] / "unused")})
    res = process_pair(read_exposure(pair["sci"]), read_exposure(pair["ref"]), config=cfg, visit=3, ccd=7,
                       write=False, keep_products=True)
    return {"out": out, "stdout": buf.getvalue(), "res": res, "report": json.loads((out / "qa.json").read_text())}


def _header(path):
    return fits.getheader(path, "IMAGE")


def test_qa_json_holds_the_results_qa(run, pair):
    rep, res = run["report"], run["res"]
    assert rep["schema"] == QA_SCHEMA and rep["schema_version"] == QA_SCHEMA_VERSION
    assert (rep["visit"], rep["ccd"], rep["status"]) == (3, 7, "done")
    assert rep["config_hash"] == config_hash(Config().replace(package={"output_dir": "elsewhere"}))
    assert rep["nightsift_version"] and rep["shape"] == [512, 512]
    assert rep["inputs"]["science"]["path"] == str(pair["sci"].resolve())
    assert rep["inputs"]["reference"]["bunit"] == _header(pair["ref"]).get("BUNIT")
    qa = res.qa
    assert rep["flux_ratio"]["value"] == pytest.approx(qa["F_r"], rel=1e-12)
    assert rep["flux_ratio"]["source"] == qa["F_r_source"]
    assert rep["scorr"]["std_raw"] == pytest.approx(qa["scorr_std_raw"], rel=1e-12)
    assert rep["astrometry"]["n_stars"] == qa["n_astrometric_stars"]
    assert rep["astrometry"]["rms_px"] == pytest.approx(math.hypot(qa["astrometric_rms_x"], qa["astrometric_rms_y"]))
    assert rep["psf"]["science"]["fwhm_px"]["median"] == pytest.approx(qa["sci_psf_fwhm"], rel=1e-12)
    assert rep["psf"]["reference"]["fwhm_px"]["max"] == pytest.approx(qa["ref_psf_fwhm_max"], rel=1e-12)
    # the reference's own PSF stage (measured once per CCD) is in every CCD-visit's QA too
    assert qa["ref_psf_locus_floored"] in (0, 1, 2) and qa["ref_psf_crowded"] in (0, 1)
    assert qa["ref_psf_n_candidates"] >= qa["ref_psf_n_stars"] > 0
    tiles = rep["psf"]["science"]["fwhm_px"]["tiles"]
    assert len(tiles) == len(res.products.sci_psf.model.fwhm) >= 1
    assert rep["psf"]["science"]["source"] == "measured" and rep["psf"]["science"]["n_stars"] >= 5
    from astropy.table import Table

    cand = Table.read(run["out"] / "candidates.ecsv")
    assert rep["candidates"]["n"] == len(res.candidates) == len(cand) > 0
    assert rep["candidates"]["n_positive"] == int(np.sum(cand["isdiffpos"]))
    assert rep["candidates"]["n_positive"] + rep["candidates"]["n_negative"] == rep["candidates"]["n"]
    assert rep["qa"]["n_candidates"] == qa["n_candidates"]
    assert set(rep["times_s"]) >= {"psf", "subtract", "detect"}
    assert rep["products"]["difference"] == "difference.fits" and (run["out"] / "difference.fits").exists()


def test_qa_json_against_the_simulated_truth(run, pair):
    """PSF FWHM near the simulated seeing, F_r near the simulated ratio, S_corr white on blank sky."""
    rep = run["report"]
    hs, hr = _header(pair["sci"]), _header(pair["ref"])
    # the PSF widens off-centre (the simulation's growth term): the median of the tiles sits within 10 %
    assert rep["psf"]["science"]["fwhm_px"]["median"] == pytest.approx(hs["FWHM"], rel=0.10)
    assert rep["psf"]["reference"]["fwhm_px"]["median"] == pytest.approx(hr["FWHM"], rel=0.10)
    true_fr = 10 ** (0.4 * (hr["MAGZP"] - hs["MAGZP"])) * hr["EXPTIME"] / hs["EXPTIME"]
    assert rep["flux_ratio"]["value"] == pytest.approx(true_fr, rel=0.03)
    assert rep["flux_ratio"]["zero_points"] == pytest.approx(true_fr, rel=1e-6)
    assert 0.9 < rep["scorr"]["std_raw"] < 1.15 and rep["scorr"]["std"] == pytest.approx(1.0, abs=0.02)
    assert rep["astrometry"]["rms_px"] < 0.2 and rep["astrometry"]["n_stars"] >= 3
    assert 0 <= rep["coverage"]["sci_nodata_fraction"] < 0.05 and rep["coverage"]["ref_nodata_fraction"] < 0.05
    assert rep["pixel_scale_arcsec"] == pytest.approx(hs["SEEING"] / hs["FWHM"], rel=1e-3)


def test_quicklook_is_a_png_of_the_expected_size(run):
    import matplotlib.image

    png = run["out"] / "quicklook.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (round(QUICKLOOK_INCHES[1] * QUICKLOOK_DPI), round(QUICKLOOK_INCHES[0] * QUICKLOOK_DPI))
    assert img[..., :3].std() > 0.05  # not blank
    assert run["report"]["products"]["quicklook"] == "quicklook.png"


def test_cli_prints_where_the_report_went(run):
    lines = run["stdout"].splitlines()
    assert any(ln.startswith("QA -> ") and "qa.json" in ln and "quicklook.png" in ln and "0 warnings" in ln
               for ln in lines), lines
    assert not any(ln.startswith("warning:") for ln in lines)


def test_a_warning_in_the_qa_reaches_qa_json_and_the_output(pair, tmp_path, capsys, monkeypatch):
    """The one channel: a stage's ``_Batch.warn`` -> CCDResult.qa["warnings"] -> qa.json and stdout."""
    import nightsift.engine.pipeline as pipeline

    original = pipeline._flux_ratios

    def warning_flux_ratios(batch, *a, **k):
        for i in batch.alive:
            batch.warn(i, WARNING)
        return original(batch, *a, **k)

    monkeypatch.setattr(pipeline, "_flux_ratios", warning_flux_ratios)
    out = tmp_path / "out"
    assert main(["subtract", str(pair["sci"]), str(pair["ref"]), "--out", str(out), "--show", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rep = read_qa_report(out / "qa.json")
    assert rep["warnings"] == [WARNING] and rep["qa"]["warnings"] == [WARNING]
    assert lines[-1] == f"warning: {WARNING}" and "1 warnings" in lines[-2]
    assert format_qa_summary(rep).splitlines()[-1] == f"  warning: {WARNING}"


def test_an_unwritable_qa_json_is_one_clear_line(pair, tmp_path, capsys):
    """A write failure of the report (here: qa.json is a folder holding a file) ends in one line naming it."""
    out = tmp_path / "out"
    (out / "qa.json").mkdir(parents=True)
    (out / "qa.json" / "keep").write_text("x")
    rc = main(["subtract", str(pair["sci"]), str(pair["ref"]), "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.strip() and not ln.startswith("INFO: Created TensorFlow Lite")]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("nightsift: error:") and str(out / "qa.json") in err[0] and "cannot write" in err[0]
    assert "Traceback" not in err[0] and not list(out.glob(".qa.json.*.tmp"))
    assert not (out / "quicklook.png").exists()


def test_report_json_has_no_nan_and_reader_checks_the_schema(tmp_path):
    rep = {"schema": QA_SCHEMA, "schema_version": QA_SCHEMA_VERSION, "x": float("nan"), "y": np.float32(np.inf),
           "z": np.arange(3), "w": [np.float64(np.nan), 1.5]}
    p = write_qa_report(tmp_path / "qa.json", rep)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_qa_report(p) == {"schema": QA_SCHEMA, "schema_version": QA_SCHEMA_VERSION, "x": None, "y": None,
                                 "z": [0, 1, 2], "w": [None, 1.5]}
    (tmp_path / "old.json").write_text(json.dumps({"schema": QA_SCHEMA, "schema_version": 0}))
    with pytest.raises(InputError, match="schema version 0"):
        read_qa_report(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        read_qa_report(tmp_path / "bad.json")
    with pytest.raises(InputError, match="not found"):
        read_qa_report(tmp_path / "missing.json")


def test_night_quicklooks_and_ledger_records_as_reports(tmp_path):
    """``package.quicklook`` (off by default) writes a PNG beside each alert file; a night's ledger
    record reads as a QA report (a night writes no second per-CCD QA file)."""
    from nightsift.engine.orchestration.local import run_simulated_night

    assert Config().package.quicklook is False
    out = tmp_path / "night"
    cfg = Config().replace(simulate={"n_visits": 1, "n_ccds": 1, "ny": 512, "nx": 512},
                           package={"output_dir": str(out), "quicklook": True})
    s = run_simulated_night(cfg, workers=1, progress=False)
    assert s.n_done == 1
    alerts = sorted(out.glob("visit*_ccd*.avro"))
    assert len(alerts) == 1
    png = quicklook_path(alerts[0])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("**/qa.json"))
    rec = json.loads(next((out / "records").glob("*.json")).read_text())
    rep = read_qa_report(next((out / "records").glob("*.json")))
    assert rep["status"] == "done" and rep["flux_ratio"]["value"] == rec["qa"]["F_r"]
    assert rep["scorr"]["std_raw"] == rec["qa"]["scorr_std_raw"] and rep["warnings"] == rec["qa"]["warnings"]
    assert rep["psf"]["science"]["fwhm_px"]["median"] == rec["qa"]["sci_psf_fwhm"]


def _oracle_bin(a, f):
    """Slow and plain: the NaN-ignoring mean of each f x f block (all-NaN block -> NaN)."""
    import warnings

    ny, nx = a.shape
    b = a[: ny // f * f, : nx // f * f].astype(np.float64).reshape(ny // f, f, nx // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" for an all-NaN block
        return np.nanmean(b, axis=(1, 3))


@pytest.mark.parametrize("shape,max_side", [((100, 130), 32), ((64, 64), 64), ((257, 300), 100)])
def test_display_bin_matches_a_nan_mean_oracle(shape, max_side):
    rng = np.random.default_rng(1)
    a = rng.normal(size=shape).astype(np.float32)
    a[5:20, 7:30] = np.nan  # whole blocks and parts of blocks
    a[40, 40] = np.inf
    f = -(-max(shape) // max_side)
    got = display_bin(a, max_side=max_side, chunk_pixels=997)  # many chunks, ragged last one
    want = _oracle_bin(np.where(np.isfinite(a), a, np.nan), f)
    assert got.shape == want.shape and max(got.shape) <= max_side
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_quicklook_of_a_4096_frame_stays_small(tmp_path):
    """A 4096^2 plane is binned without a full-size float copy, and the figure is of binned planes."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4096, 4096)).astype(np.float32)
    tracemalloc.start()
    b = display_bin(a)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert b.shape == (1024, 1024)
    assert peak < 0.5 * a.nbytes, f"binning peaked at {peak / 2**20:.0f} MiB for a {a.nbytes / 2**20:.0f} MiB plane"
    np.testing.assert_allclose(b[3, 5], a[12:16, 20:24].mean(), rtol=1e-5)
    from nightsift.engine.records import empty_candidates

    c = empty_candidates(2)
    c["xpos"], c["ypos"], c["snr"], c["isdiffpos"] = [100.0, 4000.0], [50.0, 3000.0], [12.0, 8.0], [True, False]
    p = save_quicklook(tmp_path / "q.png", {"science": b, "reference": b, "difference": b, "scorr": b}, factor=4,
                       candidates=c, title="4096")
    import matplotlib.image

    assert matplotlib.image.imread(p).shape[:2] == (1000, 1000)


def test_night_quicklook_planes_on_a_strict_device(tmp_path):
    """``package.quicklook`` bins the planes on the device (the strict stand-in refuses every hidden
    copy), downloads them once under their own label, and they are what binning the host products
    gives; the PNG lands beside the alert file."""
    from nightsift.engine.pipeline import VisitFrame, prepare_statics, process_visit
    from nightsift.engine.report import display_factor, quicklook_planes
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.calibrate import make_master
    from nightsift.kernels._xp import count_transfers

    from ..strict_device import strict_namespace

    sim = simulate_ccd_pair("decam", shape=(512, 512), seed=3, ccd=0, n_ccds=1, n_transients=6)
    cfg = Config().replace(package={"output_dir": str(tmp_path), "quicklook": True})
    master = make_master(sim.calibration, header=sim.science_raw.header, config=cfg.calibrate)
    sx = strict_namespace()
    st = prepare_statics(sim.reference, master, config=cfg, xp=sx)
    with count_transfers() as led:
        res = process_visit([VisitFrame(5, 0, raw=sim.science_raw)], [st], config=cfg)[0]
    assert res.status == "done" and res.quicklook.shape == (4, 512, 512) and res.quicklook.dtype == np.float32
    assert led.by_label["quicklook"][1] == res.quicklook.nbytes
    assert quicklook_path(res.alerts_path).exists()
    ref = process_visit([VisitFrame(5, 0, raw=sim.science_raw)], [prepare_statics(sim.reference, master, config=cfg)],
                        config=cfg.replace(package={"quicklook": False}), keep_products=True, write=False)[0]
    planes, factor = quicklook_planes(ref.products)
    assert ref.quicklook is None and factor == display_factor((512, 512)) == 1
    for k, plane in zip(("science", "reference", "difference", "scorr"), res.quicklook):
        np.testing.assert_allclose(plane, planes[k], rtol=1e-4, atol=1e-2, equal_nan=True, err_msg=k)
