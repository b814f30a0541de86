"""CUDA peak-finding kernel == the xp reference (kernels.peaks), on a GPU or under the simulator.

How the simulator runs: Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when numba is first imported,
and the rest of the suite has already imported numba (the CPU resampling kernels) without it. So
setting the variable inside this module would be too late and, worse, would leak into every
test collected after it. Instead ``test_under_cuda_simulator`` reruns *this file* in a fresh
``python -m pytest`` subprocess with ``NUMBA_ENABLE_CUDASIM=1``: there :func:`cuda_mode` is
``"simulator"`` and the kernel tests run on numpy arrays. On a machine with a GPU they run
directly on cupy arrays, and the subprocess test skips. Inputs are small: the simulator runs one
Python thread per CUDA thread.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nightsift.kernels import to_numpy
from nightsift.kernels._cuda import CudaUnavailable, cuda_mode
from nightsift.kernels.peaks import find_peaks

MODE = cuda_mode()
needs_cuda = pytest.mark.skipif(MODE is None, reason="no CUDA device: run under the CUDA simulator by "
                                                     "test_under_cuda_simulator in a subprocess")


def test_under_cuda_simulator():
    if MODE is not None:
        pytest.skip(f"numba.cuda is usable here ({MODE}): this file's kernel tests ran in this process")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parents[2])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 4, out[-3000:]  # the kernel tests really ran there


def _dev(a):
    if MODE == "gpu" and a is not None:
        import cupy

        return cupy.asarray(a)
    return a


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
    got = find_peaks(_dev(s), threshold=2.0, radius=radius, excluded=_dev(ex), method="cuda")
    assert len(want) > 10
    _assert_same(got, want)


@needs_cuda
def test_capacity_overflow_relaunches_and_order_is_deterministic(rng):
    s = _field(rng, (1, 30, 30))
    want = find_peaks(s, threshold=1.0, radius=1.5, method="reference")
    assert len(want) > 5
    got = find_peaks(_dev(s), threshold=1.0, radius=1.5, method="cuda", max_peaks=2)
    _assert_same(got, want)
    again = find_peaks(_dev(s[0]), threshold=1.0, radius=1.5, method="cuda")  # 2-D input
    _assert_same(again, want)


@needs_cuda
def test_empty_result():
    got = find_peaks(_dev(np.zeros((9, 11), np.float32)), threshold=5.0, radius=3.0, method="cuda")
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
    got = find_peaks(_dev(s), threshold=5.0, radius=3.0, method="cuda")
    _assert_same(got, want)
    assert len(want) == 4


def test_wrong_arrays_are_refused_with_a_clear_message():
    if MODE == "simulator":
        pytest.skip("the simulator takes numpy arrays")
    with pytest.raises(CudaUnavailable, match="cupy arrays on a GPU|NUMBA_ENABLE_CUDASIM"):
        find_peaks(np.zeros((4, 4)), threshold=1.0, method="cuda")
