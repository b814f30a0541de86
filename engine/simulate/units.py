"""Conversions of the simulator: magnitudes <-> e-, the ideal limiting magnitude, MJD -> ISO time."""
from __future__ import annotations

import datetime as _dt
import math

import numpy as np

from .psf import PSFField

__all__ = ["flux_to_mag", "limiting_mag", "mag_to_flux", "mjd_to_isot", "moffat_peak_fraction"]


def mjd_to_isot(mjd: float) -> str:
    """ISO-8601 UTC string of an MJD (no leap-second table involved)."""
    t = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=float(mjd))
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def mag_to_flux(mag, zp: float, exptime: float):
    """Total e- of a source of ``mag``: ``10**(-0.4 (mag - zp)) * exptime``."""
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - zp)) * exptime


def flux_to_mag(flux, zp: float, exptime: float):
    """Magnitude of ``|flux|`` e-."""
    return zp - 2.5 * np.log10(np.abs(np.asarray(flux, float)) / exptime)


def moffat_peak_fraction(fwhm_px: float, beta: float) -> float:
    """Peak value (per pixel^2) of a unit-flux continuous Moffat of this FWHM (pixels) and beta."""
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (beta - 1.0) / (math.pi * alpha * alpha)


def limiting_mag(psf: PSFField, bkg_var: float, zp: float, exptime: float, nsigma=5.0) -> float:
    """Ideal ``nsigma`` point-source limit at the CCD centre: PSF-fit S/N from the PSF's noise
    equivalent area over a background of variance ``bkg_var`` (e^2 per pixel) plus the source's
    own Poisson noise."""
    ny, nx = psf.shape
    nea = float(psf.noise_equivalent_area(np.array([(nx - 1) / 2]), np.array([(ny - 1) / 2]))[0])
    s2 = nsigma * nsigma
    f = 0.5 * (s2 + math.sqrt(s2 * s2 + 4.0 * s2 * nea * bkg_var))
    return float(flux_to_mag(f, zp, exptime))
