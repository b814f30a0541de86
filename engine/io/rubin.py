"""Rubin (LSST) alert packets (the ``lsst-alert-packet`` schema) as nightsift triplets and ZTF-named records.

A Rubin packet holds one ``diaSource`` (the detection on the difference image, with Rubin's own
real/bogus score ``reliability``) and three cutouts ``cutoutScience``, ``cutoutTemplate``,
``cutoutDifference``: raw FITS bytes (not ZTF's gzipped ``{fileName, stampData}`` record), of
varying size (about 30 to 90 pixels of 0.2"), in nJy, with extra HDUs (variance, PSF image) that are
ignored here. :func:`rubin_alert` turns one into what :func:`nightsift.engine.io.avro.read_ztf_packet`
gives for a ZTF alert:

* a triplet ``(63, 63, 3)`` float32 (science, reference, difference), the source on the centre
  pixel ``(31, 31)``: each cutout is placed by its own WCS (the pixel of ``diaSource.ra, dec``;
  Rubin's cutout headers carry ``CRVAL`` = the source and ``CRPIX`` its 1-based pixel, without
  ``CTYPE``: a tangent projection is assumed then), then cropped or padded to 63 x 63 with NaN
  exactly as nightsift's own stamps at a CCD edge (:func:`nightsift.kernels.stamps.extract_stamps`,
  centre rounded half to even). The source pixel of the packets' ``CUTMINX``/``CUTMINY`` cards plus
  ``diaSource.x, y`` is one pixel off that (measured on the shared sample: PSF-fitted centroids of the
  67 sources with reliability >= 0.5 sit at ``x - CUTMINX - 1`` to 0.1 px in the median), so those
  cards are not used.
* the sign convention of ZTF and nightsift (:func:`nightsift.engine.records.difference_sign`): a
  negative source's difference cutout is template minus science, so its centre is positive. Rubin
  stores science minus template for every source, so the difference of a negative source
  (``psfFlux < 0``; ``is_negative`` where ``psfFlux`` is null -- in the shared sample
  ``is_negative`` is false for all 100 packets, 56 of which have ``psfFlux < 0``) is multiplied by -1.
* units: none converted. nightsift's normalisation (:mod:`nightsift.engine.classify.preprocess`)
  standardises each cutout by its own median and robust sigma, so nJy and DN give the same input.
* a record with ZTF's candidate field names where a field exists: ``candid`` (diaSourceId),
  ``objectId`` (diaObjectId), ``ra``, ``dec``, ``jd``, 1-based ``xpos``/``ypos``, ``isdiffpos``
  (``'t'``/``'f'``), ``magpsf``/``sigmapsf`` (AB, from ``|psfFlux|`` in nJy), ``flux``/``fluxerr``
  (nJy), ``snr``, ``fwhm`` (pixels) and ``elong`` (a/b) from the adaptive moments ``ixx, iyy, ixy``
  (arcsec^2) with the cutout's pixel scale, ``visit``, ``ccd`` (detector), plus Rubin's
  ``reliability``, ``band``, ``extendedness``, ``is_negative``, ``survey = "rubin"``.

Real-data rule: these packets are another survey's measurements, for measuring nightsift's
classifier against; never train on them.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import warnings
from typing import Any, Mapping

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.utils.exceptions import AstropyUserWarning

from ..errors import InputError

__all__ = ["RUBIN_CUTOUTS", "NJY_AB_ZERO_POINT", "is_rubin_alert", "rubin_alert", "read_rubin_packets"]

#: the three cutout fields of a Rubin alert, in nightsift's channel order
RUBIN_CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
#: AB magnitude of 1 nJy: ``m = NJY_AB_ZERO_POINT - 2.5 log10(f / nJy)`` (3631 Jy = AB 0)
NJY_AB_ZERO_POINT = 2.5 * math.log10(3631e9)
#: 2.5 / ln 10: a magnitude error from a relative flux error
_MAG_PER_REL_FLUX = 2.5 / math.log(10.0)
#: MJD -> JD
_MJD_TO_JD = 2400000.5


def is_rubin_alert(alert: Mapping[str, Any]) -> bool:
    """True for a Rubin/LSST alert record (it has a ``diaSource``)."""
    return isinstance(alert, Mapping) and "diaSource" in alert


def _fits_image(raw, key: str, path: str) -> tuple[np.ndarray, fits.Header]:
    """The first 2-D image of a cutout's FITS bytes (gzipped or not) and its header."""
    if isinstance(raw, Mapping):  # a ZTF-style {fileName, stampData} record
        raw = raw.get("stampData")
    if not raw:
        raise InputError(f"{key} is missing", path=path)
    try:
        raw = bytes(raw)
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyUserWarning)  # "File may have been truncated": broken
            warnings.simplefilter("ignore", VerifyWarning)  # non-standard cards: harmless (checked first)
            with fits.open(io.BytesIO(raw), memmap=False) as hdul:
                hdu = next((h for h in hdul if h.data is not None), None)
                if hdu is None:
                    raise InputError(f"{key} holds no image", path=path)
                data, header = np.array(hdu.data, dtype=np.float32), hdu.header.copy()
    except InputError:
        raise
    except (OSError, ValueError, EOFError, TypeError, IndexError, KeyError, AstropyUserWarning) as e:
        raise InputError(f"{key} is not valid FITS ({type(e).__name__}: {e})", path=path) from None
    if data.ndim != 2 or min(data.shape) < 1:
        raise InputError(f"{key} is not a 2-D image (shape {data.shape})", path=path)
    return data, header


