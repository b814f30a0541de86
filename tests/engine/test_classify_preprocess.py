"""The real/bogus normalisation: invariances, edge cases, the stored (standardised) form."""
from __future__ import annotations

import numpy as np
import pytest

from nightsift.engine.classify.preprocess import ASINH_SOFTENING, NORMALIZATION, compress, preprocess, standardize


def _triplets(rng, n=8, size=63):
    t = rng.normal(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] - size // 2
    blob = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    t[:, :, :, 0] += 40 * blob
    t[:, :, :, 2] += 25 * blob
    return t


def test_shape_dtype_and_noise_level(rng):
    t = _triplets(rng) * np.float32(7.0) + np.float32(300.0)
    x = preprocess(t)
    assert x.shape == t.shape and x.dtype == np.float32
    # blank sky of unit noise maps to asinh(z/3): std ~ 1/3 away from the blob
    edge = x[:, :10, :10, 1]
    assert abs(edge.std() - np.std(np.arcsinh(rng.normal(size=200000) / ASINH_SOFTENING))) < 0.02
    assert abs(np.median(edge)) < 0.02
    assert np.isfinite(x).all()
    assert NORMALIZATION == "mad-asinh-v1"


def test_invariant_to_units_and_offsets_per_channel(rng):
    t = _triplets(rng).astype(np.float64)
    a = np.array([3.0, 0.25, 11.0])
    b = np.array([1000.0, -40.0, 5.0])
    np.testing.assert_allclose(preprocess(t * a + b), preprocess(t), atol=2e-4)


def test_nan_padding_is_sky_and_constant_channels_are_safe(rng):
    t = _triplets(rng, n=3)
    t[0, :, :20, :] = np.nan  # cutout crossing the CCD edge
    t[1, :, :, 1] = 5.0  # constant reference
    t[2, :, :, 2] = np.nan  # a whole channel missing
    t[2, 0, 0, 0] = np.inf
    z, loc, scale = standardize(t)
    x = compress(z)
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(x[0, :, :20, :], 0.0)
    np.testing.assert_array_equal(x[1, :, :, 1], 0.0)
    np.testing.assert_array_equal(x[2, :, :, 2], 0.0)
    assert x[2, 0, 0, 0] == 0.0
    assert (scale > 0).all() and np.isfinite(loc).all()
    assert loc[1, 1] == 5.0 and scale[1, 1] == 1.0
    # the NaN-aware path agrees with the plain one on the pixels both see
    ref = standardize(t[:1, :, 20:, :])
    np.testing.assert_allclose(loc[0], ref[1][0], rtol=1e-6)


def test_standardised_form_reconstructs_the_input(rng):
    t = _triplets(rng, n=4) * np.float32(50.0) + np.float32(1234.0)
    t[0, 31, 31, 0] = 2e6  # a saturated core far above the noise
    z, loc, scale = standardize(t)
    z16 = z.astype(np.float16)
    assert np.isfinite(z16).all()
    back = loc[:, None, None, :] + scale[:, None, None, :] * z16.astype(np.float32)
    # float16 keeps ~3 significant digits of z: far below the noise near the sky
    err = np.abs(back - t) / scale[:, None, None, :]
    assert err.max() < np.abs(z).max() * 1e-3 + 1e-3
    np.testing.assert_allclose(compress(z16), compress(z), atol=2e-3)


def test_single_triplet_and_bad_input(rng):
    t = _triplets(rng, n=1)
    np.testing.assert_allclose(preprocess(t[0]), preprocess(t))
    with pytest.raises(ValueError, match="shape"):
        preprocess(t[..., :2])
    with pytest.raises(ValueError, match="real numbers"):
        preprocess(np.zeros((1, 63, 63, 3), complex))
    assert preprocess(np.zeros((0, 63, 63, 3))).shape == (0, 63, 63, 3)


def test_compiled_statistics_match_numpy_oracle(rng):
    """The Numba medians/MADs equal numpy's nanmedian on random, NaN-holed and even-sized cutouts."""
    t = _triplets(rng, n=6) * np.float32(13.0) + np.float32(250.0)
    t[1, :, :31, 0] = np.nan  # an even number of finite pixels left (63 * 32)
    t[2, 5, 7, 2] = np.inf
    t[3, :, :, 1] = 2.0
    t[3, :40, :, 1] = 9.0  # a plateau: MAD 0 -> the standard deviation
    z, loc, scale = standardize(t)
    flat = np.moveaxis(np.where(np.isfinite(t), t, np.nan).reshape(6, -1, 3), -1, 1).astype(np.float64)
    want_loc = np.nanmedian(flat, axis=-1)
    want_mad = 1.4826 * np.nanmedian(np.abs(flat - want_loc[..., None]), axis=-1)
    want_scale = np.where(want_mad > 0, want_mad, np.nanstd(flat, axis=-1))
    np.testing.assert_allclose(loc, want_loc, rtol=1e-6)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-5)
    np.testing.assert_allclose(scale[3, 1], np.std(t[3, :, :, 1]), rtol=1e-5)
    want_z = (t - loc[:, None, None, :]) / scale[:, None, None, :]
    fin = np.isfinite(t)
    np.testing.assert_allclose(z[fin], want_z[fin], rtol=1e-5, atol=1e-5)
    assert np.isnan(z[~fin]).all()
    # preprocess is standardize + compress in one pass
    np.testing.assert_allclose(preprocess(t), compress(z), atol=1e-6)


def test_quickselect_median_on_awkward_inputs(rng):
    from nightsift.engine.classify.preprocess import _median

    cases = [np.array([3.0]), np.array([2.0, 1.0]), np.full(10, 4.0), np.arange(100.0)[::-1],
             np.repeat([1.0, 2.0, 3.0], [5, 1, 6]), rng.integers(0, 4, 999).astype(float),
             rng.normal(size=3969), rng.standard_cauchy(2016)]
    for a in cases:
        a = a.astype(np.float32)
        buf = a.copy()
        assert _median(buf, len(buf)) == pytest.approx(float(np.median(a)), rel=1e-6), a[:8]
        np.testing.assert_array_equal(np.sort(buf), np.sort(a))  # a permutation, nothing lost
