"""The one normalisation of real/bogus triplets, used identically at training and at inference.

Normalisation ``"mad-asinh-v1"`` (:data:`NORMALIZATION`), applied to each cutout and each channel
(science, reference, difference) on its own:

1. ``loc`` = median of the finite pixels, ``scale`` = 1.4826 x their median absolute deviation
   (the Gaussian-equivalent noise of the sky); where the MAD is zero or undefined (a constant
   cutout, a saturated plateau covering half the stamp) the standard deviation, and 1 where that
   is zero or undefined too;
2. ``z = (x - loc) / scale``: the cutout in units of its own noise (so the units of the images,
   ADU or e-, the sky level and the exposure depth drop out), clipped to +-60000 so it fits float16;
3. ``out = asinh(z / 3)``: linear near the noise (``z = 1`` -> 0.33), logarithmic for bright sources
   (``z = 1e4`` -> 8.8), so that a saturated star and a 5-sigma transient share one bounded range,
   as an int8 input tensor needs;
4. pixels that were not finite (NaN padding outside the CCD, masked pixels) become 0 -- the sky.

Steps 1-2 are :func:`standardize` (the stored form of the training data: float16 ``z`` plus
``loc, scale``), steps 3-4 are :func:`compress`; :func:`preprocess` is both. The function is pure
numpy, cheap (no TensorFlow import) and vectorised over the batch.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> t = rng.normal(100.0, 5.0, (2, 63, 63, 3)).astype(np.float32)
>>> x = preprocess(t)
>>> x.shape, x.dtype
((2, 63, 63, 3), dtype('float32'))
>>> bool(abs(float(np.std(x)) - 0.33) < 0.02)
True
"""
from __future__ import annotations

import numpy as np

__all__ = ["NORMALIZATION", "ASINH_SOFTENING", "Z_CLIP", "standardize", "compress", "preprocess"]

#: name of the normalisation; stored with every model and dataset (bump it when the maths changes)
NORMALIZATION = "mad-asinh-v1"
#: ``out = asinh(z / ASINH_SOFTENING)``: the noise level (z=1) maps to 1/3
ASINH_SOFTENING = 3.0
#: |z| is clipped here so standardised cutouts fit float16 (max 65504)
Z_CLIP = 60000.0
_MAD_TO_SIGMA = 1.4826


def _check(triplets) -> np.ndarray:
    x = np.asarray(triplets)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"triplets must have shape (n, ny, nx, 3) (science, reference, difference), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"triplets must be real numbers, got dtype {x.dtype}")
    return x


def standardize(triplets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust per-cutout, per-channel standardisation (steps 1-2 of the module docstring).

    Parameters
    ----------
    triplets : array_like (n, ny, nx, 3) or (ny, nx, 3), float
        Science, reference and difference cutouts (any units; NaN/inf for missing pixels).

    Returns
    -------
    z : ndarray (n, ny, nx, 3) float32
        ``(x - loc) / scale`` clipped to +-:data:`Z_CLIP`; non-finite input pixels stay NaN.
    loc, scale : ndarray (n, 3) float32
        Median and robust sigma of each cutout channel (input units); ``x = loc + scale * z``.
    """
    x = _check(triplets).astype(np.float32, copy=True)
    n = x.shape[0]
    if n == 0:
        return x, np.zeros((0, 3), np.float32), np.ones((0, 3), np.float32)
    x[~np.isfinite(x)] = np.nan
    # (n, 3, npix) so that the medians run along contiguous rows
    flat = np.ascontiguousarray(np.moveaxis(x.reshape(n, -1, 3), -1, 1))
    has_nan = np.isnan(flat).any(axis=-1)  # (n, 3)
    loc = np.empty((n, 3), np.float32)
    mad = np.empty((n, 3), np.float32)
    ok = ~has_nan
    if ok.any():
        rows = flat[ok]
        m = np.median(rows, axis=-1)
        loc[ok] = m
        mad[ok] = np.median(np.abs(rows - m[:, None]), axis=-1)
    if has_nan.any():
        rows = flat[has_nan]
        all_nan = np.isnan(rows).all(axis=-1)
        rows = np.where(all_nan[:, None], 0.0, rows)  # an all-NaN channel: loc 0, scale 1, z NaN -> 0
        m = np.nanmedian(rows, axis=-1)
        loc[has_nan] = m
        mad[has_nan] = np.nanmedian(np.abs(rows - m[:, None]), axis=-1)
    scale = _MAD_TO_SIGMA * mad
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        with np.errstate(invalid="ignore"):
            rows = flat[bad]
            std = np.zeros(len(rows), np.float32)
            fin = np.isfinite(rows).any(axis=-1)
            std[fin] = np.nanstd(rows[fin], axis=-1)
        scale[bad] = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    loc = np.where(np.isfinite(loc), loc, 0.0).astype(np.float32)
    scale = scale.astype(np.float32)
    z = (x - loc[:, None, None, :]) / scale[:, None, None, :]
    np.clip(z, -Z_CLIP, Z_CLIP, out=z)
    return z, loc, scale


def compress(z) -> np.ndarray:
    """``asinh(z / 3)`` with non-finite pixels set to 0 (steps 3-4 of the module docstring).

    Parameters
    ----------
    z : array_like (n, ny, nx, 3), float16 or float32
        Standardised cutouts from :func:`standardize`.

    Returns
    -------
    ndarray (n, ny, nx, 3) float32, the network input.
    """
    z = np.asarray(z, dtype=np.float32)
    out = np.arcsinh(z * np.float32(1.0 / ASINH_SOFTENING))
    out[~np.isfinite(out)] = 0.0
    return out


def preprocess(triplets) -> np.ndarray:
    """Network input of raw triplets: :func:`standardize` then :func:`compress`.

    Parameters
    ----------
    triplets : array_like (n, ny, nx, 3) or (ny, nx, 3), float
        Channel 0 science, 1 reference, 2 difference, as
        :func:`nightsift.kernels.stamps.extract_triplets` returns them (NaN outside the CCD).

    Returns
    -------
    ndarray (n, ny, nx, 3) float32, roughly in [-11, 11] (0 = sky, 1/3 = 1 sigma).

    Raises
    ------
    ValueError
        If the shape is not ``(n, ny, nx, 3)`` or the values are not real numbers.
    """
    z, _, _ = standardize(triplets)
    return compress(z)
