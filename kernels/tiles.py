"""Cut an image into equal, overlapping FFT tiles and stitch the tile cores back.

Every tile has the same padded shape, so a CCD becomes one ``(T, ty, tx)`` stack that the batched
ZOGY kernel transforms in one call (one cuFFT plan per shape on the GPU). Tiles that reach past the
image edge are filled with ``fill`` there.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._xp import array_namespace


@dataclass(frozen=True)
class TileGrid:
    """Geometry of a tiling of an ``(ny, nx)`` image.

    Attributes
    ----------
    shape : (ny, nx)
        Image shape.
    core : int
        Side of a tile core (pixels); cores partition the image.
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

    def __len__(self) -> int:
        return len(self.origins)

    def tile_of(self, x, y):
        """Index of the tile whose core contains pixel ``(x, y)`` (arrays allowed, numpy)."""
        import numpy as np

        ny, nx = self.shape
        ncol = -(-nx // self.core)
        ix = np.clip(np.floor(np.asarray(x) + 0.5).astype(int) // self.core, 0, ncol - 1)
        iy = np.clip(np.floor(np.asarray(y) + 0.5).astype(int) // self.core, 0, -(-ny // self.core) - 1)
        return iy * ncol + ix


def make_grid(shape, *, core: int, margin: int) -> TileGrid:
    """Tile an image of ``shape`` with square cores of side ``core`` (``0``: one tile, the image).

    The core is shrunk to the image size for small images so a 256x256 cutout is one tile.
    """
    ny, nx = int(shape[0]), int(shape[1])
    if core <= 0 or core >= max(ny, nx):
        core = max(ny, nx)
    origins = tuple((y0, x0) for y0 in range(0, ny, core) for x0 in range(0, nx, core))
    return TileGrid(shape=(ny, nx), core=core, margin=margin, origins=origins)


def cut_tiles(image, grid: TileGrid, *, fill=0.0):
    """Stack of padded tiles ``(T, core + 2 margin, core + 2 margin)``; outside the image is ``fill``."""
    xp = array_namespace(image)
    ny, nx = grid.shape
    m, c = grid.margin, grid.core
    side = c + 2 * m
    out = xp.full((len(grid), side, side), fill, dtype=image.dtype)
    for t, (y0, x0) in enumerate(grid.origins):
        ya, yb = max(y0 - m, 0), min(y0 + c + m, ny)
        xa, xb = max(x0 - m, 0), min(x0 + c + m, nx)
        out[t, ya - (y0 - m) : yb - (y0 - m), xa - (x0 - m) : xb - (x0 - m)] = image[ya:yb, xa:xb]
    return out


def stitch_tiles(tiles, grid: TileGrid):
    """Inverse of :func:`cut_tiles` for the cores: an ``(ny, nx)`` image from a tile stack."""
    xp = array_namespace(tiles)
    ny, nx = grid.shape
    m, c = grid.margin, grid.core
    out = xp.empty((ny, nx), dtype=tiles.dtype)
    for t, (y0, x0) in enumerate(grid.origins):
        h, w = min(c, ny - y0), min(c, nx - x0)
        out[y0 : y0 + h, x0 : x0 + w] = tiles[t, m : m + h, m : m + w]
    return out
