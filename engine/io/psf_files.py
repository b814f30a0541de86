"""PSF models from files, on an image's pixel grid: what ``nightsift subtract --sci-psf/--ref-psf``
(and ``psf.science_model`` / ``psf.reference_model``) give the chain instead of a measured PSF.

:func:`read_psf` tells the two kinds of file apart by their content:

* a **FITS PSF image** (the primary HDU, or the first 2-D image HDU, or the one named; any size,
  centred or not), sampled on the image's pixels or **oversampled**. The oversampling ``N`` (PSF
  pixels per image pixel along an axis) is the ``oversampling=`` argument, else a header keyword of
  :data:`OVERSAMPLING_KEYS` (WebbPSF/STPSF and poppy write ``OVERSAMP``, their FFT oversampling,
  and ``DET_SAMP``, the detector oversampling the array has; they differ only when asked to), the
  first that agrees with the pixel scales when the file states its own (:data:`PIXEL_SCALE_KEYS`,
  ``PIXELSCL``: arcsec per PSF pixel), else the ratio of the image's pixel scale to the PSF's when
  it is within 5 % of a whole number.
  With none of these the file is refused: a guessed sampling would scale the PSF silently. The PSF
  is centred on its windowed centroid and integrated over image pixels (a flux-conserving
  rebinning of the PSF pixels, taken as uniform within each, at the centroid's sub-pixel
  position): an oversampled image samples the optical PSF, which a detector pixel integrates.
* a **PSFEx model** (``.psf``: a binary table whose ``PSF_MASK`` holds ``PSFAXIS3`` basis images of
  ``PSFAXIS2 x PSFAXIS1`` pixels): the PSF at ``(X_IMAGE, Y_IMAGE)`` (1-based) is
  ``sum_k c_k B_k`` with the monomials ``c = x^i y^j`` ordered ``j = 0..d``, ``i = 0..d-j``
  (``1, x, ..., x^d, y, x y, ..., y^d``; PSFEx's order, as GalSim's ``DES_PSFEx`` reads it), ``x =
  (X_IMAGE - POLZERO1) / POLSCAL1``, ``y = (Y_IMAGE - POLZERO2) / POLSCAL2``, ``d = POLDEG1``. It
  is evaluated at every tile centre and resampled from its step ``PSF_SAMP`` (image pixels per PSF
  pixel) to image pixels with a Lanczos-3 kernel: PSFEx models the pixel-convolved PSF, which is
  sampled, not integrated again.

A PSF file is on the image's pixel axes (x the column); no rotation is applied. A file that states
its pixel scale must agree with the image's WCS within :data:`SCALE_TOLERANCE` (for an oversampled
image: its scale times ``N``). Every problem is one :class:`~nightsift.engine.errors.InputError`
line naming the file. The result is the chain's own :class:`~nightsift.engine.records.PSFModel`
on the host: unit-sum, odd, centred stamps per tile (at most ``2 grid.margin + 1`` pixels, the
ZOGY tile margin), the Moffat FWHM and aperture correction of each, no stars.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from astropy.io import fits

from nightsift.kernels import psf as kpsf
from nightsift.kernels.moffat import fit_moffat
from nightsift.kernels.resample import lanczos_resample
from nightsift.kernels.tiles import TileGrid

from ..errors import InputError
from ..records import PSFModel
from .fits import header_float

__all__ = ["read_psf", "psfex_monomials", "OVERSAMPLING_KEYS", "PIXEL_SCALE_KEYS", "SCALE_TOLERANCE", "LOST_LIGHT"]

#: header keywords giving a PSF image's oversampling factor (PSF pixels per image pixel), in order
OVERSAMPLING_KEYS: tuple[str, ...] = ("OVERSAMP", "DET_SAMP", "PSFSAMP", "SAMPLING")
#: header keywords giving a PSF image's pixel scale (arcsec per PSF pixel), in order
PIXEL_SCALE_KEYS: tuple[str, ...] = ("PIXELSCL", "PIXSCALE")
#: largest relative disagreement between a PSF file's pixel scale and the image's
SCALE_TOLERANCE = 0.05
#: smallest PSF stamp side (image pixels) a file must cover
MIN_STAMP = 5
#: fraction of a PSF's light outside its stamp above which the chain warns
LOST_LIGHT = 0.01
#: the interpolation of PSFEx models (PSFEx's own resampling kernel)
_LANCZOS = 3
_IMAGE_HDUS = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)


def read_psf(path, grid: TileGrid, *, pixel_scale: float | None = None, hdu: int | str | None = None,
             oversampling: float | None = None, keywords: Mapping[str, Sequence[str]] | None = None,
             max_stamp: int | None = None, warn: Callable[[str], None] | None = None) -> PSFModel:
    """A PSF file as per-tile PSFs on an image's pixel grid.

    Parameters
    ----------
    path : str or Path
        FITS PSF image or PSFEx ``.psf`` model; ``file.fits[EXT]`` (a name or a number) picks the
        image HDU, as ``hdu`` does (``psf.fits[DET_SAMP]``: WebbPSF's detector-sampled PSF).
    grid : TileGrid
        The image's tiling (one stamp per tile; a PSFEx model is evaluated at each tile's
        visible centre).
    pixel_scale : float, optional
        The image's pixel scale (arcsec, from its WCS): checks a scale the file states, and
        settles the oversampling of an image that states only its scale.
    hdu : int or str, optional
        The FITS image HDU holding the PSF (default: the primary, else the first 2-D image).
    oversampling : float, optional
        PSF pixels per image pixel of a FITS image (overrides its header).
    keywords : mapping, optional
        Other header keywords: ``{"oversampling": (...), "pixel_scale": (...)}`` replace
        :data:`OVERSAMPLING_KEYS` / :data:`PIXEL_SCALE_KEYS`.
    max_stamp : int, optional
        Largest stamp side (odd; default ``2 grid.margin + 1``).
    warn : callable, optional
        Called with a one-line warning (naming the file) for each thing the PSF had to have done to
        it that may cost accuracy: more than :data:`LOST_LIGHT` of its light outside the stamp
        (cropped to the ZOGY tile margin), or an undersampled image-pixel PSF recentred by a
        sub-pixel Fourier shift (inexact when it is not band-limited).

    Returns
    -------
    PSFModel
        Host arrays: ``stamps (T, s, s)`` float64 unit-sum with the centroid on pixel ``s // 2``,
        ``fwhm``/``apcorr (T,)`` from a pixel-integrated Moffat fit, ``n_stars`` zeros, ``locus``
        NaN (the PSF stage sets it).

    Raises
    ------
    InputError
        Unreadable, not a PSF (no finite positive flux, not 2-D), unknown or contradictory
        sampling, a pixel scale that disagrees with the image's, too small.
    """
    p, hdu = _split_hdu(str(path), hdu)
    keys = dict(keywords or {})
    notes: list[str] = []
    max_stamp = 2 * grid.margin + 1 if max_stamp is None else int(max_stamp)
    hdul = _open(p)
    try:
        table = _psfex_table(hdul) if hdu is None else None
        if table is not None:
            stamps = _psfex_stamps(table, grid.visible_centres(), p, max_stamp, notes)
        else:
            data, header = _image(hdul, hdu, p)
            over = _oversampling(header, p, explicit=oversampling, pixel_scale=pixel_scale,
                                 over_keys=keys.get("oversampling", OVERSAMPLING_KEYS),
                                 scale_keys=keys.get("pixel_scale", PIXEL_SCALE_KEYS))
            one = _to_image_pixels(data, over, p, max_stamp, notes)
            stamps = one[None]
    finally:
        hdul.close()
    model = _model(stamps, grid, p)
    for n in notes if warn is not None else ():
        warn(f"PSF file {Path(p).name}: {n}")
    return model


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _split_hdu(path: str, hdu):
    """``("f.fits", "EXT")`` from ``"f.fits[EXT]"`` (a number becomes an int) when no file has the
    whole name; ``hdu`` when given wins."""
    m = re.fullmatch(r"(.+)\[([^\[\]]+)\]", path)
    if m is None or Path(path).exists():
        return path, hdu
    ext = m.group(2).strip()
    return m.group(1), hdu if hdu is not None else (int(ext) if ext.isdigit() else ext)


def _open(path: str) -> fits.HDUList:
    p = Path(path)
    if not p.exists():
        raise InputError("PSF file not found; check the path", path=path)
    if p.is_dir():
        raise InputError("is a directory, not a PSF file; pass a FITS PSF image or a PSFEx .psf file", path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hdul = fits.open(p, memmap=False)
            hdul.verify("silentfix")
            for h in hdul:  # read every HDU now: a truncated file fails here, not later
                _ = h.data
        except Exception as e:  # noqa: BLE001 (astropy raises many kinds for a broken file)
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"is not a readable FITS file ({text}); give a FITS PSF image or a PSFEx .psf file",
                             path=path) from None
    if len(hdul) == 0:
        raise InputError("is an empty FITS file; give a FITS PSF image or a PSFEx .psf file", path=path)
    return hdul


def _psfex_table(hdul: fits.HDUList):
    """The PSFEx table HDU (a binary table with a ``PSF_MASK`` column), or None."""
    for h in hdul:
        if isinstance(h, fits.BinTableHDU) and "PSF_MASK" in [c.name.upper() for c in h.columns]:
            return h
    return None


def _image(hdul: fits.HDUList, hdu, path: str) -> tuple[np.ndarray, fits.Header]:
    """The PSF image (float64, 2-D once axes of length 1 are dropped) and its header (the
    primary's cards added when it is an extension)."""
    if hdu is not None:
        try:
            idx = hdul.index_of(hdu)
        except (KeyError, IndexError):
            raise InputError(f"has no HDU {hdu!r} (HDUs: {[h.name for h in hdul]}); pick the PSF image's",
                             path=path) from None
    else:
        images = [i for i, h in enumerate(hdul) if isinstance(h, _IMAGE_HDUS) and h.data is not None]
        if not images:
            raise InputError(f"holds no image and no PSFEx table (HDUs: {[h.name for h in hdul]}); give a FITS "
                             "PSF image or a PSFEx .psf file", path=path)
        idx = images[0]
    h = hdul[idx]
    data = getattr(h, "data", None)
    shape = getattr(data, "shape", None)
    if data is None or not isinstance(h, _IMAGE_HDUS) or np.squeeze(data).ndim != 2:
        raise InputError(f"HDU {h.name or idx} is not a 2-D PSF image (shape {shape}); give one (ny, nx) PSF "
                         "(for a cube, write the plane you want)", path=path)
    header = h.header.copy()
    if idx != 0:
        for card in hdul[0].header.cards:
            if card.keyword not in header and card.keyword not in ("SIMPLE", "EXTEND", "NAXIS", "BITPIX"):
                header.append(card)
    return np.asarray(np.squeeze(data), np.float64), header


def _check_psf(arr: np.ndarray, path: str, what: str = "PSF") -> None:
    """A PSF must be finite and hold positive flux with a positive peak."""
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} has {int((~np.isfinite(arr)).sum())} non-finite pixels (NaN/inf); give a PSF "
                         "with finite values (set pixels outside its footprint to 0)", path=path)
    total, peak = float(arr.sum()), float(arr.max(initial=0.0))
    if not (total > 0 and peak > 0 and peak > -float(arr.min(initial=0.0))):
        raise InputError(f"{what} is not a PSF (sum {total:g}, peak {peak:g}: no positive light); check the "
                         "file and the HDU", path=path)


