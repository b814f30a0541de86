"""Fixed-radius neighbour queries (kernels.neighbours) against scipy's cKDTree (the oracle they
replace) and an obvious sequential greedy loop (suppress), on uniform and crowded fields, points at
exactly the radius, duplicates, empty and single-point sets, batches; numpy and the xp fixture
agree; and on the strict device stand-in, which refuses every implicit host conversion."""
import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from nightsift.kernels import count_transfers, to_device, to_host
from nightsift.kernels.neighbours import count_within, max_within, nearest, pairs_within, suppress


# ------------------------------------------------------------------------------------------
# oracles
# ------------------------------------------------------------------------------------------
def _ball_lists(x1, y1, im1, x2, y2, im2, r):
    """For each set-1 point, the sorted set-2 indices within r (<=), same image (cKDTree per image)."""
    out = [[] for _ in range(len(x1))]
    ok1 = np.isfinite(x1) & np.isfinite(y1)
    ok2 = np.isfinite(x2) & np.isfinite(y2)
    for b in np.unique(np.concatenate([im1, im2])):
        s1 = np.flatnonzero((im1 == b) & ok1)
        s2 = np.flatnonzero((im2 == b) & ok2)
        if len(s1) == 0 or len(s2) == 0:
            continue
        lists = cKDTree(np.c_[x2[s2], y2[s2]]).query_ball_point(np.c_[x1[s1], y1[s1]], r=r)
        for i, lst in zip(s1, lists):
            out[i] = sorted(int(s2[k]) for k in lst)
    return out


def _d2(x1, y1, x2, y2, i, j):
    dx, dy = x1[i] - x2[j], y1[i] - y2[j]
    return dx * dx + dy * dy


def _oracle_nearest(x1, y1, x2, y2, lists):
    idx = np.full(len(x1), -1, np.int64)
    dist = np.full(len(x1), np.inf)
    for i, lst in enumerate(lists):
        if lst:
            d2 = [(_d2(x1, y1, x2, y2, i, j), j) for j in lst]
            best_d2, best_j = min(d2)  # ties: smallest index
            idx[i], dist[i] = best_j, math.sqrt(best_d2)
    return idx, dist


def _greedy(x, y, s, r, im, g):
    """The sequential greedy loop: strongest first (ties by (image, y, x), then index)."""
    n = len(x)
    neg = np.where(np.isnan(s), np.inf, -s)
    order = sorted(range(n), key=lambda k: (neg[k], im[k], y[k], x[k], k))
    keep = np.zeros(n, bool)
    kept = []
    for p in order:
        q = np.array(kept, np.int64)
        clash = (im[q] == im[p]) & (g[q] == g[p]) & ((x[q] - x[p]) ** 2 + (y[q] - y[p]) ** 2 <= r * r)
        if not clash.any():
            keep[p] = True
            kept.append(p)
    return keep


# ------------------------------------------------------------------------------------------
# data sets
# ------------------------------------------------------------------------------------------
KINDS = ["uniform", "crowded", "at_radius", "duplicates"]


def _dataset(kind, rng):
    """(x1, y1, im1, x2, y2, im2, radius), float64 / int64 numpy arrays."""
    if kind == "uniform":  # sparse field, 3 images
        n1, n2, r = 700, 900, 12.0
        x1, y1, x2, y2 = (rng.uniform(0, 512, n) for n in (n1, n1, n2, n2))
        im1, im2 = rng.integers(0, 3, n1), rng.integers(0, 3, n2)
    elif kind == "crowded":  # a dense cluster (tens of points per cell) on a sparse field
        r = 4.0
        x2 = np.concatenate([rng.uniform(100, 130, 600), rng.uniform(0, 512, 200)])
        y2 = np.concatenate([rng.uniform(200, 230, 600), rng.uniform(0, 512, 200)])
        x1 = np.concatenate([rng.uniform(95, 135, 400), rng.uniform(0, 512, 150)])
        y1 = np.concatenate([rng.uniform(195, 235, 400), rng.uniform(0, 512, 150)])
        im1, im2 = rng.integers(0, 2, len(x1)), rng.integers(0, 2, len(x2))
    elif kind == "at_radius":  # integer lattice: many pairs at exactly r (5-0 and 3-4-5 offsets), ties
        r = 5.0
        g = np.arange(0, 60, 5.0)
        x2, y2 = (a.ravel() for a in np.meshgrid(g, g))
        x1 = rng.integers(0, 60, 300).astype(float)
        y1 = rng.integers(0, 60, 300).astype(float)
        im1, im2 = np.zeros(len(x1), np.int64), np.zeros(len(x2), np.int64)
    elif kind == "duplicates":  # every set-2 point three times; set 1 partly on top of set 2
        r = 6.0
        bx, by = rng.uniform(0, 200, 150), rng.uniform(0, 200, 150)
        x2, y2 = np.repeat(bx, 3), np.repeat(by, 3)
        pick = rng.integers(0, 150, 80)
        x1 = np.concatenate([bx[pick], rng.uniform(0, 200, 120)])
        y1 = np.concatenate([by[pick], rng.uniform(0, 200, 120)])
        im1, im2 = np.zeros(len(x1), np.int64), np.zeros(len(x2), np.int64)
    else:
        raise AssertionError(kind)
    return (x1.astype(np.float64), y1.astype(np.float64), np.asarray(im1, np.int64),
            x2.astype(np.float64), y2.astype(np.float64), np.asarray(im2, np.int64), r)


