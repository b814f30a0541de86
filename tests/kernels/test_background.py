"""kernels.background: one sky/noise algorithm for numpy, cupy and the strict device stand-in.

Oracles: a per-mesh Python loop over numpy (the definition, slowly), sep.Background (the previous
numpy path), numpy's median for the MAD, and the truth of simulated skies.
"""
import math
from pathlib import Path

import numpy as np
import pytest

from nightsift.kernels import count_transfers
from nightsift.kernels.background import (MAD_TO_SIGMA, background, mad_sigma, median_mad_sigma, mesh_statistics,
                                          residual_sigma, robust_sigma)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _trunc(clip):
    phi = math.exp(-0.5 * clip * clip) / math.sqrt(2 * math.pi)
    return math.sqrt(1 - 2 * clip * phi / math.erf(clip / math.sqrt(2)))


def _clipped_oracle(v, *, clip=3.0, iterations=3):
    """The estimator, written the obvious way on one 1-D sample: med, mean, sig."""
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    med = np.median(v)
    sig = 1.4826022185056 * np.median(np.abs(v - med))
    mean = v.mean()
    for _ in range(iterations):
        kept = v[np.abs(v - med) <= clip * sig]
        if kept.size < 2:
            break
        med, mean, sig = np.median(kept), kept.mean(), kept.std(ddof=1) / _trunc(clip)
    return med, mean, sig


def _mesh_oracle(img, box, mask=None, estimator="mode", clip=3.0, iterations=3):
    ny, nx = img.shape
    my, mx = -(-ny // box), -(-nx // box)
    sky, sig = np.full((my, mx), np.nan), np.full((my, mx), np.nan)
    for i in range(my):
        for j in range(mx):
            cut = (slice(i * box, (i + 1) * box), slice(j * box, (j + 1) * box))
            win = img[cut].astype(np.float64)
            good = np.isfinite(win) if mask is None else np.isfinite(win) & ~mask[cut]
            if good.sum() < max(3, math.ceil(0.1 * win.size)):
                continue
            med, mean, s = _clipped_oracle(win[good], clip=clip, iterations=iterations)
            mode = 2.5 * med - 1.5 * mean if (estimator == "mode" and abs(mean - med) < 0.3 * s) else med
            sky[i, j], sig[i, j] = mode, s
    return sky, sig


def _sky_image(rng, shape, level=200.0, noise=6.0, nstars=60):
    ny, nx = shape
    y, x = np.mgrid[:ny, :nx]
    sky = level + 0.02 * x - 0.01 * y + 5 * np.sin(x / 150)
    img = sky + rng.normal(0, noise, shape)
    for _ in range(nstars):
        cy, cx, f = rng.uniform(0, ny), rng.uniform(0, nx), rng.uniform(200, 20000)
        img += f / (2 * np.pi * 1.5**2) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 1.5**2))
    return img.astype(np.float32), sky


# --------------------------------------------------------------------------------------------
# mesh statistics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["mode", "median"])
def test_mesh_statistics_equal_the_per_mesh_definition(rng, estimator):
    """Sorted-row gathers == a Python loop of np.median/np.std per mesh, partial meshes and masks included."""
    img, _ = _sky_image(rng, (300, 230), nstars=40)
    img[32:45, 32:64] += 48  # 40 % of a mesh on an 8-sigma step: too skewed for the mode
    img[50:53, :] = np.nan  # non-finite pixels are ignored
    mask = np.zeros(img.shape, bool)
    mask[100:190, 40:140] = True  # some meshes partly, one wholly masked
    mask[256:, 224:] = True  # the partial corner mesh: nothing left
    sky, sig = mesh_statistics(img, box=32, mask=mask, estimator=estimator)
    ref_sky, ref_sig = _mesh_oracle(img, 32, mask, estimator)
    assert sky.shape == (10, 8) and sky.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(sky), np.isnan(ref_sky))
    assert np.isnan(sky[8:, 7]).all() and np.isnan(sky[4, 2])
    if estimator == "mode":  # |mean - med| >= 0.3 sigma on the step: the median there, the mode elsewhere
        med, _ = mesh_statistics(img, box=32, mask=mask, estimator="median")
        assert sky[1, 1] == med[1, 1] and np.sum(sky == med) < np.sum(np.isfinite(sky)) - 10
    np.testing.assert_allclose(sky, ref_sky, rtol=0, atol=1e-4 * 6)
    np.testing.assert_allclose(sig, ref_sig, rtol=1e-5)


