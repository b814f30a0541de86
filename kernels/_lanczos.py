"""Lanczos resampling per output pixel, written once: the bodies shared by the Numba CPU kernels
(here) and the Numba CUDA kernels (:mod:`nightsift.kernels._cuda.resample`).

Conventions are those of :mod:`nightsift.kernels.resample` (read its notes): normalised
Lanczos-``a`` weights over the ``2a x 2a`` source pixels around ``(x, y)``, taps outside the source
dropped, ``fill`` where the position is NaN or outside the source; the mask is the OR of the bits
of the taps with ``|w| > threshold``, ``no_data_bit`` for taps outside the source and for invalid
positions. Weights and sums are float64; the kernel is read from a lookup table
(:func:`lanczos_table`, linear interpolation, < 3e-8 of the peak) instead of evaluated with trig.

Written once, compiled twice
----------------------------
The bodies (:func:`lanczos_taps`, :func:`resample_pixel`, :func:`mask_pixel`) are plain Python
functions decorated with :func:`numba.extending.register_jitable`: Numba compiles them into any
``@njit`` function (CPU) or ``@cuda.jit`` kernel (GPU) that calls them, and under the CUDA
simulator they run as the Python they are. They never allocate: their scratch arrays (the
``2a`` tap weights per axis, one accumulator per plane) are arguments, ``np.empty`` per row here
and ``cuda.local.array`` per thread in the CUDA kernels. Everything is batched: sources
``(B, k, ny, nx)`` (masks ``(B, ny, nx)``) with maps ``(B, ny_out, nx_out)``, one geometry per
pair; :func:`batched_layout` brings the public 2-D/3-D forms to that layout with views.

The CPU entry points (:func:`resample_rows`, :func:`mask_rows`; ``@njit(parallel=True,
cache=True)``, ``prange`` over the ``B * ny_out`` output rows) sit in this file on purpose: Numba's
on-disk cache of a function is invalidated only when *its own* source file changes, not when a
function it calls from another module does, so kernels cached in another file would keep running
an old body after an edit here.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

__all__ = ["MAX_TAPS", "TABLE_STEPS", "lanczos_table", "lanczos_taps", "resample_pixel", "mask_pixel",
           "resample_rows", "mask_rows", "batched_layout"]

MAX_TAPS = 16  # 2a for a <= 8 (the public functions' limit): the CUDA kernels' local arrays


# --------------------------------------------------------------------------------------------
# per-pixel bodies (CPU njit, CUDA, simulator)
# --------------------------------------------------------------------------------------------
#: samples of the Lanczos kernel per pixel in :func:`lanczos_table` (linear interpolation between
#: them errs by < 3e-8 of the kernel's peak: max |L''| / (8 S^2))
TABLE_STEPS = 4096

_TABLES: dict = {}


def lanczos_table(a: int) -> np.ndarray:
    """``L_a(t)`` at ``t = k / TABLE_STEPS`` for ``k = 0 .. a TABLE_STEPS + 1`` (float64, cached):
    the kernel as a lookup table, exact 1 at 0 and exact 0 at the integers and beyond ``a``, so
    integer shifts stay pure copies."""
    tab = _TABLES.get(int(a))
    if tab is None:
        t = np.arange(int(a) * TABLE_STEPS + 2, dtype=np.float64) / TABLE_STEPS
        with np.errstate(invalid="ignore", divide="ignore"):
            tab = np.sinc(t) * np.sinc(t / a)
        tab[0] = 1.0
        tab[TABLE_STEPS::TABLE_STEPS] = 0.0
        tab[t >= a] = 0.0
        _TABLES[int(a)] = tab
    return tab


@register_jitable(forceinline=True)
def lanczos_taps(x, x0, a, table, w):
    """``w[k] = L_a(x - (x0 + k))`` for ``k < 2a``, linearly interpolated in ``table``
    (:func:`lanczos_table`); float64 ``w`` of length >= ``2a``. No trig: a few multiply-adds per
    tap (the trig recurrences it replaced cost ~3/4 of the CPU kernel's time)."""
    steps = TABLE_STEPS
    for k in range(2 * a):
        at = abs(x - (x0 + k))
        if at >= a:
            w[k] = 0.0
        else:
            u = at * steps
            i = int(u)
            f = u - i
            w[k] = table[i] + f * (table[i + 1] - table[i])


@register_jitable(forceinline=True)
def resample_pixel(img, b, j, i, x, y, a, table, fill, out, wx, wy, acc):
    """Write ``out[b, :, j, i]``: every plane of ``img[b]`` resampled at source position ``(x, y)``.

    Parameters
    ----------
    img : (B, k, ny, nx) float32/float64
    b, j, i : int
        Pair index and output pixel (row ``j``, column ``i``).
    x, y : float
        Source column and row of that output pixel's centre (NaN: no source).
    a : int
        Lanczos order.
    table : float64 (a TABLE_STEPS + 2,)
        :func:`lanczos_table` of ``a``.
    fill : float
        Output value without a valid position (or with all weights zero).
    out : (B, k, ny_out, nx_out)
    wx, wy : float64 scratch, length >= 2a; acc : float64 scratch, length >= k
    """
    nplane = img.shape[1]
    ny = img.shape[2]
    nx = img.shape[3]
    if not (x >= -0.5 and x <= nx - 0.5 and y >= -0.5 and y <= ny - 0.5):  # NaN fails too
        for p in range(nplane):
            out[b, p, j, i] = fill
        return
    n = 2 * a
    x0 = int(math.floor(x)) - (a - 1)
    y0 = int(math.floor(y)) - (a - 1)
    lanczos_taps(x, x0, a, table, wx)
    lanczos_taps(y, y0, a, table, wy)
    for k in range(n):
        if x0 + k < 0 or x0 + k >= nx:
            wx[k] = 0.0
        if y0 + k < 0 or y0 + k >= ny:
            wy[k] = 0.0
    for p in range(nplane):
        acc[p] = 0.0
    den = 0.0
    for ky in range(n):
        w_y = wy[ky]
        if w_y == 0.0:
            continue
        iy = y0 + ky
        for kx in range(n):
            w = w_y * wx[kx]
            if w == 0.0:
                continue
            ix = x0 + kx
            den += w
            for p in range(nplane):
                acc[p] += w * img[b, p, iy, ix]
    if abs(den) > 1e-12:
        for p in range(nplane):
            out[b, p, j, i] = acc[p] / den
    else:
        for p in range(nplane):
            out[b, p, j, i] = fill


@register_jitable(forceinline=True)
def mask_pixel(mask, b, x, y, a, table, no_data_bit, threshold, wx, wy):
    """The resampled bits of ``mask[b]`` at source position ``(x, y)`` (returned, an integer).

    OR of the bits of the taps with ``|L(dx) L(dy)| > threshold``; ``no_data_bit`` for such taps
    outside the source and for an invalid position. Fast exit without trig: a footprint inside
    the source with no bit set anywhere gives 0. ``mask`` is (B, ny, nx) integer; ``wx``, ``wy``
    float64 scratch of length >= 2a.
    """
    ny = mask.shape[1]
    nx = mask.shape[2]
    if not (x >= -0.5 and x <= nx - 0.5 and y >= -0.5 and y <= ny - 0.5):
        return no_data_bit
    n = 2 * a
    x0 = int(math.floor(x)) - (a - 1)
    y0 = int(math.floor(y)) - (a - 1)
    if x0 >= 0 and y0 >= 0 and x0 + n <= nx and y0 + n <= ny:
        any_bits = 0
        for ky in range(n):
            for kx in range(n):
                any_bits |= mask[b, y0 + ky, x0 + kx]
        if any_bits == 0:
            return 0
    lanczos_taps(x, x0, a, table, wx)
    lanczos_taps(y, y0, a, table, wy)
    bits = 0
    for ky in range(n):
        iy = y0 + ky
        for kx in range(n):
            if abs(wy[ky] * wx[kx]) > threshold:
                ix = x0 + kx
                if iy >= 0 and iy < ny and ix >= 0 and ix < nx:
                    bits |= mask[b, iy, ix]
                else:
                    bits |= no_data_bit
    return bits


# --------------------------------------------------------------------------------------------
# Numba CPU entry points (numpy arrays): prange over the B * ny_out output rows
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def resample_rows(img, xs, ys, a, table, fill, out):  # pragma: no cover - compiled
    """img (B, k, ny, nx); xs, ys (B, ny_out, nx_out) float64; out (B, k, ny_out, nx_out)."""
    nplane = img.shape[1]
    nyo = xs.shape[1]
    nxo = xs.shape[2]
    n = 2 * a
    for row in prange(xs.shape[0] * nyo):
        b = row // nyo
        j = row - b * nyo
        wx = np.empty(n)
        wy = np.empty(n)
        acc = np.empty(nplane)
        for i in range(nxo):
            resample_pixel(img, b, j, i, xs[b, j, i], ys[b, j, i], a, table, fill, out, wx, wy, acc)


@njit(parallel=True, cache=True)
def mask_rows(mask, xs, ys, a, table, no_data_bit, threshold, out):  # pragma: no cover - compiled
    """mask (B, ny, nx) integer; xs, ys (B, ny_out, nx_out) float64; out (B, ny_out, nx_out)."""
    nyo = xs.shape[1]
    nxo = xs.shape[2]
    n = 2 * a
    for row in prange(xs.shape[0] * nyo):
        b = row // nyo
        j = row - b * nyo
        wx = np.empty(n)
        wy = np.empty(n)
        for i in range(nxo):
            out[b, j, i] = mask_pixel(mask, b, xs[b, j, i], ys[b, j, i], a, table, no_data_bit, threshold, wx, wy)


# --------------------------------------------------------------------------------------------
# shapes (plain Python, any array module)
# --------------------------------------------------------------------------------------------
def batched_layout(name: str, source, x_src, y_src, *, planes: bool):
    """Views of ``source`` and the maps in the kernels' batched layout, and the inverse for the result.

    Accepted forms (the maps' rank decides):

    ============================  ==================================  ===============================
    maps ``x_src``, ``y_src``     ``source`` (``planes=True``)        ``source`` (``planes=False``)
    ============================  ==================================  ===============================
    (ny_out, nx_out)              (ny, nx) or (k, ny, nx)             (ny, nx)
    (B, ny_out, nx_out)           (B, ny, nx) or (B, k, ny, nx)       (B, ny, nx)
    ============================  ==================================  ===============================

    With 3-D maps a 3-D source is a batch of single planes (e.g. a stack of PSF stamps, each
    through its own map), not one stack of planes.

    Returns
    -------
    src : (B, k, ny, nx) if ``planes`` else (B, ny, nx)
    xs, ys : (B, ny_out, nx_out)
    unbatch : callable
        Maps the kernels' (B, [k,] ny_out, nx_out) result back to the rank of the input form.

    Raises
    ------
    ValueError
        Maps of different shapes or rank, a source of the wrong rank, batch sizes that differ.
    """
    if tuple(x_src.shape) != tuple(y_src.shape) or x_src.ndim not in (2, 3):
        raise ValueError(f"{name}: x_src and y_src must be (ny_out, nx_out) or (B, ny_out, nx_out) arrays of the "
                         f"same shape; got {tuple(x_src.shape)} and {tuple(y_src.shape)}")
    batched = x_src.ndim == 3
    ranks = ((3, 4) if planes else (3,)) if batched else ((2, 3) if planes else (2,))
    if source.ndim not in ranks:
        forms = {(2, 3): "(ny, nx) or (k, ny, nx)", (2,): "(ny, nx)", (3, 4): "(B, ny, nx) or (B, k, ny, nx)",
                 (3,): "(B, ny, nx)"}[ranks]
        raise ValueError(f"{name}: {x_src.ndim}-D maps {tuple(x_src.shape)} need a {forms} source, "
                         f"got shape {tuple(source.shape)}")
    if min(source.shape[-2:]) < 1:
        raise ValueError(f"{name}: the source image is empty, shape {tuple(source.shape)}")
    if batched and source.shape[0] != x_src.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: source {source.shape[0]}, maps {x_src.shape[0]}")
    ndim_in = source.ndim
    src = source
    if not batched:
        src = src[None]
        xs, ys = x_src[None], y_src[None]
    else:
        xs, ys = x_src, y_src
    single_plane = planes and ndim_in == (3 if batched else 2)
    if single_plane:
        src = src[:, None]

    def unbatch(out):
        if single_plane:
            out = out[:, 0]
        return out if batched else out[0]

    return src, xs, ys, unbatch
