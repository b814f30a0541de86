"""The simulator is the ground truth of every other test: check that its truth is true."""
from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS

from nightsift.engine.errors import ConfigError
from nightsift.engine.records import CalibrationFrames, Exposure, MaskBits, RawFrame
from nightsift.engine.simulate import (
    GALAXY_DTYPE, PROFILES, STAR_DTYPE, TRANSIENT_DTYPE, Geometry, PSFField, SimulatedCCD,
    get_profile, mag_to_flux, simulate_ccd_pair, simulate_night,
)

SHAPE = (384, 384)
SCI_KEYS = ("GAIN", "RDNOISE", "SATURATE", "EXPTIME", "FILTER", "MJD-OBS", "CCDNUM", "VISIT",
            "INSTRUME", "MAGZP", "SEEING", "CTYPE1", "CTYPE2", "CRVAL1", "CRPIX1", "CD1_1", "CD2_2")


@pytest.fixture(scope="module")
def sim() -> SimulatedCCD:
    return simulate_ccd_pair("decam", shape=SHAPE, seed=11, visit=1, ccd=2, n_saturated=2,
                             n_transients=30)


@pytest.fixture(scope="module")
def blank() -> SimulatedCCD:
    return simulate_ccd_pair("decam", shape=(256, 256), seed=5, transients=False, artifacts=False,
                             star_density=0.0, galaxy_density=0.0)


