"""ZOGY kernel against known truth: white D, unit S_corr, cancelling stars, unbiased fluxes."""
import numpy as np
import pytest
from scipy.signal import fftconvolve

from nightsift.kernels import psf as kpsf
from nightsift.kernels.zogy import zogy

S = 31


def gaussian(fwhm, s=S, q=1.0):
    y, x = np.mgrid[:s, :s] - s // 2
    sig = fwhm / kpsf.FWHM_PER_SIGMA
    g = np.exp(-(x**2 * q + y**2 / q) / (2 * sig**2))
    return g / g.sum()


def blank_pair(rng, shape, sn, sr):
    return rng.normal(0, sn, shape), rng.normal(0, sr, shape)


def run(xp, N, R, pn, pr, VN, VR, **kw):
    to = xp.asarray
    shape = N.shape[-2:]
    PN, PR = kpsf.embed_psf(pn[None], shape)[0], kpsf.embed_psf(pr[None], shape)[0]
    res = zogy(to(N), to(R), to(PN), to(PR), to(VN), to(VR), **kw)
    get = lambda a: a.get() if hasattr(a, "get") else np.asarray(a)  # noqa: E731
    return {k: get(getattr(res, k)) for k in ("D", "S", "S_corr", "V_S", "V_ast", "P_D", "F_D", "F_S")}


def test_blank_sky_is_white_and_unit(xp, rng):
    shape = (512, 512)
    sn, sr, fr = 12.0, 4.0, 1.7
    N, R = blank_pair(rng, shape, sn, sr)
    out = run(xp, N, R, gaussian(3.0, q=1.1), gaussian(4.4), np.full(shape, sn**2), np.full(shape, sr**2),
              sigma_n=sn, sigma_r=sr, F_r=fr)
    assert abs(out["D"].std() - 1) < 0.01
    assert 0.97 < out["S_corr"].std() < 1.03
    assert abs(out["S_corr"].mean()) < 0.03
    # D is white: its power spectrum is flat (no frequency band deviates by more than 10 %)
    ps = np.abs(np.fft.rfft2(out["D"])) ** 2 / out["D"].size
    radial = [ps[:, i : i + 16].mean() for i in range(0, ps.shape[1] - 16, 16)]
    assert np.allclose(radial, 1.0, atol=0.1)
    # on blank sky the variance of S is F_S (eq. 26 reduces to F_D^2 sum P_D^2)
    assert np.allclose(out["V_S"].mean(), out["F_S"][0], rtol=1e-6)


def test_equal_psfs_give_plain_difference(xp, rng):
    shape = (256, 256)
    sn = sr = 5.0
    N, R = blank_pair(rng, shape, sn, sr)
    p = gaussian(3.5)
    out = run(xp, N, R, p, p, np.full(shape, sn**2), np.full(shape, sr**2), sigma_n=sn, sigma_r=sr, F_r=1.0)
    # D = (N - R) / sqrt(sn^2 + sr^2) exactly, so its std is sqrt(2) sigma / sqrt(2) sigma
    np.testing.assert_allclose(out["D"] * np.hypot(sn, sr), N - R, atol=1e-6 * sn)
    assert abs((N - R).std() / (np.sqrt(2) * sn) - 1) < 0.01


def point_sources(shape, xs, ys, fluxes, psf):
    img = np.zeros(shape)
    img[ys, xs] = fluxes
    return fftconvolve(img, psf, mode="same")


