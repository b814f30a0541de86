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
    np.testing.assert_allclose(other[ok], fast[ok], rtol=0, atol=1e-9)


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
