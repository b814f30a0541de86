"""Batched difference-imaging chain on numpy and cupy: ms per CCD pair per stage, pairs/s, peak GPU
memory, against the plain references (rfft2 of the batch; unfused single-tile ZOGY).

One command on a GPU machine (cupy + numba-cuda installed)::

    python bench/gpu.py       # 4096x4096: cupy at batch 1 4 8 16, numpy at batch 1; writes bench/gpu.json

(``--numpy-batches 1 4 8 16`` times numpy at every batch too: minutes on a CPU), and on a CPU, small,
to prove the script::

    python bench/gpu.py --size 1024 --numpy-batches 1 4 --numpy-repeat 2 --out bench/gpu-cpu-smoke.json

The kernel chain through the Numba CUDA kernels, checked against the CPU kernels in the CUDA
simulator (no GPU needed, ~20 s)::

    NUMBA_ENABLE_CUDASIM=1 python bench/gpu.py --sim-check

What is timed (the kernel chain of one batch of ``B`` same-shape pairs; every stage takes and
returns device arrays, nothing goes back to the host until the candidate table):

``upload``      host -> device copy of the packed raw science / reference / variance / mask planes
``calibrate``   (raw - bias) / flat * gain, variance, saturation and bad-pixel mask
``align``       science -> reference coordinate map on a 64 px grid (the WCS stand-in: an affine
                map), spline-interpolated to every pixel, Lanczos-3 of image + variance and the
                mask (Numba CUDA kernels on cupy, the Numba CPU kernels on numpy)
``background``  mesh sky of science and aligned reference (sep on numpy, the xp reference on cupy)
``psf``         31x31 stamps of known stars in both images, one batched Fourier shift, per-tile
                mean PSF of every tile of every pair as one matrix product (no Python loop over
                tiles), flux ratio F_r from the same stamps
``zogy``        masks, tile cutting (one strided copy), batched float32 ZOGY (D, S, S_corr with
                source and astrometric noise) over all tiles of all pairs, stitching, grown mask
``detect``      signed peaks of S_corr above 5 sigma with deduplication (Numba CUDA kernel on cupy,
                the xp reference on numpy), sub-pixel refinement
``cutouts``     63x63 science/reference/difference triplets of every candidate (one CUDA launch)

``compute`` is the sum of the stages after ``upload`` (the upload overlaps compute in a
pipelined run: see ``pipelined_pairs_per_s``, measured through
:class:`nightsift.engine.backend.UploadPipeline`). The references: ``fft_floor`` is one
``rfft2`` of the ``(B, ny, nx)`` float32 batch; ``plain_zogy`` is :func:`nightsift.kernels.zogy.zogy`
on the whole ``(B, ny, nx)`` stack as single tiles (one PSF per pair, float32, unfused).

With both backends, ``--check`` (on by default) runs the chain once more at batch 1 on each with
the same background method and compares S_corr (relative L2) and the candidate lists (positions
within 0.01 px), the GPU acceptance test of issue #5.

Differences from the production stages, on purpose: star positions come from the simulation
(the PSF stage's star finding and cleaning are not timed), the coordinate map is an affine stand-in
for the WCS, the PSF is a per-tile mean (no clipping). The simulation is a fast Gaussian-star
scene (not nightsift.engine.simulate), generated once per shape on the host.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from nightsift.engine import backend as bk
from nightsift.engine.config import Config
from nightsift.engine.records import UNUSABLE, MaskBits
from nightsift.kernels import fft_module, ndimage_module, is_cupy
from nightsift.kernels import psf as kpsf
from nightsift.kernels.background import background
from nightsift.kernels.cutouts import gather_triplets
from nightsift.kernels.peaks import find_peaks, refine_peaks
from nightsift.kernels.resample import interpolate_coordinate_map, lanczos_resample, resample_mask
from nightsift.kernels.tiles import cut_tiles, make_grid, stitch_tiles
from nightsift.kernels.zogy import zogy

STAGES = ("upload", "calibrate", "align", "background", "psf", "zogy", "detect", "cutouts")
GAIN, READ_NOISE_E, SATURATE_ADU, BIAS_ADU = 1.6, 6.0, 60000.0, 500.0
MAP_STEP = 64


# --------------------------------------------------------------------------------------------
# simulated pairs (host, numpy)
# --------------------------------------------------------------------------------------------
@dataclass
class HostBatch:
    """A batch of ``B`` pairs on the host. ``planes`` packs (raw science ADU, reference e-,
    reference variance e-^2, reference mask as float) as ``(4, B, ny, nx)`` float32, one upload."""

    planes: np.ndarray
    bias: np.ndarray  # (ny, nx) float32 ADU
    flat: np.ndarray  # (ny, nx) float32
    bad: np.ndarray  # (ny, nx) uint16 mask of the science CCD
    affine: np.ndarray  # (B, 6): x_ref = a0 + a1 x + a2 y, y_ref = a3 + a4 x + a5 y
    star_x: np.ndarray  # (B, n_psf) science pixel positions of PSF stars
    star_y: np.ndarray
    truth: list  # per distinct pair: dict of star x, y, flux and transient x, y (diagnostics)

    @property
    def batch(self) -> int:
        return self.planes.shape[1]


def _render(img, x, y, flux, sigma, half=10):
    """Add Gaussian stars (unit-sum pixel-sampled) to ``img`` in place."""
    ny, nx = img.shape
    off = np.arange(-half, half + 1)
    xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
    gx = np.exp(-((xi[:, None] + off[None] - x[:, None]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((yi[:, None] + off[None] - y[:, None]) ** 2) / (2 * sigma**2))
    st = gy[:, :, None] * gx[:, None, :]
    st *= (flux / st.sum(axis=(1, 2)))[:, None, None]
    rows = yi[:, None, None] + off[None, :, None] + 0 * off[None, None, :]
    cols = xi[:, None, None] + 0 * off[None, :, None] + off[None, None, :]
    ok = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    np.add.at(img, (rows[ok], cols[ok]), st[ok].astype(img.dtype))


def simulate_batch(shape, batch, *, seed=1, n_psf=640, n_unique=2) -> HostBatch:
    """``batch`` pairs (``n_unique`` distinct ones, repeated) of a Gaussian-star scene."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    bias = (BIAS_ADU + 3 * np.sin(xx / 97.0)).astype(np.float32)
    flat = (1 + 0.03 * (xx / nx - 0.5) + 0.02 * (yy / ny - 0.5)).astype(np.float32)
    bad = np.zeros(shape, np.uint16)
    bad[:, rng.integers(0, nx, 2)] = MaskBits.BAD
    uniq = []
    for _ in range(min(batch, n_unique)):
        n_st = max(50, int(4e-4 * ny * nx))
        x = rng.uniform(-8, nx + 8, n_st)
        y = rng.uniform(-8, ny + 8, n_st)
        flux = 300 * (1 - rng.uniform(0, 0.999, n_st)) ** (-1.2)
        a = np.array([0.37 + rng.normal(0, 0.2), 1 + 1e-4, -2e-4, -0.21 + rng.normal(0, 0.2), 2e-4, 1 + 1e-4])
        sci = np.full(shape, 800.0, np.float32)
        _render(sci, x, y, flux, 1.5)
        edge = min(40, nx // 4, ny // 4)
        tx, ty = rng.uniform(edge, nx - edge, 20), rng.uniform(edge, ny - edge, 20)
        _render(sci, tx, ty, np.full(20, 8000.0), 1.5)  # transients
        sci += rng.normal(size=shape).astype(np.float32) * np.sqrt(sci + READ_NOISE_E**2)
        raw = np.minimum(sci / GAIN * flat + bias, SATURATE_ADU).astype(np.float32)
        raw[bad != 0] = bias[bad != 0]
        xr, yr = a[0] + a[1] * x + a[2] * y, a[3] + a[4] * x + a[5] * y
        ref_model = np.full(shape, 3000.0, np.float32)
        _render(ref_model, xr, yr, 1.3 * flux, 1.15)
        ref_var = (ref_model / 4 + 2.0).astype(np.float32)  # a 4-epoch coadd
        ref = (ref_model + rng.normal(size=shape).astype(np.float32) * np.sqrt(ref_var)).astype(np.float32)
        ref_mask = np.zeros(shape, np.float32)
        ref_mask[rng.integers(0, ny, 3), :] = MaskBits.BAD
        # PSF stars: unsaturated, away from the edges and the bad columns, no neighbour above 1 %
        # of their flux within 20 px (the production PSF stage selects and cleans its stars)
        inside = (x > 20) & (x < nx - 20) & (y > 20) & (y < ny - 20) & (flux < 6e5)
        bad_cols = np.flatnonzero(bad[0])
        if len(bad_cols):
            inside &= np.abs(x[:, None] - bad_cols[None]).min(axis=1) > 18
        cand = np.flatnonzero(inside)
        near = np.hypot(x[cand, None] - x[None], y[cand, None] - y[None]) < 20
        near &= flux[None] > 0.01 * flux[cand, None]
        near[np.arange(len(cand)), cand] = False
        inside[cand[near.any(axis=1)]] = False
        if (inside & (flux > 2e4)).sum() >= 5:  # bright ones when there are enough (small images)
            inside &= flux > 2e4
        if not inside.any():  # tiny images: any star inside, else the centre (the chain still runs)
            inside = (x > 16) & (x < nx - 16) & (y > 16) & (y < ny - 16)
        order = np.argsort(-flux[inside])[:n_psf]
        sx, sy = x[inside][order], y[inside][order]
        if len(sx) == 0:
            sx, sy = np.array([nx / 2]), np.array([ny / 2])
        if len(sx) < n_psf:  # small images: repeat stars to keep the array rectangular
            k = np.resize(np.arange(len(sx)), n_psf)
            sx, sy = sx[k], sy[k]
        uniq.append((np.stack([raw, ref, ref_var, ref_mask]), a, sx, sy,
                     {"x": x, "y": y, "flux": flux, "tx": tx, "ty": ty}))
    idx = [b % len(uniq) for b in range(batch)]
    planes = np.stack([uniq[i][0] for i in idx], axis=1)
    return HostBatch(planes=planes, bias=bias, flat=flat, bad=bad,
                     affine=np.stack([uniq[i][1] for i in idx]),
                     star_x=np.stack([uniq[i][2] for i in idx]), star_y=np.stack([uniq[i][3] for i in idx]),
                     truth=[u[4] for u in uniq])


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
class StageTimer:
    """Wall time per stage with the device synchronised at both ends (and NVTX ranges on cupy,
    for Nsight Systems: ``nsys profile python bench/gpu.py ...``)."""

    def __init__(self, xp):
        self.xp = xp
        self.t = {s: 0.0 for s in STAGES}
        self._nvtx = None
        if is_cupy(xp):
            try:
                from cupy.cuda import nvtx

                self._nvtx = nvtx
            except Exception:  # pragma: no cover - cupy built without NVTX
                self._nvtx = None

    def sync(self):
        if is_cupy(self.xp):
            self.xp.cuda.get_current_stream().synchronize()

    @contextlib.contextmanager
    def __call__(self, name):
        self.sync()
        if self._nvtx:
            self._nvtx.RangePush(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            if self._nvtx:
                self._nvtx.RangePop()


# --------------------------------------------------------------------------------------------
# batched helpers (checked against kernels.tiles in self_check)
# --------------------------------------------------------------------------------------------
def cut_tiles_batched(xp, images, grid, fill):
    """(B, ny, nx) -> (B * T, side, side) tiles of a regular grid in one strided copy; ``fill``
    outside the images (as kernels.tiles.cut_tiles, per image)."""
    B, ny, nx = images.shape
    c, m = grid.core, grid.margin
    nty, ntx = -(-ny // c), -(-nx // c)
    side = c + 2 * m
    pad = xp.full((B, nty * c + 2 * m, ntx * c + 2 * m), fill, dtype=images.dtype)
    pad[:, m : m + ny, m : m + nx] = images
    sb, sy, sx = pad.strides
    view = xp.lib.stride_tricks.as_strided(pad, shape=(B, nty, ntx, side, side),
                                           strides=(sb, c * sy, c * sx, sy, sx))
    return xp.ascontiguousarray(view).reshape(B * nty * ntx, side, side)


def stitch_batched(xp, tiles, grid, batch):
    """Inverse of :func:`cut_tiles_batched` for the cores: (B * T, side, side) -> (B, ny, nx)."""
    ny, nx = grid.shape
    c, m = grid.core, grid.margin
    nty, ntx = -(-ny // c), -(-nx // c)
    cores = tiles.reshape(batch, nty, ntx, c + 2 * m, c + 2 * m)[:, :, :, m : m + c, m : m + c]
    full = cores.transpose(0, 1, 3, 2, 4).reshape(batch, nty * c, ntx * c)
    return xp.ascontiguousarray(full[:, :ny, :nx])


def _gather_stamps(xp, images, img, x, y, size):
    """(n, size, size) stamps of ``images[img]`` centred on rint(x, y); edges clipped (stars are
    chosen away from the edges)."""
    B, ny, nx = images.shape
    h = size // 2
    off = xp.arange(-h, h + 1)
    rows = xp.clip(xp.rint(y).astype(xp.int64)[:, None] + off, 0, ny - 1)
    cols = xp.clip(xp.rint(x).astype(xp.int64)[:, None] + off, 0, nx - 1)
    return images[img[:, None, None], rows[:, :, None], cols[:, None, :]]


def tile_psfs(xp, images, star_x, star_y, grid, size):
    """Per-tile mean PSF of every tile of every pair: ``(B * T, size, size)`` float64, unit sum.

    One batched Fourier shift of all star stamps, then a ``(B * T, n) @ (n, size**2)`` product with
    the star-to-tile membership: the flux-weighted mean of the normalised stars (sum of stamps over
    sum of fluxes); tiles without stars take their pair's mean PSF. Also returns the
    stamps' aperture fluxes ``(B, n_psf)`` (for the flux ratio).
    """
    B = images.shape[0]
    n_psf = star_x.shape[1]
    T = len(grid)
    img = xp.repeat(xp.arange(B), n_psf)
    x, y = star_x.reshape(-1), star_y.reshape(-1)
    st = _gather_stamps(xp, images, img, x, y, size).astype(xp.float64)
    dx, dy = x - xp.rint(x), y - xp.rint(y)
    sh = kpsf.fourier_shift(st, -dx, -dy)
    flux = sh.sum(axis=(1, 2))
    good = (flux > 0).astype(xp.float64)
    c = grid.core
    ntx = -(-grid.shape[1] // c)
    tile = (xp.clip(xp.rint(y).astype(xp.int64) // c, 0, -(-grid.shape[0] // c) - 1) * ntx
            + xp.clip(xp.rint(x).astype(xp.int64) // c, 0, ntx - 1))
    member = xp.zeros((B * T, B * n_psf))
    member[img * T + tile, xp.arange(B * n_psf)] = good
    # flux-weighted mean of the flux-normalised stars = sum of stamps / sum of fluxes (S/N weights)
    flat_sh = sh.reshape(B * n_psf, -1)
    psf = (member @ flat_sh).reshape(B * T, size, size)
    tot = member @ flux
    pair = member.reshape(B, T, -1).sum(axis=1)
    pair_mean = (pair @ flat_sh).reshape(B, size, size) / xp.maximum(pair @ flux, 1e-30)[:, None, None]
    psf = xp.where((tot > 0)[:, None, None], psf / xp.where(tot > 0, tot, 1.0)[:, None, None],
                   xp.repeat(pair_mean, T, axis=0))
    # taper the noisy far wings (cos^2 from 7 to 11 px): a bright star times PSF-wing noise is
    # what leaves residuals in D (the production stage cleans and crops its PSFs likewise)
    h = size // 2
    r = xp.hypot(*xp.meshgrid(xp.arange(-h, h + 1.0), xp.arange(-h, h + 1.0)))
    taper = xp.where(r <= 7, 1.0, xp.where(r >= 11, 0.0, xp.cos(0.5 * xp.pi * (r - 7) / 4) ** 2))
    psf = psf * taper[None]
    psf /= psf.sum(axis=(1, 2))[:, None, None]
    return psf, flux.reshape(B, n_psf)


# --------------------------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------------------------
@dataclass
class ChainOut:
    S_corr: object  # (B, ny, nx) float32 on the device
    peaks: object  # kernels.peaks.Peaks
    x: object
    y: object
    triplets: object  # (n, 63, 63, 3) float32


def run_chain(xp, hb: HostBatch, cfg: Config, timer: StageTimer, *, background_method="auto", zogy_chunk=0,
              dev_planes=None, cuda_kernels=None, cutout_size=None):
    """One batch through the kernel chain; returns device outputs. ``dev_planes``: already
    uploaded ``(4, B, ny, nx)`` planes (pipelined runs). ``cuda_kernels``: use the Numba CUDA
    kernels (default: on cupy; True with numpy arrays runs them in the CUDA simulator).
    ``cutout_size``: override ``cfg.cutout.size`` (small in the simulator check)."""
    B = hb.batch
    cuda_k = is_cupy(xp) if cuda_kernels is None else bool(cuda_kernels)
    ny, nx = hb.planes.shape[-2:]
    with timer("upload"):
        planes = dev_planes if dev_planes is not None else xp.asarray(hb.planes)
        bias, flat, bad = xp.asarray(hb.bias), xp.asarray(hb.flat), xp.asarray(hb.bad)

    with timer("calibrate"):
        raw = planes[0]
        sci = (raw - bias) / flat * np.float32(GAIN)
        sci_var = xp.maximum(sci, 0) + np.float32(READ_NOISE_E**2)
        sat = xp.where(raw >= np.float32(SATURATE_ADU), np.uint16(MaskBits.SAT), np.uint16(0))
        sci_mask = sat | bad[None]

    with timer("align"):
        ref3 = xp.stack([planes[1], planes[2]], axis=1)  # (B, 2, ny, nx): image + variance share weights
        ref_mask = planes[3].astype(xp.uint16)
        ncy, ncx = -(-(ny - 1) // MAP_STEP) + 1, -(-(nx - 1) // MAP_STEP) + 1
        gy, gx = np.mgrid[0:ncy, 0:ncx].astype(np.float64) * MAP_STEP
        aligned = xp.empty((B, 2, ny, nx), dtype=xp.float32)
        al_mask = xp.empty((B, ny, nx), dtype=xp.uint16)
        for b in range(B):
            a = hb.affine[b]
            cx, cy = a[0] + a[1] * gx + a[2] * gy, a[3] + a[4] * gx + a[5] * gy
            xs, ys = interpolate_coordinate_map(xp.asarray(cx), xp.asarray(cy), MAP_STEP, (ny, nx))
            if cuda_k:
                from nightsift.kernels._cuda.resample import lanczos_resample_cuda, resample_mask_cuda

                aligned[b] = lanczos_resample_cuda(ref3[b], xs, ys, a=3, fill=0.0)
                al_mask[b] = resample_mask_cuda(ref_mask[b], xs, ys, a=3, no_data_bit=int(MaskBits.NO_DATA))
            else:
                aligned[b] = lanczos_resample(ref3[b], xs, ys, a=3, fill=0.0)
                al_mask[b] = resample_mask(ref_mask[b], xs, ys, a=3, no_data_bit=int(MaskBits.NO_DATA))
            del xs, ys
        del ref3

    with timer("background"):
        sky_s = xp.empty_like(sci)
        sky_r = xp.empty_like(sci)
        for b in range(B):
            sky_s[b] = background(sci[b], box=64, mask=(sci_mask[b] & UNUSABLE) != 0, method=background_method)[0]
            sky_r[b] = background(aligned[b, 0], box=64, mask=(al_mask[b] & UNUSABLE) != 0,
                                  method=background_method)[0]
        N = sci - sky_s
        R = aligned[:, 0] - sky_r
        del sky_s, sky_r

    grid = make_grid((ny, nx), core=cfg.subtract.tile_size, margin=cfg.subtract.tile_margin)
    T = len(grid)
    size = cfg.psf.stamp_size
    with timer("psf"):
        sx, sy = xp.asarray(hb.star_x), xp.asarray(hb.star_y)
        psf_n, flux_n = tile_psfs(xp, N, sx, sy, grid, size)
        psf_r, flux_r = tile_psfs(xp, R, sx, sy, grid, size)
        ok = (flux_n > 0) & (flux_r > 0)
        ratio = xp.where(ok, flux_r / xp.where(ok, flux_n, 1.0), xp.nan)
        F_r = xp.nanmedian(ratio, axis=1)  # (B,)

    with timer("zogy"):
        unusable = ((sci_mask | al_mask) & UNUSABLE) != 0
        N = xp.where(unusable, 0, N)
        R = xp.where(unusable, 0, R)
        med_vn = xp.median(sci_var[:, ::8, ::8].reshape(B, -1), axis=1)[:, None, None]
        med_vr = xp.median(aligned[:, 1, ::8, ::8].reshape(B, -1), axis=1)[:, None, None]
        V_N = xp.where(unusable | ~xp.isfinite(sci_var), med_vn, sci_var).astype(xp.float32)
        V_R = xp.where(unusable | ~xp.isfinite(aligned[:, 1]), med_vr, aligned[:, 1]).astype(xp.float32)
        ts = grid.tile_shape
        chunk = B if zogy_chunk <= 0 else min(zogy_chunk, B)
        S_corr = xp.empty((B, ny, nx), dtype=xp.float32)
        diff = xp.empty((B, ny, nx), dtype=xp.float32)
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            nb = b1 - b0
            tN = cut_tiles_batched(xp, N[b0:b1], grid, 0.0)
            tR = cut_tiles_batched(xp, R[b0:b1], grid, 0.0)
            tVN = cut_tiles_batched(xp, V_N[b0:b1], grid, 0.0)
            tVR = cut_tiles_batched(xp, V_R[b0:b1], grid, 0.0)
            # outside the image: the pair's median variance (as the subtract stage)
            out_n = cut_tiles_batched(xp, xp.zeros((nb, ny, nx), xp.float32), grid, 1.0) > 0
            tVN = xp.where(out_n, xp.repeat(med_vn[b0:b1], T, axis=0), tVN)
            tVR = xp.where(out_n, xp.repeat(med_vr[b0:b1], T, axis=0), tVR)
            del out_n
            tPn = kpsf.embed_psf(psf_n[b0 * T : b1 * T].astype(xp.float32), ts)
            tPr = kpsf.embed_psf(psf_r[b0 * T : b1 * T].astype(xp.float32), ts)
            sig_n = xp.sqrt(xp.median(tVN.reshape(nb * T, -1), axis=1))
            sig_r = xp.sqrt(xp.median(tVR.reshape(nb * T, -1), axis=1))
            res = zogy(tN, tR, tPn, tPr, tVN, tVR, sigma_n=sig_n, sigma_r=sig_r,
                       F_r=xp.repeat(F_r[b0:b1], T), astrometric_rms=(cfg.subtract.default_astrometric_rms,) * 2,
                       dtype=np.float32)
            S_corr[b0:b1] = stitch_batched(xp, res.S_corr, grid, nb)
            diff[b0:b1] = stitch_batched(xp, res.D / res.F_D[:, None, None], grid, nb)
            del tN, tR, tVN, tVR, tPn, tPr, res
        excluded = unusable
        if cfg.subtract.mask_grow > 0:
            ndi = ndimage_module(xp)
            st = xp.zeros((3, 3, 3), dtype=bool)
            st[1] = True  # grow within each image, never across the batch
            excluded = ndi.binary_dilation(unusable, structure=st, iterations=cfg.subtract.mask_grow)
        S_corr[excluded] = 0

    with timer("detect"):
        peaks = find_peaks(S_corr, threshold=cfg.detect.threshold, radius=cfg.detect.dedup_radius,
                           excluded=excluded, method="cuda" if cuda_k else "reference")
        x, y = refine_peaks(S_corr, peaks)

    with timer("cutouts"):
        trip, _ = gather_triplets(N, R, diff, peaks.image, x, y, size=cutout_size or cfg.cutout.size,
                                  method="cuda" if cuda_k else "reference")
    return ChainOut(S_corr=S_corr, peaks=peaks, x=x, y=y, triplets=trip)


def plain_zogy(xp, images, psf_n, psf_r):
    """Unfused single-tile ZOGY of a (B, ny, nx) stack, float32: the reference the chain is read against."""
    B, ny, nx = images.shape
    Pn = kpsf.embed_psf(xp.repeat(psf_n[None], B, axis=0), (ny, nx))
    Pr = kpsf.embed_psf(xp.repeat(psf_r[None], B, axis=0), (ny, nx))
    V = xp.full_like(images, 900.0)
    return zogy(images, images, Pn, Pr, V, V, sigma_n=30.0, sigma_r=30.0, F_r=1.0, astrometric_rms=(0.02, 0.02),
                dtype=np.float32)


def _gauss_psf(size, sigma):
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return (p / p.sum()).astype(np.float32)


def _median_time(fn, xp, repeat):
    ts = []
    for _ in range(repeat):
        if is_cupy(xp):
            xp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        out = fn()
        if is_cupy(xp):
            xp.cuda.get_current_stream().synchronize()
        ts.append(time.perf_counter() - t0)
        del out
    return float(np.median(ts))


def self_check(xp, cfg, shape):
    """The bench's batched tile helpers equal kernels.tiles on a small batch (cheap, every run)."""
    rng = np.random.default_rng(0)
    ny, nx = min(shape[0], 300), min(shape[1], 260)
    grid = make_grid((ny, nx), core=min(cfg.subtract.tile_size, 128), margin=16)
    imgs = xp.asarray(rng.normal(size=(2, ny, nx)).astype(np.float32))
    t = cut_tiles_batched(xp, imgs, grid, 0.0)
    for b in range(2):
        want = cut_tiles(imgs[b], grid, fill=0.0)
        assert bool((t[b * len(grid) : (b + 1) * len(grid)] == want).all()), "cut_tiles_batched != cut_tiles"
        assert bool((stitch_batched(xp, t, grid, 2)[b] == stitch_tiles(want, grid)).all()), "stitch mismatch"


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def bench_backend(name, xp, args, cfg, shape):
    rows = []
    self_check(xp, cfg, shape)
    for B in args.batches:
        hb = simulate_batch(shape, B, seed=args.seed)
        row = {"backend": name, "batch": B, "shape": list(shape)}
        try:
            if is_cupy(xp):
                xp.get_default_memory_pool().free_all_blocks()
            # warm-up: Numba compilation, cuFFT plans, pool growth
            run_chain(xp, hb, cfg, StageTimer(xp), zogy_chunk=args.zogy_chunk)
            times = []
            for _ in range(args.repeat):
                tm = StageTimer(xp)
                out = run_chain(xp, hb, cfg, tm, zogy_chunk=args.zogy_chunk)
                times.append(tm.t)
            med = {s: float(np.median([t[s] for t in times])) for s in STAGES}
            row["stage_ms_per_pair"] = {s: 1e3 * med[s] / B for s in STAGES}
            compute = sum(med[s] for s in STAGES if s != "upload")
            row["compute_ms_per_pair"] = 1e3 * compute / B
            row["total_ms_per_pair"] = 1e3 * (compute + med["upload"]) / B
            row["pairs_per_s"] = B / (compute + med["upload"])
            row["candidates_per_pair"] = len(out.peaks) / B
            del out
            mem = bk.memory_stats(xp)
            row["peak_gpu_pool_bytes"] = mem["pool_bytes"] if is_cupy(xp) else None
            # references on the same batch
            imgs = xp.asarray(hb.planes[1])
            fft = fft_module(xp)
            fft.rfft2(imgs, axes=(-2, -1))  # plan
            row["fft_floor_ms_per_pair"] = 1e3 * _median_time(lambda: fft.rfft2(imgs, axes=(-2, -1)), xp,
                                                              max(3, args.repeat)) / B
            pn, pr = xp.asarray(_gauss_psf(cfg.psf.stamp_size, 1.5)), xp.asarray(_gauss_psf(cfg.psf.stamp_size, 1.15))
            plain_zogy(xp, imgs, pn, pr)
            row["plain_zogy_ms_per_pair"] = 1e3 * _median_time(lambda: plain_zogy(xp, imgs, pn, pr), xp,
                                                                args.repeat) / B
            del imgs
            row["ratio_to_plain_zogy"] = row["compute_ms_per_pair"] / row["plain_zogy_ms_per_pair"]
            row["ratio_to_fft_floor"] = row["compute_ms_per_pair"] / row["fft_floor_ms_per_pair"]
            if args.pipeline_batches > 0:
                row["pipelined_pairs_per_s"] = pipelined(xp, hb, cfg, args)
            if is_cupy(xp):
                row["peak_gpu_pool_bytes"] = max(row["peak_gpu_pool_bytes"], bk.memory_stats(xp)["pool_bytes"])
        except Exception as exc:  # e.g. cupy OutOfMemoryError at a large batch: record it and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(_format_row(row), flush=True)
        del hb
    return rows


def pipelined(xp, hb, cfg, args):
    """Pairs/s over ``pipeline_batches`` batches streamed through UploadPipeline (upload of batch
    k+1 overlapping compute of batch k)."""
    pipe = bk.UploadPipeline(xp, hb.planes.shape, np.float32)
    t0 = time.perf_counter()
    n = 0
    for dev in pipe.run(hb.planes for _ in range(args.pipeline_batches)):
        with pipe.compute:
            run_chain(xp, hb, cfg, StageTimer(xp), zogy_chunk=args.zogy_chunk, dev_planes=dev)
        n += hb.batch
    pipe.synchronize()
    return n / (time.perf_counter() - t0)


def check_backends(cfg, shape, seed):
    """numpy vs cupy on the same pair (batch 1, same background method): S_corr relative L2 and
    candidate lists (positions within 0.01 px)."""
    import cupy

    hb = simulate_batch(shape, 1, seed=seed)
    outs = {}
    for name, xp in (("numpy", np), ("cupy", cupy)):
        o = run_chain(xp, hb, cfg, StageTimer(xp), background_method="reference")
        outs[name] = (bk.to_host(o.S_corr), bk.to_host(o.x), bk.to_host(o.y), bk.to_host(o.peaks.sign))
    s_np, s_cp = outs["numpy"][0].astype(np.float64), outs["cupy"][0].astype(np.float64)
    rel_l2 = float(np.linalg.norm(s_cp - s_np) / np.linalg.norm(s_np))
    same_n = len(outs["numpy"][1]) == len(outs["cupy"][1])
    max_dpos = float("nan")
    if same_n and len(outs["numpy"][1]):
        max_dpos = float(max(np.abs(outs["numpy"][1] - outs["cupy"][1]).max(),
                             np.abs(outs["numpy"][2] - outs["cupy"][2]).max()))
    identical = same_n and bool(np.array_equal(outs["numpy"][3], outs["cupy"][3])) and \
        (len(outs["numpy"][1]) == 0 or max_dpos < 0.01)
    return {"shape": list(shape), "scorr_rel_l2": rel_l2, "n_candidates_numpy": len(outs["numpy"][1]),
            "n_candidates_cupy": len(outs["cupy"][1]), "max_position_diff_px": max_dpos,
            "candidates_identical": identical, "pass": bool(rel_l2 < 1e-4 and identical)}


def simulator_check(cfg, seed):
    """The chain through the Numba CUDA kernels (in the CUDA simulator, numpy arrays) equals the
    chain through the CPU kernels on a tiny batch: S_corr, candidates and cutouts."""
    from nightsift.kernels._cuda import cuda_mode

    if cuda_mode() != "simulator":
        raise SystemExit("--sim-check needs NUMBA_ENABLE_CUDASIM=1 in the environment")
    hb = simulate_batch((64, 72), 2, seed=seed)
    t0 = time.perf_counter()
    a = run_chain(np, hb, cfg, StageTimer(np), cuda_kernels=False, cutout_size=7)
    b = run_chain(np, hb, cfg, StageTimer(np), cuda_kernels=True, cutout_size=7)
    res = {"shape": [2, 64, 72], "scorr_max_abs_diff": float(np.abs(a.S_corr - b.S_corr).max()),
           "n_candidates": [len(a.peaks), len(b.peaks)],
           "positions_equal": bool(np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)),
           "cutouts_equal": bool(np.array_equal(a.triplets, b.triplets, equal_nan=True)),
           "seconds": round(time.perf_counter() - t0, 1)}
    res["pass"] = bool(res["scorr_max_abs_diff"] < 1e-5 and res["n_candidates"][0] == res["n_candidates"][1]
                       and res["positions_equal"] and res["cutouts_equal"])
    print("CUDA-simulator chain vs CPU chain:", json.dumps(res))
    return res


def _format_row(r):
    head = f"{r['backend']:>6} B={r['batch']:<3}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    st = " ".join(f"{s}={r['stage_ms_per_pair'][s]:.2f}" for s in STAGES)
    mem = "" if r["peak_gpu_pool_bytes"] is None else f" peak_gpu={r['peak_gpu_pool_bytes'] / 2**30:.2f}GiB"
    pipe = f" pipelined={r['pipelined_pairs_per_s']:.1f}/s" if "pipelined_pairs_per_s" in r else ""
    return (f"{head} total={r['total_ms_per_pair']:.2f} compute={r['compute_ms_per_pair']:.2f} ms/pair "
            f"({r['pairs_per_s']:.2f} pairs/s{pipe}) fft_floor={r['fft_floor_ms_per_pair']:.2f} "
            f"plain_zogy={r['plain_zogy_ms_per_pair']:.2f} x{r['ratio_to_plain_zogy']:.2f} of plain ZOGY; "
            f"cands/pair={r['candidates_per_pair']:.1f}{mem}\n         [{st}]")


def print_table(rows):
    cols = ["backend", "B"] + list(STAGES) + ["compute", "total", "pairs/s", "fft_floor", "plain_zogy", "x_plain",
                                             "peak_GiB"]
    print("\nms per CCD pair (median of repeats)")
    print(" ".join(f"{c:>10}" for c in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:>10} {r['batch']:>10}  {r['error']}")
            continue
        vals = [r["backend"], r["batch"]] + [f"{r['stage_ms_per_pair'][s]:.2f}" for s in STAGES] + [
            f"{r['compute_ms_per_pair']:.2f}", f"{r['total_ms_per_pair']:.2f}", f"{r['pairs_per_s']:.2f}",
            f"{r['fft_floor_ms_per_pair']:.2f}", f"{r['plain_zogy_ms_per_pair']:.2f}",
            f"{r['ratio_to_plain_zogy']:.2f}",
            "-" if r["peak_gpu_pool_bytes"] is None else f"{r['peak_gpu_pool_bytes'] / 2**30:.2f}"]
        print(" ".join(f"{v:>10}" for v in vals))


def machine_info(xps):
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "numba_threads": os.environ.get("NUMBA_NUM_THREADS", "default")}
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)  # a shared machine inflates wall times
    try:
        import numba

        info["numba"] = numba.__version__
    except Exception:  # pragma: no cover
        pass
    for name, xp in xps:
        if is_cupy(xp):
            props = xp.cuda.runtime.getDeviceProperties(0)
            info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            info["gpu_memory_bytes"] = int(props["totalGlobalMem"])
            info["cupy"] = xp.__version__
            info["cuda_runtime"] = int(xp.cuda.runtime.runtimeGetVersion())
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[4096], help="image side (or ny nx), default 4096")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--backends", nargs="+", default=["numpy", "cupy"], choices=["numpy", "cupy"],
                   help="cupy is skipped (with a note) where no GPU is present")
    p.add_argument("--numpy-batches", type=int, nargs="+", default=[1],
                   help="batches for numpy (default 1: a CPU gains nothing from batching, and a 4096^2 "
                        "batch of 16 takes minutes per repeat); e.g. --numpy-batches 1 4 8 16")
    p.add_argument("--numpy-repeat", type=int, default=1, help="timed runs per numpy configuration")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--zogy-chunk", type=int, default=0, help="pairs per ZOGY call (0: the whole batch)")
    p.add_argument("--pipeline-batches", type=int, default=-1,
                   help="batches streamed through UploadPipeline (default 4 on cupy, 0 on numpy)")
    p.add_argument("--pool-limit-gib", type=float, default=0.0, help="bound CuPy's memory pool (0: no bound)")
    p.add_argument("--no-check", action="store_true", help="skip the numpy-vs-cupy correctness check")
    p.add_argument("--check-size", type=int, default=1024, help="image side of the correctness check")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sim-check", action="store_true",
                   help="only check the chain through the CUDA kernels against the CPU kernels on a tiny "
                        "batch, in the CUDA simulator (set NUMBA_ENABLE_CUDASIM=1)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu.json"))
    args = p.parse_args(argv)
    shape = (args.size[0], args.size[-1])
    cfg = Config()
    if args.sim_check:
        res = simulator_check(cfg, args.seed)
        raise SystemExit(0 if res["pass"] else 1)

    xps = []
    notes = []
    for name in args.backends:
        if name == "numpy":
            xps.append(("numpy", np))
        else:
            probe = bk.probe_gpu()
            if probe.ok:
                xps.append(("cupy", bk.get_backend("cupy")))
            else:
                notes.append(f"cupy skipped: {probe.reason}")
                print(f"note: cupy skipped: {probe.reason}", flush=True)
    info = machine_info(xps)
    print(json.dumps(info), flush=True)
    rows = []
    user_pipe = args.pipeline_batches
    for name, xp in xps:
        if is_cupy(xp):
            if args.pool_limit_gib > 0:
                bk.configure_memory_pool(xp, limit_bytes=int(args.pool_limit_gib * 2**30))
            ts = make_grid(shape, core=cfg.subtract.tile_size, margin=cfg.subtract.tile_margin).tile_shape
            bk.configure_fft_plan_cache(xp, n_plans=bk.fft_plans_needed(
                [(b, *ts) for b in args.batches] + [(b, *shape) for b in args.batches]) + 8)
        a = argparse.Namespace(**vars(args))
        a.pipeline_batches = (4 if is_cupy(xp) else 0) if user_pipe < 0 else user_pipe
        if name == "numpy":
            a.batches, a.repeat = args.numpy_batches, args.numpy_repeat
        rows += bench_backend(name, xp, a, cfg, shape)
    print_table(rows)
    check = None
    if not args.no_check and any(is_cupy(xp) for _, xp in xps):
        check = check_backends(cfg, (args.check_size, args.check_size), args.seed)
        print("\nnumpy vs cupy:", json.dumps(check))
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
              "machine": info, "notes": notes, "stages": list(STAGES), "results": rows, "check": check,
              "config": {"tile_size": cfg.subtract.tile_size, "tile_margin": cfg.subtract.tile_margin,
                         "psf_stamp": cfg.psf.stamp_size, "threshold": cfg.detect.threshold,
                         "dedup_radius": cfg.detect.dedup_radius, "cutout": cfg.cutout.size,
                         "repeat": args.repeat, "zogy_chunk": args.zogy_chunk}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
