import numpy as np
import pytest

from nightsift.kernels.background import background, robust_sigma


def test_background_fast_path_agrees_with_reference(xp, rng):
    ny, nx = 512, 640
    y, x = np.mgrid[:ny, :nx]
    sky = 200 + 0.02 * x - 0.01 * y + 5 * np.sin(x / 150)
    img = (sky + rng.normal(0, 6, (ny, nx))).astype(np.float32)
    img[100:104, 100:104] += 5000  # a star
    ref_sky, ref_sig = background(xp.asarray(img), box=64, method="reference")
    get = lambda a: a.get() if hasattr(a, "get") else a  # noqa: E731
    ref_sky, ref_sig = get(ref_sky), get(ref_sig)
    fast_sky, fast_sig = background(img, box=64)
    inner = (slice(64, -64), slice(64, -64))
    assert np.abs(ref_sky - sky)[inner].max() < 1.0  # noise of a 64x64 mesh median ~0.12
    assert np.abs(fast_sky - ref_sky)[inner].max() < 0.5
    assert np.median(ref_sig) == pytest.approx(6.0, rel=0.03)
    assert np.median(fast_sig) == pytest.approx(6.0, rel=0.05)


def test_robust_sigma_ignores_sources(rng):
    v = rng.normal(0, 3.0, 200_000)
    v[:2000] += rng.uniform(20, 500, 2000)
    assert robust_sigma(v) == pytest.approx(3.0, rel=0.01)
