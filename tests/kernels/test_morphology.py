"""Dilation by shifted ORs against scipy.ndimage.binary_dilation (the oracle)."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from nightsift.kernels.morphology import dilate


@pytest.mark.parametrize("structure", ["cross", "square"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_equals_scipy_per_image_of_a_batch(xp, rng, structure, k):
    if xp is None:
        pytest.skip("no CUDA GPU with cupy here")
    m = rng.random((3, 64, 80)) > 0.995
    m[1, 0, :5] = True  # at the edges: no wrap-around
    m[2, -1, -1] = True
    st = ndi.generate_binary_structure(2, 1 if structure == "cross" else 2)
    got = dilate(xp.asarray(m), iterations=k, structure=structure)
    got = got.get() if hasattr(got, "get") else got
    for b in range(3):
        want = ndi.binary_dilation(m[b], structure=st, iterations=k) if k else m[b]
        np.testing.assert_array_equal(got[b], want)


def test_input_untouched_and_bad_arguments(rng):
    m = rng.random((20, 20)) > 0.9
    before = m.copy()
    dilate(m, iterations=2)
    np.testing.assert_array_equal(m, before)
    with pytest.raises(ValueError, match="structure"):
        dilate(m, iterations=1, structure="disc")
    with pytest.raises(ValueError, match="iterations"):
        dilate(m, iterations=-1)


def test_on_the_strict_device_stand_in(rng):
    from ..strict_device import strict_namespace

    sx = strict_namespace()
    m = rng.random((2, 32, 32)) > 0.98
    got = dilate(sx.asarray(m), iterations=2).get()
    np.testing.assert_array_equal(got, dilate(m, iterations=2))
