import numpy as np

from nightsift.kernels import tiles


def test_cut_stitch_roundtrip_non_divisible(rng):
    img = rng.normal(size=(300, 410)).astype(np.float32)
    g = tiles.make_grid(img.shape, core=128, margin=16)
    st = tiles.cut_tiles(img, g, fill=0.0)
    assert st.shape == (len(g), 160, 160) and len(g) == 3 * 4
    np.testing.assert_array_equal(tiles.stitch_tiles(st, g), img)
    # margins carry the neighbours' pixels, and zeros outside the image
    assert st[0, 0, 0] == 0.0 and st[1, 16, 0] == img[0, 128 - 16]


def test_tile_of_and_single_tile():
    g = tiles.make_grid((300, 410), core=128, margin=16)
    assert g.tile_of(0, 0) == 0 and g.tile_of(409, 299) == len(g) - 1 and g.tile_of(130, 5) == 1
    one = tiles.make_grid((256, 256), core=1024, margin=32)
    assert len(one) == 1 and one.tile_shape == (320, 320)
