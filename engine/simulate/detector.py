"""The CCD of a simulated frame: bias structure, flat response, dark current, hot pixels, bad
columns, read-out (Poisson + read noise, bleeding, saturation), cosmic rays and calibration frames.

Raw model (per pixel, ADU)::

    e      = Poisson(dark_map * t + flat * (sky + sources)) + cosmic rays       (e-)
    e      = bleed(e, full_well)              # charge above the full well runs along the column
    raw    = round(bias_level + bias_rows[y] + bias_cols[x] + (e + N(0, read_noise)) / gain)
    raw    = SATURATE where e reached the full well, and min(raw, SATURATE) everywhere

so a perfect calibration is ``((raw - bias) * gain - dark_map * t) / flat`` (e-).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _render
from .instruments import InstrumentProfile

HOT_PIXEL_DTYPE = np.dtype([("y", "i4"), ("x", "i4"), ("dark", "f4")])  # dark current e-/s
BAD_COLUMN_DTYPE = np.dtype([("x", "i4"), ("y0", "i4"), ("y1", "i4"), ("response", "f4")])  # rows [y0, y1)
COSMIC_RAY_DTYPE = np.dtype([("id", "i4"), ("y", "i4"), ("x", "i4"), ("electrons", "f4")])


@dataclass(frozen=True)
class DetectorModel:
    """The true, static state of one CCD.

    Attributes
    ----------
    shape : (int, int)
    gain : float
        e-/ADU.
    read_noise : float
        e- RMS.
    bias_level : float
        ADU.
    saturation : float
        ADU (``SATURATE``); raw pixels never exceed it.
    full_well : float
        e-; charge above it bleeds along the column.
    dark_current : float
        e-/s of normal pixels.
    bias_rows : ndarray (ny,) float32, ADU
        Row-dependent bias offset (a gentle ramp).
    bias_cols : ndarray (nx,) float32, ADU
        Column-dependent bias offset (fixed pattern).
    flat : ndarray (ny, nx) float32
        Relative response, median exactly 1 (the usual normalisation of a master flat, so that a
        flat-fielded image is in the truth's e-): vignetting, pixel-to-pixel non-uniformity, bad
        columns.
    hot_pixels : structured ndarray, fields y, x (int), dark (e-/s)
    bad_columns : structured ndarray, fields x, y0, y1 (rows ``[y0, y1)``), response (flat value)
    """

    shape: tuple[int, int]
    gain: float
    read_noise: float
    bias_level: float
    saturation: float
    full_well: float
    dark_current: float
    bias_rows: np.ndarray
    bias_cols: np.ndarray
    flat: np.ndarray
    hot_pixels: np.ndarray
    bad_columns: np.ndarray

    def bias_image(self) -> np.ndarray:
        """True bias (ADU), ndarray (ny, nx) float32."""
        return (np.float32(self.bias_level) + self.bias_rows[:, None] + self.bias_cols[None, :]).astype(np.float32)

    def dark_map(self) -> np.ndarray:
        """True dark current (e-/s), ndarray (ny, nx) float32, hot pixels included."""
        d = np.full(self.shape, self.dark_current, dtype=np.float32)
        if self.hot_pixels.size:
            d[self.hot_pixels["y"], self.hot_pixels["x"]] = self.hot_pixels["dark"]
        return d

    def bad_pixel_mask(self) -> np.ndarray:
        """Bool (ny, nx): hot pixels and bad-column pixels."""
        m = np.zeros(self.shape, bool)
        if self.hot_pixels.size:
            m[self.hot_pixels["y"], self.hot_pixels["x"]] = True
        for b in self.bad_columns:
            m[b["y0"]: b["y1"], b["x"]] = True
        return m

    # -- frames ------------------------------------------------------------------------------
    def read_out(self, expected_e: np.ndarray, exptime: float, rng: np.random.Generator, *,
                 cosmic_rays: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Expose and read the CCD.

        Parameters
        ----------
        expected_e : ndarray (ny, nx) float64, e-
            Expected photo-electrons *before* the flat (sky + sources); not modified.
        exptime : float
            s (dark current accumulates over it).
        rng : numpy Generator
        cosmic_rays : structured ndarray (COSMIC_RAY_DTYPE), optional
            Charge deposited after the exposure's Poisson draw.

        Returns
        -------
        raw : ndarray (ny, nx) float32, ADU (integers, bias included, clipped at ``saturation``)
        saturated : ndarray (ny, nx) bool
            Pixels at the saturation level (stars' cores, bleed trails, saturated hot pixels).
        """
        lam = expected_e * self.flat
        lam += self.dark_map() * exptime
        np.maximum(lam, 0.0, out=lam)
        e = rng.poisson(lam).astype(np.float64)
        del lam
        if cosmic_rays is not None and cosmic_rays.size:
            np.add.at(e, (cosmic_rays["y"], cosmic_rays["x"]), cosmic_rays["electrons"].astype(np.float64))
        _render.bleed_columns(e, float(self.full_well))
        full = e >= self.full_well
        noise = rng.standard_normal(self.shape, dtype=np.float32)
        noise *= np.float32(self.read_noise)
        raw = e.astype(np.float32)
        del e
        raw += noise
        raw *= np.float32(1.0 / self.gain)
        raw += self.bias_image()
        np.round(raw, out=raw)
        raw[full] = self.saturation
        np.clip(raw, 0.0, self.saturation, out=raw)
        return raw, raw >= self.saturation

    def bias_frames(self, n: int, rng) -> np.ndarray:
        """``n`` raw bias frames (n, ny, nx) float32 ADU."""
        out = np.empty((n,) + self.shape, np.float32)
        b = self.bias_image()
        for k in range(n):
            out[k] = rng.standard_normal(self.shape, dtype=np.float32) * np.float32(self.read_noise / self.gain) + b
        np.round(out, out=out)
        return out

    def dark_frames(self, n: int, exptime: float, rng) -> np.ndarray:
        """``n`` raw dark frames of ``exptime`` s (n, ny, nx) float32 ADU (hot pixels show; no
        cosmic rays)."""
        return self._expose_frames(n, self.dark_map().astype(np.float64) * exptime, rng)

    def flat_frames(self, n: int, level_e: float, rng) -> np.ndarray:
        """``n`` raw dome flats at ``level_e`` e- per unit response (n, ny, nx) float32 ADU; short
        exposures, no dark current; bad columns show as low response."""
        return self._expose_frames(n, self.flat.astype(np.float64) * level_e, rng)

    def _expose_frames(self, n, lam, rng):
        out = np.empty((n,) + self.shape, np.float32)
        b = self.bias_image()
        for k in range(n):
            e = rng.poisson(lam).astype(np.float64)
            _render.bleed_columns(e, float(self.full_well))
            full = e >= self.full_well
            f = e.astype(np.float32)
            f += rng.standard_normal(self.shape, dtype=np.float32) * np.float32(self.read_noise)
            f *= np.float32(1.0 / self.gain)
            f += b
            np.round(f, out=f)
            f[full] = self.saturation
            np.clip(f, 0.0, self.saturation, out=f)
            out[k] = f
        return out


def make_detector(profile: InstrumentProfile, shape, rng: np.random.Generator, *,
                  defects: bool = True) -> DetectorModel:
    """Draw the static state of one CCD. ``defects=False`` gives no hot pixels and no bad columns
    (the flat keeps its smooth vignetting and PRNU)."""
    ny, nx = shape
    bias_rows = (np.linspace(-1.0, 1.0, ny) * rng.uniform(-3, 3)).astype(np.float32)
    bias_cols = rng.normal(0.0, 1.5, nx).astype(np.float32)
    yy = np.linspace(-1.0, 1.0, ny)[:, None]
    xx = np.linspace(-1.0, 1.0, nx)[None, :]
    flat = (1.0 - profile.vignetting * 0.5 * (xx * xx + yy * yy)).astype(np.float32)
    flat *= (1.0 + profile.prnu * rng.standard_normal(shape, dtype=np.float32))
    if defects:
        n_hot = rng.poisson(profile.hot_pixel_fraction * ny * nx)
        idx = rng.choice(ny * nx, size=min(n_hot, ny * nx), replace=False)
        hot = np.zeros(idx.size, HOT_PIXEL_DTYPE)
        hot["y"], hot["x"] = np.divmod(idx, nx)
        hot["dark"] = np.exp(rng.uniform(math.log(20.0), math.log(2000.0), idx.size))
        n_bad = rng.poisson(profile.bad_columns_per_1000 * nx / 1000.0)
        cols = rng.choice(nx, size=min(n_bad, nx), replace=False)
        bad = np.zeros(cols.size, BAD_COLUMN_DTYPE)
        bad["x"] = cols
        partial = rng.uniform(size=cols.size) < 0.5
        bad["y0"] = np.where(partial, rng.integers(0, max(ny // 2, 1), cols.size), 0)
        bad["y1"] = ny
        bad["response"] = rng.uniform(0.05, 0.5, cols.size)
        for b in bad:
            flat[b["y0"]: b["y1"], b["x"]] *= b["response"]
    else:
        hot = np.zeros(0, HOT_PIXEL_DTYPE)
        bad = np.zeros(0, BAD_COLUMN_DTYPE)
    # median 1, as a calibrate stage normalises its master flat, so calibrated fluxes are the truth
    flat /= np.float32(np.median(flat))
    return DetectorModel(shape=(int(ny), int(nx)), gain=profile.gain, read_noise=profile.read_noise,
                         bias_level=profile.bias_level, saturation=profile.saturation,
                         full_well=profile.full_well, dark_current=profile.dark_current,
                         bias_rows=bias_rows, bias_cols=bias_cols, flat=flat, hot_pixels=hot,
                         bad_columns=bad)


def make_cosmic_rays(shape, exptime: float, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Cosmic-ray hits of one exposure as a pixel list (COSMIC_RAY_DTYPE, one row per pixel).

    ``rate`` events per megapixel per 100 s. 30 % are compact hits (1-4 px, 1000-20000 e- in
    total), 70 % straight tracks (length log-normal, median 6 px, up to 60; 300-2000 e- per pixel
    of path, sharp edges)."""
    ny, nx = shape
    n = rng.poisson(rate * ny * nx / 1e6 * exptime / 100.0)
    if n == 0:
        return np.zeros(0, COSMIC_RAY_DTYPE)
    ids, fidx, charge = [], [], []
    x0 = rng.uniform(0, nx, n)
    y0 = rng.uniform(0, ny, n)
    compact = rng.uniform(size=n) < 0.3
    for k in range(n):
        if compact[k]:
            npx = rng.integers(1, 5)
            dx = np.r_[0, rng.integers(-1, 2, npx - 1)]
            dy = np.r_[0, rng.integers(-1, 2, npx - 1)]
            xs = np.clip(np.floor(x0[k]).astype(int) + dx, 0, nx - 1)
            ys = np.clip(np.floor(y0[k]).astype(int) + dy, 0, ny - 1)
            q = rng.dirichlet(np.ones(npx)) * np.exp(rng.uniform(math.log(1000), math.log(20000)))
        else:
            length = min(rng.lognormal(math.log(6.0), 0.8), 60.0)
            ang = rng.uniform(0, np.pi)
            m = max(int(length * 4), 2)
            t = np.linspace(0, length, m)
            xs = np.clip(np.floor(x0[k] + t * math.cos(ang)).astype(int), 0, nx - 1)
            ys = np.clip(np.floor(y0[k] + t * math.sin(ang)).astype(int), 0, ny - 1)
            q = np.full(m, rng.uniform(300, 2000) * length / m) * rng.uniform(0.7, 1.3, m)
        f = ys * nx + xs
        u, inv = np.unique(f, return_inverse=True)
        ids.append(np.full(u.size, k))
        fidx.append(u)
        charge.append(np.bincount(inv, weights=q))
    f = np.concatenate(fidx)
    out = np.zeros(f.size, COSMIC_RAY_DTYPE)
    out["id"] = np.concatenate(ids)
    out["y"], out["x"] = np.divmod(f, nx)
    out["electrons"] = np.concatenate(charge)
    return out
