"""Lanczos resampling: numba fast path vs the xp reference, exactness on simple maps, mask
footprints, variance propagation (white-equivalent) and the coarse-map interpolator."""
import numpy as np
import pytest

from nightsift.kernels import to_numpy
from nightsift.kernels.resample import (
    interpolate_coarse_grid,
    interpolate_coordinate_map,
    lanczos_kernel,
    lanczos_resample,
    resample_mask,
)

NO_DATA = 4


def _warped_map(shape_out, *, nan_at=None):
    """An affine + quadratic source map that leaves the source on two sides."""
    yy, xx = np.mgrid[0 : shape_out[0], 0 : shape_out[1]].astype(np.float64)
    xs = 1.01 * xx + 0.02 * yy - 3.3 + 2e-4 * (xx - 80) ** 2
    ys = 0.99 * yy - 0.015 * xx + 2.7 + 1e-4 * xx * yy / 10
    if nan_at is not None:
        xs[nan_at] = np.nan
    return xs, ys


def test_lanczos_kernel_values():
    t = np.array([0.0, 1.0, 2.0, -2.0, 3.0, 3.5, -4.0, 0.5])
    w = lanczos_kernel(t, 3)
    np.testing.assert_allclose(w[:7], [1, 0, 0, 0, 0, 0, 0], atol=1e-15)
    # sinc(0.5) sinc(1/6) = (2/pi) * sin(pi/6)/(pi/6)
    assert w[7] == pytest.approx((2 / np.pi) * (0.5 / (np.pi / 6)), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("a", [2, 3, 4])
def test_numba_matches_reference(rng, dtype, a):
    img = rng.normal(100.0, 10.0, (90, 110)).astype(dtype)
    xs, ys = _warped_map((80, 100), nan_at=(5, 7))
    stack = np.stack([img, img**2 / 100])
    fast = lanczos_resample(stack, xs, ys, a=a)
    ref = lanczos_resample(stack, xs, ys, a=a, method="reference")
    assert fast.dtype == ref.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert np.array_equal(np.isnan(fast), np.isnan(ref))
    assert np.isnan(fast[:, 5, 7]).all()  # NaN source position -> fill
    ok = ~np.isnan(ref)
    assert ok.mean() > 0.8
    rel = np.abs(fast[ok] - ref[ok]) / np.abs(ref[ok]).max()
    assert rel.max() < 1e-6
    m = np.zeros(img.shape, np.uint16)
    m[rng.integers(0, 90, 30), rng.integers(0, 110, 30)] = rng.choice([1, 2, 8], 30).astype(np.uint16)
    mf = resample_mask(m, xs, ys, a=a, no_data_bit=NO_DATA)
    mr = resample_mask(m, xs, ys, a=a, no_data_bit=NO_DATA, method="reference")
    assert mf.dtype == np.uint16
    assert np.array_equal(mf, mr)


def test_reference_on_xp_matches_numpy_fast_path(xp, rng):
    img = rng.normal(0.0, 1.0, (64, 64))
    xs, ys = _warped_map((60, 60))
    fast = lanczos_resample(img, xs, ys)
    other = to_numpy(lanczos_resample(xp.asarray(img), xp.asarray(xs), xp.asarray(ys)))
    ok = ~np.isnan(fast)
    assert np.array_equal(ok, ~np.isnan(other))
    # the numba kernel reads the kernel from a table (< 3e-8 of its peak): same to ~1e-7 of the data
    np.testing.assert_allclose(other[ok], fast[ok], rtol=0, atol=1e-6 * np.abs(img).max())


def test_constant_and_integer_shift_are_exact(rng):
    img = rng.normal(size=(50, 60))
    yy, xx = np.mgrid[0:50, 0:60].astype(float)
    out = lanczos_resample(img, xx + 2, yy - 1)  # integer shift: a pure copy
    np.testing.assert_allclose(out[1:, :58], img[:-1, 2:], atol=1e-12)
    assert np.isnan(out[0]).all() and np.isnan(out[:, 58:]).all()  # outside the source
    const = lanczos_resample(np.full((50, 60), 7.5), xx * 0.97 + 0.31, yy * 1.02 - 0.27)
    ok = ~np.isnan(const)
    np.testing.assert_allclose(const[ok], 7.5, rtol=1e-12)  # normalised weights, edges included


def test_band_limited_function_is_interpolated_accurately():
    # a smooth (well-sampled) field, evaluated exactly at the source positions
    f = lambda x, y: np.sin(2 * np.pi * x / 23.0) * np.cos(2 * np.pi * y / 31.0) + 0.3 * np.sin(  # noqa: E731
        2 * np.pi * (x + y) / 17.0
    )
    yy, xx = np.mgrid[0:120, 0:120].astype(float)
    src = f(xx, yy)
    xs = 0.993 * xx + 0.05 * yy + 3.37
    ys = -0.04 * xx + 1.004 * yy + 2.81
    out = lanczos_resample(src, xs, ys)
    inner = (xs > 6) & (xs < 113) & (ys > 6) & (ys < 113)
    err = np.abs(out - f(xs, ys))[inner]
    # Lanczos-3 at 17-31 px per cycle (measured: max 0.008, rms 0.0025 of an amplitude ~1.3)
    assert err.max() < 0.012
    assert np.sqrt(np.mean(err**2)) < 0.004


def test_mask_spreads_to_lanczos_footprint():
    m = np.zeros((40, 40), np.uint16)
    m[20, 20] = 1  # BAD
    yy, xx = np.mgrid[0:40, 0:40].astype(float)
    out = resample_mask(m, xx + 0.3, yy + 0.4, a=3, no_data_bit=NO_DATA)
    bad = (out & 1) != 0
    ys, xs = np.nonzero(bad)
    # output pixel j,i uses source rows floor(y)-2 .. floor(y)+3, so source 20 is used by 17..22
    assert bad.sum() == 36
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (17, 22, 17, 22)
    # integer shift: the exact zeros of the kernel do not spread the flag
    out0 = resample_mask(m, xx + 1.0, yy, a=3, no_data_bit=NO_DATA)
    assert np.argwhere(out0 & 1).tolist() == [[20, 19]]
    # footprints reaching past the source edge (taps floor(x)-2 .. floor(x)+3) get NO_DATA
    nd = (out & NO_DATA) != 0
    assert nd[:, :2].all() and nd[:2, :].all() and nd[:, 37:].all() and nd[37:, :].all()
    assert not nd[2:37, 2:37].any()
    assert (out[:, 39] == NO_DATA).all()


def test_variance_uses_weights_and_is_white_equivalent(rng):
    """Resampled white noise has a smaller per-pixel variance (sum w^2) but the same noise level
    after any band-limited filter (here a PSF-like Gaussian): the variance map propagated with
    the plain weights is the one that describes it."""
    from scipy.ndimage import gaussian_filter

    sigma = 3.0
    noise = rng.normal(0.0, sigma, (512, 512))
    var = np.full(noise.shape, sigma**2)
    yy, xx = np.mgrid[0:500, 0:500].astype(float)
    out = lanczos_resample(np.stack([noise, var]), xx + 0.5, yy + 0.5)
    np.testing.assert_allclose(out[1], sigma**2, rtol=1e-12)  # sum(w) * var
    assert out[0].var() < 0.75 * sigma**2  # per-pixel variance drops (sum w^2 ~ 0.6-0.7)
    filt_in = gaussian_filter(noise[:500, :500], 2.0)[20:-20, 20:-20]
    filt_out = gaussian_filter(out[0], 2.0)[20:-20, 20:-20]
    assert filt_out.var() / filt_in.var() == pytest.approx(1.0, abs=0.05)


def test_coarse_map_interpolation():
    shape = (300, 260)
    step = 32
    ncy, ncx = int(np.ceil(299 / step)) + 1, int(np.ceil(259 / step)) + 1
    gy, gx = np.mgrid[0:ncy, 0:ncx].astype(float) * step
    poly = lambda x, y: 3 + 0.99 * x + 0.02 * y + 1e-5 * x**2 * y - 2e-7 * y**3  # noqa: E731
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    full = interpolate_coarse_grid(poly(gx, gy), step, shape)
    np.testing.assert_allclose(full, poly(xx, yy), atol=1e-9)  # cubic spline: exact on cubics
    smooth = lambda x, y: x + 2.0 * np.sin(x / 200.0) * np.cos(y / 150.0)  # noqa: E731
    mx, my = interpolate_coordinate_map(smooth(gx, gy), smooth(gy, gx), step, shape)
    assert np.abs(mx - smooth(xx, yy)).max() < 3e-4  # measured 1.2e-4 (at the edges)
    assert np.abs(my - smooth(yy, xx)).max() < 3e-4
    with pytest.raises(ValueError, match="does not reach"):
        interpolate_coarse_grid(poly(gx, gy)[:-1], step, shape)


def test_bad_arguments():
    img = np.zeros((10, 10))
    with pytest.raises(ValueError, match="same shape"):
        lanczos_resample(img, np.zeros((5, 5)), np.zeros((5, 6)))
    with pytest.raises(ValueError, match="method"):
        lanczos_resample(img, np.zeros((5, 5)), np.zeros((5, 5)), method="fast")
    with pytest.raises(ValueError, match="integer"):
        resample_mask(img, np.zeros((5, 5)), np.zeros((5, 5)))


# ------------------------------------------------------------------------------------------
# batches: one geometry per pair, on every path
# ------------------------------------------------------------------------------------------
def _pair_maps(B, shape_out):
    """B different warped maps (shifts, a small rotation), one NaN position in the first."""
    maps = []
    for b in range(B):
        xs, ys = _warped_map(shape_out, nan_at=(3, 4) if b == 0 else None)
        th = 0.01 * b
        maps.append((np.cos(th) * xs - np.sin(th) * ys + 0.37 * b, np.sin(th) * xs + np.cos(th) * ys - 0.61 * b))
    return np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batched_equals_per_pair_calls_and_reference(rng, dtype):
    B = 3
    imgs = rng.normal(100.0, 10.0, (B, 2, 70, 80)).astype(dtype)
    xs, ys = _pair_maps(B, (60, 70))
    got = lanczos_resample(imgs, xs, ys)
    assert got.shape == (B, 2, 60, 70) and got.dtype == dtype
    ref = lanczos_resample(imgs, xs, ys, method="reference")
    assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.isnan(got[0, :, 3, 4]).all()
    ok = ~np.isnan(ref)
    assert 0.6 < ok.mean() < 1
    assert (np.abs(got[ok] - ref[ok]) / np.abs(ref[ok]).max()).max() < 1e-6
    for b in range(B):  # the same kernel per pair: bit-identical
        np.testing.assert_array_equal(got[b], lanczos_resample(imgs[b], xs[b], ys[b]))
        np.testing.assert_array_equal(ref[b], lanczos_resample(imgs[b], xs[b], ys[b], method="reference"))
    # a (B, ny, nx) source with 3-D maps is B single planes
    one = lanczos_resample(imgs[:, 1], xs, ys, fill=-1.0)
    assert one.shape == (B, 60, 70)
    np.testing.assert_array_equal(one, lanczos_resample(imgs[:, 1:2], xs, ys, fill=-1.0)[:, 0])
    # masks
    m = np.zeros((B, 70, 80), np.uint16)
    m[rng.integers(0, B, 60), rng.integers(0, 70, 60), rng.integers(0, 80, 60)] = rng.choice([1, 2, 8], 60)
    mb = resample_mask(m, xs, ys, no_data_bit=NO_DATA)
    assert mb.shape == (B, 60, 70) and mb.dtype == np.uint16
    np.testing.assert_array_equal(mb, resample_mask(m, xs, ys, no_data_bit=NO_DATA, method="reference"))
    for b in range(B):
        np.testing.assert_array_equal(mb[b], resample_mask(m[b], xs[b], ys[b], no_data_bit=NO_DATA))
    assert (mb & 1).any() and (mb & NO_DATA).any() and (mb == 0).any()


def test_psf_stamp_stack_through_per_stamp_maps(rng):
    """The PSF stage's case: n small stamps (n, s, s), each through its own sub-pixel map (n, s, s),
    in one call: equal to n separate calls and to the reference, and a shifted Gaussian stamp
    comes out where the map puts it."""
    n, s = 40, 21
    c = (s - 1) / 2
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    dx, dy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    sig = rng.uniform(1.8, 2.6, n)[:, None, None]
    stamps = np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * sig**2)).astype(np.float32)
    xs = xx[None] + dx[:, None, None]  # output pixel (j, i) samples the stamp at (i + dx, j + dy)
    ys = yy[None] + dy[:, None, None]
    out = lanczos_resample(stamps, xs, ys, fill=0.0)
    assert out.shape == (n, s, s) and out.dtype == np.float32
    for k in range(0, n, 7):
        np.testing.assert_array_equal(out[k], lanczos_resample(stamps[k], xs[k], ys[k], fill=0.0))
    ref = lanczos_resample(stamps, xs, ys, fill=0.0, method="reference")
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    truth = np.exp(-((xx[None] + dx[:, None, None] - c) ** 2 + (yy[None] + dy[:, None, None] - c) ** 2) / (2 * sig**2))
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert np.abs(out[inner] - truth[inner]).max() < 1e-2  # Lanczos-3 on a 1.8-2.6 px Gaussian: measured 5e-3
    # and the stamps' centroids moved by (dx, dy)
    tot = out.sum(axis=(1, 2), dtype=np.float64)
    cx = (out * xx).sum(axis=(1, 2)) / tot - c
    np.testing.assert_allclose(cx, -dx, atol=0.02)


