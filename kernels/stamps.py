"""Square cutouts ("stamps") around many positions at once, for numpy and cupy alike.

One vectorised gather serves every candidate: the row and column indices of all stamps are built
as ``(n, size)`` arrays, clipped into the image, gathered with one fancy-indexing call and the
pixels that fell outside the image are then overwritten with ``fill``. No Python loop over the
candidates, so the same code is fast on a GPU.

Coordinates are 0-based with ``x`` the column and ``y`` the row; a stamp of odd side ``size`` is
centred on the pixel ``(round(y), round(x))`` (round half to even, as ``numpy.rint``), so the
centre pixel of the stamp is ``stamp[size // 2, size // 2]``.

>>> import numpy as np
>>> img = np.arange(100.0).reshape(10, 10)
>>> st, padded = extract_stamps(img, [4.2], [5.0], size=3)
>>> st[0]
array([[43., 44., 45.],
       [53., 54., 55.],
       [63., 64., 65.]])
>>> bool(padded[0])
False
"""
from __future__ import annotations

import numpy as np

from ._xp import array_namespace, is_host, to_device

__all__ = ["extract_stamps", "extract_triplets", "gather_stamps"]


def _check_size(size: int) -> int:
    if isinstance(size, bool) or int(size) != size or size < 1 or size % 2 != 1:
        raise ValueError(f"stamp size must be a positive odd integer, got {size!r}")
    return int(size)


