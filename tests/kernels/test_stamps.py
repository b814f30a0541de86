"""Stamp extraction: one vectorised gather checked against plain slicing."""
import numpy as np
import pytest

from nightsift.kernels import to_numpy
from nightsift.kernels.stamps import extract_stamps, extract_triplets


def _slow_stamp(image, x, y, size, fill=np.nan):
    """Obviously-correct reference: pixel by pixel."""
    half = size // 2
    cx, cy = int(np.rint(x)), int(np.rint(y))
    out = np.full((size, size), fill, dtype=np.result_type(image.dtype, fill))
    for j in range(size):
        for i in range(size):
            r, c = cy - half + j, cx - half + i
            if 0 <= r < image.shape[0] and 0 <= c < image.shape[1]:
                out[j, i] = image[r, c]
    return out


def test_centred_gather_equals_slicing():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(200, 300)).astype(np.float32)
    x = rng.uniform(40, 260, 50)
    y = rng.uniform(40, 160, 50)
    st, padded = extract_stamps(img, x, y, size=63)
    assert st.shape == (50, 63, 63) and st.dtype == np.float32
    assert not padded.any()
    for k in range(50):
        cx, cy = int(np.rint(x[k])), int(np.rint(y[k]))
        np.testing.assert_array_equal(st[k], img[cy - 31 : cy + 32, cx - 31 : cx + 32])
        assert st[k, 31, 31] == img[cy, cx]


def test_edge_padding_and_flag():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(80, 100))
    x = np.array([0.0, 99.4, 50.0, 50.0, 3.0, -5.0, 50.0])
    y = np.array([40.0, 40.0, 0.2, 79.0, 2.0, 40.0, 40.0])
    st, padded = extract_stamps(img, x, y, size=15)
    np.testing.assert_array_equal(padded, [True, True, True, True, True, True, False])
    for k in range(len(x)):
        np.testing.assert_array_equal(st[k], _slow_stamp(img, x[k], y[k], 15))
    # the part inside the image is intact, the rest is NaN
    assert np.isnan(st[0][:, :7]).all() and np.isfinite(st[0][:, 7:]).all()
    assert not np.isnan(img).any()  # input untouched
    # a custom fill value
    st0, _ = extract_stamps(img, x, y, size=15, fill=0.0)
    assert (st0[0][:, :7] == 0).all()


def test_stamp_entirely_outside_is_all_fill():
    img = np.ones((20, 20), np.float32)
    st, padded = extract_stamps(img, [100.0], [100.0], size=5)
    assert padded[0] and np.isnan(st).all()


def test_integer_image_with_nan_fill_promotes():
    img = np.arange(100, dtype=np.int16).reshape(10, 10)
    st, padded = extract_stamps(img, [0.0], [0.0], size=3)
    assert st.dtype == np.float64 and np.isnan(st[0, 0, 0]) and st[0, 1, 1] == 0
    st, _ = extract_stamps(img, [5.0], [5.0], size=3, fill=0)
    assert st.dtype == np.int16


def test_empty_input():
    img = np.zeros((50, 50), np.float32)
    st, padded = extract_stamps(img, np.array([]), np.array([]), size=63)
    assert st.shape == (0, 63, 63) and st.dtype == np.float32
    assert padded.shape == (0,) and padded.dtype == bool
    tr = extract_triplets(img, img, img, [], [], size=63)
    assert tr.shape == (0, 63, 63, 3) and tr.dtype == np.float32


def test_bad_input():
    img = np.zeros((50, 50))
    with pytest.raises(ValueError, match="odd"):
        extract_stamps(img, [1.0], [1.0], size=62)
    with pytest.raises(ValueError, match="2-D"):
        extract_stamps(np.zeros((2, 50, 50)), [1.0], [1.0], size=5)
    with pytest.raises(ValueError, match="finite"):
        extract_stamps(img, [np.nan], [1.0], size=5)
    with pytest.raises(ValueError, match="same length"):
        extract_stamps(img, [1.0, 2.0], [1.0], size=5)
    with pytest.raises(ValueError, match="share one shape"):
        extract_triplets(img, img, np.zeros((50, 51)), [1.0], [1.0], size=5)


def test_triplet_channel_order():
    rng = np.random.default_rng(3)
    sci = rng.normal(size=(120, 130))
    ref = sci + 100.0
    diff = sci - 100.0
    x, y = np.array([10.0, 64.7, 125.0]), np.array([60.0, 60.2, 118.0])
    tr = extract_triplets(sci, ref, diff, x, y, size=21)
    assert tr.shape == (3, 21, 21, 3) and tr.dtype == np.float32
    for c, img in enumerate((sci, ref, diff)):
        st, _ = extract_stamps(img, x, y, size=21)
        np.testing.assert_array_equal(tr[..., c], st.astype(np.float32))
    # padding is NaN in every channel at the same pixels
    nan = np.isnan(tr)
    assert (nan[..., 0] == nan[..., 1]).all() and (nan[..., 0] == nan[..., 2]).all()
    assert nan[2].any() and not nan[1].any()


def test_difference_sign_flips_only_the_difference_channel(xp, rng):
    img = [xp.asarray(rng.normal(size=(40, 50)).astype(np.float32)) for _ in range(3)]
    x, y = np.array([10.0, 25.0, 30.0]), np.array([12.0, 20.0, 5.0])
    plain = to_numpy(extract_triplets(*img, x, y, size=15))
    signed = to_numpy(extract_triplets(*img, x, y, size=15, difference_sign=[1, -1, 1]))
    np.testing.assert_array_equal(signed[..., :2], plain[..., :2])
    np.testing.assert_array_equal(signed[[0, 2], ..., 2], plain[[0, 2], ..., 2])
    np.testing.assert_array_equal(signed[1, ..., 2], -plain[1, ..., 2])
    with pytest.raises(ValueError, match="difference_sign"):
        extract_triplets(*img, x, y, size=15, difference_sign=[1, -1])
