"""Fixed-radius neighbour queries between 2-D point sets, batched by image, written once over ``xp``.

These replace scipy's ``cKDTree`` (host only) in the chain: source isolation, star matching
between the science and reference catalogues, candidate deduplication, the nearest reference
source. They run unchanged on numpy, cupy and the strict device stand-in.

Definitions
-----------
Points are 0-based pixel coordinates ``(x, y)``, float64. Each point may carry an ``image`` index
(int64, ``>= 0``) into a batch; points of different images never interact (``None``: all in
image 0). Point ``q`` of set 2 is **within** ``radius`` of point ``p`` of set 1 when they are in
the same image and ``(x_p - x_q)**2 + (y_p - y_q)**2 <= radius**2`` (squared distances in float64,
the test ``cKDTree.query_ball_point`` makes). Points with a non-finite coordinate have no
neighbours.

Algorithm
---------
A uniform grid hash. The cell side is ``radius * (1 + 1e-6)`` (at least ``radius``, the margin
absorbs rounding of the cell arithmetic), enlarged where needed so that no axis has more than
2**20 cells. A point's key packs ``(image, cell_y, cell_x)`` into one int64. Set 2 is sorted by
key once; the three cells ``cell_x - 1 .. cell_x + 1`` of one cell row are consecutive keys, so
two ``xp.searchsorted`` calls per row give each set-1 point a range ``[lo, hi)`` of set-2 points
covering that row: three ranges cover the 3 x 3 cells around the point, which hold every
neighbour within ``radius``. The kernels then iterate ``k`` over ``range(max range length)``
(the one host read of the loop bound, :func:`~nightsift.kernels._xp.host_scalars`), testing the
``k``-th point of every range at once; ranges that are exhausted are dropped from the working set
at ``k = 0, 1, 2, 4, 8, ...`` (so the work is about the number of candidate pairs, not
``n1 * max occupancy``, even in a field with one crowded cluster). No Python loop runs over points.

:func:`suppress` is the exact greedy non-maximum suppression, computed by a fixed-point iteration
over the within-radius pairs (one host read per round; rounds = the longest chain of decisions).

>>> import numpy as np
>>> x1, y1 = np.array([0.0, 10.0]), np.array([0.0, 0.0])
>>> x2, y2 = np.array([3.0, 0.5, 30.0]), np.array([4.0, 0.0, 0.0])
>>> idx, dist = nearest(x1, y1, x2, y2, radius=5.0)
>>> idx.tolist(), dist.tolist()
([1, -1], [0.5, inf])
>>> count_within(x1, y1, x2, y2, radius=5.0).tolist()
[2, 0]
"""
from __future__ import annotations

import math

import numpy as np

from ._xp import array_namespace, host_scalars

__all__ = ["nearest", "count_within", "max_within", "pairs_within", "suppress"]

#: cells per axis at most: keys ``(image * ncy + cy) * ncx + cx`` stay below 2**62
_MAX_CELLS = 1 << 20
#: image indices must be below this (same reason)
_MAX_IMAGES = 1 << 21
#: cell side = radius * (1 + _CELL_MARGIN): a pair at exactly ``radius`` is never 2 cells apart
_CELL_MARGIN = 1e-6
#: key of set-2 points that take no part (non-finite, ``where2`` False): after every real key
_NO_KEY = int(np.iinfo(np.int64).max)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _check_radius(fn, radius):
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)) \
            or not math.isfinite(radius) or radius < 0:
        raise ValueError(f"{fn}: radius must be a finite Python number >= 0 (pixels), got {radius!r}")
    return float(radius)


def _vector(fn, name, a, n, *, kind):
    if a is None:
        return None
    if getattr(a, "ndim", None) != 1 or (n is not None and a.shape[0] != n):
        shape = tuple(getattr(a, "shape", ()))
        want = "(n,)" if n is None else f"({n},)"
        raise ValueError(f"{fn}: {name} must be a 1-D array of shape {want}, got shape {shape}")
    if kind == "int" and a.dtype.kind not in "iu":
        raise ValueError(f"{fn}: {name} must be an integer array, got dtype {a.dtype}")
    if kind == "bool" and a.dtype.kind != "b":
        raise ValueError(f"{fn}: {name} must be a boolean array, got dtype {a.dtype}")
    if kind == "float" and a.dtype.kind not in "fiu":
        raise ValueError(f"{fn}: {name} must be a real array, got dtype {a.dtype}")
    return a


