"""CUDA Lanczos resampling and mask propagation == the xp reference of kernels.resample, on a GPU
or under the simulator. See tests/kernels/cudasim.py for why the simulator runs in a
subprocess."""

import numpy as np
import pytest

from tests.kernels.cudasim import MODE, needs_cuda, run_file_under_simulator, to_device
from nightsift.kernels import to_numpy
from nightsift.kernels._cuda import CudaUnavailable
from nightsift.kernels._cuda.resample import lanczos_resample_cuda, resample_mask_cuda
from nightsift.kernels.resample import lanczos_resample, resample_mask

NO_DATA = 4


def test_under_cuda_simulator():
    run_file_under_simulator(__file__)


def _map(shape_out, *, shift=(0.0, 0.0), nan_at=None):
    """Affine + quadratic source map leaving the source on two sides (as test_resample)."""
    yy, xx = np.mgrid[0 : shape_out[0], 0 : shape_out[1]].astype(np.float64)
    xs = 1.01 * xx + 0.02 * yy - 3.3 + 2e-3 * (xx - 10) ** 2 + shift[0]
    ys = 0.99 * yy - 0.015 * xx + 2.7 + 1e-3 * xx * yy + shift[1]
    if nan_at is not None:
        xs[nan_at] = np.nan
    return xs, ys


@needs_cuda
@pytest.mark.parametrize("dtype,a", [(np.float64, 3), (np.float32, 3), (np.float64, 2)])
def test_lanczos_matches_reference(rng, dtype, a):
    img = rng.normal(100.0, 10.0, (26, 30)).astype(dtype)
    xs, ys = _map((20, 24), nan_at=(3, 4))
    stack = np.stack([img, img**2 / 100])
    want = lanczos_resample(stack, xs, ys, a=a, method="reference")
    got = to_numpy(lanczos_resample_cuda(to_device(stack), to_device(xs), to_device(ys), a=a))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[:, 3, 4]).all()
    ok = ~np.isnan(want)
    assert 0.5 < ok.mean() < 1  # some pixels fall outside the source
    # the kernel is read from a table (< 3e-8 of its peak; the reference evaluates it exactly) ...
    tol = 1e-6
    assert (np.abs(got[ok] - want[ok]) / np.abs(want[ok]).max()).max() < tol
    # ... the same table and body as the Numba CPU kernel: identical to rounding
    cpu = lanczos_resample(stack, xs, ys, a=a, method="numba")
    assert (np.abs(got[ok] - cpu[ok]) / np.abs(cpu[ok]).max()).max() < (1e-12 if dtype == np.float64 else 1e-6)
    # a single 2-D plane keeps its shape
    one = to_numpy(lanczos_resample_cuda(to_device(img), to_device(xs), to_device(ys), a=a, fill=-1.0))
    np.testing.assert_allclose(one, lanczos_resample(img, xs, ys, a=a, fill=-1.0, method="reference"),
                               rtol=tol, atol=0)


@needs_cuda
def test_batched_maps_equal_per_pair_calls(rng):
    B = 2
    imgs = rng.normal(50.0, 5.0, (B, 2, 22, 25))
    maps = [_map((16, 18), shift=(0.3 * b, -0.2 * b)) for b in range(B)]
    xs = np.stack([m[0] for m in maps])
    ys = np.stack([m[1] for m in maps])
    got = to_numpy(lanczos_resample_cuda(to_device(imgs), to_device(xs), to_device(ys), a=3))
    for b in range(B):
        want = lanczos_resample(imgs[b], xs[b], ys[b], a=3, method="numba")
        np.testing.assert_allclose(got[b], want, rtol=1e-12, atol=1e-12)


