"""ZOGY image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27), batched over tiles.

Notation of the paper: N (new = science) and R (reference) images on the same pixel grid,
background subtracted; P_n, P_r their PSFs (unit sum); F_n, F_r their flux zero points (a source of
true flux f appears with flux F f); sigma_n, sigma_r their background noise (e-, per pixel).
With hats for Fourier transforms::

    den   = sigma_n^2 F_r^2 |P_r|^2 + sigma_r^2 F_n^2 |P_n|^2
    D     = (F_r P_r N - F_n P_n R) / sqrt(den)                         (eq. 13)
    F_D   = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)           (eq. 15)
    P_D   = F_r F_n P_r P_n / (F_D sqrt(den))                           (eq. 14)
    S     = F_D D conj(P_D) = k_n N - k_r R                             (eq. 17, 27)
    k_n   = F_n F_r^2 conj(P_n) |P_r|^2 / den,  k_r = F_r F_n^2 conj(P_r) |P_n|^2 / den   (eq. 28-29)

The noise of S is estimated per pixel from the variance maps V_N, V_R of N and R (background, read
and source Poisson noise together): ``V(S) = k_n^2 (*) V_N + k_r^2 (*) V_R`` (eq. 26 with the full
variance maps; on blank sky this reduces to ``F_S = F_D^2 sum(P_D^2)``), plus the astrometric term
``V_ast = s_x^2 [(d_x S_N)^2 + (d_x S_R)^2] + s_y^2 [(d_y S_N)^2 + (d_y S_R)^2]`` with
``S_N = k_n N``, ``S_R = k_r R`` (eq. 30-31). Then ``S_corr = S / sqrt(V(S) + V_ast)`` (eq. 25) has unit
variance on blank sky and around sources.

The PSF-photometry flux of a point source at ``x`` is ``S(x) / F_S`` in units of the new image
(``F_n`` = 1) with 1-sigma error ``sqrt(V(S)(x)) / F_S`` (eq. 41-42).

Everything is computed on stacks ``(T, ny, nx)`` (one entry per tile); per-tile scalars are arrays
``(T,)``. Tiles must be padded (``nightsift.kernels.tiles``) so circular convolution does not wrap
sources around the edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._xp import array_namespace, fft_kwargs, fft_module


@dataclass(frozen=True)
class ZogyResult:
    """Outputs of :func:`zogy` for a stack of ``T`` tiles of shape ``(ny, nx)``.

    Attributes
    ----------
    D : (T, ny, nx)  proper difference image, unit-variance white noise on blank sky
    S : (T, ny, nx)  score image (matched-filtered D), units e- x F_S
    S_corr : (T, ny, nx)  corrected score, unit variance (sigma)
    V_S : (T, ny, nx)  variance of S (source + background noise)
    V_ast : (T, ny, nx)  astrometric-noise variance of S
    P_D : (T, ny, nx)  PSF of D, embedded with its centre at [0, 0], unit sum
    F_D : (T,)  flux zero point of D
    F_S : (T,)  flux normalisation of S: flux = S / F_S
    """

    D: object
    S: object
    S_corr: object
    V_S: object
    V_ast: object
    P_D: object
    F_D: object
    F_S: object


def _col(xp, v, n, dtype):
    """Per-tile values as a (T, 1, 1) column: Python numbers are built on the device (no upload),
    host arrays are uploaded through the one door, device arrays cast."""
    from ._xp import to_device

    if np.isscalar(v):
        return xp.full((n, 1, 1), v, dtype=dtype)
    a = to_device(v, xp, dtype=dtype, label="zogy_parameters")
    if a.ndim == 0:
        a = xp.full((n,), 1, dtype=dtype) * a
    return a.reshape(-1, 1, 1)


def zogy(N, R, P_n, P_r, V_N, V_R, *, sigma_n, sigma_r, F_r, F_n=1.0,
         astrometric_rms=(0.0, 0.0), dtype=None) -> ZogyResult:
    """Proper subtraction, score and corrected score of tile stacks.

    Parameters
    ----------
    N, R : ndarray (T, ny, nx) or (ny, nx), float
        Background-subtracted new and reference images on the same grid (e-); masked pixels
        already replaced (e.g. by 0).
    P_n, P_r : ndarray like N
        PSFs embedded with their centres at pixel [0, 0] (:func:`nightsift.kernels.psf.embed_psf`),
        unit sum.
    V_N, V_R : ndarray like N
        Per-pixel variance maps of N and R (e-^2), including source noise.
    sigma_n, sigma_r : float or ndarray (T,)
        Background noise per pixel (e-) used in the optimal filter.
    F_r, F_n : float or ndarray (T,)
        Flux zero points (F_n = 1: fluxes in units of the new image).
    astrometric_rms : (float, float), or two (T,) arrays
        RMS registration error (pixels) in x and y, for all tiles or per tile (a batch of
        CCDs); Python zeros disable the astrometric term.
    dtype : numpy dtype, optional
        Real dtype of the computation (float64 default; float32 halves memory and time).

    Returns
    -------
    ZogyResult
    """
    xp = array_namespace(N, R, P_n, P_r, V_N, V_R)
    fft = fft_module(xp)
    dtype = xp.dtype(dtype or xp.float64)
    single = N.ndim == 2
    arrs = [a[None] if a.ndim == 2 else a for a in (N, R, P_n, P_r, V_N, V_R)]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"zogy: N, R, P_n, P_r, V_N, V_R must share one shape, got {sorted(shapes)}")
    N, R, P_n, P_r, V_N, V_R = (a.astype(dtype, copy=False) for a in arrs)
    T, ny, nx = N.shape
    s = (ny, nx)
    sn, sr = _col(xp, sigma_n, T, dtype), _col(xp, sigma_r, T, dtype)
    fr, fn = _col(xp, F_r, T, dtype), _col(xp, F_n, T, dtype)

    kw = fft_kwargs(xp)
    rfft2 = lambda a: fft.rfft2(a, axes=(-2, -1), **kw)  # noqa: E731
    irfft2 = lambda a: fft.irfft2(a, s=s, axes=(-2, -1), **kw)  # noqa: E731

    Nh, Rh, Pnh, Prh = rfft2(N), rfft2(R), rfft2(P_n), rfft2(P_r)
    # real spectra first (no complex temporaries): |P|^2, the denominator and its powers
    Pn2 = Pnh.real**2 + Pnh.imag**2
    Pr2 = Prh.real**2 + Prh.imag**2
    den = (sn**2 * fr**2) * Pr2 + (sr**2 * fn**2) * Pn2
    # frequencies where both PSFs vanish carry no information: keep the ratios finite there
    tiny = xp.finfo(dtype).tiny * 1e6 + den.max(axis=(-2, -1), keepdims=True) * xp.finfo(dtype).eps**2
    den += tiny
    inv_sqrt = 1 / xp.sqrt(den)
    inv_den = inv_sqrt * inv_sqrt

    F_D = fr * fn / xp.sqrt(sn**2 * fr**2 + sr**2 * fn**2)
    Dh = (fr * Prh * Nh - fn * Pnh * Rh) * inv_sqrt
    PDh = Prh * Pnh * ((fr * fn / F_D) * inv_sqrt)
    kn_h = Pnh.conj() * ((fn * fr**2) * Pr2 * inv_den)
    kr_h = Prh.conj() * ((fr * fn**2) * Pn2 * inv_den)
    del Pn2, Pr2, den, inv_sqrt, inv_den

    SNh = kn_h * Nh
    SRh = kr_h * Rh
    del Nh, Rh
    S = irfft2(SNh - SRh)
    D = irfft2(Dh)
    P_D = irfft2(PDh)
    del Dh, PDh

    k_n = irfft2(kn_h)
    k_r = irfft2(kr_h)
    V_S = irfft2(rfft2(k_n * k_n) * rfft2(V_N) + rfft2(k_r * k_r) * rfft2(V_R))
    V_S = xp.maximum(V_S, 0)

    sx, sy = astrometric_rms
    if not (np.isscalar(sx) and np.isscalar(sy) and float(sx) == 0 and float(sy) == 0):
        sx, sy = _col(xp, sx, T, dtype), _col(xp, sy, T, dtype)
        fy = xp.fft.fftfreq(ny).astype(dtype)[:, None]
        fx = xp.fft.rfftfreq(nx).astype(dtype)[None, :]
        ikx, iky = 2j * xp.pi * fx, 2j * xp.pi * fy
        if nx % 2 == 0:
            ikx[..., -1] = 0  # the Nyquist derivative is undefined for real signals
        if ny % 2 == 0:
            iky[ny // 2] = 0
        V_ast = (sx**2 * (irfft2(ikx * SNh) ** 2 + irfft2(ikx * SRh) ** 2)
                 + sy**2 * (irfft2(iky * SNh) ** 2 + irfft2(iky * SRh) ** 2))
    else:
        V_ast = xp.zeros_like(S)

    F_S = (F_D.reshape(-1) ** 2) * (P_D**2).sum(axis=(-2, -1))
    S_corr = S / xp.sqrt(V_S + V_ast + xp.finfo(dtype).tiny)

    if single:
        D, S, S_corr, V_S, V_ast, P_D = (a[0] for a in (D, S, S_corr, V_S, V_ast, P_D))
    return ZogyResult(D=D, S=S, S_corr=S_corr, V_S=V_S, V_ast=V_ast, P_D=P_D,
                      F_D=F_D.reshape(-1), F_S=F_S)
