"""kernels.moffat: batched Moffat fits of PSF stamps, against the PSF stage's former scipy fits.

The oracle is the PSF stage's scipy implementation as it was before the batched kernel replaced it
(engine/stages/psf.py: ``_moffat_stamp``, ``moffat_fit``, ``stack_variance``, ``hybrid_psf``), kept
verbatim below: one ``scipy.optimize.least_squares`` per stamp.
"""
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from nightsift.kernels import moffat as km
from nightsift.kernels import psf as kpsf
from nightsift.kernels._xp import count_transfers, to_host


# ------------------------------------------------------------------------------------------------
# the oracle: engine/stages/psf.py before the batched kernel (one scipy fit per stamp)
# ------------------------------------------------------------------------------------------------
def _moffat_stamp(p, s, over=3):
    amp, fwhm, beta, q, theta, dx, dy = p[:7]
    c = s // 2
    sub = (np.arange(over) + 0.5) / over - 0.5
    yy, xx = np.mgrid[0:s, 0:s].astype(float) - c
    xx = xx[..., None, None] + sub[None, None, None, :] - dx
    yy = yy[..., None, None] + sub[None, None, :, None] - dy
    ct, st = np.cos(theta), np.sin(theta)
    u = xx * ct + yy * st
    v = -xx * st + yy * ct
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    r2 = (u**2 * q + v**2 / q) / alpha**2  # geometric-mean FWHM = fwhm
    return amp * ((1 + r2) ** (-beta)).mean(axis=(-1, -2))


def moffat_fit(psf):
    s = psf.shape[0]
    f0 = kpsf.half_max_fwhm(psf)
    p0 = [psf.max(), max(f0 * 0.95, 1.0), 3.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    lo = [0, 0.5, 1.1, 0.5, -np.pi, -1, -1, -0.05 * psf.max()]
    hi = [np.inf, s, 20.0, 2.0, np.pi, 1, 1, 0.05 * psf.max()]
    res = optimize.least_squares(lambda p: (_moffat_stamp(p, s) + p[7] - psf).ravel(), p0, bounds=(lo, hi),
                                 x_scale="jac", max_nfev=300)
    amp, fwhm, beta = res.x[:3]
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    total = amp * np.pi * alpha**2 / (beta - 1)  # integral of the Moffat over the plane
    M = _moffat_stamp(res.x, s) / total
    apcorr = float(np.sum(psf * psf) / np.sum(M * psf))
    if not np.isfinite(apcorr) or abs(apcorr - 1) > 0.1 or fwhm < 2.5:
        apcorr = 1.0
    return {"fwhm": float(fwhm), "beta": float(beta), "pedestal": float(res.x[7]), "apcorr": apcorr,
            "model": _moffat_stamp(res.x, s) + res.x[7]}


def stack_variance(stamps, weights, sky_sigma, psf):
    F = np.maximum(np.asarray(stamps, np.float64).sum(axis=(1, 2)), 1e-30)
    w = np.asarray(weights, np.float64) * (F > 0)
    w = w / w.sum()
    sky = float(sky_sigma) ** 2 * np.sum(w**2 / F**2)
    src = np.sum(w**2 / F) * np.maximum(psf, 0.0)
    return sky + src


def hybrid_psf(psf, variance, fit, *, k=2.0, core=2.0):
    M = np.asarray(fit["model"], np.float64)
    r = psf - M
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(r != 0, np.maximum(0.0, 1.0 - k * k * variance / (r * r)), 0.0)
    s = psf.shape[-1]
    yy, xx = np.mgrid[0:s, 0:s] - s // 2
    f = np.where(np.hypot(xx, yy) <= core * fit["fwhm"], 1.0, f)
    out = M + f * r
    return out / out.sum()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
S = 31


def _random_params(rng, n, *, fwhm=(1.8, 8.0), beta=(2.0, 5.0)):
    """Moffat parameters over the range of survey PSFs: FWHM, beta, ellipticity, angle, sub-pixel offset."""
    return np.column_stack([np.ones(n), rng.uniform(*fwhm, n), rng.uniform(*beta, n), rng.uniform(0.75, 1.35, n),
                            rng.uniform(-1.5, 1.5, n), rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n),
                            np.zeros(n)])