@needs_cuda
def test_mask_matches_reference(rng):
    mask = np.zeros((26, 30), np.uint16)
    mask[rng.integers(0, 26, 12), rng.integers(0, 30, 12)] = 1
    mask[10, 5:9] |= 2
    xs, ys = _map((20, 24), nan_at=(3, 4))
    want = resample_mask(mask, xs, ys, a=3, no_data_bit=NO_DATA, method="reference")
    got = to_numpy(resample_mask_cuda(to_device(mask), to_device(xs), to_device(ys), a=3, no_data_bit=NO_DATA))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, want)
    assert (want & 1).any() and (want & 2).any() and (want & NO_DATA).any() and (want == 0).any()
    # integer shift: the exact zeros of the kernel do not spread a flag
    yy, xx = np.mgrid[0:20, 0:24].astype(np.float64)
    got_i = to_numpy(resample_mask_cuda(to_device(mask), to_device(xx + 2), to_device(yy + 1), a=3, no_data_bit=NO_DATA))
    np.testing.assert_array_equal(got_i, mask[1:21, 2:26])
    # batched masks
    m2 = np.stack([mask, mask[::-1].copy()])
    got_b = to_numpy(resample_mask_cuda(to_device(m2), to_device(np.stack([xs, xs])), to_device(np.stack([ys, ys])), a=3,
                                        no_data_bit=NO_DATA))
    np.testing.assert_array_equal(got_b[1], resample_mask(m2[1], xs, ys, a=3, no_data_bit=NO_DATA,
                                                          method="reference"))


def test_argument_errors(rng):
    img = np.zeros((2, 3, 10, 10))
    xs = np.zeros((3, 5, 5))  # batch 3 vs 2
    if MODE is None:
        with pytest.raises(CudaUnavailable, match="cupy arrays on a GPU"):
            lanczos_resample_cuda(img, xs[:2], xs[:2])
        return
    with pytest.raises(ValueError, match="batch sizes differ"):
        lanczos_resample_cuda(to_device(img), to_device(xs), to_device(xs))
    with pytest.raises(ValueError, match="order a"):
        lanczos_resample_cuda(to_device(img[0, 0]), to_device(xs[0]), to_device(xs[0]), a=9)
    with pytest.raises(ValueError, match="integer"):
        resample_mask_cuda(to_device(img[0, 0]), to_device(xs[0]), to_device(xs[0]))


@needs_cuda
def test_resample_api_routes_to_the_cuda_kernel(rng):
    """kernels.resample's public functions with method="cuda" (and "auto" on cupy arrays) run the
    CUDA twin and agree with the reference."""
    from nightsift.kernels.resample import lanczos_resample, resample_mask

    img = rng.normal(size=(30, 34))
    yy, xx = np.mgrid[0:20, 0:22].astype(float)
    xs, ys = xx * 1.02 + 3.3, yy * 0.99 + 2.7
    ref = lanczos_resample(img, xs, ys, method="numba")  # the same table kernel on the CPU
    method = "auto" if MODE == "gpu" else "cuda"
    got = lanczos_resample(to_device(img), to_device(xs), to_device(ys), method=method)
    np.testing.assert_allclose(to_numpy(got), ref, rtol=0, atol=1e-12)
    mask = np.zeros((30, 34), np.uint16)
    mask[10, 12] = 4
    mref = resample_mask(mask, xs, ys, no_data_bit=1, method="reference")
    mgot = resample_mask(to_device(mask), to_device(xs), to_device(ys), no_data_bit=1, method=method)
    np.testing.assert_array_equal(to_numpy(mgot), mref)


@needs_cuda
def test_single_plane_batches_and_stamp_stacks(rng):
    """(B, ny, nx) sources with (B, ny_o, nx_o) maps (PSF stamps, each through its own map): the
    CUDA kernel, the Numba CPU kernel (same per-pixel bodies) and the reference agree."""
    n, s = 3, 11
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    stamps = rng.normal(size=(n, s, s)).astype(np.float32)
    d = rng.uniform(-0.5, 0.5, (2, n))[:, :, None, None]
    xs, ys = xx[None] + d[0], yy[None] + d[1]
    xs[2, 4, 4] = np.nan
    want = lanczos_resample(stamps, xs, ys, fill=0.0, method="reference")
    cpu = lanczos_resample(stamps, xs, ys, fill=0.0, method="numba")
    got = to_numpy(lanczos_resample_cuda(to_device(stamps), to_device(xs), to_device(ys), fill=0.0))
    assert got.shape == (n, s, s) and got.dtype == np.float32 and got[2, 4, 4] == 0.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, cpu, rtol=0, atol=1e-6)
    m = (rng.random((n, s, s)) < 0.05).astype(np.uint16)
    np.testing.assert_array_equal(
        to_numpy(resample_mask_cuda(to_device(m), to_device(xs), to_device(ys), no_data_bit=NO_DATA)),
        resample_mask(m, xs, ys, no_data_bit=NO_DATA, method="numba"))