def extract_stamps(image, x, y, *, size: int = 63, fill: float = float("nan")):
    """Cut ``size x size`` stamps centred on ``(round(x), round(y))`` out of one image.

    Parameters
    ----------
    image : ndarray (ny, nx), numpy or cupy
        Image to cut from, any real dtype (units are kept).
    x, y : array_like (n,), float
        0-based column and row of the stamp centres (pixels). Must be finite. Put on the device
        of ``image`` if they are not already.
    size : int, keyword-only
        Side of the square stamps in pixels, positive and odd (63 as ZTF).
    fill : float, keyword-only
        Value of stamp pixels that fall outside the image (NaN by default).

    Returns
    -------
    stamps : ndarray (n, size, size)
        ``stamps[k, j, i] = image[round(y[k]) - size//2 + j, round(x[k]) - size//2 + i]`` where that
        pixel exists, ``fill`` elsewhere. The dtype is that of ``image`` promoted with ``fill``
        (float32 stays float32 with a NaN fill; an integer image with a NaN fill becomes float64).
        A new array: ``image`` is not modified.
    padded : ndarray (n,), bool
        True where the stamp crosses the image edge (some pixels are ``fill``).

    Raises
    ------
    ValueError
        If ``image`` is not 2-D, ``size`` is not a positive odd integer, ``x`` and ``y`` differ
        in length or hold non-finite values.
    """
    size = _check_size(size)
    xp = array_namespace(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (ny, nx), got shape {tuple(image.shape)}")
    x = to_device(x, xp, dtype=np.float64, label="stamp_centres").reshape(-1)
    y = to_device(y, xp, dtype=np.float64, label="stamp_centres").reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    _check_finite(xp, x, y)
    return gather_stamps(image[None], None, x, y, size=size, fill=fill)


def _check_finite(xp, x, y):
    """Finite centres: checked on the host (numpy); on a device the check would be a
    synchronisation per call, and the chain's own centres are finite by construction."""
    if is_host(xp) and not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("stamp centres x and y must be finite (got NaN or inf)")


def gather_stamps(images, image, x, y, *, size: int = 63, fill: float = float("nan")):
    """Stamps from a batch of images in one gather: stamp ``k`` is cut from ``images[image[k]]``.

    Parameters
    ----------
    images : ndarray (B, ny, nx)
    image : ndarray (n,) int, or None (all from image 0)
    x, y : ndarray (n,) float
        Centres (rounded half to even), finite.
    size : int
        Odd side.
    fill : float
        Value outside the image.

    Returns
    -------
    stamps : ndarray (n, size, size), dtype of ``images`` promoted with ``fill``
    padded : ndarray (n,) bool
    """
    size = _check_size(size)
    xp = array_namespace(images, x, y)
    B, ny, nx = images.shape
    out_dtype = np.result_type(images.dtype, fill)
    n = x.shape[0]
    if n == 0:
        return xp.empty((0, size, size), dtype=out_dtype), xp.zeros(0, dtype=bool)
    half = size // 2
    offsets = xp.arange(-half, half + 1, dtype=xp.int64)
    rows = xp.rint(y).astype(xp.int64)[:, None] + offsets  # (n, size)
    cols = xp.rint(x).astype(xp.int64)[:, None] + offsets  # (n, size)
    row_in = (rows >= 0) & (rows < ny)
    col_in = (cols >= 0) & (cols < nx)
    b = xp.zeros((n, 1, 1), dtype=xp.int64) if image is None else image.astype(xp.int64).reshape(n, 1, 1)
    # one gather for all stamps, with indices clipped into the image ...
    stamps = images[b, xp.clip(rows, 0, ny - 1)[:, :, None], xp.clip(cols, 0, nx - 1)[:, None, :]]
    stamps = stamps.astype(out_dtype, copy=False)
    # ... then the clipped (outside) pixels are overwritten with the fill value
    inside = row_in[:, :, None] & col_in[:, None, :]
    stamps = xp.where(inside, stamps, out_dtype.type(fill))
    padded = ~(xp.all(row_in, axis=1) & xp.all(col_in, axis=1))
    return stamps, padded


def extract_triplets(science, reference, difference, x, y, *, size: int = 63, difference_sign=None):
    """Science, reference and difference stamps stacked as channels, as braai takes them.

    Parameters
    ----------
    science, reference, difference : ndarray (ny, nx), numpy or cupy
        The three images on the same pixel grid (reference aligned onto the science).
    x, y : array_like (n,), float
        0-based column and row of the stamp centres (pixels).
    size : int, keyword-only
        Side of the stamps (odd), 63 as ZTF.
    difference_sign : array_like (n,) of +1/-1, optional, keyword-only
        Multiplies each difference stamp. ZTF's convention (which braai was trained on) is
        ``difference_sign = +1 if isdiffpos else -1``: the difference cutout of a negative
        candidate is reference minus science, so a real candidate's centre is always positive.
        ``None`` keeps ``difference`` as given.

    Returns
    -------
    ndarray (n, size, size, 3) float32
        Channel 0 science, 1 reference, 2 difference; pixels outside the image are NaN (use
        :func:`extract_stamps` for the per-stamp ``padded`` flag, the same for all three images).

    Raises
    ------
    ValueError
        If the three images do not share one 2-D shape, or as :func:`extract_stamps`.
    """
    if not (science.shape == reference.shape == difference.shape):
        raise ValueError(
            "science, reference and difference must share one shape, got "
            f"{tuple(science.shape)}, {tuple(reference.shape)}, {tuple(difference.shape)}"
        )
    xp = array_namespace(science, reference, difference)
    chans = [
        extract_stamps(img, x, y, size=size, fill=float("nan"))[0].astype(xp.float32, copy=False)
        for img in (science, reference, difference)
    ]
    if difference_sign is not None:
        sign = to_device(difference_sign, xp, dtype=np.float32, label="difference_sign").reshape(-1)
        if sign.shape[0] != chans[2].shape[0]:
            raise ValueError(f"difference_sign has {sign.shape[0]} values for {chans[2].shape[0]} stamps")
        chans[2] = chans[2] * sign[:, None, None]
    return xp.stack(chans, axis=-1)


def count_in_boxes(mask, image, x, y, *, half: int):
    """Set pixels of boolean ``mask`` in the ``(2 half + 1)^2`` boxes centred on ``round(x), round(y)``
    of images ``image`` of a batch (the part of a box past the edge counts nothing).

    Parameters
    ----------
    mask : ndarray (B, ny, nx) bool
    image : int or ndarray (n,) int
        Image of each box in the batch.
    x, y : ndarray (n,) float
    half : int

    Returns
    -------
    ndarray (n,) int64

    Notes
    -----
    One gather of the boxes (``n (2 half + 1)^2`` values): cheaper than a summed-area table of the
    whole batch when boxes are few (stars, candidates), and the same on every backend.
    """
    xp = array_namespace(mask, x, y)
    B, ny, nx = mask.shape
    n = x.shape[0]
    if n == 0:
        return xp.zeros(0, xp.int64)
    off = xp.arange(-int(half), int(half) + 1, dtype=xp.int64)
    rows = xp.rint(y).astype(xp.int64)[:, None] + off
    cols = xp.rint(x).astype(xp.int64)[:, None] + off
    rin = (rows >= 0) & (rows < ny)
    cin = (cols >= 0) & (cols < nx)
    b = (xp.zeros((n, 1, 1), xp.int64) + image) if np.isscalar(image) else image.astype(xp.int64).reshape(n, 1, 1)
    vals = mask[b, xp.clip(rows, 0, ny - 1)[:, :, None], xp.clip(cols, 0, nx - 1)[:, None, :]]
    vals = vals & rin[:, :, None] & cin[:, None, :]
    return vals.reshape(n, -1).sum(axis=1).astype(xp.int64)
