"""The xp peak finder: against a pixel-by-pixel oracle of its definition (ties, NaN, masks, batch,
deduplication), against the sep-based detect stage on a simulated S_corr, and its edge cases."""
import math

import numpy as np
import pytest
from scipy import ndimage

from nightsift.kernels import to_numpy
from nightsift.kernels.peaks import Peaks, disc_offsets, find_peaks, refine_peaks


# ------------------------------------------------------------------------------------------
# obviously-correct oracle: the module's definition, one pixel at a time
# ------------------------------------------------------------------------------------------
def _slow_peaks(scores, threshold, radius, excluded=None):
    v = np.asarray(scores, dtype=np.float64)
    v = v[None] if v.ndim == 2 else v
    v = np.where(np.isfinite(v), v, 0.0)
    ex = np.zeros(v.shape, bool) if excluded is None else np.asarray(excluded).reshape(v.shape)
    B, ny, nx = v.shape

    def is_peak(b, y, x, s):
        if not s * v[b, y, x] > threshold or ex[b, y, x]:
            return False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= yy < ny and 0 <= xx < nx):
                    continue
                before = (yy * nx + xx) < (y * nx + x)
                if before and not s * v[b, y, x] > s * v[b, yy, xx]:
                    return False
                if not before and not s * v[b, y, x] >= s * v[b, yy, xx]:
                    return False
        return True

    peaks = [(b, y, x, s) for b in range(B) for y in range(ny) for x in range(nx) for s in (1, -1)
             if is_peak(b, y, x, s)]
    out = []
    for b, y, x, s in peaks:
        lin = (b * ny + y) * nx + x
        beaten = False
        for b2, y2, x2, s2 in peaks:
            lin2 = (b2 * ny + y2) * nx + x2
            if b2 != b or s2 != s or lin2 == lin or (y2 - y) ** 2 + (x2 - x) ** 2 > radius**2:
                continue
            a, a2 = abs(v[b, y, x]), abs(v[b2, y2, x2])
            if a2 > a or (a2 == a and lin2 < lin):
                beaten = True
        if not beaten:
            out.append((b, y, x, v[b, y, x], s))
    out.sort(key=lambda t: (t[0], t[1], t[2]))
    return out


def _as_tuples(p: Peaks):
    return [(int(b), int(y), int(x), float(v), int(s))
            for b, y, x, v, s in zip(*(to_numpy(a) for a in (p.image, p.y, p.x, p.value, p.sign)))]


def _quantised_field(rng, shape, step=0.5):
    """Smooth noise rounded to ``step``: many exact ties and flat tops."""
    f = ndimage.gaussian_filter(rng.normal(size=shape), (0,) * (len(shape) - 2) + (1.2, 1.2))
    return (np.round(f / f.std() * 2.5 / step) * step).astype(np.float32)


@pytest.mark.parametrize("method", ["numba", "reference"])
@pytest.mark.parametrize("radius", [0.0, 1.0, 2.5, 4.0])
def test_matches_pixel_oracle_with_ties_nan_mask_and_batch(rng, radius, method):
    s = _quantised_field(rng, (3, 23, 31))
    s[0, 5, 5] = np.nan
    s[1, 0, :3] = 9.0  # a flat top on the image edge
    s[2, 10, 10] = -np.inf
    ex = np.zeros(s.shape, bool)
    ex[1, 12:15, 4:9] = True
    got = find_peaks(s, threshold=2.0, radius=radius, excluded=ex, method=method)
    want = _slow_peaks(s, 2.0, radius, ex)
    assert len(want) > 10
    assert _as_tuples(got) == want
    assert got.image.dtype == np.int64 and got.sign.dtype == np.int8 and got.value.dtype == np.float32


