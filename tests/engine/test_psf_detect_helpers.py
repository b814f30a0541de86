"""PSF and detection stage helpers: the stellar locus among galaxies, the hybrid (denoised) PSF, star
selection, peaks around masked holes."""
import numpy as np
import pytest

from nightsift.engine.config import PSFConfig
from nightsift.engine.records import SourceCatalog, unusable_of
from nightsift.engine.stages.psf import MIN_PSF_FWHM, select_psf_stars, stellar_locus
from nightsift.kernels.moffat import fit_moffat, hybrid_psf, moffat_stamps, stack_variance


def moffat_fit(psf):
    f = fit_moffat(psf)
    return {"fwhm": float(f.fwhm), "model": f.model}


def test_stellar_locus_is_the_smallest_cluster_even_when_galaxies_outnumber_stars(rng):
    stars = 3.40 * (1 + 0.01 * rng.normal(size=4))
    galaxies = rng.uniform(3.6, 6.0, 16)  # compact galaxies: broader than the PSF, more numerous
    artefacts = np.array([0.68, 0.70, 0.71, 0.69, np.nan])  # hot pixels / cosmic rays, a failed fit
    locus = stellar_locus(np.r_[galaxies, stars, artefacts], min_count=3)
    assert locus == pytest.approx(3.40, rel=0.02)
    assert MIN_PSF_FWHM > 0.71
    # the median of the bright sources (what an isophotal locus amounts to) is a galaxy's size
    assert np.median(np.r_[galaxies, stars]) > 1.1 * locus
    assert np.isnan(stellar_locus([np.nan, 0.5]))


def _moffat(s, fwhm, beta=3.0, dx=0.0, dy=0.0):
    m = moffat_stamps(np.array([1.0, fwhm, beta, 1.0, 0.0, dx, dy, 0.0]), s)
    return m / m.sum()


