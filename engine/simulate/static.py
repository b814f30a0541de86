"""The static part of a simulated CCD: what every visit of it shares, seeded by ``(seed, ccd)``.

:func:`simulate_static` builds it: the reference WCS, the detector (bias, flat, hot pixels, bad
columns), the stars and galaxies, and the archival reference exposure with its PSF and sky.
:func:`~nightsift.engine.simulate.simulate_ccd_pair` builds one per call unless it is handed one
(``static=``); a caller simulating many visits of a CCD builds it once and passes it each time
(as :func:`~nightsift.engine.simulate.simulate_night` does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..records import Exposure, MaskBits
from . import _render
from .detector import DetectorModel, make_detector
from .instruments import InstrumentProfile, get_profile
from .options import SimulationOptions, as_options
from .psf import PSFField, draw_psf_field
from .scene import (
    SkyModel, StaticSky, ccd_centre, draw_static_sky, field_centre, reference_cd, render_galaxies,
    wcs_header,
)
from .units import flux_to_mag, limiting_mag, mag_to_flux, mjd_to_isot, moffat_peak_fraction

__all__ = ["StaticScene", "simulate_static"]


@dataclass(frozen=True)
class StaticScene:
    """The part of one simulated CCD that is the same on every visit.

    Attributes
    ----------
    key : tuple
        The profile and the options it was built from (see :meth:`matches`).
    ref_hdr : astropy.io.fits.Header
        Reference TAN WCS (CD matrix, CRPIX at the CCD centre); ``ref_wcs`` the same as a WCS.
    detector : DetectorModel
    psf_ref : PSFField
    sky_ref : SkyModel
    sky : StaticSky
        Stars and galaxies in reference pixels.
    star_flux_ref, gal_flux_ref : ndarray float64
        e- of each star / galaxy in the reference image.
    star_sat_ref : ndarray bool
        The star's peak pixel is flagged SAT in the reference.
    reference : Exposure
        The archival reference (see :class:`~nightsift.engine.simulate.SimulatedCCD`).
    mag_sat : float
        Typical saturation magnitude (typical seeing, typical sky).
    maglim_typ, maglim_ref : float
        Ideal 5-sigma limits of a typical epoch and of the reference.
    mjd_night : float
        MJD of the night; visit ``v`` starts at ``mjd_night + 0.02 v``.
    meta : dict
        ``seeing_ref`` (arcsec, centre), ``mjd_ref``.
    """

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

    def matches(self, profile: str | InstrumentProfile, options: SimulationOptions) -> bool:
        """Whether this is the static part of the CCD that ``profile`` and ``options`` simulate."""
        p = get_profile(profile)
        return self.key == _static_key(p, options.resolved(p))


def _static_key(p: InstrumentProfile, o: SimulationOptions) -> tuple:
    """What the static part depends on: the profile and the options that are not per visit
    (``o`` resolved, see :meth:`SimulationOptions.resolved`)."""
    return (p, tuple(o.shape), int(o.seed), int(o.ccd), int(o.n_ccds), bool(o.artifacts),
            float(o.star_density), float(o.galaxy_density), o.n_saturated, o.ref_seeing, o.filter,
            bool(o.psf_variation))


def simulate_static(profile: str | InstrumentProfile = "decam", options: SimulationOptions | None = None,
                    **overrides) -> StaticScene:
    """The static part of the CCD that ``simulate_ccd_pair(profile, options, **overrides)``
    simulates; ``visit`` and the per-visit options play no part.

    Parameters
    ----------
    profile : str or InstrumentProfile
    options : SimulationOptions, optional
    **overrides
        Fields of :class:`SimulationOptions` (``shape=``, ``seed=``, ``ccd=``, ...).
    """
    p = get_profile(profile)
    return _build_static(p, as_options(options, overrides).resolved(p))


def _build_static(p: InstrumentProfile, o: SimulationOptions) -> StaticScene:
    """:func:`simulate_static` for a profile and resolved options (:meth:`SimulationOptions.resolved`)."""
    ny, nx = o.shape
    r_wcs, r_stars, r_gals, r_det, r_psf, r_sky, r_noise, _ = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(o.seed), int(o.ccd), 1]).spawn(8))
    t = p.exptime

    # reference WCS: TAN, CRPIX at the CCD centre, a small position angle
    ra0, dec0 = field_centre(o.seed)
    crval = ccd_centre(ra0, dec0, o.ccd, o.n_ccds, o.shape, p.pixel_scale)
    pa = float(r_wcs.uniform(-0.5, 0.5))
    ref_hdr = wcs_header(crval, ((nx - 1) / 2.0, (ny - 1) / 2.0), reference_cd(p.pixel_scale, pa))
    ref_wcs = WCS(ref_hdr)

    detector = make_detector(p, o.shape, r_det, defects=o.artifacts)

    # reference PSF (a good-seeing coadd) and sky
    see_ref = float(o.ref_seeing) if o.ref_seeing is not None else p.seeing_fwhm * float(r_psf.uniform(0.75, 0.95))
    psf_ref = draw_psf_field(r_psf, o.shape, see_ref / p.pixel_scale, p.moffat_beta,
                             growth=p.psf_corner_growth, ellipticity=p.psf_ellipticity,
                             pixel_scale=p.pixel_scale, vary=o.psf_variation)
    sky_ref = SkyModel(level=float(p.sky * r_sky.uniform(0.85, 1.1) * t),
                       gx=float(r_sky.uniform(-0.01, 0.01)), gy=float(r_sky.uniform(-0.01, 0.01)),
                       shape=(ny, nx))

    mag_sat, maglim_typ, sky = _draw_sky(p, o, r_stars, r_gals, ref_wcs)
    star_flux_ref = mag_to_flux(sky.stars["mag"], p.zero_point, t)
    gal_flux_ref = mag_to_flux(sky.galaxies["mag"], p.zero_point, t)
    image, var, sat = _reference_pixels(p, o.shape, sky, psf_ref, sky_ref, star_flux_ref, gal_flux_ref, r_noise)
    mask = np.where(sat, np.uint16(MaskBits.SAT), np.uint16(0)).astype(np.uint16)
    sx, sy = sky.stars["x_ref"], sky.stars["y_ref"]
    ix, iy = np.floor(sx + 0.5).astype(int), np.floor(sy + 0.5).astype(int)
    on = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    star_sat_ref = np.zeros(sx.size, bool)
    star_sat_ref[on] = sat[iy[on], ix[on]]

    night = np.random.default_rng(np.random.SeedSequence([int(o.seed), 0x3D])).integers(0, 365)
    mjd_night = 60000.0 + float(night) + 0.1
    mjd_ref = mjd_night - 400.0
    maglim_ref = limiting_mag(psf_ref, (sky_ref.level + p.dark_current * t + p.read_noise ** 2) / p.ref_ncombine,
                              p.zero_point, t)
    h = _reference_header(p, o, ref_hdr, psf_ref, sky_ref, mjd_ref, maglim_ref)
    reference = Exposure(image=image, variance=var.astype(np.float32), mask=mask, wcs=ref_wcs, header=h)
    return StaticScene(key=_static_key(p, o), ref_hdr=ref_hdr, ref_wcs=ref_wcs, detector=detector, psf_ref=psf_ref,
                       sky_ref=sky_ref, sky=sky, star_flux_ref=star_flux_ref, star_sat_ref=star_sat_ref,
                       gal_flux_ref=gal_flux_ref, reference=reference, mag_sat=mag_sat,
                       maglim_typ=maglim_typ, maglim_ref=maglim_ref, mjd_night=mjd_night,
                       meta=dict(seeing_ref=see_ref, mjd_ref=mjd_ref))


def _draw_sky(p: InstrumentProfile, o: SimulationOptions, r_stars, r_gals, ref_wcs: WCS):
    """``(mag_sat, maglim_typ, StaticSky)``: the stars and galaxies, their magnitude ranges set by
    a typical epoch (from just saturated, or from safely unsaturated without ``artifacts``, down to
    1 mag below the typical limit)."""
    t, zp = p.exptime, p.zero_point
    typ_psf = PSFField(shape=o.shape, fwhm0=p.seeing_px, beta=p.moffat_beta)
    bkg_typ = p.sky * t + p.dark_current * t + p.read_noise ** 2
    maglim_typ = limiting_mag(typ_psf, bkg_typ, zp, t)
    fw_room = max(p.full_well - 1.5 * p.sky * t, 1.0)
    mag_sat = float(flux_to_mag(fw_room / moffat_peak_fraction(p.seeing_px, p.moffat_beta), zp, t))
    if o.artifacts:
        star_mags = (mag_sat - 2.5, maglim_typ + 1.0)
        n_sat = int(o.n_saturated or 0)
    else:
        # nothing may saturate, even in 0.6x typical seeing
        safe = 0.5 * fw_room / moffat_peak_fraction(0.6 * p.seeing_px, p.moffat_beta)
        star_mags = (float(flux_to_mag(safe, zp, t)), maglim_typ + 1.0)
        n_sat = 0
    gal_bright = max(17.0, star_mags[0])
    gal_mags = (gal_bright, max(maglim_typ - 0.5, gal_bright + 0.5))
    margin = 30.0 + 8.0 * p.seeing_px
    sky = draw_static_sky(r_stars, r_gals, ref_wcs, o.shape, p.pixel_scale, margin=margin,
                          star_density=o.star_density, star_mags=star_mags,
                          galaxy_density=o.galaxy_density, galaxy_mags=gal_mags, n_saturated=n_sat,
                          saturated_mags=(mag_sat - 2.5, mag_sat - 0.5))
    return mag_sat, maglim_typ, sky


def _reference_pixels(p: InstrumentProfile, shape, sky: StaticSky, psf_ref: PSFField, sky_ref: SkyModel,
                      star_flux_ref, gal_flux_ref, r_noise):
    """``(image float32, variance float64, saturated bool)`` of the reference: the mean of
    ``ref_ncombine`` exposures, noise drawn from the noiseless model, bleed trails included."""
    t = p.exptime
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
    return img, var, sat


def _reference_header(p: InstrumentProfile, o: SimulationOptions, ref_hdr: fits.Header, psf_ref: PSFField,
                      sky_ref: SkyModel, mjd_ref: float, maglim_ref: float) -> fits.Header:
    ny, nx = o.shape
    xc, yc = (nx - 1) / 2, (ny - 1) / 2
    h = ref_hdr.copy()
    h["BUNIT"] = "electron"
    h["INSTRUME"] = p.name
    h["FILTER"] = o.filter
    h["EXPTIME"] = (float(p.exptime), "s, of each combined exposure")
    h["NCOMBINE"] = int(p.ref_ncombine)
    h["MJD-OBS"] = mjd_ref
    h["DATE-OBS"] = mjd_to_isot(mjd_ref)
    h["CCDNUM"] = int(o.ccd)
    h["GAIN"] = (1.0, "image in e-")
    h["RDNOISE"] = (float(p.read_noise / math.sqrt(p.ref_ncombine)), "e-, effective")
    h["SATURATE"] = (float(p.full_well), "e-")
    h["MAGZP"] = (float(p.zero_point), "mag giving 1 e-/s")
    h["SEEING"] = (float(psf_ref.fwhm_arcsec(xc, yc)), "true FWHM at centre, arcsec")
    h["FWHM"] = (float(psf_ref.fwhm(xc, yc)), "true FWHM at centre, pixels")
    h["FWHMPIX"] = (float(psf_ref.fwhm_pixelized(xc, yc)), "same, pixel-box convolved")
    h["SKYLEVEL"] = (float(sky_ref.level), "e- per pixel at the centre")
    h["MAGLIM"] = (maglim_ref, "ideal 5-sigma point-source limit")
    h["PIXSCALE"] = float(p.pixel_scale)
    h["SIMSEED"] = int(o.seed)
    return h