def _centre(shape):
    return (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0


# -- contract ---------------------------------------------------------------------------------
def test_shape_dtype_and_header_contract(sim):
    raw = sim.science_raw
    assert isinstance(raw, RawFrame) and raw.data.shape == SHAPE and raw.data.dtype == np.float32
    for k in SCI_KEYS:
        assert k in raw.header, k
    assert raw.header["VISIT"] == 1 and raw.header["CCDNUM"] == 2
    assert np.all(raw.data == np.round(raw.data)) and raw.data.max() <= raw.header["SATURATE"]
    ref = sim.reference
    assert isinstance(ref, Exposure) and ref.shape == SHAPE
    assert ref.image.dtype == np.float32 and ref.variance.dtype == np.float32 and ref.mask.dtype == np.uint16
    assert np.all(ref.variance > 0)
    for k in ("EXPTIME", "MAGZP", "SEEING", "FILTER", "MJD-OBS", "CCDNUM", "SATURATE"):
        assert k in ref.header, k
    cal = sim.calibration
    assert isinstance(cal, CalibrationFrames)
    for stack in (cal.bias, cal.dark, cal.flat):
        assert stack.shape == (3,) + SHAPE and stack.dtype == np.float32
    assert sim.calibration is cal  # cached
    assert sim.transients.dtype == TRANSIENT_DTYPE and sim.stars.dtype == STAR_DTYPE
    assert sim.galaxies.dtype == GALAXY_DTYPE
    assert set(sim.artifacts) >= {"cosmic_rays", "hot_pixels", "bad_columns", "saturated"}
    assert sim.artifacts["saturated"].shape == SHAPE
    # the header's MAGZP/EXPTIME turn magnitudes into truth fluxes exactly
    h = raw.header
    t = sim.transients[sim.transients["kind"] != "variable"]
    np.testing.assert_allclose(t["flux"], mag_to_flux(t["mag"], h["MAGZP"], h["EXPTIME"]), rtol=1e-12)
    s = sim.stars
    np.testing.assert_allclose(s["flux_ref"], mag_to_flux(s["mag"], ref.header["MAGZP"], ref.header["EXPTIME"]),
                               rtol=1e-12)


def test_determinism(sim):
    again = simulate_ccd_pair("decam", shape=SHAPE, seed=11, visit=1, ccd=2, n_saturated=2,
                              n_transients=30)
    np.testing.assert_array_equal(again.science_raw.data, sim.science_raw.data)
    np.testing.assert_array_equal(again.reference.image, sim.reference.image)
    np.testing.assert_array_equal(again.transients, sim.transients)
    np.testing.assert_array_equal(again.calibration.flat, sim.calibration.flat)
    other = simulate_ccd_pair("decam", shape=SHAPE, seed=12, visit=1, ccd=2, n_saturated=2)
    assert not np.array_equal(other.science_raw.data, sim.science_raw.data)
    assert not np.array_equal(other.reference.image, sim.reference.image)
    # another visit: the same static sky and reference, a new epoch
    nxt = simulate_ccd_pair("decam", shape=SHAPE, seed=11, visit=2, ccd=2, n_saturated=2)
    np.testing.assert_array_equal(nxt.reference.image, sim.reference.image)
    np.testing.assert_array_equal(nxt.stars["ra"], sim.stars["ra"])
    assert not np.array_equal(nxt.science_raw.data, sim.science_raw.data)
    assert nxt.science_raw.header["MJD-OBS"] > sim.science_raw.header["MJD-OBS"]


# -- truth consistency ------------------------------------------------------------------------
def test_rendered_psf_sums_to_truth_and_fwhm_is_the_rendered_width():
    psf = PSFField((400, 400), fwhm0=10.0, beta=3.0, growth=0.12, e1=(0.02, 0.0, 0.01),
                   e2=(0.0, 0.01, 0.0))
    img = np.zeros((400, 400))
    psf.render(img, np.array([200.3]), np.array([199.6]), np.array([12345.0]))
    assert img.sum() == pytest.approx(12345.0, rel=1e-12)
    for x, y in [(200.0, 200.0), (30.0, 30.0)]:
        st = psf.stamp(x, y, flux=1e4)
        assert st.sum() == pytest.approx(1.0, rel=1e-12)
        # area above half maximum of a well-sampled PSF -> FWHM (geometric mean of the axes)
        n_half = np.count_nonzero(st >= 0.5 * st.max())
        assert 2.0 * math.sqrt(n_half / math.pi) == pytest.approx(psf.fwhm(x, y), rel=0.03)
    assert psf.fwhm(0, 0) > 1.1 * psf.fwhm(199.5, 199.5)  # larger at the corners
    # the pixel-box convolved FWHM: ~equal when well sampled, clearly larger when undersampled
    assert psf.fwhm_pixelized(200.0, 200.0) == pytest.approx(psf.fwhm(200.0, 200.0), rel=0.005)
    ztf = PSFField((64, 64), fwhm0=2.2, beta=2.5)
    assert 1.04 < ztf.fwhm_pixelized(32.0, 32.0) / ztf.fwhm(32.0, 32.0) < 1.12


def test_isolated_transient_psf_fit_fluxes_are_unbiased():
    pulls, rel = [], []
    for seed in range(2):
        s = simulate_ccd_pair("decam", shape=(512, 512), seed=seed, artifacts=False,
                              mag_range=(18.0, 22.0), n_transients=40, transient_fractions=(1, 0, 0))
        e = s.science_exposure()
        resid = e.image - s.sky_sci.image()
        for t in s.transients:
            ix, iy = int(np.floor(t["x"] + 0.5)), int(np.floor(t["y"] + 0.5))
            if not (20 <= ix < 492 and 20 <= iy < 492):
                continue
            P = s.psf_sci.stamp(t["x"], t["y"], 41, dx=t["x"] - ix, dy=t["y"] - iy)
            d = resid[iy - 20: iy + 21, ix - 20: ix + 21]
            v = s.sky_sci.level + t["flux"] * P + s.profile.read_noise ** 2
            f = np.sum(P * d / v) / np.sum(P * P / v)
            pulls.append((f - t["flux"]) * np.sqrt(np.sum(P * P / v)))
            rel.append(f / t["flux"] - 1.0)
    pulls = np.array(pulls)
    assert pulls.size > 40
    assert abs(pulls.mean()) < 4.0 / math.sqrt(pulls.size)
    assert 0.8 < pulls.std() < 1.25
    assert abs(np.median(rel)) < 0.01


def test_wcs_truth_and_epoch_geometry(sim):
    sci_wcs = WCS(sim.science_raw.header)
    s = sim.stars
    x, y = sci_wcs.all_world2pix(s["ra"], s["dec"], 0)
    np.testing.assert_allclose(x, s["x"], atol=1e-6)
    np.testing.assert_allclose(y, s["y"], atol=1e-6)
    xr, yr = sim.reference.wcs.all_world2pix(s["ra"], s["dec"], 0)
    np.testing.assert_allclose(xr, s["x_ref"], atol=1e-6)
    np.testing.assert_allclose(yr, s["y_ref"], atol=1e-6)
    t = sim.transients
    xt, yt = sci_wcs.all_world2pix(t["ra"], t["dec"], 0)
    np.testing.assert_allclose(xt, t["x"], atol=1e-6)
    # the geometry truth is the exact map between the grids
    gx, gy = sim.geometry.sci_to_ref(s["x"], s["y"], SHAPE)
    np.testing.assert_allclose(gx, s["x_ref"], atol=1e-5)
    np.testing.assert_allclose(gy, s["y_ref"], atol=1e-5)
    # stated ranges: offset of a few px, rotation 0.01-0.1 deg, scale difference 0.1-0.5 %
    xc, yc = _centre(SHAPE)
    ra, dec = sci_wcs.all_pix2world([xc], [yc], 0)
    rx, ry = sim.reference.wcs.all_world2pix(ra, dec, 0)
    assert 1.0 <= abs(rx[0] - xc) <= 5.0 and 1.0 <= abs(ry[0] - yc) <= 5.0
    cd_s, cd_r = sci_wcs.wcs.cd, sim.reference.wcs.wcs.cd
    a = np.linalg.solve(cd_r, cd_s)  # = scale * R(rotation)
    assert 0.001 <= abs(math.sqrt(abs(np.linalg.det(a))) - 1.0) <= 0.005
    assert 0.01 <= abs(math.degrees(math.atan2(a[1, 0], a[0, 0]))) <= 0.1


def test_geometry_override():
    g = Geometry(dx=2.5, dy=-1.0, rotation_deg=0.05, scale=1.002)
    s = simulate_ccd_pair("lsst", shape=(128, 160), seed=1, geometry=g, transients=False)
    assert s.geometry == g
    xc, yc = _centre((128, 160))
    ra, dec = WCS(s.science_raw.header).all_pix2world([xc], [yc], 0)
    rx, ry = s.reference.wcs.all_world2pix(ra, dec, 0)
    assert rx[0] - xc == pytest.approx(2.5, abs=1e-6) and ry[0] - yc == pytest.approx(-1.0, abs=1e-6)


# -- noise ------------------------------------------------------------------------------------
def test_blank_sky_noise_matches_the_model(blank):
    d = blank.detector
    e = blank.science_exposure()
    sky = blank.sky_sci.image()
    t = blank.science_raw.header["EXPTIME"]
    sd = np.sqrt(sky * d.flat + d.dark_current * t + d.read_noise ** 2 + d.gain ** 2 / 12.0) / d.flat
    pull = (e.image - sky) / sd
    assert pull.mean() == pytest.approx(0.0, abs=0.02)
    assert pull.std() == pytest.approx(1.0, abs=0.03)
    # the variance plane of the true-calibrated exposure agrees with the model
    assert np.mean(e.variance / sd ** 2) == pytest.approx(1.0, abs=0.03)
    ref = blank.reference
    rp = (ref.image - blank.sky_ref.image()) / np.sqrt(ref.variance)
    assert rp.mean() == pytest.approx(0.0, abs=0.02)
    assert rp.std() == pytest.approx(1.0, abs=0.03)
    # the reference is deeper than the science frame
    assert np.median(ref.variance) < 0.5 * np.median(e.variance)
    assert blank.meta["maglim_ref"] > blank.meta["maglim_sci"]


# -- saturation, artifacts --------------------------------------------------------------------
def test_saturation_bleed_trails_are_present_and_flagged(sim):
    raw = sim.science_raw
    satur = raw.header["SATURATE"]
    sat = sim.artifacts["saturated"]
    np.testing.assert_array_equal(sat, raw.data >= satur)
    st = sim.stars[sim.stars["saturated_sci"]]
    assert st.size >= 2
    for s in st:
        ix, iy = int(np.floor(s["x"] + 0.5)), int(np.floor(s["y"] + 0.5))
        col = sat[:, ix]
        # a bleed trail: the saturated run along the column is longer than across the row
        run_y = np.count_nonzero(col[max(iy - 60, 0): iy + 61])
        run_x = np.count_nonzero(sat[iy, max(ix - 60, 0): ix + 61])
        assert run_y > run_x >= 1
    ref_sat = (sim.reference.mask & MaskBits.SAT) != 0
    assert ref_sat.any() and sim.stars["saturated_ref"].any()
    for s in sim.stars[sim.stars["saturated_ref"]]:
        assert ref_sat[int(np.floor(s["y_ref"] + 0.5)), int(np.floor(s["x_ref"] + 0.5))]


def test_calibration_frames_show_the_detector_defects():
    prof = get_profile("decam").replace(bad_columns_per_1000=8.0, hot_pixel_fraction=3e-4)
    s = simulate_ccd_pair(prof, shape=(256, 512), seed=3, transients=False, n_calib=3,
                          star_density=0.2, galaxy_density=0.2)
    d = s.detector
    hot, bad = s.artifacts["hot_pixels"], s.artifacts["bad_columns"]
    assert hot.size > 0 and bad.size > 0
    cal = s.calibration
    mbias = np.median(cal.bias, axis=0)
    db = mbias - d.bias_image()
    assert abs(db.mean()) < 0.1 and db.std() < d.read_noise / d.gain
    dark = (np.median(cal.dark, axis=0) - mbias) * d.gain / cal.dark_exptime  # e-/s
    assert np.all(dark[hot["y"], hot["x"]] > 10.0)
    flat = np.median(cal.flat, axis=0) - mbias
    flat /= np.median(flat)
    for b in bad:
        assert np.median(flat[b["y0"]: b["y1"], b["x"]]) < 0.6
    # calibrating with the frames reproduces the true-detector calibration
    sci = s.science_raw.data
    ours = ((sci - mbias) * d.gain - dark * s.science_raw.header["EXPTIME"]) / flat
    good = ~d.bad_pixel_mask() & ~s.artifacts["saturated"]
    diff = (ours - s.science_exposure().image)[good]
    assert abs(np.median(diff)) < 0.01 * s.sky_sci.level
    # cosmic rays are in the science frame and nowhere in the darks
    cr = s.artifacts["cosmic_rays"]
    if cr.size:
        big = cr[cr["electrons"] > 2000]
        assert np.all((sci[big["y"], big["x"]] - mbias[big["y"], big["x"]]) * d.gain
                      > s.sky_sci.level + 1000)
        not_hot = ~d.bad_pixel_mask()[big["y"], big["x"]]
        assert np.all(dark[big["y"], big["x"]][not_hot] < 5.0)


def test_cosmic_rays_present_when_expected():
    s = simulate_ccd_pair(get_profile("decam").replace(cosmic_rate=200.0), shape=(256, 256), seed=8,
                          transients=False)
    cr = s.artifacts["cosmic_rays"]
    assert np.unique(cr["id"]).size > 10
    e = s.science_exposure()
    assert np.all(e.mask[cr["y"], cr["x"]] & MaskBits.CR)


# -- modes ------------------------------------------------------------------------------------
def test_transient_free_and_artifact_free_mode(blank):
    assert blank.transients.size == 0 and blank.transients.dtype == TRANSIENT_DTYPE
    assert blank.artifacts["cosmic_rays"].size == 0
    assert blank.artifacts["hot_pixels"].size == 0 and blank.artifacts["bad_columns"].size == 0
    assert not blank.artifacts["saturated"].any()
    s = simulate_ccd_pair("decam", shape=(384, 384), seed=2, transients=False, artifacts=False,
                          star_density=5.0)
    assert s.transients.size == 0 and not s.stars["variable"].any()
    assert not s.artifacts["saturated"].any() and not s.stars["saturated_ref"].any()
    assert not (s.reference.mask & MaskBits.SAT).any()
    # with no transients the science stars carry their static flux
    np.testing.assert_allclose(s.stars["flux_sci"],
                               mag_to_flux(s.stars["mag"], s.meta["zp_sci"], s.profile.exptime))


def test_transient_kinds_and_magnitudes():
    s = simulate_ccd_pair("decam", shape=(768, 768), seed=21, n_transients=60,
                          star_density=3.0, galaxy_density=6.0)
    t = s.transients
    kinds = set(t["kind"])
    assert kinds == {"isolated", "nuclear", "variable"}
    nuc = t[t["kind"] == "nuclear"]
    g = s.galaxies[nuc["host"]]
    np.testing.assert_allclose(nuc["x"], g["x"])
    np.testing.assert_allclose(nuc["y"], g["y"])
    var = t[t["kind"] == "variable"]
    st = s.stars[var["star"]]
    assert np.all(st["variable"]) and np.all(var["host"] == -1)
    static = mag_to_flux(st["mag"], s.meta["zp_sci"], s.profile.exptime)
    np.testing.assert_allclose(st["flux_sci"] - static, var["flux"], rtol=1e-9)
    assert np.all(st["flux_sci"] > 0)
    # magnitudes reach down to the detection limit: S/N from well above to ~3-5
    assert t["snr"].max() > 100 and t["snr"].min() < 6
    assert t["mag"].max() > s.meta["maglim_sci"] - 0.5
    np.testing.assert_allclose(t["fwhm"], s.psf_fwhm_sci(t["x"], t["y"]))
    # a few fading variables in a larger draw
    v = simulate_ccd_pair("decam", shape=(512, 512), seed=4, n_transients=20, star_density=4.0,
                          transient_fractions=(0, 0, 1))
    vf = v.transients["flux"][v.transients["kind"] == "variable"]
    assert (vf < 0).any() and (vf > 0).any()


def test_profiles_differ_and_bad_names_raise():
    assert {"decam", "ztf", "lsst"} <= set(PROFILES)
    scales = {PROFILES[k].pixel_scale for k in ("decam", "ztf", "lsst")}
    assert len(scales) == 3
    s = simulate_ccd_pair("ztf", shape=(128, 128), seed=1)
    assert s.science_raw.header["INSTRUME"] == "ztf"
    assert s.science_raw.header["PIXSCALE"] == pytest.approx(1.012, rel=0.01)
    assert s.science_raw.header["GAIN"] == PROFILES["ztf"].gain
    with pytest.raises(ConfigError, match="unknown instrument profile"):
        get_profile("hubble")
    with pytest.raises(ConfigError, match="shape"):
        simulate_ccd_pair("decam", shape=(8, 8))


def test_night_static_sky_and_equivalence():
    kw = dict(n_transients=5)
    night = list(simulate_night("lsst", n_visits=2, n_ccds=2, shape=(128, 128), seed=9, **kw))
    assert [(v, c) for v, c, _ in night] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    by = {(v, c): s for v, c, s in night}
    np.testing.assert_array_equal(by[0, 0].reference.image, by[1, 0].reference.image)
    assert not np.array_equal(by[0, 0].reference.image, by[0, 1].reference.image)
    assert by[0, 0].reference.header["CRVAL1"] != by[0, 1].reference.header["CRVAL1"]
    one = simulate_ccd_pair("lsst", shape=(128, 128), seed=9, visit=1, ccd=1, n_ccds=2, **kw)
    np.testing.assert_array_equal(one.science_raw.data, by[1, 1].science_raw.data)
    np.testing.assert_array_equal(one.transients, by[1, 1].transients)
    with pytest.raises(ConfigError):
        next(simulate_night("lsst", n_visits=0))


def test_simulate_visit_ccd_follows_the_config():
    from nightsift.engine.config import SimulateConfig
    from nightsift.engine.simulate import simulate_visit_ccd

    cfg = SimulateConfig(instrument="ztf", ny=96, nx=128, n_ccds=4, n_transients=3, seed=7)
    s = simulate_visit_ccd(cfg, visit=1, ccd=3)
    assert s.shape == (96, 128) and s.transients.size == 3 and s.profile.name == "ztf"
    one = simulate_ccd_pair("ztf", shape=(96, 128), seed=7, visit=1, ccd=3, n_ccds=4, n_transients=3)
    np.testing.assert_array_equal(one.science_raw.data, s.science_raw.data)


def test_constant_psf_mode():
    s = simulate_ccd_pair("decam", shape=(256, 256), seed=2, psf_variation=False, transients=False)
    for psf in (s.psf_sci, s.psf_ref):
        f = psf.fwhm(np.array([0.0, 255.0, 128.0]), np.array([0.0, 40.0, 128.0]))
        np.testing.assert_allclose(f, f[0], rtol=1e-12)
        e = psf.ellipticity(np.array([0.0, 255.0]), np.array([0.0, 255.0]))
        assert e[0] == pytest.approx(e[1], rel=1e-12)
    assert np.median(s.detector.flat) == pytest.approx(1.0, abs=1e-6)


def test_options_object_equals_keywords_and_is_validated():
    from nightsift.engine.simulate import SimulationOptions

    kw = dict(shape=(96, 112), seed=4, visit=2, ccd=1, n_ccds=3, n_transients=6, seeing=1.1, edge=6)
    opts = SimulationOptions(**kw)
    a = simulate_ccd_pair("ztf", **kw)
    b = simulate_ccd_pair("ztf", opts)
    c = simulate_ccd_pair("ztf", opts.replace(seed=99), seed=4)  # keywords override the object's fields
    for s in (b, c):
        np.testing.assert_array_equal(a.science_raw.data, s.science_raw.data)
        np.testing.assert_array_equal(a.reference.image, s.reference.image)
        np.testing.assert_array_equal(a.transients, s.transients)
    with pytest.raises(ConfigError, match="shape"):
        SimulationOptions(shape=(8, 8))
    with pytest.raises(ConfigError, match="n_calib"):
        SimulationOptions(n_calib=0)
    with pytest.raises(ConfigError, match="transient_fractions"):
        opts.replace(transient_fractions=(1.0, 0.0))
    with pytest.raises(TypeError):
        simulate_ccd_pair("ztf", shape=(64, 64), n_transient=3)  # misspelt option
    with pytest.raises(TypeError):
        simulate_ccd_pair("ztf", {"shape": (64, 64)})
    r = opts.resolved(get_profile("ztf"))
    assert r.filter == get_profile("ztf").filters[0] and r.shape == (96, 112) and r.n_ccds == 3
    assert SimulationOptions().resolved(get_profile("lsst")).shape == (get_profile("lsst").ny, get_profile("lsst").nx)


def test_static_scene_is_shared_between_visits_and_checked():
    from nightsift.engine.simulate import SimulationOptions, simulate_static

    opts = SimulationOptions(shape=(96, 96), seed=3, ccd=1, n_ccds=2, n_transients=4)
    st = simulate_static("decam", opts)
    assert st.matches("decam", opts.replace(visit=5, seeing=1.3)) and not st.matches("decam", opts.replace(ccd=0))
    for v in (0, 1):
        fresh = simulate_ccd_pair("decam", opts, visit=v)
        shared = simulate_ccd_pair("decam", opts, visit=v, static=st)
        assert shared.reference is st.reference
        np.testing.assert_array_equal(fresh.reference.image, shared.reference.image)
        np.testing.assert_array_equal(fresh.science_raw.data, shared.science_raw.data)
        np.testing.assert_array_equal(fresh.transients, shared.transients)
        np.testing.assert_array_equal(fresh.stars, shared.stars)
    with pytest.raises(ConfigError, match="static scene"):
        simulate_ccd_pair("decam", opts, ccd=0, static=st)
    with pytest.raises(ConfigError, match="static scene"):
        simulate_ccd_pair("ztf", opts, static=st)


def test_visit_options_follow_the_config():
    from nightsift.engine.config import SimulateConfig
    from nightsift.engine.simulate import visit_options

    cfg = SimulateConfig(instrument="lsst", ny=0, nx=80, n_ccds=5, n_transients=2, seed=8)
    p, o = visit_options(cfg, visit=3, ccd=4)
    assert p.name == "lsst" and o.shape == (p.ny, 80)
    assert (o.seed, o.visit, o.ccd, o.n_ccds, o.n_transients) == (8, 3, 4, 5, 2)


# -- bogus as the sky makes it (issue #13) ------------------------------------------------------
def test_render_width_scales_the_psf_and_keeps_the_flux():
    psf = PSFField((300, 300), fwhm0=16.0, beta=3.0)
    half = []
    for w in (None, 1.0, 1.2):
        img = np.zeros((300, 300))
        psf.render(img, np.array([150.0]), np.array([150.0]), np.array([1e4]), None if w is None else np.array([w]))
        assert img.sum() == pytest.approx(1e4, rel=2e-4)  # the stamp holds all but the far wings
        half.append(np.count_nonzero(img >= 0.5 * img.max()))
    assert half[0] == half[1]
    assert math.sqrt(half[2] / half[0]) == pytest.approx(1.2, rel=0.03)  # FWHM 1.2x


def test_star_psf_scatter_and_proper_motion_change_only_the_stars(sim):
    base = simulate_ccd_pair("decam", shape=SHAPE, seed=11, visit=1, ccd=2, n_saturated=2, n_transients=30,
                             star_psf_scatter=0.0, proper_motion=0.0)
    np.testing.assert_array_equal(base.science_raw.data, sim.science_raw.data)  # off: as before, bit for bit
    alt = simulate_ccd_pair("decam", shape=SHAPE, seed=11, visit=1, ccd=2, n_saturated=2, n_transients=30,
                            star_psf_scatter=0.04, proper_motion=0.05)
    np.testing.assert_array_equal(alt.transients, sim.transients)  # the other draws did not move
    np.testing.assert_array_equal(alt.reference.image, sim.reference.image)
    assert not np.array_equal(alt.science_raw.data, sim.science_raw.data)
    # the per-star draws: zeros when off; otherwise rms as asked, widths clipped at 3 sigma
    from nightsift.engine.simulate.options import SimulationOptions
    from nightsift.engine.simulate.pair import _star_changes

    pl = type("Placed", (), {"sx": np.zeros(20000)})()
    dx, dy, w = _star_changes(SimulationOptions(), pl, np.random.default_rng(0))
    assert dx == 0 and dy == 0 and w is None
    dx, dy, w = _star_changes(SimulationOptions(star_psf_scatter=0.04, proper_motion=0.05), pl,
                              np.random.default_rng(0))
    assert np.std(dx) == pytest.approx(0.05, rel=0.03) and np.std(dy) == pytest.approx(0.05, rel=0.03)
    assert np.std(np.log(w)) == pytest.approx(0.04, rel=0.05) and np.abs(np.log(w)).max() <= 0.12 + 1e-12
    for bad in ({"star_psf_scatter": -0.01}, {"proper_motion": -1.0}):
        with pytest.raises(ConfigError, match="star_psf_scatter and proper_motion"):
            simulate_ccd_pair("decam", shape=(64, 64), **bad)


def test_bright_variables_move_only_the_variable_stars_onto_bright_stars():
    kw = dict(shape=(512, 512), seed=11, visit=1, ccd=2, n_transients=60)
    base = simulate_ccd_pair("ztf", **kw)
    alt = simulate_ccd_pair("ztf", **kw, bright_variables=1.0)
    var = base.transients["kind"] == "variable"
    assert var.sum() >= 8
    np.testing.assert_array_equal(alt.transients["kind"], base.transients["kind"])
    np.testing.assert_array_equal(alt.transients[~var], base.transients[~var])  # the other kinds did not move
    np.testing.assert_array_equal(alt.reference.image, base.reference.image)
    moved = alt.transients[var]["star"] != base.transients[var]["star"]
    assert moved.sum() >= 4
    tv = alt.transients[var][moved]
    smag = alt.stars["mag"][tv["star"]]
    # bright: saturation level to 4 mag above the limit, unsaturated in the reference
    assert np.all(smag > alt.meta["mag_sat"]) and np.all(smag < alt.meta["maglim_sci"] - 4.0)
    assert not alt.stars["saturated_ref"][tv["star"]].any()
    assert np.median(smag) < np.median(alt.stars["mag"][base.transients[var]["star"]]) - 1.0
    # the flux change: 3-70 % of the star's, the sign drawn before kept; the star carries it
    ratio = tv["flux"] / (alt.stars["flux_sci"][tv["star"]] - tv["flux"])
    assert np.all((np.abs(ratio) >= 0.03 - 1e-9) & (np.abs(ratio) <= 0.7 + 1e-9))
    np.testing.assert_array_equal(np.sign(tv["flux"]), np.sign(base.transients[var][moved]["flux"]))
    assert alt.stars["variable"][tv["star"]].all()
    assert not np.array_equal(alt.science_raw.data, base.science_raw.data)
    with pytest.raises(ConfigError, match="bright_variables must be a share"):
        simulate_ccd_pair("ztf", shape=(64, 64), bright_variables=1.5)


def test_bright_variables_are_a_share_of_the_variable_stars():
    kw = dict(shape=(512, 512), seed=3, ccd=1, n_transients=60)
    n_var = n_moved = 0
    for visit in range(6):
        base = simulate_ccd_pair("ztf", visit=visit, **kw)
        alt = simulate_ccd_pair("ztf", visit=visit, **kw, bright_variables=0.3)
        var = base.transients["kind"] == "variable"
        n_var += int(var.sum())
        n_moved += int((alt.transients[var]["star"] != base.transients[var]["star"]).sum())
    assert n_var >= 40
    assert 0.1 < n_moved / n_var < 0.5  # binomial(0.3), fewer only where bright stars run out


def test_dataset_key_unchanged_when_the_star_changes_are_off():
    from nightsift.engine.classify.dataset import DatasetSpec

    # the key of the shipped model's dataset (its metadata records it)
    assert DatasetSpec(n_units=1800, seed=6).key() == "e94e050548"
    assert DatasetSpec(n_units=1800, seed=6, star_psf_scatter=0.04).key() != "e94e050548"
    assert DatasetSpec(n_units=1800, seed=6, bright_variables=0.0).key() == "e94e050548"
    assert DatasetSpec(n_units=1800, seed=6, bright_variables=0.5).key() != "e94e050548"
    with pytest.raises(ConfigError, match="bright_variables"):
        DatasetSpec(bright_variables=-0.1)