def _dev(xp, *arrays):
    return [None if a is None else to_device(a, xp) for a in arrays]


# ------------------------------------------------------------------------------------------
# nearest / count_within / max_within / pairs_within against cKDTree
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_queries_match_ckdtree(xp, rng, kind):
    x1, y1, im1, x2, y2, im2, r = _dataset(kind, rng)
    lists = _ball_lists(x1, y1, im1, x2, y2, im2, r)
    assert sum(map(len, lists)) > 50  # the data set has neighbours to find
    dx1, dy1, dim1, dx2, dy2, dim2 = _dev(xp, x1, y1, im1, x2, y2, im2)
    kw = dict(radius=r, image1=dim1, image2=dim2)

    idx, dist = (to_host(a) for a in nearest(dx1, dy1, dx2, dy2, **kw))
    o_idx, o_dist = _oracle_nearest(x1, y1, x2, y2, lists)
    assert idx.dtype == np.int64 and dist.dtype == np.float64
    np.testing.assert_array_equal(idx, o_idx)
    np.testing.assert_array_equal(dist, o_dist)

    cnt = to_host(count_within(dx1, dy1, dx2, dy2, **kw))
    assert cnt.dtype == np.int64
    np.testing.assert_array_equal(cnt, [len(lst) for lst in lists])

    vals = rng.normal(size=len(x2))
    vals[::7] = np.nan  # NaN values take no part
    use = rng.random(len(x2)) < 0.7
    mx = to_host(max_within(dx1, dy1, dx2, dy2, *_dev(xp, vals), where2=to_device(use, xp), **kw))
    o_mx = np.array([max([vals[j] for j in lst if use[j] and not np.isnan(vals[j])], default=-np.inf)
                     for lst in lists])
    np.testing.assert_array_equal(mx, o_mx)

    i, j, d = (to_host(a) for a in pairs_within(dx1, dy1, dx2, dy2, **kw))
    o_i = np.array([a for a, lst in enumerate(lists) for _ in lst], np.int64)
    o_j = np.array([b for lst in lists for b in lst], np.int64)
    np.testing.assert_array_equal(i, o_i)
    np.testing.assert_array_equal(j, o_j)
    np.testing.assert_array_equal(d, np.sqrt(_d2(x1, y1, x2, y2, o_i, o_j)))


def test_nearest_equals_ckdtree_query(rng):
    """On tie-free data the nearest match is cKDTree.query's, distances to the last bit."""
    x1, y1, x2, y2 = (rng.uniform(0, 1024, n) for n in (3000, 3000, 4000, 4000))
    r = 15.0
    d, j = cKDTree(np.c_[x2, y2]).query(np.c_[x1, y1], distance_upper_bound=np.nextafter(r, np.inf))
    idx, dist = nearest(x1, y1, x2, y2, radius=r)
    assert np.isfinite(d).sum() > 1000 and (~np.isfinite(d)).sum() > 100
    np.testing.assert_array_equal(idx, np.where(np.isfinite(d), j, -1))
    np.testing.assert_array_equal(dist, d)


def test_exactly_at_radius_is_within():
    x2, y2 = np.array([3.0, 0.0, 10.0, 5.0]), np.array([4.0, 5.0, 0.0, 0.0])
    x1, y1 = np.zeros(1), np.zeros(1)
    np.testing.assert_array_equal(count_within(x1, y1, x2, y2, radius=5.0), [3])
    idx, dist = nearest(x1, y1, x2, y2, radius=5.0)  # three at exactly 5: smallest index
    assert idx.tolist() == [0] and dist.tolist() == [5.0]
    np.testing.assert_array_equal(count_within(x1, y1, x2, y2, radius=np.nextafter(5.0, 0)), [0])
    assert nearest(x1, y1, x2, y2, radius=4.999)[0].tolist() == [-1]