def test_stars_cancel_transients_unbiased_with_source_noise(xp, rng):
    shape = (512, 512)
    sn, sr, fr = 8.0, 3.0, 2.5
    pn, pr = gaussian(3.2), gaussian(4.0, q=0.9)
    g = np.arange(40, 480, 40)
    sx, sy = np.meshgrid(g, g)
    sx, sy = sx.ravel(), sy.ravel()
    star_flux = rng.uniform(2e3, 5e4, sx.size)
    tx, ty = sx + 20, sy + 20  # transients between the stars
    t_flux = np.full(tx.size, 4000.0)
    truth_N = point_sources(shape, sx, sy, star_flux, pn) + point_sources(shape, tx, ty, t_flux, pn)
    truth_R = fr * point_sources(shape, sx, sy, star_flux, pr)
    N = rng.poisson(np.clip(truth_N, 0, None)) + rng.normal(0, sn, shape)
    R = truth_R + rng.normal(0, np.sqrt(sr**2 + np.clip(truth_R, 0, None) / 20.0))  # deep coadd
    VN = sn**2 + np.clip(truth_N, 0, None)
    VR = sr**2 + np.clip(truth_R, 0, None) / 20.0
    out = run(xp, N, R, pn, pr, VN, VR, sigma_n=sn, sigma_r=sr, F_r=fr)
    sc = out["S_corr"]
    assert np.abs(sc[sy, sx]).max() < 4.0, "stars must subtract"
    flux = out["S"][ty, tx] / out["F_S"][0]
    err = np.sqrt(out["V_S"][ty, tx]) / out["F_S"][0]
    pulls = (flux - t_flux) / err
    assert abs(np.mean(flux) / 4000 - 1) < 0.01
    assert 0.75 < pulls.std() < 1.25  # 121 transients: the std is known to ~7 %
    assert sc[ty, tx].min() > 5


def test_astrometric_term_suppresses_misregistered_star(xp, rng):
    shape = (256, 256)
    sn = sr = 2.0
    p = gaussian(3.0)
    star = point_sources(shape, [128], [128], [2e5], p)
    moved = kpsf.fourier_shift(star, 0.15, 0.0)
    N = star + rng.normal(0, sn, shape)
    R = moved + rng.normal(0, sr, shape)
    V = np.full(shape, sn**2) + np.clip(star, 0, None)
    common = dict(sigma_n=sn, sigma_r=sr, F_r=1.0)
    plain = run(xp, N, R, p, p, V, V, **common)
    corr = run(xp, N, R, p, p, V, V, astrometric_rms=(0.15, 0.15), **common)
    assert np.abs(plain["S_corr"][120:137, 120:137]).max() > 8  # a dipole without the term
    assert np.abs(corr["S_corr"][120:137, 120:137]).max() < 4


def test_batched_equals_single(rng):
    shape = (128, 128)
    N, R = rng.normal(0, 3, (2, *shape)), rng.normal(0, 2, (2, *shape))
    pn, pr = gaussian(3.0), gaussian(4.0)
    PN = kpsf.embed_psf(np.stack([pn, pr]), shape)
    PR = kpsf.embed_psf(np.stack([pr, pn]), shape)
    V = np.ones((2, *shape))
    b = zogy(N, R, PN, PR, 9 * V, 4 * V, sigma_n=np.array([3.0, 3.0]), sigma_r=np.array([2.0, 2.0]),
             F_r=np.array([1.0, 2.0]), astrometric_rms=(0.05, 0.05))
    for t in range(2):
        s = zogy(N[t], R[t], PN[t], PR[t], 9 * V[t], 4 * V[t], sigma_n=3.0, sigma_r=2.0, F_r=[1.0, 2.0][t],
                 astrometric_rms=(0.05, 0.05))
        np.testing.assert_allclose(b.S_corr[t], s.S_corr, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(b.F_S[t], s.F_S[0], rtol=1e-12)


def test_float32_matches_float64(rng):
    shape = (256, 256)
    N, R = rng.normal(0, 5, shape), rng.normal(0, 2, shape)
    PN = kpsf.embed_psf(gaussian(3.0)[None], shape)[0]
    PR = kpsf.embed_psf(gaussian(4.0)[None], shape)[0]
    V1, V2 = np.full(shape, 25.0), np.full(shape, 4.0)
    a = zogy(N, R, PN, PR, V1, V2, sigma_n=5, sigma_r=2, F_r=1.3)
    b = zogy(N, R, PN, PR, V1, V2, sigma_n=5, sigma_r=2, F_r=1.3, dtype=np.float32)
    assert b.S_corr.dtype == np.float32
    err = np.linalg.norm(a.S_corr - b.S_corr) / np.linalg.norm(a.S_corr)
    assert err < 1e-4


def test_shape_mismatch_is_a_clear_error():
    a = np.zeros((8, 8))
    with pytest.raises(ValueError, match="share one shape"):
        zogy(a, np.zeros((8, 9)), a, a, a, a, sigma_n=1, sigma_r=1, F_r=1)