def test_mesh_statistics_are_unbiased_on_gaussian_noise(rng):
    img = rng.normal(1000.0, 8.0, (3, 512, 512)).astype(np.float32)
    for est in ("mode", "median"):
        sky, sig = mesh_statistics(img, box=64, estimator=est)
        assert sky.shape == (3, 8, 8)
        assert abs(sky.mean() - 1000.0) < 0.01 * 8.0  # 192 meshes: the mean sky within 0.01 sigma
        assert sig.mean() == pytest.approx(8.0, rel=0.01)
    # clip changes the truncation factor, not the answer
    _, sig2 = mesh_statistics(img, box=64, clip=2.5, iterations=5)
    assert sig2.mean() == pytest.approx(8.0, rel=0.01)


def test_mesh_statistics_resist_sources_with_the_mode(rng):
    """A mesh whose upper tail holds faint sources: the mode stays near the true sky, the mean does not."""
    v = rng.normal(0.0, 1.0, (1, 64, 64))
    v.reshape(-1)[:600] += rng.exponential(2.0, 600)  # 15 % of the pixels lifted by faint sources
    sky, sig = mesh_statistics(v.astype(np.float32), box=64)
    assert abs(sky[0, 0, 0]) < 0.15
    assert v.mean() > 0.25
    assert sig[0, 0, 0] == pytest.approx(1.0, rel=0.15)


# --------------------------------------------------------------------------------------------
# full-resolution maps
# --------------------------------------------------------------------------------------------
def test_background_agrees_with_sep_on_a_simulated_ccd():
    """The previous numpy path (sep.Background, same box and filter) is the oracle."""
    sep = pytest.importorskip("sep")
    from nightsift.engine.records import UNUSABLE
    from nightsift.engine.simulate import simulate_ccd_pair

    sim = simulate_ccd_pair("decam", shape=(1024, 1024), seed=7)
    for exp, truth in ((sim.science_exposure(), sim.sky_sci), (sim.reference, sim.sky_ref)):
        img = exp.image
        bad = (exp.mask & UNUSABLE) != 0
        sky, sig = background(img, box=64, mask=bad)
        assert sky.dtype == np.float32 and sky.shape == img.shape
        bk = sep.Background(np.ascontiguousarray(img, np.float32), mask=bad, bw=64, bh=64, fw=3, fh=3)
        ref_sky, ref_sig = bk.back(), bk.rms()
        noise = float(np.median(ref_sig))
        d = (sky - ref_sky) / noise
        assert np.sqrt(np.mean(d**2)) < 0.01  # measured 0.002-0.003
        assert np.abs(d).max() < 0.06  # measured 0.01-0.03 (image edges)
        # sep's sigma is the clipped std without the truncation correction (1/0.98658 = 1.0136)
        ratio = sig / ref_sig
        assert np.median(ratio) == pytest.approx(1.0136, abs=0.005)
        assert np.percentile(np.abs(ratio / np.median(ratio) - 1), 99) < 0.03
        # and both follow the true sky (a linear gradient; faint galaxies lift it a little)
        assert np.sqrt(np.mean(((sky - truth.image()) / noise) ** 2)) < 0.1