def test_hybrid_psf_removes_wing_noise_and_keeps_the_core(rng):
    s, fwhm = 41, 5.0
    truth = _moffat(s, fwhm)
    # three stacked stars of 1e5 e- on a sky of sigma 60 e-: the stack's wings are noise-dominated
    stars = np.array([truth * 1e5 + rng.normal(0, 60.0, truth.shape) for _ in range(3)])
    stack = stars.sum(axis=0) / stars.sum()
    var = stack_variance(stars[None], np.ones((1, 3)), 60.0, stack)
    fit = moffat_fit(stack)
    hyb = hybrid_psf(stack, var, fit["model"], fit["fwhm"])
    yy, xx = np.mgrid[0:s, 0:s] - s // 2
    wings = np.hypot(xx, yy) > 2.5 * fwhm
    err_stack = np.sqrt(np.mean((stack - truth)[wings] ** 2))
    err_hyb = np.sqrt(np.mean((hyb - truth)[wings] ** 2))
    assert err_hyb < 0.3 * err_stack, (err_hyb, err_stack)
    assert hyb.sum() == pytest.approx(1.0)
    core = np.hypot(xx, yy) <= 2 * moffat_fit(stack)["fwhm"]
    np.testing.assert_allclose(hyb[core] / hyb.sum(), stack[core] / hyb.sum(), rtol=0.05, atol=1e-5)
    # a real, significant departure from the Moffat in the wings (a diffraction spike) is kept
    spike = truth.copy()
    spike[s // 2, s // 2 + 14: s // 2 + 19] += 0.004
    spike /= spike.sum()
    quiet = stack_variance(np.array([[spike * 1e8]]), np.ones((1, 1)), 1.0, spike)
    fit = moffat_fit(spike)
    kept = hybrid_psf(spike, quiet, fit["model"], fit["fwhm"])
    assert kept[s // 2, s // 2 + 16] - kept[s // 2 + 16, s // 2] > 0.003


def _catalog(**cols):
    n = len(cols["x"])
    full = dict(x=np.zeros(n), y=np.zeros(n), flux=np.zeros(n), fluxerr=np.ones(n), snr=np.zeros(n), a=np.ones(n),
                b=np.ones(n), peak=np.zeros(n), flag=np.zeros(n, np.int32), size=np.full(n, np.nan),
                point=np.zeros(n, bool), psf_star=np.zeros(n, bool))
    full.update({k: np.asarray(v, dtype=full[k].dtype) for k, v in cols.items()})
    return SourceCatalog(**full)


def test_hot_pixels_do_not_break_the_isolation_of_psf_stars():
    integral = unusable_of(np.zeros((1, 256, 256), np.uint16))
    kw = dict(x=[100.0, 110.0, 140.0], y=[100.0, 104.0, 100.0], flux=[1e5, 3e3, 2e3], snr=[300, 60, 20],
              a=[2.0, 0.6, 3.0], b=[1.9, 0.6, 2.5])
    # a star, a hot pixel, a faint galaxy
    cat = _catalog(peak=[8e3, 2.9e3, 5e2], **kw)
    ok = select_psf_stars(cat, integral, 0, (256, 256), stamp=31, core=4, config=PSFConfig())
    assert ok[0]  # the hot pixel 11 px away carries 3 % of the star's flux, yet is no neighbour
    cat = _catalog(peak=[8e3, 5e2, 5e2], **kw)  # the same flux spread like a source: not isolated
    ok = select_psf_stars(cat, integral, 0, (256, 256), stamp=31, core=4, config=PSFConfig())
    assert not ok[0]
    # a masked pixel in the star's core disqualifies it; one in its wings does not (left out of the stack)
    cat = _catalog(peak=[8e3, 2.9e3, 5e2], **kw)
    m = np.zeros((1, 256, 256), np.uint16)
    m[0, 103, 98] = 1
    assert not select_psf_stars(cat, unusable_of(m), 0, (256, 256), stamp=31, core=4, config=PSFConfig())[0]
    m[:] = 0
    m[0, 110, 95] = 1
    assert select_psf_stars(cat, unusable_of(m), 0, (256, 256), stamp=31, core=4, config=PSFConfig())[0]
    # so does the catalogue's flag for a masked pixel in the aperture; any other flag does not
    from nightsift.kernels.sources import FLAG_EDGE, FLAG_MASKED
    for flag, ok in ((FLAG_MASKED, True), (FLAG_MASKED | FLAG_EDGE, False)):
        cat = _catalog(peak=[8e3, 2.9e3, 5e2], flag=[flag, 0, 0], **kw)
        assert bool(select_psf_stars(cat, unusable_of(m), 0, (256, 256), stamp=31, core=4,
                                     config=PSFConfig())[0]) is ok


def test_peaks_around_a_small_masked_hole_are_one_candidate():
    from nightsift.engine.stages.detect import merge_around_holes

    excluded = np.zeros((64, 64), bool)
    excluded[29:34, 29:34] = True  # a masked pixel grown into a 5x5 hole at (31, 31)
    excluded[:, :4] = True  # the CCD edge: a large patch, left alone
    x = np.array([28.0, 34.0, 31.2, 31.0, 5.0, 5.0, 31.0])
    y = np.array([31.0, 31.0, 28.0, 34.2, 10.0, 20.0, 40.0])
    value = np.array([-9.0, -11.0, -8.0, -7.5, 6.0, 6.5, -6.0])
    sign = np.sign(value)
    img = np.zeros(len(x), np.int64)
    keep, xx, yy = merge_around_holes(img, x, y, value, sign, excluded[None], max_area=121)
    assert np.flatnonzero(keep).tolist() == [1, 4, 5, 6]  # the ring -> its strongest; edge and far peaks stay
    assert abs(xx[1] - 31.05) < 1e-9 and abs(yy[1] - 31.05) < 1e-9  # moved to the ring's centre
    # a peak of the other sign at the hole is another source
    keep2, _, _ = merge_around_holes(np.r_[img, 0], np.r_[x, 34.0], np.r_[y, 33.0], np.r_[value, 7.0],
                                     np.r_[sign, 1.0], excluded[None], max_area=121)
    assert keep2[7]
    # a larger compact patch (a saturated star's masked core, 15x15 = 225 px) merges only with max_extent
    big = np.zeros((1, 64, 64), bool)
    big[0, 24:39, 24:39] = True
    rx = np.array([22.0, 40.0, 31.0, 31.0])
    ry = np.array([31.0, 31.0, 22.0, 40.0])
    rv = np.array([7.0, 8.0, 6.5, 9.0])
    k0, _, _ = merge_around_holes(np.zeros(4, np.int64), rx, ry, rv, np.ones(4), big, max_area=121)
    assert k0.all()
    k1, mx, my = merge_around_holes(np.zeros(4, np.int64), rx, ry, rv, np.ones(4), big, max_area=121, max_extent=41)
    assert np.flatnonzero(k1).tolist() == [3] and abs(mx[3] - 31.0) < 1e-9 and abs(my[3] - 31.0) < 1e-9
    # an elongated patch of the same area (a bleed trail, 3 x 75) is left alone
    trail = np.zeros((1, 128, 64), bool)
    trail[0, 20:95, 30:33] = True
    tx = np.array([28.0, 35.0, 28.0])
    ty = np.array([40.0, 40.0, 80.0])
    kt, _, _ = merge_around_holes(np.zeros(3, np.int64), tx, ty, np.array([6.0, 7.0, 8.0]), np.ones(3), trail,
                                  max_area=121, max_extent=41)
    assert kt.all()


def test_peaks_climb_to_the_flux_peak_they_sit_on():
    from nightsift.engine.stages.detect import climb_to_flux_peak

    yy, xx = np.mgrid[0:40, 0:40]
    flux = 100 * np.exp(-((xx - 20.3) ** 2 + (yy - 19.8) ** 2) / (2 * 2.0**2))  # one source
    flux -= 60 * np.exp(-((xx - 8.0) ** 2 + (yy - 30.0) ** 2) / (2 * 2.0**2))  # a negative one
    # four ring peaks of S_corr around the positive source, one on the negative, one on flat sky
    x = np.array([17.0, 23.0, 20.0, 20.0, 9.0, 35.0])
    y = np.array([20.0, 20.0, 17.0, 23.0, 31.0, 5.0])
    sign = np.array([1, 1, 1, 1, -1, 1])
    img = np.zeros(6, np.int64)
    steps = np.full(6, 4)
    cx, cy = climb_to_flux_peak(flux[None], img, x, y, sign, max_steps=steps)
    np.testing.assert_allclose(cx[:4], 20.3, atol=0.15)
    np.testing.assert_allclose(cy[:4], 19.8, atol=0.15)
    assert abs(cx[4] - 8.0) < 0.15 and abs(cy[4] - 30.0) < 0.15
    assert abs(cx[5] - 35.0) <= 4 and abs(cy[5] - 5.0) <= 4  # at most max_steps pixels away
    # a peak never moves onto a blocked pixel, and never more than max_steps
    blocked = np.zeros_like(flux, bool)
    blocked[19:22, 19:22] = True
    bx, by = climb_to_flux_peak(flux[None], img[:1], x[:1], y[:1], sign[:1], max_steps=steps[:1],
                                blocked=blocked[None])
    assert not blocked[int(round(by[0])), int(round(bx[0]))]
    sx, _ = climb_to_flux_peak(flux[None], img[:1], x[:1], y[:1], sign[:1], max_steps=np.ones(1, int))
    assert abs(sx[0] - 17.0) <= 1.5


def test_every_tile_stacks_usable_stars_even_when_its_nearest_are_rejected():
    """A tile whose nearest candidates were all rejected (compact galaxies, runaway centroids) falls
    back to the nearest *usable* stars: no tile is left without a star (its PSF would be NaN)."""
    from nightsift.engine.stages.psf import _tile_members
    from nightsift.kernels.tiles import make_grid

    grid = make_grid((1024, 1024), core=512, margin=32)
    centres = grid.centres()
    x = np.array([100.0, 120.0, 140.0, 900.0, 910.0, 920.0, 930.0])  # three near tile 0, four near tile 1
    y = np.array([100.0, 110.0, 120.0, 100.0, 110.0, 120.0, 130.0])
    usable = np.array([False, False, False, True, True, True, True])
    cols, valid = _tile_members(np, x, y, usable, centres, core=512, min_stars=3, max_stars=60)
    assert valid.sum(axis=1).min() >= 3  # every tile: at least min_stars usable stars
    assert not np.any(valid & ~usable[cols])  # and never a rejected one


def test_magnitudes_need_a_zero_point_and_an_exposure_time():
    """magpsf / magnr from MAGZP and EXPTIME; without either they are NaN (null in the packets)."""
    from astropy.io import fits

    from nightsift.engine.stages.detect import DETECTION_COLUMNS, candidate_tables

    host = {k: np.zeros(2) for k in DETECTION_COLUMNS}
    host.update(image=np.zeros(2, np.int64), x=np.array([10.0, 20.0]), y=np.array([30.0, 40.0]),
                flux=np.array([1000.0, -100.0]), fluxerr=np.array([10.0, 10.0]), sign=np.array([1.0, -1.0]),
                distnr=np.array([1.5, np.inf]), ref_flux=np.array([2000.0, np.nan]))

    class NoWCS:
        def all_pix2world(self, x, y, origin):
            return np.zeros_like(x), np.zeros_like(y)

    def table(**cards):
        h = fits.Header()
        h.update(cards)
        return candidate_tables(host, batch=1, wcs=[NoWCS()], headers=[h], visits=[1], ccds=[2], F_r=[2.0],
                                shape=(100, 100))[0]

    c = table(MAGZP=30.0, EXPTIME=100.0)
    np.testing.assert_allclose(c["magpsf"], 30.0 - 2.5 * np.log10(np.array([1000.0, 100.0]) / 100.0))
    assert c["magnr"][0] == pytest.approx(30.0 - 2.5 * np.log10(1000.0 / 100.0)) and c["magnr"][1] == -999.0
    for cards in ({"EXPTIME": 100.0}, {"MAGZP": 30.0}, {"MAGZP": 30.0, "EXPTIME": 0.0}):
        c = table(**cards)
        assert np.isnan(c["magpsf"]).all() and np.isnan(c["magnr"][0]) and c["magnr"][1] == -999.0, cards
        np.testing.assert_allclose(c["snr"], [100.0, 10.0])  # the fluxes themselves do not need a zero point
