"""The static sky of a simulated CCD (stars, galaxies), the WCS and smooth sky of its epochs.

Sources are defined on the sky; each epoch places them through its own WCS. Magnitude counts are
power laws per arcmin^2::

    stars:    N(< m) = star_density   * 10**(0.2  * (m - 20))
    galaxies: N(< m) = galaxy_density * 10**(0.35 * (m - 22))

Galaxies are Sersic profiles (65 % exponential discs, the rest n in [1.5, 4]) truncated at
4 r_eff and convolved with the local PSF.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from . import _render
from .psf import PSFField

#: truth table of the stars (one row per star, static per CCD; see SimulatedCCD)
STAR_DTYPE = np.dtype([
    ("id", "i8"),  # index of the star in this CCD's static catalogue
    ("ra", "f8"), ("dec", "f8"),  # deg, ICRS
    ("x", "f8"), ("y", "f8"),  # 0-based science pixel position
    ("x_ref", "f8"), ("y_ref", "f8"),  # 0-based reference pixel position
    ("mag", "f8"),  # static magnitude (the reference's; a variable star differs in the science)
    ("flux_sci", "f8"),  # e- in the calibrated science image (variability included), inside its stamp
    ("flux_ref", "f8"),  # e- in the reference image, inside its stamp
    ("saturated_sci", "?"),  # its peak pixel is saturated in the science raw frame
    ("saturated_ref", "?"),  # its peak pixel is flagged SAT in the reference mask
    ("variable", "?"),  # True for the stars turned into 'variable' transients this visit
    ("in_sci", "?"), ("in_ref", "?"),  # centre lies on the science / reference CCD
])

#: truth table of the galaxies (static per CCD)
GALAXY_DTYPE = np.dtype([
    ("id", "i8"),
    ("ra", "f8"), ("dec", "f8"),
    ("x", "f8"), ("y", "f8"),  # 0-based science pixel position of the centre
    ("x_ref", "f8"), ("y_ref", "f8"),
    ("mag", "f8"),
    ("flux", "f8"),  # e- in the calibrated science image, inside its (PSF-convolved) stamp
    ("flux_ref", "f8"),  # e- in the reference image
    ("r_eff", "f8"),  # half-light radius along the major axis, science pixels (before the PSF)
    ("sersic_n", "f8"),
    ("axis_ratio", "f8"),  # b/a
    ("angle", "f8"),  # major-axis angle in the science grid, degrees from +x towards +y
    ("in_sci", "?"), ("in_ref", "?"),
])


# ----------------------------------------------------------------------------------------------
# WCS
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """How the science grid sits on the reference grid (exact affine map, same tangent point).

    ``p_ref - c = A (p_sci - c) + (dx, dy)`` with ``A = scale * R(rotation)``, ``c`` the CCD centre
    and ``R(t) = [[cos t, -sin t], [sin t, cos t]]``: the science centre falls on reference pixel
    ``c + (dx, dy)``; ``scale`` is reference pixels per science pixel (``scale - 1`` is the scale
    difference), ``rotation_deg`` the rotation of the science grid relative to the reference.
    """

    dx: float = 0.0
    dy: float = 0.0
    rotation_deg: float = 0.0
    scale: float = 1.0

    @property
    def matrix(self) -> np.ndarray:
        t = math.radians(self.rotation_deg)
        return self.scale * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])

    def sci_to_ref(self, x, y, shape):
        """Science pixel -> reference pixel (0-based), exact for this construction."""
        ny, nx = shape
        c = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
        a = self.matrix
        px = np.asarray(x, float) - c[0]
        py = np.asarray(y, float) - c[1]
        return (a[0, 0] * px + a[0, 1] * py + c[0] + self.dx,
                a[1, 0] * px + a[1, 1] * py + c[1] + self.dy)


def draw_geometry(rng: np.random.Generator) -> Geometry:
    """Random science-vs-reference geometry: offset 1-5 px per axis (random signs), rotation
    0.01-0.1 deg, scale difference 0.1-0.5 % (random signs)."""
    sgn = rng.choice([-1.0, 1.0], size=4)
    d = rng.uniform(1.0, 5.0, 2) * sgn[:2]
    rot = rng.uniform(0.01, 0.1) * sgn[2]
    sc = 1.0 + rng.uniform(0.001, 0.005) * sgn[3]
    return Geometry(float(d[0]), float(d[1]), float(rot), float(sc))


def field_centre(seed: int) -> tuple[float, float]:
    """Pointing of a simulated night (deg): RA in [0, 360), Dec in [-60, +20]."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, 7]))
    return float(rng.uniform(0, 360)), float(rng.uniform(-60, 20))


