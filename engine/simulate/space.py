"""A space-telescope-like simulated pair: undersampled PSF, flux units (MJy/sr) with a noise map,
no GAIN, a galaxy-rich field, a deeper reference coadd, one transient on a galaxy.

The images are what a JWST/HST user brings to nightsift: ``SCI`` in MJy/sr (``BUNIT``, ``PIXAR_SR``,
``PIXAR_A2``, ``PHOTMJSR``; no ``GAIN``, no ``MAGZP``), an ``ERR`` extension (1-sigma, MJy/sr), or a
``WHT`` (inverse variance) or ``VARIANCE`` one instead, and the true PSFs as FITS images, 4x
oversampled (``OVERSAMP = 4``) and at native sampling. The scene is drawn with the simulator's own
renderers (:class:`~.psf.PSFField` for point sources, :func:`~.scene.render_galaxies` for Sersic
galaxies), in electrons, then converted to MJy/sr::

    image [MJy/sr] = electrons / EXPTIME * MJYSR_PER_ES,   MJYSR_PER_ES = 10**(-0.4 (ZP_e - 8.9)) / (PIXAR_SR 1e6)

with ``ZP_e`` the AB magnitude giving 1 e-/s. Science and reference share that calibration, so the
flux ratio of the pair is exactly 1; the AB zero point of the files' summed pixel values
(``m = ZP_AB - 2.5 log10(sum of MJy/sr)``) is ``8.9 - 2.5 log10(PIXAR_SR 1e6)``.

>>> from nightsift.engine.simulate import simulate_space_pair
>>> pair = simulate_space_pair(seed=1)
>>> str(pair.transients["kind"][0]), bool(pair.transients["snr"][0] > 10)
('host', True)
>>> paths = pair.write("/tmp/space")  # sci.fits, ref.fits, psf_{sci,ref}[_native].fits, truth.ecsv
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import ConfigError
from .psf import PSFField
from .scene import (
    GALAXY_DTYPE, STAR_DTYPE, Geometry, _powerlaw_mags, field_centre, reference_cd, render_galaxies,
    science_wcs_header, sersic_bn, shape_params, transform_shape, wcs_header,
)
from .units import mag_to_flux, mjd_to_isot

__all__ = ["NOISE_EXTENSIONS", "SPACE_TRANSIENT_DTYPE", "SpaceOptions", "SpacePair", "simulate_space_pair",
           "zogy_expected_snr"]

#: truth table of the transients of a space pair
SPACE_TRANSIENT_DTYPE = np.dtype([
    ("id", "i8"),
    ("kind", "U8"),  # 'host' (on a galaxy, < 1 FWHM from its centre) | 'isolated'
    ("ra", "f8"), ("dec", "f8"),  # deg, ICRS
    ("x", "f8"), ("y", "f8"),  # 0-based science pixel position
    ("x_ref", "f8"), ("y_ref", "f8"),  # 0-based reference pixel position
    ("flux", "f8"),  # in the file's units: sum of its pixel values in the science image (MJy/sr px)
    ("flux_e", "f8"),  # the same in electrons of the science exposure
    ("mag", "f8"),  # AB magnitude
    ("snr", "f8"),  # expected S/N of the ZOGY PSF flux (true PSFs, true variance maps): zogy_expected_snr
    ("snr_sci", "f8"),  # ideal PSF-fit S/N in the science image alone (noiseless reference)
    ("host", "i8"),  # galaxy id for 'host', else -1
    ("host_offset", "f8"),  # distance from the host's centre (px), 0 for 'isolated'
    ("fwhm", "f8"),  # true science PSF FWHM (px, continuous Moffat)
])

#: noise-map extensions :meth:`SpacePair.write` can write: 1-sigma error, inverse variance, variance
NOISE_EXTENSIONS = ("ERR", "WHT", "VARIANCE")


@dataclass(frozen=True)
class SpacePair:
    """A simulated space-like science/reference pair with its truth.

    Attributes
    ----------
    science, reference : ndarray (ny, nx) float32
        Images in MJy/sr (sky included: space images are rarely sky-subtracted to zero).
    science_var, reference_var : ndarray (ny, nx) float64
        True variance maps (MJy/sr)^2, from the noiseless model (the noise was drawn from them).
    science_header, reference_header : astropy.io.fits.Header
        WCS and photometric cards of the ``SCI`` HDU (see the module docstring).
    psf_sci, psf_ref : PSFField
        True PSFs (one per image, the same over the field), in the image's own pixels.
    geometry : Geometry
        Science-to-reference pixel map.
    transients : structured ndarray, SPACE_TRANSIENT_DTYPE
    stars, galaxies : structured ndarray, STAR_DTYPE / GALAXY_DTYPE
        Fluxes in e- of each exposure (``flux_sci``/``flux``: science, ``flux_ref``: reference);
        ``meta["mjysr_per_e_sci"]`` / ``["mjysr_per_e_ref"]`` turn them into the files' units.
    meta : dict
        ``pixel_scale`` (arcsec/px), ``zp_ab`` (of the summed MJy/sr), ``zp_e`` (AB mag of 1 e-/s),
        ``exptime_sci`` / ``exptime_ref`` (s), ``ncombine_ref``, ``F_r`` (1.0), ``sigma_sci`` /
        ``sigma_ref`` (median background noise, MJy/sr), ``fwhm_sci`` / ``fwhm_ref`` (px),
        ``seed``.
    """

    science: np.ndarray
    reference: np.ndarray
    science_var: np.ndarray
    reference_var: np.ndarray
    science_header: fits.Header
    reference_header: fits.Header
    psf_sci: PSFField
    psf_ref: PSFField
    geometry: Geometry
    transients: np.ndarray
    stars: np.ndarray
    galaxies: np.ndarray
    meta: dict = field(default_factory=dict)

    def hdulist(self, which: str = "science", *, noise: str = "ERR") -> fits.HDUList:
        """The image as a user's file: an empty primary HDU (observation cards), ``SCI`` (MJy/sr,
        WCS, photometric cards) and one noise map: ``ERR`` (1-sigma, MJy/sr), ``WHT`` (inverse
        variance, (MJy/sr)^-2, ``WHTTYPE = 'ivm'``) or ``VARIANCE`` ((MJy/sr)^2)."""
        if noise not in NOISE_EXTENSIONS:
            raise ValueError(f"SpacePair: noise must be one of {NOISE_EXTENSIONS}, got {noise!r}")
        _check_which(which)
        img, var, hdr = ((self.science, self.science_var, self.science_header) if which == "science" else
                         (self.reference, self.reference_var, self.reference_header))
        prim = fits.PrimaryHDU()
        for key in ("TELESCOP", "INSTRUME", "FILTER", "EXPTIME", "XPOSURE", "NCOMBINE", "MJD-OBS", "DATE-OBS"):
            if key in hdr:
                prim.header[key] = (hdr[key], hdr.comments[key])
        sci = fits.ImageHDU(img.astype(np.float32), header=hdr, name="SCI")
        wcs = WCS(hdr).to_header()
        if noise == "ERR":
            data, unit = np.sqrt(var), "MJy/sr"
        elif noise == "WHT":
            data, unit = 1.0 / var, "(MJy/sr)**-2"
        else:
            data, unit = var, "(MJy/sr)**2"
        ext = fits.ImageHDU(data.astype(np.float32), header=wcs, name=noise)
        ext.header["BUNIT"] = unit
        if noise == "WHT":
            ext.header["WHTTYPE"] = ("ivm", "inverse variance weight")
        return fits.HDUList([prim, sci, ext])

    def psf_hdu(self, which: str = "science", *, oversample: int = 4) -> fits.PrimaryHDU:
        """The true PSF as a FITS image of unit sum: ``oversample`` x finer than the image's pixels
        (each fine pixel the PSF integrated over it; the centre at the array centre, so that summing
        ``oversample x oversample`` blocks gives the native pixelised PSF), ``OVERSAMP`` and
        ``PIXELSCL`` (arcsec per fine pixel) in the header."""
        psf = self.psf_sci if _check_which(which) == "science" else self.psf_ref
        data = oversampled_psf(psf, oversample, native_size=psf_stamp_size(psf))
        h = fits.Header()
        h["OVERSAMP"] = (int(oversample), "oversampling factor of the image's pixels")
        h["DET_SAMP"] = (int(oversample), "same (WebbPSF convention)")
        h["PIXELSCL"] = (float(psf.pixel_scale / oversample), "arcsec per PSF pixel")
        h["FWHMPIX"] = (float(psf.fwhm0), "true FWHM in image pixels (continuous Moffat)")
        h["COMMENT"] = "PSF centre at the array centre ((n-1)/2, 0-based); unit sum"
        return fits.PrimaryHDU(data.astype(np.float32), header=h)

    def write(self, directory, *, noise: str = "ERR") -> dict:
        """Write ``sci.fits``, ``ref.fits`` (noise map ``noise``), ``psf_sci.fits``, ``psf_ref.fits``
        (4x oversampled), ``psf_sci_native.fits``, ``psf_ref_native.fits`` and ``truth.ecsv`` (the
        transients) into ``directory``; returns their paths by short name."""
        from astropy.table import Table

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {k: d / f"{k}.fits" for k in ("sci", "ref", "psf_sci", "psf_ref", "psf_sci_native",
                                                 "psf_ref_native")}
        self.hdulist("science", noise=noise).writeto(paths["sci"], overwrite=True)
        self.hdulist("reference", noise=noise).writeto(paths["ref"], overwrite=True)
        for which, tag in (("science", "sci"), ("reference", "ref")):
            self.psf_hdu(which, oversample=4).writeto(paths[f"psf_{tag}"], overwrite=True)
            self.psf_hdu(which, oversample=1).writeto(paths[f"psf_{tag}_native"], overwrite=True)
        paths["truth"] = d / "truth.ecsv"
        Table(self.transients).write(paths["truth"], overwrite=True)
        return paths


def _check_which(which: str) -> str:
    if which not in ("science", "reference"):
        raise ValueError(f"SpacePair: which must be 'science' or 'reference', got {which!r}")
    return which


# ----------------------------------------------------------------------------------------------
# PSF images
# ----------------------------------------------------------------------------------------------
def psf_stamp_size(psf: PSFField) -> int:
    """Odd native side of a PSF image: 8 FWHM each side (the Moffat beyond holds ~0.2 % of the flux)."""
    return 2 * int(math.ceil(8.0 * psf.fwhm0)) + 1


def oversampled_psf(psf: PSFField, oversample: int, *, native_size: int) -> np.ndarray:
    """Unit-sum image of ``psf`` on a grid ``oversample`` x finer than its pixels, ``native_size *
    oversample`` on a side, the PSF centre at the array centre: each ``oversample^2`` block sums
    to the native pixel of a source centred on the central native pixel."""
    k = int(oversample)
    if k == 1:
        st = psf.stamp(0.0, 0.0, native_size)
        return st / st.sum()
    fine = PSFField(shape=psf.shape, fwhm0=psf.fwhm0 * k, beta=psf.beta, e1=psf.e1, e2=psf.e2,
                    pixel_scale=psf.pixel_scale / k)
    n = native_size * k
    # odd stamp of n + 1 with the centre half a fine pixel low-left of its central pixel, cropped to n:
    # the centre lands on (n - 1) / 2, a fine-pixel corner, i.e. the centre of a native pixel
    st = fine.stamp(0.0, 0.0, n + 1, dx=-0.5, dy=-0.5)[:n, :n]
    return st / st.sum()


# ----------------------------------------------------------------------------------------------
# expected S/N
# ----------------------------------------------------------------------------------------------
def zogy_expected_snr(flux, psf_n, psf_r, var_n, var_r, *, sigma_n: float, sigma_r: float,
                      F_r: float = 1.0) -> float:
    """Expected S/N of the ZOGY PSF flux of a point source of ``flux`` at a pixel, from the true
    PSFs and the variance maps around it (Zackay, Ofek & Gal-Yam 2016, eq. 12-14 and 27).

    With ``F_n = 1``, ``den = sigma_n^2 F_r^2 |P_r^|^2 + sigma_r^2 |P_n^|^2``, the kernels of the
    score ``S = k_n (x) N - k_r (x) R`` are ``k_n^ = F_r^2 conj(P_n^) |P_r^|^2 / den`` and
    ``k_r^ = F_r conj(P_r^) |P_n^|^2 / den``; a source of flux ``a`` gives ``S = a F_S`` with
    ``F_S = sum F_r^2 |P_n^|^2 |P_r^|^2 / den`` (mean over frequencies) and the noise of S at the
    pixel is ``V_S = sum_p k_n(p)^2 V_N(-p) + k_r(p)^2 V_R(-p)`` (per-pixel variances: the
    source's and its host's Poisson noise included). S/N = ``a F_S / sqrt(V_S)``, which is the
    ``|flux| / flux_err`` of :func:`nightsift.engine.truth.expected_snr` with the ideal flux error
    (astrometric noise left out). With a noiseless reference and a flat variance it reduces to
    ``flux / sqrt(sigma_n^2 NEA)``.

    Parameters
    ----------
    flux : float
        In the science image's units.
    psf_n, psf_r : ndarray (L, L), L odd
        Unit-sum PSFs centred on the central pixel, in science pixels.
    var_n, var_r : ndarray (L, L)
        Variance maps of the science and the (aligned) reference around the pixel, which is their
        central pixel; the reference's in its own units.
    sigma_n, sigma_r : float
        Background noise the optimal filter is built with (ZOGY's sigma_n, sigma_r).
    F_r : float
        Flux ratio reference/science.
    """
    pn = np.fft.fft2(np.fft.ifftshift(psf_n))
    pr = np.fft.fft2(np.fft.ifftshift(psf_r))
    an, ar = np.abs(pn) ** 2, np.abs(pr) ** 2
    den = sigma_n**2 * F_r**2 * ar + sigma_r**2 * an
    den = np.maximum(den, np.finfo(float).tiny)
    F_S = float(np.mean(F_r**2 * an * ar / den))
    k_n = np.fft.fftshift(np.fft.ifft2(F_r**2 * np.conj(pn) * ar / den).real)
    k_r = np.fft.fftshift(np.fft.ifft2(F_r * np.conj(pr) * an / den).real)
    V_S = float(np.sum(k_n**2 * var_n[::-1, ::-1]) + np.sum(k_r**2 * var_r[::-1, ::-1]))
    return float(abs(flux) * F_S / math.sqrt(V_S))


# ----------------------------------------------------------------------------------------------
# the pair
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpaceOptions:
    """What :func:`simulate_space_pair` draws (every field a keyword of it).

    Attributes
    ----------
    shape : (ny, nx)
    seed : int
    pixel_scale : float
        arcsec/px (0.06-0.11 for HST/JWST imagers).
    fwhm_sci, fwhm_ref : float
        True PSF FWHM (px) of the science image and of the reference (undersampled: ~2).
    beta : float
        Moffat beta: a sharp core with extended wings.
    n_stars, n_galaxies, n_bright_galaxies : int
        Stars (AB 21-27), faint-to-bright galaxies (AB 21-27.5) and extra bright ones (AB 20.3-21.5),
        per 512 x 512 pixels (scaled with the area).
    size_range : (float, float)
        Galaxy half-light radii (major axis) in units of ``fwhm_sci``: 0.75-2, i.e. half-light
        diameters 1.5-4 PSF widths.
    host_snr : float
        Expected S/N of the transient on a galaxy.
    isolated_snr : tuple of float
        Expected S/N of each isolated transient (before its own Poisson noise, which lowers the
        final one: 18, 30, 60 end near 16, 26, 44). A measured S/N scatters by +-1 about the
        expected one, so a 20 % check needs S/N >= 15 to be a 3-sigma one.
    exptime, ncombine_ref : float, int
        Science exposure (s); the reference is a coadd of ``ncombine_ref`` such exposures.
    sky_rate, read_noise, dark : float
        e-/s/px, e- per exposure, e-/s/px.
    zp_e : float
        AB magnitude giving 1 e-/s.
    full_well : float
        e- per exposure (written as SATURATE in MJy/sr; nothing in the scene reaches it).
    geometry : Geometry
        Science-to-reference pixel map (default a shift of a few pixels, sub-pixel part included).
    """

    shape: tuple[int, int] = (512, 512)
    seed: int = 0
    pixel_scale: float = 0.08
    fwhm_sci: float = 2.15
    fwhm_ref: float = 2.05
    beta: float = 2.5
    n_stars: int = 40
    n_galaxies: int = 200
    n_bright_galaxies: int = 8
    size_range: tuple[float, float] = (0.75, 2.0)
    host_snr: float = 20.0
    isolated_snr: tuple = (18.0, 30.0, 60.0)
    exptime: float = 1000.0
    ncombine_ref: int = 4
    sky_rate: float = 0.15
    read_noise: float = 12.0
    dark: float = 0.005
    zp_e: float = 26.5
    full_well: float = 80000.0
    geometry: Geometry = Geometry(dx=2.37, dy=-1.62)

    def __post_init__(self):
        shape = (int(self.shape[0]), int(self.shape[1]))
        if min(shape) < 128:
            raise ConfigError(f"simulate_space_pair: shape must be at least 128 x 128, got {shape}")
        object.__setattr__(self, "shape", shape)
        if min(self.fwhm_sci, self.fwhm_ref, self.exptime, self.pixel_scale) <= 0 or self.beta <= 1:
            raise ConfigError("simulate_space_pair: fwhm_sci, fwhm_ref, exptime, pixel_scale must be > 0 and beta > 1")
        if self.ncombine_ref < 1 or min(self.n_stars, self.n_galaxies, self.n_bright_galaxies) < 0:
            raise ConfigError("simulate_space_pair: ncombine_ref must be >= 1 and the source counts >= 0")


def simulate_space_pair(**options) -> SpacePair:
    """A space-like science/reference pair (MJy/sr, noise maps, undersampled PSF, galaxy-rich), one
    transient on a galaxy (offset from its centre by 0.3-0.8 FWHM) and a few isolated ones.

    Keywords are the fields of :class:`SpaceOptions`. Deterministic from ``seed``; the existing
    instrument profiles' simulations are untouched (nothing here draws from their streams).
    """
    o = SpaceOptions(**options)
    r_sky, r_psf, r_tr, r_noise_sci, r_noise_ref = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(o.seed), 0x5BACE]).spawn(5))
    ny, nx = o.shape
    ra0, dec0 = field_centre(o.seed)
    ref_hdr = wcs_header((ra0, dec0), ((nx - 1) / 2.0, (ny - 1) / 2.0), reference_cd(o.pixel_scale, 0.0))
    sci_hdr = science_wcs_header(ref_hdr, o.geometry, o.shape)
    sci_wcs, ref_wcs = WCS(sci_hdr), WCS(ref_hdr)
    e1, e2 = r_psf.uniform(-0.04, 0.04, 2), r_psf.uniform(-0.04, 0.04, 2)
    psf_sci = PSFField(shape=o.shape, fwhm0=o.fwhm_sci, beta=o.beta, e1=(float(e1[0]), 0.0, 0.0),
                       e2=(float(e2[0]), 0.0, 0.0), pixel_scale=o.pixel_scale)
    psf_ref = PSFField(shape=o.shape, fwhm0=o.fwhm_ref, beta=o.beta, e1=(float(e1[1]), 0.0, 0.0),
                       e2=(float(e2[1]), 0.0, 0.0), pixel_scale=o.pixel_scale)
    stars, gals = _draw_sources(r_sky, o, ref_wcs, sci_wcs)
    t_sci, t_ref = o.exptime, o.exptime * o.ncombine_ref
    model_sci = _render(o, psf_sci, stars["x"], stars["y"], stars["flux_sci"], gals, "sci", t_sci)
    model_ref = _render(o, psf_ref, stars["x_ref"], stars["y_ref"], stars["flux_ref"], gals, "ref", t_ref)
    es = mjysr_per_es(o.zp_e, o.pixel_scale)
    c_sci, c_ref = es / t_sci, es / t_ref
    var_ref = (model_ref + o.ncombine_ref * o.read_noise**2 + o.dark * t_ref) * c_ref**2
    tr = _place_transients(r_tr, o, psf_sci, gals, stars, sci_wcs, ref_wcs)
    snr_model = dict(psf_sci=psf_sci, psf_ref=psf_ref, var_ref=var_ref, c_sci=c_sci, read=o.read_noise**2 + o.dark * t_sci)
    _set_fluxes(tr, o, model_sci, snr_model)
    psf_sci.render(model_sci, tr["x"], tr["y"], tr["flux_e"])
    var_sci = (model_sci + snr_model["read"]) * c_sci**2
    _fill_snr(tr, o, var_sci, snr_model)
    sci = (model_sci + r_noise_sci.standard_normal(o.shape) * np.sqrt(model_sci + snr_model["read"])) * c_sci
    ref = (model_ref + r_noise_ref.standard_normal(o.shape) * np.sqrt(var_ref) / c_ref) * c_ref
    meta = dict(seed=int(o.seed), pixel_scale=o.pixel_scale, zp_e=o.zp_e,
                zp_ab=float(8.9 - 2.5 * math.log10(pixar_sr(o.pixel_scale) * 1e6)),
                exptime_sci=t_sci, exptime_ref=t_ref, ncombine_ref=o.ncombine_ref, F_r=1.0,
                sigma_sci=float(np.sqrt(np.median(var_sci))), sigma_ref=float(np.sqrt(np.median(var_ref))),
                fwhm_sci=o.fwhm_sci, fwhm_ref=o.fwhm_ref, mjysr_per_e_sci=c_sci, mjysr_per_e_ref=c_ref)
    return SpacePair(science=sci.astype(np.float32), reference=ref.astype(np.float32), science_var=var_sci,
                     reference_var=var_ref, science_header=_header(o, sci_hdr, "sci"),
                     reference_header=_header(o, ref_hdr, "ref"), psf_sci=psf_sci, psf_ref=psf_ref,
                     geometry=o.geometry, transients=tr, stars=stars, galaxies=gals, meta=meta)


def pixar_sr(pixel_scale: float) -> float:
    """Solid angle of a square pixel of ``pixel_scale`` arcsec (sr)."""
    return (pixel_scale / 206264.80624709636) ** 2


def mjysr_per_es(zp_e: float, pixel_scale: float) -> float:
    """MJy/sr of one pixel holding 1 e-/s of a source whose AB magnitude of 1 e-/s is ``zp_e``."""
    return 10 ** (-0.4 * (zp_e - 8.9)) / (pixar_sr(pixel_scale) * 1e6)


def _galaxy_forms(re, q, theta):
    """Shape forms ``(g11, g12, g22)`` (``Q = (r / r_eff)^2``) of ellipses with major-axis half-light
    radius ``re`` (px), axis ratio ``q`` and major-axis angle ``theta`` (rad from +x towards +y):
    the axis-aligned form turned by ``theta`` (:func:`~.scene.transform_shape` with ``R(-theta)``)."""
    c, s = np.cos(theta), np.sin(theta)
    return transform_shape(1.0 / re**2, np.zeros_like(re), 1.0 / (q * re) ** 2, np.array([[c, s], [-s, c]]))


def _draw_sources(rng, o: SpaceOptions, ref_wcs: WCS, sci_wcs: WCS):
    """Stars and galaxies (STAR_DTYPE, GALAXY_DTYPE), drawn on the reference grid plus a margin."""
    ny, nx = o.shape
    m = 12.0
    n_s, n_f, n_b = (int(round(n * ny * nx / 512**2)) for n in (o.n_stars, o.n_galaxies, o.n_bright_galaxies))

    def xy(n, lo=-m, hx=nx - 1 + m, hy=ny - 1 + m):
        return rng.uniform(lo, hx, n), rng.uniform(lo, hy, n)

    stars = np.zeros(n_s, STAR_DTYPE)
    stars["id"] = np.arange(n_s)
    stars["mag"] = _powerlaw_mags(rng, n_s, 21.0, 27.0, 0.2)
    stars["x_ref"], stars["y_ref"] = xy(n_s)
    n_g = n_f + n_b
    gals = np.zeros(n_g, GALAXY_DTYPE)
    gals["id"] = np.arange(n_g)
    gals["mag"] = np.r_[_powerlaw_mags(rng, n_f, 21.0, 27.5, 0.35), rng.uniform(20.3, 21.5, n_b)]
    gx, gy = xy(n_f)
    bx, by = xy(n_b, 0.1 * min(nx, ny), 0.9 * (nx - 1), 0.9 * (ny - 1))
    gals["x_ref"], gals["y_ref"] = np.r_[gx, bx], np.r_[gy, by]
    lo, hi = o.size_range
    re = o.fwhm_sci * np.exp(rng.uniform(math.log(lo), math.log(hi), n_g))
    gals["sersic_n"] = np.where(rng.uniform(size=n_g) < 0.65, 1.0, rng.uniform(1.5, 4.0, n_g))
    q, th = rng.uniform(0.4, 1.0, n_g), rng.uniform(0.0, np.pi, n_g)
    g_ref = _galaxy_forms(re, q, th)
    for tab in (stars, gals):
        tab["ra"], tab["dec"] = ref_wcs.all_pix2world(tab["x_ref"], tab["y_ref"], 0)
        tab["x"], tab["y"] = sci_wcs.all_world2pix(tab["ra"], tab["dec"], 0)
        tab["in_sci"] = _inside(tab["x"], tab["y"], o.shape)
        tab["in_ref"] = _inside(tab["x_ref"], tab["y_ref"], o.shape)
    t_sci, t_ref = o.exptime, o.exptime * o.ncombine_ref
    stars["flux_sci"], stars["flux_ref"] = mag_to_flux(stars["mag"], o.zp_e, t_sci), mag_to_flux(stars["mag"], o.zp_e, t_ref)
    gals["flux"], gals["flux_ref"] = mag_to_flux(gals["mag"], o.zp_e, t_sci), mag_to_flux(gals["mag"], o.zp_e, t_ref)
    g_sci = transform_shape(*g_ref, o.geometry.matrix)
    gals["r_eff"], gals["axis_ratio"], gals["angle"] = shape_params(*g_sci)
    return stars, gals


def _inside(x, y, shape):
    ny, nx = shape
    return (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)


def _render(o: SpaceOptions, psf: PSFField, sx, sy, sflux, gals, grid: str, exptime: float) -> np.ndarray:
    """Noiseless model (e-, float64) of one image: flat sky, stars, PSF-convolved galaxies."""
    model = np.full(o.shape, o.sky_rate * exptime)
    psf.render(model, sx, sy, sflux)
    if grid == "sci":
        g = _galaxy_forms_in(gals, o.geometry, sci=True)
        x, y, f = gals["x"], gals["y"], gals["flux"]
    else:
        g = _galaxy_forms_in(gals, o.geometry, sci=False)
        x, y, f = gals["x_ref"], gals["y_ref"], gals["flux_ref"]
    render_galaxies_oversampled(model, psf, x, y, f, *g, gals["sersic_n"], oversample=GALAXY_OVERSAMPLE)
    return model


#: galaxies are drawn on a grid this much finer than the image's pixels, then binned (see
#: :func:`render_galaxies_oversampled`)
GALAXY_OVERSAMPLE = 4


def render_galaxies_oversampled(image, psf: PSFField, x, y, flux, g11, g12, g22, n, *, oversample: int):
    """:func:`~.scene.render_galaxies` on a grid ``oversample`` x finer, binned onto ``image``
    (ny, nx) float64 e- **in place**.

    At native sampling the renderer convolves the pixel-integrated Sersic with the pixel-integrated
    PSF: a discrete convolution of two undersampled profiles, which for a compact cuspy galaxy under
    a 2 px PSF puts 25 % too much light in a centred peak and 6 % too little in a peak on a pixel
    corner, so the same galaxy differs between two grids by several sigma at its core. On a 4x finer
    grid (the PSF integrated over the fine pixels, the galaxy's shape form scaled by ``1 / k^2``) the
    binned image agrees with an 8x one to 0.4 % of the peak."""
    k = int(oversample)
    ny, nx = image.shape
    fine_psf = PSFField(shape=(ny * k, nx * k), fwhm0=psf.fwhm0 * k, beta=psf.beta, growth=psf.growth,
                        tilt=psf.tilt, e1=psf.e1, e2=psf.e2, pixel_scale=psf.pixel_scale / k)
    fine = np.zeros((ny * k, nx * k))
    # native pixel i spans [i - 1/2, i + 1/2]: fine pixels k i .. k i + k - 1, so x -> k x + (k - 1) / 2
    n = np.asarray(n, float)
    render_galaxies(fine, fine_psf, k * np.asarray(x, float) + (k - 1) / 2.0, k * np.asarray(y, float) + (k - 1) / 2.0,
                    flux, np.asarray(g11) / k**2, np.asarray(g12) / k**2, np.asarray(g22) / k**2, n, sersic_bn(n))
    image += fine.reshape(ny, k, nx, k).sum(axis=(1, 3))
    return image


def _galaxy_forms_in(gals, geometry: Geometry, *, sci: bool):
    """Shape forms of the galaxies in the science grid (``sci``) or the reference grid."""
    g_sci = _galaxy_forms(gals["r_eff"], gals["axis_ratio"], np.radians(gals["angle"]))
    if sci:
        return g_sci
    return transform_shape(*g_sci, np.linalg.inv(geometry.matrix))


def _place_transients(rng, o: SpaceOptions, psf: PSFField, gals, stars, sci_wcs: WCS, ref_wcs: WCS) -> np.ndarray:
    """Positions of the transients (fluxes come later): one on a galaxy of AB 21-23.5 at least a
    PSF wide, 0.3-0.8 FWHM from its centre; the isolated ones well clear of every source and of
    each other. ``edge`` keeps the ZOGY-S/N stamps on the image."""
    ny, nx = o.shape
    fw = o.fwhm_sci
    edge = 40.0
    ok = ((gals["x"] > edge) & (gals["x"] < nx - 1 - edge) & (gals["y"] > edge) & (gals["y"] < ny - 1 - edge)
          & (gals["mag"] > 20.5) & (gals["mag"] < 22.5) & (gals["r_eff"] >= fw))
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        raise ConfigError("simulate_space_pair: no galaxy of AB 21-23.5 inside the image to host the transient; "
                          "use a larger shape, more galaxies or another seed")
    host = int(rng.choice(cand))
    d, phi = rng.uniform(0.3, 0.8) * fw, rng.uniform(0.0, 2.0 * np.pi)
    xs, ys = [gals["x"][host] + d * math.cos(phi)], [gals["y"][host] + d * math.sin(phi)]
    ox = np.r_[gals["x"], stars["x"]]
    oy = np.r_[gals["y"], stars["y"]]
    orad = np.r_[3.0 * gals["r_eff"] + 4.0 * fw, np.where(stars["mag"] < 24.0, 8.0, 4.0) * fw]
    for x, y in zip(rng.uniform(edge, nx - 1 - edge, 4000), rng.uniform(edge, ny - 1 - edge, 4000)):
        if len(xs) > len(o.isolated_snr):
            break
        if np.all(np.hypot(ox - x, oy - y) > orad) and np.all(np.hypot(np.array(xs) - x, np.array(ys) - y) > 10 * fw):
            xs.append(x)
            ys.append(y)
    n = len(xs)
    tr = np.zeros(n, SPACE_TRANSIENT_DTYPE)
    tr["id"] = np.arange(n)
    tr["kind"] = ["host"] + ["isolated"] * (n - 1)
    tr["x"], tr["y"] = xs, ys
    tr["host"] = [host] + [-1] * (n - 1)
    tr["host_offset"] = [d] + [0.0] * (n - 1)
    tr["ra"], tr["dec"] = sci_wcs.all_pix2world(tr["x"], tr["y"], 0)
    tr["x_ref"], tr["y_ref"] = ref_wcs.all_world2pix(tr["ra"], tr["dec"], 0)
    tr["fwhm"] = psf.fwhm(tr["x"], tr["y"])
    return tr


def _stamp(image, x, y, size):
    """``size x size`` cut of ``image`` centred on the pixel nearest ``(x, y)`` (inside the image)."""
    h = size // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    return image[iy - h: iy + h + 1, ix - h: ix + h + 1]


def _snr_inputs(t, m: dict, var_sci, size: int):
    """PSF and variance stamps of :func:`zogy_expected_snr` for transient row ``t``."""
    pn = m["psf_sci"].stamp(float(t["x"]), float(t["y"]), size)
    pr = m["psf_ref"].stamp(float(t["x_ref"]), float(t["y_ref"]), size)
    return (pn / pn.sum(), pr / pr.sum(), _stamp(var_sci, t["x"], t["y"], size),
            _stamp(m["var_ref"], t["x_ref"], t["y_ref"], size))


def _set_fluxes(tr, o: SpaceOptions, model_sci, m: dict) -> None:
    """Fluxes giving each transient its target S/N over the transient-free variance (its own
    Poisson noise then lowers the S/N a little; :func:`_fill_snr` has the final value)."""
    var_sci = (model_sci + m["read"]) * m["c_sci"] ** 2
    size = psf_stamp_size(m["psf_sci"])
    sig_n, sig_r = float(np.sqrt(np.median(var_sci))), float(np.sqrt(np.median(m["var_ref"])))
    targets = np.r_[o.host_snr, np.asarray(o.isolated_snr, float)][: tr.size]
    for k in range(tr.size):
        s1 = zogy_expected_snr(1.0, *_snr_inputs(tr[k], m, var_sci, size), sigma_n=sig_n, sigma_r=sig_r)
        tr["flux"][k] = targets[k] / s1
    tr["flux_e"] = tr["flux"] / m["c_sci"]
    tr["mag"] = 8.9 - 2.5 * np.log10(tr["flux"] * pixar_sr(o.pixel_scale) * 1e6)


def _fill_snr(tr, o: SpaceOptions, var_sci, m: dict) -> None:
    """``snr`` (ZOGY, both images' noise) and ``snr_sci`` (noiseless reference) of each transient."""
    size = psf_stamp_size(m["psf_sci"])
    sig_n, sig_r = float(np.sqrt(np.median(var_sci))), float(np.sqrt(np.median(m["var_ref"])))
    for k in range(tr.size):
        pn, pr, vn, vr = _snr_inputs(tr[k], m, var_sci, size)
        tr["snr"][k] = zogy_expected_snr(tr["flux"][k], pn, pr, vn, vr, sigma_n=sig_n, sigma_r=sig_r)
        tr["snr_sci"][k] = zogy_expected_snr(tr["flux"][k], pn, pn, vn, np.zeros_like(vr), sigma_n=sig_n,
                                             sigma_r=1e-9 * sig_n)


def _header(o: SpaceOptions, wcs_hdr: fits.Header, which: str) -> fits.Header:
    """The ``SCI`` header: WCS, flux units and photometric calibration, exposure; no GAIN."""
    es = mjysr_per_es(o.zp_e, o.pixel_scale)
    sr = pixar_sr(o.pixel_scale)
    h = wcs_hdr.copy()
    h["BUNIT"] = ("MJy/sr", "surface brightness")
    h["PIXAR_SR"] = (sr, "nominal pixel area, sr")
    h["PIXAR_A2"] = (o.pixel_scale**2, "nominal pixel area, arcsec^2")
    h["PHOTMJSR"] = (es, "MJy/sr per count/s")
    h["PHOTUJA2"] = (es * 1e12 / (206264.80624709636**2), "uJy/arcsec^2 per count/s")
    h["TELESCOP"] = "SIMSPACE"
    h["INSTRUME"] = "SIMIMAGER"
    h["FILTER"] = "F150W"
    t = o.exptime * (o.ncombine_ref if which == "ref" else 1)
    h["EXPTIME"] = (float(t), "s, total exposure")
    h["XPOSURE"] = (float(t), "s, total exposure")
    if which == "ref":
        h["NCOMBINE"] = (int(o.ncombine_ref), "exposures in the coadd")
    mjd = 60100.2 if which == "ref" else 60500.3
    h["MJD-OBS"] = mjd
    h["DATE-OBS"] = mjd_to_isot(mjd)
    h["SATURATE"] = (float(o.full_well / o.exptime * es), "MJy/sr, detector full well")
    h["SIMSEED"] = int(o.seed)
    return h
