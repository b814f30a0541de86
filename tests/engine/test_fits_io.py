"""FITS I/O: round trips, unit handling, variance estimate, and every InputError naming the file."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from nightsift.engine.errors import InputError
from nightsift.engine.io.fits import (
    check_same_shape,
    estimate_variance,
    read_exposure,
    read_raw,
    replace_wcs,
    write_exposure,
    write_image,
)
from nightsift.engine.records import Exposure, MaskBits

from ..conftest import shared_data


def _wcs(shape=(64, 80)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = np.array([[-0.27, 0.0], [0.0, 0.27]]) / 3600
    return w


def _raw_header(shape=(64, 80), **extra):
    h = _wcs(shape).to_header()
    h["GAIN"] = 2.0
    h["SATURATE"] = 60000.0
    h["EXPTIME"] = 30.0
    h["RDNOISE"] = 5.0
    for k, v in extra.items():
        if v is None:
            del h[k]
        else:
            h[k] = v
    return h


def _write_raw(path, data=None, header=None, shape=(64, 80), rng=None):
    rng = rng or np.random.default_rng(1)
    if data is None:
        data = (1000 + rng.normal(0, 5, shape)).astype(np.float32)
    fits.PrimaryHDU(data, header=header if header is not None else _raw_header(shape)).writeto(path)
    return path


def test_read_raw_ok(tmp_path, rng):
    p = _write_raw(tmp_path / "raw.fits", rng=rng)
    r = read_raw(p)
    assert r.data.dtype == np.float32 and r.data.shape == (64, 80)
    assert r.header["GAIN"] == 2.0 and r.path == str(p)


def test_read_raw_mef_merges_primary_header(tmp_path, rng):
    h = _raw_header()
    exptime = h.pop("EXPTIME")
    prim = fits.PrimaryHDU()
    prim.header["EXPTIME"] = exptime
    prim.header["FILTER"] = "r"
    data = (1000 + rng.normal(0, 5, (64, 80))).astype(np.float32)
    fits.HDUList([prim, fits.ImageHDU(data, header=h, name="CCD1")]).writeto(tmp_path / "mef.fits")
    r = read_raw(tmp_path / "mef.fits", hdu="CCD1")
    assert r.header["EXPTIME"] == 30.0 and r.header["FILTER"] == "r"
    np.testing.assert_array_equal(r.data, data)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b"this is not a FITS file" * 200), "not a readable FITS"),
        (lambda p: _write_raw(p, data=np.full((64, 80), np.nan, np.float32)), "no finite pixel"),
        (lambda p: _write_raw(p, data=np.zeros((64, 80), np.float32)), "constant"),
        (lambda p: _write_raw(p, header=_raw_header(GAIN=None)), "GAIN"),
        (lambda p: _write_raw(p, header=_raw_header(GAIN=-1.0)), "GAIN"),
        (lambda p: _write_raw(p, header=_raw_header(SATURATE=None)), "SATURATE"),
        (lambda p: _write_raw(p, header=_raw_header(EXPTIME="long")), "EXPTIME"),
        (lambda p: _write_raw(p, header=fits.Header({"GAIN": 2.0, "SATURATE": 6e4, "EXPTIME": 3.0})), "WCS"),
        (lambda p: fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(p), "no 2-D image"),
    ],
    ids=["missing", "garbage", "nan-only", "constant", "no-gain", "bad-gain", "no-saturate",
         "bad-exptime", "no-wcs", "cube"],
)
def test_read_raw_errors_name_the_file(tmp_path, make, words):
    p = tmp_path / "bad.fits"
    make(p)
    with pytest.raises(InputError) as err:
        read_raw(p)
    assert str(p) in str(err.value) and err.value.path == str(p)
    assert words in str(err.value)


def test_truncated_file(tmp_path, rng):
    p = _write_raw(tmp_path / "full.fits", data=rng.normal(0, 1, (300, 300)).astype(np.float32),
                   header=_raw_header((300, 300)))
    data = p.read_bytes()
    for cut, name in ((len(data) // 2, "half.fits"), (1000, "header.fits")):
        q = tmp_path / name
        q.write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated|corrupt|not a readable") as err:
            read_raw(q)
        assert str(q) in str(err.value)
        with pytest.raises(InputError):
            read_exposure(q)


def test_exposure_round_trip(tmp_path, rng):
    shape = (64, 80)
    w = _wcs(shape)
    h = fits.Header({"EXPTIME": 30.0, "FILTER": "g", "MJD-OBS": 60000.5})
    mask = np.zeros(shape, np.uint16)
    mask[3, 4] = MaskBits.BAD | MaskBits.SAT
    mask[10, 10] = MaskBits.NO_DATA
    e = Exposure(
        image=rng.normal(500, 20, shape).astype(np.float32),
        variance=rng.uniform(300, 500, shape).astype(np.float32),
        mask=mask, wcs=w, header=h,
    )
    p = tmp_path / "e.fits"
    write_exposure(p, e)
    back = read_exposure(p)
    np.testing.assert_array_equal(back.image, e.image)
    np.testing.assert_array_equal(back.variance, e.variance)
    np.testing.assert_array_equal(back.mask, e.mask)
    assert back.header["FILTER"] == "g" and back.header["BUNIT"] == "electron"
    x, y = rng.uniform(0, 80, 20), rng.uniform(0, 64, 20)
    np.testing.assert_allclose(back.wcs.all_pix2world(x, y, 0), w.all_pix2world(x, y, 0), atol=1e-12)
    with fits.open(p) as hd:
        assert [h.name for h in hd] == ["PRIMARY", "IMAGE", "VARIANCE", "MASK"]
        assert hd["MASK"].header["MB_BAD"] == 1


def test_replace_wcs_swaps_all_wcs_cards():
    old = _wcs()
    h = old.to_header()
    h["PV2_1"] = 1.0  # a stray distortion card of the old WCS must not survive
    h["OBJECT"] = "field"
    new = _wcs()
    new.wcs.crval = [10.0, -30.0]
    out = replace_wcs(h, new)
    assert out["OBJECT"] == "field" and out["CRVAL1"] == 10.0 and "PV2_1" not in out


def test_read_exposure_adu_with_variance_estimate(tmp_path, rng):
    """An ADU image without VARIANCE: scaled by GAIN, variance = background RMS^2 + source e-."""
    shape = (256, 256)
    gain, sky_e = 4.0, 2000.0
    yy, xx = np.mgrid[0:256, 0:256]
    star = 4e5 * np.exp(-((xx - 128.3) ** 2 + (yy - 100.7) ** 2) / (2 * 2.0**2)) / (2 * np.pi * 4.0)
    expected = sky_e + star
    e_img = rng.poisson(expected) + rng.normal(0, 6, shape)
    adu = (e_img / gain - sky_e / gain).astype(np.float32)  # sky-subtracted, like DECam InstCal
    adu[5, 5] = np.nan
    h = _wcs(shape).to_header()
    h["GAIN"] = gain
    fits.PrimaryHDU(adu, header=h).writeto(tmp_path / "ref.fits")
    e = read_exposure(tmp_path / "ref.fits")
    assert e.mask[5, 5] == MaskBits.NO_DATA and np.isfinite(e.image).all()
    blank = (np.hypot(xx - 128, yy - 100) > 30) & (e.mask == 0)
    np.testing.assert_allclose(np.median(e.image[blank]), 0.0, atol=5)
    # blank-sky variance: sky Poisson + read noise, measured empirically
    assert np.median(e.variance[blank]) == pytest.approx(sky_e + 36, rel=0.05)
    # at the star's peak, the source's own Poisson noise is added
    assert e.variance[100, 128] == pytest.approx(expected[100, 128] + 36, rel=0.1)
    v = estimate_variance(e.image)
    assert v.dtype == np.float32 and v.shape == shape


def test_read_exposure_needs_gain_or_electrons(tmp_path, rng):
    h = _wcs().to_header()
    fits.PrimaryHDU(rng.normal(0, 1, (64, 80)).astype(np.float32), header=h).writeto(tmp_path / "a.fits")
    with pytest.raises(InputError, match="GAIN") as err:
        read_exposure(tmp_path / "a.fits")
    assert str(tmp_path / "a.fits") in str(err.value)
    h["BUNIT"] = "electron"
    fits.PrimaryHDU(rng.normal(0, 1, (64, 80)).astype(np.float32), header=h).writeto(tmp_path / "b.fits")
    assert read_exposure(tmp_path / "b.fits").image.shape == (64, 80)


def test_read_exposure_extension_shape_mismatch(tmp_path, rng):
    h = _wcs().to_header()
    h["BUNIT"] = "electron"
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(rng.normal(0, 1, (64, 80)).astype(np.float32), header=h, name="IMAGE"),
        fits.ImageHDU(np.ones((64, 79), np.float32), name="VARIANCE"),
    ]).writeto(tmp_path / "m.fits")
    with pytest.raises(InputError, match="does not match") as err:
        read_exposure(tmp_path / "m.fits")
    assert "VARIANCE" in str(err.value)


def test_check_same_shape_and_write_image(tmp_path):
    check_same_shape(np.zeros((3, 4)), (3, 4))
    with pytest.raises(InputError, match=r"sci\.fits.*ref\.fits"):
        check_same_shape(np.zeros((3, 4)), np.zeros((4, 3)), ("sci.fits", "ref.fits"))
    write_image(tmp_path / "d.fits", np.arange(12.0).reshape(3, 4), fits.Header({"OBJECT": "x"}))
    with fits.open(tmp_path / "d.fits") as hd:
        assert hd[0].header["OBJECT"] == "x" and hd[0].data.shape == (3, 4)


@pytest.mark.data
def test_read_real_decam_tpv():
    d = shared_data("decam")
    e = read_exposure(d / "DEC-OBS04a.mini.fits")
    h = fits.getheader(d / "DEC-OBS04a.mini.fits")
    assert e.image.shape == (256, 256)
    # ADU -> e-: sky-subtracted image, empirical sky noise ~ AVSIG (ADU) * GAIN
    noise_e = np.sqrt(np.median(e.variance[e.mask == 0]))
    assert noise_e == pytest.approx(h["AVSIG"] * h["GAIN"], rel=0.1)
    # the TPV distortion is honoured: pixel -> sky agrees with astropy on the raw header
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = WCS(h)
    x, y = np.array([0.0, 128.0, 255.0]), np.array([0.0, 128.0, 255.0])
    np.testing.assert_allclose(e.wcs.all_pix2world(x, y, 0), w.all_pix2world(x, y, 0), atol=1e-12)


# ------------------------------------------------------------------ SATURATE on calibrated inputs (issue #14)
def _star_field(shape=(64, 80), peak=5000.0, sky=100.0, rng=None):
    rng = rng or np.random.default_rng(3)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = sky + peak * np.exp(-((xx - 40) ** 2 + (yy - 30) ** 2) / (2 * 2.0**2)) + rng.normal(0, 3, shape)
    return img.astype(np.float32)


@pytest.mark.parametrize("bunit, gain", [("electron", 1.0), ("adu", 4.0), (None, 2.5)])
def test_read_exposure_flags_saturate_in_the_pixels_units(tmp_path, bunit, gain):
    """SATURATE is in the file's pixel units; SAT where the pixels reach 0.98 x SATURATE, grown by 1 px."""
    level = 3000.0
    data = np.minimum(_star_field(), level)
    h = _wcs(data.shape).to_header()
    h["GAIN"] = gain
    h["SATURATE"] = level
    if bunit:
        h["BUNIT"] = bunit
    fits.PrimaryHDU(data, h).writeto(tmp_path / "c.fits")
    e = read_exposure(tmp_path / "c.fits")
    clipped = data >= 0.98 * level
    assert clipped.sum() > 4
    sat = (e.mask & MaskBits.SAT) != 0
    from scipy.ndimage import binary_dilation

    np.testing.assert_array_equal(sat, binary_dilation(clipped, structure=np.ones((3, 3), bool)))
    scale = 1.0 if bunit == "electron" else gain
    np.testing.assert_allclose(e.image, data * scale, rtol=1e-6)


