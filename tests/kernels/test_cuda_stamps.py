"""CUDA cutout gather == extract_triplets (and the batched xp reference), on a GPU or under the
simulator. See tests/kernels/cudasim.py for why the simulator runs in a subprocess."""

import numpy as np
import pytest

from tests.kernels.cudasim import MODE, needs_cuda, run_file_under_simulator, to_device
from nightsift.kernels import to_numpy
from nightsift.kernels._cuda import CudaUnavailable
from nightsift.kernels.cutouts import gather_triplets
from nightsift.kernels.stamps import extract_stamps, extract_triplets


def test_under_cuda_simulator():
    run_file_under_simulator(__file__)


def _batch(rng, B=2, shape=(40, 50), dtype=np.float32):
    return [rng.normal(size=(B,) + shape).astype(dtype) for _ in range(3)]


# centres on every edge, a corner, fully outside, half-integers (round half to even) and inside
X = np.array([0.5, 1.5, 25.0, 49.4, 10.0, -3.0, 24.5, 70.0, 2.5])
Y = np.array([2.5, 20.0, 39.0, 0.0, 20.0, 5.0, 19.5, 70.0, 37.5])
IMG = np.array([0, 1, 1, 0, 0, 1, 1, 0, 1])


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_equals_extract_triplets_per_candidate(rng, dtype):
    sci, ref, dif = _batch(rng, dtype=dtype)
    st, pad = gather_triplets(to_device(sci), to_device(ref), to_device(dif), to_device(IMG), to_device(X), to_device(Y), size=9, method="cuda")
    st, pad = to_numpy(st), to_numpy(pad)
    assert st.shape == (len(X), 9, 9, 3) and st.dtype == np.float32 and pad.dtype == bool
    for k in range(len(X)):
        b = IMG[k]
        want = extract_triplets(sci[b], ref[b], dif[b], X[k : k + 1], Y[k : k + 1], size=9)[0]
        np.testing.assert_array_equal(st[k], want)  # NaN == NaN here
        assert pad[k] == extract_stamps(sci[b], X[k : k + 1], Y[k : k + 1], size=9)[1][0]
    assert pad.tolist() == [True, True, True, True, False, True, False, True, True]
    assert np.isnan(st[7]).all()  # entirely outside


@needs_cuda
def test_kernel_equals_batched_reference_63_and_channels_first(rng):
    sci, ref, dif = _batch(rng, shape=(70, 66))
    x, y, img = np.array([33.0, 5.2]), np.array([35.0, 60.7]), np.array([1, 0])
    for channels_last in (True, False):
        want, wpad = gather_triplets(sci, ref, dif, img, x, y, size=63, channels_last=channels_last,
                                     method="reference")
        got, gpad = gather_triplets(to_device(sci), to_device(ref), to_device(dif), to_device(img), to_device(x), to_device(y), size=63,
                                    channels_last=channels_last, method="cuda")
        np.testing.assert_array_equal(to_numpy(got), want)
        np.testing.assert_array_equal(to_numpy(gpad), wpad)
    assert wpad.tolist() == [False, True]


@needs_cuda
def test_single_image_and_no_candidates(rng):
    sci, ref, dif = (a[0] for a in _batch(rng))
    got, pad = gather_triplets(to_device(sci), to_device(ref), to_device(dif), None, to_device(X[:3]), to_device(Y[:3]), size=7, method="cuda")
    np.testing.assert_array_equal(to_numpy(got), extract_triplets(sci, ref, dif, X[:3], Y[:3], size=7))
    empty, epad = gather_triplets(to_device(sci), to_device(ref), to_device(dif), None, to_device(np.zeros(0)), to_device(np.zeros(0)),
                                  size=7, method="cuda")
    assert empty.shape == (0, 7, 7, 3) and epad.shape == (0,)


def test_reference_validation(rng):
    sci, ref, dif = _batch(rng)
    with pytest.raises(ValueError, match="odd"):
        gather_triplets(sci, ref, dif, IMG, X, Y, size=8)
    with pytest.raises(ValueError, match="finite"):
        gather_triplets(sci, ref, dif, [0], [np.nan], [1.0], size=5)
    with pytest.raises(ValueError, match="0..1"):
        gather_triplets(sci, ref, dif, [2], [1.0], [1.0], size=5)
    with pytest.raises(ValueError, match="share one"):
        gather_triplets(sci, ref[:, :-1], dif, IMG, X, Y, size=5)
    if MODE is None:
        with pytest.raises(CudaUnavailable, match="cupy arrays on a GPU"):
            gather_triplets(sci, ref, dif, IMG, X, Y, size=5, method="cuda")