# ---------------------------------------------------------------------------------------------
# FITS PSF images
# ---------------------------------------------------------------------------------------------
def _first_key(header: fits.Header, keys: Sequence[str], path: str) -> tuple[str, float] | tuple[None, None]:
    for k in keys:
        if k in header:
            return k, header_float(header, k, path=path, fix="give a number")
    return None, None


def _oversampling(header: fits.Header, path: str, *, explicit: float | None, pixel_scale: float | None,
                  over_keys: Sequence[str], scale_keys: Sequence[str]) -> float:
    """PSF pixels per image pixel of a FITS PSF image (see the module notes).

    The stated factors (``explicit``, else every one of ``over_keys`` present) must be >= 1. With
    the file's pixel scale and the image's (``pixel_scale``, arcsec) known, the first stated factor
    that makes them agree is taken (poppy's ``OVERSAMP`` is its FFT oversampling, which a
    computation with another detector oversampling leaves different from the array's: its
    ``DET_SAMP`` is then the one that agrees), none agreeing is an error; without a scale, the
    first stated factor. Nothing stated: the ratio of the scales when it is a whole number."""
    skey, scale = _first_key(header, scale_keys, path)
    ratio = pixel_scale / scale if scale and pixel_scale else None
    if explicit is not None:
        stated = [("oversampling=", float(explicit))]
    else:
        stated = [(k, header_float(header, k, path=path, fix="give a number")) for k in over_keys if k in header]
    if not stated:
        if ratio is None or ratio < 1 - SCALE_TOLERANCE or abs(ratio / round(ratio) - 1) > SCALE_TOLERANCE:
            said = (f"its {skey} = {scale:g}\"/px against the image's {pixel_scale:g}\"/px" if ratio is not None
                    else f"it has no {'/'.join(over_keys)} and no pixel scale ({'/'.join(scale_keys)})")
            raise InputError(f"PSF sampling unknown: {said}; add OVERSAMP = <PSF pixels per image pixel> (1 for "
                             "image pixels) to its header", path=path)
        return float(round(ratio))
    for key, over in stated:
        if not (np.isfinite(over) and over >= 1 - 1e-6):
            raise InputError(f"{key} = {over:g} is not an oversampling factor (>= 1 PSF pixel per image pixel); "
                             "give the PSF on the image's pixels or finer", path=path)
    if ratio is None:
        return max(stated[0][1], 1.0)
    for _, over in stated:
        if abs(over / ratio - 1) <= SCALE_TOLERANCE:
            return max(over, 1.0)
    said = ", ".join(f"{k} = {v:g}" for k, v in stated)
    raise InputError(f"PSF pixel scale {skey} = {scale:g}\" with oversampling {said} disagrees with the image's "
                     f"{pixel_scale:g}\"/px by more than {SCALE_TOLERANCE:.0%}: a PSF made for another detector or "
                     "image, or a wrong oversampling keyword", path=path)