def test_xp_backends_agree(xp, rng):
    s = _quantised_field(rng, (2, 40, 50), step=0.25)
    want = _as_tuples(find_peaks(s, threshold=2.5, radius=3.0))
    got = find_peaks(xp.asarray(s), threshold=2.5, radius=3.0, excluded=xp.asarray(s > 6))
    assert _as_tuples(got) == [t for t in want if not t[3] > 6]


def test_flat_top_and_signs():
    s = np.zeros((7, 9), np.float64)
    s[3, 2:5] = 8.0  # plateau: only its first pixel in raster order
    s[6, 8] = -7.0  # a minimum in the corner
    s[0, 0] = 5.0  # exactly at threshold: not a peak (strict)
    p = find_peaks(s, threshold=5.0)
    assert _as_tuples(p) == [(0, 3, 2, 8.0, 1), (0, 6, 8, -7.0, -1)]
    # 2-D input: image index 0, and negative threshold crossing is symmetric
    assert _as_tuples(find_peaks(-s, threshold=5.0)) == [(0, 3, 2, -8.0, -1), (0, 6, 8, 7.0, 1)]


def test_deduplication_is_not_greedy_and_keeps_signs_apart():
    s = np.zeros((5, 20))
    s[2, 2], s[2, 5], s[2, 8] = 10.0, 9.0, 8.0  # chain A > B > C, 3 px apart
    s[2, 14], s[2, 16] = 7.0, -7.5  # opposite signs 2 px apart: both stay
    p = find_peaks(s, threshold=5.0, radius=3.0)
    assert [(int(x), int(sg)) for x, sg in zip(p.x, p.sign)] == [(2, 1), (14, 1), (16, -1)]
    # equal strength within the radius: the first in raster order wins
    t = np.zeros((6, 6))
    t[1, 4] = t[3, 1] = 6.0
    q = find_peaks(t, threshold=5, radius=4)
    assert [(int(y), int(x)) for y, x in zip(q.y, q.x)] == [(1, 4)]


def test_disc_offsets():
    assert disc_offsets(0.0) == []
    assert disc_offsets(1.0) == [(-1, 0), (0, -1), (0, 1), (1, 0)]
    assert len(disc_offsets(1.5)) == 8 and len(disc_offsets(3.0)) == 28


def test_empty_and_errors(rng):
    p = find_peaks(np.zeros((8, 8), np.float32), threshold=5.0, radius=3.0)
    assert len(p) == 0 and p.x.shape == (0,) and p.value.dtype == np.float32
    s = rng.normal(size=(8, 8))
    with pytest.raises(ValueError, match="threshold"):
        find_peaks(s, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        find_peaks(s, threshold=math.nan)
    with pytest.raises(ValueError, match="radius"):
        find_peaks(s, threshold=5.0, radius=-2)
    with pytest.raises(ValueError, match="shape"):
        find_peaks(s[0], threshold=5.0)
    with pytest.raises(ValueError, match="excluded"):
        find_peaks(s, threshold=5.0, excluded=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="method"):
        find_peaks(s, threshold=5.0, method="sep")


def test_integer_input_is_promoted_and_input_untouched():
    s = np.zeros((5, 5), np.int16)
    s[2, 2] = 9
    before = s.copy()
    p = find_peaks(s, threshold=5)
    assert _as_tuples(p) == [(0, 2, 2, 9.0, 1)] and p.value.dtype == np.float64
    np.testing.assert_array_equal(s, before)


# ------------------------------------------------------------------------------------------
# against the sep-based detect stage on a simulated S_corr
# ------------------------------------------------------------------------------------------
def _simulated_scorr(rng, shape=(300, 400), n=40, psf_sigma=1.5):
    """Unit-variance matched-filtered noise plus positive and negative sources of 6-40 sigma."""
    ny, nx = shape
    s = ndimage.gaussian_filter(rng.normal(size=shape), psf_sigma)
    s /= s.std()
    xs, ys = rng.uniform(6, nx - 6, n), rng.uniform(6, ny - 6, n)
    amp = rng.uniform(6, 40, n) * rng.choice([-1, 1], n)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for a, x0, y0 in zip(amp, xs, ys):
        s += a * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * (psf_sigma * math.sqrt(2)) ** 2))
    return s.astype(np.float32), xs, ys, amp