def test_background_follows_a_gradient_and_ignores_stars(rng):
    img, truth = _sky_image(rng, (512, 640))
    sky, sig = background(img, box=64)
    inner = (slice(64, -64), slice(64, -64))
    assert np.abs(sky - truth)[inner].max() < 0.3 * 6  # mode noise of a 64x64 mesh ~0.03 sigma
    assert np.median(sig) == pytest.approx(6.0, rel=0.02)


def test_a_batch_equals_the_single_calls(rng):
    imgs = np.stack([_sky_image(rng, (256, 320), level=lv)[0] for lv in (100.0, 900.0, 5000.0)])
    mask = np.zeros(imgs.shape, bool)
    mask[1, 30:90, 40:200] = True
    sky, sig = background(imgs, box=32, mask=mask)
    assert sky.shape == imgs.shape
    for b in range(3):
        s1, g1 = background(imgs[b], box=32, mask=mask[b])
        np.testing.assert_array_equal(sky[b], s1)
        np.testing.assert_array_equal(sig[b], g1)
    m_sky, m_sig = mesh_statistics(imgs, box=32, mask=mask)
    np.testing.assert_array_equal(m_sky[2], mesh_statistics(imgs[2], box=32)[0])


def test_masked_pixels_are_ignored(rng):
    img, _ = _sky_image(rng, (256, 256), nstars=0)
    mask = np.zeros(img.shape, bool)
    mask[40:120, 60:200] = True
    mask[200:, :] = True
    dirty = img.copy()
    dirty[mask] = 1e6  # garbage under the mask
    as_nan = img.copy()
    as_nan[mask] = np.nan
    sky, sig = background(dirty, box=32, mask=mask)
    sky_n, sig_n = background(as_nan, box=32)
    np.testing.assert_array_equal(sky, sky_n)  # masked == absent
    np.testing.assert_array_equal(sig, sig_n)
    clean_sky, clean_sig = background(img, box=32)
    assert np.abs(sky - clean_sky).max() < 0.3 * 6
    assert np.abs(sig / clean_sig - 1).max() < 0.1
    # a 2-D mask applies to every image of a batch
    sky_b, _ = background(np.stack([dirty, dirty]), box=32, mask=mask)
    np.testing.assert_array_equal(sky_b[1], sky)


def test_fully_masked_images_give_finite_maps(rng):
    img = rng.normal(50, 3, (2, 128, 160)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[0] = True
    sky, sig = background(img, box=32, mask=mask)
    assert np.isfinite(sky).all() and np.isfinite(sig).all()
    assert (sky[0] == 0).all() and (sig[0] == 0).all()
    np.testing.assert_array_equal(sky[1], background(img[1], box=32)[0])
    m_sky, m_sig = mesh_statistics(img[0], box=32, mask=mask[0])
    assert np.isnan(m_sky).all() and np.isnan(m_sig).all()
    nan_sky, _ = background(np.full((64, 64), np.nan, np.float32), box=32)
    assert (nan_sky == 0).all()


def test_small_and_empty_images():
    sky, sig = background(np.full((20, 30), 5.0, np.float32), box=64)  # one partial mesh
    assert sky.shape == (20, 30) and np.all(sky == 5.0) and np.all(sig == 0.0)
    for shape in [(0, 40), (0, 16, 16)]:
        s, g = background(np.zeros(shape, np.float32))
        assert s.shape == shape and g.shape == shape
        m, _ = mesh_statistics(np.zeros(shape, np.float32))
        assert m.size == 0


def test_bad_arguments_are_refused():
    img = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="box"):
        background(img, box=0)
    with pytest.raises(ValueError, match="estimator"):
        background(img, estimator="mean")
    with pytest.raises(ValueError, match="filter_size"):
        background(img, filter_size=0)
    with pytest.raises(ValueError, match="mask shape"):
        background(img, mask=np.zeros((32, 64), bool))
    with pytest.raises(ValueError, match="clip"):
        mesh_statistics(img, clip=0.0)
    with pytest.raises(ValueError, match=r"\(ny, nx\)"):
        background(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="axis"):
        robust_sigma(img, axis=2)


