"""Instrument profiles of the simulator.

A profile holds what a detector and a site look like to the pipeline: pixel scale, CCD shape and
count, gain, read noise, dark current, bias, saturation, typical seeing and Moffat beta, sky, zero
point, exposure time. The three built-in profiles (``"decam"``, ``"ztf"``, ``"lsst"``) differ enough
(pixel scale 0.2-1.0 arcsec, FWHM 2-4 px, gain 1.7-6.2 e-/ADU, depth 21.5-24.5 mag) that a model
trained on one can be tested for domain shift on another.

The numbers are representative, not calibrated: the zero points follow from effective collecting area
(``flux_e = 10**(-0.4 * (mag - zero_point)) * exptime``) and the sky from a dark-ish r-band sky
(about 21 mag/arcsec^2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class InstrumentProfile:
    """What one camera and its site look like.

    Attributes
    ----------
    name : str
        Profile name, written to ``INSTRUME``.
    pixel_scale : float
        arcsec per pixel.
    ny, nx : int
        Native CCD shape (rows, columns).
    n_ccds : int
        CCDs in the focal plane.
    gain : float
        e- per ADU.
    read_noise : float
        e- RMS per pixel per read.
    dark_current : float
        e-/s/px of a normal pixel.
    bias_level : float
        ADU, mean bias level.
    saturation : float
        ADU, the level at which raw pixels clip (``SATURATE``, bias included). The full well in e-
        is ``(saturation - bias_level) * gain``.
    seeing_fwhm : float
        arcsec, typical FWHM; the seeing of each epoch is drawn around it.
    moffat_beta : float
        Moffat beta of the PSF (smaller = broader wings).
    sky : float
        e-/s/px, typical sky rate; each epoch draws its own around it.
    zero_point : float
        mag that gives 1 e-/s (photometric night).
    exptime : float
        s, exposure time of one science frame (and of each frame of the reference coadd).
    filters : tuple of str
        Filter names; the first is the default.
    ref_ncombine : int
        Exposures averaged into the archival reference (its noise is ``1/sqrt(ref_ncombine)`` of
        one exposure).
    hot_pixel_fraction : float
        Fraction of pixels that are hot (dark current 20-2000 e-/s).
    bad_columns_per_1000 : float
        Mean number of low-response columns per 1000 columns.
    cosmic_rate : float
        Cosmic-ray events per megapixel per 100 s of exposure.
    prnu : float
        Pixel response non-uniformity (RMS of the flat, fraction).
    vignetting : float
        Flat response drop at the CCD corners (fraction).
    psf_corner_growth : float
        Typical fractional FWHM increase from CCD centre to corner (each epoch draws around it).
    psf_ellipticity : float
        Typical PSF ellipticity ``1 - b/a`` (each epoch draws its pattern around it).
    """

    name: str
    pixel_scale: float
    ny: int
    nx: int
    n_ccds: int
    gain: float
    read_noise: float
    dark_current: float
    bias_level: float
    saturation: float
    seeing_fwhm: float
    moffat_beta: float
    sky: float
    zero_point: float
    exptime: float
    filters: tuple[str, ...]
    ref_ncombine: int = 4
    hot_pixel_fraction: float = 1e-4
    bad_columns_per_1000: float = 1.0
    cosmic_rate: float = 3.0
    prnu: float = 0.01
    vignetting: float = 0.03
    psf_corner_growth: float = 0.10
    psf_ellipticity: float = 0.04

    @property
    def full_well(self) -> float:
        """Full well in e-: ``(saturation - bias_level) * gain``."""
        return (self.saturation - self.bias_level) * self.gain

    @property
    def seeing_px(self) -> float:
        """Typical seeing FWHM in pixels."""
        return self.seeing_fwhm / self.pixel_scale

    def replace(self, **changes) -> "InstrumentProfile":
        """A copy with some fields changed (``PROFILES["decam"].replace(read_noise=3.0)``)."""
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, InstrumentProfile] = {
    # Dark Energy Camera (Blanco 4 m): 2k x 4k deep-depletion CCDs, 0.263"/px, r band, 90 s.
    "decam": InstrumentProfile(
        name="decam", pixel_scale=0.263, ny=4096, nx=2048, n_ccds=62, gain=4.0, read_noise=7.0,
        dark_current=0.002, bias_level=1500.0, saturation=38000.0, seeing_fwhm=1.0, moffat_beta=3.0,
        sky=15.8, zero_point=26.9, exptime=90.0, filters=("r", "g", "i", "z", "Y"), ref_ncombine=4,
        cosmic_rate=5.0,
    ),
    # Zwicky Transient Facility (Palomar 48" Schmidt): 6k x 6k CCDs, 1.01"/px, undersampled PSF, 30 s.
    "ztf": InstrumentProfile(
        name="ztf", pixel_scale=1.012, ny=6144, nx=6160, n_ccds=16, gain=6.2, read_noise=8.0,
        dark_current=0.05, bias_level=300.0, saturation=20000.0, seeing_fwhm=2.0, moffat_beta=2.5,
        sky=34.0, zero_point=24.6, exptime=30.0, filters=("r", "g", "i"), ref_ncombine=15,
        cosmic_rate=2.0, prnu=0.015, vignetting=0.05, psf_corner_growth=0.14, psf_ellipticity=0.06,
    ),
    # Rubin Observatory LSSTCam: 4k x 4k CCDs, 0.2"/px, low gain, 30 s visits.
    "lsst": InstrumentProfile(
        name="lsst", pixel_scale=0.2, ny=4096, nx=4096, n_ccds=189, gain=1.7, read_noise=6.0,
        dark_current=0.02, bias_level=20000.0, saturation=65000.0, seeing_fwhm=0.7, moffat_beta=3.5,
        sky=29.0, zero_point=28.36, exptime=30.0, filters=("r", "g", "i", "z", "y", "u"),
        ref_ncombine=8, cosmic_rate=3.0, prnu=0.008, vignetting=0.02, psf_corner_growth=0.08,
        psf_ellipticity=0.03,
    ),
}


def get_profile(profile: str | InstrumentProfile) -> InstrumentProfile:
    """Return the :class:`InstrumentProfile` named ``profile`` (or ``profile`` itself).

    Raises
    ------
    ConfigError
        If the name is not one of :data:`PROFILES`.
    """
    if isinstance(profile, InstrumentProfile):
        return profile
    try:
        return PROFILES[str(profile).lower()]
    except KeyError:
        raise ConfigError(
            f"simulate: unknown instrument profile {profile!r}; known: {sorted(PROFILES)} "
            "(or pass an InstrumentProfile)"
        ) from None
