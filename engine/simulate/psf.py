"""The true PSF of a simulated epoch: an elliptical Moffat whose width and shape vary smoothly over
the CCD.

At normalised position ``u = (x - xc) / rc``, ``v = (y - yc) / rc`` (``xc, yc`` the CCD centre, ``rc``
the half-diagonal, so the corners sit at ``u^2 + v^2 = 1``)::

    fwhm(x, y) = fwhm0 * (1 + growth * (u^2 + v^2) + tilt_x * u + tilt_y * v)
    g1 = e1[0] + e1[1] u + e1[2] v ;  g2 = e2[0] + e2[1] u + e2[2] v
    ellipticity = 1 - b/a = hypot(g1, g2) ;  angle of the major axis = atan2(g2, g1) / 2

``fwhm`` is the geometric mean ``sqrt(FWHM_major * FWHM_minor)`` of the *continuous* Moffat (before
pixel integration). The profile is ``(1 + Q)^-beta`` with ``Q = (x'/alpha_a)^2 + (y'/alpha_b)^2`` on
the rotated axes, ``alpha_a = alpha / sqrt(q)``, ``alpha_b = alpha * sqrt(q)``, ``q = b/a`` and
``alpha = fwhm / (2 sqrt(2^(1/beta) - 1))``.

A source is drawn with the PSF of its centre (the PSF does not vary across one stamp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _render

#: smallest stamp radius (in FWHM) of a rendered point source
MIN_RADIUS_FWHM = 6.0
#: largest stamp radius (in FWHM) of a rendered point source (very bright stars)
MAX_RADIUS_FWHM = 15.0


@dataclass(frozen=True)
class PSFField:
    """True PSF of one epoch on one CCD.

    Attributes
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the CCD.
    fwhm0 : float
        FWHM at the CCD centre, pixels (geometric mean of major and minor axes).
    beta : float
        Moffat beta (the same over the CCD).
    growth : float
        Fractional FWHM increase at the corners.
    tilt : (float, float)
        Linear FWHM gradient ``(tilt_x, tilt_y)`` (fraction per half-diagonal).
    e1, e2 : (float, float, float)
        Ellipticity components as linear functions of ``(1, u, v)``.
    pixel_scale : float
        arcsec per pixel of this epoch's grid (for :meth:`fwhm_arcsec`).
    """

    shape: tuple[int, int]
    fwhm0: float
    beta: float
    growth: float = 0.0
    tilt: tuple[float, float] = (0.0, 0.0)
    e1: tuple[float, float, float] = (0.0, 0.0, 0.0)
    e2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_scale: float = 1.0

    # -- geometry ---------------------------------------------------------------------------
    def _uv(self, x, y):
        ny, nx = self.shape
        xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
        rc = max(math.hypot(xc, yc), 1.0)
        return (np.asarray(x, dtype=float) - xc) / rc, (np.asarray(y, dtype=float) - yc) / rc

    def fwhm(self, x, y):
        """True FWHM (pixels, geometric mean of the axes, continuous Moffat) at ``(x, y)``.

        ``x, y`` are 0-based pixel coordinates (scalars or arrays, broadcast)."""
        u, v = self._uv(x, y)
        return self.fwhm0 * (1.0 + self.growth * (u * u + v * v) + self.tilt[0] * u + self.tilt[1] * v)

    __call__ = fwhm

    def fwhm_arcsec(self, x, y):
        """True FWHM at ``(x, y)`` in arcsec."""
        return self.fwhm(x, y) * self.pixel_scale

    def _g(self, x, y):
        u, v = self._uv(x, y)
        g1 = self.e1[0] + self.e1[1] * u + self.e1[2] * v
        g2 = self.e2[0] + self.e2[1] * u + self.e2[2] * v
        return g1, g2

    def ellipticity(self, x, y):
        """``1 - b/a`` of the PSF at ``(x, y)`` (capped at 0.3)."""
        g1, g2 = self._g(x, y)
        return np.minimum(np.hypot(g1, g2), 0.3)

    def angle(self, x, y):
        """Position angle of the major axis at ``(x, y)``, radians from +x towards +y."""
        g1, g2 = self._g(x, y)
        return 0.5 * np.arctan2(g2, g1)

    def fwhm_pixelized(self, x, y):
        """FWHM (pixels, geometric mean of the principal axes) of the PSF convolved with the
        pixel box, i.e. of the profile that pixel values sample. This is what a fit of an
        un-integrated profile to pixel data measures; it exceeds :meth:`fwhm` by ~2 % at 4.3 px FWHM
        (beta 3) and ~8 % at 2.2 px (beta 2.5, undersampled ZTF-like data)."""
        xs, ys = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        out = np.empty(xs.shape)
        sub = (np.arange(16) + 0.5) / 16.0 - 0.5
        sx, sy = np.meshgrid(sub, sub)
        sx, sy = sx.ravel()[None, :], sy.ravel()[None, :]
        for idx in np.ndindex(xs.shape):
            c11, c12, c22 = (float(v) for v in self.quadratic_form(xs[idx], ys[idx]))
            th = float(self.angle(xs[idx], ys[idx]))
            fw = float(self.fwhm(xs[idx], ys[idx]))
            t = np.linspace(0.0, 2.0 * fw + 2.0, 801)[:, None]
            half = []
            for ux, uy in ((math.cos(th), math.sin(th)), (-math.sin(th), math.cos(th))):
                dx, dy = t * ux + sx, t * uy + sy
                v = ((1.0 + c11 * dx * dx + 2.0 * c12 * dx * dy + c22 * dy * dy) ** -self.beta).mean(axis=1)
                k = int(np.argmax(v < 0.5 * v[0]))
                t0, t1, v0, v1 = t[k - 1, 0], t[k, 0], v[k - 1], v[k]
                half.append(t0 + (0.5 * v[0] - v0) * (t1 - t0) / (v1 - v0))
            out[idx] = 2.0 * math.sqrt(half[0] * half[1])
        return out if out.ndim else float(out)

    @property
    def hwhm_alpha(self) -> float:
        """Half width at half maximum in units of alpha: ``sqrt(2^(1/beta) - 1)``."""
        return math.sqrt(2.0 ** (1.0 / self.beta) - 1.0)

    def alpha(self, x, y):
        """Moffat core radius alpha (pixels, geometric mean) at ``(x, y)``."""
        return self.fwhm(x, y) / (2.0 * self.hwhm_alpha)

    def quadratic_form(self, x, y):
        """Coefficients ``(c11, c12, c22)`` with ``Q = c11 dx^2 + 2 c12 dx dy + c22 dy^2`` (float64
        arrays shaped like ``x``)."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        a = self.alpha(x, y)
        q = 1.0 - self.ellipticity(x, y)
        th = self.angle(x, y)
        ia2 = q / (a * a)  # 1 / alpha_a^2
        ib2 = 1.0 / (q * a * a)  # 1 / alpha_b^2
        c, s = np.cos(th), np.sin(th)
        c11 = c * c * ia2 + s * s * ib2
        c22 = s * s * ia2 + c * c * ib2
        c12 = c * s * (ia2 - ib2)
        return c11, c12, c22

    # -- rendering --------------------------------------------------------------------------
    def render_half_size(self, x, y, flux=None):
        """Half-size (pixels) of the square stamp on which a source of ``flux`` e- at ``(x, y)`` is
        drawn: at least ``MIN_RADIUS_FWHM`` FWHM and enough that the Moffat flux outside the
        stamp's inscribed circle is < 1e-3 of the flux and < 0.5 e-, at most ``MAX_RADIUS_FWHM``
        FWHM, and at least 8 px."""
        fw = np.asarray(self.fwhm(x, y), float)
        a = fw / (2.0 * self.hwhm_alpha)
        b1 = self.beta - 1.0
        f = np.maximum(np.asarray(1.0 if flux is None else flux, float), 1.0)
        # (1 + (R/alpha)^2)^(1-beta) = eps  ->  R/alpha = sqrt(eps^(-1/(beta-1)) - 1)
        eps = np.minimum(1e-3, 0.5 / f)
        r = a * np.sqrt(eps ** (-1.0 / b1) - 1.0)
        r = np.clip(r, MIN_RADIUS_FWHM * fw, MAX_RADIUS_FWHM * fw)
        return np.maximum(np.ceil(r), 8).astype(np.int64)

    def _sampling(self, fw):
        """Core sub-sampling per source and the Q thresholds of the zones (2 and 4 FWHM)."""
        n_core = np.maximum(5, np.ceil(14.0 / np.asarray(fw, float))).astype(np.int64)
        h = 2.0 * self.hwhm_alpha  # one FWHM in units of alpha
        return n_core, (2.0 * h) ** 2, (4.0 * h) ** 2

    def render(self, image, x, y, flux, width=None):
        """Add point sources to ``image`` (ny, nx) float64 **in place**.

        Parameters
        ----------
        image : ndarray (ny, nx) float64, e-
        x, y : ndarray (n,) float64
            0-based pixel positions in this epoch's grid.
        flux : ndarray (n,) float64, e-
            Flux of each source *inside its stamp* (see :meth:`render_half_size`).
        width : ndarray (n,) float64, optional
            Each source's PSF drawn this many times wider (e.g. a colour-dependent PSF); default 1.
        """
        x = np.ascontiguousarray(x, dtype=np.float64).ravel()
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        flux = np.ascontiguousarray(np.broadcast_to(flux, x.shape), dtype=np.float64)
        if x.size == 0:
            return image
        c11, c12, c22 = self.quadratic_form(x, y)
        fwhm = self.fwhm(x, y)
        if width is not None:
            w2 = np.broadcast_to(np.asarray(width, np.float64), x.shape) ** 2
            c11, c12, c22, fwhm = c11 / w2, c12 / w2, c22 / w2, fwhm * np.sqrt(w2)
        n_core, q_core, q_mid = self._sampling(fwhm)
        half = self.render_half_size(x, y, flux)
        _render.render_moffat_points(image, x, y, flux, c11, c12, c22, float(self.beta),
                                     n_core, q_core, q_mid, half)
        return image

    def stamps(self, x, y, size: int):
        """Unit-sum pixel-integrated PSF stamps ``(n, size, size)`` float64 centred on the central
        pixel, with the PSF of positions ``(x, y)`` (used to convolve galaxies)."""
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        out = np.empty((x.size, size, size))
        c11, c12, c22 = self.quadratic_form(x, y)
        n_core, q_core, q_mid = self._sampling(self.fwhm(x, y))
        c = np.full(x.size, (size - 1) / 2.0)
        _render.moffat_stamps(out, c, c, c11, c12, c22, float(self.beta), n_core, q_core, q_mid)
        return out

    def stamp(self, x: float, y: float, size: int | None = None, *, dx: float = 0.0,
              dy: float = 0.0, flux: float | None = None) -> np.ndarray:
        """The true pixelised PSF at ``(x, y)``, exactly as a source is rendered.

        Parameters
        ----------
        x, y : float
            Position on the CCD whose PSF is used (0-based pixels).
        size : int, optional
            Odd side of the returned stamp; default the render stamp of a source of ``flux``.
        dx, dy : float
            Sub-pixel offset of the PSF centre from the stamp's central pixel (in [-0.5, 0.5]).
        flux : float, optional
            Source flux that sets the render stamp (bright sources get larger stamps).

        Returns
        -------
        ndarray (size, size) float64
            Fraction of a source's truth flux in each pixel: sums to 1 when ``size`` covers the
            render stamp (a larger ``size`` is zero-padded, a smaller one is a central crop).
        """
        h = int(self.render_half_size(x, y, flux))
        img = np.zeros((2 * h + 1, 2 * h + 1))
        c11, c12, c22 = self.quadratic_form(np.array([x]), np.array([y]))
        n_core, q_core, q_mid = self._sampling(self.fwhm(np.array([x]), np.array([y])))
        _render.render_moffat_points(img, np.array([h + dx]), np.array([h + dy]), np.array([1.0]),
                                     c11, c12, c22, float(self.beta), n_core, q_core, q_mid,
                                     np.array([h], dtype=np.int64))
        if size is None:
            return img
        if size % 2 != 1 or size < 1:
            raise ValueError(f"PSFField.stamp: size must be a positive odd integer, got {size}")
        s = size // 2
        out = np.zeros((size, size))
        k = min(s, h)
        out[s - k: s + k + 1, s - k: s + k + 1] = img[h - k: h + k + 1, h - k: h + k + 1]
        return out

    def noise_equivalent_area(self, x, y) -> np.ndarray:
        """``1 / sum(P^2)`` of the pixelised PSF at each ``(x, y)`` (pixels); the ideal PSF-fit
        flux error on background variance ``B`` per pixel is ``sqrt(B * NEA)``."""
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        fw = float(np.max(self.fwhm(x, y))) if x.size else 1.0
        size = 2 * int(math.ceil(4 * fw)) + 1
        st = self.stamps(x, y, size)
        return 1.0 / np.sum(st * st, axis=(1, 2))