def test_read_exposure_saturation_config_and_mask_extension(tmp_path):
    from nightsift.engine.config import CalibrateConfig

    level = 3000.0
    data = np.minimum(_star_field(), level)
    h = _wcs(data.shape).to_header()
    h["BUNIT"], h["SATURATE"] = "electron", level
    mask = np.zeros(data.shape, np.uint16)
    mask[0, 0] = MaskBits.BAD
    e = Exposure(image=data, variance=np.full(data.shape, 100.0, np.float32), mask=mask, wcs=_wcs(data.shape),
                 header=h)
    write_exposure(tmp_path / "e.fits", e)
    back = read_exposure(tmp_path / "e.fits", config=CalibrateConfig(saturation_grow=0))
    assert back.mask[0, 0] == MaskBits.BAD  # the MASK extension is kept
    np.testing.assert_array_equal((back.mask & MaskBits.SAT) != 0, data >= 0.98 * level)
    # what read_exposure returns round-trips unchanged
    write_exposure(tmp_path / "again.fits", back)
    again = read_exposure(tmp_path / "again.fits", config=CalibrateConfig(saturation_grow=0))
    np.testing.assert_array_equal(again.mask, back.mask)
    np.testing.assert_array_equal(again.image, back.image)


@pytest.mark.parametrize("value, words", [("high", "not a number"), (-5.0, "> 0"), (0.0, "> 0"),
                                          (50.0, "overexposed")])