def _pointset(fn, xp, sfx, x, y, image):
    x = _vector(fn, f"x{sfx}", x, None, kind="float")
    n = x.shape[0]
    y = _vector(fn, f"y{sfx}", y, n, kind="float")
    image = _vector(fn, f"image{sfx}", image, n, kind="int")
    x, y = x.astype(xp.float64), y.astype(xp.float64)
    im = xp.zeros(n, dtype=xp.int64) if image is None else image.astype(xp.int64)
    return x, y, im, n


# --------------------------------------------------------------------------------------------
# the grid and its scan
# --------------------------------------------------------------------------------------------
class _Scan:
    """Candidate pairs (set-1 point, set-2 point) from the three cell rows around each set-1 point.

    ``rounds()`` yields, for ``k = 0 .. max range length - 1``, the entries ``e`` (row * n1 + i)
    whose range has a ``k``-th point, with ``i`` (set-1 index), ``j`` (set-2 index), ``d2``
    (squared distance) and ``within`` (the pair counts: within radius, ``j`` not ``self_index[i]``).
    Each entry appears at most once per round, so ``state[e] = ...`` scatters are conflict-free.
    """

    def __init__(self, fn, xp, x1, y1, im1, x2, y2, im2, radius, *, use2=None, self_index=None):
        self.xp = xp
        self.x1, self.y1, self.x2, self.y2 = x1, y1, x2, y2
        self.n1, self.n2 = x1.shape[0], x2.shape[0]
        self.r2 = radius * radius
        self.self_index = self_index
        inf = math.inf
        ok1 = xp.isfinite(x1) & xp.isfinite(y1)
        ok2 = xp.isfinite(x2) & xp.isfinite(y2)
        if use2 is not None:
            ok2 = ok2 & use2

        # one grid for both sets: origin at the smallest valid coordinate
        def lo_hi(a1, a2):
            lo = xp.minimum(xp.min(xp.where(ok1, a1, inf)), xp.min(xp.where(ok2, a2, inf)))
            hi = xp.maximum(xp.max(xp.where(ok1, a1, -inf)), xp.max(xp.where(ok2, a2, -inf)))
            lo = xp.where(xp.isfinite(lo), lo, 0.0)  # no valid point at all
            hi = xp.where(xp.isfinite(hi), hi, lo)
            return lo, hi

        xmin, xmax = lo_hi(x1, x2)
        ymin, ymax = lo_hi(y1, y2)
        ext = xp.maximum(xp.maximum(xmax - xmin, ymax - ymin), 0.0)
        cell = xp.maximum(ext / (_MAX_CELLS - 1), radius * (1.0 + _CELL_MARGIN))
        cell = xp.where(cell > 0, cell, 1.0)
        ncx = xp.floor((xmax - xmin) / cell).astype(xp.int64) + 3  # + 1 empty column each side
        ncy = xp.floor((ymax - ymin) / cell).astype(xp.int64) + 3

        def cells(x, y, ok):
            cx = xp.floor((xp.where(ok, x, xmin) - xmin) / cell).astype(xp.int64) + 1
            cy = xp.floor((xp.where(ok, y, ymin) - ymin) / cell).astype(xp.int64) + 1
            return cx, cy

        cx2, cy2 = cells(x2, y2, ok2)
        key2 = xp.where(ok2, (im2 * ncy + cy2) * ncx + cx2, _NO_KEY)
        self.order2 = xp.argsort(key2)
        skey2 = key2[self.order2]
        cx1, cy1 = cells(x1, y1, ok1)
        los, his = [], []
        for dy in (-1, 0, 1):
            row = (im1 * ncy + (cy1 + dy)) * ncx + cx1
            los.append(xp.searchsorted(skey2, row - 1, side="left"))
            his.append(xp.searchsorted(skey2, row + 1, side="right"))
        lo = xp.concatenate(los).astype(xp.int64)
        cnt = xp.where(xp.concatenate([ok1, ok1, ok1]), xp.concatenate(his).astype(xp.int64) - lo, 0)
        self.lo, self.cnt = lo, cnt
        imin = xp.minimum(xp.min(im1), xp.min(im2))
        imax = xp.maximum(xp.max(im1), xp.max(im2))
        self.maxc, imin, imax = host_scalars(xp.max(cnt), imin, imax)  # the one read
        if imin < 0 or imax >= _MAX_IMAGES:
            raise ValueError(f"{fn}: image indices must be in [0, {_MAX_IMAGES}), got [{imin}, {imax}]")

    def rounds(self):
        xp, n1, n2 = self.xp, self.n1, self.n2
        e = xp.arange(3 * n1, dtype=xp.int64)
        lo, cnt = self.lo, self.cnt
        for k in range(self.maxc):
            if k & (k - 1) == 0:  # k = 0, 1, 2, 4, ...: drop entries whose range is exhausted
                live = cnt > k
                e, lo, cnt = e[live], lo[live], cnt[live]
                i = e % n1
                xi, yi = self.x1[i], self.y1[i]
                si = None if self.self_index is None else self.self_index[i]
            act = cnt > k
            j = self.order2[xp.minimum(lo + k, n2 - 1)]
            dx = xi - self.x2[j]
            dy = yi - self.y2[j]
            d2 = dx * dx + dy * dy
            within = act & (d2 <= self.r2)
            if si is not None:
                within = within & (j != si)
            yield e, i, j, d2, within