def ccd_centre(ra0: float, dec0: float, ccd: int, n_ccds: int, shape, pixel_scale: float):
    """Sky position (deg) of the centre of CCD ``ccd`` in a square-ish grid focal plane."""
    ny, nx = shape
    ncol = max(1, int(math.ceil(math.sqrt(n_ccds))))
    nrow = int(math.ceil(n_ccds / ncol))
    ix, iy = ccd % ncol, ccd // ncol
    ox = (ix - (ncol - 1) / 2.0) * nx * 1.02 * pixel_scale / 3600.0
    oy = (iy - (nrow - 1) / 2.0) * ny * 1.02 * pixel_scale / 3600.0
    dec = float(np.clip(dec0 + oy, -89.0, 89.0))
    ra = (ra0 + ox / max(math.cos(math.radians(dec)), 1e-3)) % 360.0
    return ra, dec


def wcs_header(crval, crpix0, cd) -> fits.Header:
    """A TAN WCS header with a CD matrix. ``crpix0`` is 0-based (written +1 as FITS wants)."""
    h = fits.Header()
    h["WCSAXES"] = 2
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["CRVAL1"] = float(crval[0])
    h["CRVAL2"] = float(crval[1])
    h["CRPIX1"] = float(crpix0[0]) + 1.0
    h["CRPIX2"] = float(crpix0[1]) + 1.0
    h["CD1_1"] = float(cd[0, 0])
    h["CD1_2"] = float(cd[0, 1])
    h["CD2_1"] = float(cd[1, 0])
    h["CD2_2"] = float(cd[1, 1])
    h["RADESYS"] = "ICRS"
    return h


def reference_cd(pixel_scale: float, pa_deg: float) -> np.ndarray:
    """CD matrix (deg/px) of a north-up, east-left grid rotated by ``pa_deg``."""
    s = pixel_scale / 3600.0
    t = math.radians(pa_deg)
    return s * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])


def science_wcs_header(ref_hdr: fits.Header, geom: Geometry, shape) -> fits.Header:
    """Science WCS from the reference WCS and the geometry: same CRVAL,
    ``CD_sci = CD_ref A``, ``CRPIX_sci = c - A^-1 d`` so that ``p_ref = A (p_sci - c) + c + d``."""
    ny, nx = shape
    c = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    cd_ref = np.array([[ref_hdr["CD1_1"], ref_hdr["CD1_2"]], [ref_hdr["CD2_1"], ref_hdr["CD2_2"]]])
    crpix_ref = np.array([ref_hdr["CRPIX1"] - 1.0, ref_hdr["CRPIX2"] - 1.0])
    a = geom.matrix
    # world(p_sci) = TAN^-1(CD_ref (p_ref - crpix_ref)) with p_ref = A (p_sci - c) + c + d
    #              = TAN^-1(CD_ref A (p_sci - [c - A^-1 (c + d - crpix_ref)]))
    crpix_sci = c - np.linalg.solve(a, c + np.array([geom.dx, geom.dy]) - crpix_ref)
    return wcs_header((ref_hdr["CRVAL1"], ref_hdr["CRVAL2"]), crpix_sci, cd_ref @ a)


@dataclass(frozen=True)
class SkyModel:
    """Smooth sky of one epoch in calibrated e- per pixel per exposure (before the flat).

    ``sky(x, y) = level * (1 + gx * u + gy * v)`` with ``u, v`` in [-1, 1] across the CCD."""

    level: float
    gx: float
    gy: float
    shape: tuple[int, int]

    def __call__(self, x, y):
        ny, nx = self.shape
        u = 2.0 * np.asarray(x, float) / max(nx - 1, 1) - 1.0
        v = 2.0 * np.asarray(y, float) / max(ny - 1, 1) - 1.0
        return self.level * (1.0 + self.gx * u + self.gy * v)

    def image(self) -> np.ndarray:
        """The sky over the CCD, ndarray (ny, nx) float64 e-."""
        ny, nx = self.shape
        u = np.linspace(-1.0, 1.0, nx) if nx > 1 else np.zeros(1)
        v = np.linspace(-1.0, 1.0, ny) if ny > 1 else np.zeros(1)
        return self.level * (1.0 + self.gy * v[:, None] + self.gx * u[None, :])


