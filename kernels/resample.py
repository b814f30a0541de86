"""Lanczos resampling of images, variances and masks through a per-pixel coordinate map.

The geometry is given as plain arrays: for every *output* pixel ``(j, i)`` the maps
``x_src[j, i]``, ``y_src[j, i]`` hold the 0-based position of that pixel's centre in the
*source* image (``x`` the column, ``y`` the row). Computing those maps from two WCSs is the
engine's job (:mod:`nightsift.engine.stages.align`); this module never sees astropy.

Conventions
-----------
* Lanczos-``a`` kernel ``L(t) = sinc(t) sinc(t / a)`` for ``|t| < a``, 0 otherwise; it is
  separable, ``w = L(x_src - ix) L(y_src - iy)`` over the ``2a x 2a`` source pixels around
  ``(x_src, y_src)``.
* The weights of the in-bounds source pixels are *normalised* to sum to 1, so a constant image
  stays exactly constant (the raw Lanczos weights sum to ``1 +- ~1e-3``) and pixels within ``a``
  of the source edge are interpolated from the pixels that exist.
* An output pixel whose source position is not finite or lies outside the source image
  (``x_src < -0.5`` or ``x_src > nx - 0.5``, same in ``y``) gets ``fill``.
* Variance is resampled with the **same weights** (not their squares), i.e. exactly like an
  image plane. The per-pixel variance of an interpolated white-noise field is
  ``sum(w**2) var`` (smaller), but that noise is then correlated: its power spectrum inside the
  band is unchanged and only the part above the interpolant's cutoff is removed. Every filter
  downstream (PSF matching, ZOGY's matched filters) is band-limited by the PSF, so the noise
  they see is the original white-noise level, ``sum(w) var = var``. Propagating ``sum(w**2)``
  would under-estimate the noise that ZOGY's S_corr normalisation needs. Pass the variance as a
  second plane of a stack, ``lanczos_resample(xp.stack([image, variance]), ...)``, to share
  the weights.

Batches
-------
Every path takes a batch of pairs, each with its own geometry: sources ``(B, k, ny, nx)`` (or
``(B, ny, nx)``, one plane each; masks ``(B, ny, nx)``) with maps ``(B, ny_out, nx_out)``. The
rank of the maps decides: 2-D maps mean one geometry for a ``(ny, nx)`` image or a ``(k, ny, nx)``
stack of planes. One call resamples B CCD-visits, or a stack of small PSF stamps ``(n, s, s)``
each through its own map ``(n, s, s)`` (the PSF stage): on numpy the Numba kernel runs ``prange``
over all ``n * s`` output rows at once, so n stamps cost one call, not n.

Implementations
---------------
Three give the same answer: a vectorised ``xp`` reference (numpy, cupy or any array-API namespace;
loops over the ``2a x 2a`` offsets with whole-array operations, and over the pairs of a batch:
the slow oracle), a Numba ``@njit(parallel=True)`` CPU kernel used for numpy arrays
(``method="auto"``), and a Numba CUDA kernel (:mod:`nightsift.kernels._cuda.resample`) used for
cupy arrays. The two Numba kernels are thin entry points around the same per-pixel bodies,
written once in :mod:`nightsift.kernels._lanczos` and compiled for each target. They agree with
the reference to ~1e-12 relative in float64 (the tests require < 1e-6).
"""
from __future__ import annotations

import numpy as np

from ._lanczos import batched_layout, lanczos_table, mask_rows, resample_rows
from ._xp import array_namespace, is_cupy, is_host

__all__ = [
    "lanczos_kernel",
    "lanczos_resample",
    "resample_mask",
    "interpolate_coarse_grid",
    "interpolate_coordinate_map",
]

_METHODS = ("auto", "numba", "reference", "cuda")


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------
def lanczos_kernel(t, a: int = 3):
    """Lanczos-``a`` window ``sinc(t) sinc(t/a)`` (0 for ``|t| >= a``), elementwise.

    Parameters
    ----------
    t : ndarray, any shape, float
        Offsets in pixels.
    a : int
        Half-width of the kernel (pixels).

    Returns
    -------
    ndarray, same shape as ``t``, float64
    """
    xp = array_namespace(t)
    t = xp.asarray(t, dtype=xp.float64)
    # xp.sinc is the normalised sinc, sin(pi t)/(pi t), with sinc(0) = 1
    return xp.where(xp.abs(t) < a, xp.sinc(t) * xp.sinc(t / a), 0.0)