def _sep_peaks(S, *, threshold, min_area):
    """The sep-based detector the detect stage used before kernels.peaks (the independent oracle):
    sep.extract on +S and -S, peak pixel per object, 3x3 quadratic refinement."""
    import sep

    ny, nx = S.shape
    out = []
    for sign in (1, -1):
        img = np.ascontiguousarray(sign * S, dtype=np.float32)
        objs = sep.extract(img, threshold, err=None, minarea=min_area, filter_kernel=None, deblend_cont=0.005,
                           clean=False)
        xi, yi = objs["xpeak"].astype(int), objs["ypeak"].astype(int)
        c = img[yi, xi]
        left, right = img[yi, np.clip(xi - 1, 0, nx - 1)], img[yi, np.clip(xi + 1, 0, nx - 1)]
        down, up = img[np.clip(yi - 1, 0, ny - 1), xi], img[np.clip(yi + 1, 0, ny - 1), xi]
        ax, ay = left - 2 * c + right, down - 2 * c + up
        dx = np.where(ax < 0, 0.5 * (left - right) / np.where(ax < 0, ax, -1), 0.0)
        dy = np.where(ay < 0, 0.5 * (down - up) / np.where(ay < 0, ay, -1), 0.0)
        out += [(np.clip(x + np.clip(ddx, -0.5, 0.5), 0, nx - 1), np.clip(y + np.clip(ddy, -0.5, 0.5), 0, ny - 1),
                 sign * v, sign) for x, y, ddx, ddy, v in zip(xi, yi, dx, dy, c)]
    return [np.array(col) for col in zip(*out)]


def _greedy_dedup(x, y, value, sign, *, radius):
    """Indices kept after suppressing, per sign, peaks within ``radius`` of a stronger kept one
    (cKDTree, strongest first), in (y, x) order: the detect stage's former deduplication."""
    from scipy.spatial import cKDTree

    order = np.lexsort((x, y, -np.abs(value)))
    rank = np.empty(len(x), int)
    rank[order] = np.arange(len(x))
    keep = np.ones(len(x), bool)
    tree = cKDTree(np.c_[x, y])
    for i in order:
        if keep[i]:
            for j in tree.query_ball_point([x[i], y[i]], r=radius):
                if rank[j] > rank[i] and sign[j] == sign[i]:
                    keep[j] = False
    idx = np.flatnonzero(keep)
    return idx[np.lexsort((x[idx], y[idx]))]


def test_agrees_with_sep_detect_on_simulated_scorr(rng):
    s, xs, ys, amp = _simulated_scorr(rng)
    p = find_peaks(s, threshold=5.0, radius=3.0)
    x, y = refine_peaks(s, p)
    sx, sy, sv, ss = _sep_peaks(s, threshold=5.0, min_area=3)
    k = _greedy_dedup(sx, sy, sv, ss, radius=3.0)
    sx, sy, sv, ss = sx[k], sy[k], sv[k], ss[k]
    assert len(p) >= 30  # most injected sources are separate peaks (a few blend)
    assert len(p) == len(sx)
    # same positions (sub-pixel, same 3x3 quadratic refinement), values and signs, in the same order
    np.testing.assert_allclose(x, sx, atol=0.01)
    np.testing.assert_allclose(y, sy, atol=0.01)
    np.testing.assert_array_equal(to_numpy(p.sign), ss)
    np.testing.assert_allclose(to_numpy(p.value), sv, rtol=1e-6)
    # and every peak sits on an injected source
    d = np.hypot(x[:, None] - xs[None], y[:, None] - ys[None]).min(axis=1)
    assert d.max() < 1.5


