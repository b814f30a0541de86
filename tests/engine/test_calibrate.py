"""Calibration: raw -> e- round trip against an injected truth, variance vs empirical scatter,
bad-pixel mask (hot pixels, partial low-response column, dead column), saturation, NaN, errors."""
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from nightsift.engine.config import CalibrateConfig
from nightsift.engine.errors import InputError
from nightsift.engine.records import CalibrationFrames, MaskBits, RawFrame
from nightsift.engine.stages.calibrate import MasterCalibration, calibrate, make_master

SHAPE = (256, 256)
GAIN, RN, SATURATE = 2.5, 6.0, 40000.0
SKY = 1000.0  # e- per pixel before the flat
EXPTIME, DARK_EXPTIME = 60.0, 300.0
STARS = [(60.3, 70.6, 2e5), (190.2, 40.8, 5e4), (128.0, 200.0, 5e7)]  # (x, y, e-); the last saturates


class Truth:
    def __init__(self, rng):
        ny, nx = SHAPE
        yy, xx = np.mgrid[0:ny, 0:nx]
        self.bias = 500.0 + 3.0 * np.sin(xx / 7.0) + 0.01 * yy  # ADU, fixed pattern
        r2 = ((xx - nx / 2) ** 2 + (yy - ny / 2) ** 2) / (nx / 2) ** 2
        self.flat = (1.05 - 0.1 * r2) * (1 + 0.01 * rng.standard_normal(SHAPE))
        self.bad_col = (100, 40, 220)  # x, rows [y0, y1), response 0.3
        self.flat[40:220, 100] *= 0.3
        self.flat[:, 180] *= 0.02  # a dead column
        self.flat /= np.median(self.flat)  # calibrated e- are e- at the median response
        self.dark = np.full(SHAPE, 0.05)  # e-/s
        self.hot = (rng.integers(5, 250, 25), rng.integers(5, 250, 25))
        self.dark[self.hot] = rng.uniform(20, 500, 25)
        self.bad = np.zeros(SHAPE, bool)
        self.bad[self.hot] = True
        self.bad[40:220, 100] = True
        self.bad[:, 180] = True
        self.stars = np.zeros(SHAPE)
        for x, y, f in STARS:
            self.stars += f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2)) / (2 * np.pi * 4.0)

    def expose(self, electrons, t, rng):
        e = rng.poisson(np.clip(electrons * self.flat + self.dark * t, 0, None)).astype(float)
        raw = np.round((e + rng.normal(0, RN, SHAPE)) / GAIN + self.bias)
        return np.clip(raw, 0, SATURATE).astype(np.float32)

    def calibration_frames(self, rng):
        bias = np.stack([np.round(self.bias + rng.normal(0, RN / GAIN, SHAPE)) for _ in range(7)])
        dark = np.stack([self.expose(np.zeros(SHAPE), DARK_EXPTIME, rng) for _ in range(5)])
        flat = np.stack([self.expose(np.full(SHAPE, 50000.0 * s), 0.0, rng) for s in (1.0, 0.8, 1.1, 0.9, 1.0,
                                                                                       1.05, 0.95, 1.0)])
        return CalibrationFrames(bias=bias.astype(np.float32), dark=dark, flat=flat, dark_exptime=DARK_EXPTIME)


def _header():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [128, 128]
    w.wcs.cd = np.array([[-0.27, 0.0], [0.0, 0.27]]) / 3600
    h = w.to_header()
    h.update(GAIN=GAIN, SATURATE=SATURATE, EXPTIME=EXPTIME, RDNOISE=RN)
    return h


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    truth = Truth(rng)
    cfg = CalibrateConfig()
    master = make_master(truth.calibration_frames(rng), header=_header(), config=cfg)
    raw = truth.expose(SKY + truth.stars, EXPTIME, rng)
    raw[10, 12] = np.nan
    res = calibrate(RawFrame(raw, _header(), path="sci.fits"), master, config=cfg)
    return truth, master, res


def test_master(setup):
    truth, master, _ = setup
    assert isinstance(master, MasterCalibration)
    good = ~truth.bad
    # median of 7 frames with 2.4 ADU read noise: ~1.1 ADU per pixel, unbiased
    assert np.abs(master.bias - truth.bias)[good].mean() < 1.2
    assert abs(np.mean(master.bias - truth.bias)) < 0.05
    assert np.median(master.flat) == pytest.approx(1.0, abs=1e-6)
    rel = master.flat / np.median(master.flat) - truth.flat / np.median(truth.flat[good])
    assert np.abs(rel[good]).max() < 0.02
    assert master.read_noise == pytest.approx(RN, rel=0.05)
    assert np.median(master.dark_rate * GAIN) == pytest.approx(0.05, abs=0.03)
    assert np.all(master.flat[:, 180] == 1.0)  # flagged pixels get flat 1: no division by ~0
    assert np.all(np.isfinite(master.flat)) and master.flat.min() > 0.5


def test_bad_pixel_mask(setup):
    truth, master, res = setup
    flagged = (master.bad_pixel_mask & MaskBits.BAD) != 0
    assert flagged[truth.hot].all()  # every hot pixel
    assert flagged[40:220, 100].all()  # the partial low-response column
    assert flagged[:, 180].all()  # the dead column
    false = flagged & ~truth.bad
    assert false.mean() < 1e-3
    assert (res.value.mask[truth.bad] & MaskBits.BAD).all()