def test_self_index_leaves_out_own_point(xp, rng):
    """Isolation counts: one catalogue against itself, its own point left out (cKDTree k=2)."""
    x, y = rng.uniform(0, 300, 800), rng.uniform(0, 300, 800)
    x[:20], y[:20] = x[20:40], y[20:40]  # exact duplicates count as neighbours of each other
    r = 7.0
    dx, dy = _dev(xp, x, y)
    me = to_device(np.arange(len(x)), xp)
    cnt = to_host(count_within(dx, dy, dx, dy, radius=r, self_index=me))
    lists = cKDTree(np.c_[x, y]).query_ball_point(np.c_[x, y], r=r)
    np.testing.assert_array_equal(cnt, [len(lst) - 1 for lst in lists])
    d, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
    np.testing.assert_array_equal(cnt == 0, d[:, 1] > r)
    # -1: nothing left out
    cnt_all = to_host(count_within(dx, dy, dx, dy, radius=r, self_index=to_device(np.full(len(x), -1), xp)))
    np.testing.assert_array_equal(cnt_all, [len(lst) for lst in lists])
    # brightest neighbour other than itself
    f = rng.uniform(1, 100, len(x))
    mx = to_host(max_within(dx, dy, dx, dy, to_device(f, xp), radius=r, self_index=me))
    np.testing.assert_array_equal(mx, [max([f[j] for j in lst if j != i], default=-np.inf)
                                       for i, lst in enumerate(lists)])


def test_batched_equals_per_image_calls(xp, rng):
    """A batch of three images (the middle one empty in set 1 and set 2) equals three calls."""
    r = 10.0
    x1, y1, x2, y2 = (rng.uniform(0, 256, n) for n in (600, 600, 700, 700))
    im1 = rng.choice([0, 2], len(x1))
    im2 = rng.choice([0, 2], len(x2))
    d = _dev(xp, x1, y1, im1, x2, y2, im2)
    kw = dict(radius=r, image1=d[2], image2=d[5])
    idx, dist = (to_host(a) for a in nearest(d[0], d[1], d[3], d[4], **kw))
    cnt = to_host(count_within(d[0], d[1], d[3], d[4], **kw))
    s = rng.uniform(0, 1, len(x1))
    keep = to_host(suppress(d[0], d[1], to_device(s, xp), radius=r, image=d[2]))
    cross = 0
    for b in range(3):
        s1, s2 = np.flatnonzero(im1 == b), np.flatnonzero(im2 == b)
        assert (len(s1) == 0) == (b == 1)
        j_b, d_b = nearest(x1[s1], y1[s1], x2[s2], y2[s2], radius=r)
        np.testing.assert_array_equal(idx[s1], np.where(j_b >= 0, s2[np.maximum(j_b, 0)], -1))
        np.testing.assert_array_equal(dist[s1], d_b)
        np.testing.assert_array_equal(cnt[s1], count_within(x1[s1], y1[s1], x2[s2], y2[s2], radius=r))
        np.testing.assert_array_equal(keep[s1], suppress(x1[s1], y1[s1], s[s1], radius=r))
        cross += count_within(x1[s1], y1[s1], x2, y2, radius=r).sum() - cnt[s1].sum()
    assert cross > 0  # without the image index, points of other images would have matched


def test_empty_single_and_nonfinite(xp):
    e = to_device(np.zeros(0), xp)
    one = to_device(np.array([3.0]), xp)
    for a, b in ((e, one), (one, e), (e, e)):
        n1 = a.shape[0]
        idx, dist = nearest(a, a, b, b, radius=2.0)
        assert to_host(idx).tolist() == [-1] * n1 and to_host(dist).tolist() == [math.inf] * n1
        assert to_host(idx).dtype == np.int64
        assert to_host(count_within(a, a, b, b, radius=2.0)).tolist() == [0] * n1
        assert to_host(max_within(a, a, b, b, b, radius=2.0)).tolist() == [-math.inf] * n1
        i, j, d = pairs_within(a, a, b, b, radius=2.0)
        assert to_host(i).shape == (0,) and to_host(j).dtype == np.int64
    assert to_host(suppress(e, e, e, radius=2.0)).tolist() == []
    assert to_host(suppress(one, one, one, radius=2.0)).tolist() == [True]
    idx, dist = nearest(one, one, one, one, radius=0.0)  # radius 0: coincident points only
    assert to_host(idx).tolist() == [0] and to_host(dist).tolist() == [0.0]
    # non-finite coordinates: no neighbours, never found
    x = to_device(np.array([0.0, np.nan, 1.0, np.inf]), xp)
    y = to_device(np.array([0.0, 0.0, np.nan, 0.0]), xp)
    assert to_host(count_within(x, y, x, y, radius=5.0)).tolist() == [1, 0, 0, 0]
    assert to_host(nearest(x, y, x, y, radius=5.0)[0]).tolist() == [0, -1, -1, -1]
    assert to_host(suppress(x, y, to_device(np.ones(4), xp), radius=5.0)).tolist() == [True] * 4
    # all points invalid
    nan = to_device(np.full(3, np.nan), xp)
    assert to_host(count_within(nan, nan, nan, nan, radius=1.0)).tolist() == [0, 0, 0]


