"""The peak test of :mod:`nightsift.kernels.peaks`, written once: the body shared by the Numba CPU
kernel (here) and the Numba CUDA kernel (:mod:`nightsift.kernels._cuda.peaks`).

:func:`peak_sign` decides for one pixel of a ``(B, ny, nx)`` stack whether it is a positive peak,
a negative peak or neither, by the definition in :mod:`nightsift.kernels.peaks` (threshold and
exclusion, the 8-neighbour maximum with the raster-order tie rule, and the deduplication disc:
the pixel is dropped when a stronger same-sign peak lies within ``radius``, where each candidate
in the disc is itself re-tested as a peak: reads only, no second pass). It is a plain Python
function decorated with :func:`numba.extending.register_jitable`: compiled into ``@njit`` and
``@cuda.jit`` callers, run as Python under the CUDA simulator.

Comparisons: ``threshold`` is compared with pixel values as given (the wrappers pass it in the
image's dtype, as the ``xp`` reference compares a float32 image with a float32 threshold); the
products ``s * v`` are exact in float64, so ties are exact ties.

The CPU entry point :func:`find_peaks_rows` sits in this file because Numba's on-disk cache of a
function is invalidated only when its own source file changes (see :mod:`nightsift.kernels._lanczos`).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

__all__ = ["peak_sign", "find_peaks_rows"]


@register_jitable(forceinline=True)
def finite_or_zero(v, b, y, x):
    """``v[b, y, x]``, or 0 where it is not finite (non-finite pixels count as 0)."""
    a = v[b, y, x]
    return a if math.isfinite(a) else 0.0


@register_jitable
def is_local_max(v, b, y, x, s, ny, nx):
    """``s * v[b, y, x]`` beats its in-image 8 neighbours: strictly those before it in raster
    order (the row above, the pixel to the left), or equal those after it."""
    c = s * finite_or_zero(v, b, y, x)
    for dy in range(-1, 2):
        yy = y + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-1, 2):
            xx = x + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= nx:
                continue
            w = s * finite_or_zero(v, b, yy, xx)
            if dy < 0 or (dy == 0 and dx < 0):
                if not c > w:
                    return False
            elif not c >= w:
                return False
    return True


@register_jitable(forceinline=True)
def peak_sign(v, excl, has_excl, b, y, x, threshold, r, r2):
    """+1 if pixel ``(b, y, x)`` of the stack ``v`` is a positive peak, -1 a negative one, else 0.

    Parameters
    ----------
    v : (B, ny, nx) float32/float64
        Score images (non-finite pixels count as 0).
    excl : (B, ny, nx) uint8 (or bool), read only where ``has_excl``
        Non-zero: the pixel may not be a peak (it still counts as a neighbour).
    has_excl : bool
    b, y, x : int
    threshold : float, >= 0
        ``s * v > threshold`` is required.
    r : int
        ``floor(radius)``; 0 (with ``r2 = 0``) disables the deduplication.
    r2 : float
        ``radius**2``; disc offsets satisfy ``dy**2 + dx**2 <= r2``.

    A pixel below ``threshold`` in ``|v|`` costs one read and two comparisons (the early exit
    that almost every pixel of an S_corr image takes).
    """
    a = finite_or_zero(v, b, y, x)
    if a > threshold:
        s = 1.0
    elif -a > threshold:
        s = -1.0
    else:
        return 0
    if has_excl and excl[b, y, x] != 0:
        return 0
    ny = v.shape[1]
    nx = v.shape[2]
    if not is_local_max(v, b, y, x, s, ny, nx):
        return 0
    av = s * a
    for dy in range(-r, r + 1):
        qy = y + dy
        if qy < 0 or qy >= ny:
            continue
        for dx in range(-r, r + 1):
            qx = x + dx
            if qx < 0 or qx >= nx or (dy == 0 and dx == 0) or dy * dy + dx * dx > r2:
                continue
            aq = s * finite_or_zero(v, b, qy, qx)  # a same-sign peak q stronger than p has s*v[q] >= |v[p]|
            if aq > av or (aq == av and (dy < 0 or (dy == 0 and dx < 0))):
                if has_excl and excl[b, qy, qx] != 0:
                    continue
                if is_local_max(v, b, qy, qx, s, ny, nx):
                    return 0
    return 1 if s > 0 else -1


@njit(parallel=True, cache=True)
def find_peaks_rows(v, excl, has_excl, threshold, r, r2):  # pragma: no cover - compiled
    """All peaks of the (B, ny, nx) stack ``v``, sorted by linear index ``(b * ny + y) * nx + x``.

    Two passes over the ``B * ny`` rows in parallel: count the peaks of every row, then (after a
    prefix sum) fill each row that has any at its offset, in column order. Returns
    ``(lin int64 (n,), value (n,) v.dtype, sign int8 (n,))``.
    """
    B, ny, nx = v.shape
    rows = B * ny
    counts = np.zeros(rows, dtype=np.int64)
    for row in prange(rows):
        b = row // ny
        y = row - b * ny
        c = 0
        for x in range(nx):
            if peak_sign(v, excl, has_excl, b, y, x, threshold, r, r2) != 0:
                c += 1
        counts[row] = c
    n_busy = 0
    for row in range(rows):
        if counts[row]:
            n_busy += 1
    busy = np.empty(n_busy, dtype=np.int64)  # rows with peaks, and where their entries start
    start = np.empty(n_busy, dtype=np.int64)
    total = 0
    k = 0
    for row in range(rows):
        if counts[row]:
            busy[k] = row
            start[k] = total
            total += counts[row]
            k += 1
    lin = np.empty(total, dtype=np.int64)
    val = np.empty(total, dtype=v.dtype)
    sgn = np.empty(total, dtype=np.int8)
    for k in prange(n_busy):
        row = busy[k]
        b = row // ny
        y = row - b * ny
        o = start[k]
        for x in range(nx):
            s = peak_sign(v, excl, has_excl, b, y, x, threshold, r, r2)
            if s != 0:
                lin[o] = row * nx + x
                val[o] = v[b, y, x]
                sgn[o] = s
                o += 1
    return lin, val, sgn