def _check_options(a, method, name):
    if not (isinstance(a, (int, np.integer)) and 1 <= a <= 8):
        raise ValueError(f"{name}: Lanczos order a must be an integer in 1..8, got {a!r}")
    if method not in _METHODS:
        raise ValueError(f"{name}: method must be one of {_METHODS}, got {method!r}")


def _use_cuda(xp, method: str) -> bool:
    """The Numba CUDA kernel: asked for, or ``auto`` on cupy arrays."""
    return method == "cuda" or (method == "auto" and is_cupy(xp))


def _use_numba(xp, method: str) -> bool:
    """The Numba CPU kernel: ``numba``, or ``auto`` on numpy arrays."""
    if method == "numba":
        if not is_host(xp):
            raise ValueError("method='numba' needs numpy arrays; use 'reference' (or 'cuda' for cupy arrays)")
        return True
    return method == "auto" and is_host(xp)


# --------------------------------------------------------------------------------------------
# reference implementation (xp: numpy or cupy)
# --------------------------------------------------------------------------------------------
def _footprint_weights(xp, xs, ys, nx, ny, a):
    """Per-axis Lanczos weights, integer positions and in-bounds flags of the 2a taps."""
    fx = xp.floor(xs)
    fy = xp.floor(ys)
    wx, wy, ixs, iys, okx, oky = [], [], [], [], [], []
    for k in range(2 * a):
        ix = fx - (a - 1) + k
        iy = fy - (a - 1) + k
        wx.append(lanczos_kernel(xs - ix, a))
        wy.append(lanczos_kernel(ys - iy, a))
        okx.append((ix >= 0) & (ix <= nx - 1))
        oky.append((iy >= 0) & (iy <= ny - 1))
        ixs.append(xp.clip(ix, 0, nx - 1).astype(xp.int64))
        iys.append(xp.clip(iy, 0, ny - 1).astype(xp.int64))
    return wx, wy, ixs, iys, okx, oky


def _valid_positions(xp, x_src, y_src, nx, ny):
    xs = xp.asarray(x_src, dtype=xp.float64)
    ys = xp.asarray(y_src, dtype=xp.float64)
    valid = xp.isfinite(xs) & xp.isfinite(ys)
    valid &= (xs >= -0.5) & (xs <= nx - 0.5) & (ys >= -0.5) & (ys <= ny - 0.5)
    return xp.where(valid, xs, 0.0), xp.where(valid, ys, 0.0), valid


def _resample_reference(img3, x_src, y_src, a, fill, out_dtype):
    xp = array_namespace(img3, x_src, y_src)
    nplane, ny, nx = img3.shape
    xs, ys, valid = _valid_positions(xp, x_src, y_src, nx, ny)
    wx, wy, ixs, iys, okx, oky = _footprint_weights(xp, xs, ys, nx, ny, a)
    num = xp.zeros((nplane,) + xs.shape, dtype=xp.float64)
    den = xp.zeros(xs.shape, dtype=xp.float64)
    for ky in range(2 * a):
        for kx in range(2 * a):
            w = xp.where(oky[ky] & okx[kx], wy[ky] * wx[kx], 0.0)
            den += w
            num += w * img3[:, iys[ky], ixs[kx]].astype(xp.float64)
    good = valid & (xp.abs(den) > 1e-12)
    out = xp.where(good, num / xp.where(good, den, 1.0), fill)
    return out.astype(out_dtype)