def test_tiny_radius_huge_extent():
    """The grid caps its cells per axis (the keys stay in int64): still exact."""
    x = np.array([0.0, 1e-4, 1e6, 1e6 + 5e-5, 3e5])
    y = np.array([0.0, 0.0, 1e6, 1e6, 7.0])
    np.testing.assert_array_equal(count_within(x, y, x, y, radius=1e-4), [2, 2, 2, 2, 1])
    assert nearest(x, y, x, y, radius=1e-4, image1=None, image2=None)[0].tolist() == [0, 1, 2, 3, 4]


def test_bad_arguments():
    a = np.zeros(3)
    with pytest.raises(ValueError, match="radius"):
        nearest(a, a, a, a, radius=-1.0)
    with pytest.raises(ValueError, match="radius"):
        count_within(a, a, a, a, radius=math.inf)
    with pytest.raises(ValueError, match="y1"):
        nearest(a, np.zeros(2), a, a, radius=1.0)
    with pytest.raises(ValueError, match="image2"):
        nearest(a, a, a, a, radius=1.0, image2=np.zeros(3))  # float image index
    with pytest.raises(ValueError, match="image indices"):
        nearest(a, a, a, a, radius=1.0, image1=np.array([0, -1, 0]))
    with pytest.raises(ValueError, match="self_index"):
        count_within(a, a, a, a, radius=1.0, self_index=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="where2"):
        max_within(a, a, a, a, a, radius=1.0, where2=np.ones(3))
    with pytest.raises(ValueError, match="strength"):
        suppress(a, a, np.zeros(4), radius=1.0)


# ------------------------------------------------------------------------------------------
# suppress against the sequential greedy loop
# ------------------------------------------------------------------------------------------
def _chains(rng, n_chains=25, length=12, r=5.0):
    """Lines of points 0.8 r apart with falling strength: greedy keeps every other point (judging
    each point against all stronger ones would keep only the first)."""
    xs, ys, ss = [], [], []
    for c in range(n_chains):
        x0, y0, ang = rng.uniform(50, 450), rng.uniform(50, 450), rng.uniform(0, np.pi)
        t = np.arange(length) * 0.8 * r
        xs.append(x0 + t * np.cos(ang))
        ys.append(y0 + t * np.sin(ang))
        ss.append(100.0 - t + rng.uniform(0, 0.1, length) * (c % 2))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


@pytest.mark.parametrize("kind", ["random", "chains", "ties"])
def test_suppress_equals_greedy_loop(xp, rng, kind):
    r = 5.0
    if kind == "random":  # clustered peaks, both signs, 2 images
        c = rng.uniform(0, 400, (60, 2))
        pick = rng.integers(0, 60, 900)
        x = c[pick, 0] + rng.normal(0, 4, 900)
        y = c[pick, 1] + rng.normal(0, 4, 900)
        s = rng.exponential(5, 900)
    elif kind == "chains":
        x, y, s = _chains(rng, r=r)
        x = np.concatenate([x, x[:60] + 0.3])  # crossing chains
        y = np.concatenate([y, y[:60] - 0.2])
        s = np.concatenate([s, s[:60] - 0.05])
    else:  # equal strengths, integer positions, duplicates, NaN strength: the tie rules decide
        x = rng.integers(0, 40, 700).astype(float)
        y = rng.integers(0, 40, 700).astype(float)
        s = rng.integers(0, 3, 700).astype(float)
        s[::50] = np.nan
    n = len(x)
    im = rng.integers(0, 2, n)
    g = rng.choice([-1, 1], n)
    o = _greedy(x, y, s, r, im, g)
    keep = to_host(suppress(*_dev(xp, x, y, s), radius=r, image=to_device(im, xp), group=to_device(g, xp)))
    assert keep.dtype == bool
    np.testing.assert_array_equal(keep, o)
    # not a trivial case: some, but not all, points dropped, some kept points have a stronger
    # neighbour within r (a chain: greedy differs from "strongest of its disc")
    assert 0 < o.sum() < n
    if kind == "chains":
        one = to_host(suppress(*_dev(xp, x, y, s), radius=r))  # one image, one group
        np.testing.assert_array_equal(one, _greedy(x, y, s, r, 0 * im, 0 * g))
        i, j, _ = pairs_within(x, y, x, y, radius=r, image1=im, image2=im)
        beaten = np.zeros(n, bool)
        np.logical_or.at(beaten, i, (s[j] > s[i]) & (g[j] == g[i]))
        assert (o & beaten).sum() > 10


