"""Cut images into equal, overlapping FFT tiles and stitch the tile cores back, batched.

Every tile has the same padded shape, so a batch of ``B`` CCDs becomes one ``(B * T, ty, tx)``
stack that the batched ZOGY kernel transforms in one call (one cuFFT plan per shape on the GPU).
Tiles that reach past the image edge are filled with ``fill`` there. Cutting is one strided copy
(numpy) or one gather (other array modules), stitching one reshape of the cores: no Python loop
over tiles or images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._xp import array_namespace, is_host, to_device


@dataclass(frozen=True)
class TileGrid:
    """Geometry of a tiling of an ``(ny, nx)`` image.

    Attributes
    ----------
    shape : (ny, nx)
        Image shape.
    core : int
        Side of a tile core (pixels); cores partition the image (the last row/column of cores
        may reach past it).
    margin : int
        Padding added on every side of a core; the padded tile side is ``core + 2 * margin``.
    origins : tuple of (y0, x0)
        Image coordinates of each core's first pixel, row-major over the grid.
    """

    shape: tuple[int, int]
    core: int
    margin: int
    origins: tuple[tuple[int, int], ...]

    @property
    def tile_shape(self) -> tuple[int, int]:
        s = self.core + 2 * self.margin
        return (s, s)

    @property
    def n_rows(self) -> int:
        return -(-self.shape[0] // self.core)

    @property
    def n_cols(self) -> int:
        return -(-self.shape[1] // self.core)

    def __len__(self) -> int:
        return len(self.origins)

    def centres(self) -> np.ndarray:
        """``(T, 2)`` float64 host array of the core centres ``(x, y)`` (pixels)."""
        o = np.asarray(self.origins, dtype=np.float64).reshape(-1, 2)
        return np.stack([o[:, 1] + self.core / 2 - 0.5, o[:, 0] + self.core / 2 - 0.5], axis=1)

    def visible_centres(self) -> np.ndarray:
        """``(T, 2)`` centres ``(x, y)`` of the part of each core inside the image (a partial last
        row/column of cores has its nominal centre near or past the edge)."""
        o = np.asarray(self.origins, dtype=np.float64).reshape(-1, 2)
        ny, nx = self.shape
        w = np.minimum(self.core, nx - o[:, 1])
        h = np.minimum(self.core, ny - o[:, 0])
        return np.stack([o[:, 1] + w / 2 - 0.5, o[:, 0] + h / 2 - 0.5], axis=1)

    def tile_of(self, x, y):
        """Index of the tile whose core contains pixel ``(x, y)`` (host values; see
        :func:`tile_index` for device arrays)."""
        ny, nx = self.shape
        ix = np.clip(np.floor(np.asarray(x) + 0.5).astype(int) // self.core, 0, self.n_cols - 1)
        iy = np.clip(np.floor(np.asarray(y) + 0.5).astype(int) // self.core, 0, self.n_rows - 1)
        return iy * self.n_cols + ix


def make_grid(shape, *, core: int, margin: int) -> TileGrid:
    """Tile an image of ``shape`` with square cores of side ``core`` (``0``: one tile, the image).

    The core is shrunk to the image size for small images so a 256x256 cutout is one tile.
    """
    ny, nx = int(shape[0]), int(shape[1])
    if core <= 0 or core >= max(ny, nx):
        core = max(ny, nx)
    origins = tuple((y0, x0) for y0 in range(0, ny, core) for x0 in range(0, nx, core))
    return TileGrid(shape=(ny, nx), core=core, margin=margin, origins=origins)


def tile_index(grid: TileGrid, x, y):
    """Index (int64, on the device of ``x``) of the tile whose core contains pixel ``(x, y)``."""
    xp = array_namespace(x, y)
    ix = xp.clip(xp.floor(x + 0.5).astype(xp.int64) // grid.core, 0, grid.n_cols - 1)
    iy = xp.clip(xp.floor(y + 0.5).astype(xp.int64) // grid.core, 0, grid.n_rows - 1)
    return iy * grid.n_cols + ix


def _padded(image, grid: TileGrid, fill):
    """``(B, rows * core + 2 m, cols * core + 2 m)`` copy of the batch with ``fill`` around it."""
    xp = array_namespace(image)
    B, ny, nx = image.shape
    m, c = grid.margin, grid.core
    out = xp.full((B, grid.n_rows * c + 2 * m, grid.n_cols * c + 2 * m), fill, dtype=image.dtype)
    out[:, m:m + ny, m:m + nx] = image
    return out


def cut_tiles(image, grid: TileGrid, *, fill=0.0):
    """Stack of padded tiles; outside the image is ``fill``.

    Parameters
    ----------
    image : ndarray (ny, nx) or (B, ny, nx)
    grid : TileGrid
        Of shape ``(ny, nx)``.

    Returns
    -------
    ndarray (T, s, s) for a 2-D image, (B * T, s, s) for a batch (CCD-major: tile ``t`` of image
    ``b`` is row ``b * T + t``), ``s = core + 2 margin``.
    """
    xp = array_namespace(image)
    single = image.ndim == 2
    img = image[None] if single else image
    if tuple(img.shape[-2:]) != tuple(grid.shape):
        raise ValueError(f"cut_tiles: image shape {tuple(img.shape[-2:])} is not the grid's {grid.shape}")
    B = img.shape[0]
    s = grid.tile_shape[0]
    c = grid.core
    pad = _padded(img, grid, fill)
    nr, nc = grid.n_rows, grid.n_cols
    if is_host(xp):  # one strided copy
        st = np.lib.stride_tricks.as_strided
        b0, r0, c0 = pad.strides
        view = st(pad, shape=(B, nr, nc, s, s), strides=(b0, r0 * c, c0 * c, r0, c0), writeable=False)
        tiles = np.ascontiguousarray(view)
    else:  # one gather: rows (nr, s) x cols (nc, s)
        off = xp.arange(s, dtype=xp.int64)
        rows = (xp.arange(nr, dtype=xp.int64) * c)[:, None] + off[None, :]
        cols = (xp.arange(nc, dtype=xp.int64) * c)[:, None] + off[None, :]
        tiles = pad[:, rows[:, None, :, None], cols[None, :, None, :]]
    return tiles.reshape(B * nr * nc, s, s)


def stitch_tiles(tiles, grid: TileGrid, *, batch: int | None = None):
    """Inverse of :func:`cut_tiles` for the cores.

    Parameters
    ----------
    tiles : ndarray (T, s, s) or (B * T, s, s)
    grid : TileGrid
    batch : int, optional
        ``B``; ``None`` infers it from the number of tiles and returns a 2-D image when it is 1.

    Returns
    -------
    ndarray (ny, nx), or (B, ny, nx) when ``batch`` is given or more than one image is stitched.
    """
    T = len(grid)
    n = tiles.shape[0]
    if n % T:
        raise ValueError(f"stitch_tiles: {n} tiles are not a whole number of {T}-tile images")
    B = n // T
    m, c = grid.margin, grid.core
    ny, nx = grid.shape
    cores = tiles[:, m:m + c, m:m + c].reshape(B, grid.n_rows, grid.n_cols, c, c)
    out = cores.transpose(0, 1, 3, 2, 4).reshape(B, grid.n_rows * c, grid.n_cols * c)[:, :ny, :nx]
    xp = array_namespace(tiles)
    out = xp.ascontiguousarray(out)
    if batch is None and B == 1:
        return out[0]
    return out


def per_tile(values, grid: TileGrid, *, batch: int = 1):
    """Broadcast per-tile values ``(B * T,)`` onto the stitched image grid: ``(B, ny, nx)``.

    The value of each pixel is that of the tile whose core holds it (the map :func:`stitch_tiles`
    would give for tiles filled with their value), without materialising the tile stack.
    """
    xp = array_namespace(values)
    c = grid.core
    ny, nx = grid.shape
    v = values.reshape(batch, grid.n_rows, 1, grid.n_cols, 1)
    full = xp.broadcast_to(v, (batch, grid.n_rows, c, grid.n_cols, c)).reshape(batch, grid.n_rows * c,
                                                                               grid.n_cols * c)
    return full[:, :ny, :nx]


def core_views(image, grid: TileGrid):
    """The tile cores of a batch as one ``(B * T, core, core)`` array (a copy where the image is
    not a whole number of cores: the part past the image is NaN), for per-tile statistics."""
    xp = array_namespace(image)
    img = image[None] if image.ndim == 2 else image
    B, ny, nx = img.shape
    c = grid.core
    H, W = grid.n_rows * c, grid.n_cols * c
    if (H, W) != (ny, nx):
        buf = xp.full((B, H, W), xp.nan, dtype=xp.float32 if img.dtype.kind != "f" else img.dtype)
        buf[:, :ny, :nx] = img
        img = buf
    return img.reshape(B, grid.n_rows, c, grid.n_cols, c).transpose(0, 1, 3, 2, 4).reshape(-1, c, c)


def host_origins(grid: TileGrid, xp):
    """``(T, 2)`` int64 core origins ``(y0, x0)`` on ``xp``'s device (uploaded once per call)."""
    return to_device(np.asarray(grid.origins, dtype=np.int64).reshape(-1, 2), xp, label="tile_origins")