def _centroid(arr: np.ndarray, fwhm: float) -> tuple[float, float]:
    """Windowed centroid ``(x, y)`` (array pixels) around the brightest pixel."""
    py, px = np.unravel_index(int(np.argmax(arr)), arr.shape)
    h = int(np.ceil(3 * fwhm)) + 1
    pad = np.pad(arr, h)
    sub = pad[py:py + 2 * h + 1, px:px + 2 * h + 1]
    dx, dy = kpsf.centroid(sub[None], sigma=max(fwhm / kpsf.FWHM_PER_SIGMA, 0.8))
    return px + float(dx[0]), py + float(dy[0])


def _overlaps(centre: float, n_in: int, over: float, half: int) -> np.ndarray:
    """``(2 half + 1, n_in)`` lengths (in PSF pixels) of PSF pixel ``i`` (covering ``[i - 1/2,
    i + 1/2]``) inside image pixel ``k`` (covering ``centre + [(k - 1/2), (k + 1/2)] over``)."""
    k = np.arange(-half, half + 1, dtype=np.float64)[:, None]
    lo, hi = centre + (k - 0.5) * over, centre + (k + 0.5) * over
    i = np.arange(n_in, dtype=np.float64)[None, :]
    return np.clip(np.minimum(i + 0.5, hi) - np.maximum(i - 0.5, lo), 0.0, None)


