"""One simulated CCD pair: a raw science frame (with its calibration frames) and a calibrated
archival reference of the same sky, with the truth of everything injected.

Randomness is split by :class:`numpy.random.SeedSequence` so that the pieces are independent and
reproducible:

* static per CCD, from ``(seed, ccd)``: reference WCS, detector (bias, flat, hot pixels, bad
  columns), stars, galaxies, reference PSF/sky/noise, calibration frames;
* per visit, from ``(seed, ccd, visit)``: science geometry (offset/rotation/scale vs the reference),
  seeing and PSF pattern, sky, transparency, transients, cosmic rays, noise.

Changing ``visit`` therefore re-observes the same sky against the same reference; changing ``ccd``
or ``seed`` changes the sky.
"""
from __future__ import annotations

import datetime as _dt
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import ConfigError
from ..records import CalibrationFrames, Exposure, MaskBits, RawFrame
from . import _render
from .detector import COSMIC_RAY_DTYPE, DetectorModel, make_cosmic_rays, make_detector
from .instruments import InstrumentProfile, get_profile
from .psf import PSFField, draw_psf_field
from .scene import (
    GALAXY_DTYPE, STAR_DTYPE, Geometry, StaticSky, ccd_centre, draw_geometry, draw_static_sky,
    field_centre, reference_cd, render_galaxies, science_wcs_header, shape_params, transform_shape,
    wcs_header,
)

#: truth table of the injected transients (one row per transient; see SimulatedCCD)
TRANSIENT_DTYPE = np.dtype([
    ("id", "i8"),  # index within this CCD and visit
    ("kind", "U8"),  # 'isolated' | 'nuclear' | 'variable'
    ("ra", "f8"), ("dec", "f8"),  # deg, ICRS
    ("x", "f8"), ("y", "f8"),  # 0-based science pixel position
    ("x_ref", "f8"), ("y_ref", "f8"),  # 0-based reference pixel position
    ("flux", "f8"),  # e- in the calibrated science image minus the reference-equivalent flux
                     # (science zero point); < 0 for a fading variable star
    ("mag", "f8"),  # MAGZP_sci - 2.5 log10(|flux| / EXPTIME)
    ("snr", "f8"),  # approximate ideal PSF-fit S/N in the science image alone
    ("host", "i8"),  # galaxy id for 'nuclear', else -1
    ("star", "i8"),  # star id for 'variable', else -1
    ("fwhm", "f8"),  # true science PSF FWHM at (x, y), pixels
    ("masked", "?"),  # a saturated, hot, bad-column or cosmic-ray pixel lies in its 5x5 box
])

#: transient kinds and their default shares
TRANSIENT_KINDS = ("isolated", "nuclear", "variable")


def mjd_to_isot(mjd: float) -> str:
    """ISO-8601 UTC string of an MJD (no leap-second table involved)."""
    t = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=float(mjd))
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


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