def _source_pixel(header: fits.Header, ra: float, dec: float) -> tuple[float, float, float | None]:
    """0-based ``(x, y)`` of ``(ra, dec)`` on a cutout, by its WCS, and its pixel scale (arcsec).

    Rubin's cutout headers carry CRPIX/CRVAL/PC but no CTYPE: a tangent projection is assumed then
    (exact at CRVAL, where Rubin puts the source). Raises ValueError without a usable WCS.
    """
    from astropy.wcs import WCS, FITSFixedWarning

    if "CRPIX1" not in header or "CRVAL1" not in header:
        raise ValueError("no WCS (CRPIX/CRVAL) in the header")
    hdr = header.copy()
    if not str(hdr.get("CTYPE1", "")).strip():
        hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
        hdr["CUNIT1"], hdr["CUNIT2"] = "deg", "deg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(hdr, naxis=2)
    x, y = (float(v) for v in wcs.world_to_pixel_values(ra, dec))
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError("the WCS gives no finite pixel for the source")
    scale = math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0
    return x, y, (scale if np.isfinite(scale) and scale > 0 else None)


def _stamp(data: np.ndarray, x: float, y: float, size: int, key: str, path: str) -> np.ndarray:
    """``size x size`` around pixel ``(x, y)`` of a cutout, NaN beyond it (the chain's own stamps)."""
    from nightsift.kernels.stamps import extract_stamps

    ny, nx = data.shape
    if not (-0.5 <= x < nx - 0.5 and -0.5 <= y < ny - 0.5):
        raise InputError(f"{key}: the source (pixel {x:.1f}, {y:.1f}) lies outside the {ny}x{nx} cutout", path=path)
    return extract_stamps(data, [x], [y], size=size, fill=float("nan"))[0][0].astype(np.float32, copy=False)