# ----------------------------------------------------------------------------------------------
# catalogues
# ----------------------------------------------------------------------------------------------
def _powerlaw_mags(rng, n, m0, m1, slope):
    """``n`` magnitudes in [m0, m1] with dN/dm proportional to 10**(slope m)."""
    u = rng.uniform(size=n)
    a, b = 10 ** (slope * m0), 10 ** (slope * m1)
    return np.log10(a + u * (b - a)) / slope


def _count(density, slope, pivot, m0, m1, area_arcmin2):
    return density * area_arcmin2 * (10 ** (slope * (m1 - pivot)) - 10 ** (slope * (m0 - pivot)))


@dataclass(frozen=True)
class StaticSky:
    """Sources of one CCD's sky, in reference pixel coordinates (the reference grid is static).

    ``stars``: dict of arrays ``x_ref, y_ref, mag, ra, dec``; ``galaxies``: dict with also
    ``g11, g12, g22`` (shape quadratic form in reference pixels, ``Q = (r/r_eff)^2``), ``n``
    (Sersic index), ``bn``."""

    stars: dict
    galaxies: dict


def draw_static_sky(rng_stars, rng_gals, ref_wcs: WCS, shape, pixel_scale: float, *,
                    margin: float, star_density: float, star_mags: tuple[float, float],
                    galaxy_density: float, galaxy_mags: tuple[float, float],
                    n_saturated: int, saturated_mags: tuple[float, float]) -> StaticSky:
    """Draw stars and galaxies over the reference CCD plus ``margin`` pixels on each side."""
    ny, nx = shape
    area = (nx + 2 * margin) * (ny + 2 * margin) * (pixel_scale / 60.0) ** 2  # arcmin^2

    def positions(rng, n):
        return (rng.uniform(-margin, nx - 1 + margin, n), rng.uniform(-margin, ny - 1 + margin, n))

    ns = rng_stars.poisson(max(_count(star_density, 0.2, 20.0, *star_mags, area), 0.0))
    smag = _powerlaw_mags(rng_stars, ns, *star_mags, 0.2)
    sx, sy = positions(rng_stars, ns)
    if n_saturated > 0:
        bx = rng_stars.uniform(0.1 * nx, 0.9 * nx, n_saturated)
        by = rng_stars.uniform(0.1 * ny, 0.9 * ny, n_saturated)
        bm = rng_stars.uniform(*saturated_mags, n_saturated)
        sx, sy, smag = np.r_[sx, bx], np.r_[sy, by], np.r_[smag, bm]
    sra, sdec = ref_wcs.all_pix2world(sx, sy, 0) if sx.size else (np.zeros(0), np.zeros(0))
    stars = dict(x_ref=sx, y_ref=sy, mag=smag, ra=np.asarray(sra), dec=np.asarray(sdec))

    ng = rng_gals.poisson(max(_count(galaxy_density, 0.35, 22.0, *galaxy_mags, area), 0.0))
    gmag = _powerlaw_mags(rng_gals, ng, *galaxy_mags, 0.35)
    gx, gy = positions(rng_gals, ng)
    re_arcsec = np.clip(0.7 * 10 ** (-0.12 * (gmag - 22.0)) * rng_gals.lognormal(0.0, 0.3, ng), 0.15, 8.0)
    re = re_arcsec / pixel_scale
    n = np.where(rng_gals.uniform(size=ng) < 0.65, 1.0, rng_gals.uniform(1.5, 4.0, ng))
    q = rng_gals.uniform(0.35, 1.0, ng)
    th = rng_gals.uniform(0, np.pi, ng)
    c, s = np.cos(th), np.sin(th)
    ia, ib = 1.0 / re**2, 1.0 / (q * re) ** 2
    gra, gdec = ref_wcs.all_pix2world(gx, gy, 0) if gx.size else (np.zeros(0), np.zeros(0))
    galaxies = dict(x_ref=gx, y_ref=gy, mag=gmag, ra=np.asarray(gra), dec=np.asarray(gdec),
                    g11=c * c * ia + s * s * ib, g22=s * s * ia + c * c * ib, g12=c * s * (ia - ib),
                    n=n, bn=sersic_bn(n))
    return StaticSky(stars=stars, galaxies=galaxies)


def sersic_bn(n):
    """``b_n`` of a Sersic profile (Ciotti & Bertin 1999 expansion), so r_eff encloses half the
    (untruncated) light."""
    n = np.asarray(n, float)
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)


