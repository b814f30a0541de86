"""Science/reference/difference cutout triplets for all candidates of a batch of CCD pairs.

The batched form of :func:`nightsift.kernels.stamps.extract_triplets`: candidates carry the index
of their image in the batch, and one call returns every triplet. The ``xp`` reference is one
gather per plane over the whole batch (:func:`nightsift.kernels.stamps.gather_stamps`, the
oracle); on cupy arrays the Numba CUDA kernel
(:mod:`nightsift.kernels._cuda.stamps`) gathers them all in one launch. Both give identical arrays
(same NaN padding, same half-to-even rounding of the centres).
"""
from __future__ import annotations

import numpy as np

from ._xp import array_namespace, is_cupy, is_host, to_device
from .stamps import gather_stamps

__all__ = ["gather_triplets"]

_METHODS = ("auto", "reference", "cuda")


def gather_triplets(science, reference, difference, image, x, y, *, size: int = 63, channels_last: bool = True,
                    method: str = "auto"):
    """Cut ``size x size`` triplets centred on ``(round(x), round(y))`` of image ``image`` of a batch.

    Parameters
    ----------
    science, reference, difference : ndarray (B, ny, nx) or (ny, nx), numpy or cupy
        The three images of each pair on one pixel grid (any real dtype; e- for nightsift).
    image : array_like (n,) int
        Index in the batch of each candidate's pair (ignored, may be None, for 2-D images).
    x, y : array_like (n,) float
        0-based column and row of the stamp centres (pixels), finite.
    size : int, keyword-only
        Odd stamp side (63 as ZTF).
    channels_last : bool, keyword-only
        ``(n, size, size, 3)`` (braai's layout) when True, ``(n, 3, size, size)`` otherwise.
    method : {"auto", "reference", "cuda"}, keyword-only
        ``"auto"``: CUDA kernel on cupy arrays, reference on numpy.

    Returns
    -------
    stamps : ndarray float32
        Channel 0 science, 1 reference, 2 difference; pixels outside the image are NaN.
    padded : ndarray (n,) bool
        True where the stamp crosses the image edge.

    Raises
    ------
    ValueError
        Shapes that differ, an even size, non-finite centres, an image index out of the batch.
    """
    if not (science.shape == reference.shape == difference.shape) or science.ndim not in (2, 3):
        raise ValueError("gather_triplets: science, reference and difference must share one (B, ny, nx) or "
                         f"(ny, nx) shape, got {tuple(science.shape)}, {tuple(reference.shape)}, "
                         f"{tuple(difference.shape)}")
    if isinstance(size, bool) or int(size) != size or size < 1 or size % 2 != 1:
        raise ValueError(f"gather_triplets: size must be a positive odd integer, got {size!r}")
    if method not in _METHODS:
        raise ValueError(f"gather_triplets: method must be one of {_METHODS}, got {method!r}")
    xp = array_namespace(science, reference, difference)
    sci, ref, dif = (a[None] if a.ndim == 2 else a for a in (science, reference, difference))
    B = sci.shape[0]
    x = to_device(x, xp, dtype=np.float64, label="stamp_centres").reshape(-1)
    y = to_device(y, xp, dtype=np.float64, label="stamp_centres").reshape(-1)
    n = x.shape[0]
    img = xp.zeros(n, dtype=xp.int64) if (image is None or science.ndim == 2) else \
        to_device(image, xp, dtype=np.int64, label="stamp_centres").reshape(-1)
    if y.shape[0] != n or img.shape[0] != n:
        raise ValueError(f"gather_triplets: x, y and image must have one length, got {n}, {y.shape[0]}, "
                         f"{img.shape[0]}")
    if is_host(xp) and n:  # on a device these checks would each synchronise; the chain's values are valid
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError("gather_triplets: stamp centres x and y must be finite (got NaN or inf)")
        if not np.all((img >= 0) & (img < B)):
            raise ValueError(f"gather_triplets: image indices must lie in 0..{B - 1} (the batch size is {B})")
    size = int(size)
    if method == "cuda" or (method == "auto" and is_cupy(xp)):
        from ._cuda.stamps import gather_triplets_cuda

        return gather_triplets_cuda(sci, ref, dif, img, x, y, size=size, channels_last=channels_last)

    chans = []
    for plane in (sci, ref, dif):  # one gather per plane for every candidate of the batch
        st, padded = gather_stamps(plane, img, x, y, size=size, fill=float("nan"))
        chans.append(st.astype(xp.float32, copy=False))
    out = xp.stack(chans, axis=-1 if channels_last else 1)
    return out, padded
