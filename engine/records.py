"""Typed records that travel between the stages of the chain.

Conventions everywhere: images are ``(ny, nx)`` numpy (or cupy) arrays, 0-based pixel coordinates
with ``x`` the column and ``y`` the row (so a source at ``(x, y)`` sits in ``image[round(y), round(x)]``);
calibrated images are in electrons (e-), variances in e-^2.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS


class MaskBits(enum.IntFlag):
    """Bit flags of the ``uint16`` pixel masks."""

    BAD = 1  #: bad pixel from the calibration frames (hot pixel, dead/low-response column)
    SAT = 2  #: saturated or bleed trail
    NO_DATA = 4  #: no data (outside the reference footprint after alignment, NaN input)
    CR = 8  #: cosmic ray (when a detector flags it)
    EDGE = 16  #: within a PSF stamp of the CCD edge

    @classmethod
    def describe(cls, value: int) -> list[str]:
        return [b.name for b in cls if value & b]


#: mask bits that make a pixel unusable for subtraction
UNUSABLE = int(MaskBits.BAD | MaskBits.SAT | MaskBits.NO_DATA)


@dataclass(frozen=True)
class RawFrame:
    """A raw CCD frame as read from disk.

    Attributes
    ----------
    data : ndarray (ny, nx) float32, ADU
    header : astropy.io.fits.Header
        Must carry a celestial WCS, ``GAIN`` (e-/ADU), ``SATURATE`` (ADU), ``EXPTIME`` (s).
    path : str or None
        Where it was read from, for error messages.
    """

    data: np.ndarray
    header: fits.Header
    path: str | None = None


@dataclass(frozen=True)
class CalibrationFrames:
    """Raw calibration frames of one CCD, stacks of shape ``(n, ny, nx)`` in ADU.

    ``dark_exptime`` is the exposure time of the dark frames (s); flats are raw dome/twilight
    flats (bias included).
    """

    bias: np.ndarray
    dark: np.ndarray
    flat: np.ndarray
    dark_exptime: float


@dataclass(frozen=True)
class Exposure:
    """A calibrated image with its uncertainty and mask.

    Attributes
    ----------
    image : ndarray (ny, nx) float32, e-
        Calibrated image, background *not* subtracted.
    variance : ndarray (ny, nx) float32, e-^2
        Per-pixel variance of ``image`` (Poisson + read + dark), in the white-noise sense
        (resampling propagates it with the interpolation weights, not their squares).
    mask : ndarray (ny, nx) uint16
        :class:`MaskBits` flags.
    wcs : astropy.wcs.WCS
        Celestial WCS of ``image`` (pixel origin 0 when used through ``*_world2pix(..., 0)``).
    header : astropy.io.fits.Header
        Metadata (EXPTIME, FILTER, MJD-OBS, CCDNUM, GAIN, ...).
    path : str or None
        Source file, for error messages.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS
    header: fits.Header
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: its typed ``value`` plus a flat dict of QA numbers."""

    value: Any
    qa: dict[str, float | int | str] = field(default_factory=dict)


#: The candidate table returned by the detection stage (one row per candidate), as a numpy
#: structured array. Field names follow the ZTF candidate schema where one exists.
CANDIDATE_DTYPE = np.dtype(
    [
        ("candid", "i8"),  # unique id: (visit, ccd, index) packed, see engine.stages.detect
        ("xpos", "f8"),  # x of the candidate on the science grid (0-based column, pixels)
        ("ypos", "f8"),  # y (0-based row, pixels)
        ("ra", "f8"),  # right ascension (deg, ICRS)
        ("dec", "f8"),  # declination (deg)
        ("flux", "f8"),  # PSF-fit flux in the difference, science units (e-); negative if isdiffpos=False
        ("fluxerr", "f8"),  # 1-sigma error of flux (e-), source noise included
        ("magpsf", "f8"),  # -2.5 log10(|flux| / EXPTIME) + zero point (mag)
        ("sigmapsf", "f8"),  # 1.0857 fluxerr / |flux| (mag)
        ("snr", "f8"),  # |flux| / fluxerr
        ("scorr", "f8"),  # peak value of S_corr (signed, sigma)
        ("fwhm", "f8"),  # FWHM of the candidate in the difference image (pixels)
        ("elong", "f8"),  # a/b of the candidate's second moments in the difference (>= 1)
        ("nbad", "i4"),  # bad/saturated/no-data pixels in the 5x5 box around the candidate
        ("isdiffpos", "?"),  # True: science brighter than reference (positive in D)
        ("distnr", "f8"),  # distance to the nearest reference-image source (pixels); -999 if none
        ("magnr", "f8"),  # magnitude of that reference source (mag); -999 if none
        ("sky", "f8"),  # local background of the science image (e-)
        ("edge", "?"),  # True if any cutout is padded because it crosses the CCD edge
    ]
)


#: header keys of the photometric zero point (mag giving 1 e-/s), in order of preference
ZERO_POINT_KEYS = ("MAGZP", "MAGZPT", "MAGZERO")

#: candid = (visit * CANDID_CCD + ccd) * CANDID_INDEX + index: unique per (visit, ccd, candidate) and
#: deterministic, so a rerun of a CCD-visit reproduces its alert ids
CANDID_CCD = 1000
CANDID_INDEX = 100000
#: largest visit number that keeps candid within int64
MAX_VISIT = (np.iinfo(np.int64).max // CANDID_INDEX - CANDID_CCD) // CANDID_CCD


def make_candid(visit: int, ccd: int, index) -> np.ndarray:
    """Candidate ids (int64) from the visit, the CCD (< 1000) and the row numbers (< 100000)."""
    return (np.int64(visit) * CANDID_CCD + np.int64(ccd)) * CANDID_INDEX + np.asarray(index, dtype=np.int64)


def difference_sign(candidates: np.ndarray) -> np.ndarray:
    """+1 for positive candidates, -1 for negative ones (float32, shape (n,)).

    The ZTF convention for the difference cutout, which nightsift's alerts and classifier follow
    (and braai was trained on): a negative candidate's difference cutout is reference minus
    science, so a real candidate's centre is positive whatever its sign; ``isdiffpos`` carries
    the sign. Pass it as ``extract_triplets(..., difference_sign=difference_sign(cands))``.
    """
    return np.where(np.asarray(candidates["isdiffpos"], bool), 1.0, -1.0).astype(np.float32)


def empty_candidates(n: int = 0) -> np.ndarray:
    """A candidate table of ``n`` zeroed rows (``n=0`` is the valid 'no detections' result)."""
    return np.zeros(n, dtype=CANDIDATE_DTYPE)