def transform_shape(g11, g12, g22, a: np.ndarray):
    """Shape form in another grid: with ``p_ref = A p_other``, ``G_other = A^T G_ref A``."""
    a11, a12, a21, a22 = a[0, 0], a[0, 1], a[1, 0], a[1, 1]
    # G A
    b11 = g11 * a11 + g12 * a21
    b12 = g11 * a12 + g12 * a22
    b21 = g12 * a11 + g22 * a21
    b22 = g12 * a12 + g22 * a22
    return (a11 * b11 + a21 * b21, a11 * b12 + a21 * b22, a12 * b12 + a22 * b22)


def shape_params(g11, g12, g22):
    """(r_eff major [px], axis ratio b/a, angle [deg from +x towards +y]) of shape forms."""
    tr = g11 + g22
    det = g11 * g22 - g12 * g12
    disc = np.sqrt(np.maximum(tr * tr / 4.0 - det, 0.0))
    lmin, lmax = tr / 2.0 - disc, tr / 2.0 + disc
    ang = 0.5 * np.degrees(np.arctan2(2.0 * g12, g11 - g22)) + 90.0  # major axis = smallest eigenvalue
    ang = (ang + 90.0) % 180.0 - 90.0
    return 1.0 / np.sqrt(lmin), np.sqrt(lmin / lmax), ang


def render_galaxies(image, psf: PSFField, x, y, flux, g11, g12, g22, n, bn):
    """Add PSF-convolved Sersic galaxies to ``image`` (ny, nx) float64 e- **in place**.

    Each galaxy is evaluated (pixel-integrated, 3x3 sub-samples, 9x9 near the centre) on a square
    stamp of half-size ``ceil(4 r_eff + 4 FWHM)`` (grouped into a few sizes), FFT-convolved with the
    unit-sum pixelised PSF of its centre, clipped at 0 and normalised so the stamp sums to ``flux``.
    """
    from scipy import fft as sfft

    x = np.asarray(x, float)
    if x.size == 0:
        return image
    y = np.asarray(y, float)
    re_major, _, _ = shape_params(g11, g12, g22)
    lam_max = (g11 + g22) / 2.0 + np.sqrt(np.maximum((g11 - g22) ** 2 / 4.0 + g12 * g12, 0.0))
    pad = 0.75 * np.sqrt(lam_max)  # half a pixel diagonal in r_eff units along the minor axis
    fw = psf.fwhm(x, y)
    need = np.ceil(4.0 * re_major + 4.0 * fw)
    sizes = np.array([16, 24, 32, 48, 64, 96, 128])
    half = sizes[np.minimum(np.searchsorted(sizes, need), sizes.size - 1)]
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    ny, nx = image.shape
    visible = (ix + half >= 0) & (iy + half >= 0) & (ix - half < nx) & (iy - half < ny)
    for h in np.unique(half[visible]):
        sel = np.flatnonzero(visible & (half == h))
        S = 2 * int(h) + 1
        for chunk in np.array_split(sel, max(1, int(math.ceil(sel.size * S * S / 2e6)))):
            gal = np.empty((chunk.size, S, S))
            _render.sersic_stamps(gal, h + x[chunk] - ix[chunk], h + y[chunk] - iy[chunk],
                                  g11[chunk], g12[chunk], g22[chunk], n[chunk], bn[chunk], 4.0,
                                  pad[chunk], 3)
            P = min(S, 2 * int(math.ceil(4.0 * float(fw[chunk].max()))) + 1)
            ker = psf.stamps(x[chunk], y[chunk], P)
            # linear convolution, 'same' crop centred like scipy.signal.fftconvolve
            L = sfft.next_fast_len(S + P - 1, real=True)
            spec = sfft.rfft2(gal, s=(L, L), axes=(1, 2), workers=-1)
            spec *= sfft.rfft2(ker, s=(L, L), axes=(1, 2), workers=-1)
            full = sfft.irfft2(spec, s=(L, L), axes=(1, 2), workers=-1)
            c0 = (P - 1) // 2
            conv = np.ascontiguousarray(full[:, c0: c0 + S, c0: c0 + S])
            np.maximum(conv, 0.0, out=conv)
            scale = flux[chunk] / conv.sum(axis=(1, 2))
            _render.add_stamps(image, conv, ix[chunk] - h, iy[chunk] - h, np.ascontiguousarray(scale))
    return image
