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


def _loop_cut(img, g, fill):
    """The obvious oracle: one slice per tile."""
    ny, nx = g.shape
    m, c = g.margin, g.core
    s = c + 2 * m
    out = np.full((len(g), s, s), fill, dtype=img.dtype)
    for t, (y0, x0) in enumerate(g.origins):
        ya, yb = max(y0 - m, 0), min(y0 + c + m, ny)
        xa, xb = max(x0 - m, 0), min(x0 + c + m, nx)
        out[t, ya - (y0 - m): yb - (y0 - m), xa - (x0 - m): xb - (x0 - m)] = img[ya:yb, xa:xb]
    return out


def test_batched_cut_and_stitch_equal_the_per_tile_loop(rng):
    batch = rng.normal(size=(3, 300, 410)).astype(np.float32)
    g = tiles.make_grid((300, 410), core=128, margin=16)
    st = tiles.cut_tiles(batch, g, fill=-1.0)
    T = len(g)
    assert st.shape == (3 * T, 160, 160)
    for b in range(3):
        np.testing.assert_array_equal(st[b * T:(b + 1) * T], _loop_cut(batch[b], g, -1.0))
    back = tiles.stitch_tiles(st, g)
    assert back.shape == batch.shape
    np.testing.assert_array_equal(back, batch)
    np.testing.assert_array_equal(tiles.stitch_tiles(st[:T], g, batch=1)[0], batch[0])


def test_tile_index_per_tile_and_core_views(rng):
    g = tiles.make_grid((300, 410), core=128, margin=16)
    x = rng.uniform(-0.5, 409.4, 500)
    y = rng.uniform(-0.5, 299.4, 500)
    np.testing.assert_array_equal(tiles.tile_index(g, x, y), g.tile_of(x, y))
    vals = np.arange(2 * len(g), dtype=np.float64)
    full = tiles.per_tile(vals, g, batch=2)
    assert full.shape == (2, 300, 410)
    yi, xi = np.rint(y).astype(int).clip(0, 299), np.rint(x).astype(int).clip(0, 409)
    np.testing.assert_array_equal(full[1, yi, xi], len(g) + g.tile_of(xi, yi))
    img = rng.normal(size=(2, 300, 410)).astype(np.float32)
    cores = tiles.core_views(img, g)
    assert cores.shape == (2 * len(g), 128, 128)
    t = 5
    y0, x0 = g.origins[t]
    np.testing.assert_array_equal(cores[len(g) + t], img[1, y0:y0 + 128, x0:x0 + 128])
    assert np.isnan(cores[len(g) - 1]).any()  # the last core reaches past the image
