"""Numba CUDA peak finder: the definition of :mod:`nightsift.kernels.peaks`, one thread per pixel.

A thread whose pixel is below ``threshold`` in ``|v|`` returns at once (almost all of them on an
S_corr image). The rest test the 8-neighbour maximum with the raster-order tie rule, then scan
the deduplication disc for a stronger same-sign peak (each candidate re-tests that neighbour's
peak condition: reads only, no second pass or grid sync). Survivors take a slot from an atomic
counter and write their linear index, value and sign. The slots come back in a scheduling-
dependent order, so the wrapper sorts them by linear index: the table is then identical to the
``xp`` reference's, run after run.
"""
from __future__ import annotations

import math

from numba import cuda

from . import check_cuda_arrays, current_stream

__all__ = ["find_peaks_cuda"]


@cuda.jit(device=True, inline=True)
def _val(v, b, y, x):
    a = v[b, y, x]
    return a if math.isfinite(a) else 0.0


@cuda.jit(device=True)
def _is_local_max(v, b, y, x, s, ny, nx):
    c = s * _val(v, b, y, x)
    for dy in range(-1, 2):
        yy = y + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-1, 2):
            xx = x + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= nx:
                continue
            w = s * _val(v, b, yy, xx)
            if dy < 0 or (dy == 0 and dx < 0):
                if not c > w:
                    return False
            elif not c >= w:
                return False
    return True


@cuda.jit
def _peak_kernel(v, excl, has_excl, threshold, r, r2, counter, out_lin, out_val, out_sign):
    """One thread per pixel of the (B, ny, nx) stack ``v``; grid (nx, B * ny)."""
    x, row = cuda.grid(2)
    B, ny, nx = v.shape
    if x >= nx or row >= B * ny:
        return
    b = row // ny
    y = row - b * ny
    a = _val(v, b, y, x)
    if a > threshold:
        s = 1.0
    elif -a > threshold:
        s = -1.0
    else:
        return
    if has_excl and excl[b, y, x] != 0:
        return
    if not _is_local_max(v, b, y, x, s, ny, nx):
        return
    av = s * a
    for dy in range(-r, r + 1):
        qy = y + dy
        if qy < 0 or qy >= ny:
            continue
        for dx in range(-r, r + 1):
            qx = x + dx
            if qx < 0 or qx >= nx or (dy == 0 and dx == 0) or dy * dy + dx * dx > r2:
                continue
            aq = s * _val(v, b, qy, qx)  # a same-sign peak stronger than p has s * v[q] >= |v[p]|
            if aq > av or (aq == av and (dy < 0 or (dy == 0 and dx < 0))):
                if has_excl and excl[b, qy, qx] != 0:
                    continue
                if _is_local_max(v, b, qy, qx, s, ny, nx):
                    return
    k = cuda.atomic.add(counter, 0, 1)
    if k < out_lin.shape[0]:
        out_lin[k] = (b * ny + y) * nx + x
        out_val[k] = a
        out_sign[k] = 1 if s > 0 else -1


def find_peaks_cuda(scores, *, threshold: float, radius: float = 0.0, excluded=None, max_peaks: int = 65536):
    """CUDA twin of :func:`nightsift.kernels.peaks.find_peaks` (same arguments and result).

    ``scores`` and ``excluded`` are cupy arrays on a GPU, numpy arrays under the simulator.
    Returns a :class:`~nightsift.kernels.peaks.Peaks` on the same device.
    """
    from ..peaks import Peaks

    xp = check_cuda_arrays("find_peaks_cuda", scores, excluded)
    single = scores.ndim == 2
    v = scores[None] if single else scores
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
    threads = (32, 8)
    blocks = (max(1, -(-nx // threads[0])), max(1, -(-(B * ny) // threads[1])))
    stream = current_stream(xp)
    capacity = int(max_peaks)
    while True:
        counter = xp.zeros(1, dtype=xp.int64)
        lin = xp.empty(capacity, dtype=xp.int64)
        val = xp.empty(capacity, dtype=v.dtype)
        sgn = xp.empty(capacity, dtype=xp.int8)
        _peak_kernel[blocks, threads, stream](v, ex, has_ex, float(threshold), r, r2, counter, lin, val, sgn)
        n = int(counter[0])  # one 8-byte device-to-host copy (synchronises the stream)
        if n <= capacity:
            break
        capacity = n  # rare: relaunch once with the exact size
    order = xp.argsort(lin[:n])
    lin, val, sgn = lin[:n][order], val[:n][order], sgn[:n][order]
    b = lin // (ny * nx)
    rem = lin - b * (ny * nx)
    y = rem // nx
    x = rem - y * nx
    return Peaks(image=b, y=y, x=x, value=val, sign=sgn)

