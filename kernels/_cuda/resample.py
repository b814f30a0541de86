"""Numba CUDA Lanczos resampling of image stacks and bit masks (one thread per output pixel).

Same conventions and the same numbers as :mod:`nightsift.kernels.resample` (read its notes):
normalised Lanczos-``a`` weights over the ``2a x 2a`` source pixels around ``(x_src, y_src)``,
out-of-image taps dropped, ``fill`` where the source position is NaN or outside the image; the
mask is the OR of the bits of the taps with ``|w| > weight_threshold``, ``no_data_bit`` for taps
outside the image and for invalid positions. Weights and sums are float64 (as the reference);
each thread computes its ``2 x 2a`` separable weights with three trig calls per axis (angle
recurrences, as the Numba CPU path) and shares them across all planes of the stack.

Batched: images ``(B, k, ny_in, nx_in)`` with maps ``(B, ny_out, nx_out)`` (one geometry per pair)
resample in one launch; a single ``(k, ny, nx)`` stack or ``(ny, nx)`` image with 2-D maps also
works.
"""
from __future__ import annotations

import math

from numba import cuda
from numba import float64 as float64_t

from . import check_cuda_arrays, current_stream

__all__ = ["lanczos_resample_cuda", "resample_mask_cuda"]

_MAX_TAPS = 16  # 2a for a <= 8, the reference's limit
_MAX_PLANES = 8  # planes sharing one geometry (image, variance, ...) per launch


@cuda.jit(device=True)
def _taps(x, x0, a, w):
    """w[k] = L_a(x - (x0 + k)) for k < 2a (3 trig calls: sin(pi (t0 - k)) = (-1)^k sin(pi t0),
    sin((t0 - k) pi / a) by angle subtraction)."""
    t0 = x - x0
    s_pi = math.sin(math.pi * t0)
    th = math.pi * t0 / a
    s_k = math.sin(th)
    c_k = math.cos(th)
    phi = math.pi / a
    c_phi = math.cos(phi)
    s_phi = math.sin(phi)
    sign = 1.0
    for k in range(2 * a):
        t = t0 - k
        at = abs(t)
        if at >= a:
            w[k] = 0.0
        elif at < 1e-12:
            w[k] = 1.0
        else:
            pt = math.pi * t
            w[k] = a * sign * s_pi * s_k / (pt * pt)
        s_k, c_k = s_k * c_phi - c_k * s_phi, c_k * c_phi + s_k * s_phi
        sign = -sign


@cuda.jit
def _lanczos_kernel(img, xs, ys, a, fill, out):
    """img (B, k, ny, nx); xs, ys, out[:, p] (B, nyo, nxo); grid (nxo, B * nyo)."""
    i, row = cuda.grid(2)
    B, nplane, ny, nx = img.shape
    nyo = xs.shape[1]
    nxo = xs.shape[2]
    if i >= nxo or row >= B * nyo:
        return
    b = row // nyo
    j = row - b * nyo
    x = xs[b, j, i]
    y = ys[b, j, i]
    if not (x >= -0.5 and x <= nx - 0.5 and y >= -0.5 and y <= ny - 0.5):  # NaN fails too
        for p in range(nplane):
            out[b, p, j, i] = fill
        return
    n = 2 * a
    wx = cuda.local.array(_MAX_TAPS, dtype=float64_t)
    wy = cuda.local.array(_MAX_TAPS, dtype=float64_t)
    acc = cuda.local.array(_MAX_PLANES, dtype=float64_t)
    x0 = int(math.floor(x)) - (a - 1)
    y0 = int(math.floor(y)) - (a - 1)
    _taps(x, x0, a, wx)
    _taps(y, y0, a, wy)
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


@cuda.jit
def _mask_kernel(mask, xs, ys, a, no_data_bit, threshold, out):
    """mask (B, ny, nx) integer; xs, ys, out (B, nyo, nxo); grid (nxo, B * nyo)."""
    i, row = cuda.grid(2)
    B, ny, nx = mask.shape
    nyo = xs.shape[1]
    nxo = xs.shape[2]
    if i >= nxo or row >= B * nyo:
        return
    b = row // nyo
    j = row - b * nyo
    x = xs[b, j, i]
    y = ys[b, j, i]
    if not (x >= -0.5 and x <= nx - 0.5 and y >= -0.5 and y <= ny - 0.5):
        out[b, j, i] = no_data_bit
        return
    n = 2 * a
    x0 = int(math.floor(x)) - (a - 1)
    y0 = int(math.floor(y)) - (a - 1)
    if x0 >= 0 and y0 >= 0 and x0 + n <= nx and y0 + n <= ny:  # fast exit: no bit in the footprint
        any_bits = 0
        for ky in range(n):
            for kx in range(n):
                any_bits |= mask[b, y0 + ky, x0 + kx]
        if any_bits == 0:
            out[b, j, i] = 0
            return
    wx = cuda.local.array(_MAX_TAPS, dtype=float64_t)
    wy = cuda.local.array(_MAX_TAPS, dtype=float64_t)
    _taps(x, x0, a, wx)
    _taps(y, y0, a, wy)
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
    out[b, j, i] = bits