def _resample_mask_reference(mask, x_src, y_src, a, no_data_bit, threshold):
    xp = array_namespace(mask, x_src, y_src)
    ny, nx = mask.shape
    xs, ys, valid = _valid_positions(xp, x_src, y_src, nx, ny)
    wx, wy, ixs, iys, okx, oky = _footprint_weights(xp, xs, ys, nx, ny, a)
    out = xp.zeros(xs.shape, dtype=mask.dtype)
    nd = mask.dtype.type(no_data_bit)
    zero = mask.dtype.type(0)
    for ky in range(2 * a):
        for kx in range(2 * a):
            used = xp.abs(wy[ky] * wx[kx]) > threshold
            inb = oky[ky] & okx[kx]
            out |= xp.where(used & inb, mask[iys[ky], ixs[kx]], zero)
            out |= xp.where(used & ~inb, nd, zero)
    return xp.where(valid, out, nd)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def lanczos_resample(image, x_src, y_src, *, a: int = 3, fill: float = float("nan"), method: str = "auto"):
    """Resample ``image`` at the source positions ``(x_src, y_src)`` with a normalised Lanczos-a kernel.

    Parameters
    ----------
    image : ndarray, float
        With 2-D maps: ``(ny_in, nx_in)``, or ``(k, ny_in, nx_in)`` planes sharing one geometry
        (e.g. ``[image, variance]``; see the module notes on why a variance is resampled with the
        plain weights). With 3-D maps, a batch: ``(B, k, ny_in, nx_in)``, or ``(B, ny_in, nx_in)``
        (one plane per pair, e.g. a stack of PSF stamps). Must be finite inside the footprint of
        the output (replace masked pixels first).
    x_src, y_src : ndarray (ny_out, nx_out) or (B, ny_out, nx_out), float
        0-based source column/row of every output pixel centre (pair ``b`` uses ``x_src[b]``).
        NaN marks "no source".
    a : int, keyword-only
        Lanczos order (half-width in pixels, 2..5 in practice; 1..8 accepted).
    fill : float, keyword-only
        Value of output pixels whose source position is NaN or outside the source image.
    method : {"auto", "numba", "cuda", "reference"}, keyword-only
        ``"auto"`` uses the Numba CPU kernel for numpy arrays, the Numba CUDA kernel
        (:mod:`nightsift.kernels._cuda.resample`) for cupy arrays and the reference elsewhere;
        ``"cuda"`` forces the CUDA kernel (numpy arrays under ``NUMBA_ENABLE_CUDASIM=1``);
        ``"reference"`` forces the vectorised ``xp`` version (the oracle).

    Returns
    -------
    ndarray
        The image's form with the maps' output shape: ``(ny_out, nx_out)``,
        ``(k, ny_out, nx_out)``, ``(B, ny_out, nx_out)`` or ``(B, k, ny_out, nx_out)``; float64 if
        ``image`` is float64, else float32; same array module as ``image``.

    Raises
    ------
    ValueError
        Maps of different shapes, a source whose rank does not fit the maps', batch sizes that
        differ, an order outside 1..8, an unknown method.
    """
    xp = array_namespace(image, x_src, y_src)
    _check_options(a, method, "lanczos_resample")
    src, xs, ys, unbatch = batched_layout("lanczos_resample", image, x_src, y_src, planes=True)
    out_dtype = xp.float64 if image.dtype == xp.float64 else xp.float32
    if _use_numba(xp, method):
        src = np.ascontiguousarray(src)
        if src.dtype not in (np.float32, np.float64):
            src = src.astype(np.float64)
        xs = np.ascontiguousarray(xs, dtype=np.float64)
        ys = np.ascontiguousarray(ys, dtype=np.float64)
        out = np.empty(src.shape[:2] + xs.shape[1:], dtype=out_dtype)
        resample_rows(src, xs, ys, int(a), lanczos_table(int(a)), float(fill), out)
    elif _use_cuda(xp, method):
        from ._cuda.resample import lanczos_resample_cuda

        return lanczos_resample_cuda(image, x_src, y_src, a=int(a), fill=fill)
    else:  # the oracle: one vectorised call per pair of the batch
        B, k = src.shape[:2]
        if B == 0:
            out = xp.zeros((0, k) + tuple(xs.shape[1:]), dtype=out_dtype)
        else:
            out = xp.stack([_resample_reference(src[b], xs[b], ys[b], int(a), fill, out_dtype) for b in range(B)])
    return unbatch(out)


