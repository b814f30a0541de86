"""Numba CUDA cutout gather: every stamp of every candidate of a batch in one launch.

One thread per stamp pixel (``n * size * size`` threads, consecutive threads on consecutive
columns so reads and writes coalesce); each thread copies the pixel of the science, reference
and difference image into the three channels, or NaN where the stamp leaves the image. The
first thread of each stamp also writes its ``padded`` flag. The stamp centres are rounded on
the array side with ``xp.rint`` (half to even) exactly as :func:`nightsift.kernels.stamps.
extract_stamps` does, so the result equals ``extract_triplets`` bit for bit.
"""
from __future__ import annotations

import math

from numba import cuda

from . import check_cuda_arrays, current_stream, launch_config

__all__ = ["gather_triplets_cuda"]


@cuda.jit
def _gather_kernel(sci, ref, diff, img, cy, cx, size, channels_last, out, padded):
    t = cuda.grid(1)
    ss = size * size
    n = cy.shape[0]
    if t >= n * ss:
        return
    k = t // ss
    r = t - k * ss
    j = r // size
    i = r - j * size
    half = size // 2
    ny = sci.shape[1]
    nx = sci.shape[2]
    b = img[k]
    yy = cy[k] - half + j
    xx = cx[k] - half + i
    inside = yy >= 0 and yy < ny and xx >= 0 and xx < nx
    nan = math.nan
    a0 = sci[b, yy, xx] if inside else nan
    a1 = ref[b, yy, xx] if inside else nan
    a2 = diff[b, yy, xx] if inside else nan
    if channels_last:
        out[k, j, i, 0] = a0
        out[k, j, i, 1] = a1
        out[k, j, i, 2] = a2
    else:
        out[k, 0, j, i] = a0
        out[k, 1, j, i] = a1
        out[k, 2, j, i] = a2
    if r == 0:
        y0 = cy[k] - half
        x0 = cx[k] - half
        padded[k] = 0 if (y0 >= 0 and x0 >= 0 and y0 + size <= ny and x0 + size <= nx) else 1


def gather_triplets_cuda(science, reference, difference, image, x, y, *, size: int = 63,
                         channels_last: bool = True):
    """CUDA twin of :func:`nightsift.kernels.cutouts.gather_triplets` (inputs already validated).

    Parameters
    ----------
    science, reference, difference : ndarray (B, ny, nx), cupy (numpy under the simulator)
    image : ndarray (n,) int
        Batch index of each candidate.
    x, y : ndarray (n,) float
        Finite 0-based centres (column, row).
    size : int
        Odd stamp side.
    channels_last : bool
        ``(n, size, size, 3)`` when True, ``(n, 3, size, size)`` otherwise.

    Returns
    -------
    stamps : ndarray float32, padded : ndarray (n,) bool
    """
    xp = check_cuda_arrays("gather_triplets_cuda", science, reference, difference)
    n = int(x.shape[0])
    shape = (n, size, size, 3) if channels_last else (n, 3, size, size)
    out = xp.empty(shape, dtype=xp.float32)
    padded = xp.zeros(n, dtype=xp.uint8)
    if n == 0:
        return out, padded.astype(bool)
    cy = xp.rint(xp.asarray(y, dtype=xp.float64)).astype(xp.int64)
    cx = xp.rint(xp.asarray(x, dtype=xp.float64)).astype(xp.int64)
    img = xp.ascontiguousarray(xp.asarray(image, dtype=xp.int64))
    sci, ref, dif = (xp.ascontiguousarray(a) for a in (science, reference, difference))
    blocks, threads = launch_config(n * size * size, 256)
    _gather_kernel[blocks, threads, current_stream(xp)](sci, ref, dif, img, cy, cx, int(size), bool(channels_last),
                                                       out, padded)
    return out, padded.astype(bool)
