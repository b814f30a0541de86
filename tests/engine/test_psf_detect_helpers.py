"""PSF and detection stage helpers: the stellar locus among galaxies, the hybrid (denoised) PSF, star
selection, peaks around masked holes."""
import numpy as np
import pytest

from nightsift.engine.stages.psf import (MIN_PSF_FWHM, SOURCE_DTYPE, _moffat_stamp, hybrid_psf, moffat_fit,
                                         select_psf_stars, stack_variance, stellar_locus)
from nightsift.engine.config import PSFConfig


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
    m = _moffat_stamp([1.0, fwhm, beta, 1.0, 0.0, dx, dy], s)
    return m / m.sum()


def test_hybrid_psf_removes_wing_noise_and_keeps_the_core(rng):
    s, fwhm = 41, 5.0
    truth = _moffat(s, fwhm)
    # three stacked stars of 1e5 e- on a sky of sigma 60 e-: the stack's wings are noise-dominated
    stars = np.array([truth * 1e5 + rng.normal(0, 60.0, truth.shape) for _ in range(3)])
    stack = stars.sum(axis=0) / stars.sum()
    var = stack_variance(stars, np.ones(3), 60.0, stack)
    hyb = hybrid_psf(stack, var, moffat_fit(stack))
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
    quiet = stack_variance(np.array([spike * 1e8]), np.ones(1), 1.0, spike)
    kept = hybrid_psf(spike, quiet, moffat_fit(spike))
    assert kept[s // 2, s // 2 + 16] - kept[s // 2 + 16, s // 2] > 0.003


def test_hot_pixels_do_not_break_the_isolation_of_psf_stars():
    cat = np.zeros(3, SOURCE_DTYPE)
    cat["x"], cat["y"] = [100.0, 110.0, 140.0], [100.0, 104.0, 100.0]
    cat["flux"], cat["peak"] = [1e5, 3e3, 2e3], [8e3, 2.9e3, 5e2]  # a star, a hot pixel, a faint galaxy
    cat["snr"], cat["a"], cat["b"] = [300, 60, 20], [2.0, 0.6, 3.0], [1.9, 0.6, 2.5]
    idx = select_psf_stars(cat, (256, 256), mask=np.zeros((256, 256), np.uint16), stamp=31, config=PSFConfig())
    assert 0 in idx  # the hot pixel 11 px away carries 3 % of the star's flux, yet is no neighbour
    cat["peak"][1] = 5e2  # the same flux spread like a source: the star is not isolated
    idx = select_psf_stars(cat, (256, 256), mask=np.zeros((256, 256), np.uint16), stamp=31, config=PSFConfig())
    assert 0 not in idx


def test_peaks_around_a_small_masked_hole_are_one_candidate():
    from nightsift.engine.stages.detect import merge_around_holes

    excluded = np.zeros((64, 64), bool)
    excluded[29:34, 29:34] = True  # a masked pixel grown into a 5x5 hole at (31, 31)
    excluded[:, :4] = True  # the CCD edge: a large patch, left alone
    x = np.array([28.0, 34.0, 31.2, 31.0, 5.0, 5.0, 31.0])
    y = np.array([31.0, 31.0, 28.0, 34.2, 10.0, 20.0, 40.0])
    value = np.array([-9.0, -11.0, -8.0, -7.5, 6.0, 6.5, -6.0])
    sign = np.sign(value)
    keep, xx, yy = merge_around_holes(x, y, value, sign, excluded, max_area=121)
    assert sorted(keep.tolist()) == [1, 4, 5, 6]  # the ring -> its strongest peak; edge peaks and a far one stay
    assert abs(xx[1] - 31.05) < 1e-9 and abs(yy[1] - 31.05) < 1e-9  # moved to the ring's centre
    # a peak of the other sign at the hole is another source
    keep2, _, _ = merge_around_holes(np.r_[x, 34.0], np.r_[y, 33.0], np.r_[value, 7.0], np.r_[sign, 1.0], excluded,
                                     max_area=121)
    assert 7 in keep2


def test_peaks_climb_to_the_flux_peak_they_sit_on():
    from nightsift.engine.stages.detect import climb_to_flux_peak

    yy, xx = np.mgrid[0:40, 0:40]
    flux = 100 * np.exp(-((xx - 20.3) ** 2 + (yy - 19.8) ** 2) / (2 * 2.0**2))  # one source
    flux -= 60 * np.exp(-((xx - 8.0) ** 2 + (yy - 30.0) ** 2) / (2 * 2.0**2))  # a negative one
    # four ring peaks of S_corr around the positive source, one on the negative, one on flat sky
    x = np.array([17.0, 23.0, 20.0, 20.0, 9.0, 35.0])
    y = np.array([20.0, 20.0, 17.0, 23.0, 31.0, 5.0])
    sign = np.array([1, 1, 1, 1, -1, 1])
    cx, cy = climb_to_flux_peak(flux, x, y, sign, max_steps=4)
    np.testing.assert_allclose(cx[:4], 20.3, atol=0.15)
    np.testing.assert_allclose(cy[:4], 19.8, atol=0.15)
    assert abs(cx[4] - 8.0) < 0.15 and abs(cy[4] - 30.0) < 0.15
    assert abs(cx[5] - 35.0) <= 4 and abs(cy[5] - 5.0) <= 4  # at most max_steps pixels away
    # a peak never moves onto a blocked pixel, and never more than max_steps
    blocked = np.zeros_like(flux, bool)
    blocked[19:22, 19:22] = True
    bx, by = climb_to_flux_peak(flux, x[:1], y[:1], sign[:1], max_steps=4, blocked=blocked)
    assert not blocked[int(round(by[0])), int(round(bx[0]))]
    sx, _ = climb_to_flux_peak(flux, x[:1], y[:1], sign[:1], max_steps=1)
    assert abs(sx[0] - 17.0) <= 1.5
