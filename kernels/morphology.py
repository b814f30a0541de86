"""Binary dilation of masks by shifted ORs, batched over leading axes, for numpy and cupy alike.

Growing a mask by a few pixels (saturated cores, unusable pixels before S_corr is zeroed) is a
handful of whole-array ORs of shifted slices: no structuring-element loop per pixel, no
``scipy.ndimage`` (whose 3-D structure handling differs from cupyx's), the same bits everywhere.
The oracle in tests is ``scipy.ndimage.binary_dilation`` with the same structure.
"""
from __future__ import annotations

from ._xp import array_namespace

__all__ = ["dilate"]


def _shift_or(xp, out, src, dy: int, dx: int):
    """``out |= src`` shifted by ``(dy, dx)`` over the last two axes (no wrap-around)."""
    ny, nx = src.shape[-2:]
    ys = slice(max(dy, 0), ny + min(dy, 0))
    yd = slice(max(-dy, 0), ny + min(-dy, 0))
    xs = slice(max(dx, 0), nx + min(dx, 0))
    xd = slice(max(-dx, 0), nx + min(-dx, 0))
    out[..., yd, xd] |= src[..., ys, xs]


def dilate(mask, *, iterations: int, structure: str = "cross"):
    """Dilate a boolean mask over its last two axes.

    Parameters
    ----------
    mask : ndarray (..., ny, nx) bool
    iterations : int
        Times the structuring element is applied (>= 0).
    structure : {"cross", "square"}
        ``"cross"``: the 4-connected 3x3 cross (``iterations`` of it grow a diamond, as
        ``scipy.ndimage.binary_dilation`` with its default structure); ``"square"``: the 3x3
        square (8-connected; a ``(2k+1)^2`` square after ``k`` iterations).

    Returns
    -------
    ndarray like ``mask`` (a new array; ``mask`` is not modified)
    """
    if structure not in ("cross", "square"):
        raise ValueError(f"dilate: structure must be 'cross' or 'square', got {structure!r}")
    if int(iterations) < 0:
        raise ValueError(f"dilate: iterations must be >= 0, got {iterations!r}")
    xp = array_namespace(mask)
    out = mask.astype(bool, copy=True)
    k = int(iterations)
    if k == 0:
        return out
    if structure == "square":  # separable: rows, then columns
        rows = out.copy()
        for d in range(1, k + 1):
            _shift_or(xp, rows, out, 0, d)
            _shift_or(xp, rows, out, 0, -d)
        out = rows.copy()
        for d in range(1, k + 1):
            _shift_or(xp, out, rows, d, 0)
            _shift_or(xp, out, rows, -d, 0)
        return out
    for _ in range(k):
        src = out.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            _shift_or(xp, out, src, dy, dx)
    return out