@dataclass(frozen=True)
class SimulatedCCD:
    """A simulated science/reference pair of one CCD with its truth.

    Attributes
    ----------
    science_raw : RawFrame
        ``data`` ndarray (ny, nx) float32 in ADU: integers, bias included, dark current, flat
        response, Poisson + read noise, saturation (clipped at ``SATURATE``, charge bled along
        columns), hot pixels, bad columns, cosmic rays. ``header``: TAN WCS with a CD matrix, GAIN
        (e-/ADU), RDNOISE (e-), SATURATE (ADU), EXPTIME (s), FILTER, MJD-OBS, DATE-OBS, CCDNUM,
        VISIT, INSTRUME, MAGZP (mag giving 1 e-/s), SEEING (true FWHM at the CCD centre, arcsec),
        FWHM (the same, pixels), FWHMPIX (FWHM of the PSF convolved with the pixel, what a fit to
        pixel values measures), SKYLEVEL (e- per pixel at the centre), MAGLIM (ideal 5-sigma
        point-source limit), BIASLEV (ADU), DARKCUR (e-/s), PIXSCALE (arcsec/px), SIMSEED.
    calibration : CalibrationFrames
        Raw bias/dark/flat stacks ``(n_calib, ny, nx)`` float32 ADU of this CCD (darks of
        ``EXPTIME`` s with hot pixels, flats showing the bad columns, no cosmic rays). Generated on
        first access and cached (they cost ~3 frames of read-out each).
    reference : Exposure
        The archival reference: mean of ``ref_ncombine`` calibrated exposures in e- (sky *not*
        subtracted, dark subtracted, flat-fielded), float32; ``variance`` float32 e^2 from the
        noiseless model ``(model + dark t + RN^2) / ncombine``; ``mask`` uint16 with ``MaskBits.SAT``
        on saturated pixels and their bleed trails; its own WCS (see ``geometry``), PSF
        (``psf_ref``) and sky (``sky_ref``). Header: WCS, EXPTIME (of each combined exposure),
        MAGZP, SEEING, FWHM, FWHMPIX, GAIN=1, SATURATE (e-), NCOMBINE, FILTER, MJD-OBS, CCDNUM, INSTRUME.
    transients : structured ndarray, TRANSIENT_DTYPE
        The injected transients of this visit (empty when ``transients=False``).
    stars : structured ndarray, STAR_DTYPE
        Every star drawn for this CCD, including ones just off the CCD whose light may fall on it
        (use ``in_sci`` / ``in_ref``).
    galaxies : structured ndarray, GALAXY_DTYPE
    artifacts : dict
        ``cosmic_rays`` (COSMIC_RAY_DTYPE pixel list: id, y, x, electrons),
        ``hot_pixels`` (y, x, dark e-/s), ``bad_columns`` (x, y0, y1, response),
        ``saturated`` bool (ny, nx): science pixels at SATURATE (cores, bleed trails, hot pixels).
    psf_sci, psf_ref : PSFField
        True PSFs; ``psf_sci.fwhm(x, y)`` is the continuous-Moffat FWHM in pixels at any position,
        ``psf_sci.stamp(x, y)`` the pixelised PSF exactly as sources were drawn.
    detector : DetectorModel
        True bias, flat, dark map, gain, read noise, full well of the CCD.
    sky_sci, sky_ref : SkyModel
        True sky (e- per pixel, calibrated units).
    geometry : Geometry
        Science-to-reference pixel map (offset, rotation, scale).
    profile : InstrumentProfile
    meta : dict
        seed, visit, ccd, seeing_sci / seeing_ref (arcsec, centre), zp_sci / zp_ref, maglim_sci /
        maglim_ref (ideal 5-sigma), mag_sat (typical saturation magnitude), mjd_sci, mjd_ref,
        filter, n_calib.

    Notes
    -----
    Every source (star, galaxy, transient) is drawn on a finite stamp whose sum is normalised to its
    truth flux: the truth flux is the flux inside the stamp (radius >= 6 FWHM for point sources,
    enough to hold all but 1e-3 of the Moffat; 4 r_eff + 4 FWHM for galaxies). Sources near the
    edge lose the part of the stamp that falls off the CCD.
    """

    science_raw: RawFrame
    reference: Exposure
    transients: np.ndarray
    stars: np.ndarray
    galaxies: np.ndarray
    artifacts: dict
    psf_sci: PSFField
    psf_ref: PSFField
    detector: DetectorModel
    sky_sci: SkyModel
    sky_ref: SkyModel
    geometry: Geometry
    profile: InstrumentProfile
    meta: dict = field(default_factory=dict)

    @functools.cached_property
    def calibration(self) -> CalibrationFrames:
        m = self.meta
        n = int(m["n_calib"])
        rng = np.random.default_rng(np.random.SeedSequence([int(m["seed"]), int(m["ccd"]), 3]))
        t = float(self.profile.exptime)
        return CalibrationFrames(
            bias=self.detector.bias_frames(n, rng),
            dark=self.detector.dark_frames(n, t, rng),
            flat=self.detector.flat_frames(n, 0.4 * self.detector.full_well, rng),
            dark_exptime=t,
        )

    @property
    def psf_fwhm_sci(self):
        """Callable ``(x, y) -> FWHM`` (pixels) of the true science PSF."""
        return self.psf_sci.fwhm

    @property
    def psf_fwhm_ref(self):
        """Callable ``(x, y) -> FWHM`` (pixels) of the true reference PSF."""
        return self.psf_ref.fwhm

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.science_raw.data.shape)  # type: ignore[return-value]

    def science_exposure(self) -> Exposure:
        """The science frame calibrated with the *true* detector model (a perfect calibrate
        stage), for tests that start after calibration.

        ``image = ((raw - bias) * gain - dark * t) / flat`` (e-, float32), ``variance =
        (max((raw - bias) * gain, 0) + RN^2) / flat^2`` (e^2), ``mask``: BAD on hot pixels and bad
        columns, SAT on saturated pixels, CR on cosmic-ray pixels."""
        d = self.detector
        t = float(self.science_raw.header["EXPTIME"])
        e = (self.science_raw.data - d.bias_image()) * np.float32(d.gain)
        flat = d.flat
        img = (e - d.dark_map() * np.float32(t)) / flat
        var = (np.maximum(e, 0) + np.float32(d.read_noise ** 2)) / (flat * flat)
        mask = np.zeros(self.shape, np.uint16)
        mask[d.bad_pixel_mask()] |= np.uint16(MaskBits.BAD)
        mask[self.artifacts["saturated"]] |= np.uint16(MaskBits.SAT)
        cr = self.artifacts["cosmic_rays"]
        if cr.size:
            mask[cr["y"], cr["x"]] |= np.uint16(MaskBits.CR)
        hdr = self.science_raw.header.copy()
        hdr["BUNIT"] = "electron"
        hdr["GAIN"] = 1.0
        hdr["SATURATE"] = float(d.full_well)
        return Exposure(image=img.astype(np.float32), variance=var.astype(np.float32), mask=mask,
                        wcs=WCS(hdr), header=hdr)