def test_refine_matches_a_known_quadratic():
    yy, xx = np.mgrid[0:9, 0:9].astype(np.float64)
    s = 20 - 0.5 * ((xx - 4.3) ** 2 + (yy - 3.8) ** 2)
    s = np.stack([s, -s])  # the same bowl as a minimum in the second image
    p = find_peaks(s, threshold=5.0)
    x, y = refine_peaks(s, p)
    np.testing.assert_allclose(x, [4.3, 4.3], atol=1e-12)
    np.testing.assert_allclose(y, [3.8, 3.8], atol=1e-12)


def test_refine_stays_on_the_image():
    s = np.zeros((5, 6))
    s[2, 5], s[2, 4] = 9.0, 1.0  # a peak on the last column leaning outwards
    x, y = refine_peaks(s, find_peaks(s, threshold=5.0))
    assert x.tolist() == [5.0] and y.tolist() == [2.0]


# ------------------------------------------------------------------------------------------
# the Numba CPU kernel == the xp reference (== the pixel oracle), adversarial images included
# ------------------------------------------------------------------------------------------
def _same_table(got: Peaks, want: Peaks):
    for name in ("image", "y", "x", "value", "sign"):
        g, w = to_numpy(getattr(got, name)), to_numpy(getattr(want, name))
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def _adversarial(rng, shape=(2, 40, 52)):
    """(name, scores, excluded, threshold) cases: ties, plateaus, NaN/inf, edges, tiny shapes."""
    cases = []
    f = _quantised_field(rng, shape, step=0.5)
    f[0, ::7, ::5] = np.nan
    f[1, 3, 3], f[1, -4, -5] = np.inf, -np.inf
    cases.append(("quantised+nan+inf", f, rng.random(f.shape) < 0.15, 2.0))
    cases.append(("integers", rng.integers(-6, 7, (3, 17, 19)).astype(np.float64), None, 2.0))
    plateau = np.full((2, 9, 11), 6.0, np.float32)
    plateau[1] *= -1
    cases.append(("constant plateau", plateau, None, 5.0))
    stripes = np.zeros((12, 15))
    stripes[::3] = 7.0
    stripes[:, ::4] = -7.0
    cases.append(("stripes", stripes, None, 5.0))
    checker = np.where((np.add.outer(np.arange(10), np.arange(13)) % 2) == 0, 6.0, -6.0).astype(np.float32)
    cases.append(("checkerboard", checker, None, 5.0))
    cases.append(("one pixel", np.array([[9.0]]), None, 5.0))
    cases.append(("one row", _quantised_field(rng, (1, 3, 40))[:, 1:2], None, 1.0))
    cases.append(("one column", _quantised_field(rng, (1, 40, 3))[:, :, 1:2], None, 1.0))
    edge = np.zeros((3, 8, 8), np.float32)
    edge[0, 0, 0], edge[0, 0, 7], edge[0, 7, 0], edge[0, 7, 7] = 8, -8, 8, 9
    edge[1, :, 0] = 6.0  # a plateau along the left edge
    edge[2] = np.nan
    cases.append(("edges and corners", edge, None, 5.0))
    # a float32 threshold that float32 cannot hold (float32(2.2) > 2.2): pixels exactly at float32(2.2) are not above it
    t = np.zeros((6, 7), np.float32)
    t[1, 1] = np.float32(2.2)
    t[4, 4] = np.nextafter(np.float32(2.2), np.float32(3))
    t[1, 5] = -np.float32(2.2)
    t[4, 1] = -np.nextafter(np.float32(2.2), np.float32(3))
    cases.append(("threshold in float32", t, None, 2.2))
    return cases


