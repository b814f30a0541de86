"""Batched pixel-integrated elliptical Moffat fits of PSF stamps, written once over ``xp``.

The PSF stage fits every tile's PSF stack (and every CCD of a batch) with a pixel-integrated
elliptical Moffat profile plus a constant, to report the FWHM and an aperture correction and to
build the hybrid (denoised) PSF. This module does all those fits in one call: a projected
Levenberg-Marquardt least-squares solver whose state is ``(n, 8)`` parameters and ``(n, 8, 8)``
normal equations, with an analytic Jacobian of the oversampled model computed in the same pass as
the model. It replaces ``2 x T`` calls of ``scipy.optimize.least_squares`` per image and runs
unchanged on numpy, cupy and the strict device stand-in.

Model
-----
Stamps are ``(s, s)`` with the centre pixel at ``s // 2`` (0-based, x = column). Parameters
``p = (amp, fwhm, beta, q, theta, dx, dy, pedestal)`` (float64, :data:`PARAM_NAMES`)::

    alpha = fwhm / (2 sqrt(2**(1/beta) - 1))
    u =  (x - dx) cos(theta) + (y - dy) sin(theta)
    v = -(x - dx) sin(theta) + (y - dy) cos(theta)
    r2 = (u**2 q + v**2 / q) / alpha**2            (geometric-mean FWHM = fwhm)
    pixel value = amp * mean over oversample**2 sub-pixel centres of (1 + r2)**(-beta) + pedestal

exactly the model of the PSF stage's ``_moffat_stamp`` (plus the constant).

Fit
---
:func:`fit_moffat` minimises ``sum((model - psf)**2)`` over the pixels of each stamp within the
bounds ``amp >= 0``, ``0.5 <= fwhm <= s``, ``1.1 <= beta <= 20``, ``0.5 <= q <= 2``,
``-pi <= theta <= pi``, ``|dx|, |dy| <= 1``, ``|pedestal| <= 0.05 max(psf)``, from the starting
point ``(max(psf), max(0.95 f_hm, 1), 3, 1, 0, 0, 0, 0)`` with ``f_hm`` the half-maximum FWHM
(:func:`half_max_fwhm`) -- the same problem the stage's scipy fit solves.

Internally the ellipse is ``(e1, e2) = ln(q) (cos 2 theta, sin 2 theta)``: ``(q, theta)`` is singular
at a round profile, the fits' starting point, where ``theta`` is undefined and its Jacobian column
zero (a fit started there can jump ``theta`` onto a bound it cannot leave). The bounds on ``q`` and
``theta`` become the disc ``|e| <= ln 2``; fitted ellipses are reported with ``q >= 1`` and
``-pi/2 < theta <= pi/2`` -- the same ellipses as every ``(q, theta)`` inside the stage's bounds.

Each iteration, per stamp: the parameters at a bound whose gradient points outwards are held
(active set); the others take the damped Gauss-Newton step ``(J^T J + lambda D) d = -J^T r``
(``D`` the running maximum of ``diag(J^T J)``, Marquardt's scaling; the (n, 8, 8) systems solved by
one batched ``xp.linalg.solve``), projected into the bounds. The model and the analytic Jacobian
are evaluated at the trial point in one pass over the sub-pixels; the step is accepted if the sum
of squares drops, and ``lambda`` follows the gain ratio (Nielsen's rule). A stamp has converged,
and is frozen, when a nearly Gauss-Newton step (``lambda <= 1``) changes the sum of squares (and
its linear prediction) by less than ``ftol`` relative, or the parameters by less than ``xtol``;
when no step decreases it any more (``lambda`` above 1e10); or on a perfect fit. The loop runs at
most ``max_iter`` iterations; every ``check_every`` iterations one scalar read (the stamps still
running) decides whether to stop, and the working set shrinks to the running stamps. The fit is
done on stamps scaled to unit maximum, so the damping floor and tolerances do not depend on the
stamps' units. Typical PSF stacks converge in 5-7 iterations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._xp import array_namespace, fft_module, host_scalar, to_device

__all__ = ["PARAM_NAMES", "MoffatFit", "moffat_stamps", "fit_moffat", "half_max_fwhm", "moffat_total",
           "stack_variance", "hybrid_psf"]

#: names of the 8 parameter columns
PARAM_NAMES = ("amp", "fwhm", "beta", "q", "theta", "dx", "dy", "pedestal")
_NPAR = 8
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def _subpixel_grid(xp, s: int, over: int):
    """Pixel centres ``(s*s,)`` relative to the centre pixel ``s // 2`` (x = column, raster order)
    and the sub-pixel offsets (Python floats) of the pixel integral, as in ``_moffat_stamp``."""
    pix = xp.arange(s, dtype=xp.float64) - s // 2
    X = xp.reshape(xp.broadcast_to(pix[None, :], (s, s)), (s * s,))
    Y = xp.reshape(xp.broadcast_to(pix[:, None], (s, s)), (s * s,))
    sub = [(k + 0.5) / over - 0.5 for k in range(over)]
    return X, Y, sub


def _alpha(xp, fwhm, beta):
    return fwhm / (2 * xp.sqrt(2 ** (1 / beta) - 1))


def _to_shear(xp, q, theta):
    """``(q, theta)`` -> internal ellipse parameters ``(e1, e2) = ln(q) (cos 2 theta, sin 2 theta)``."""
    eta = xp.log(q)
    return eta * xp.cos(2 * theta), eta * xp.sin(2 * theta)


def _from_shear(xp, e1, e2):
    """Internal ``(e1, e2)`` -> ``(q, theta)`` with ``q >= 1`` and ``-pi/2 < theta <= pi/2``."""
    return xp.exp(xp.hypot(e1, e2)), 0.5 * xp.arctan2(e2, e1)


def _shear_terms(xp, e1, e2):
    """``cosh(eta)``, ``S = sinh(eta) / eta`` and ``T = S'(eta) / eta`` of ``eta = |(e1, e2)|``,
    smooth through ``eta = 0``."""
    eta = xp.hypot(e1, e2)
    big = eta > 1e-2
    es = xp.where(big, eta, 1.0)
    S = xp.where(big, xp.sinh(es) / es, 1 + eta * eta / 6)
    T = xp.where(big, (es * xp.cosh(es) - xp.sinh(es)) / es**3, 1 / 3 + eta * eta / 30)
    return xp.cosh(eta), S, T


def _evaluate(xp, p, grid, *, jac: bool):
    """Profile (no amplitude, no pedestal) ``(n, P)`` of internal parameters ``p`` (n, 8) =
    ``(amp, fwhm, beta, e1, e2, dx, dy, pedestal)`` and, if ``jac``, the Jacobian ``(n, 8, P)`` of
    ``amp * profile + pedestal`` with respect to them, in one pass over the sub-pixels.

    With ``eta = |e| = ln q`` and ``2 theta`` the direction of ``e``, the quadratic form of
    :func:`moffat_stamps` is ``alpha^2 r2 = cosh(eta) (x^2 + y^2) + S (e1 (x^2 - y^2) + 2 e2 x y)``,
    ``S = sinh(eta) / eta``: smooth in ``(e1, e2)`` through a round profile, where ``theta`` is
    undefined. The sub-pixels are visited in a loop over the ``oversample^2`` offsets, each step
    working on ``(n, P)`` arrays; the Jacobian needs, besides the profile, the sub-pixel sums of
    ``f ln(1 + r2)`` and of ``g = f / (1 + r2)`` times ``1, x, y, x^2, y^2, x y``, which are
    accumulated per offset column/row (``x`` depends only on the column offset, ``y`` on the row's).
    """
    X, Y, sub = grid
    nsub = len(sub) ** 2
    amp, fwhm, beta, e1, e2, dx, dy = (p[:, i][:, None] for i in range(7))
    ch, Sh, Th = _shear_terms(xp, e1, e2)
    h = 2 ** (1 / beta) - 1
    alpha = fwhm / (2 * xp.sqrt(h))
    ia2 = 1 / (alpha * alpha)
    a11 = (ch + Sh * e1) * ia2  # r2 = a11 x^2 + a22 y^2 + a12 x y
    a22 = (ch - Sh * e1) * ia2
    a12 = 2 * Sh * e2 * ia2
    nb = -beta
    xb = X[None] - dx
    yb = Y[None] - dy
    xs = [xb + o for o in sub]
    ys = [yb + o for o in sub]
    axx = [a11 * (x * x) for x in xs]
    ayy = [a22 * (y * y) for y in ys]
    zeros = lambda: xp.zeros(xb.shape, dtype=xp.float64)  # noqa: E731
    prof = zeros()
    if jac:
        fL = zeros()
        gcol = [zeros() for _ in sub]  # sum over rows of g, per column offset
        grow = [zeros() for _ in sub]  # sum over columns of g, per row offset
        gycol = [zeros() for _ in sub]  # sum over rows of g y, per column offset
    # work buffers written with ``out=``: a fresh (n, P) temporary per operation would cost more
    # than the operation itself on numpy (page faults of large allocations)
    r2, t, L, f = zeros(), zeros(), zeros(), zeros()
    for iy, y in enumerate(ys):
        ay = a12 * y
        for ix, x in enumerate(xs):
            xp.add(axx[ix], ayy[iy], out=r2)
            xp.multiply(ay, x, out=t)
            r2 += t
            xp.log1p(r2, out=L)
            xp.multiply(L, nb, out=t)
            xp.exp(t, out=f)
            prof += f
            if jac:
                L *= f
                fL += L
                r2 += 1
                f /= r2  # now g = f / (1 + r2)
                gcol[ix] += f
                grow[iy] += f
                f *= y
                gycol[ix] += f
    prof /= nsub
    if not jac:
        return prof, None
    n, P = prof.shape
    gx = sum(gc * x for gc, x in zip(gcol, xs)) / nsub
    gxx = sum(gc * (x * x) for gc, x in zip(gcol, xs)) / nsub
    gy = sum(gr * y for gr, y in zip(grow, ys)) / nsub
    gyy = sum(gr * (y * y) for gr, y in zip(grow, ys)) / nsub
    gxy = sum(gc * x for gc, x in zip(gycol, xs)) / nsub
    fL /= nsub
    gr2 = a11 * gxx + a22 * gyy + a12 * gxy
    gR, gD, gC = gxx + gyy, gxx - gyy, 2 * gxy
    dlna_dbeta = 2 ** (1 / beta) * _LN2 / (2 * h * beta * beta)
    c0 = -amp * beta * ia2  # d(amp f) / d(alpha^2 r2) = c0 g
    W = e1 * gD + e2 * gC
    J = xp.stack([
        prof,
        (2 * amp * beta / fwhm) * gr2,
        amp * (2 * beta * dlna_dbeta * gr2 - fL),
        c0 * (Sh * e1 * gR + Th * e1 * W + Sh * gD),
        c0 * (Sh * e2 * gR + Th * e2 * W + Sh * gC),
        (-2 * c0) * ((ch + Sh * e1) * gx + Sh * e2 * gy),
        (-2 * c0) * ((ch - Sh * e1) * gy + Sh * e2 * gx),
        xp.ones((n, P), dtype=xp.float64),
    ], axis=1)
    return prof, J


def _internal(xp, p):
    """Public ``(amp, fwhm, beta, q, theta, dx, dy, ped)`` -> internal (``e1, e2`` for ``q, theta``)."""
    e1, e2 = _to_shear(xp, p[:, 3], p[:, 4])
    return xp.concatenate([p[:, :3], e1[:, None], e2[:, None], p[:, 5:]], axis=1)


def _public(xp, p):
    q, theta = _from_shear(xp, p[:, 3], p[:, 4])
    return xp.concatenate([p[:, :3], q[:, None], theta[:, None], p[:, 5:]], axis=1)


def _check_params(xp, params):
    if params.ndim not in (1, 2) or params.shape[-1] != _NPAR:
        raise ValueError(f"moffat params must be (n, {_NPAR}) or ({_NPAR},) = {PARAM_NAMES}; got shape "
                         f"{tuple(params.shape)}")
    return params.astype(xp.float64)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def moffat_stamps(params, size: int, *, oversample: int = 3):
    """Pixel-integrated elliptical Moffat stamps plus a constant.

    Parameters
    ----------
    params : ndarray (n, 8) or (8,), float64
        ``(amp, fwhm, beta, q, theta, dx, dy, pedestal)``: amplitude (the profile's value at its
        centre, units of the stamp), geometric-mean FWHM (px), Moffat beta, axis ratio
        parameter ``q > 0`` (``r2 = (u^2 q + v^2 / q) / alpha^2``), position angle ``theta`` (rad, from
        x towards y), centre offset ``dx, dy`` (px) from the centre pixel ``size // 2``, constant.
    size : int
        Stamp side ``s`` (px).
    oversample : int
        Sub-pixels per pixel side averaged for the pixel integral (3 as the PSF stage).

    Returns
    -------
    ndarray (n, s, s) or (s, s), float64, on the device of ``params``.
    """
    xp = array_namespace(params)
    p = _check_params(xp, params)
    _check_int("size", size, 1)
    _check_int("oversample", oversample, 1)
    single = p.ndim == 1
    p = p[None] if single else p
    n = p.shape[0]
    if n == 0:
        return xp.zeros((0, size, size), dtype=xp.float64)
    grid = _subpixel_grid(xp, size, oversample)
    prof, _ = _evaluate(xp, _internal(xp, p), grid, jac=False)
    out = xp.reshape(p[:, 0:1] * prof + p[:, 7:8], (n, size, size))
    return out[0] if single else out


def moffat_total(params):
    """Integral over the whole plane of the Moffat part (no constant) of ``params`` (n, 8):
    ``amp * pi * alpha^2 / (beta - 1)``, ``(n,)`` float64."""
    xp = array_namespace(params)
    p = _check_params(xp, params)
    alpha = _alpha(xp, p[..., 1], p[..., 2])
    return p[..., 0] * xp.pi * alpha * alpha / (p[..., 2] - 1)


# --------------------------------------------------------------------------------------------
# starting point
# --------------------------------------------------------------------------------------------
def _upsample_matrix(xp, s: int, factor: int):
    """``(s * factor, s)`` complex matrix ``D`` with ``D @ a @ D.T`` = :func:`kernels.psf.upsample`
    of an ``(s, s)`` stamp ``a`` (the 2-D zero-padding of the centred spectrum is separable)."""
    fft = fft_module(xp)
    big = s * factor
    pad = (big - s) // 2
    e = xp.eye(s, dtype=xp.complex128)
    spec = fft.fftshift(fft.fft(fft.ifftshift(e, axes=-1), axis=-1), axes=-1)
    padded = xp.zeros((s, big), dtype=xp.complex128)
    padded[:, pad:pad + s] = spec
    d = fft.fftshift(fft.ifft(fft.ifftshift(padded, axes=-1), axis=-1), axes=-1) * factor
    return xp.transpose(d)


def half_max_fwhm(psf, *, factor: int = 5):
    """Batched :func:`kernels.psf.half_max_fwhm`: FWHM (px) ``2 sqrt(A / pi)`` of each stamp from
    the area ``A`` above half its maximum on a band-limited ``factor``-times upsampled stamp.

    Parameters
    ----------
    psf : ndarray (n, s, s) or (s, s)
        PSF stamps.
    factor : int
        Odd upsampling factor.

    Returns
    -------
    ndarray (n,) float64 (0-d for a 2-D input), on the device of ``psf``; no host synchronisation.
    """
    xp = array_namespace(psf)
    _check_int("factor", factor, 1)
    single = psf.ndim == 2
    st = psf[None] if single else psf
    if st.ndim != 3 or st.shape[-1] != st.shape[-2]:
        raise ValueError(f"half_max_fwhm: stamps must be (n, s, s) or (s, s); got {tuple(psf.shape)}")
    n, s, _ = st.shape
    if n == 0:
        return xp.zeros(0, dtype=xp.float64)
    D = _upsample_matrix(xp, s, factor)
    a = st.astype(xp.float64)
    Dr = xp.real(D)
    up = Dr @ a @ xp.transpose(Dr)
    if s % 2 == 0:  # an even stamp's Nyquist row makes the upsampling matrix complex
        Di = xp.imag(D)
        up = up - Di @ a @ xp.transpose(Di)
    peak = xp.max(up, axis=(1, 2))
    count = xp.sum((up >= 0.5 * peak[:, None, None]).astype(xp.float64), axis=(1, 2))
    out = 2.0 * xp.sqrt(count / factor**2 / xp.pi)
    return out[0] if single else out


# --------------------------------------------------------------------------------------------
# the fit
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoffatFit:
    """Moffat + constant fits of a stack of PSF stamps; arrays on the input's device.

    For a 2-D input stamp the leading ``n`` axis is absent (``params`` (8,), scalars 0-d).

    Attributes
    ----------
    params : ndarray (n, 8) float64
        Best-fit ``(amp, fwhm, beta, q, theta, dx, dy, pedestal)`` (:func:`moffat_stamps`), in the
        stamps' units and pixels; the ellipse with ``1 <= q <= 2`` and ``-pi/2 < theta <= pi/2``.
    fwhm : ndarray (n,) float64
        Geometric-mean FWHM (px) of the intrinsic (not pixel-integrated) profile.
    beta : ndarray (n,) float64
        Moffat beta.
    pedestal : ndarray (n,) float64
        The constant, per pixel, in the stamps' units (units of their sum for unit-sum stamps).
    apcorr : ndarray (n,) float64
        ``sum(psf^2) / sum(M psf)``, ``M`` the fitted profile without the constant normalised to
        unit integral over the whole plane: turns a PSF-fit flux made with the stamp into the total
        flux of a point source of the fitted profile (the flux outside the stamp and the pedestal a
        biased background leaves in it). 1.0 where it is not finite, departs from 1 by more than
        0.1, the fitted amplitude is not positive, or ``fwhm < 2.5`` px (an undersampled stack is
        broadened by aliasing and the Moffat misfits its wings).
    model : ndarray (n, s, s) float64
        Fitted stamps (Moffat + constant).
    rms : ndarray (n,) float64
        Root-mean-square residual per pixel, ``sqrt(chi2 / s^2)``.
    chi2 : ndarray (n,) float64
        Sum of the squared residuals (unweighted).
    n_iter : ndarray (n,) int64
        Iterations the stamp took (``max_iter`` where it did not converge).
    converged : ndarray (n,) bool
        Whether the convergence test was met within ``max_iter`` iterations.
    """

    params: object
    fwhm: object
    beta: object
    pedestal: object
    apcorr: object
    model: object
    rms: object
    chi2: object
    n_iter: object
    converged: object

    def __len__(self) -> int:
        return int(self.fwhm.shape[0]) if self.fwhm.ndim else 1


def _empty_fit(xp, s):
    z = xp.zeros(0, dtype=xp.float64)
    return MoffatFit(params=xp.zeros((0, _NPAR), dtype=xp.float64), fwhm=z, beta=z, pedestal=z, apcorr=z,
                     model=xp.zeros((0, s, s), dtype=xp.float64), rms=z, chi2=z,
                     n_iter=xp.zeros(0, dtype=xp.int64), converged=xp.zeros(0, dtype=bool))


def _bmv(A, x):
    """Batched matrix-vector product ``(n, k, m) @ (n, m) -> (n, k)``."""
    return (A @ x[..., None])[..., 0]


def _project(xp, p, lo, hi):
    """Clip ``p`` into the box ``[lo, hi]`` and ``(e1, e2)`` into the disc ``|e| <= ln 2``."""
    p = xp.minimum(xp.maximum(p, lo), hi)
    eta = xp.hypot(p[:, 3], p[:, 4])
    shrink = xp.where(eta > _LN2, _LN2 / xp.where(eta > _LN2, eta, 1.0), 1.0)
    return xp.concatenate([p[:, :3], p[:, 3:5] * shrink[:, None], p[:, 5:]], axis=1)


def _levenberg_marquardt(xp, y, p0, lo, hi, grid, *, done, max_iter, ftol, xtol, check_every):
    """Batched projected Levenberg-Marquardt fit of ``amp * profile + pedestal`` to ``y`` (n, P).

    Returns the internal parameters (n, 8), the profile (n, P), the sum of squares (n,), the
    converged flags and the iterations per stamp. Stamps flagged ``done`` are not fitted. Every
    ``check_every`` iterations one scalar read (the number of stamps still running) decides whether
    to stop, and the working set is compacted to the running stamps (a gather; the order of the
    others' arithmetic is unchanged, so a stamp's fit does not depend on the batch it is in).
    """
    n = y.shape[0]
    eye = xp.eye(_NPAR, dtype=xp.float64)
    diag = xp.arange(_NPAR)

    def evaluate(par, yy):
        prof, J = _evaluate(xp, par, grid, jac=True)
        r = par[:, 0:1] * prof + par[:, 7:8] - yy
        return prof, xp.sum(r * r, axis=1), J @ xp.transpose(J, (0, 2, 1)), _bmv(J, r)

    p = _project(xp, p0, lo, hi)
    prof, cost, A, g = evaluate(p, y)
    ysq = xp.sum(y * y, axis=1)
    # the working set: rows ``idx`` of the batch
    w = dict(idx=xp.arange(n), y=y, ysq=ysq, lo=lo, hi=hi, p=p, prof=prof, cost=cost, A=A, g=g,
             lam=xp.full(n, 1e-3, dtype=xp.float64), nu=xp.full(n, 2.0, dtype=xp.float64),
             dmax=xp.zeros((n, _NPAR), dtype=xp.float64), conv=done | (cost <= 1e-24 * ysq),
             n_iter=xp.zeros(n, dtype=xp.int64))
    # results by batch row (scattered from the working set; every update makes fresh arrays, so
    # these are never aliased by it)
    out = dict(p=p, prof=prof, cost=cost, conv=w["conv"], n_iter=w["n_iter"])
    m = n
    for it in range(max_iter):
        p, A, g, lam, conv, lo, hi = w["p"], w["A"], w["g"], w["lam"], w["conv"], w["lo"], w["hi"]
        dmax = xp.maximum(w["dmax"], A[:, diag, diag])
        D = xp.maximum(dmax, 1e-10)
        # parameters at a bound the gradient pushes against are held; converged stamps too
        held = ((p <= lo) & (g > 0)) | ((p >= hi) & (g < 0)) | conv[:, None]
        free = ~held
        H = A + lam[:, None, None] * (D[:, :, None] * eye)
        H = xp.where(free[:, :, None] & free[:, None, :], H, eye)
        rhs = xp.where(free, -g, 0.0)
        sane = xp.all(xp.isfinite(H), axis=(1, 2)) & xp.all(xp.isfinite(rhs), axis=1)
        H = xp.where(sane[:, None, None], H, eye)
        rhs = xp.where(sane[:, None], rhs, 0.0)
        delta = xp.linalg.solve(H, rhs[..., None])[..., 0]
        pt = _project(xp, p + delta, lo, hi)
        step = pt - p
        prof_t, cost_t, A_t, g_t = evaluate(pt, w["y"])
        cost = w["cost"]
        # gain ratio: actual over predicted (Gauss-Newton model) decrease of the sum of squares
        pred = -2 * xp.sum(step * g, axis=1) - xp.sum(step * _bmv(A, step), axis=1)
        act = cost - cost_t
        sane = pred > 1e-200 * xp.abs(act)
        rho = xp.where(sane, act / xp.where(sane, pred, 1.0), xp.where(act > 0, 1.0, -1.0))
        acc = ~conv & xp.isfinite(cost_t) & (act > 0) & (rho > 1e-4)
        # converged: a nearly Gauss-Newton step (lambda <= 1) that changes the sum of squares, or
        # would by the linear model, by less than ftol, or the parameters by less than xtol; or
        # no step decreases it any more; or a perfect fit
        tol = ftol * cost
        small = (lam <= 1) & (((pred <= tol) & (xp.abs(act) <= tol))
                              | (acc & (xp.max(xp.abs(step) / (xp.abs(p) + 1), axis=1) <= xtol)))
        rc = xp.minimum(xp.maximum(rho, 0.0), 1.0)
        lam = xp.where(acc, lam * xp.maximum(1 / 3, 1 - (2 * rc - 1) ** 3), lam * w["nu"])
        lam = xp.minimum(xp.maximum(lam, 1e-15), 1e15)
        stuck = ~acc & (lam >= 1e10)
        perfect = acc & (cost_t <= 1e-24 * w["ysq"])
        w.update(
            dmax=dmax, lam=lam, nu=xp.where(acc, 2.0, xp.minimum(w["nu"] * 2, 1e6)),
            n_iter=xp.where(conv, w["n_iter"], it + 1), conv=conv | (~conv & (small | stuck | perfect)),
            p=xp.where(acc[:, None], pt, p), prof=xp.where(acc[:, None], prof_t, w["prof"]),
            cost=xp.where(acc, cost_t, cost), A=xp.where(acc[:, None, None], A_t, A),
            g=xp.where(acc[:, None], g_t, g))
        if (it + 1) % check_every == 0 or it + 1 == max_iter:
            for k in out:
                out[k][w["idx"]] = w[k]
            if it + 1 == max_iter:
                break
            left = host_scalar(xp.sum((~w["conv"]).astype(xp.int64)))
            if left == 0:
                break
            if left < m:  # compact the working set to the running stamps
                order = xp.argsort(w["conv"].astype(xp.int64) * m + xp.arange(m))[:left]
                w = {k: v[order] for k, v in w.items()}
                m = left
    return out["p"], out["prof"], out["cost"], out["conv"], out["n_iter"]


def fit_moffat(psf, *, max_iter: int = 60, oversample: int = 3, ftol: float = 1e-10, xtol: float = 1e-9,
               check_every: int = 3) -> MoffatFit:
    """Fit a pixel-integrated elliptical Moffat plus a constant to each PSF stamp, all at once.

    Same model, starting point and bounds as the PSF stage's scipy ``moffat_fit`` (see the module
    docstring); solved by a batched projected Levenberg-Marquardt.

    Parameters
    ----------
    psf : ndarray (n, s, s) or (s, s), float
        PSF stamps (unit sum in the PSF stage; any units work), centre pixel ``s // 2``.
    max_iter : int
        Maximum Levenberg-Marquardt iterations (each one model + Jacobian evaluation).
    oversample : int
        Sub-pixels per pixel side of the pixel integral (3 as the PSF stage).
    ftol : float
        Convergence: relative change of the sum of squares (actual and predicted) of a nearly
        Gauss-Newton step.
    xtol : float
        Convergence: largest parameter change of an accepted step, relative to ``|p| + 1``
        (amplitude and constant in units of the stamp's maximum).
    check_every : int
        Iterations between checks (one scalar read) whether every stamp has converged; the
        converged ones then leave the working set.

    Notes
    -----
    A stamp's result does not depend on the batch it is fitted in. Per call: one scalar read every
    ``check_every`` iterations (typically 2 for PSF stacks), nothing else crosses.

    Returns
    -------
    MoffatFit
        Arrays on the device of ``psf``. A stamp with a non-finite pixel gets NaN parameters,
        model, ``chi2`` and ``rms``, ``converged`` False and ``apcorr`` 1.0.

    Raises
    ------
    ValueError
        For a stamp stack that is not ``(n, s, s)`` / ``(s, s)`` or bad options.
    """
    xp = array_namespace(psf)
    if psf.ndim not in (2, 3) or psf.shape[-1] != psf.shape[-2]:
        raise ValueError(f"fit_moffat: stamps must be (n, s, s) or (s, s); got shape {tuple(psf.shape)}")
    _check_int("max_iter", max_iter, 1)
    _check_int("oversample", oversample, 1)
    _check_int("check_every", check_every, 1)
    if not (ftol >= 0 and xtol >= 0):
        raise ValueError(f"ftol and xtol must be >= 0; got {ftol!r}, {xtol!r}")
    single = psf.ndim == 2
    st = psf[None] if single else psf
    n, s, _ = st.shape
    if n == 0:
        return _empty_fit(xp, s)
    P = s * s
    data = st.astype(xp.float64)
    finite = xp.all(xp.isfinite(data), axis=(1, 2))
    data = xp.where(finite[:, None, None], data, 0.0)

    # scale each stamp to unit maximum (the fit is invariant; floors and tolerances are not)
    pmax = xp.max(data, axis=(1, 2))
    amax = xp.max(xp.abs(data), axis=(1, 2))
    scale = xp.where(amax > 0, amax, 1.0)
    y = xp.reshape(data, (n, P)) / scale[:, None]
    f0 = half_max_fwhm(data)

    zero = xp.zeros(n, dtype=xp.float64)
    one = zero + 1.0
    ped_lim = 0.05 * xp.abs(pmax) / scale
    # box bounds of the internal parameters; the ellipse (e1, e2) is kept in the disc |e| <= ln 2
    # (0.5 <= q <= 2 for every theta) by a radial projection
    inf = one * math.inf
    lo = xp.stack([zero, one * 0.5, one * 1.1, -inf, -inf, -one, -one, -ped_lim], axis=1)
    hi = xp.stack([inf, one * float(s), one * 20.0, inf, inf, one, one, ped_lim], axis=1)
    p0 = xp.stack([pmax / scale, xp.maximum(f0 * 0.95, 1.0), one * 3.0, zero, zero, zero, zero, zero], axis=1)
    p, prof, cost, conv, n_iter = _levenberg_marquardt(
        xp, y, p0, lo, hi, _subpixel_grid(xp, s, oversample), done=~finite, max_iter=max_iter, ftol=ftol,
        xtol=xtol, check_every=check_every)

    # back to the stamps' units
    unit = xp.stack([scale, one, one, one, one, one, one, scale], axis=1)
    params = _public(xp, p) * unit
    model = xp.reshape((p[:, 0:1] * prof + p[:, 7:8]) * scale[:, None], (n, s, s))
    chi2 = cost * scale * scale
    # aperture correction: M = amp * prof / total = prof * (beta - 1) / (pi alpha^2)
    amp, fwhm, beta = params[:, 0], params[:, 1], params[:, 2]
    alpha = _alpha(xp, fwhm, beta)
    M = prof * ((beta - 1) / (xp.pi * alpha * alpha))[:, None]
    d = xp.reshape(data, (n, P))
    num = xp.sum(d * d, axis=1)
    den = xp.sum(M * d, axis=1)
    ok = (den != 0) & (amp > 0)
    apcorr = num / xp.where(ok, den, 1.0)
    good = ok & finite & xp.isfinite(apcorr) & (xp.abs(apcorr - 1) <= 0.1) & (fwhm >= 2.5)
    apcorr = xp.where(good, apcorr, 1.0)
    nan = math.nan
    params = xp.where(finite[:, None], params, nan)
    model = xp.where(finite[:, None, None], model, nan)
    chi2 = xp.where(finite, chi2, nan)
    conv = conv & finite
    fit = MoffatFit(params=params, fwhm=params[:, 1], beta=params[:, 2], pedestal=params[:, 7], apcorr=apcorr,
                    model=model, rms=xp.sqrt(chi2 / P), chi2=chi2, n_iter=n_iter, converged=conv)
    if single:
        fit = MoffatFit(**{k: getattr(fit, k)[0] for k in fit.__dataclass_fields__})
    return fit


# --------------------------------------------------------------------------------------------
# the hybrid PSF
# --------------------------------------------------------------------------------------------
def stack_variance(stamps, weights, sky_sigma, psf, *, members=None, poisson_scale: float = 1.0):
    """Per-pixel variance of each tile's weighted mean of flux-normalised star stamps
    (:func:`kernels.psf.stack_psf`), batched over tiles.

    Star ``i`` of a tile (flux ``F_i`` in its stamp, e-) contributes ``(sky_sigma^2 + F_i psf) / F_i^2``
    per pixel (background plus the star's own photon noise), weighted as in the stack.

    Parameters
    ----------
    stamps : ndarray (T, K, s, s), e-; or (n, s, s) with ``members``
        The background-subtracted star stamps stacked into each tile's PSF, padded to ``K`` per
        tile (padding rows have weight 0; their content is ignored). With ``members``, the star
        stamps of the whole image once, ``(n, s, s)``.
    weights : ndarray (T, K)
        The stars' weights in the stacks (0 for padding).
    sky_sigma : float or ndarray (T,)
        Background noise per pixel (e-) of each tile's image.
    psf : ndarray (T, s, s) (or (s, s) with ``T = 1``)
        The unit-sum stacks.
    members : ndarray (T, K) int, optional
        Row of ``stamps`` of each tile's ``k``-th star (any valid row, or -1, for padding).
    poisson_scale : float, keyword-only
        Image units per e- (1: e- stamps): the star's photon noise is ``poisson_scale F_i psf``.

    Returns
    -------
    ndarray (T, s, s) float64 (2-D for a 2-D ``psf``): variance of each stack pixel (unit-sum units
    squared); NaN for a tile whose weights are all 0.
    """
    xp = array_namespace(stamps, weights, psf, members)
    single = psf.ndim == 2
    ps = (psf[None] if single else psf).astype(xp.float64)
    w = weights[None] if weights.ndim == 1 else weights
    if members is None:
        st = stamps[None] if stamps.ndim == 3 else stamps
        if st.ndim != 4 or tuple(st.shape[:2]) != tuple(w.shape):
            raise ValueError(f"stack_variance: stamps {tuple(stamps.shape)} must be (T, K, s, s) matching "
                             f"weights (T, K) {tuple(weights.shape)}")
        F = xp.sum(st.astype(xp.float64), axis=(2, 3))
    else:
        mem = members[None] if members.ndim == 1 else members
        if stamps.ndim != 3 or tuple(mem.shape) != tuple(w.shape):
            raise ValueError(f"stack_variance: with members, stamps must be (n, s, s) and members {tuple(mem.shape)} "
                             f"match weights {tuple(w.shape)}")
        Fs = xp.sum(stamps.astype(xp.float64), axis=(1, 2))
        if Fs.shape[0] == 0:
            F = xp.zeros(mem.shape, dtype=xp.float64)
        else:
            F = xp.take(Fs, xp.reshape(xp.minimum(xp.maximum(mem, 0), Fs.shape[0] - 1), (-1,)), axis=0)
            F = xp.reshape(F, mem.shape)
    if w.shape[0] != ps.shape[0]:
        raise ValueError(f"stack_variance: {w.shape[0]} tiles of weights but {ps.shape[0]} PSFs")
    F = xp.maximum(F, 1e-30)
    w = w.astype(xp.float64)
    wsum = xp.sum(w, axis=1)
    wn = w / xp.where(wsum != 0, wsum, 1.0)[:, None]
    sig = float(sky_sigma) if np.isscalar(sky_sigma) else to_device(sky_sigma, xp, dtype=xp.float64)
    sky = sig**2 * xp.sum(wn**2 / F**2, axis=1)
    src = xp.sum(wn**2 / F, axis=1)
    if poisson_scale != 1.0:
        src = src * float(poisson_scale)
    out = sky[:, None, None] + src[:, None, None] * xp.maximum(ps, 0.0)
    out = xp.where((wsum != 0)[:, None, None], out, math.nan)
    return out[0] if single else out


def hybrid_psf(psf, variance, model, fwhm, *, k: float = 2.0, core: float = 2.0):
    """The stack in the core; in the wings the fitted model plus the significant part of the
    stack's departure from it (unit sum); batched over tiles.

    Outside ``core`` FWHMs of the centre, ``P = M + r * max(0, 1 - k^2 var / r^2)`` with
    ``r = psf - M`` and ``M`` the fitted Moffat + constant (:attr:`MoffatFit.model`); inside, the
    stack as it is. Departures from the model of more than ``k`` sigma in the wings (a diffraction
    spike, a halo) are kept, shrunk towards the model by the positive-part James-Stein factor;
    noise is replaced by the model.

    Parameters
    ----------
    psf : ndarray (T, s, s) or (s, s)
        Unit-sum stacks.
    variance : ndarray like ``psf``
        Their per-pixel variance (:func:`stack_variance`).
    model : ndarray like ``psf``
        The fitted Moffat + constant of each stack.
    fwhm : ndarray (T,) (0-d / float for 2-D input)
        The fitted FWHMs (px).

    Returns
    -------
    ndarray like ``psf``, float64, each stamp of unit sum.
    """
    xp = array_namespace(psf, variance, model, fwhm)
    single = psf.ndim == 2
    ps = (psf[None] if single else psf).astype(xp.float64)
    var = (variance[None] if single else variance).astype(xp.float64)
    M = (model[None] if single else model).astype(xp.float64)
    if ps.shape != var.shape or ps.shape != M.shape:
        raise ValueError(f"hybrid_psf: psf {tuple(psf.shape)}, variance {tuple(variance.shape)} and model "
                         f"{tuple(model.shape)} must have one shape")
    fw = xp.reshape(to_device(fwhm, xp, dtype=xp.float64), (-1,))
    s = ps.shape[-1]
    r = ps - M
    nz = r != 0
    rr = xp.where(nz, r * r, 1.0)
    f = xp.where(nz, xp.maximum(0.0, 1.0 - k * k * var / rr), 0.0)
    pix = xp.arange(s, dtype=xp.float64) - s // 2
    rad = xp.hypot(pix[None, :], pix[:, None])
    f = xp.where(rad[None] <= core * fw[:, None, None], 1.0, f)
    out = M + f * r
    out = out / xp.sum(out, axis=(1, 2))[:, None, None]
    return out[0] if single else out
