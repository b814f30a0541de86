"""Signed local maxima of a score image (S_corr), with a deterministic deduplication.

One definition, three implementations that give identical tables: a vectorised ``xp`` reference
(numpy, cupy or any array-API namespace, whole-array operations; the oracle), a Numba CPU kernel
for numpy arrays (rows in parallel, two passes: count, then fill at prefix-sum offsets) and a
Numba CUDA kernel for cupy arrays (:mod:`nightsift.kernels._cuda.peaks`, one thread per pixel,
compacted through an atomic counter). Both Numba kernels call the same per-pixel test,
:func:`nightsift.kernels._peakbody.peak_sign`, written once.

Definition
----------
Images are ``(ny, nx)`` or a batch ``(B, ny, nx)``; pixels are ``(b, y, x)``, 0-based, ordered by
their linear index ``(b * ny + y) * nx + x``. Non-finite pixels count as 0. With ``s = +1``
(positive peaks) or ``s = -1`` (negative peaks, i.e. minima), a pixel ``p`` is a **peak of sign
s** when

1. ``s * v[p] > threshold`` and ``p`` is not ``excluded`` (the threshold is compared in the image's
   dtype, as numpy compares a float32 array with a Python float: ``float32(threshold)``);
2. for each of its 8 neighbours ``q`` inside the image (neighbours never cross images of a batch):
   ``s * v[p] > s * v[q]`` if ``q`` comes before ``p`` in raster order (the row above, or the
   pixel to the left), ``s * v[p] >= s * v[q]`` otherwise. A flat top thus yields its first
   pixel(s) in raster order rather than every pixel.

**Deduplication** (``radius > 0``): a peak ``p`` is dropped when a *stronger* peak ``q`` of the same
sign lies within ``radius`` pixels (``dy**2 + dx**2 <= radius**2``, same image). Stronger means
``|v[q]| > |v[p]|``, ties going to the smaller linear index. Every peak is judged against the
full set of peaks (not greedily against the survivors), so the result does not depend on an
evaluation order and each kept peak is the strongest of its own disc; of a chain A > B > C with
A-B and B-C closer than ``radius`` but A-C not, only A is kept.

Output is a :class:`Peaks` table sorted by linear index, i.e. by ``(image, y, x)``.

>>> import numpy as np
>>> s = np.zeros((5, 6), np.float32); s[2, 3] = 7.0; s[4, 0] = -6.0; s[2, 4] = 6.5
>>> p = find_peaks(s, threshold=5.0, radius=0)
>>> [(int(a), int(b), float(c), int(d)) for a, b, c, d in zip(p.y, p.x, p.value, p.sign)]
[(2, 3, 7.0, 1), (4, 0, -6.0, -1)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._peakbody import find_peaks_rows
from ._xp import array_namespace, is_cupy, is_host

__all__ = ["Peaks", "find_peaks", "refine_peaks", "disc_offsets"]

_METHODS = ("auto", "numba", "reference", "cuda")


@dataclass(frozen=True)
class Peaks:
    """Peaks of a batch of score images, sorted by ``(image, y, x)``; arrays on the input's device.

    Attributes
    ----------
    image : ndarray (n,) int64
        Index of the image in the batch (0 for a single 2-D image).
    y, x : ndarray (n,) int64
        Row and column of the peak pixel (0-based).
    value : ndarray (n,), dtype of the score image
        Signed score at the peak (sigma for S_corr).
    sign : ndarray (n,) int8
        +1 for a maximum above ``threshold``, -1 for a minimum below ``-threshold``.
    """

    image: object
    y: object
    x: object
    value: object
    sign: object

    def __len__(self) -> int:
        return int(self.x.shape[0])


def disc_offsets(radius: float) -> list[tuple[int, int]]:
    """Integer offsets ``(dy, dx) != (0, 0)`` with ``dy**2 + dx**2 <= radius**2``, raster order."""
    r = int(math.floor(radius))
    r2 = float(radius) * float(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
            if (dy or dx) and float(dy * dy + dx * dx) <= r2]


def _check(scores, threshold, radius, excluded, method, max_peaks):
    if scores.ndim not in (2, 3) or min(scores.shape[-2:]) < 1:
        raise ValueError(f"find_peaks: scores must be (ny, nx) or (B, ny, nx), got shape {tuple(scores.shape)}")
    if not (isinstance(threshold, (int, float, np.integer, np.floating)) and math.isfinite(threshold)
            and threshold >= 0):
        raise ValueError(f"find_peaks: threshold must be a finite number >= 0 (sigma), got {threshold!r}")
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"find_peaks: radius must be a finite number >= 0 (pixels), got {radius!r}")
    if excluded is not None and tuple(excluded.shape) != tuple(scores.shape):
        raise ValueError(f"find_peaks: excluded has shape {tuple(excluded.shape)}, scores {tuple(scores.shape)}; "
                         "they must match")
    if method not in _METHODS:
        raise ValueError(f"find_peaks: method must be one of {_METHODS}, got {method!r}")
    if int(max_peaks) < 1:
        raise ValueError(f"find_peaks: max_peaks must be >= 1, got {max_peaks!r}")


def find_peaks(scores, *, threshold: float, radius: float = 0.0, excluded=None, method: str = "auto",
               max_peaks: int = 65536) -> Peaks:
    """Positive and negative local maxima of ``|scores|`` above ``threshold`` (see module notes).

    Parameters
    ----------
    scores : ndarray (ny, nx) or (B, ny, nx), float32 or float64, numpy or cupy
        Score images, e.g. S_corr in sigma. Not modified.
    threshold : float, keyword-only
        Detection threshold on ``|scores|`` (same units, sigma), >= 0.
    radius : float, keyword-only
        Deduplication radius (pixels); 0 keeps every local maximum.
    excluded : ndarray of bool, same shape as ``scores``, optional
        Pixels that may not be peaks (masked); they still count as neighbours.
    method : {"auto", "numba", "reference", "cuda"}, keyword-only
        ``"auto"``: the Numba CPU kernel for numpy arrays, the CUDA kernel for cupy arrays, the
        ``xp`` reference for any other array namespace. ``"numba"`` (numpy only) and ``"cuda"``
        force a kernel (``"cuda"`` also runs under the CUDA simulator on numpy arrays: tests);
        ``"reference"`` forces the vectorised ``xp`` oracle. All give the same table.
    max_peaks : int, keyword-only
        Initial capacity of the CUDA kernel's output; more peaks trigger one relaunch with the
        exact size (the result does not depend on it; the other methods ignore it).

    Returns
    -------
    Peaks
        Sorted by ``(image, y, x)``; empty arrays when there is no peak.

    Raises
    ------
    ValueError
        Bad shapes, a negative or non-finite threshold or radius, an unknown method, ``"numba"``
        for non-numpy arrays.
    """
    _check(scores, threshold, radius, excluded, method, max_peaks)
    xp = array_namespace(scores, excluded)
    if scores.dtype.kind != "f":
        scores = scores.astype(xp.float64)
    if method == "numba" and not is_host(xp):
        raise ValueError("find_peaks: method='numba' needs numpy arrays; use 'reference' (or 'cuda' for cupy arrays)")
    v = scores[None] if scores.ndim == 2 else scores
    if method == "cuda" or (method == "auto" and is_cupy(xp)):
        from ._cuda.peaks import find_peaks_cuda

        lin, val, sgn = find_peaks_cuda(v, threshold=float(threshold), radius=float(radius), excluded=excluded,
                                        max_peaks=int(max_peaks))
        return _table(lin, val, sgn, v.shape)
    if method == "numba" or (method == "auto" and is_host(xp)):
        v = np.ascontiguousarray(v)
        if excluded is not None:
            ex = np.ascontiguousarray(excluded, dtype=bool).reshape(v.shape).view(np.uint8)
        else:
            ex = np.zeros((1, 1, 1), dtype=np.uint8)
        # the threshold in the image's dtype: the comparisons of the reference (float32 images
        # compare with a float32 threshold)
        lin, val, sgn = find_peaks_rows(v, ex, excluded is not None, v.dtype.type(threshold),
                                        int(math.floor(radius)), float(radius) * float(radius))
        return _table(lin, val, sgn, v.shape)
    return _find_peaks_reference(scores, float(threshold), float(radius), excluded)


def _table(lin, val, sgn, shape):
    """The :class:`Peaks` table of a kernel's ``(linear index, value, sign)`` arrays, sorted by
    linear index, for a (B, ny, nx) stack."""
    _, ny, nx = shape
    b = lin // (ny * nx)
    rem = lin - b * (ny * nx)
    y = rem // nx
    return Peaks(image=b, y=y, x=rem - y * nx, value=val, sign=sgn)


def _local_max(xp, v, fill):
    """Boolean map of pixels of the (B, ny, nx) stack ``v`` that beat their 8 neighbours
    (strictly those before them in raster order); outside the image counts as ``fill`` (-inf)."""
    B, ny, nx = v.shape
    vp = xp.pad(v, ((0, 0), (1, 1), (1, 1)), mode="constant", constant_values=fill)
    ok = xp.ones(v.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = vp[:, 1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
            earlier = dy < 0 or (dy == 0 and dx < 0)
            ok &= (v > nb) if earlier else (v >= nb)
    return ok


def _find_peaks_reference(scores, threshold, radius, excluded):
    xp = array_namespace(scores, excluded)
    single = scores.ndim == 2
    v = scores[None] if single else scores
    v = xp.where(xp.isfinite(v), v, xp.zeros((), dtype=v.dtype))
    ex = None
    if excluded is not None:
        ex = xp.asarray(excluded, dtype=bool)
        ex = ex[None] if single else ex
    B, ny, nx = v.shape
    fill = -np.inf
    pos = (v > threshold) & _local_max(xp, v, fill)
    neg = (-v > threshold) & _local_max(xp, -v, fill)
    if ex is not None:
        pos &= ~ex
        neg &= ~ex
    b, y, x = xp.nonzero(pos | neg)
    b, y, x = b.astype(xp.int64), y.astype(xp.int64), x.astype(xp.int64)
    val = v[b, y, x]
    sign = xp.where(val > 0, 1, -1).astype(xp.int8)
    if radius > 0 and b.shape[0]:
        av = xp.abs(val)
        pos_sign = sign > 0
        suppressed = xp.zeros(b.shape, dtype=bool)
        for dy, dx in disc_offsets(radius):
            qy, qx = y + dy, x + dx
            inb = (qy >= 0) & (qy < ny) & (qx >= 0) & (qx < nx)
            qy, qx = xp.clip(qy, 0, ny - 1), xp.clip(qx, 0, nx - 1)
            q_peak = xp.where(pos_sign, pos[b, qy, qx], neg[b, qy, qx])
            aq = xp.abs(v[b, qy, qx])
            earlier = dy < 0 or (dy == 0 and dx < 0)
            beats = (aq > av) | ((aq == av) if earlier else xp.zeros(av.shape, dtype=bool))
            suppressed |= inb & q_peak & beats
        keep = ~suppressed
        b, y, x, val, sign = b[keep], y[keep], x[keep], val[keep], sign[keep]
    # xp.nonzero already returns raster (linear index) order
    return Peaks(image=b, y=y, x=x, value=val, sign=sign)


def refine_peaks(scores, peaks: Peaks):
    """Sub-pixel peak positions from a 3x3 quadratic fit of ``sign * scores`` (as the detect stage).

    Parameters
    ----------
    scores : ndarray (ny, nx) or (B, ny, nx)
        The images the peaks were found in.
    peaks : Peaks

    Returns
    -------
    x, y : ndarray (n,) float64
        ``x + dx``, ``y + dy`` with ``|dx|, |dy| <= 0.5`` (0 where the curvature is not negative),
        clipped to the image (``0 <= x <= nx - 1``, same in ``y``).
    """
    xp = array_namespace(scores)
    v = scores[None] if scores.ndim == 2 else scores
    B, ny, nx = v.shape
    b, yi, xi = peaks.image, peaks.y, peaks.x
    s = xp.asarray(peaks.sign, dtype=xp.float64)

    def at(yy, xx):
        a = v[b, xp.clip(yy, 0, ny - 1), xp.clip(xx, 0, nx - 1)].astype(xp.float64) * s
        return xp.where(xp.isfinite(a), a, 0.0)

    c = at(yi, xi)
    left, right, up, down = at(yi, xi - 1), at(yi, xi + 1), at(yi - 1, xi), at(yi + 1, xi)
    ax = left - 2 * c + right
    ay = up - 2 * c + down
    dx = xp.where(ax < 0, 0.5 * (left - right) / xp.where(ax < 0, ax, -1.0), 0.0)
    dy = xp.where(ay < 0, 0.5 * (up - down) / xp.where(ay < 0, ay, -1.0), 0.0)
    # a peak on the first/last row or column may interpolate past it: keep positions on the grid
    return (xp.clip(xi + xp.clip(dx, -0.5, 0.5), 0, nx - 1),
            xp.clip(yi + xp.clip(dy, -0.5, 0.5), 0, ny - 1))