@pytest.mark.parametrize("radius", [0.0, 1.5, 3.0, 12.0])
def test_numba_kernel_equals_reference_on_adversarial_images(rng, radius):
    for name, s, ex, thr in _adversarial(rng):
        want = find_peaks(s, threshold=thr, radius=radius, excluded=ex, method="reference")
        got = find_peaks(s, threshold=thr, radius=radius, excluded=ex, method="numba")
        _same_table(got, want)
        assert _as_tuples(got) == _slow_peaks(s, np.float64(s.dtype.type(thr)), radius, ex), name
        if name == "constant plateau":  # a flat image has one peak per sign: its first pixel
            assert _as_tuples(got) == [(0, 0, 0, 6.0, 1), (1, 0, 0, -6.0, -1)]
        if name == "threshold in float32":
            assert [(int(y), int(x)) for y, x in zip(got.y, got.x)] == [(4, 1), (4, 4)]


def test_numba_kernel_equals_reference_on_random_fields(rng):
    """Smooth noise with sources, a batch, exclusions and NaN: identical tables, float32 and float64."""
    s = np.stack([_simulated_scorr(rng, shape=(200, 260), n=30)[0] for _ in range(2)])
    s[1, 50:60, 70:80] = np.nan
    ex = np.zeros(s.shape, bool)
    ex[0, 100:140, 30:90] = True
    for dtype in (np.float32, np.float64):
        v = s.astype(dtype)
        for thr, radius in [(5.0, 3.0), (2.0, 0.0), (1.0, 2.5)]:
            want = find_peaks(v, threshold=thr, radius=radius, excluded=ex, method="reference")
            assert len(want) > 20
            _same_table(find_peaks(v, threshold=thr, radius=radius, excluded=ex), want)  # auto = numba
            _same_table(find_peaks(v[0], threshold=thr, radius=radius, excluded=ex[0]),
                        find_peaks(v[0], threshold=thr, radius=radius, excluded=ex[0], method="reference"))


def test_numba_kernel_on_empty_results_and_odd_layouts(rng):
    p = find_peaks(np.zeros((2, 30, 40), np.float32), threshold=5.0, radius=3.0, method="numba")
    assert len(p) == 0 and p.value.dtype == np.float32 and p.image.dtype == np.int64 and p.sign.dtype == np.int8
    s = _quantised_field(rng, (2, 30, 40))
    view = s[:, ::-1, 1:]  # not contiguous: the input is neither copied back nor modified
    before = s.copy()
    _same_table(find_peaks(view, threshold=1.5, radius=2.0, excluded=view > 5),
                find_peaks(view, threshold=1.5, radius=2.0, excluded=view > 5, method="reference"))
    np.testing.assert_array_equal(s, before)


def test_cpu_and_cuda_kernels_share_one_peak_test():
    from nightsift.kernels import _peakbody
    from nightsift.kernels._cuda import peaks as cpeaks

    for kernel in (_peakbody.find_peaks_rows, cpeaks._peak_kernel):
        f = getattr(kernel, "py_func", None) or kernel.fn
        assert "peak_sign" in f.__code__.co_names and f.__globals__["peak_sign"] is _peakbody.peak_sign
        assert "is_local_max" not in f.__code__.co_names


def test_runs_on_the_strict_device(rng):
    from tests.strict_device import strict_namespace

    from nightsift.kernels import count_transfers

    strict = strict_namespace()
    s = _quantised_field(rng, (2, 40, 50), step=0.25)
    ex = s > 6
    want = find_peaks(s, threshold=2.5, radius=3.0, excluded=ex)
    ds, dex = strict.asarray(s), strict.asarray(ex)
    strict.reset_stats()
    with count_transfers() as led:
        got = find_peaks(ds, threshold=2.5, radius=3.0, excluded=dex)
    assert type(got.x).__name__ == "StrictArray"
    assert strict.stats.d2h_count == strict.stats.h2d_count == 0 and led.d2h_count == 0
    assert _as_tuples(Peaks(*(a.get() for a in (got.image, got.y, got.x, got.value, got.sign)))) == _as_tuples(want)
    with pytest.raises(ValueError, match="needs numpy arrays"):
        find_peaks(ds, threshold=2.5, method="numba")
