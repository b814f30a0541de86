"""PSF stage, given PSFs: a PSF model read from a file (:func:`nightsift.engine.io.psf_files.read_psf`)
takes the place of the measured one.

Nothing is stacked: the model's stamps are the image's PSF. What the chain still learns from the
image is which catalogue sources are point sources (what the flux ratio and the astrometric
residuals trust as stars): their adaptive-moment size on the stellar locus, the locus being the
adaptive-moment FWHM of the given PSF itself averaged over the sub-pixel phases a star can have
(:func:`psf_locus`), so a galaxy-rich or star-poor field, where a measured PSF cannot be trusted,
still gets its point sources from the given PSF.
"""
from __future__ import annotations

import numpy as np

from nightsift.kernels import psf as kpsf
from nightsift.kernels._xp import array_namespace, host_scalars, to_device

from ..config import PSFConfig
from ..records import PSFModel, StageResult, unusable_of
from .psf import point_sources, stamp_fwhm

__all__ = ["given_psf", "psf_locus"]

#: sub-pixel phases (per axis) over which the locus of a given PSF is averaged
_PHASES = (-0.25, 0.25)


def psf_locus(stamps, *, fwhm: float):
    """Adaptive-moment FWHM (px, device 0-d) of PSF stamps ``(T, s, s)`` as stars show them: the
    median over tiles of the mean over four sub-pixel phases (an undersampled PSF's size depends
    on where in a pixel a star falls); ``fwhm`` (px) starts the moments."""
    xp = array_namespace(stamps)
    T = stamps.shape[0]
    sizes = [stamp_fwhm(kpsf.fourier_shift(stamps, xp.full(T, px), xp.full(T, py)), sigma=fwhm / kpsf.FWHM_PER_SIGMA)
             for py in _PHASES for px in _PHASES]
    return xp.median(xp.mean(xp.stack(sizes), axis=0))


def given_psf(images, masks, catalogs, models, *, config: PSFConfig, prefix: str = "") -> StageResult:
    """Per-tile PSFs given from files for a batch of background-subtracted images.

    Parameters
    ----------
    images : ndarray (B, ny, nx) float32, e-
        Background-subtracted images (unusable pixels 0).
    masks : ndarray (B, ny, nx) uint16
    catalogs : list of B SourceCatalog
        Their sources (:func:`nightsift.engine.stages.measure.measure_images`).
    models : list of B PSFModel
        The given PSFs on the images' tile grids (host or device arrays).
    config : PSFConfig
    prefix : str
        Of the QA keys (``"sci_"`` / ``"ref_"``).

    Returns
    -------
    StageResult
        ``value``: list of B ``(PSFModel, SourceCatalog)`` as :func:`~.psf.measure_psf` gives
        them (the model on the images' device with its ``locus``; the catalogue's ``size`` and
        ``point`` filled, no ``psf_star``). ``qa``: lists of B values ``psf_fwhm`` (median px),
        ``psf_fwhm_min/max``, ``psf_apcorr``, ``psf_locus_fwhm``, ``psf_stamp``, ``psf_n_stars``
        (0: nothing stacked), prefixed.
    """
    xp = array_namespace(images, masks)
    unusable = unusable_of(masks)
    out, rows = [], []
    for b, (cat, m) in enumerate(zip(catalogs, models)):
        dev = {k: to_device(getattr(m, k), xp, label="given_psf") for k in ("stamps", "fwhm", "apcorr", "n_stars")}
        fwhm = float(np.median(np.asarray(m.fwhm))) if isinstance(m.fwhm, np.ndarray) else \
            float(host_scalars(xp.median(m.fwhm))[0])
        locus = float(host_scalars(psf_locus(dev["stamps"], fwhm=fwhm))[0])
        model = PSFModel(grid=m.grid, locus=locus, **dev)
        s = int(dev["stamps"].shape[-1])
        cat = point_sources(images, unusable, b, cat, locus, s, min_snr=config.point_min_snr)
        out.append((model, cat))
        rows.append(dict(psf_fwhm=xp.median(model.fwhm), psf_fwhm_min=model.fwhm.min(), psf_fwhm_max=model.fwhm.max(),
                         psf_apcorr=xp.median(model.apcorr), psf_locus_fwhm=locus, psf_stamp=s, psf_n_stars=0))
    keys = sorted({k for r in rows for k in r})
    return StageResult(out, {prefix + k: [r[k] for r in rows] for k in keys})
