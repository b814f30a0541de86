"""A night from a folder of FITS files (`nightsift run --input DIR`), checked against the chain on
the same files and against the simulator's injected truth.

Two simulated folders of 2 visits x 2 CCDs (256 x 256 px):

* ``decam/``: DECam-like raw multi-extension exposures (``OBSTYPE = 'object'``, ``EXPNUM`` in the
  primary header, one HDU per CCD with ``CCDNUM``), bias/dark/flat exposures of the same layout
  (``zero``, ``dark``, ``dome flat``), one reference per CCD under ``reference/``;
* ``ztf/``: ZTF-like calibrated single-CCD files (``IMGTYPE = 'object'``, ``EXPID``, ``CCDID`` +
  ``QID``), references under ``reference/``, one science file truncated (a transfer cut short),
  and a third readout channel with no reference.

Every CCD-visit gets a record; the truncated one failed naming its file, the one without
reference skipped saying so; the others' alert packets are exactly those of
:func:`~nightsift.engine.pipeline.process_ccd` / :func:`~nightsift.engine.pipeline.process_pair` run
on the same files, and they find the injected transients; a rerun resumes (only the failed
CCD-visit runs again).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from astropy.io import fits

from nightsift.engine.cli import main
from nightsift.engine.config import load_config
from nightsift.engine.io.fits import read_exposure, read_raw, write_exposure
from nightsift.engine.orchestration.folder import FolderNight, scan_folder, split_done
from nightsift.engine.orchestration.ledger import read_ledger
from nightsift.engine.orchestration.local import run_simulated_night
from nightsift.engine.pipeline import process_ccd, process_pair
from nightsift.engine.simulate import simulate_visit_ccd
from nightsift.engine.stages.calibrate import calibrate, make_master
from nightsift.engine.truth import match_candidates

from ..conftest import shared_data
from .conftest import alerts_by_ccd_visit

N_VISITS, N_CCDS = 2, 2
EXPNUM0, EXPID0 = 1000, 2000  # visit numbers in the headers
BAD = (EXPID0 + 1, 1)  # the truncated ZTF-like science file
NOREF = (EXPID0, 2)  # a readout channel without reference


def _config(out, **sections):
    return load_config(None, simulate={"ny": 256, "nx": 256, "n_transients": 10},
                       psf={"min_snr": 10.0, "min_stars": 2},  # a 256 px CCD has few bright stars
                       package={"output_dir": str(out)}, classify={"backend": "none"}, **sections)


def _sims(cfg):
    return {(v, c): simulate_visit_ccd(cfg.simulate, visit=v, ccd=c) for v in range(N_VISITS) for c in range(N_CCDS)}


def _mef(path, primary: dict, hdus) -> None:
    """A multi-extension file: ``primary`` cards, then one image HDU per ``(data, header)``."""
    p = fits.PrimaryHDU()
    p.header.update(primary)
    fits.HDUList([p] + [fits.ImageHDU(d, h) for d, h in hdus]).writeto(path)


def _write_decam(root, sims):
    """DECam-like raw MEF exposures, calibration exposures and per-CCD references."""
    (root / "reference").mkdir(parents=True)
    for v in range(N_VISITS):
        hdus = []
        for c in range(N_CCDS):
            h = sims[(v, c)].science_raw.header.copy()
            del h["VISIT"]  # the exposure number lives in the primary header
            h["EXTNAME"] = f"S{c + 1}"
            hdus.append((sims[(v, c)].science_raw.data, h))
        _mef(root / f"c4d_{EXPNUM0 + v:07d}_ori.fits", {"OBSTYPE": "object", "EXPNUM": EXPNUM0 + v}, hdus)
    cal = {c: sims[(0, c)].calibration for c in range(N_CCDS)}
    for kind, obstype in (("bias", "zero"), ("dark", "dark"), ("flat", "dome flat")):
        for i in range(cal[0].bias.shape[0]):
            hdus = [(getattr(cal[c], kind)[i], fits.Header({"CCDNUM": c, "EXTNAME": f"S{c + 1}"}))
                    for c in range(N_CCDS)]
            _mef(root / f"c4d_cal_{kind}_{i}.fits", {"OBSTYPE": obstype, "EXPNUM": 900 + i,
                                                     "EXPTIME": cal[0].dark_exptime if kind == "dark" else 1.0},
                 hdus)
    for c in range(N_CCDS):
        write_exposure(root / "reference" / f"ref_S{c + 1}.fits", sims[(0, c)].reference)


def _ztf_header(h, expid, rcid):
    for k in ("VISIT", "CCDNUM"):
        h.remove(k, ignore_missing=True)
    h.update({"IMGTYPE": "object", "EXPID": expid, "CCDID": 1, "QID": rcid + 1})


def _write_ztf(root, sims, cfg):
    """ZTF-like calibrated science files (one per readout channel), references, a truncated file and
    a channel without reference."""
    (root / "reference").mkdir(parents=True)
    for (v, c), s in sims.items():
        master = make_master(s.calibration, header=s.science_raw.header, config=cfg.calibrate)
        sci = calibrate(s.science_raw, master, config=cfg.calibrate).value
        _ztf_header(sci.header, EXPID0 + v, c)
        write_exposure(root / f"ztf_{EXPID0 + v}_c01_q{c + 1}_sciimg.fits", sci)
        if v == 0:
            _ztf_header(s.reference.header, 0, c)
            s.reference.header["IMGTYPE"] = "refimg"
            write_exposure(root / "reference" / f"ztf_ref_c01_q{c + 1}_refimg.fits", s.reference)
    lost = root / f"ztf_{EXPID0}_c01_q{NOREF[1] + 1}_sciimg.fits"
    shutil.copy(root / f"ztf_{EXPID0}_c01_q1_sciimg.fits", lost)
    fits.setval(lost, "QID", value=NOREF[1] + 1, ext=1)
    (root / "README.fits").write_text("not FITS at all\n")  # listed as ignored, with why
    # IRSA's other products beside a sciimg (same headers): not CCD images of the night
    first = root / f"ztf_{EXPID0}_c01_q1_sciimg.fits"
    for suffix in ("mskimg.fits", "scimrefdiffimg.fits"):
        shutil.copy(first, root / f"ztf_{EXPID0}_c01_q1_{suffix}")
    bad = root / f"ztf_{BAD[0]}_c01_q{BAD[1] + 1}_sciimg.fits"
    with open(bad, "r+b") as fh:  # cut inside the IMAGE data: its headers read, its pixels do not
        fh.truncate(int(os.path.getsize(bad) * 0.3))
    return bad


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_night")
    cfg = _config(root / "unused")
    sims = _sims(cfg)
    _write_decam(root / "decam", sims)
    bad = _write_ztf(root / "ztf", sims, cfg)
    return root, sims, bad


def _night(folder, out, preset, workers=1):
    cfg = _config(out, input={"dir": str(folder), "preset": preset}, run={"engine": "local"})
    source = FolderNight.scan(cfg.input, cfg.calibrate)
    return cfg, source, run_simulated_night(cfg, workers=workers, progress=False, source=source)


def _found(alerts: dict, truth) -> int:
    """Injected transients matched by a positive alert (the chain's 1-based packet positions)."""
    cands = np.zeros(len(alerts), dtype=[("xpos", "f8"), ("ypos", "f8"), ("isdiffpos", "?")])
    for i, a in enumerate(alerts.values()):
        cands[i] = (a["candidate"]["xpos"] - 1, a["candidate"]["ypos"] - 1, a["candidate"]["isdiffpos"] == "t")
    return int(match_candidates(cands, truth).found.sum())


def test_plans(folders):
    root, _, bad = folders
    plan = scan_folder(load_config(None, input={"dir": str(root / "decam"), "preset": "decam"}).input)
    assert plan.tasks() == [(EXPNUM0 + v, c) for v in range(N_VISITS) for c in range(N_CCDS)]
    assert all(not f.calibrated and f.hdu == c + 1 for (_, c), f in plan.science.items())
    assert {c: {k: len(v) for k, v in d.items()} for c, d in plan.calibration.items()} == \
        {c: {"bias": 3, "dark": 3, "flat": 3} for c in range(N_CCDS)}
    assert sorted(plan.references) == list(range(N_CCDS)) and not plan.skip and not plan.ignored
    assert plan.describe()[0].startswith("2 visits x 2 CCDs = 4 CCD-visits (4 raw, 0 calibrated); preset decam")
    assert {f.shape for f in plan.science.values()} == {(256, 256)}  # the Ray memory plan sizes statics by it
    assert FolderNight(plan, None).ccd_shape == (256, 256)
    # the ZTF-like folder with the generic preset and a keyword map: the CCD is the quadrant QID
    ztf = scan_folder(load_config(None, input={"dir": str(root / "ztf"), "type_key": "IMGTYPE",
                                               "visit_key": "EXPID", "ccd_key": "QID"}).input)
    assert ztf.tasks() == sorted([(EXPID0 + v, c + 1) for v in range(N_VISITS) for c in range(N_CCDS)]
                                 + [(NOREF[0], NOREF[1] + 1)])
    assert sorted(ztf.references) == [1, 2] and all(f.calibrated for f in ztf.science.values())
    # the ztf preset knows IRSA's other products beside a sciimg and says why it leaves them
    irsa = scan_folder(load_config(None, input={"dir": str(root / "ztf"), "preset": "ztf"}).input)
    others = [w for w in irsa.ignored if "mskimg" in w or "scimrefdiffimg" in w]
    assert len(others) == 2 and any("ZTF bit-mask image" in w for w in others) and \
        any("ZTF's own difference image" in w for w in others)
    assert all(f.path.endswith("_sciimg.fits") for f in irsa.science.values())
    damaged, = [n for n in ztf.notes if "damaged" in n]  # only HDUs 0 (empty) and 1 (IMAGE) begin in it
    assert damaged.startswith(f"{bad}: damaged after HDU 1 (truncated: {os.path.getsize(bad)} bytes where its "
                              "headers declare ") and damaged.endswith("); its CCD-visits will fail")


def test_raw_frames_without_calibration_are_skipped(folders, tmp_path):
    root, _, _ = folders
    os.symlink(root / "decam" / "reference", tmp_path / "reference")
    os.symlink(root / "decam" / f"c4d_{EXPNUM0:07d}_ori.fits", tmp_path / "exposure.fits")
    cfg = _config(tmp_path / "out", input={"dir": str(tmp_path), "preset": "decam"})
    source = FolderNight.scan(cfg.input, cfg.calibrate)
    why = {k: f"raw science frame {tmp_path / 'exposure.fits'}[{k[1] + 1}] but no bias and flat frames for CCD "
              f"{k[1]}; add them, or give calibrated frames" for k in source.tasks()}
    assert source.plan.skip == why and len(why) == N_CCDS
    summary = run_simulated_night(cfg, workers=1, progress=False, source=source)
    assert {(r["visit"], r["ccd"]): (r["status"], r["error"]) for r in summary.per_ccd} == \
        {k: ("skipped", f"SkipCCD: {w}") for k, w in why.items()}


def test_decam_raw_mef_night_equals_process_ccd(folders, tmp_path):
    root, sims, _ = folders
    cfg, source, summary = _night(root / "decam", tmp_path / "night", "decam")
    assert (summary.n_tasks, summary.n_done) == (4, 4) and summary.n_truth == 0
    got = alerts_by_ccd_visit(tmp_path / "night")
    direct_cfg = cfg.replace(package={"output_dir": str(tmp_path / "direct")})
    found = total = 0
    for v in range(N_VISITS):
        for c in range(N_CCDS):
            s, key = sims[(v, c)], (EXPNUM0 + v, c)
            raw = read_raw(root / "decam" / f"c4d_{EXPNUM0 + v:07d}_ori.fits", hdu=c + 1)
            master = make_master(s.calibration, header=raw.header, config=cfg.calibrate)
            ref = read_exposure(root / "decam" / "reference" / f"ref_S{c + 1}.fits")
            process_ccd(raw, master, ref, config=direct_cfg, visit=key[0], ccd=c)
            found, total = found + _found(got[key], s.transients), total + len(s.transients)
    assert got == alerts_by_ccd_visit(tmp_path / "direct")  # packet for packet
    assert found >= 0.75 * total, f"{found}/{total} injected transients found"


def test_ztf_calibrated_night_with_a_bad_file_and_resume(folders, tmp_path):
    root, sims, bad = folders
    out = tmp_path / "night"
    cfg, source, summary = _night(root / "ztf", out, "ztf", workers=2)  # spawned workers: the source pickles
    recs = {(r["visit"], r["ccd"]): r for r in read_ledger(out)}
    good = {(EXPID0 + v, c) for v in range(N_VISITS) for c in range(N_CCDS)} - {BAD}
    assert set(recs) == good | {BAD, NOREF} and summary.n_tasks == 5
    assert {k: recs[k]["status"] for k in good} == {k: "done" for k in good}
    assert recs[BAD]["status"] == "failed" and str(bad) in recs[BAD]["error"]
    assert "truncated" in recs[BAD]["error"] and len(recs[BAD]["error"].splitlines()) == 1
    assert recs[NOREF]["status"] == "skipped" and f"no reference for CCD {NOREF[1]}" in recs[NOREF]["error"]
    got = alerts_by_ccd_visit(out)
    assert set(got) == good  # no alert file for the failed or skipped ones
    direct_cfg = cfg.replace(package={"output_dir": str(tmp_path / "direct")})
    found = total = 0
    for v, c in sorted(good):
        sci = read_exposure(root / "ztf" / f"ztf_{v}_c01_q{c + 1}_sciimg.fits")
        ref = read_exposure(root / "ztf" / "reference" / f"ztf_ref_c01_q{c + 1}_refimg.fits")
        process_pair(sci, ref, config=direct_cfg, visit=v, ccd=c)
        t = sims[(v - EXPID0, c)].transients
        found, total = found + _found(got[(v, c)], t), total + len(t)
    assert got == alerts_by_ccd_visit(tmp_path / "direct")
    assert found >= 0.75 * total, f"{found}/{total} injected transients found"
    # resume: the done CCD-visits are kept, the failed and skipped ones run again
    todo, done = split_done(source.tasks(), out)
    assert sorted(todo) == sorted([BAD, NOREF]) and {(r["visit"], r["ccd"]) for r in done} == good
    stamps = {k: os.stat(out / "records" / f"visit{k[0]:08d}_ccd{k[1]:03d}.json").st_mtime_ns for k in good}
    return_code = main(["--config", str(_toml(tmp_path)), "run", "--input", str(root / "ztf"), "--preset", "ztf",
                        "--out", str(out), "--engine", "local", "--workers", "1", "--quiet"])
    assert return_code == 0
    assert stamps == {k: os.stat(out / "records" / f"visit{k[0]:08d}_ccd{k[1]:03d}.json").st_mtime_ns for k in good}
    assert alerts_by_ccd_visit(out) == got


def _toml(tmp_path):
    p = tmp_path / "night.toml"
    p.write_text('[classify]\nbackend = "none"\n[psf]\nmin_snr = 10.0\nmin_stars = 2\n')
    return p


def test_cli_prints_the_plan_and_no_truth(folders, tmp_path, capsys):
    root, _, bad = folders
    rc = main(["--config", str(_toml(tmp_path)), "run", "--input", str(root / "ztf"), "--preset", "ztf", "--out",
               str(tmp_path / "o"), "--engine", "local", "--workers", "1", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "2 visits x 3 CCDs = 5 CCD-visits (0 raw, 5 calibrated); preset ztf" in text
    assert f"skip visit {NOREF[0]} ccd {NOREF[1]}: no reference for CCD {NOREF[1]}" in text
    assert f"ignored {root / 'ztf' / 'README.fits'}: not a readable FITS file (" in text
    assert f"note: {bad}: damaged after HDU 1 (truncated: " in text
    assert "CCD-visits: 3 done, 1 failed, 1 skipped of 5" in text
    assert "no injected truth" in text and "completeness" not in text.split("no injected truth")[0]
    assert f"visit {BAD[0]} ccd {BAD[1]}: failed: InputError: {bad}" in text


def test_ray_folder_night(folders, ray_cluster, tmp_path):
    from nightsift.engine.orchestration.ray_engine import run_ray_night

    root, _, bad = folders
    cfg = _config(tmp_path / "ray", input={"dir": str(root / "ztf"), "preset": "ztf"},
                  run={"engine": "ray", "workers": 2, "inference_actors": 1, "inference_cpus": 0.0})
    source = FolderNight.scan(cfg.input, cfg.calibrate)
    rep = run_ray_night(cfg, progress=False, source=source)
    _, _, local = _night(root / "ztf", tmp_path / "local", "ztf")
    assert {(r["visit"], r["ccd"]): r["status"] for r in rep.summary.per_ccd} == \
        {(r["visit"], r["ccd"]): r["status"] for r in local.per_ccd}
    assert alerts_by_ccd_visit(tmp_path / "ray") == alerts_by_ccd_visit(tmp_path / "local")


@pytest.mark.data
def test_real_decam_pair_as_a_folder(tmp_path):
    d = shared_data("decam")
    night = tmp_path / "night"
    (night / "reference").mkdir(parents=True)
    os.symlink(d / "DEC-OBS04a.mini.fits", night / "DEC-OBS04a.mini.fits")
    os.symlink(d / "DEC-OBS18a.mini.fits", night / "reference" / "DEC-OBS18a.mini.fits")
    cfg = load_config(None, input={"dir": str(night), "preset": "decam"}, package={"output_dir": str(tmp_path / "o")},
                      run={"engine": "local"})
    source = FolderNight.scan(cfg.input, cfg.calibrate)
    (key, frame), = source.plan.science.items()
    assert frame.calibrated and key == (0, 37)  # InstCal; no EXPNUM: visits by DATE-OBS (noted)
    assert any("DATE-OBS" in n for n in source.plan.notes)
    summary = run_simulated_night(cfg, workers=1, progress=False, source=source)
    assert summary.n_done == 1
    alerts = alerts_by_ccd_visit(tmp_path / "o")[key].values()
    sn = [a for a in alerts if np.hypot(a["candidate"]["xpos"] - 1 - 130, a["candidate"]["ypos"] - 1 - 128) < 2]
    assert sn and sn[0]["candidate"]["isdiffpos"] == "t", "the supernova was not found"


def test_visit_numbers_beyond_alert_ids_are_skipped(tmp_path):
    """A Rubin visit id (day_obs * 100000 + seq: 13 digits) cannot make alert ids: skipped, saying what to set."""
    from nightsift.engine.records import MAX_VISIT

    cfg = _config(tmp_path / "s")
    s = simulate_visit_ccd(cfg.simulate, visit=0, ccd=0)
    (tmp_path / "night" / "reference").mkdir(parents=True)
    s.reference.header["DETECTOR"] = 0
    write_exposure(tmp_path / "night" / "reference" / "template_R22_S11.fits", s.reference)
    for name, visit in (("calexp_a.fits", 2024112300123), ("calexp_b.fits", 7)):
        s.science_raw.header.update({"IMGTYPE": "OBJECT", "VISIT": visit, "DETECTOR": 0})
        fits.PrimaryHDU(s.science_raw.data, s.science_raw.header).writeto(tmp_path / "night" / name)
    plan = scan_folder(load_config(None, input={"dir": str(tmp_path / "night"), "preset": "lsst"}).input)
    assert plan.tasks() == [(7, 0), (2024112300123, 0)] and MAX_VISIT < 2024112300123
    assert all(f.calibrated for f in plan.science.values())  # calexp*: the lsst preset's processed frames
    assert list(plan.skip) == [(2024112300123, 0)] and "(Rubin: SEQNUM)" in plan.skip[(2024112300123, 0)]


def test_psf_files_beside_the_images_are_used(tmp_path):
    """A space-like calibrated pair (MJy/sr, ERR) whose science and reference bring their PSFs as
    ``<stem>_psf.fits``: the night uses them (QA says so), and its alerts are those of
    ``process_pair`` given the same files; the PSF files are not taken for images."""
    from nightsift.engine.orchestration.ledger import read_ledger
    from nightsift.engine.simulate import simulate_space_pair

    paths = simulate_space_pair(seed=1).write(tmp_path / "sim")
    night = tmp_path / "night"
    (night / "reference").mkdir(parents=True)
    shutil.copy(paths["sci"], night / "sci_v1.fits")
    shutil.copy(paths["psf_sci"], night / "sci_v1_psf.fits")
    shutil.copy(paths["ref"], night / "reference" / "deep.fits")
    shutil.copy(paths["psf_ref"], night / "reference" / "deep_psf.fits")
    cfg = load_config(None, package={"output_dir": str(tmp_path / "out")}, classify={"backend": "none"},
                      input={"dir": str(night)}, run={"engine": "local"})
    source = FolderNight.scan(cfg.input, cfg.calibrate)
    assert source.tasks() == [(0, 0)]  # the PSF files are not science frames
    assert any("2 of 2 science/reference frames bring a PSF file" in n for n in source.plan.notes)
    summary = run_simulated_night(cfg, workers=1, progress=False, source=source)
    assert summary.n_done == 1
    rec, = read_ledger(tmp_path / "out")
    assert (rec["qa"]["psf_source_sci"], rec["qa"]["psf_source_ref"]) == ("file:sci_v1_psf.fits", "file:deep_psf.fits")
    direct = cfg.replace(package={"output_dir": str(tmp_path / "direct")})
    process_pair(read_exposure(night / "sci_v1.fits"), read_exposure(night / "reference" / "deep.fits"),
                 config=direct, sci_psf=str(night / "sci_v1_psf.fits"), ref_psf=str(night / "reference" / "deep_psf.fits"))
    got = alerts_by_ccd_visit(tmp_path / "out")
    assert got == alerts_by_ccd_visit(tmp_path / "direct") and len(got[(0, 0)]) >= 3


def test_noise_maps_beside_the_images_are_used(tmp_path):
    """Flux-unit images without a noise extension, each with its noise map in a file beside it
    (``<stem>_wht.fits``; SWarp's ``<stem>.weight.fits``): the night reads them (no GAIN needed),
    does not take them for images, and equals ``process_pair`` on the same files and maps."""
    from astropy.io import fits as afits

    from nightsift.engine.simulate import simulate_space_pair

    paths = simulate_space_pair(seed=2).write(tmp_path / "sim")
    night = tmp_path / "night"
    (night / "reference").mkdir(parents=True)
    targets = {"sci": (night / "sci_v1.fits", night / "sci_v1_wht.fits"),
               "ref": (night / "reference" / "deep.fits", night / "reference" / "deep.weight.fits")}
    for key, (image, weight) in targets.items():
        with afits.open(paths[key]) as hl:
            afits.HDUList([afits.PrimaryHDU(hl["SCI"].data, hl[0].header + hl["SCI"].header)]).writeto(image)
            afits.PrimaryHDU((1.0 / hl["ERR"].data.astype(np.float64) ** 2).astype(np.float32)).writeto(weight)
    cfg = load_config(None, package={"output_dir": str(tmp_path / "out")}, classify={"backend": "none"},
                      input={"dir": str(night)}, run={"engine": "local"})
    source = FolderNight.scan(cfg.input, cfg.calibrate)
    assert source.tasks() == [(0, 0)] and not source.plan.ignored  # the maps are not science frames
    assert any("2 of 2 science/reference frames bring a noise map file" in n for n in source.plan.notes)
    summary = run_simulated_night(cfg, workers=1, progress=False, source=source)
    assert summary.n_done == 1
    direct = cfg.replace(package={"output_dir": str(tmp_path / "direct")})
    sci = read_exposure(targets["sci"][0], noise=targets["sci"][1], noise_kind="wht")
    ref = read_exposure(targets["ref"][0], noise=targets["ref"][1], noise_kind="weight")
    assert sci.header["NSBUNIT"] == "MJy/sr" and "GAIN" not in sci.header
    res = process_pair(sci, ref, config=direct)
    got = alerts_by_ccd_visit(tmp_path / "out")
    assert got == alerts_by_ccd_visit(tmp_path / "direct") and len(got[(0, 0)]) == res.n_alerts >= 3