def _prepare(fn, x1, y1, x2, y2, radius, image1, image2, extra=()):
    xp = array_namespace(x1, y1, x2, y2, image1, image2, *extra)
    radius = _check_radius(fn, radius)
    x1, y1, im1, n1 = _pointset(fn, xp, "1", x1, y1, image1)
    x2, y2, im2, n2 = _pointset(fn, xp, "2", x2, y2, image2)
    return xp, radius, x1, y1, im1, n1, x2, y2, im2, n2


def _self_index(fn, xp, self_index, n1):
    s = _vector(fn, "self_index", self_index, n1, kind="int")
    return None if s is None else s.astype(xp.int64)


# --------------------------------------------------------------------------------------------
# public queries
# --------------------------------------------------------------------------------------------
def nearest(x1, y1, x2, y2, *, radius: float, image1=None, image2=None):
    """Nearest point of set 2 within ``radius`` of each point of set 1.

    Parameters
    ----------
    x1, y1 : ndarray (n1,) float64
        Query points (pixels).
    x2, y2 : ndarray (n2,) float64
        Points searched (pixels).
    radius : float, keyword-only
        Search radius (pixels), finite, >= 0; a point at exactly ``radius`` is found.
    image1, image2 : ndarray (n1,) / (n2,) int64, optional, keyword-only
        Index of each point's image in a batch (>= 0); points of different images never match.

    Returns
    -------
    index : ndarray (n1,) int64
        Index into set 2 of the nearest point, -1 where none is within ``radius``. Ties (equal
        distances) go to the smallest index.
    distance : ndarray (n1,) float64
        Its distance (pixels), ``inf`` where none.

    Raises
    ------
    ValueError
        Mismatched shapes, a non-integer or negative image index, a bad radius.
    """
    xp, radius, x1, y1, im1, n1, x2, y2, im2, n2 = _prepare("nearest", x1, y1, x2, y2, radius, image1, image2)
    if n1 == 0 or n2 == 0:
        return xp.full(n1, -1, dtype=xp.int64), xp.full(n1, math.inf, dtype=xp.float64)
    scan = _Scan("nearest", xp, x1, y1, im1, x2, y2, im2, radius)
    bd = xp.full(3 * n1, math.inf, dtype=xp.float64)
    bj = xp.full(3 * n1, n2, dtype=xp.int64)
    for e, _, j, d2, within in scan.rounds():
        cd, cj = bd[e], bj[e]
        better = within & ((d2 < cd) | ((d2 == cd) & (j < cj)))
        bd[e] = xp.where(better, d2, cd)
        bj[e] = xp.where(better, j, cj)
    bd, bj = bd.reshape(3, n1), bj.reshape(3, n1)
    d, j = bd[0], bj[0]
    for r in (1, 2):
        better = (bd[r] < d) | ((bd[r] == d) & (bj[r] < j))
        d, j = xp.where(better, bd[r], d), xp.where(better, bj[r], j)
    found = xp.isfinite(d)
    return xp.where(found, j, -1), xp.sqrt(d)