def resample_mask(
    mask,
    x_src,
    y_src,
    *,
    a: int = 3,
    no_data_bit: int = 0,
    weight_threshold: float = 1e-5,
    method: str = "auto",
):
    """Carry integer bit masks through the same geometry as :func:`lanczos_resample`.

    An output pixel gets the OR of the bits of every source pixel whose Lanczos weight
    ``|L(dx) L(dy)|`` exceeds ``weight_threshold`` (so a flagged pixel spreads to the
    ``2a x 2a`` footprint it influences, but not through the exact zeros of an integer shift).
    Footprint pixels outside the source image, and output pixels whose source position is NaN or
    outside the image, get ``no_data_bit``.

    Parameters
    ----------
    mask : ndarray (ny_in, nx_in) with 2-D maps or (B, ny_in, nx_in) with 3-D maps, integer
        Bit flags (e.g. uint16).
    x_src, y_src : ndarray (ny_out, nx_out) or (B, ny_out, nx_out), float
        As for :func:`lanczos_resample`.
    a : int, keyword-only
        Lanczos order.
    no_data_bit : int, keyword-only
        Bit value meaning "no data" (the caller's convention; kernels know no bit names).
    weight_threshold : float, keyword-only
        Weights at or below this magnitude are negligible (the smallest corner weights of a
        generic Lanczos-3 footprint are ~1e-4).
    method : {"auto", "numba", "cuda", "reference"}, keyword-only
        As for :func:`lanczos_resample`.

    Returns
    -------
    ndarray with the maps' shape, same dtype as ``mask``
    """
    xp = array_namespace(mask, x_src, y_src)
    _check_options(a, method, "resample_mask")
    if mask.dtype.kind not in "ui":
        raise ValueError(f"resample_mask: mask must be an integer array, got {mask.dtype} {tuple(mask.shape)}")
    m, xs, ys, unbatch = batched_layout("resample_mask", mask, x_src, y_src, planes=False)
    if _use_numba(xp, method):
        m = np.ascontiguousarray(m)
        xs = np.ascontiguousarray(xs, dtype=np.float64)
        ys = np.ascontiguousarray(ys, dtype=np.float64)
        out = np.empty(xs.shape, dtype=m.dtype)
        mask_rows(m, xs, ys, int(a), lanczos_table(int(a)), m.dtype.type(no_data_bit), float(weight_threshold), out)
        return unbatch(out)
    if _use_cuda(xp, method):
        from ._cuda.resample import resample_mask_cuda

        return resample_mask_cuda(mask, x_src, y_src, a=int(a), no_data_bit=no_data_bit,
                                  weight_threshold=float(weight_threshold))
    if m.shape[0] == 0:
        return unbatch(xp.zeros(tuple(xs.shape), dtype=m.dtype))
    return unbatch(xp.stack([_resample_mask_reference(m[b], xs[b], ys[b], int(a), no_data_bit, float(weight_threshold))
                             for b in range(m.shape[0])]))


def _spline_matrix(n_nodes: int, step: float, n_out: int) -> np.ndarray:
    """(n_out, n_nodes) matrix of the cubic spline through nodes ``k*step`` evaluated at 0..n_out-1."""
    from scipy.interpolate import CubicSpline

    nodes = np.arange(n_nodes, dtype=np.float64) * step
    if n_nodes == 1:
        return np.ones((n_out, 1))
    return CubicSpline(nodes, np.eye(n_nodes), axis=0)(np.arange(n_out, dtype=np.float64))


def interpolate_coarse_grid(coarse, step: float, shape: tuple[int, int]):
    """Interpolate a smooth field known on a coarse grid to every pixel (tensor cubic spline).

    Parameters
    ----------
    coarse : ndarray (ncy, ncx), float
        Values at pixel positions ``(y, x) = (j*step, i*step)``. The grid must reach the last
        pixel: ``(ncy-1)*step >= ny-1`` and ``(ncx-1)*step >= nx-1``.
    step : float
        Node spacing (pixels).
    shape : (ny, nx)
        Output shape.

    Returns
    -------
    ndarray (ny, nx) float64, same array module as ``coarse``.

    Notes
    -----
    The interpolant is separable: ``Wy @ coarse @ Wx.T`` with ``W`` the (not-a-knot) cubic
    spline matrices, i.e. two small matrix products, exact for bicubic polynomials. For a WCS
    pixel-to-pixel map sampled every 32 pixels the error is ~1e-5 px (see tests).
    """
    xp = array_namespace(coarse)
    ny, nx = int(shape[0]), int(shape[1])
    ncy, ncx = coarse.shape
    if (ncy - 1) * step < ny - 1 or (ncx - 1) * step < nx - 1:
        raise ValueError(
            f"interpolate_coarse_grid: a grid of {coarse.shape} nodes every {step} px does not reach "
            f"the last pixel of shape {shape}; add nodes up to >= n-1"
        )
    wy = xp.asarray(_spline_matrix(ncy, step, ny))
    wx = xp.asarray(_spline_matrix(ncx, step, nx))
    return wy @ (xp.asarray(coarse, dtype=xp.float64) @ wx.T)


def interpolate_coordinate_map(coarse_x, coarse_y, step: float, shape: tuple[int, int]):
    """Interpolate a coordinate map (e.g. science pixel -> reference pixel) to every pixel.

    Parameters
    ----------
    coarse_x, coarse_y : ndarray (ncy, ncx), float
        Source x (column) and y (row) at the grid nodes ``(j*step, i*step)``.
    step : float
        Node spacing (pixels).
    shape : (ny, nx)
        Output shape.

    Returns
    -------
    x_src, y_src : ndarray (ny, nx) float64
        Inputs for :func:`lanczos_resample`.
    """
    return (
        interpolate_coarse_grid(coarse_x, step, shape),
        interpolate_coarse_grid(coarse_y, step, shape),
    )
