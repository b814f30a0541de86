"""Numba CUDA peak finder: the definition of :mod:`nightsift.kernels.peaks`, one thread per pixel.

The kernel is a thin entry point around :func:`nightsift.kernels._peakbody.peak_sign`, the same
per-pixel test the Numba CPU kernel calls: a thread whose pixel is below ``threshold`` in ``|v|``
returns at once (almost all of them on an S_corr image); the rest test the 8-neighbour maximum
with the raster-order tie rule, then scan the deduplication disc for a stronger same-sign peak.
Survivors take a slot from an atomic counter and write their linear index, value and sign. The
slots come back in a scheduling-dependent order, so the wrapper sorts them by linear index: the
table (built by :func:`nightsift.kernels.peaks.find_peaks`) is then identical to the ``xp``
reference's, run after run.
"""
from __future__ import annotations

import math

from numba import cuda

from .._peakbody import peak_sign
from .._xp import host_scalar
from . import check_cuda_arrays, current_stream

__all__ = ["find_peaks_cuda"]


@cuda.jit
def _peak_kernel(v, excl, has_excl, threshold, r, r2, counter, out_lin, out_val, out_sign):
    """One thread per pixel of the (B, ny, nx) stack ``v``; grid (nx, B * ny)."""
    x, row = cuda.grid(2)
    B, ny, nx = v.shape
    if x >= nx or row >= B * ny:
        return
    b = row // ny
    y = row - b * ny
    s = peak_sign(v, excl, has_excl, b, y, x, threshold, r, r2)
    if s == 0:
        return
    k = cuda.atomic.add(counter, 0, 1)
    if k < out_lin.shape[0]:
        out_lin[k] = (b * ny + y) * nx + x
        out_val[k] = v[b, y, x]
        out_sign[k] = s


def find_peaks_cuda(scores, *, threshold: float, radius: float = 0.0, excluded=None, max_peaks: int = 65536):
    """CUDA kernel of :func:`nightsift.kernels.peaks.find_peaks` (same arguments); returns the raw table.

    Parameters
    ----------
    scores : ndarray (ny, nx) or (B, ny, nx), float32/float64
        Cupy arrays on a GPU, numpy arrays under the simulator (as ``excluded``).
    threshold, radius, excluded, max_peaks
        As :func:`nightsift.kernels.peaks.find_peaks`.

    Returns
    -------
    lin : ndarray (n,) int64
        Linear index ``(b * ny + y) * nx + x`` of every peak, sorted.
    value : ndarray (n,), dtype of ``scores``
    sign : ndarray (n,) int8

    On the device of ``scores``; :func:`nightsift.kernels.peaks.find_peaks` turns them into a
    :class:`~nightsift.kernels.peaks.Peaks` table.
    """
    xp = check_cuda_arrays("find_peaks_cuda", scores, excluded)
    v = scores[None] if scores.ndim == 2 else scores
    v = xp.ascontiguousarray(v)
    B, ny, nx = v.shape
    if excluded is not None:
        ex = xp.ascontiguousarray(xp.asarray(excluded, dtype=bool).reshape(v.shape)).view(xp.uint8)
        has_ex = True
    else:
        ex = xp.zeros((1, 1, 1), dtype=xp.uint8)
        has_ex = False
    r = int(math.floor(radius))
    r2 = float(radius) * float(radius)
    thr = v.dtype.type(threshold)  # compared in the image's dtype, as the xp reference does
    threads = (32, 8)
    blocks = (max(1, -(-nx // threads[0])), max(1, -(-(B * ny) // threads[1])))
    stream = current_stream(xp)
    capacity = int(max_peaks)
    while True:
        counter = xp.zeros(1, dtype=xp.int64)
        lin = xp.empty(capacity, dtype=xp.int64)
        val = xp.empty(capacity, dtype=v.dtype)
        sgn = xp.empty(capacity, dtype=xp.int8)
        _peak_kernel[blocks, threads, stream](v, ex, has_ex, thr, r, r2, counter, lin, val, sgn)
        n = host_scalar(counter[0])  # one 8-byte device-to-host read (synchronises the stream)
        if n <= capacity:
            break
        capacity = n  # rare: relaunch once with the exact size
    order = xp.argsort(lin[:n])
    return lin[:n][order], val[:n][order], sgn[:n][order]
