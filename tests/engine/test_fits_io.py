"""FITS I/O: round trips, unit handling, variance estimate, and every InputError naming the file."""
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