def test_round_trip_recovers_sky_and_stars(setup):
    truth, _, res = setup
    e = res.value
    assert e.image.dtype == np.float32 and e.variance.dtype == np.float32 and e.mask.dtype == np.uint16
    assert e.header["BUNIT"] == "electron"
    blank = (e.mask == 0) & (truth.stars < 1.0)
    sky = np.median(e.image[blank])
    assert sky == pytest.approx(SKY, rel=0.01)
    assert res.qa["sky_median"] == pytest.approx(SKY, rel=0.01)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    for x, y, f in STARS[:2]:
        ap = (np.hypot(xx - x, yy - y) < 12) & (e.mask == 0)  # flagged pixels carry no flux
        assert ap.sum() > 400
        assert (e.image[ap] - sky).sum() == pytest.approx(truth.stars[ap].sum(), rel=0.01)


def test_variance_matches_empirical_scatter(setup):
    truth, _, res = setup
    e = res.value
    blank = (e.mask == 0) & (truth.stars < 1.0)
    resid = e.image[blank] - np.median(e.image[blank])
    pulls = resid / np.sqrt(e.variance[blank])
    assert pulls.std() == pytest.approx(1.0, abs=0.02)
    assert np.median(e.variance[blank]) / resid.var() == pytest.approx(1.0, abs=0.04)
    assert res.qa["sky_noise"] == pytest.approx(res.qa["sky_noise_expected"], rel=0.04)
    # on a bright star the variance follows its own Poisson noise
    x, y, f = STARS[0]
    peak = e.image[int(round(y)), int(round(x))]
    assert e.variance[int(round(y)), int(round(x))] == pytest.approx(peak + RN**2, rel=0.05)


def test_saturation_and_nodata(setup):
    truth, _, res = setup
    m = res.value.mask
    sat = (m & MaskBits.SAT) != 0
    assert sat[200, 128]  # the saturated core
    core = truth.stars * truth.flat + SKY >= SATURATE * GAIN * 0.9
    assert sat[core].all()
    assert res.qa["saturated_fraction"] > 0
    assert m[10, 12] & MaskBits.NO_DATA
    assert np.isfinite(res.value.image).all() and np.isfinite(res.value.variance).all()
    assert res.qa["nodata_fraction"] == pytest.approx(1 / m.size)
    assert res.qa["bad_fraction"] == pytest.approx(truth.bad.mean(), rel=0.2)


def test_shape_mismatch_names_the_file(setup):
    _, master, _ = setup
    raw = RawFrame(np.ones((128, 256), np.float32), _header(), path="/data/night/sci_037.fits")
    with pytest.raises(InputError, match="sci_037.fits") as err:
        calibrate(raw, master, config=CalibrateConfig())
    assert "(128, 256)" in str(err.value)


def test_missing_gain_is_an_input_error(setup):
    _, master, _ = setup
    h = _header()
    del h["GAIN"]
    with pytest.raises(InputError, match="GAIN"):
        calibrate(RawFrame(np.ones(SHAPE, np.float32), h, path="x.fits"), master, config=CalibrateConfig())
    h = fits.Header(_header())
    with pytest.raises(InputError, match="dark_exptime"):
        make_master(
            CalibrationFrames(np.ones((2,) + SHAPE), np.ones((2,) + SHAPE), np.ones((2,) + SHAPE), 0.0),
            header=h, config=CalibrateConfig(),
        )


# --- against the simulator's truth (engine.simulate) ------------------------------------------
def _simulate(**kw):
    import nightsift.engine.simulate as sim_mod  # a project module: a broken import fails the test

    return sim_mod.simulate_ccd_pair("decam", shape=(600, 600), n_calib=5, transients=False, **kw)


@pytest.mark.parametrize("seed", [1, 2])
def test_simulated_ccd_bad_pixels_and_sky(seed):
    sim = _simulate(seed=seed)
    cfg = CalibrateConfig()
    raw = sim.science_raw
    master = make_master(sim.calibration, header=raw.header, config=cfg)
    res = calibrate(raw, master, config=cfg)
    e = res.value
    truth_bad = sim.detector.bad_pixel_mask()
    flagged = (master.bad_pixel_mask & MaskBits.BAD) != 0
    assert flagged[truth_bad].all()  # every hot pixel and bad-column pixel
    assert (flagged & ~truth_bad).mean() < 1e-4
    sky = sim.sky_sci.image()  # e- per pixel (flat median ~1, so also our units)
    good = e.mask == 0
    assert np.median((e.image - sky)[good]) / sim.sky_sci.level == pytest.approx(0.0, abs=0.01)
    assert (e.mask[sim.artifacts["saturated"]] & MaskBits.SAT).all()
    assert res.qa["read_noise"] == pytest.approx(raw.header["RDNOISE"])


def test_simulated_blank_sky_variance():
    """Sky only (no sources): the variance map, master-frame noise included, matches the scatter."""
    sim = _simulate(seed=1, star_density=0.0, galaxy_density=0.0)
    cfg = CalibrateConfig()
    master = make_master(sim.calibration, header=sim.science_raw.header, config=cfg)
    e = calibrate(sim.science_raw, master, config=cfg).value
    good = e.mask == 0
    pulls = ((e.image - sim.sky_sci.image()) / np.sqrt(e.variance))[good]
    assert pulls.std() == pytest.approx(1.0, abs=0.02)
    assert 1.4826 * np.median(np.abs(pulls - np.median(pulls))) == pytest.approx(1.0, abs=0.02)