def test_read_exposure_bad_saturate_names_the_file(tmp_path, value, words):
    data = _star_field()
    h = _wcs(data.shape).to_header()
    h["BUNIT"], h["SATURATE"] = "electron", value
    p = tmp_path / "sat.fits"
    fits.PrimaryHDU(data, h).writeto(p)
    with pytest.raises(InputError, match=words) as err:
        read_exposure(p)
    assert err.value.path == str(p) and "SATURATE" in str(err.value)


def test_calibrated_header_keeps_raw_saturation_apart():
    """A nightsift-calibrated frame (e-) must not carry the raw ADU level as SATURATE."""
    from nightsift.engine.stages.calibrate import calibrated_header

    h = calibrated_header(_raw_header(), 5.0)
    assert h["BUNIT"] == "electron" and "SATURATE" not in h and h["SATURADU"] == 60000.0


# ------------------------------------------------------------------ WCS cards astropy would repair (issue #14)
def _decam_header():
    return fits.getheader(shared_data("decam") / "DEC-OBS04a.mini.fits")


def _patch_card(path, key, raw_value):
    """Overwrite card ``key`` of the FITS file at ``path`` in place with an 80-char card whose value
    text is ``raw_value`` verbatim (so it can be unparsable: astropy would refuse to write it)."""
    b = bytearray(Path(path).read_bytes())
    i = b.index((key.ljust(8) + "=").encode())
    b[i:i + 80] = (key.ljust(8) + "= " + raw_value).ljust(80)[:80].encode()
    Path(path).write_bytes(bytes(b))
    return path