def _batched(image, x_src, y_src, planes: bool):
    """Bring (image, maps) to the kernel's batched layout; return (img4, xs3, ys3, unbatch)."""
    if x_src.shape != y_src.shape or x_src.ndim not in (2, 3):
        raise ValueError(f"x_src and y_src must be (ny_out, nx_out) or (B, ny_out, nx_out) of one shape, "
                         f"got {tuple(x_src.shape)} and {tuple(y_src.shape)}")
    batched = x_src.ndim == 3
    need = (4 if planes else 3) if batched else None
    if batched and image.ndim != need:
        raise ValueError(f"batched maps {tuple(x_src.shape)} need a {'(B, k, ny, nx)' if planes else '(B, ny, nx)'} "
                         f"source, got {tuple(image.shape)}")
    if batched and image.shape[0] != x_src.shape[0]:
        raise ValueError(f"batch sizes differ: source {image.shape[0]}, maps {x_src.shape[0]}")
    if not batched:
        if planes and image.ndim not in (2, 3) or not planes and image.ndim != 2:
            raise ValueError(f"2-D maps need a {'(ny, nx) or (k, ny, nx)' if planes else '(ny, nx)'} source, "
                             f"got {tuple(image.shape)}")
    img = image
    if not batched:
        img = img[None, None] if (planes and img.ndim == 2) else img[None]
        xs, ys = x_src[None], y_src[None]
    else:
        xs, ys = x_src, y_src
    ndim_in = image.ndim

    def unbatch(out):
        if batched:
            return out
        out = out[0]
        return out[0] if (planes and ndim_in == 2) else out

    return img, xs, ys, unbatch


def _grid(nxo, rows):
    threads = (32, 8)
    return (max(1, -(-nxo // threads[0])), max(1, -(-rows // threads[1]))), threads


def lanczos_resample_cuda(image, x_src, y_src, *, a: int = 3, fill: float = float("nan")):
    """CUDA twin of :func:`nightsift.kernels.resample.lanczos_resample`, batched.

    Parameters
    ----------
    image : ndarray (ny, nx), (k, ny, nx) with 2-D maps, or (B, k, ny, nx) with 3-D maps; float
        cupy on a GPU, numpy under the simulator.
    x_src, y_src : ndarray (ny_out, nx_out) or (B, ny_out, nx_out), float
        0-based source column/row of every output pixel centre (NaN: no source).
    a : int, keyword-only
        Lanczos order, 1..8.
    fill : float, keyword-only
        Value of output pixels without a valid source position.

    Returns
    -------
    ndarray shaped like the image with the maps' output shape; float64 for float64 images, else
    float32.
    """
    xp = check_cuda_arrays("lanczos_resample_cuda", image, x_src, y_src)
    if not (isinstance(a, int) and 1 <= a <= 8):
        raise ValueError(f"lanczos_resample_cuda: Lanczos order a must be an integer in 1..8, got {a!r}")
    img, xs, ys, unbatch = _batched(image, x_src, y_src, planes=True)
    if img.shape[1] > _MAX_PLANES:
        raise ValueError(f"lanczos_resample_cuda: at most {_MAX_PLANES} planes share one geometry, got {img.shape[1]}")
    out_dtype = xp.float64 if image.dtype == xp.float64 else xp.float32
    if img.dtype not in (xp.float32, xp.float64):
        img = img.astype(xp.float64)
    img = xp.ascontiguousarray(img)
    xs = xp.ascontiguousarray(xs, dtype=xp.float64)
    ys = xp.ascontiguousarray(ys, dtype=xp.float64)
    B, k = img.shape[:2]
    out = xp.empty((B, k) + xs.shape[1:], dtype=out_dtype)
    blocks, threads = _grid(xs.shape[2], B * xs.shape[1])
    _lanczos_kernel[blocks, threads, current_stream(xp)](img, xs, ys, int(a), float(fill), out)
    return unbatch(out)


def resample_mask_cuda(mask, x_src, y_src, *, a: int = 3, no_data_bit: int = 0, weight_threshold: float = 1e-5):
    """CUDA twin of :func:`nightsift.kernels.resample.resample_mask`, batched.

    Parameters
    ----------
    mask : ndarray (ny, nx) with 2-D maps or (B, ny, nx) with 3-D maps, integer bit flags
    x_src, y_src : as :func:`lanczos_resample_cuda`
    a, no_data_bit, weight_threshold : as :func:`nightsift.kernels.resample.resample_mask`

    Returns
    -------
    ndarray with the maps' shape, the dtype of ``mask``.
    """
    xp = check_cuda_arrays("resample_mask_cuda", mask, x_src, y_src)
    if mask.dtype.kind not in "ui":
        raise ValueError(f"resample_mask_cuda: mask must be an integer array, got {mask.dtype}")
    if not (isinstance(a, int) and 1 <= a <= 8):
        raise ValueError(f"resample_mask_cuda: Lanczos order a must be an integer in 1..8, got {a!r}")
    m, xs, ys, unbatch = _batched(mask, x_src, y_src, planes=False)
    m = xp.ascontiguousarray(m)
    xs = xp.ascontiguousarray(xs, dtype=xp.float64)
    ys = xp.ascontiguousarray(ys, dtype=xp.float64)
    out = xp.empty(xs.shape, dtype=m.dtype)
    blocks, threads = _grid(xs.shape[2], xs.shape[0] * xs.shape[1])
    _mask_kernel[blocks, threads, current_stream(xp)](m, xs, ys, int(a), m.dtype.type(no_data_bit),
                                                     float(weight_threshold), out)
    return unbatch(out)