def test_numpy_and_xp_agree(xp, rng):
    img = np.stack([_sky_image(rng, (320, 384))[0] for _ in range(2)])
    mask = np.zeros(img.shape[1:], bool)
    mask[10:90, 100:300] = True
    ref = background(img, box=64, mask=mask)
    with count_transfers() as led:
        dev = background(xp.asarray(img), box=64, mask=xp.asarray(mask))
    assert led.d2h_count == 0
    for a, b in zip(ref, dev):
        np.testing.assert_allclose(_host(b), a, rtol=1e-5, atol=1e-3)
    r = robust_sigma(xp.asarray(img[0]))
    # float32 values: the device's sorts and reductions run in another order (H200: 5e-9 apart)
    assert float(_host(r)) == pytest.approx(float(robust_sigma(img[0])), rel=1e-7)


# --------------------------------------------------------------------------------------------
# robust_sigma, mad_sigma
# --------------------------------------------------------------------------------------------
def test_robust_sigma_ignores_sources(rng):
    v = rng.normal(0, 3.0, 200_000)
    v[:2000] += rng.uniform(20, 500, 2000)
    s = robust_sigma(v)
    assert isinstance(s, np.floating) and np.ndim(s) == 0  # a numpy scalar: float(s) works, no sync
    assert s == pytest.approx(3.0, rel=0.01)
    assert s == pytest.approx(_clipped_oracle(v, iterations=5)[2], rel=1e-9)
    v[5:50] = np.nan
    v[60] = np.inf
    assert robust_sigma(v) == pytest.approx(_clipped_oracle(v, iterations=5)[2], rel=1e-9)


def test_robust_sigma_per_row(rng):
    v = rng.normal(0, 1, (7, 3000)) * np.arange(1, 8)[:, None]
    v[2, :100] += 50
    rows = robust_sigma(v, axis=-1)
    assert rows.shape == (7,)
    np.testing.assert_allclose(rows, [robust_sigma(r) for r in v], rtol=1e-12)
    np.testing.assert_allclose(robust_sigma(v.T, axis=0), rows, rtol=1e-12)
    assert np.isnan(robust_sigma(np.full(10, np.nan)))
    assert np.isnan(robust_sigma(np.zeros(0)))


@pytest.mark.parametrize("n", [1, 2, 9, 10, 1001, 1000])
def test_mad_sigma_is_1_4826_mad(rng, n):
    v = rng.standard_cauchy(n)
    expect = MAD_TO_SIGMA * np.median(np.abs(v - np.median(v)))
    assert mad_sigma(v) == pytest.approx(expect, rel=1e-12, abs=1e-300)
    w = np.concatenate([v, [np.nan, np.inf]])
    assert mad_sigma(w) == pytest.approx(expect, rel=1e-12, abs=1e-300)
    grid = rng.normal(size=(4, 5, n))
    np.testing.assert_allclose(mad_sigma(grid, axis=-1),
                               MAD_TO_SIGMA * np.median(np.abs(grid - np.median(grid, -1, keepdims=True)), -1),
                               rtol=1e-12)


def test_median_mad_sigma_is_nanmedian_and_its_mad(rng):
    """Per row, with NaN holes: numpy's nanmedian and 1.4826 x the nanmedian of the deviations;
    NaN (not 0) for a row with no finite value."""
    v = rng.standard_cauchy((5, 7, 40))
    v[rng.random(v.shape) < 0.3] = np.nan
    v[2, :, 5] = np.nan  # one row (along axis 1) with no finite value
    med, sig = median_mad_sigma(v, axis=1)
    with pytest.warns(RuntimeWarning):  # numpy on the all-NaN row
        want = np.nanmedian(v, axis=1)
        want_sig = MAD_TO_SIGMA * np.nanmedian(np.abs(v - want[:, None]), axis=1)
    np.testing.assert_allclose(med, want, rtol=1e-12)
    np.testing.assert_allclose(sig, want_sig, rtol=1e-12)
    assert np.isnan(med[2, 5]) and np.isnan(sig[2, 5]) and np.array_equal(np.isnan(med), np.isnan(want))
    np.testing.assert_allclose(mad_sigma(v, axis=1), sig, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 9, 10])