def _write_cutout(path, header):
    data = fits.getdata(shared_data("decam") / "DEC-OBS04a.mini.fits")
    fits.PrimaryHDU(data, header).writeto(path)
    return path


@pytest.mark.data
@pytest.mark.parametrize("key, value", [("CD1_1", "-4.2777691827E-0x"), ("CD2_2", "-4.1783637764O-07"),
                                        ("PV1_5", "8.22514996524E-0x"), ("PV2_10", "'abc'"),
                                        ("CRPIX1", "-58x.2001"), ("CRVAL2", "'-66.0'")])
def test_unparsable_wcs_card_is_an_error_naming_file_and_card(tmp_path, key, value):
    """One bad character in a CD / TPV PV / CRPIX / CRVAL card: astropy drops the card (the WCS moves
    by pixels); nightsift refuses the file, naming it and the card, in one line."""
    p = _patch_card(_write_cutout(tmp_path / "badwcs.fits", _decam_header()), key, value)
    with pytest.raises(InputError) as err:
        read_exposure(p)
    msg = str(err.value)
    assert err.value.path == str(p) and str(p) in msg and key in msg and "\n" not in msg


@pytest.mark.data
def test_real_decam_tpv_headers_load_without_complaint(tmp_path):
    """Every real DECam header (TPV) loads; a missing MJD-OBS that astropy's datfix sets from
    DATE-OBS is an informational fix, not an error."""
    import glob

    for f in sorted(glob.glob(str(shared_data("decam") / "DEC-OBS*.fits"))):
        read_exposure(f)
    h = _decam_header()
    del h["MJD-OBS"]
    read_exposure(_write_cutout(tmp_path / "nomjd.fits", h))


@pytest.mark.data
def test_zero_cd_matrix_is_one_line(tmp_path):
    h = _decam_header()
    for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        h[k] = 0.0
    p = _write_cutout(tmp_path / "zerocd.fits", h)
    with pytest.raises(InputError, match="singular") as err:
        read_exposure(p)
    assert "\n" not in str(err.value) and "wcs.c" not in str(err.value) and str(p) in str(err.value)


def test_cd_card_the_wcs_does_not_use_is_an_error(tmp_path, rng):
    """A header with both PC and CD: wcslib uses PC and ignores CD without a warning."""
    shape = (64, 80)
    h = _raw_header(shape)
    h["PC1_1"], h["PC2_2"] = 1.0, 1.0
    h["CDELT1"], h["CDELT2"] = -7.5e-5, 7.5e-5
    h["CD1_1"] = -1e-4
    h["BUNIT"] = "electron"
    p = tmp_path / "pccd.fits"
    fits.PrimaryHDU(rng.normal(100, 5, shape).astype(np.float32), h).writeto(p)
    with pytest.raises(InputError, match="CD1_1") as err:
        read_exposure(p)
    assert str(p) in str(err.value)


def test_photometric_keys_are_read_one_way():
    """Zero point and EXPTIME: absent -> None (no magnitude, never a default zero point); present
    but broken -> InputError naming the file and the key; EXPTIME <= 0 -> no photometry."""
    from nightsift.engine.io.fits import header_exptime, header_photometry, header_zero_point

    h = fits.Header()
    assert header_zero_point(h) is None and header_exptime(h) is None and header_photometry(h) is None
    assert header_photometry(None) is None
    h["MAGZPT"] = 30.5
    assert header_zero_point(h) == 30.5 and header_photometry(h) is None  # no EXPTIME
    h["EXPTIME"] = 0.0
    assert header_exptime(h) == 0.0 and header_photometry(h) is None
    h["EXPTIME"] = 90.0
    assert header_photometry(h) == (30.5, 90.0)
    h["MAGZP"] = 31.0  # MAGZP first
    assert header_photometry(h) == (31.0, 90.0)
    h["EXPTIME"] = "long"
    with pytest.raises(InputError, match="EXPTIME") as err:
        header_photometry(h, path="sci.fits")
    assert err.value.path == "sci.fits"
