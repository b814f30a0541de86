"""Cutouts stage: the science/reference/difference triplet of every candidate, cut once.

The one owner of what a classifier sees: the scorer, the alert packets and the classifier's
training set (:mod:`nightsift.engine.classify.dataset`) all take these triplets, so there is no
train/serve skew. Channel 0 is the science image minus its background, channel 1 the aligned
reference (background-subtracted before resampling), channel 2 the difference ``D / F_D`` times
the candidate's sign (ZTF's convention, which braai was trained on: a negative candidate's
difference cutout is reference minus science, so a real candidate's centre is positive whatever
its sign). ``cutout.size`` (63, as ZTF) pixels square, centred on the rounded position, NaN
outside the CCD; all candidates of a batch in one gather on the device
(:func:`nightsift.kernels.cutouts.gather_triplets`).
"""
from __future__ import annotations

from nightsift.kernels._xp import array_namespace
from nightsift.kernels.cutouts import gather_triplets

from ..config import CutoutConfig
from ..records import StageResult

__all__ = ["cut_triplets"]


def cut_triplets(science, sky, reference, difference, image, x, y, sign, *, config: CutoutConfig) -> StageResult:
    """Triplets ``(n, s, s, 3)`` float32 of the candidates of a batch (device arrays).

    Parameters
    ----------
    science, sky, reference, difference : ndarray (B, ny, nx)
        Calibrated science image and its background, aligned reference, ZOGY difference (e-).
    image : ndarray (n,) int
        Index of each candidate's CCD in the batch.
    x, y : ndarray (n,) float
        Candidate positions (0-based px).
    sign : ndarray (n,) of +-1
        The candidates' signs (``isdiffpos``).
    config : CutoutConfig

    Returns
    -------
    StageResult(triplets, qa) with qa ``n_edge`` (candidates whose cutouts cross the edge), per CCD.
    """
    xp = array_namespace(science, sky, reference, difference)
    B = science.shape[0]
    sci = (science - sky).astype(xp.float32)
    trip, padded = gather_triplets(sci, reference, difference, image, x, y, size=int(config.size))
    if trip.shape[0]:
        trip[..., 2] *= sign.astype(xp.float32)[:, None, None]
    return StageResult(trip, {"n_edge": xp.bincount(image, weights=padded.astype(xp.float64), minlength=B)})


def triplets_of(candidates, science, reference, difference, *, size: int = 63):
    """Host convenience (tools, tests): the triplets of a candidate table cut from three images
    ``(ny, nx)`` as the chain cuts them (science and reference as given, the difference times each
    candidate's sign). Returns ``(n, size, size, 3)`` float32 on the images' device."""
    import numpy as np

    from nightsift.kernels._xp import to_device

    xp = array_namespace(science, reference, difference)
    n = len(candidates)
    x = to_device(np.asarray(candidates["xpos"], np.float64), xp, label="stamp_centres")
    y = to_device(np.asarray(candidates["ypos"], np.float64), xp, label="stamp_centres")
    sign = to_device(np.where(np.asarray(candidates["isdiffpos"], bool), 1.0, -1.0), xp, label="stamp_centres")
    zero = xp.zeros(n, xp.int64)
    res = cut_triplets(science[None], xp.zeros_like(science)[None], reference[None], difference[None], zero, x, y,
                       sign, config=CutoutConfig(size=int(size)))
    return res.value
