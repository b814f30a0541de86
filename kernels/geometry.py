"""Pixel-to-pixel coordinate maps on the device: sampling them at points, inverting them.

A map is a pair of full-resolution arrays ``x_src[j, i]``, ``y_src[j, i]``: the position in a
source image of the centre of output pixel ``(j, i)`` (0-based, x = column), as
:func:`nightsift.kernels.resample.interpolate_coarse_grid` makes them from a WCS sampled on a
coarse grid. Catalogue positions travel the other way (source -> output grid), which needs the
inverse map at arbitrary points: :func:`invert_map` solves ``map(p) = q`` by a chord (fixed
Jacobian) Newton iteration on bilinear samples of the map, so no WCS is evaluated per source.
"""
from __future__ import annotations

from ._xp import array_namespace

__all__ = ["sample_bilinear", "invert_map"]


def sample_bilinear(field, x, y, *, fill=float("nan")):
    """Bilinear samples of ``field`` at points ``(x, y)``.

    Parameters
    ----------
    field : ndarray (ny, nx), float
    x, y : ndarray (n,), float64
        0-based column/row; points outside ``[0, nx-1] x [0, ny-1]`` (or non-finite) get ``fill``.

    Returns
    -------
    ndarray (n,) float64
    """
    xp = array_namespace(field, x, y)
    ny, nx = field.shape
    inside = xp.isfinite(x) & xp.isfinite(y) & (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    xc = xp.where(inside, x, 0.0)
    yc = xp.where(inside, y, 0.0)
    x0 = xp.clip(xp.floor(xc).astype(xp.int64), 0, max(nx - 2, 0))
    y0 = xp.clip(xp.floor(yc).astype(xp.int64), 0, max(ny - 2, 0))
    x1 = xp.minimum(x0 + 1, nx - 1)
    y1 = xp.minimum(y0 + 1, ny - 1)
    fx = xc - x0
    fy = yc - y0
    f = field
    v = ((1 - fy) * ((1 - fx) * f[y0, x0] + fx * f[y0, x1]) + fy * ((1 - fx) * f[y1, x0] + fx * f[y1, x1]))
    return xp.where(inside, v.astype(xp.float64), fill)


def invert_map(x_src, y_src, xq, yq, *, jacobian, offset, iterations: int = 6):
    """Output-grid positions ``p`` with ``map(p) = q`` for source-grid points ``q``.

    Parameters
    ----------
    x_src, y_src : ndarray (ny, nx) float64
        The map (source position of every output pixel).
    xq, yq : ndarray (n,) float64
        Points on the source grid.
    jacobian : array_like (2, 2)
        An approximation of ``d(src)/d(out)`` (e.g. the affine part of the map:
        ``[[dxs/dx, dxs/dy], [dys/dx, dys/dy]]``); host numbers.
    offset : array_like (2,)
        ``(x, y)`` source position of output pixel (0, 0) in that affine approximation, so that
        ``src ~ offset + J out`` starts the iteration.
    iterations : int
        Chord iterations ``p <- p - J^-1 (map(p) - q)``: the error shrinks each time by about the
        departure of the local Jacobian from ``J`` (1e-3 for a distorted CCD), so a few suffice.

    Returns
    -------
    x, y : ndarray (n,) float64
        NaN where ``q`` maps outside the output grid.
    """
    xp = array_namespace(x_src, y_src, xq, yq)
    (a, b), (c, d) = [[float(v) for v in row] for row in jacobian]
    det = a * d - b * c
    if det == 0:
        raise ValueError("invert_map: the Jacobian approximation is singular")
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    ox, oy = float(offset[0]), float(offset[1])
    rx, ry = xq - ox, yq - oy
    px = ia * rx + ib * ry
    py = ic * rx + id_ * ry
    ny, nx = x_src.shape
    for _ in range(int(iterations)):
        cx = xp.clip(px, 0, nx - 1)
        cy = xp.clip(py, 0, ny - 1)
        ex = sample_bilinear(x_src, cx, cy) - xq
        ey = sample_bilinear(y_src, cx, cy) - yq
        px = cx - (ia * ex + ib * ey)
        py = cy - (ic * ex + id_ * ey)
    # converged and inside: the map at the solution returns the point
    ex = sample_bilinear(x_src, px, py) - xq
    ey = sample_bilinear(y_src, px, py) - yq
    ok = xp.isfinite(ex) & xp.isfinite(ey) & (xp.abs(ex) < 1e-3) & (xp.abs(ey) < 1e-3)
    return xp.where(ok, px, xp.nan), xp.where(ok, py, xp.nan)


# --------------------------------------------------------------------------------------------
# coarse grid -> every pixel (tensor cubic spline), with the matrices cached per device
# --------------------------------------------------------------------------------------------
_SPLINE_CACHE: dict = {}


def spline_matrix(n_nodes: int, step: float, n_out: int):
    """Host ``(n_out, n_nodes)`` float64 matrix of the not-a-knot cubic spline through nodes
    ``k * step`` evaluated at pixels ``0 .. n_out - 1`` (cached)."""
    import numpy as np

    key = ("host", int(n_nodes), float(step), int(n_out))
    m = _SPLINE_CACHE.get(key)
    if m is None:
        from scipy.interpolate import CubicSpline

        if n_nodes == 1:
            m = np.ones((n_out, 1))
        else:
            nodes = np.arange(n_nodes, dtype=np.float64) * step
            m = CubicSpline(nodes, np.eye(n_nodes), axis=0)(np.arange(n_out, dtype=np.float64))
        _SPLINE_CACHE[key] = m
    return m


def _device_key(xp):
    try:
        return (getattr(xp, "__name__", id(xp)), int(xp.cuda.Device().id))
    except Exception:  # numpy, or a namespace without devices
        return (getattr(xp, "__name__", id(xp)), 0)


def spline_matrix_on(xp, n_nodes: int, step: float, n_out: int):
    """:func:`spline_matrix` in ``xp``'s memory, uploaded once per device and cached."""
    from ._xp import to_device

    host = spline_matrix(n_nodes, step, n_out)
    key = (_device_key(xp), int(n_nodes), float(step), int(n_out))
    m = _SPLINE_CACHE.get(key)
    if m is None:
        m = to_device(host, xp, label="spline_matrices")
        _SPLINE_CACHE[key] = m
    return m


def coarse_to_full(coarse, step: float, shape):
    """Interpolate fields known on a coarse grid to every pixel: ``Wy @ C @ Wx.T``.

    Parameters
    ----------
    coarse : ndarray (ncy, ncx) or (k, ncy, ncx), float64, on the device
        Values at ``(y, x) = (j * step, i * step)``; the grid must reach the last pixel.
    step : float
    shape : (ny, nx)

    Returns
    -------
    ndarray (ny, nx) or (k, ny, nx) float64
    """
    xp = array_namespace(coarse)
    ny, nx = int(shape[0]), int(shape[1])
    ncy, ncx = coarse.shape[-2:]
    if (ncy - 1) * step < ny - 1 or (ncx - 1) * step < nx - 1:
        raise ValueError(f"coarse_to_full: {coarse.shape[-2:]} nodes every {step} px do not reach the last "
                         f"pixel of shape {shape}")
    wy = spline_matrix_on(xp, ncy, step, ny)
    wx = spline_matrix_on(xp, ncx, step, nx)
    return xp.matmul(xp.matmul(wy, coarse), wx.T)
