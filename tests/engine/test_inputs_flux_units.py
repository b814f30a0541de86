"""Images as users have them: flux units (MJy/sr, nJy) with a noise map (ERR, WHT, VARIANCE, a
separate file), drizzle-style SCI/ERR/WHT and Rubin-style IMAGE/MASK/VARIANCE files.

Injected truth: a simulated pair is written once in e- (nightsift's own files) and again in flux
units built from its known zero points (``c = 3631 Jy 10**(-0.4 MAGZP) / EXPTIME`` per e-); the
chain must find the same candidates with the same S/N, and magnitudes that are the AB
magnitudes of the fluxes in Jy.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs.utils import proj_plane_pixel_area

from nightsift.engine.cli import main
from nightsift.engine.config import CalibrateConfig, Config
from nightsift.engine.errors import InputError
from nightsift.engine.io.fits import header_photometry, read_exposure, write_exposure
from nightsift.engine.pipeline import process_pair
from nightsift.engine.records import MaskBits
from nightsift.engine.simulate.pair import simulate_ccd_pair

#: AB zero flux (Jy)
AB = 3631.0
#: cards a flux-unit file of another survey would not carry
_E_CARDS = ("BUNIT", "GAIN", "MAGZP", "SATURATE", "RDNOISE", "NSBUNIT", "NSNOISE")
#: Rubin (afw) mask planes: name -> bit
_AFW = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "NO_DATA": 8}


def _pixel_sr(wcs) -> float:
    return float(proj_plane_pixel_area(wcs.celestial)) * (math.pi / 180) ** 2


def _jy_per_e(header) -> float:
    """Jy of 1 e- in an image whose MAGZP gives 1 e-/s over EXPTIME s (the simulator's convention)."""
    return AB * 10 ** (-0.4 * float(header["MAGZP"])) / float(header["EXPTIME"])


def _flux_header(exposure, bunit: str, c: float, **cards) -> fits.Header:
    """The exposure's header as a flux-unit file has it: no GAIN/MAGZP, SATURATE in the new unit."""
    h = exposure.header.copy()
    for k in _E_CARDS:
        h.remove(k, ignore_missing=True, remove_all=True)
    h.extend(exposure.wcs.to_header(), update=True)
    h["BUNIT"] = bunit
    if "SATURATE" in exposure.header:
        h["SATURATE"] = float(exposure.header["SATURATE"]) * c
    for k, v in cards.items():
        h[k] = v
    return h


def _afw_mask(mask) -> tuple[np.ndarray, fits.Header]:
    """nightsift MaskBits as a Rubin int32 mask with its MP_* cards (plus DETECTED planes to ignore)."""
    out = np.zeros(mask.shape, np.int32)
    for bit in (MaskBits.BAD, MaskBits.SAT, MaskBits.NO_DATA, MaskBits.CR, MaskBits.EDGE):
        out[(mask & bit) != 0] |= np.int32(1 << _AFW[bit.name])
    out[::7, ::5] |= np.int32(1 << _AFW["DETECTED"])
    h = fits.Header()
    for name, b in _AFW.items():
        h[f"HIERARCH MP_{name}"] = b  # as afw writes them (long plane names)
    return out, h


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The simulated pair in e- and in flux units (dict of paths and the conversion factors)."""
    d = tmp_path_factory.mktemp("flux")
    sim = simulate_ccd_pair("decam", shape=(384, 384), seed=11, n_transients=12)
    sci, ref = sim.science_exposure(), sim.reference
    write_exposure(d / "sci_e.fits", sci)
    write_exposure(d / "ref_e.fits", ref)
    sci, ref = read_exposure(d / "sci_e.fits"), read_exposure(d / "ref_e.fits")  # what the e- run sees
    area = _pixel_sr(sci.wcs)
    c_sci = _jy_per_e(sci.header) / (1e6 * area)  # MJy/sr per e-
    c_ref = _jy_per_e(ref.header) * 1e9  # nJy per e-
    img_s, var_s = sci.image.astype(np.float64) * c_sci, sci.variance.astype(np.float64) * c_sci**2
    img_r, var_r = ref.image.astype(np.float64) * c_ref, ref.variance.astype(np.float64) * c_ref**2
    f32 = np.float32

    # A. science drizzle-style: metadata in the primary header, SCI (MJy/sr, PIXAR_SR), ERR, a WHT that
    #    is wrong by 4x (ERR must win), MASK; reference nJy with WHT (inverse variance), SCI last. Both
    #    give GAIN (e- per unit): the source Poisson terms are then exactly the e- run's
    hs = _flux_header(sci, "MJy/sr", c_sci, PIXAR_SR=area, GAIN=1 / c_sci)
    meta = fits.Header([c for c in hs.cards if c.keyword in ("EXPTIME", "MJD-OBS", "DATE-OBS", "FILTER")])
    fits.HDUList([fits.PrimaryHDU(header=meta), fits.ImageHDU(img_s.astype(f32), hs, name="SCI"),
                  fits.ImageHDU(np.sqrt(var_s).astype(f32), name="ERR"),
                  fits.ImageHDU((0.25 / var_s).astype(f32), name="WHT"),
                  fits.ImageHDU(sci.mask, name="MASK")]).writeto(d / "sci_drz.fits")
    hr = _flux_header(ref, "nJy", c_ref, GAIN=1 / c_ref)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU((1.0 / var_r).astype(f32), name="WHT"),
                  fits.ImageHDU(ref.mask, name="MASK"),
                  fits.ImageHDU(img_r.astype(f32), hr, name="SCI")]).writeto(d / "ref_wht.fits")
    hr = _flux_header(ref, "nJy", c_ref)  # B: no GAIN, as Rubin and JWST files

    # B. science: image in the primary HDU (MJy/sr, pixel area from the WCS) + MASK, its variance in a
    #    separate file told by BUNIT alone; reference Rubin-style IMAGE/MASK/VARIANCE in nJy. No GAIN:
    #    the source Poisson scale is measured on the noise maps
    hs2 = _flux_header(sci, "MJy/sr", c_sci)
    fits.HDUList([fits.PrimaryHDU(img_s.astype(f32), hs2), fits.ImageHDU(sci.mask, name="MASK")]).writeto(
        d / "sci_img.fits")
    fits.PrimaryHDU(var_s.astype(f32), fits.Header({"BUNIT": "MJy2 sr-2"})).writeto(d / "sci_noise.fits")
    m, mh = _afw_mask(ref.mask)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img_r.astype(f32), hr, name="IMAGE"),
                  fits.ImageHDU(m, mh, name="MASK"), fits.ImageHDU(var_r.astype(f32), name="VARIANCE")]).writeto(
        d / "ref_rubin.fits")
    return dict(dir=d, area=area, c_sci=c_sci, c_ref=c_ref, truth=sim.transients)


def _run(sci, ref, tmp_path):
    cfg = Config().replace(package={"output_dir": str(tmp_path)})
    return process_pair(sci, ref, config=cfg, write=False)


@pytest.fixture(scope="module")
def electron_run(pair, tmp_path_factory):
    d = pair["dir"]
    return _run(read_exposure(d / "sci_e.fits"), read_exposure(d / "ref_e.fits"), tmp_path_factory.mktemp("e"))


def _same_candidates(got, want, c_sci: float):
    """Same candidates (positions, S/N, magnitudes) as the e- run; fluxes scaled by ``c_sci``. The
    pixels differ by float32 rounding only: the tolerances are 100x what that makes (~5e-6)."""
    assert len(want) >= 8, "the simulated pair should give candidates to compare"
    assert len(got) == len(want)
    g, w = np.sort(got, order=["ypos", "xpos"]), np.sort(want, order=["ypos", "xpos"])
    np.testing.assert_allclose(g["xpos"], w["xpos"], atol=5e-4)
    np.testing.assert_allclose(g["ypos"], w["ypos"], atol=5e-4)
    np.testing.assert_allclose(g["snr"], w["snr"], rtol=5e-4)
    np.testing.assert_array_equal(g["isdiffpos"], w["isdiffpos"])
    np.testing.assert_allclose(g["flux"], w["flux"] * c_sci, rtol=5e-4)
    np.testing.assert_allclose(g["magpsf"], w["magpsf"], atol=5e-4)
    return g


def test_drizzle_style_mef_and_weight_map_give_the_e_candidates(pair, electron_run, tmp_path):
    d = pair["dir"]
    sci, ref = read_exposure(d / "sci_drz.fits"), read_exposure(d / "ref_wht.fits")
    assert sci.header["BUNIT"] == "MJy/sr" and sci.header["NSBUNIT"] == "MJy/sr"
    assert "ERR" in sci.header["NSNOISE"] and "WHT" in ref.header["NSNOISE"]
    # the zero points are the AB magnitudes of 1 MJy/sr over one pixel and of 1 nJy
    assert sci.header["MAGZP"] == pytest.approx(-2.5 * math.log10(1e6 * pair["area"] / AB), abs=1e-6)
    assert ref.header["MAGZP"] == pytest.approx(31.4, abs=1e-3)
    res = _run(sci, ref, tmp_path)
    g = _same_candidates(res.candidates, electron_run.candidates, pair["c_sci"])
    # magnitudes are those of the fluxes in Jy (the injected zero point), and ZOGY's F_r is the
    # nJy-per-(MJy/sr) ratio of the same source: 1e15 x pixel area
    flux_jy = np.abs(g["flux"]) * 1e6 * pair["area"]
    np.testing.assert_allclose(g["magpsf"], -2.5 * np.log10(flux_jy / AB), atol=1e-6)
    assert res.qa["F_r"] == pytest.approx(electron_run.qa["F_r"] * pair["c_ref"] / pair["c_sci"], rel=2e-3)
    assert res.qa["F_r_zero_points"] == pytest.approx(1e15 * pair["area"], rel=1e-6)
    assert res.qa["sci_unit"] == "MJy/sr" and res.qa["ref_unit"] == "nJy"
    assert res.qa["sci_noise_masked"] == 0 and res.qa["sci_zp_source"] == "BUNIT MJy/sr"
    assert sci.header["NSPOISRC"] == "GAIN" and sci.header["NSPOISS"] == pytest.approx(pair["c_sci"], rel=1e-6)


def test_poisson_scale_measured_on_the_noise_maps(pair):
    """Without GAIN, the image units per e- come from the noise map's source term: the science's
    1/flat ~ 1 in e- (so ~c), the reference coadd's 1/NCOMBINE of it (a mean of 4 frames)."""
    d = pair["dir"]
    sci = read_exposure(d / "sci_img.fits", noise=d / "sci_noise.fits")
    ref = read_exposure(d / "ref_rubin.fits")
    assert sci.header["NSPOISRC"] == ref.header["NSPOISRC"] == "noise map"
    assert sci.header["NSPOISS"] == pytest.approx(pair["c_sci"], rel=0.02)
    assert ref.header["NSPOISS"] == pytest.approx(pair["c_ref"] / 4, rel=0.03)


@pytest.fixture(scope="module")
def electron_run_measured(pair, tmp_path_factory):
    """The e- run with the source Poisson scales the flux files' noise maps give (in e- units)."""
    d = pair["dir"]
    sci, ref = read_exposure(d / "sci_e.fits"), read_exposure(d / "ref_e.fits")
    measured = read_exposure(d / "sci_img.fits", noise=d / "sci_noise.fits").header["NSPOISS"]
    sci.header["NSPOISS"] = measured / pair["c_sci"]
    ref.header["NSPOISS"] = read_exposure(d / "ref_rubin.fits").header["NSPOISS"] / pair["c_ref"]
    return _run(sci, ref, tmp_path_factory.mktemp("em"))


def test_separate_noise_file_and_rubin_layout_through_the_cli(pair, electron_run_measured, tmp_path):
    d = pair["dir"]
    out = tmp_path / "sub"
    rc = main(["subtract", str(d / "sci_img.fits"), str(d / "ref_rubin.fits"), "--sci-noise",
               str(d / "sci_noise.fits"), "--out", str(out)])
    assert rc == 0
    got = np.asarray(Table.read(out / "candidates.ecsv").as_array())
    g = _same_candidates(got, electron_run_measured.candidates, pair["c_sci"])
    np.testing.assert_allclose(g["magpsf"], -2.5 * np.log10(np.abs(g["flux"]) * 1e6 * pair["area"] / AB), atol=1e-6)
    # the Rubin mask planes became MaskBits: the same as the e- reference's mask, DETECTED ignored
    np.testing.assert_array_equal(read_exposure(d / "ref_rubin.fits").mask, read_exposure(d / "ref_e.fits").mask)


# ------------------------------------------------------------------------------------------------
# reading: small files
# ------------------------------------------------------------------------------------------------
def _small(tmp_path, name, image, *, bunit="MJy/sr", ext=(), primary_image=True, **cards):
    """A small file: the image (primary HDU or SCI), extensions ``ext`` = [(name, data)]."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [image.shape[1] / 2, image.shape[0] / 2]
    w.wcs.cd = [[-0.03 / 3600, 0], [0, 0.03 / 3600]]
    h = w.to_header()
    if bunit is not None:
        h["BUNIT"] = bunit
    for k, v in cards.items():
        h[k] = v
    hdus = ([fits.PrimaryHDU(image.astype(np.float32), h)] if primary_image else
            [fits.PrimaryHDU(), fits.ImageHDU(image.astype(np.float32), h, name="SCI")])
    hdus += [fits.ImageHDU(np.asarray(a), name=n) for n, a in ext]
    p = tmp_path / name
    fits.HDUList(hdus).writeto(p)
    return p


@pytest.fixture
def sky(rng):
    return rng.normal(0.0, 0.02, (48, 64))


def test_missing_gain_and_noise_is_one_line_naming_the_file(tmp_path, sky):
    p = _small(tmp_path, "nognoise.fits", sky)
    with pytest.raises(InputError) as err:
        read_exposure(p)
    msg = str(err.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    assert "no GAIN and no noise map" in msg and "ERR" in msg and "--sci-noise" in msg


def test_noise_map_of_another_shape_names_both(tmp_path, sky):
    p = _small(tmp_path, "img.fits", sky)
    q = _small(tmp_path, "noise.fits", np.ones((48, 63)), bunit=None)
    with pytest.raises(InputError, match="does not match") as err:
        read_exposure(p, noise=q, noise_kind="err")
    msg = str(err.value)
    assert str(p) in msg and str(q) in msg and "\n" not in msg
    r = _small(tmp_path, "mef.fits", sky, primary_image=False, ext=[("ERR", np.ones((47, 64), np.float32))])
    with pytest.raises(InputError, match="does not match") as err:
        read_exposure(r)
    assert f"{r}[SCI]" in str(err.value) and f"{r}[ERR]" in str(err.value)


def test_zero_weight_and_bad_errors_are_masked_and_counted(tmp_path, sky):
    w = np.full(sky.shape, 1 / 0.02**2)
    w[:, :5] = 0.0  # zero weight: no data (a drizzle edge)
    w[10, 10] = -1.0
    p = _small(tmp_path, "wht.fits", sky, ext=[("WHT", w.astype(np.float32))])
    e = read_exposure(p)
    bad = np.zeros(sky.shape, bool)
    bad[:, :5] = bad[10, 10] = True
    assert e.header["NSBADNOI"] == bad.sum()
    assert np.all((e.mask[bad] & MaskBits.NO_DATA) != 0) and not np.any(e.mask[~bad])
    np.testing.assert_allclose(e.variance[~bad], 0.02**2, rtol=1e-5)
    assert np.isfinite(e.variance).all() and np.isfinite(e.image).all()
    np.testing.assert_array_equal(e.image[~bad], sky.astype(np.float32)[~bad])  # flux units kept
    err = np.full(sky.shape, 0.02)
    err[3, 3], err[4, 4] = np.nan, 0.0
    e = read_exposure(_small(tmp_path, "err.fits", sky, ext=[("ERR", err.astype(np.float32))]))
    assert e.header["NSBADNOI"] == 2 and e.mask[3, 3] == e.mask[4, 4] == MaskBits.NO_DATA
    with pytest.raises(InputError, match="no finite error > 0"):
        read_exposure(_small(tmp_path, "err0.fits", sky, ext=[("ERR", np.zeros(sky.shape, np.float32))]))


def test_unknown_unit_or_kind_is_refused(tmp_path, sky):
    with pytest.raises(InputError, match="BUNIT = 'furlongs' is not a unit"):
        read_exposure(_small(tmp_path, "u.fits", sky, bunit="furlongs", ext=[("ERR", np.ones(sky.shape))]))
    q = _small(tmp_path, "n.fits", np.ones(sky.shape), bunit=None)
    p = _small(tmp_path, "i.fits", sky)
    with pytest.raises(InputError, match="cannot tell whether") as err:
        read_exposure(p, noise=q)
    assert str(q) in str(err.value)
    assert read_exposure(p, noise=q, noise_kind="wht").variance.mean() == pytest.approx(1.0)


def test_adu_with_gain_and_err_stays_electrons(tmp_path, sky):
    """Counts with GAIN are made e- as always, the ERR map with them; e- files are untouched."""
    img = 100 + sky * 100
    e = read_exposure(_small(tmp_path, "adu.fits", img, bunit="adu", GAIN=2.5,
                             ext=[("ERR", np.full(img.shape, 3.0, np.float32))]))
    np.testing.assert_allclose(e.image, img * 2.5, rtol=1e-6)
    np.testing.assert_allclose(e.variance, (3.0 * 2.5) ** 2, rtol=1e-6)
    assert e.header["BUNIT"] == "electron" and e.header["NSBUNIT"] == "adu"
    # without GAIN, the same counts stay counts (BUNIT kept) and magnitudes divide by EXPTIME
    k = read_exposure(_small(tmp_path, "adu2.fits", img, bunit=None, EXPTIME=30.0, MAGZP=25.0,
                             ext=[("VARIANCE", np.full(img.shape, 9.0, np.float32))]))
    np.testing.assert_allclose(k.image, img.astype(np.float32))
    assert k.header["BUNIT"] == "adu" and header_photometry(k.header) == (25.0, 30.0)


@pytest.mark.parametrize("cards, zp", [
    ({"BUNIT": "electron/s", "PHOTFNU": 1e-7}, -2.5 * math.log10(1e-7 / AB)),
    ({"BUNIT": "electron/s", "PHOTFLAM": 1e-19, "PHOTPLAM": 6000.0},
     -2.5 * math.log10(1e-19 * 6000.0**2 / 2.99792458e18) - 48.60),
    ({"BUNIT": "uJy"}, 23.9),
    ({"BUNIT": "Jy", "MAGZP": 20.0}, 20.0),  # a zero point of the file's own is kept
])
def test_zero_points_in_the_image_unit(tmp_path, sky, cards, zp):
    bunit = cards.pop("BUNIT")
    e = read_exposure(_small(tmp_path, "zp.fits", sky, bunit=bunit, EXPTIME=500.0,
                             ext=[("ERR", np.full(sky.shape, 0.02, np.float32))], **cards))
    # a rate or flux image: m = zp - 2.5 log10(flux), EXPTIME not used
    assert header_photometry(e.header) == pytest.approx((zp, 1.0), abs=2e-3)


def test_mjy_per_sr_zero_point_from_the_wcs_area(tmp_path, sky):
    e = read_exposure(_small(tmp_path, "sr.fits", sky, ext=[("VARIANCE", np.full(sky.shape, 4e-4, np.float32))]))
    area = (0.03 / 3600 * math.pi / 180) ** 2
    assert e.header["MAGZP"] == pytest.approx(-2.5 * math.log10(1e6 * area / AB), abs=1e-6)
    assert e.header["NSZPSRC"] == "BUNIT MJy/sr"


def test_flux_exposure_round_trip(tmp_path, sky):
    e = read_exposure(_small(tmp_path, "rt.fits", sky, ext=[("ERR", np.full(sky.shape, 0.02, np.float32))]))
    write_exposure(tmp_path / "back.fits", e)
    b = read_exposure(tmp_path / "back.fits")
    assert b.header["BUNIT"] == "MJy/sr" and b.header["NSBUNIT"] == "MJy/sr"
    for a in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(b, a), getattr(e, a))
    assert b.header["MAGZP"] == e.header["MAGZP"]


def test_coadd_gain_times_ncombine_only_for_an_estimated_variance(tmp_path, rng):
    """A flux image without a noise map: GAIN (e- per unit) sets the source noise; with
    calibrate.coadd_gain = 'ncombine' a mean of NCOMBINE frames has GAIN*NCOMBINE."""
    yy, xx = np.mgrid[0:96, 0:96]
    star = 50.0 * np.exp(-((xx - 48) ** 2 + (yy - 48) ** 2) / (2 * 2.0**2))
    img = star + rng.normal(0, 0.1, star.shape)
    p = _small(tmp_path, "coadd.fits", img, bunit="nJy", GAIN=10.0, NCOMBINE=4)
    one = read_exposure(p)
    four = read_exposure(p, config=CalibrateConfig(coadd_gain="ncombine"))
    assert one.header["BUNIT"] == "nJy" and one.header["NSNOISE"] == "estimated"
    np.testing.assert_allclose(one.image, img.astype(np.float32))  # not scaled by GAIN
    src_one = one.variance[48, 48] - np.median(one.variance)
    src_four = four.variance[48, 48] - np.median(four.variance)
    assert src_one == pytest.approx(50.0 / 10.0, rel=0.1)
    assert src_four == pytest.approx(src_one / 4, rel=0.05)


def test_cutouts_say_the_unit_of_their_pixels(pair, tmp_path):
    """A flux-unit science image keeps its unit in the packets' cutouts (BUNIT), an e- one says e-."""
    import glob
    import gzip
    import io

    import fastavro
    from astropy.io import fits as afits

    d = pair["dir"]
    cfg = Config().replace(package={"output_dir": str(tmp_path / "flux")})
    process_pair(read_exposure(d / "sci_drz.fits"), read_exposure(d / "ref_wht.fits"), config=cfg)
    cfg_e = Config().replace(package={"output_dir": str(tmp_path / "e")})
    process_pair(read_exposure(d / "sci_e.fits"), read_exposure(d / "ref_e.fits"), config=cfg_e)

    def units(out):
        (path,) = glob.glob(str(out / "*.avro"))
        with open(path, "rb") as fh:
            alert = next(iter(fastavro.reader(fh)))
        return [afits.getheader(io.BytesIO(gzip.decompress(alert[k]["stampData"])))["BUNIT"]
                for k in ("cutoutScience", "cutoutDifference")]

    assert units(tmp_path / "flux") == ["MJy/sr", "MJy/sr"]
    assert units(tmp_path / "e") == ["e-", "e-"]