# ----------------------------------------------------------------------------------------------
# photometry helpers
# ----------------------------------------------------------------------------------------------
def mag_to_flux(mag, zp: float, exptime: float):
    """Total e- of a source of ``mag``: ``10**(-0.4 (mag - zp)) * exptime``."""
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - zp)) * exptime


def flux_to_mag(flux, zp: float, exptime: float):
    """Magnitude of ``|flux|`` e-."""
    return zp - 2.5 * np.log10(np.abs(np.asarray(flux, float)) / exptime)


def _moffat_peak_fraction(fwhm_px: float, beta: float) -> float:
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (beta - 1.0) / (math.pi * alpha * alpha)


def _limiting_mag(psf: PSFField, bkg_var: float, zp: float, exptime: float, nsigma=5.0) -> float:
    ny, nx = psf.shape
    nea = float(psf.noise_equivalent_area(np.array([(nx - 1) / 2]), np.array([(ny - 1) / 2]))[0])
    s2 = nsigma * nsigma
    f = 0.5 * (s2 + math.sqrt(s2 * s2 + 4.0 * s2 * nea * bkg_var))
    return float(flux_to_mag(f, zp, exptime))


# ----------------------------------------------------------------------------------------------
# the static part of a CCD
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Static:
    key: tuple
    ref_hdr: fits.Header
    ref_wcs: WCS
    detector: DetectorModel
    psf_ref: PSFField
    sky_ref: SkyModel
    sky: StaticSky
    star_flux_ref: np.ndarray
    star_sat_ref: np.ndarray
    gal_flux_ref: np.ndarray
    reference: Exposure
    mag_sat: float
    maglim_typ: float
    maglim_ref: float
    mjd_night: float
    meta: dict


def _static_key(p, shape, seed, ccd, n_ccds, artifacts, star_density, galaxy_density,
                n_saturated, ref_seeing, filt, psf_variation):
    return (p, tuple(shape), int(seed), int(ccd), int(n_ccds), bool(artifacts), float(star_density),
            float(galaxy_density), n_saturated, ref_seeing, filt, bool(psf_variation))