def test_batch_shape_errors_and_empty_batches():
    img = np.zeros((2, 3, 10, 10))
    xs = np.zeros((3, 5, 5))
    with pytest.raises(ValueError, match="batch sizes differ"):
        lanczos_resample(img, xs, xs)
    with pytest.raises(ValueError, match=r"need a \(B, ny, nx\) or \(B, k, ny, nx\) source"):
        lanczos_resample(img[0, 0], xs, xs)
    with pytest.raises(ValueError, match=r"need a \(ny, nx\) or \(k, ny, nx\) source"):
        lanczos_resample(img, xs[0], xs[0])
    with pytest.raises(ValueError, match=r"need a \(B, ny, nx\) source"):
        resample_mask(np.zeros((10, 10), np.uint16), xs, xs)
    for method in ("auto", "reference"):
        e = lanczos_resample(np.zeros((0, 2, 10, 10)), np.zeros((0, 5, 5)), np.zeros((0, 5, 5)), method=method)
        assert e.shape == (0, 2, 5, 5)
        m = resample_mask(np.zeros((0, 10, 10), np.uint16), np.zeros((0, 5, 5)), np.zeros((0, 5, 5)), method=method)
        assert m.shape == (0, 5, 5) and m.dtype == np.uint16
    assert lanczos_resample(np.ones((10, 10)), np.zeros((0, 7)), np.zeros((0, 7))).shape == (0, 7)
    from tests.strict_device import strict_namespace

    strict = strict_namespace()
    with pytest.raises(ValueError, match="needs numpy arrays"):
        lanczos_resample(strict.asarray(img[0]), strict.asarray(xs[0]), strict.asarray(xs[0]), method="numba")