def test_residual_sigma_is_about_the_given_centre(rng, n):
    """1.4826 x median |r|: about 0, not about the median of ``r`` (a fit's residuals may be offset)."""
    r = rng.normal(3.0, 2.0, n)
    assert residual_sigma(r) == pytest.approx(MAD_TO_SIGMA * np.median(np.abs(r)), rel=1e-12)
    assert residual_sigma(np.concatenate([r, [np.nan]])) == pytest.approx(residual_sigma(r), rel=1e-12)
    grid = rng.normal(size=(3, n))
    np.testing.assert_allclose(residual_sigma(grid, axis=-1), MAD_TO_SIGMA * np.median(np.abs(grid), -1),
                               rtol=1e-12)
    assert np.isnan(residual_sigma(np.full(4, np.nan)))


# --------------------------------------------------------------------------------------------
# the strict device stand-in: no implicit host conversion anywhere
# --------------------------------------------------------------------------------------------
def test_runs_on_the_strict_device(rng):
    if not (Path(__file__).resolve().parents[1] / "strict_device.py").exists():
        pytest.skip("tests/strict_device.py (the strict device stand-in) is not there yet")
    from tests.strict_device import strict_namespace

    strict = strict_namespace()
    img = np.stack([_sky_image(rng, (200, 260))[0] for _ in range(2)])
    mask = np.zeros(img.shape, bool)
    mask[0, 20:60, 30:90] = True
    ref_sky, ref_sig = background(img, box=32, mask=mask)
    d_img, d_mask = strict.asarray(img), strict.asarray(mask)
    strict.reset_stats()
    with count_transfers() as led:
        sky, sig = background(d_img, box=32, mask=d_mask)
        rs = robust_sigma(d_img[1])
        rows = robust_sigma(d_img.reshape(2, -1), axis=-1)
        ms = mad_sigma(d_img[0])
        mm, ms_rows = median_mad_sigma(d_img.reshape(2, -1), axis=-1)
        rsig = residual_sigma(d_img[0] - 1.0)
    assert type(sky).__name__ == "StrictArray" and type(rs).__name__ == "StrictArray" and rs.shape == ()
    # every crossing went through the ledger: only the (cached) spline matrices, nothing came back
    assert strict.stats.d2h_count == 0 and led.d2h_count == 0
    assert strict.stats.h2d_bytes == led.h2d_bytes
    assert set(led.by_label) <= {"background_spline"}
    np.testing.assert_allclose(sky.get(), ref_sky, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(sig.get(), ref_sig, rtol=1e-6, atol=1e-4)
    assert float(rs.get()) == pytest.approx(float(robust_sigma(img[1])), rel=1e-12)
    np.testing.assert_allclose(rows.get(), robust_sigma(img.reshape(2, -1), axis=-1), rtol=1e-12)
    assert float(ms.get()) == pytest.approx(float(mad_sigma(img[0])), rel=1e-12)
    hm, hs = median_mad_sigma(img.reshape(2, -1), axis=-1)
    np.testing.assert_allclose(mm.get(), hm, rtol=1e-12)
    np.testing.assert_allclose(ms_rows.get(), hs, rtol=1e-12)
    assert float(rsig.get()) == pytest.approx(float(residual_sigma(img[0] - 1.0)), rel=1e-12)
    # the spline matrices are cached per device: a second call uploads nothing
    with count_transfers() as led2:
        background(d_img, box=32, mask=d_mask)
    assert led2.h2d_count == 0
