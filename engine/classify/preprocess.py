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
``loc, scale``), steps 3-4 are :func:`compress`; :func:`preprocess` is both. The statistics and the
pixel transform are compiled Numba loops, parallel over the batch (no TensorFlow import): the
per-cutout medians bound the end-to-end scorer, so they are one quickselect each rather than
numpy's sort-based ``median`` on a transposed copy.

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
from numba import njit, prange

__all__ = ["NORMALIZATION", "ASINH_SOFTENING", "Z_CLIP", "standardize", "compress", "preprocess"]

#: name of the normalisation; stored with every model and dataset (bump it when the maths changes)
NORMALIZATION = "mad-asinh-v1"
#: ``out = asinh(z / ASINH_SOFTENING)``: the noise level (z=1) maps to 1/3
ASINH_SOFTENING = 3.0
#: |z| is clipped here so standardised cutouts fit float16 (max 65504)
Z_CLIP = 60000.0
#: the MAD-to-sigma factor of ``"mad-asinh-v1"`` as defined, 4 digits: part of the stored format
#: (datasets keep ``z``, models were trained on it), so not the exact
#: :data:`nightsift.kernels.background.MAD_TO_SIGMA` (1.4826022); changing it needs a new
#: :data:`NORMALIZATION`. A compiled per-cutout quickselect in float32, hence not
#: :func:`~nightsift.kernels.background.mad_sigma` either.
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


@njit(cache=True, nogil=True, inline="always")
def _select(a, m, k):  # pragma: no cover - compiled
    """The ``k``-th smallest of ``a[:m]`` (Hoare quickselect in place, median-of-three pivot)."""
    lo = 0
    hi = m - 1
    while hi > lo:
        mid = (lo + hi) // 2
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@njit(cache=True, nogil=True, inline="always")
def _median(a, m):  # pragma: no cover - compiled
    """Median of ``a[:m]`` (reorders ``a``); the mean of the two middle values when ``m`` is even."""
    h = m // 2
    upper = _select(a, m, h)
    if m % 2:
        return upper
    lower = a[0]
    for j in range(1, h):  # after the selection, a[:h] holds the h smallest
        if a[j] > lower:
            lower = a[j]
    return np.float32(0.5) * (lower + upper)


@njit(cache=True, nogil=True, parallel=True)
def _robust_stats(x, loc, scale):  # pragma: no cover - compiled
    """Median and robust sigma of every (cutout, channel) of ``x`` (n, ny, nx, c), finite pixels only.

    Two quickselects on a private buffer, with the fall-backs of :func:`standardize`: the standard
    deviation where the MAD is 0, then 1; an all-NaN channel gets loc 0, scale 1.
    """
    n, ny, nx, nc = x.shape
    for k in prange(n * nc):
        i = k // nc
        c = k - i * nc
        buf = np.empty(ny * nx, np.float32)
        m = 0
        for yy in range(ny):
            for xx in range(nx):
                v = x[i, yy, xx, c]
                if np.isfinite(v):
                    buf[m] = v
                    m += 1
        if m == 0:
            loc[i, c] = 0.0
            scale[i, c] = 1.0
            continue
        med = _median(buf, m)
        for j in range(m):
            buf[j] = abs(buf[j] - med)
        s = np.float32(_MAD_TO_SIGMA) * _median(buf, m)
        if not (np.isfinite(s) and s > 0):  # MAD 0 (a plateau): the standard deviation, else 1
            total = 0.0
            cnt = 0
            for yy in range(ny):
                for xx in range(nx):
                    v = x[i, yy, xx, c]
                    if np.isfinite(v):
                        total += v
                        cnt += 1
            mean = total / cnt
            var = 0.0
            for yy in range(ny):
                for xx in range(nx):
                    v = x[i, yy, xx, c]
                    if np.isfinite(v):
                        var += (v - mean) ** 2
            std = np.sqrt(var / cnt)
            s = np.float32(std) if (np.isfinite(std) and std > 0) else np.float32(1.0)
        loc[i, c] = med if np.isfinite(med) else np.float32(0.0)
        scale[i, c] = s


@njit(cache=True, nogil=True, parallel=True)
def _scale_pixels(x, loc, scale, out, fill, gain):  # pragma: no cover - compiled
    """``out = gain * clip((x - loc) / scale, +-Z_CLIP)``; non-finite pixels of ``x`` -> ``fill``."""
    n, ny, nx, nc = x.shape
    lim = np.float32(Z_CLIP)
    g = np.float32(gain)
    f = np.float32(fill)
    for i in prange(n):
        for yy in range(ny):
            for xx in range(nx):
                for c in range(nc):
                    v = np.float32(x[i, yy, xx, c])
                    z = (v - loc[i, c]) / scale[i, c]
                    z = min(max(z, -lim), lim) * g
                    out[i, yy, xx, c] = z if np.isfinite(v) else f


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    loc = np.empty((n, x.shape[-1]), np.float32)
    scale = np.empty((n, x.shape[-1]), np.float32)
    if n:
        _robust_stats(x, loc, scale)
    return loc, scale


def _as_float(triplets) -> np.ndarray:
    x = _check(triplets)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
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
        ``(x - loc) / scale`` clipped to +-:data:`Z_CLIP`; non-finite input pixels become NaN.
    loc, scale : ndarray (n, 3) float32
        Median and robust sigma of each cutout channel (input units); ``x = loc + scale * z``.
    """
    x = _as_float(triplets)
    loc, scale = _stats(x)
    z = np.empty(x.shape, np.float32)
    if len(x):
        _scale_pixels(x, loc, scale, z, np.nan, 1.0)
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
    x = _as_float(triplets)
    loc, scale = _stats(x)
    out = np.empty(x.shape, np.float32)
    if len(x):
        # standardize + compress in one pass: z / 3 with 0 for missing pixels, then numpy's SIMD asinh
        _scale_pixels(x, loc, scale, out, 0.0, 1.0 / ASINH_SOFTENING)
        np.arcsinh(out, out=out)
    return out
