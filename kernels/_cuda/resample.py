"""Numba CUDA Lanczos resampling of image stacks and bit masks (one thread per output pixel).

Same conventions and the same numbers as :mod:`nightsift.kernels.resample` (read its notes). The
kernels here are thin entry points: each thread finds its pair and output pixel from
``cuda.grid``, takes its scratch from ``cuda.local.array`` and calls the per-pixel bodies of
:mod:`nightsift.kernels._lanczos` (:func:`~nightsift.kernels._lanczos.resample_pixel`,
:func:`~nightsift.kernels._lanczos.mask_pixel`), the very functions the Numba CPU kernels call.
Weights and sums are float64; each thread reads its ``2 x 2a`` separable weights from the kernel's
lookup table (:func:`~nightsift.kernels._lanczos.lanczos_table`, uploaded once per device) and
shares them across all planes of the stack.

Batched: sources ``(B, k, ny_in, nx_in)`` or ``(B, ny_in, nx_in)`` (masks ``(B, ny_in, nx_in)``)
with maps ``(B, ny_out, nx_out)`` (one geometry per pair) resample in one launch; a single
``(k, ny, nx)`` stack or ``(ny, nx)`` image with 2-D maps also works
(:func:`~nightsift.kernels._lanczos.batched_layout`).
"""
from __future__ import annotations

from numba import cuda
from numba import float64 as float64_t

from .._lanczos import MAX_TAPS, batched_layout, lanczos_table, mask_pixel, resample_pixel
from . import check_cuda_arrays, current_stream

__all__ = ["lanczos_resample_cuda", "resample_mask_cuda"]

_MAX_PLANES = 8  # planes sharing one geometry (image, variance, ...) per launch: the accumulator's size


@cuda.jit
def _lanczos_kernel(img, xs, ys, a, table, fill, out):
    """img (B, k, ny, nx); xs, ys (B, nyo, nxo); out (B, k, nyo, nxo); grid (nxo, B * nyo)."""
    i, row = cuda.grid(2)
    nyo = xs.shape[1]
    if i >= xs.shape[2] or row >= xs.shape[0] * nyo:
        return
    b = row // nyo
    j = row - b * nyo
    wx = cuda.local.array(MAX_TAPS, dtype=float64_t)
    wy = cuda.local.array(MAX_TAPS, dtype=float64_t)
    acc = cuda.local.array(_MAX_PLANES, dtype=float64_t)
    resample_pixel(img, b, j, i, xs[b, j, i], ys[b, j, i], a, table, fill, out, wx, wy, acc)


@cuda.jit
def _mask_kernel(mask, xs, ys, a, table, no_data_bit, threshold, out):
    """mask (B, ny, nx) integer; xs, ys, out (B, nyo, nxo); grid (nxo, B * nyo)."""
    i, row = cuda.grid(2)
    nyo = xs.shape[1]
    if i >= xs.shape[2] or row >= xs.shape[0] * nyo:
        return
    b = row // nyo
    j = row - b * nyo
    wx = cuda.local.array(MAX_TAPS, dtype=float64_t)
    wy = cuda.local.array(MAX_TAPS, dtype=float64_t)
    out[b, j, i] = mask_pixel(mask, b, xs[b, j, i], ys[b, j, i], a, table, no_data_bit, threshold, wx, wy)


_DEVICE_TABLES: dict = {}


def _table_on(xp, a: int):
    """:func:`~nightsift.kernels._lanczos.lanczos_table` in ``xp``'s memory (uploaded once per device)."""
    from .._xp import to_device

    if xp.__name__ == "numpy":
        return lanczos_table(a)
    try:
        dev = int(xp.cuda.Device().id)
    except Exception:  # pragma: no cover - a namespace without devices
        dev = 0
    key = (dev, a)
    tab = _DEVICE_TABLES.get(key)
    if tab is None:
        tab = _DEVICE_TABLES[key] = to_device(lanczos_table(a), xp, label="constants")
    return tab


def _grid(nxo, rows):
    threads = (32, 8)
    return (max(1, -(-nxo // threads[0])), max(1, -(-rows // threads[1]))), threads


def lanczos_resample_cuda(image, x_src, y_src, *, a: int = 3, fill: float = float("nan")):
    """CUDA twin of :func:`nightsift.kernels.resample.lanczos_resample`, batched.

    Parameters
    ----------
    image : ndarray, float; cupy on a GPU, numpy under the simulator
        ``(ny, nx)`` or ``(k, ny, nx)`` with 2-D maps; ``(B, ny, nx)`` or ``(B, k, ny, nx)`` with
        3-D maps; at most 8 planes ``k``.
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
    img, xs, ys, unbatch = batched_layout("lanczos_resample_cuda", image, x_src, y_src, planes=True)
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
    if out.size:
        blocks, threads = _grid(xs.shape[2], B * xs.shape[1])
        _lanczos_kernel[blocks, threads, current_stream(xp)](img, xs, ys, int(a), _table_on(xp, int(a)), float(fill),
                                                             out)
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
    m, xs, ys, unbatch = batched_layout("resample_mask_cuda", mask, x_src, y_src, planes=False)
    m = xp.ascontiguousarray(m)
    xs = xp.ascontiguousarray(xs, dtype=xp.float64)
    ys = xp.ascontiguousarray(ys, dtype=xp.float64)
    out = xp.empty(xs.shape, dtype=m.dtype)
    if out.size:
        blocks, threads = _grid(xs.shape[2], xs.shape[0] * xs.shape[1])
        _mask_kernel[blocks, threads, current_stream(xp)](m, xs, ys, int(a), _table_on(xp, int(a)),
                                                         m.dtype.type(no_data_bit), float(weight_threshold), out)
    return unbatch(out)