def _noisy_unit_stamps(rng, params, *, noise=2e-5, pedestal=1e-4):
    m = km.moffat_stamps(params, S)
    m = m / m.sum(axis=(1, 2))[:, None, None]
    ped = rng.uniform(-pedestal, pedestal, len(m))[:, None, None]
    st = m + ped + rng.normal(0.0, noise, m.shape)
    return st / st.sum(axis=(1, 2))[:, None, None]


def _chi2(model, psf):
    return float(np.sum((model - psf) ** 2))


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def test_moffat_stamps_are_the_psf_stage_model(rng):
    p = _random_params(rng, 5)
    p[:, 0] = rng.uniform(0.01, 2.0, 5)
    p[:, 7] = rng.uniform(-1e-3, 1e-3, 5)
    p[2, 3], p[2, 4] = 1.0, 0.0  # round
    out = km.moffat_stamps(p, S)
    assert out.shape == (5, S, S) and out.dtype == np.float64
    for i in range(5):
        np.testing.assert_allclose(out[i], _moffat_stamp(p[i], S) + p[i, 7], rtol=1e-12, atol=1e-16)
    # one parameter row: one stamp; other oversampling and even sizes; no rows: no stamps
    np.testing.assert_allclose(km.moffat_stamps(p[0], 20, oversample=5), _moffat_stamp(p[0], 20, over=5) + p[0, 7],
                               rtol=1e-12, atol=1e-16)
    assert km.moffat_stamps(np.zeros((0, 8)), S).shape == (0, S, S)
    # total: the Moffat's integral over the plane (a wide, well-sampled stamp holds nearly all of it)
    wide = np.array([[0.3, 3.0, 4.0, 1.2, 0.4, 0.0, 0.0, 0.0]])
    assert km.moffat_total(wide)[0] == pytest.approx(km.moffat_stamps(wide, 201).sum(), rel=1e-4)
    with pytest.raises(ValueError, match="params"):
        km.moffat_stamps(np.zeros((3, 7)), S)


def test_analytic_jacobian_matches_finite_differences(rng):
    p = km._internal(np, _random_params(rng, 3))
    p[:, 0], p[:, 7] = [0.05, 0.1, 0.02], [1e-4, -2e-4, 0.0]
    p[2, 3:5] = 0.0  # a round profile: the ellipse parametrisation is smooth through it
    grid = km._subpixel_grid(np, 21, 3)
    _, J = km._evaluate(np, p, grid, jac=True)

    def model(q):
        prof, _ = km._evaluate(np, q, grid, jac=False)
        return q[:, :1] * prof + q[:, 7:8]

    for j in range(8):
        h = 1e-6 * np.maximum(np.abs(p[:, j]), 1.0)
        dp = np.zeros_like(p)
        dp[:, j] = h
        fd = (model(p + dp) - model(p - dp)) / (2 * h[:, None])
        np.testing.assert_allclose(J[:, j], fd, rtol=0, atol=1e-7 * np.abs(fd).max() + 1e-12, err_msg=km.PARAM_NAMES[j])


def test_half_max_fwhm_is_the_psf_kernels(rng):
    for s in (31, 30, 15):
        p = _random_params(rng, 4)
        st = km.moffat_stamps(p, s) + rng.normal(0, 1e-3, (4, s, s))
        got = km.half_max_fwhm(st)
        want = [kpsf.half_max_fwhm(x) for x in st]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert km.half_max_fwhm(st[0]).shape == ()
    assert km.half_max_fwhm(np.zeros((0, 9, 9))).shape == (0,)


