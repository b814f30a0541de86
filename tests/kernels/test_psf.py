"""PSF numerics: exact sub-pixel shifts, stacking recovers the PSF, FWHM and moments."""
import numpy as np
import pytest

from nightsift.kernels import psf as kpsf


def moffat(fwhm, beta=3.0, s=31, dx=0.0, dy=0.0, over=5):
    y, x = np.mgrid[:s, :s] - s // 2
    a = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    sub = (np.arange(over) + 0.5) / over - 0.5
    acc = np.zeros((s, s))
    for ox in sub:
        for oy in sub:
            acc += (1 + ((x - dx + ox) ** 2 + (y - dy + oy) ** 2) / a**2) ** (-beta)
    return acc / acc.sum()


def test_fourier_shift_matches_rendered_offset(xp):
    p0 = xp.asarray(moffat(3.5))
    p1 = moffat(3.5, dx=0.3, dy=-0.2)
    out = kpsf.fourier_shift(p0, 0.3, -0.2)
    out = out.get() if hasattr(out, "get") else out
    assert np.abs(out - p1).max() < 2e-3 * p1.max()


def test_centroid_and_stack_recover_psf(rng):
    n = 30
    dx, dy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    truth = moffat(3.5)
    stamps = np.stack([2e5 * moffat(3.5, dx=a, dy=b) + rng.normal(0, 5, (31, 31)) for a, b in zip(dx, dy)])
    cx, cy = kpsf.centroid(stamps, sigma=1.5)
    assert np.std(cx - dx) < 0.01 and np.std(cy - dy) < 0.01
    # a cosmic ray in one stamp is clipped away
    stamps[3, 10, 10] += 5e4
    psf = kpsf.stack_psf(stamps, cx, cy)
    assert abs(psf.sum() - 1) < 1e-9
    assert np.abs(psf - truth).max() < 3e-3 * truth.max()
    assert abs(kpsf.half_max_fwhm(psf) / kpsf.half_max_fwhm(truth) - 1) < 0.005


def test_embed_and_crop_roundtrip():
    p = moffat(3.0)[None]
    e = kpsf.embed_psf(p, (64, 80))
    assert e.shape == (1, 64, 80) and e[0, 0, 0] == p[0, 15, 15]
    np.testing.assert_array_equal(kpsf.crop_embedded(e, 31), p)
    # a symmetric PSF embedded this way has a real, zero-phase FFT
    f = np.fft.rfft2(kpsf.embed_psf(moffat(3.0, s=31)[None], (64, 64))[0])
    assert np.abs(f.imag).max() < 1e-12


def test_half_max_fwhm_of_pixelised_gaussian():
    s, sig = 41, 2.0
    y, x = np.mgrid[:s, :s] - s // 2
    g = np.exp(-(x**2 + y**2) / (2 * sig**2))
    assert kpsf.half_max_fwhm(g / g.sum()) == pytest.approx(kpsf.FWHM_PER_SIGMA * sig, rel=0.01)


def test_moments_of_elliptical_gaussian():
    s = 41
    y, x = np.mgrid[:s, :s] - s // 2
    sxx, syy = 2.5, 1.5
    g = np.exp(-(x**2 / (2 * sxx**2) + y**2 / (2 * syy**2)))[None]
    dx, dy, mxx, myy, mxy = kpsf.moments(g, sigma=2.0, iterations=30)
    assert mxx[0] == pytest.approx(sxx**2, rel=0.02) and myy[0] == pytest.approx(syy**2, rel=0.02)
    fwhm, elong = kpsf.shape_from_moments(mxx, myy, mxy)
    assert elong[0] == pytest.approx(sxx / syy, rel=0.02)
    assert fwhm[0] == pytest.approx(kpsf.FWHM_PER_SIGMA * np.sqrt(sxx * syy), rel=0.02)
