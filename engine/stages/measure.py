"""Measure images: the smooth background, its noise and the source catalogue, for a batch.

The first thing the chain learns about each science image of a visit (and, once per CCD, about
its reference, in the reference's own frame). Everything here runs on the device the images live
on, with one algorithm for every backend:

* background: clipped mesh statistics (``box`` px meshes), median-filtered and spline-interpolated
  (:func:`nightsift.kernels.background.background`);
* noise: the robust standard deviation of the background-subtracted usable pixels (subsampled);
* sources: matched-filter peaks above ``psf.detect_threshold`` sigma with windowed centroids,
  moments and aperture fluxes (:func:`nightsift.kernels.sources.detect_sources`).

QA per image: ``<prefix>sky`` (median background, e-), ``<prefix>sky_sigma`` (e-),
``<prefix>n_sources``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nightsift.kernels._xp import array_namespace, host_scalars, to_host
from nightsift.kernels.background import background, robust_sigma
from nightsift.kernels.sources import detect_sources

from ..config import PSFConfig
from ..records import SourceCatalog, StageResult, unusable_of

__all__ = ["Measurement", "measure_images", "catalog_from_sources", "fwhm_guess", "header_seeing", "SEEING_KEYS"]


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure_images` learns about a batch of B images (device arrays).

    Attributes
    ----------
    sky : (B, ny, nx) float32, e-
    image : (B, ny, nx) float32, e-
        The images minus their background, unusable pixels set to 0 (what the PSF and ZOGY
        stages take).
    sky_sigma : (B,) float64, e-
    catalogs : list of B SourceCatalog
    """

    sky: object
    image: object
    sky_sigma: object
    catalogs: list


#: header cards of the seeing FWHM, in the order they are trusted, each with the unit assumed when
#: its comment names none ("pix"/"px" or "arcsec"/'"' in a comment decide): DECam's FWHM (px),
#: PSF_FWHM (arcsec), FWHM_AVE (px), ZTF/PTF's SEEING (arcsec), SEEING_P (px)
SEEING_KEYS = (("FWHM", "px"), ("PSF_FWHM", "arcsec"), ("FWHM_AVE", "px"), ("SEEING", "arcsec"), ("SEEING_P", "px"))


def _card_unit(header, key: str, default: str) -> str:
    comment = str(header.comments[key]).lower() if hasattr(header, "comments") else ""
    if "arcsec" in comment or "asec" in comment or '"' in comment:
        return "arcsec"
    if "pix" in comment or "px" in comment:
        return "px"
    return default


def header_seeing(header, *, pixel_scale: float | None) -> tuple[float, str] | None:
    """The seeing FWHM (px) the header states and the card it came from, or None.

    The first of :data:`SEEING_KEYS` holding a positive finite number (0 or -1 mean "unknown" in
    many pipelines); a value in arcsec needs ``pixel_scale`` (arcsec/px, from the WCS), else the
    next card is tried.
    """
    if header is None:
        return None
    for key, default in SEEING_KEYS:
        if key not in header:
            continue
        try:
            v = float(header[key])
        except (TypeError, ValueError):
            continue
        if not (np.isfinite(v) and v > 0):
            continue
        if _card_unit(header, key, default) == "arcsec":
            if not (pixel_scale and np.isfinite(pixel_scale) and pixel_scale > 0):
                continue
            v /= float(pixel_scale)
        return v, key
    return None


def fwhm_guess(header, default: float) -> float:
    """A first guess of the PSF FWHM (px) from the header (``FWHM`` in px, or ``SEEING`` in arcsec
    with ``PIXSCALE``), else ``default``: it only sets the detection filter's width."""
    try:
        if header is not None and "FWHM" in header and float(header["FWHM"]) > 0:
            return float(header["FWHM"])
        if header is not None and "SEEING" in header and "PIXSCALE" in header:
            v = float(header["SEEING"]) / float(header["PIXSCALE"])
            if v > 0 and np.isfinite(v):
                return v
    except (TypeError, ValueError):
        pass
    return float(default)


def catalog_from_sources(src, index=None) -> SourceCatalog:
    """A :class:`SourceCatalog` (no stellar-locus flags yet) from kernel ``Sources`` rows."""
    s = src if index is None else src.take(index)
    xp = array_namespace(s.x)
    n = len(s)
    return SourceCatalog(x=s.x, y=s.y, flux=s.flux, fluxerr=s.fluxerr, snr=s.snr, a=xp.nan_to_num(s.a, nan=0.0),
                         b=xp.nan_to_num(s.b, nan=0.0), peak=s.peak, flag=s.flag,
                         size=xp.full(n, xp.nan), point=xp.zeros(n, bool), psf_star=xp.zeros(n, bool))


def measure_images(images, masks, *, fwhm, config: PSFConfig, prefix: str = "", poisson_scale=None) -> StageResult:
    """Background, noise and sources of a batch of calibrated images.

    Parameters
    ----------
    images : ndarray (B, ny, nx) float32, e-
    masks : ndarray (B, ny, nx) uint16
        :class:`~nightsift.engine.records.MaskBits`; unusable pixels are ignored.
    fwhm : sequence of B floats
        FWHM guesses (px) for the detection filter (:func:`fwhm_guess`).
    config : PSFConfig
        ``background_box``, ``detect_threshold``.
    prefix : str
        Of the QA keys (``"sci_"``, ``"ref_"``).
    poisson_scale : sequence of B floats, optional
        Image units per e- of images not in e- (flux units kept by
        :func:`~nightsift.engine.io.fits.read_exposure`, ``NSPOISS``), for the catalogue's source
        Poisson noise; ``None``: e- images.

    Returns
    -------
    StageResult(Measurement, qa)
    """
    xp = array_namespace(images, masks)
    B = images.shape[0]
    bad = unusable_of(masks)
    sky, _ = background(images, box=config.background_box, mask=bad)
    sub = xp.where(bad, xp.float32(0), images - sky).astype(xp.float32)
    step = max(1, int(np.sqrt(images[0].size / 2_000_000)))
    sample = xp.where(bad, xp.nan, sub)[:, ::step, ::step].reshape(B, -1)
    sigma = robust_sigma(sample, axis=-1)
    src = detect_sources(sub, sigma, fwhm=np.asarray(fwhm, np.float64), threshold=config.detect_threshold,
                         mask=bad, poisson_scale=poisson_scale)
    counts = to_host(xp.bincount(src.image, minlength=B), label="catalog_sizes") if len(src) else np.zeros(B, int)
    edges = np.concatenate([[0], np.cumsum(counts)])
    catalogs = [catalog_from_sources(src, slice(int(edges[b]), int(edges[b + 1]))) for b in range(B)]
    qa = {prefix + "sky": xp.median(sky[:, ::8, ::8].reshape(B, -1), axis=1), prefix + "sky_sigma": sigma,
          prefix + "n_sources": [int(c) for c in counts]}
    return StageResult(Measurement(sky=sky, image=sub, sky_sigma=sigma, catalogs=catalogs), qa)


def host_sigma(m: Measurement) -> list[float]:
    """The noise of every image as host floats (one read)."""
    return list(host_scalars(*[m.sky_sigma[b] for b in range(m.sky_sigma.shape[0])]))