def count_within(x1, y1, x2, y2, *, radius: float, image1=None, image2=None, self_index=None):
    """Number of points of set 2 within ``radius`` (``<=``) of each point of set 1.

    Parameters
    ----------
    x1, y1, x2, y2, radius, image1, image2
        As :func:`nearest`.
    self_index : ndarray (n1,) int64, optional, keyword-only
        For each set-1 point, its own index in set 2 (or -1): that point is not counted (e.g.
        ``arange(n)`` when both sets are the same catalogue).

    Returns
    -------
    ndarray (n1,) int64
    """
    xp, radius, x1, y1, im1, n1, x2, y2, im2, n2 = _prepare("count_within", x1, y1, x2, y2, radius, image1,
                                                            image2, (self_index,))
    si = _self_index("count_within", xp, self_index, n1)
    if n1 == 0 or n2 == 0:
        return xp.zeros(n1, dtype=xp.int64)
    scan = _Scan("count_within", xp, x1, y1, im1, x2, y2, im2, radius, self_index=si)
    c = xp.zeros(3 * n1, dtype=xp.int64)
    for e, _, _, _, within in scan.rounds():
        c[e] = c[e] + within.astype(xp.int64)
    return c.reshape(3, n1).sum(axis=0)


def max_within(x1, y1, x2, y2, values2, *, radius: float, image1=None, image2=None, self_index=None,
               where2=None):
    """Maximum of ``values2`` over the points of set 2 within ``radius`` of each point of set 1.

    Parameters
    ----------
    x1, y1, x2, y2, radius, image1, image2, self_index
        As :func:`count_within`.
    values2 : ndarray (n2,) float64
        A value per set-2 point (e.g. flux); NaN values take no part.
    where2 : ndarray (n2,) bool, optional, keyword-only
        Only set-2 points where this is True take part.

    Returns
    -------
    ndarray (n1,) float64
        ``-inf`` where no set-2 point takes part.
    """
    fn = "max_within"
    xp, radius, x1, y1, im1, n1, x2, y2, im2, n2 = _prepare(fn, x1, y1, x2, y2, radius, image1, image2,
                                                            (values2, self_index, where2))
    v2 = _vector(fn, "values2", values2, n2, kind="float").astype(xp.float64)
    w2 = _vector(fn, "where2", where2, n2, kind="bool")
    si = _self_index(fn, xp, self_index, n1)
    if n1 == 0 or n2 == 0:
        return xp.full(n1, -math.inf, dtype=xp.float64)
    use2 = ~xp.isnan(v2)
    if w2 is not None:
        use2 = use2 & w2
    scan = _Scan(fn, xp, x1, y1, im1, x2, y2, im2, radius, use2=use2, self_index=si)
    m = xp.full(3 * n1, -math.inf, dtype=xp.float64)
    for e, _, j, _, within in scan.rounds():
        cur = m[e]
        m[e] = xp.where(within, xp.maximum(cur, v2[j]), cur)
    return xp.max(m.reshape(3, n1), axis=0)


def pairs_within(x1, y1, x2, y2, *, radius: float, image1=None, image2=None, self_index=None):
    """Every pair (set-1 point, set-2 point) within ``radius``.

    Parameters
    ----------
    x1, y1, x2, y2, radius, image1, image2, self_index
        As :func:`count_within`.

    Returns
    -------
    i : ndarray (m,) int64
        Set-1 indices.
    j : ndarray (m,) int64
        Set-2 indices.
    d : ndarray (m,) float64
        Distances (pixels).
        Sorted by ``(i, j)``; each pair once.
    """
    fn = "pairs_within"
    xp, radius, x1, y1, im1, n1, x2, y2, im2, n2 = _prepare(fn, x1, y1, x2, y2, radius, image1, image2,
                                                            (self_index,))
    si = _self_index(fn, xp, self_index, n1)
    ii, jj, dd = [xp.zeros(0, dtype=xp.int64)], [xp.zeros(0, dtype=xp.int64)], [xp.zeros(0, dtype=xp.float64)]
    if n1 and n2:
        scan = _Scan(fn, xp, x1, y1, im1, x2, y2, im2, radius, self_index=si)
        for _, i, j, d2, within in scan.rounds():
            ii.append(i[within])
            jj.append(j[within])
            dd.append(d2[within])
    i, j, d2 = xp.concatenate(ii), xp.concatenate(jj), xp.concatenate(dd)
    order = xp.argsort(i * max(n2, 1) + j)
    return i[order], j[order], xp.sqrt(d2[order])