def _to_image_pixels(arr: np.ndarray, over: float, path: str, max_stamp: int, notes: list[str]) -> np.ndarray:
    """An odd stamp on image pixels, centred on the PSF's centroid (before the final recentring).

    On image pixels (``over == 1``) a crop around the pixel nearest the centroid; oversampled, the
    flux of the PSF pixels integrated over each image pixel, the image pixel grid placed on the
    centroid. What may cost accuracy is added to ``notes``."""
    _check_psf(arr, path)
    peak = arr.max()
    fwhm = max(2.0 * np.sqrt((arr >= 0.5 * peak).sum() / np.pi), 1.0)  # in PSF pixels
    cx, cy = _centroid(arr, fwhm)
    ny, nx = arr.shape
    if abs(over - 1.0) < 1e-6:
        off = float(np.hypot(cx - round(cx), cy - round(cy)))
        if off > 0.05 and fwhm < 2.5:
            notes.append(f"centred {off:.2f} px off a pixel centre, recentred by a Fourier shift, inexact for its "
                         f"{fwhm:.1f} px FWHM (undersampled): give it centred on a pixel, or oversampled")
        cx, cy = round(cx), round(cy)
    # the largest odd box inside the array (image pixels), at most max_stamp
    room = min(cx + 0.5, nx - 0.5 - cx, cy + 0.5, ny - 0.5 - cy) / over - 0.5
    half = int(min(np.floor(room + 1e-9), (max_stamp - 1) // 2))
    if 2 * half + 1 < MIN_STAMP:
        raise InputError(f"PSF image {ny}x{nx} (oversampling {over:g}) covers only {max(2 * half + 1, 0)} image "
                         f"pixels around its centre; give at least {MIN_STAMP}x{MIN_STAMP} image pixels", path=path)
    if abs(over - 1.0) < 1e-6:
        out = arr[int(cy) - half:int(cy) + half + 1, int(cx) - half:int(cx) + half + 1]
    else:
        out = _overlaps(cy, ny, over, half) @ arr @ _overlaps(cx, nx, over, half).T
    _lost_light(float(out.sum()) / float(arr.sum()), 2 * half + 1, notes)
    return np.array(out, np.float64)


def _lost_light(kept: float, side: int, notes: list[str]) -> None:
    """A note when more than :data:`LOST_LIGHT` of a PSF's light falls outside its stamp."""
    if 1.0 - kept > LOST_LIGHT:
        notes.append(f"{1.0 - kept:.1%} of its light lies outside the {side}x{side} px stamp (the ZOGY tile margin, "
                     "subtract.tile_margin, bounds it): fluxes rest on the fitted aperture correction")


# ---------------------------------------------------------------------------------------------
# PSFEx models
# ---------------------------------------------------------------------------------------------
def _psfex_header(h: fits.BinTableHDU, path: str) -> dict:
    """The PSFEx cards the model needs, checked."""
    hdr = h.header

    def num(key, default=None):
        return header_float(hdr, key, path=path, default=default,
                            fix="a PSFEx model needs it (write the .psf with PSFEx, or add the card)")

    naxis = int(num("POLNAXIS", 0))
    if naxis not in (0, 2) or (naxis == 2 and int(num("POLNGRP", 1)) != 1):
        raise InputError(f"PSFEx model with POLNAXIS = {naxis}, POLNGRP = {hdr.get('POLNGRP')}: only X/Y_IMAGE "
                         "dependence in one group (PSFEx's default PSFVAR_KEYS) is read; refit with it", path=path)
    out = dict(naxis=naxis, samp=num("PSF_SAMP"), deg=0)
    if naxis == 2:
        names = (str(hdr.get("POLNAME1", "")).upper(), str(hdr.get("POLNAME2", "")).upper())
        if not (names[0].startswith("X") and names[0].endswith("IMAGE") and names[1].startswith("Y")
                and names[1].endswith("IMAGE")):
            raise InputError(f"PSFEx model varies with {names}, not X*_IMAGE/Y*_IMAGE; refit with PSFVAR_KEYS "
                             "X_IMAGE,Y_IMAGE", path=path)
        out.update(deg=int(num("POLDEG1")), x0=num("POLZERO1"), y0=num("POLZERO2"), sx=num("POLSCAL1"),
                   sy=num("POLSCAL2"))
        if out["sx"] == 0 or out["sy"] == 0:
            raise InputError("PSFEx POLSCAL1/POLSCAL2 is 0; the file is corrupt: regenerate it", path=path)
    if not out["samp"] > 0:
        raise InputError(f"PSFEx PSF_SAMP = {out['samp']:g} is not a positive sampling step", path=path)
    return out


def _psfex_basis(h: fits.BinTableHDU, meta: dict, path: str) -> np.ndarray:
    """``PSF_MASK`` as ``(n_coeff, ny, nx)`` float64, checked against the polynomial's degree."""
    try:
        basis = np.asarray(h.data["PSF_MASK"][0], np.float64)
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"PSFEx PSF_MASK cannot be read ({e}); regenerate the file", path=path) from None
    axes = [h.header.get(f"PSFAXIS{k}") for k in (3, 2, 1)]
    if basis.ndim == 1 and all(isinstance(a, int) and a > 0 for a in axes) and basis.size == np.prod(axes):
        basis = basis.reshape(axes)  # a column written without its TDIM
    if basis.ndim == 2:
        basis = basis[None]
    n_coeff = (meta["deg"] + 1) * (meta["deg"] + 2) // 2
    if basis.ndim != 3 or basis.shape[0] != n_coeff:
        raise InputError(f"PSFEx PSF_MASK has shape {basis.shape}, not ({n_coeff}, ny, nx) for POLDEG1 = "
                         f"{meta['deg']}; the file is corrupt or not a PSFEx model", path=path)
    if not np.all(np.isfinite(basis)):
        raise InputError("PSFEx PSF_MASK has non-finite values; regenerate the file", path=path)
    return basis


def psfex_monomials(x, y, degree: int) -> np.ndarray:
    """``(n_coeff, n)`` PSFEx monomials ``x^i y^j`` (``j = 0..d``, ``i = 0..d-j``) of normalised
    positions ``x, y`` ``(n,)``."""
    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
    return np.array([x**i * y**j for j in range(degree + 1) for i in range(degree + 1 - j)])


def _psfex_stamps(h: fits.BinTableHDU, centres: np.ndarray, path: str, max_stamp: int,
                  notes: list[str]) -> np.ndarray:
    """The PSFEx model at each ``(x, y)`` of ``centres`` (0-based image pixels), on image pixels:
    ``(T, s, s)``; what may cost accuracy is added to ``notes``."""
    meta = _psfex_header(h, path)
    basis = _psfex_basis(h, meta, path)
    T = centres.shape[0]
    if meta["naxis"] == 2:
        u = (centres[:, 0] + 1.0 - meta["x0"]) / meta["sx"]  # PSFEx positions are 1-based
        v = (centres[:, 1] + 1.0 - meta["y0"]) / meta["sy"]
        models = np.tensordot(psfex_monomials(u, v, meta["deg"]).T, basis, axes=(1, 0))
    else:
        models = np.repeat(basis[:1], T, axis=0)
    for t in range(T):
        _check_psf(models[t], path, what=f"PSFEx PSF at tile centre ({centres[t, 0]:.0f}, {centres[t, 1]:.0f})")
    _, ny, nx = models.shape
    step = meta["samp"]  # image pixels per PSF pixel
    half = int(min(np.floor(((min(ny, nx) - 1) // 2) * step + 1e-9), (max_stamp - 1) // 2))
    if 2 * half + 1 < MIN_STAMP:
        raise InputError(f"PSFEx model {ny}x{nx} at PSF_SAMP {step:g} covers only {2 * half + 1} image pixels; "
                         f"need {MIN_STAMP}", path=path)
    # image pixel offset k sits at PSF pixel (centre + k / step); PSFEx's centre pixel is (n // 2)
    k = np.arange(-half, half + 1, dtype=np.float64) / step
    ys, xs = np.meshgrid(ny // 2 + k, nx // 2 + k, indexing="ij")
    out = lanczos_resample(models, np.broadcast_to(xs, (T,) + xs.shape).copy(),
                           np.broadcast_to(ys, (T,) + ys.shape).copy(), a=_LANCZOS, fill=0.0)
    # image-pixel samples of the pixel-convolved PSF sum to step^2 times its PSF-pixel samples
    _lost_light(float(np.min(out.sum(axis=(1, 2)) / (step**2 * models.sum(axis=(1, 2))))), 2 * half + 1, notes)
    return np.asarray(out, np.float64)


# ---------------------------------------------------------------------------------------------
# the chain's PSF model
# ---------------------------------------------------------------------------------------------
def _model(stamps: np.ndarray, grid: TileGrid, path: str) -> PSFModel:
    """Recentred unit-sum stamps, their Moffat fits, as a PSFModel (host arrays); one stamp
    ``(1, s, s)`` is every tile's."""
    sums = stamps.sum(axis=(1, 2))
    if not np.all(sums > 0):
        raise InputError("PSF has no positive flux on image pixels at some tile; check the file", path=path)
    psf = kpsf.recenter(stamps / sums[:, None, None])
    fit = fit_moffat(psf)
    if not np.all(np.isfinite(fit.fwhm)):
        raise InputError("PSF cannot be fitted (no peaked profile); check the file and its HDU", path=path)
    T = len(grid)
    tiles = (lambda a: np.broadcast_to(a, (T,) + a.shape[1:]).copy()) if psf.shape[0] != T else np.asarray
    return PSFModel(stamps=tiles(psf), fwhm=tiles(np.asarray(fit.fwhm, np.float64)),
                    apcorr=tiles(np.asarray(fit.apcorr, np.float64)), n_stars=np.zeros(T, np.int64), grid=grid,
                    locus=float("nan"))