# ------------------------------------------------------------------------------------------------
# the fit, against truth and against scipy
# ------------------------------------------------------------------------------------------------
def test_fit_recovers_moffats_and_agrees_with_scipy(rng):
    n = 16
    p = _random_params(rng, n)
    p[:4, 1] = [1.8, 2.2, 7.5, 8.0]  # the ends of the FWHM range
    p[4:6, 3:5] = [[1.0, 0.0], [1.0, 0.7]]  # round
    st = _noisy_unit_stamps(rng, p)
    fit = km.fit_moffat(st)
    assert fit.params.shape == (n, 8) and fit.model.shape == (n, S, S)
    assert np.all(fit.converged) and np.all(fit.n_iter <= 20)
    np.testing.assert_allclose(fit.fwhm, p[:, 1], rtol=5e-3)
    ref = [moffat_fit(x) for x in st]
    # the same least-squares problem: our minimum is as deep as scipy's, or deeper where scipy
    # stopped short of it (it does, rarely: 1 stamp in 150 of this kind)
    chi2_ref = np.array([_chi2(r["model"], x) for r, x in zip(ref, st)])
    assert np.all(fit.chi2 <= chi2_ref * (1 + 1e-6))
    same = fit.chi2 >= chi2_ref * (1 - 1e-6)
    assert same.sum() >= n - 1
    np.testing.assert_allclose(fit.fwhm[same], np.array([r["fwhm"] for r in ref])[same], rtol=3e-3)
    np.testing.assert_allclose(fit.apcorr[same], np.array([r["apcorr"] for r in ref])[same], atol=2e-3, rtol=0)
    np.testing.assert_allclose(fit.beta[same], np.array([r["beta"] for r in ref])[same], rtol=0.02)
    np.testing.assert_allclose(fit.chi2, [_chi2(m, x) for m, x in zip(fit.model, st)], rtol=1e-9)
    np.testing.assert_allclose(fit.rms, np.sqrt(fit.chi2 / S**2))
    # the model is the fitted parameters' stamp; the axis ratio comes out in the q >= 1 form
    np.testing.assert_allclose(fit.model, km.moffat_stamps(fit.params, S), rtol=1e-10, atol=1e-15)
    q, theta = fit.params[:, 3], fit.params[:, 4]
    assert np.all((q >= 1) & (q <= 2)) and np.all(np.abs(theta) <= np.pi / 2)
    # the aperture-correction rule: none for undersampled PSFs, the total/stamp ratio otherwise
    assert np.all(fit.apcorr[fit.fwhm < 2.5] == 1.0)
    wide = fit.fwhm > 2.5
    assert np.all(fit.apcorr[wide] != 1.0) and np.all(np.abs(fit.apcorr[wide] - 1) < 0.1)