def _build_static(p: InstrumentProfile, shape, seed, ccd, n_ccds, artifacts, star_density,
                  galaxy_density, n_saturated, ref_seeing, filt, psf_variation) -> _Static:
    key = _static_key(p, shape, seed, ccd, n_ccds, artifacts, star_density, galaxy_density,
                      n_saturated, ref_seeing, filt, psf_variation)
    ny, nx = shape
    r_wcs, r_stars, r_gals, r_det, r_psf, r_sky, r_noise, r_misc = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), int(ccd), 1]).spawn(8))
    t = p.exptime

    # reference WCS: TAN, CRPIX at the CCD centre, a small position angle
    ra0, dec0 = field_centre(seed)
    crval = ccd_centre(ra0, dec0, ccd, n_ccds, shape, p.pixel_scale)
    pa = float(r_wcs.uniform(-0.5, 0.5))
    ref_hdr = wcs_header(crval, ((nx - 1) / 2.0, (ny - 1) / 2.0), reference_cd(p.pixel_scale, pa))
    ref_wcs = WCS(ref_hdr)

    detector = make_detector(p, shape, r_det, defects=artifacts)

    # reference PSF (a good-seeing coadd) and sky
    see_ref = float(ref_seeing) if ref_seeing is not None else p.seeing_fwhm * float(r_psf.uniform(0.75, 0.95))
    psf_ref = draw_psf_field(r_psf, shape, see_ref / p.pixel_scale, p.moffat_beta,
                             growth=p.psf_corner_growth, ellipticity=p.psf_ellipticity,
                             pixel_scale=p.pixel_scale, vary=psf_variation)
    sky_ref = SkyModel(level=float(p.sky * r_sky.uniform(0.85, 1.1) * t),
                       gx=float(r_sky.uniform(-0.01, 0.01)), gy=float(r_sky.uniform(-0.01, 0.01)),
                       shape=(ny, nx))

    # magnitude ranges from the typical epoch
    zp = p.zero_point
    typ_psf = PSFField(shape=(ny, nx), fwhm0=p.seeing_px, beta=p.moffat_beta)
    bkg_typ = p.sky * t + p.dark_current * t + p.read_noise ** 2
    maglim_typ = _limiting_mag(typ_psf, bkg_typ, zp, t)
    fw_room = max(p.full_well - 1.5 * p.sky * t, 1.0)
    mag_sat = float(flux_to_mag(fw_room / _moffat_peak_fraction(p.seeing_px, p.moffat_beta), zp, t))
    if artifacts:
        star_mags = (mag_sat - 2.5, maglim_typ + 1.0)
        n_sat = int(n_saturated or 0)
    else:
        # nothing may saturate, even in 0.6x typical seeing
        safe = 0.5 * fw_room / _moffat_peak_fraction(0.6 * p.seeing_px, p.moffat_beta)
        star_mags = (float(flux_to_mag(safe, zp, t)), maglim_typ + 1.0)
        n_sat = 0
    gal_bright = max(17.0, star_mags[0])
    gal_mags = (gal_bright, max(maglim_typ - 0.5, gal_bright + 0.5))
    margin = 30.0 + 8.0 * p.seeing_px
    sky = draw_static_sky(r_stars, r_gals, ref_wcs, shape, p.pixel_scale, margin=margin,
                          star_density=star_density, star_mags=star_mags,
                          galaxy_density=galaxy_density, galaxy_mags=gal_mags, n_saturated=n_sat,
                          saturated_mags=(mag_sat - 2.5, mag_sat - 0.5))

    # reference image: mean of ref_ncombine exposures (noise from the noiseless model)
    star_flux_ref = mag_to_flux(sky.stars["mag"], zp, t)
    gal_flux_ref = mag_to_flux(sky.galaxies["mag"], zp, t)
    model = sky_ref.image()
    psf_ref.render(model, sky.stars["x_ref"], sky.stars["y_ref"], star_flux_ref)
    g = sky.galaxies
    render_galaxies(model, psf_ref, g["x_ref"], g["y_ref"], gal_flux_ref, g["g11"], g["g12"],
                    g["g22"], g["n"], g["bn"])
    bled = model.copy()
    _render.bleed_columns(bled, float(p.full_well))
    sat = (bled >= p.full_well) | (np.abs(bled - model) > 1e-6 * p.full_well)
    del model
    var = bled + (p.dark_current * t + p.read_noise ** 2)
    var /= p.ref_ncombine
    img = r_noise.standard_normal(shape, dtype=np.float32)
    img *= np.sqrt(var).astype(np.float32)
    img += bled.astype(np.float32)
    mask = np.where(sat, np.uint16(MaskBits.SAT), np.uint16(0)).astype(np.uint16)
    sx, sy = sky.stars["x_ref"], sky.stars["y_ref"]
    ix, iy = np.floor(sx + 0.5).astype(int), np.floor(sy + 0.5).astype(int)
    on = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    star_sat_ref = np.zeros(sx.size, bool)
    star_sat_ref[on] = sat[iy[on], ix[on]]

    mjd_night = 60000.0 + float(np.random.default_rng(np.random.SeedSequence([int(seed), 0x3D])).integers(0, 365)) + 0.1
    mjd_ref = mjd_night - 400.0
    maglim_ref = _limiting_mag(psf_ref, (sky_ref.level + p.dark_current * t + p.read_noise ** 2) / p.ref_ncombine, zp, t)
    h = ref_hdr.copy()
    h["BUNIT"] = "electron"
    h["INSTRUME"] = p.name
    h["FILTER"] = filt
    h["EXPTIME"] = (float(t), "s, of each combined exposure")
    h["NCOMBINE"] = int(p.ref_ncombine)
    h["MJD-OBS"] = mjd_ref
    h["DATE-OBS"] = mjd_to_isot(mjd_ref)
    h["CCDNUM"] = int(ccd)
    h["GAIN"] = (1.0, "image in e-")
    h["RDNOISE"] = (float(p.read_noise / math.sqrt(p.ref_ncombine)), "e-, effective")
    h["SATURATE"] = (float(p.full_well), "e-")
    h["MAGZP"] = (float(zp), "mag giving 1 e-/s")
    h["SEEING"] = (float(psf_ref.fwhm_arcsec((nx - 1) / 2, (ny - 1) / 2)), "true FWHM at centre, arcsec")
    h["FWHM"] = (float(psf_ref.fwhm((nx - 1) / 2, (ny - 1) / 2)), "true FWHM at centre, pixels")
    h["FWHMPIX"] = (float(psf_ref.fwhm_pixelized((nx - 1) / 2, (ny - 1) / 2)), "same, pixel-box convolved")
    h["SKYLEVEL"] = (float(sky_ref.level), "e- per pixel at the centre")
    h["MAGLIM"] = (maglim_ref, "ideal 5-sigma point-source limit")
    h["PIXSCALE"] = float(p.pixel_scale)
    h["SIMSEED"] = int(seed)
    reference = Exposure(image=img, variance=var.astype(np.float32), mask=mask, wcs=ref_wcs, header=h)
    return _Static(key=key, ref_hdr=ref_hdr, ref_wcs=ref_wcs, detector=detector, psf_ref=psf_ref,
                   sky_ref=sky_ref, sky=sky, star_flux_ref=star_flux_ref, star_sat_ref=star_sat_ref,
                   gal_flux_ref=gal_flux_ref, reference=reference, mag_sat=mag_sat,
                   maglim_typ=maglim_typ, maglim_ref=maglim_ref, mjd_night=mjd_night,
                   meta=dict(seeing_ref=see_ref, mjd_ref=mjd_ref))