def _segment_any(flag, starts, ends):
    """``any(flag[starts[w]:ends[w]])`` for every segment ``w`` (flag: bool (m,))."""
    xp = array_namespace(flag)
    c = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(flag.astype(xp.int64))])
    return c[ends] > c[starts]


def suppress(x, y, strength, *, radius: float, image=None, group=None):
    """Greedy non-maximum suppression: which points survive their stronger neighbours.

    Visiting the points strongest first, a point is kept unless an already kept point of the same
    image and the same ``group`` lies within ``radius`` (``<=``); exactly the sequential greedy
    loop (the detect stage's deduplication), computed in vectorised rounds.

    Parameters
    ----------
    x, y : ndarray (n,) float64
        Positions (pixels).
    strength : ndarray (n,) float64
        Larger is stronger (e.g. ``|S_corr|``). Ties go to the smaller ``(image, y, x)``, then to
        the smaller index; NaN is weaker than every number.
    radius : float, keyword-only
        Suppression radius (pixels), finite, >= 0.
    image : ndarray (n,) int64, optional, keyword-only
        Image index of each point in a batch.
    group : ndarray (n,) integer, optional, keyword-only
        Points of different groups (e.g. the sign of a peak) never suppress each other.

    Returns
    -------
    keep : ndarray (n,) bool
        True for the points kept (input order). Points with a non-finite coordinate are kept.

    Notes
    -----
    Round by round, an undecided point with a kept stronger neighbour is dropped, and one whose
    stronger neighbours are all dropped (or that has none) is kept; a point's greedy decision
    depends only on its stronger neighbours, so this reaches the greedy result. The rounds (one
    host read each) number the longest chain of decisions, a few in practice.
    """
    fn = "suppress"
    xp = array_namespace(x, y, strength, image, group)
    radius = _check_radius(fn, radius)
    x, y, im, n = _pointset(fn, xp, "", x, y, image)
    s = _vector(fn, "strength", strength, n, kind="float").astype(xp.float64)
    g = _vector(fn, "group", group, n, kind="int")
    if n == 0:
        return xp.zeros(0, dtype=bool)
    # rank 0 = visited first: strongest, then smaller (image, y, x), then smaller index
    idx = xp.arange(n, dtype=xp.int64)
    neg = xp.where(xp.isnan(s), math.inf, -s)
    order = xp.lexsort(xp.stack([idx.astype(xp.float64), x, y, im.astype(xp.float64), neg]))
    rank = xp.empty(n, dtype=xp.int64)
    rank[order] = idx
    # edges stronger -> weaker (i weaker, j stronger), sorted by the weaker point
    i, j, _ = pairs_within(x, y, x, y, radius=radius, image1=im, image2=im)
    edge = rank[j] < rank[i]
    if g is not None:
        edge = edge & (g[i] == g[j])
    weak, strong = i[edge], j[edge]  # pairs_within sorts by i: weak is sorted
    kept = xp.zeros(n, dtype=bool)
    dropped = xp.zeros(n, dtype=bool)
    for _ in range(n + 1):  # a round decides at least the strongest undecided point
        starts = xp.searchsorted(weak, idx, side="left")
        ends = xp.searchsorted(weak, idx, side="right")
        has_kept = _segment_any(kept[strong], starts, ends)
        has_open = _segment_any(~(kept[strong] | dropped[strong]), starts, ends)
        open_ = ~(kept | dropped)
        dropped = dropped | (open_ & has_kept)
        kept = kept | (open_ & ~has_kept & ~has_open)
        (n_open,) = host_scalars(xp.sum(~(kept | dropped)))
        if n_open == 0:
            break
        # edges still deciding something: weaker end undecided, stronger end not dropped
        live = ~(kept[weak] | dropped[weak]) & ~dropped[strong]
        weak, strong = weak[live], strong[live]
    return kept