def draw_psf_field(rng: np.random.Generator, shape, fwhm0_px: float, beta: float, *,
                   growth: float, ellipticity: float, pixel_scale: float,
                   vary: bool = True) -> PSFField:
    """Draw the spatial variation of one epoch's PSF around a centre FWHM ``fwhm0_px``.

    ``growth`` and ``ellipticity`` are the instrument's typical values; the epoch draws
    growth in [0.5, 1.5] x ``growth``, a tilt of at most 2 %, and ellipticity components whose
    modulus stays below ~1.5 x ``ellipticity``. ``vary=False`` keeps the same draws but zeroes
    every spatial term: one PSF (the centre's, ellipticity included) over the whole CCD."""
    g = growth * rng.uniform(0.5, 1.5)
    tilt = tuple(rng.uniform(-0.02, 0.02, 2))
    e1 = tuple(rng.uniform(-0.5, 0.5, 3) * ellipticity)
    e2 = tuple(rng.uniform(-0.5, 0.5, 3) * ellipticity)
    if not vary:
        g, tilt = 0.0, (0.0, 0.0)
        e1, e2 = (e1[0], 0.0, 0.0), (e2[0], 0.0, 0.0)
    return PSFField(shape=tuple(int(s) for s in shape), fwhm0=float(fwhm0_px), beta=float(beta),
                    growth=float(g), tilt=(float(tilt[0]), float(tilt[1])),
                    e1=tuple(float(v) for v in e1), e2=tuple(float(v) for v in e2),
                    pixel_scale=float(pixel_scale))
