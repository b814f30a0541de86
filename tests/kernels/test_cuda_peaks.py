"""CUDA peak-finding kernel == the xp reference (kernels.peaks), on a GPU or under the simulator
(in a subprocess: see tests/kernels/cudasim.py)."""

import numpy as np
import pytest
from scipy import ndimage

from tests.kernels.cudasim import MODE, needs_cuda, run_file_under_simulator, to_device
from nightsift.kernels import to_numpy
from nightsift.kernels._cuda import CudaUnavailable
from nightsift.kernels.peaks import find_peaks


def test_under_cuda_simulator():
    run_file_under_simulator(__file__)


def _table(p):
    return [to_numpy(a) for a in (p.image, p.y, p.x, p.value, p.sign)]


def _assert_same(got, want):
    for g, w, name in zip(_table(got), _table(want), ("image", "y", "x", "value", "sign")):
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def _field(rng, shape, step=None):
    f = ndimage.gaussian_filter(rng.normal(size=shape), (0, 1.2, 1.2))
    f = f / f.std() * 2.5
    if step:
        f = np.round(f / step) * step  # exact ties and flat tops
    return f


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("radius", [0.0, 3.0])
def test_kernel_matches_reference_with_ties_nan_and_mask(rng, dtype, radius):
    s = _field(rng, (2, 24, 40), step=0.5).astype(dtype)
    s[0, 3, 3] = np.nan
    s[1, 0, :3] = 9.0  # flat top on the edge
    ex = np.zeros(s.shape, bool)
    ex[1, 10:14, 5:12] = True
    want = find_peaks(s, threshold=2.0, radius=radius, excluded=ex, method="reference")
    got = find_peaks(to_device(s), threshold=2.0, radius=radius, excluded=to_device(ex), method="cuda")
    assert len(want) > 10
    _assert_same(got, want)


@needs_cuda
def test_capacity_overflow_relaunches_and_order_is_deterministic(rng):
    s = _field(rng, (1, 30, 30))
    want = find_peaks(s, threshold=1.0, radius=1.5, method="reference")
    assert len(want) > 5
    got = find_peaks(to_device(s), threshold=1.0, radius=1.5, method="cuda", max_peaks=2)
    _assert_same(got, want)
    again = find_peaks(to_device(s[0]), threshold=1.0, radius=1.5, method="cuda")  # 2-D input
    _assert_same(again, want)


@needs_cuda
def test_empty_result():
    got = find_peaks(to_device(np.zeros((9, 11), np.float32)), threshold=5.0, radius=3.0, method="cuda")
    assert len(got) == 0 and to_numpy(got.value).dtype == np.float32


@needs_cuda
def test_simulated_scorr_sources(rng):
    """A few injected sources on smooth noise: the kernel finds exactly the reference's peaks."""
    ny, nx = 48, 64
    s = ndimage.gaussian_filter(rng.normal(size=(ny, nx)), 1.5)
    s /= s.std()
    yy, xx = np.mgrid[0:ny, 0:nx]
    for a, x0, y0 in [(12, 10.3, 9.7), (-8, 40.2, 30.1), (20, 55.5, 40.4), (7, 30.0, 12.0)]:
        s += a * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.1**2))
    s = s.astype(np.float32)
    want = find_peaks(s, threshold=5.0, radius=3.0, method="reference")
    got = find_peaks(to_device(s), threshold=5.0, radius=3.0, method="cuda")
    _assert_same(got, want)
    assert len(want) == 4


def test_wrong_arrays_are_refused_with_a_clear_message():
    if MODE == "simulator":
        pytest.skip("the simulator takes numpy arrays")
    with pytest.raises(CudaUnavailable, match="cupy arrays on a GPU|NUMBA_ENABLE_CUDASIM"):
        find_peaks(np.zeros((4, 4)), threshold=1.0, method="cuda")


@needs_cuda
def test_kernel_matches_numba_cpu_kernel_on_adversarial_images(rng):
    """Ties, plateaus, NaN/inf, edges, tiny shapes, a threshold float32 cannot hold: the CUDA
    kernel, the Numba CPU kernel (same per-pixel body) and the reference give one table."""
    from tests.kernels.test_peaks import _adversarial

    for name, s, ex, thr in _adversarial(rng, shape=(2, 16, 22)):
        if name == "integers":  # ties are in the first case already; the simulator is slow
            continue
        want = find_peaks(s, threshold=thr, radius=3.0, excluded=ex, method="reference")
        _assert_same(find_peaks(s, threshold=thr, radius=3.0, excluded=ex, method="numba"), want)
        got = find_peaks(to_device(s), threshold=thr, radius=3.0, excluded=None if ex is None else to_device(ex),
                         method="cuda")
        _assert_same(got, want)