def _kdtree_deduplicate(x, y, value, sign, *, radius):
    """The chain's former deduplication (cKDTree, sequential greedy), kept here as an oracle."""
    order = np.lexsort((x, y, -np.abs(value)))
    rank = np.empty(len(x), int)
    rank[order] = np.arange(len(x))
    keep = np.ones(len(x), bool)
    tree = cKDTree(np.c_[x, y])
    for i in order:
        if not keep[i]:
            continue
        for j in tree.query_ball_point([x[i], y[i]], r=radius):
            if rank[j] > rank[i] and sign[j] == sign[i]:
                keep[j] = False
    return np.flatnonzero(keep)


def test_suppress_equals_the_former_kdtree_deduplication(rng):
    """The chain's former deduplication (cKDTree, sequential) as the oracle."""
    deduplicate = _kdtree_deduplicate

    c = rng.uniform(0, 500, (80, 2))
    pick = rng.integers(0, 80, 1500)
    x = np.round(c[pick, 0] + rng.normal(0, 6, 1500), 1)
    y = np.round(c[pick, 1] + rng.normal(0, 6, 1500), 1)
    v = rng.normal(0, 10, 1500)
    sign = np.where(v > 0, 1, -1)
    for r in (3.0, 8.0, 20.0):
        ref = deduplicate(x, y, v, sign, radius=r)
        keep = suppress(x, y, np.abs(v), radius=r, group=sign)
        np.testing.assert_array_equal(np.sort(np.flatnonzero(keep)), np.sort(ref))


# ------------------------------------------------------------------------------------------
# the strict device stand-in
# ------------------------------------------------------------------------------------------
def test_strict_device_runs_and_agrees(rng):
    try:
        from tests.strict_device import strict_namespace
    except ImportError:
        pytest.skip("tests/strict_device.py (the strict device stand-in) is not present")
    sx = strict_namespace()
    x1, y1, im1, x2, y2, im2, r = _dataset("crowded", rng)
    vals = rng.normal(size=len(x2))
    s1 = rng.uniform(0, 1, len(x1))
    g1 = np.where(rng.random(len(x1)) < 0.5, 1, -1)
    host = dict(x1=x1, y1=y1, im1=im1, x2=x2, y2=y2, im2=im2, vals=vals, s1=s1, g1=g1, me=np.arange(len(x1)))

    def run(d):
        kw = dict(radius=r, image1=d["im1"], image2=d["im2"])
        return (*nearest(d["x1"], d["y1"], d["x2"], d["y2"], **kw),
                count_within(d["x1"], d["y1"], d["x2"], d["y2"], **kw),
                count_within(d["x1"], d["y1"], d["x1"], d["y1"], radius=r, self_index=d["me"]),
                max_within(d["x1"], d["y1"], d["x2"], d["y2"], d["vals"], where2=d["vals"] > 0, **kw),
                *pairs_within(d["x1"], d["y1"], d["x2"], d["y2"], **kw),
                suppress(d["x1"], d["y1"], d["s1"], radius=r, image=d["im1"], group=d["g1"]))

    dev = {k: sx.asarray(v) for k, v in host.items()}
    sx.reset_stats()
    with count_transfers() as led:
        out = run(dev)
    assert sx.stats.h2d_count == 0  # nothing uploaded behind the ledger's back
    assert sx.stats.d2h_count == led.d2h_count == led.scalar_reads  # only host_scalars reads
    assert led.scalar_reads <= 6 + 20  # one per query, one per suppression round
    for a, b in zip(out, run(host)):
        assert isinstance(a, sx.ndarray)
        np.testing.assert_array_equal(to_host(a), b)