# ------------------------------------------------------------------------------------------
# written once, compiled twice
# ------------------------------------------------------------------------------------------
def _py(kernel):
    """The Python function behind a Numba dispatcher (CPU, CUDA, or the CUDA simulator's)."""
    return getattr(kernel, "py_func", None) or kernel.fn


def test_cpu_and_cuda_kernels_share_one_body():
    """Both Numba kernels are entry points around the bodies of kernels._lanczos: they call the
    same function objects and compute no trig themselves; the Lanczos taps exist once."""
    import inspect

    from nightsift.kernels import _lanczos
    from nightsift.kernels import resample as kresample
    from nightsift.kernels._cuda import resample as cresample

    pairs = [(_lanczos.resample_rows, "resample_pixel"), (cresample._lanczos_kernel, "resample_pixel"),
             (_lanczos.mask_rows, "mask_pixel"), (cresample._mask_kernel, "mask_pixel")]
    for kernel, body in pairs:
        f = _py(kernel)
        assert body in f.__code__.co_names, (f.__name__, body)
        assert f.__globals__[body] is getattr(_lanczos, body)
        assert not {"sin", "cos", "lanczos_taps"} & set(f.__code__.co_names), f.__name__
    for body in (_lanczos.resample_pixel, _lanczos.mask_pixel):
        assert "lanczos_taps" in body.__code__.co_names
    # no other function of the resampling modules evaluates a sine (the taps live in one place)
    for mod in (kresample, cresample):
        for name, obj in vars(mod).items():
            f = _py(obj) if hasattr(obj, "py_func") or hasattr(obj, "fn") else obj
            if inspect.isfunction(f) and f.__module__ == mod.__name__:
                assert "sin" not in f.__code__.co_names, f"{mod.__name__}.{name}"


def test_runs_on_the_strict_device(rng):
    from tests.strict_device import strict_namespace

    from nightsift.kernels import count_transfers

    strict = strict_namespace()
    imgs = rng.normal(size=(2, 2, 40, 44))
    xs, ys = _pair_maps(2, (30, 32))
    m = (rng.random((2, 40, 44)) < 0.02).astype(np.uint16)
    d = [strict.asarray(a) for a in (imgs, xs, ys, m)]
    strict.reset_stats()
    with count_transfers() as led:
        out = lanczos_resample(d[0], d[1], d[2])
        mo = resample_mask(d[3], d[1], d[2], no_data_bit=NO_DATA)
    assert type(out).__name__ == "StrictArray" and out.shape == (2, 2, 30, 32)
    assert strict.stats.d2h_count == strict.stats.h2d_count == 0 and led.h2d_count == led.d2h_count == 0
    want = lanczos_resample(imgs, xs, ys)  # the numba table kernel vs the exact reference on the device
    np.testing.assert_allclose(out.get(), want, rtol=0, atol=1e-6 * np.abs(imgs).max())
    np.testing.assert_array_equal(mo.get(), resample_mask(m, xs, ys, no_data_bit=NO_DATA))