def test_stamps_that_are_no_moffat_agree_with_scipy(rng):
    yy, xx = np.mgrid[:S, :S] - S // 2
    stamps = []
    for sig, dx, dy in ((1.0, 0.2, -0.1), (1.6, -0.3, 0.4), (2.6, 0.0, 0.25)):  # Gaussians
        g = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * sig**2))
        stamps.append(g + rng.normal(0, 1e-5 * g.sum(), g.shape))
    for fwhm in (3.0, 5.0):  # a Moffat with diffraction-like spikes
        m = _moffat_stamp([1, fwhm, 2.5, 1.1, 0.3, 0.1, -0.2], S)
        spikes = np.zeros_like(m)
        spikes[S // 2, S // 2 + 4:] = spikes[S // 2, : S // 2 - 3] = spikes[S // 2 + 4:, S // 2] = 0.03
        stamps.append(m + spikes * m.max())
    st = np.array([a / a.sum() for a in stamps])
    fit = km.fit_moffat(st)
    ref = [moffat_fit(x) for x in st]
    np.testing.assert_allclose(fit.fwhm, [r["fwhm"] for r in ref], rtol=0.01)
    np.testing.assert_allclose(fit.apcorr, [r["apcorr"] for r in ref], atol=2e-3, rtol=0)
    assert np.all(fit.beta[:3] == 20.0)  # a Gaussian is the beta -> infinity Moffat: at the bound
    for i in range(len(st)):
        assert fit.chi2[i] <= _chi2(ref[i]["model"], st[i]) * (1 + 1e-6)


def test_degenerate_stamps_give_finite_fits_without_correction(rng):
    d = np.zeros((6, S, S))
    d[0, 15, 15] = 1.0  # one hot pixel
    d[5, 12, 17] = 1.0  # one hot pixel, off the centre
    d[1] = rng.normal(0, 1, (S, S))
    d[1] /= d[1].sum()  # pure noise, unit sum
    d[2] = rng.normal(0, 1, (S, S))  # pure noise
    # d[3]: all zero
    d[4] = _moffat_stamp([1, 3.0, 3.0, 1.0, 0, 0, 0], S)
    d[4, 3, 3] = np.nan  # a non-finite pixel
    fit = km.fit_moffat(d, max_iter=30)
    ok = [0, 1, 2, 3, 5]
    assert np.all(np.isfinite(fit.params[ok])) and np.all(np.isfinite(fit.model[ok]))
    assert np.all(np.isfinite(fit.rms[ok]))
    np.testing.assert_array_equal(fit.apcorr, 1.0)
    assert np.all(np.isnan(fit.params[4])) and np.isnan(fit.fwhm[4]) and not fit.converged[4]
    assert fit.fwhm[0] < 1.5  # a single pixel is as sharp as the model gets
    np.testing.assert_array_equal(fit.model[3], 0.0)


def test_a_batch_is_the_same_as_single_fits(rng):
    p = _random_params(rng, 5)
    st = _noisy_unit_stamps(rng, p)
    st[3] = 0.0
    st[3, 15, 15] = 1.0  # a degenerate stamp does not disturb the others
    batch = km.fit_moffat(st)
    for i in range(5):
        one = km.fit_moffat(st[i])
        assert one.params.shape == (8,) and one.fwhm.shape == () and one.model.shape == (S, S)
        for name in ("params", "fwhm", "apcorr", "model", "chi2", "n_iter", "converged"):
            np.testing.assert_array_equal(getattr(one, name), getattr(batch, name)[i], err_msg=name)


def test_bad_input_and_empty_batches():
    with pytest.raises(ValueError, match="stamps"):
        km.fit_moffat(np.zeros((3, 9, 8)))
    with pytest.raises(ValueError, match="max_iter"):
        km.fit_moffat(np.zeros((9, 9)), max_iter=0)
    empty = km.fit_moffat(np.zeros((0, 9, 9)))
    assert empty.params.shape == (0, 8) and empty.model.shape == (0, 9, 9) and len(empty) == 0
    assert km.hybrid_psf(np.zeros((0, 9, 9)), np.zeros((0, 9, 9)), np.zeros((0, 9, 9)), np.zeros(0)).shape == (0, 9, 9)
    assert km.stack_variance(np.zeros((0, 2, 9, 9)), np.zeros((0, 2)), 1.0, np.zeros((0, 9, 9))).shape == (0, 9, 9)


# ------------------------------------------------------------------------------------------------
# the hybrid PSF
# ------------------------------------------------------------------------------------------------
def _tiles(rng, T=4, K=5, s=S):
    """Star stamps of an image, each tile's members (padded with weight 0) and their stacks."""
    n = 9
    truth = _moffat_stamp([1.0, 4.0, 3.0, 1.0, 0, 0, 0], s)
    truth /= truth.sum()
    flux = rng.uniform(2e4, 2e5, n)
    stars = flux[:, None, None] * truth + rng.normal(0, 30.0, (n, s, s))
    sizes = [5, 3, 1, 4][:T]
    members = np.zeros((T, K), np.int64)
    weights = np.zeros((T, K))
    for t, k in enumerate(sizes):
        members[t, :k] = rng.choice(n, k, replace=False)
        weights[t, :k] = rng.uniform(100, 1000, k)
    psf = np.array([stars[members[t, :k]].sum(0) / stars[members[t, :k]].sum() for t, k in enumerate(sizes)])
    return stars, members, weights, sizes, psf


def test_stack_variance_is_the_psf_stage_version(rng):
    stars, members, weights, sizes, psf = _tiles(rng)
    want = np.array([stack_variance(stars[members[t, :k]], weights[t, :k], 30.0, psf[t]) for t, k in enumerate(sizes)])
    got = km.stack_variance(stars, weights, 30.0, psf, members=members)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    padded = stars[members] * (weights > 0)[:, :, None, None]  # (T, K, s, s), padding rows zero
    np.testing.assert_allclose(km.stack_variance(padded, weights, 30.0, psf), want, rtol=1e-10, atol=0)
    # one sky noise per tile (tiles of several CCDs), and a single tile
    sig = np.array([30.0, 10.0, 30.0, 50.0])
    want_t = np.array([stack_variance(stars[members[t, :k]], weights[t, :k], sig[t], psf[t])
                       for t, k in enumerate(sizes)])
    np.testing.assert_allclose(km.stack_variance(stars, weights, sig, psf, members=members), want_t, rtol=1e-10)
    np.testing.assert_allclose(km.stack_variance(padded[1], weights[1], 30.0, psf[1]), want[1], rtol=1e-10)
    with pytest.raises(ValueError, match="weights"):
        km.stack_variance(padded, weights[:, :3], 30.0, psf)


def test_hybrid_psf_is_the_psf_stage_version(rng):
    stars, members, weights, sizes, psf = _tiles(rng)
    var = km.stack_variance(stars, weights, 30.0, psf, members=members)
    fit = km.fit_moffat(psf)
    for k, core in ((2.0, 2.0), (3.0, 1.0)):
        got = km.hybrid_psf(psf, var, fit.model, fit.fwhm, k=k, core=core)
        want = [hybrid_psf(psf[t], var[t], {"model": fit.model[t], "fwhm": fit.fwhm[t]}, k=k, core=core)
                for t in range(len(psf))]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(got.sum(axis=(1, 2)), 1.0)
    one = km.hybrid_psf(psf[0], var[0], fit.model[0], fit.fwhm[0], k=3.0, core=1.0)
    np.testing.assert_allclose(one, want[0], rtol=1e-10, atol=1e-16)


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------
def test_backend_agrees_with_numpy(xp, rng):
    p = _random_params(rng, 6)
    st = _noisy_unit_stamps(rng, p)
    ref = km.fit_moffat(st)
    fit = km.fit_moffat(xp.asarray(st))
    assert type(fit.params) is type(xp.asarray(st))
    np.testing.assert_allclose(to_host(fit.fwhm), ref.fwhm, rtol=1e-7)
    np.testing.assert_allclose(to_host(fit.apcorr), ref.apcorr, rtol=0, atol=1e-8)
    np.testing.assert_allclose(to_host(fit.model), ref.model, rtol=0, atol=1e-9 * ref.model.max())
    np.testing.assert_allclose(to_host(km.moffat_stamps(xp.asarray(p), S)), km.moffat_stamps(p, S),
                               rtol=1e-12, atol=1e-16)


def test_runs_on_the_strict_device(rng):
    if not (Path(__file__).resolve().parents[1] / "strict_device.py").exists():
        pytest.skip("tests/strict_device.py (the strict device stand-in) is not there yet")
    from tests.strict_device import strict_namespace

    sx = strict_namespace()
    p = _random_params(rng, 5)
    st = _noisy_unit_stamps(rng, p)
    stars, members, weights, sizes, psf = _tiles(rng)
    d_st, d_p, d_stars, d_mem, d_w, d_psf = (sx.asarray(a) for a in (st, p, stars, members, weights, psf))
    sx.reset_stats()
    with count_transfers() as led:
        fit = km.fit_moffat(d_st, max_iter=30, check_every=3)
        stamps = km.moffat_stamps(d_p, S)
        hm = km.half_max_fwhm(d_st)
        var = km.stack_variance(d_stars, d_w, 30.0, d_psf, members=d_mem)
        tfit = km.fit_moffat(d_psf)
        hyb = km.hybrid_psf(d_psf, var, tfit.model, tfit.fwhm)
    # nothing uploaded; only the early-exit checks read scalars (one every 3 iterations)
    assert sx.stats.h2d_count == 0 and led.h2d_count == 0
    assert 1 <= led.scalar_reads <= 2 * 10 and sx.stats.d2h_count == led.d2h_count
    ref = km.fit_moffat(st, max_iter=30, check_every=3)
    for name in ("params", "fwhm", "apcorr", "model", "chi2", "n_iter", "converged"):
        np.testing.assert_array_equal(getattr(fit, name).get(), getattr(ref, name), err_msg=name)
    np.testing.assert_array_equal(stamps.get(), km.moffat_stamps(p, S))
    np.testing.assert_array_equal(hm.get(), km.half_max_fwhm(st))
    rvar = km.stack_variance(stars, weights, 30.0, psf, members=members)
    rfit = km.fit_moffat(psf)
    np.testing.assert_array_equal(var.get(), rvar)
    np.testing.assert_array_equal(hyb.get(), km.hybrid_psf(psf, rvar, rfit.model, rfit.fwhm))