def _negative(src: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the source is negative (science fainter than template) and which field said so."""
    flux = src.get("psfFlux")
    if flux is not None and np.isfinite(flux):
        return bool(flux < 0), "psfFlux"
    if src.get("is_negative") is not None:
        return bool(src["is_negative"]), "is_negative"
    raise ValueError("neither psfFlux nor is_negative gives the sign of the source")


def _shape(src: Mapping[str, Any], scale: float | None) -> tuple[float | None, float | None]:
    """FWHM (pixels) and elongation a/b of a Gaussian with the adaptive moments (arcsec^2)."""
    from nightsift.kernels.psf import FWHM_PER_SIGMA

    m = [src.get(k) for k in ("ixx", "iyy", "ixy")]
    if any(v is None or not np.isfinite(v) for v in m):
        return None, None
    ixx, iyy, ixy = m
    half_tr, det = 0.5 * (ixx + iyy), ixx * iyy - ixy * ixy
    disc = math.sqrt(max(half_tr * half_tr - det, 0.0))
    lo, hi = half_tr - disc, half_tr + disc
    fwhm = FWHM_PER_SIGMA * math.sqrt(half_tr) / scale if scale and half_tr > 0 else None
    elong = math.sqrt(hi / lo) if lo > 0 else None
    return fwhm, elong


def _record(alert: Mapping[str, Any], negative: bool, sign_from: str, scale: float | None) -> dict:
    src = alert["diaSource"]
    flux, err = src.get("psfFlux"), src.get("psfFluxErr")
    ok = flux is not None and err is not None and np.isfinite(flux) and flux != 0
    fwhm, elong = _shape(src, scale)
    mjd = src.get("midpointMjdTai")
    x, y = src.get("x"), src.get("y")
    return {
        "survey": "rubin", "candid": src.get("diaSourceId"), "objectId": src.get("diaObjectId"),
        "ra": src["ra"], "dec": src["dec"], "jd": None if mjd is None else mjd + _MJD_TO_JD,
        "xpos": None if x is None else x + 1.0, "ypos": None if y is None else y + 1.0,
        "isdiffpos": "f" if negative else "t", "sign_from": sign_from,
        "flux": flux, "fluxerr": err, "snr": src.get("snr"),
        "magpsf": NJY_AB_ZERO_POINT - 2.5 * math.log10(abs(flux)) if ok else None,
        "sigmapsf": _MAG_PER_REL_FLUX * err / abs(flux) if ok else None,
        "fwhm": fwhm, "elong": elong, "visit": src.get("visit"), "ccd": src.get("detector"),
        "band": src.get("band"), "extendedness": src.get("extendedness"), "is_negative": src.get("is_negative"),
        "reliability": src.get("reliability"),
    }


def rubin_alert(alert: Mapping[str, Any], *, path: str | os.PathLike = "", size: int = 63) -> tuple[np.ndarray, dict]:
    """One Rubin alert record as ``(triplet (size, size, 3) float32, record dict)`` (module docstring).

    Raises
    ------
    InputError
        A missing or non-FITS cutout, a ``diaSource`` without ra/dec or sign, a cutout without a
        WCS, or a source off its cutout (naming the file and the field).
    """
    path = str(path)
    src = alert.get("diaSource")
    if not isinstance(src, Mapping) or src.get("ra") is None or src.get("dec") is None:
        raise InputError("diaSource has no ra/dec", path=path)
    try:
        negative, sign_from = _negative(src)
    except ValueError as e:
        raise InputError(f"diaSource: {e}", path=path) from None
    chans, scale = [], None
    for key in RUBIN_CUTOUTS:
        data, header = _fits_image(alert.get(key), key, path)
        try:
            x, y, s = _source_pixel(header, src["ra"], src["dec"])
        except (ValueError, KeyError, TypeError, MemoryError) as e:
            raise InputError(f"{key}: cannot place the source on the cutout ({e})", path=path) from None
        chans.append(_stamp(data, x, y, size, key, path))
        scale = s if key == "cutoutDifference" else scale
    if negative:  # Rubin: science - template for all sources; ZTF/nightsift: template - science if negative
        chans[2] = -chans[2]
    return np.stack(chans, axis=-1), _record(alert, negative, sign_from, scale)


def read_rubin_packets(paths, *, size: int = 63):
    """Every Rubin alert of ``paths`` (files or folders of ``*.avro``), as
    :func:`nightsift.engine.io.packets.read_packets` with ``surveys=("rubin",)``.

    Returns
    -------
    PacketSet
        ``triplets`` (n, size, size, 3), ``records`` (:func:`rubin_alert`'s), ``skipped`` (one line
        per unreadable, broken or non-Rubin packet: file and problem).

    Raises
    ------
    InputError
        No packet at all could be read (one line).
    """
    from .packets import read_packets

    return read_packets(paths, size=size, surveys=("rubin",))