# ----------------------------------------------------------------------------------------------
# the per-visit part
# ----------------------------------------------------------------------------------------------
def _inside(x, y, shape, edge=0.0):
    ny, nx = shape
    return (x >= -0.5 + edge) & (x <= nx - 0.5 - edge) & (y >= -0.5 + edge) & (y <= ny - 0.5 - edge)


def _far_from(x, y, ox, oy, radius):
    """Bool per (x, y): farther than radius[k] from every (ox[k], oy[k])."""
    ok = np.ones(x.size, bool)
    for s in range(0, ox.size, 2048):
        dx = x[:, None] - ox[None, s:s + 2048]
        dy = y[:, None] - oy[None, s:s + 2048]
        ok &= ~np.any(dx * dx + dy * dy < radius[None, s:s + 2048] ** 2, axis=1)
    return ok


def simulate_ccd_pair(
    profile: str | InstrumentProfile = "decam",
    *,
    shape: tuple[int, int] | None = None,
    seed: int = 0,
    visit: int = 0,
    ccd: int = 0,
    n_ccds: int | None = None,
    transients: bool = True,
    n_transients: int = 30,
    transient_fractions: tuple[float, float, float] = (0.5, 0.3, 0.2),
    mag_range: tuple[float, float] | None = None,
    artifacts: bool = True,
    seeing: float | None = None,
    ref_seeing: float | None = None,
    sky: float | None = None,
    geometry: Geometry | None = None,
    star_density: float = 1.0,
    galaxy_density: float = 2.0,
    n_saturated: int | None = None,
    psf_variation: bool = True,
    filter: str | None = None,
    n_calib: int = 3,
    edge: int = 16,
    _static: _Static | None = None,
    _return_static: bool = False,
) -> SimulatedCCD:
    """Simulate one CCD: a raw science frame, its calibration frames and a calibrated reference.

    Parameters
    ----------
    profile : str or InstrumentProfile
        ``"decam"``, ``"ztf"``, ``"lsst"`` (see :data:`PROFILES`) or a custom profile.
    shape : (ny, nx), optional
        CCD shape; default the profile's native shape.
    seed, visit, ccd : int
        Reproducibility: the static sky comes from ``(seed, ccd)``, the epoch from
        ``(seed, ccd, visit)``.
    n_ccds : int, optional
        CCDs in the focal plane (sets where CCD ``ccd`` sits on the sky); default the profile's.
    transients : bool
        ``False``: no transients and no variable stars (transient-free mode for false-positive
        statistics).
    n_transients : int
        Transients injected when ``transients`` is True.
    transient_fractions : (float, float, float)
        Shares of isolated, nuclear and variable-star transients (a kind without enough
        hosts/stars falls back to isolated).
    mag_range : (bright, faint), optional
        Magnitudes of the transients (of ``|flux|``); default ``(maglim - 5, maglim + 0.3)`` where
        ``maglim`` is this epoch's ideal 5-sigma limit, i.e. S/N from ~500 down to ~3.8.
    artifacts : bool
        ``False``: no cosmic rays, hot pixels, bad columns, and no star bright enough to saturate
        in seeing down to 0.6x the typical one.
    seeing, ref_seeing : float, optional
        FWHM at the CCD centre (arcsec) of the science epoch / the reference; default drawn
        (science: typical x lognormal(0.15) within [0.7, 1.8]; reference: typical x [0.75, 0.95]).
    sky : float, optional
        Science sky rate (e-/s/px); default typical x [0.8, 1.3].
    geometry : Geometry, optional
        Science-vs-reference offset/rotation/scale; default drawn (see :func:`draw_geometry`).
    star_density, galaxy_density : float
        Stars per arcmin^2 brighter than mag 20, galaxies per arcmin^2 brighter than mag 22.
    n_saturated : int, optional
        Extra stars 0.5-2.5 mag brighter than the typical saturation level, placed inside the CCD
        (only with ``artifacts``); default none beyond the natural counts.
    psf_variation : bool
        ``False``: each epoch's PSF is the same all over the CCD (no growth towards the corners, no
        ellipticity gradient); for subtraction tests that want one exact PSF per image.
    filter : str, optional
        Default the profile's first filter.
    n_calib : int
        Frames in each calibration stack.
    edge : int
        Transients keep this many pixels from the CCD edges.

    Returns
    -------
    SimulatedCCD
    """
    p = get_profile(profile)
    if shape is None:
        shape = (p.ny, p.nx)
    shape = (int(shape[0]), int(shape[1]))
    if shape[0] < 16 or shape[1] < 16:
        raise ConfigError(f"simulate: shape must be at least 16 x 16, got {shape}")
    if n_calib < 1:
        raise ConfigError(f"simulate: n_calib must be >= 1, got {n_calib}")
    if n_transients < 0:
        raise ConfigError(f"simulate: n_transients must be >= 0, got {n_transients}")
    if len(transient_fractions) != 3 or min(transient_fractions) < 0 or sum(transient_fractions) <= 0:
        raise ConfigError("simulate: transient_fractions must be three shares >= 0 (isolated, nuclear, variable)")
    n_ccds = int(n_ccds if n_ccds is not None else p.n_ccds)
    filt = filter or p.filters[0]
    edge = int(min(max(edge, 0), (min(shape) - 1) // 4))
    ny, nx = shape
    t = p.exptime

    st = _static
    key = _static_key(p, shape, seed, ccd, n_ccds, artifacts, star_density, galaxy_density,
                      n_saturated, ref_seeing, filt, psf_variation)
    if st is None or st.key != key:
        st = _build_static(p, shape, seed, ccd, n_ccds, artifacts, star_density, galaxy_density,
                           n_saturated, ref_seeing, filt, psf_variation)

    r_geom, r_psf, r_sky, r_tr, r_cr, r_noise, r_zp, _ = (
        np.random.default_rng(s)
        for s in np.random.SeedSequence([int(seed), int(ccd), int(visit), 2]).spawn(8))

    # -- geometry and WCS of the science epoch
    geom = geometry if geometry is not None else draw_geometry(r_geom)
    sci_hdr = science_wcs_header(st.ref_hdr, geom, shape)
    sci_wcs = WCS(sci_hdr)
    pixscale_sci = p.pixel_scale * geom.scale

    # -- PSF, sky, transparency
    see = float(seeing) if seeing is not None else p.seeing_fwhm * float(np.clip(r_psf.lognormal(0.0, 0.15), 0.7, 1.8))
    psf_sci = draw_psf_field(r_psf, shape, see / pixscale_sci, p.moffat_beta,
                             growth=p.psf_corner_growth, ellipticity=p.psf_ellipticity,
                             pixel_scale=pixscale_sci, vary=psf_variation)
    sky_rate = float(sky) if sky is not None else p.sky * float(r_sky.uniform(0.8, 1.3))
    sky_sci = SkyModel(level=sky_rate * t, gx=float(r_sky.uniform(-0.01, 0.01)),
                       gy=float(r_sky.uniform(-0.01, 0.01)), shape=shape)
    zp_sci = p.zero_point - abs(float(r_zp.normal(0.0, 0.03)))
    bkg = sky_sci.level + p.dark_current * t + p.read_noise ** 2
    maglim = _limiting_mag(psf_sci, bkg, zp_sci, t)

    # -- the static sky seen through this epoch
    S, G = st.sky.stars, st.sky.galaxies
    if S["ra"].size:
        sx, sy = (np.asarray(a) for a in sci_wcs.all_world2pix(S["ra"], S["dec"], 0))
    else:
        sx, sy = np.zeros(0), np.zeros(0)
    star_flux_static = mag_to_flux(S["mag"], zp_sci, t)
    star_flux_sci = star_flux_static.copy()
    if G["ra"].size:
        gx, gy = (np.asarray(a) for a in sci_wcs.all_world2pix(G["ra"], G["dec"], 0))
    else:
        gx, gy = np.zeros(0), np.zeros(0)
    g11, g12, g22 = transform_shape(G["g11"], G["g12"], G["g22"], geom.matrix)
    gal_flux = mag_to_flux(G["mag"], zp_sci, t)

    # -- transients
    tr = np.zeros(0, TRANSIENT_DTYPE)
    if transients and n_transients > 0:
        tr = _draw_transients(r_tr, n_transients, transient_fractions, mag_range, maglim, st, psf_sci,
                              sci_wcs, shape, edge, zp_sci, t, bkg, sx, sy, star_flux_static, gx, gy,
                              g11, g12, g22)
        var = tr["star"][tr["kind"] == "variable"]
        star_flux_sci[var] += tr["flux"][tr["kind"] == "variable"]

    # -- render the science scene (calibrated e-, before the flat)
    model = sky_sci.image()
    psf_sci.render(model, sx, sy, star_flux_sci)
    render_galaxies(model, psf_sci, gx, gy, gal_flux, g11, g12, g22, G["n"], G["bn"])
    pts = tr["kind"] != "variable"
    psf_sci.render(model, tr["x"][pts], tr["y"][pts], tr["flux"][pts])

    crs = make_cosmic_rays(shape, t, p.cosmic_rate, r_cr) if artifacts else np.zeros(0, COSMIC_RAY_DTYPE)
    raw, saturated = st.detector.read_out(model, t, r_noise, cosmic_rays=crs)
    del model

    # -- truth flags
    bad = st.detector.bad_pixel_mask() | saturated
    if crs.size:
        bad[crs["y"], crs["x"]] = True
    if tr.size:
        ix, iy = np.floor(tr["x"] + 0.5).astype(int), np.floor(tr["y"] + 0.5).astype(int)
        for k in range(tr.size):
            tr["masked"][k] = bool(bad[max(iy[k] - 2, 0): iy[k] + 3, max(ix[k] - 2, 0): ix[k] + 3].any())

    stars = np.zeros(sx.size, STAR_DTYPE)
    stars["id"] = np.arange(sx.size)
    stars["ra"], stars["dec"] = S["ra"], S["dec"]
    stars["x"], stars["y"] = sx, sy
    stars["x_ref"], stars["y_ref"] = S["x_ref"], S["y_ref"]
    stars["mag"] = S["mag"]
    stars["flux_sci"] = star_flux_sci
    stars["flux_ref"] = st.star_flux_ref
    stars["in_sci"] = _inside(sx, sy, shape)
    stars["in_ref"] = _inside(S["x_ref"], S["y_ref"], shape)
    ixs, iys = np.floor(sx + 0.5).astype(int), np.floor(sy + 0.5).astype(int)
    on = stars["in_sci"] & (ixs >= 0) & (ixs < nx) & (iys >= 0) & (iys < ny)
    stars["saturated_sci"][on] = saturated[iys[on], ixs[on]]
    stars["saturated_ref"] = st.star_sat_ref
    if tr.size:
        stars["variable"][tr["star"][tr["kind"] == "variable"]] = True

    galaxies = np.zeros(gx.size, GALAXY_DTYPE)
    galaxies["id"] = np.arange(gx.size)
    galaxies["ra"], galaxies["dec"] = G["ra"], G["dec"]
    galaxies["x"], galaxies["y"] = gx, gy
    galaxies["x_ref"], galaxies["y_ref"] = G["x_ref"], G["y_ref"]
    galaxies["mag"] = G["mag"]
    galaxies["flux"] = gal_flux
    galaxies["flux_ref"] = st.gal_flux_ref
    re, q, ang = shape_params(g11, g12, g22)
    galaxies["r_eff"], galaxies["axis_ratio"], galaxies["angle"] = re, q, ang
    galaxies["sersic_n"] = G["n"]
    galaxies["in_sci"] = _inside(gx, gy, shape)
    galaxies["in_ref"] = _inside(G["x_ref"], G["y_ref"], shape)

    # -- header
    mjd = st.mjd_night + 0.02 * int(visit)
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    h = sci_hdr.copy()
    h["BUNIT"] = "adu"
    h["INSTRUME"] = p.name
    h["FILTER"] = filt
    h["EXPTIME"] = (float(t), "s")
    h["MJD-OBS"] = mjd
    h["DATE-OBS"] = mjd_to_isot(mjd)
    h["CCDNUM"] = int(ccd)
    h["VISIT"] = int(visit)
    h["GAIN"] = (float(p.gain), "e-/ADU")
    h["RDNOISE"] = (float(p.read_noise), "e-")
    h["SATURATE"] = (float(p.saturation), "ADU")
    h["BIASLEV"] = (float(p.bias_level), "ADU")
    h["DARKCUR"] = (float(p.dark_current), "e-/s")
    h["MAGZP"] = (float(zp_sci), "mag giving 1 e-/s")
    h["SEEING"] = (float(psf_sci.fwhm_arcsec(xc, yc)), "true FWHM at centre, arcsec")
    h["FWHM"] = (float(psf_sci.fwhm(xc, yc)), "true FWHM at centre, pixels")
    h["FWHMPIX"] = (float(psf_sci.fwhm_pixelized(xc, yc)), "same, pixel-box convolved")
    h["SKYLEVEL"] = (float(sky_sci.level), "e- per pixel at the centre")
    h["MAGLIM"] = (float(maglim), "ideal 5-sigma point-source limit")
    h["PIXSCALE"] = float(pixscale_sci)
    h["SIMSEED"] = int(seed)

    arts: dict[str, Any] = dict(cosmic_rays=crs, hot_pixels=st.detector.hot_pixels,
                                bad_columns=st.detector.bad_columns, saturated=saturated)
    meta = dict(seed=int(seed), visit=int(visit), ccd=int(ccd), n_ccds=n_ccds, filter=filt,
                seeing_sci=float(psf_sci.fwhm_arcsec(xc, yc)),
                seeing_ref=float(st.psf_ref.fwhm_arcsec(xc, yc)),
                zp_sci=float(zp_sci), zp_ref=float(p.zero_point), maglim_sci=float(maglim),
                maglim_ref=float(st.maglim_ref), mag_sat=float(st.mag_sat), mjd_sci=float(mjd),
                mjd_ref=float(st.meta["mjd_ref"]), n_calib=int(n_calib))
    out = SimulatedCCD(science_raw=RawFrame(data=raw, header=h), reference=st.reference,
                       transients=tr, stars=stars, galaxies=galaxies, artifacts=arts,
                       psf_sci=psf_sci, psf_ref=st.psf_ref, detector=st.detector, sky_sci=sky_sci,
                       sky_ref=st.sky_ref, geometry=geom, profile=p, meta=meta)
    if _return_static:
        return out, st  # type: ignore[return-value]
    return out


def _draw_transients(rng, n, fractions, mag_range, maglim, st: _Static, psf: PSFField, wcs: WCS,
                     shape, edge, zp, t, bkg, sx, sy, star_flux, gx, gy, g11, g12, g22):
    ny, nx = shape
    fr = np.asarray(fractions, float)
    n_iso, n_nuc, n_var = rng.multinomial(n, fr / fr.sum())
    lo, hi = mag_range if mag_range is not None else (maglim - 5.0, maglim + 0.3)
    fw_c = psf.fwhm0
    mag = rng.uniform(lo, hi, n)
    absflux = mag_to_flux(mag, zp, t)
    gmag = st.sky.galaxies["mag"]
    smag = st.sky.stars["mag"]

    # nuclear: bright-enough galaxies inside the CCD
    cand = np.flatnonzero(_inside(gx, gy, shape, edge) & (gmag < maglim - 0.5))
    hosts = rng.choice(cand, size=min(n_nuc, cand.size), replace=False) if cand.size else np.zeros(0, int)
    # variable: unsaturated stars well above the limit
    cand = np.flatnonzero(_inside(sx, sy, shape, edge) & (smag > st.mag_sat + 1.0)
                          & (smag < maglim - 1.0) & ~st.star_sat_ref)
    vstars = rng.choice(cand, size=min(n_var, cand.size), replace=False) if cand.size else np.zeros(0, int)
    n_iso = n - hosts.size - vstars.size

    # isolated: away from stars, galaxies and each other
    bright = smag < maglim - 1.0
    rad_s = np.where(smag < st.mag_sat, 12.0, 3.0) * fw_c
    re, _, _ = shape_params(g11, g12, g22)
    gsel = gmag < maglim - 0.5
    ox = np.r_[sx[bright], gx[gsel]]
    oy = np.r_[sy[bright], gy[gsel]]
    orad = np.r_[rad_s[bright], 2.0 * re[gsel] + 2.0 * fw_c]
    xs, ys = np.zeros(0), np.zeros(0)
    for _ in range(10):
        if xs.size >= n_iso:
            break
        m = 20 * max(n_iso, 1)
        cx = rng.uniform(edge, nx - 1 - edge, m)
        cy = rng.uniform(edge, ny - 1 - edge, m)
        ok = _far_from(cx, cy, ox, oy, orad)
        cx, cy = cx[ok], cy[ok]
        keep = []
        for k in range(cx.size):  # mutual spacing 4 FWHM
            px = np.r_[xs, cx[keep]]
            py = np.r_[ys, cy[keep]]
            if np.all((px - cx[k]) ** 2 + (py - cy[k]) ** 2 > (4 * fw_c) ** 2):
                keep.append(k)
            if xs.size + len(keep) >= n_iso:
                break
        xs, ys = np.r_[xs, cx[keep]], np.r_[ys, cy[keep]]
    if xs.size < n_iso:  # crowded: accept anywhere
        k = n_iso - xs.size
        xs = np.r_[xs, rng.uniform(edge, nx - 1 - edge, k)]
        ys = np.r_[ys, rng.uniform(edge, ny - 1 - edge, k)]

    tr = np.zeros(n, TRANSIENT_DTYPE)
    tr["id"] = np.arange(n)
    tr["host"] = -1
    tr["star"] = -1
    a, b = n_iso, n_iso + hosts.size
    tr["kind"][:a] = "isolated"
    tr["x"][:a], tr["y"][:a] = xs[:n_iso], ys[:n_iso]
    tr["flux"][:a] = absflux[:a]
    tr["kind"][a:b] = "nuclear"
    tr["x"][a:b], tr["y"][a:b] = gx[hosts], gy[hosts]
    tr["host"][a:b] = hosts
    tr["flux"][a:b] = absflux[a:b]
    tr["kind"][b:] = "variable"
    tr["x"][b:], tr["y"][b:] = sx[vstars], sy[vstars]
    tr["star"][b:] = vstars
    fade = rng.uniform(size=vstars.size) < 0.5
    dflux = np.where(fade, -np.minimum(absflux[b:], 0.9 * star_flux[vstars]), absflux[b:])
    tr["flux"][b:] = dflux
    tr["mag"] = flux_to_mag(tr["flux"], zp, t)
    ra, dec = wcs.all_pix2world(tr["x"], tr["y"], 0)
    tr["ra"], tr["dec"] = ra, dec
    xr, yr = st.ref_wcs.all_world2pix(ra, dec, 0)
    tr["x_ref"], tr["y_ref"] = xr, yr
    tr["fwhm"] = psf.fwhm(tr["x"], tr["y"])
    nea = psf.noise_equivalent_area(tr["x"], tr["y"]) if n else np.zeros(0)
    src = np.abs(tr["flux"]).copy()
    var_sel = tr["kind"] == "variable"
    src[var_sel] = star_flux[tr["star"][var_sel]] + tr["flux"][var_sel]
    tr["snr"] = np.abs(tr["flux"]) / np.sqrt(nea * bkg + np.maximum(src, 0))
    return tr
