"""Alignment: resample the reference onto the science pixel grid through both WCSs.

For every science pixel ``(x, y)`` the position in the reference is
``ref_wcs.world2pix(sci_wcs.pix2world(x, y))``. astropy evaluates that map on the host on a coarse
grid (every ``config.map_step`` px: :func:`coarse_map`); on the device a tensor cubic spline
(:func:`nightsift.kernels.geometry.coarse_to_full`) fills in every pixel. The spline error is
reported in the QA (``map_interp_error``, px, measured at cell centres on the host). The pixel-area
ratio ``|det J|`` (``J = d(ref pix)/d(sci pix)``) comes from the spline's derivatives at the
nodes, interpolated the same way.

The reference planes (image with its background already subtracted, and variance: see
:class:`~nightsift.engine.records.ReferenceModel`) are resampled with a normalised Lanczos-a
kernel (:func:`nightsift.kernels.resample.lanczos_resample`, variance with the plain weights: see
that module) and made flux-conserving (image x ``|det J|``, variance x ``|det J|**2``). The mask
is carried with :func:`~nightsift.kernels.resample.resample_mask` (a flagged reference pixel flags
its whole Lanczos footprint). Science pixels the reference does not cover are ``NO_DATA``, filled
with a typical value so FFTs downstream see no NaN.

The reference catalogue (measured once, in the reference's own frame) is carried onto the
science grid through the same map (:func:`nightsift.kernels.geometry.invert_map`), and the
residual registration is measured *before* resampling, from bright isolated stars of the
science catalogue matched to it: ``n_astrometric_stars``, ``astrometric_offset_x/y`` (median
ref - sci, px) and ``astrometric_scatter_x/y`` (1.4826 MAD, px; NaN with fewer than 3 stars), the part of it the
stars' own centroid noise explains (``astrometric_centroid_noise``, px) and, from these, ZOGY's
astrometric noise ``astrometric_rms_x/y`` (:func:`registration_noise`; the subtraction reports the
value it used under the same key). With
``config.refine_offset`` (the default) a significant offset -- a zero-point error between the
two WCSs -- is removed from the map (``astrometric_correction_x/y``; the offsets reported are
then those that remain), so the reference is resampled once. On the DECam cutouts of
../shared/data (identical WCS headers, stars ~0.55 px apart between the epochs) this halves the
number of dipole candidates.

QA: ``overlap_fraction``, ``ref_nodata_fraction`` (of the aligned reference; ``nodata_fraction`` is the
science frame's, from calibration), ``pixel_area_ratio`` (median ``|det J|``),
``map_interp_error`` (px) and the astrometric numbers above.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from nightsift.kernels._xp import array_namespace, host_scalars, to_device
from nightsift.kernels.background import mad_sigma
from nightsift.kernels.geometry import coarse_to_full, invert_map, sample_bilinear, spline_matrix
from nightsift.kernels.neighbours import count_within, nearest
from nightsift.kernels.resample import lanczos_resample, resample_mask

from ..config import AlignConfig
from ..errors import SkipCCD
from ..records import MaskBits, ReferenceModel, SourceCatalog, StageResult

__all__ = ["CoarseMap", "AlignedReference", "coarse_map", "align_reference", "astrometric_stars",
           "science_to_reference_map"]


# ------------------------------------------------------------------------------------------------
# host: the WCS map on a coarse grid
# ------------------------------------------------------------------------------------------------
def _map_points(sci_wcs: WCS, ref_wcs: WCS, x: np.ndarray, y: np.ndarray):
    """Exact science pixel -> reference pixel (0-based) for arbitrary points; NaN where undefined."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # wcslib notes on far-off points; they come back NaN
        ra, dec = sci_wcs.all_pix2world(x.ravel(), y.ravel(), 0)
        try:
            xr, yr = ref_wcs.all_world2pix(ra, dec, 0, quiet=True)
        except Exception:  # e.g. the inverse distortion diverges far outside the reference
            xr, yr = ref_wcs.wcs_world2pix(ra, dec, 0)
    return np.asarray(xr, float).reshape(x.shape), np.asarray(yr, float).reshape(x.shape)


def _spline_derivative(n_nodes: int, step: float) -> np.ndarray:
    """(n_nodes, n_nodes) matrix: derivative (per pixel) of the node spline at the nodes."""
    from scipy.interpolate import CubicSpline

    if n_nodes == 1:
        return np.zeros((1, 1))
    nodes = np.arange(n_nodes, dtype=np.float64) * step
    return CubicSpline(nodes, np.eye(n_nodes), axis=0).derivative()(nodes)


@dataclass(frozen=True)
class CoarseMap:
    """The science -> reference pixel map on a coarse grid (host arrays).

    Attributes
    ----------
    step : int
        Node spacing (px); nodes at ``(j * step, i * step)``, the last node at or past the edge.
    shape : (ny, nx)
        Science image shape.
    nodes : ndarray (3, ncy, ncx) float64 or None
        Reference x, y and the area ratio ``|det J|`` at the nodes; ``None`` when part of the
        grid has no defined mapping, in which case ``full`` holds the exact per-pixel map.
    full : ndarray (3, ny, nx) float64 or None
        Exact map at every pixel (rare fallback: fields far apart, a projection edge).
    jacobian, offset : ndarray (2, 2), (2,)
        Affine least-squares fit ``ref ~ offset + J sci`` of the nodes (host numbers).
    max_error : float
        Largest difference (px) between the spline and the exact map at up to 400 cell centres.
    """

    step: int
    shape: tuple[int, int]
    nodes: np.ndarray | None
    full: np.ndarray | None
    jacobian: np.ndarray
    offset: np.ndarray
    max_error: float


def coarse_map(sci_wcs: WCS, ref_wcs: WCS, shape: tuple[int, int], *, step: int = 32) -> CoarseMap:
    """Evaluate the science -> reference map with astropy on a coarse grid (host work).

    Parameters
    ----------
    sci_wcs, ref_wcs : astropy.wcs.WCS
        Celestial WCSs of the science and reference images (TAN, TPV, SIP, ...).
    shape : (ny, nx)
        Shape of the science image.
    step : int, keyword-only
        Spacing (px) of the coarse grid.
    """
    ny, nx = int(shape[0]), int(shape[1])
    ncy = int(np.ceil((ny - 1) / step)) + 1
    ncx = int(np.ceil((nx - 1) / step)) + 1
    gy, gx = np.mgrid[0:ncy, 0:ncx].astype(np.float64) * step
    xr, yr = _map_points(sci_wcs, ref_wcs, gx, gy)
    if np.all(np.isfinite(xr) & np.isfinite(yr)):
        dy, dx = _spline_derivative(ncy, step), _spline_derivative(ncx, step)
        jxx, jxy = xr @ dx.T, dy @ xr  # d(xr)/dx, d(xr)/dy at the nodes
        jyx, jyy = yr @ dx.T, dy @ yr
        area = np.abs(jxx * jyy - jxy * jyx)
        nodes = np.stack([xr, yr, area])
        A = np.column_stack([np.ones(gx.size), gx.ravel(), gy.ravel()])
        cx, *_ = np.linalg.lstsq(A, xr.ravel(), rcond=None)
        cy, *_ = np.linalg.lstsq(A, yr.ravel(), rcond=None)
        jac = np.array([[cx[1], cx[2]], [cy[1], cy[2]]])
        off = np.array([cx[0], cy[0]])
        max_error = 0.0
        cyc = (np.arange(ncy - 1) * step + step // 2).clip(0, ny - 1)
        cxc = (np.arange(ncx - 1) * step + step // 2).clip(0, nx - 1)
        if cyc.size and cxc.size:  # the spline at cell centres, where it is least constrained
            rs = np.random.default_rng(0)
            py = rs.choice(cyc, size=min(400, cyc.size * cxc.size))
            px = rs.choice(cxc, size=py.size)
            ex, ey = _map_points(sci_wcs, ref_wcs, px.astype(float), py.astype(float))
            wy, wx = spline_matrix(ncy, step, ny)[py], spline_matrix(ncx, step, nx)[px]
            sx = np.einsum("ij,nj,ni->n", xr, wx, wy)
            sy = np.einsum("ij,nj,ni->n", yr, wx, wy)
            err = np.hypot(sx - ex, sy - ey)
            max_error = float(np.nanmax(err)) if np.isfinite(err).any() else 0.0
        return CoarseMap(step=step, shape=(ny, nx), nodes=nodes, full=None, jacobian=jac, offset=off,
                         max_error=max_error)

    # Part of the grid has no defined mapping: evaluate every pixel exactly, rows in blocks.
    # Rare and slow (seconds per 4k CCD, and the whole map crosses to the device).
    full = np.empty((3, ny, nx))
    offsets = [(0, 0), (0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)]
    cols = np.arange(nx, dtype=np.float64)
    for y0 in range(0, ny, 256):
        rows = np.arange(y0, min(ny, y0 + 256), dtype=np.float64)
        yy, xx = np.meshgrid(rows, cols, indexing="ij")
        bx, by = _map_points(sci_wcs, ref_wcs, np.stack([xx + a for a, b in offsets]),
                             np.stack([yy + b for a, b in offsets]))
        det = (bx[1] - bx[2]) * (by[3] - by[4]) - (bx[3] - bx[4]) * (by[1] - by[2])
        full[0, y0:y0 + rows.size], full[1, y0:y0 + rows.size] = bx[0], by[0]
        full[2, y0:y0 + rows.size] = np.abs(det)
    ok = np.isfinite(full[0]) & np.isfinite(full[1])
    if ok.sum() >= 3:
        yy, xx = np.nonzero(ok)
        sel = slice(None, None, max(1, ok.sum() // 20000))
        A = np.column_stack([np.ones(xx[sel].size), xx[sel], yy[sel]])
        cx, *_ = np.linalg.lstsq(A, full[0][ok][sel], rcond=None)
        cy, *_ = np.linalg.lstsq(A, full[1][ok][sel], rcond=None)
        jac, off = np.array([[cx[1], cx[2]], [cy[1], cy[2]]]), np.array([cx[0], cy[0]])
    else:
        jac, off = np.eye(2), np.zeros(2)
    return CoarseMap(step=step, shape=(ny, nx), nodes=None, full=full, jacobian=jac, offset=off, max_error=0.0)


def science_to_reference_map(sci_wcs: WCS, ref_wcs: WCS, shape, *, step: int = 32):
    """Host convenience (tests, tools): ``x_ref, y_ref, area_ratio, max_error`` at every pixel,
    through the same coarse map and spline as the chain."""
    cm = coarse_map(sci_wcs, ref_wcs, shape, step=step)
    full = cm.full if cm.nodes is None else coarse_to_full(cm.nodes, cm.step, cm.shape)
    return full[0], full[1], full[2], cm.max_error


# ------------------------------------------------------------------------------------------------
# device: carry the catalogue, measure the residual registration, resample
# ------------------------------------------------------------------------------------------------
def astrometric_stars(catalog: SourceCatalog, *, radius: float, min_snr: float = 20.0):
    """Bright (``snr >= min_snr``), unflagged, isolated sources (no other catalogue source within
    ``radius`` px): the stars whose centroids measure a registration. Device bool ``(n,)``."""
    xp = array_namespace(catalog.x)
    n = len(catalog)
    bright = (catalog.snr >= min_snr) & (catalog.flag == 0)
    if n == 0:
        return bright
    self_index = xp.arange(n, dtype=xp.int64)
    crowd = count_within(catalog.x, catalog.y, catalog.x, catalog.y, radius=radius, self_index=self_index)
    return bright & (crowd == 0)


def _residuals(xs, ys, xr, yr, *, match_radius: float, cvar_s=None, cvar_r=None):
    """Matched pairs (one-to-one) within ``match_radius``: ``(n, median dx, median dy, rms x, rms y,
    centroid noise)`` as device 0-d arrays (dx = ref - sci). The centroid noise (px, per axis) is
    the median over the pairs of ``sqrt(cvar_s + cvar_r)``, the per-star centroid variances of the
    two catalogues (NaN without them)."""
    xp = array_namespace(xs, xr)
    if xs.shape[0] == 0 or xr.shape[0] == 0:
        return (xp.zeros((), xp.int64),) + (xp.full((), xp.nan),) * 5
    j, d = nearest(xs, ys, xr, yr, radius=match_radius)
    hit = j >= 0
    jj = xp.where(hit, j, 0)
    # one-to-one: a reference star claimed by two science stars matches neither
    claims = xp.bincount(jj, weights=hit.astype(xp.float64), minlength=max(int(xr.shape[0]), 1))
    single = hit & (claims[jj] == 1)
    dx = xp.where(single, xr[jj] - xs, xp.nan)
    dy = xp.where(single, yr[jj] - ys, xp.nan)
    n = single.sum()
    with warnings.catch_warnings():  # all-NaN slices give NaN (fewer than one star): expected
        warnings.simplefilter("ignore", RuntimeWarning)
        ox, oy = xp.nanmedian(dx), xp.nanmedian(dy)
        if cvar_s is None or cvar_r is None:
            cn = xp.full((), xp.nan)
        else:
            cn = xp.sqrt(xp.nanmedian(xp.where(single, cvar_s + cvar_r[jj], xp.nan)))
    return n, ox, oy, mad_sigma(dx), mad_sigma(dy), cn


def centroid_variance(catalog: SourceCatalog):
    """Per-axis variance (px^2) of each source's centroid from its own noise: ``(sigma / snr)^2``
    with ``sigma = sqrt(a b)`` the windowed 1-sigma size (the photon-limited centroid error of a
    Gaussian source; a lower bound in the background-limited regime, where it is up to sqrt(2)
    larger, so removing it from a measured scatter never removes too much)."""
    xp = array_namespace(catalog.x)
    sigma2 = xp.abs(catalog.a * catalog.b)
    return sigma2 / xp.maximum(catalog.snr, 1e-6) ** 2


def registration_noise(rms: float, centroid_noise: float, n: int, *, mode: str) -> float:
    """ZOGY's astrometric noise (px, one axis) from the matched stars' residual scatter.

    ``mode = "scatter"``: the scatter itself. ``mode = "registration"`` (ZOGY's sigma_x: the error
    of the registration at a source, not the centroid noise of the stars that measured it): the
    part of the scatter the stars' own centroid noise does not explain, ``rms^2 - centroid^2``
    (distortion left by the WCSs, seen by every source), plus the error of the fitted offset,
    ``rms^2 / n``. Without a centroid-noise estimate the scatter is returned.
    """
    if mode == "scatter" or not np.isfinite(centroid_noise) or n < 1:
        return float(rms)
    return float(np.sqrt(max(rms * rms - centroid_noise * centroid_noise, 0.0) + rms * rms / n))


@dataclass(frozen=True)
class AlignedReference:
    """The reference on the science grid (device arrays).

    Attributes
    ----------
    image : (ny, nx) float32, e-
        Resampled reference (background-subtracted when the model's image is), x pixel-area ratio.
    variance : (ny, nx) float32, e-^2
    mask : (ny, nx) uint16
    catalog : SourceCatalog
        The reference catalogue at its science-grid positions (sources off the grid dropped).
    tile_centres : (T, 2) float64
        Reference-grid position ``(x, y)`` of each science tile centre (after the correction).
    tile_jacobian : (T, 2, 2) float64
        ``d(ref)/d(sci)`` at each science tile centre.
    astrometric_rms : (float, float)
        The registration RMS (px) for ZOGY's astrometric noise, or ``None`` when too few stars
        measured it.
    """

    image: object
    variance: object
    mask: object
    catalog: SourceCatalog
    tile_centres: object
    tile_jacobian: object
    astrometric_rms: tuple | None


def _significant(n: int, ox: float, oy: float, rx: float, ry: float, min_stars: int) -> bool:
    """Enough stars, and a median offset > 0.01 px and > 3x its own error (1.25 rms / sqrt(n))."""
    if n < max(min_stars, 3):
        return False
    off = np.hypot(ox, oy)
    err = 1.25 * np.hypot(rx, ry) / np.sqrt(n)
    return bool(np.isfinite(off) and off > 0.01 and off > 3 * err)


def align_reference(reference: ReferenceModel, cmap: CoarseMap, *, sci_catalog: SourceCatalog | None,
                    sci_astro=None, tile_centres=None, science_path: str | None = None,
                    config: AlignConfig) -> StageResult:
    """Resample a reference model onto a science grid and carry its catalogue there.

    Parameters
    ----------
    reference : ReferenceModel
        On the device the chain runs on.
    cmap : CoarseMap
        :func:`coarse_map` of the science and reference WCSs (host).
    sci_catalog : SourceCatalog or None
        Science sources; with ``sci_astro`` (device bool, the bright isolated ones) they measure
        the residual registration against the carried reference catalogue. ``None``: not measured.
    tile_centres : ndarray (T, 2), optional
        Science tile centres ``(x, y)`` (host; the centres of the cores' parts inside the image,
        :meth:`~nightsift.kernels.tiles.TileGrid.visible_centres`): their reference positions
        and local Jacobians are returned for carrying the PSF.
    science_path : str, optional
        For messages.
    config : AlignConfig

    Returns
    -------
    StageResult(AlignedReference, qa)

    Raises
    ------
    SkipCCD
        If the reference covers less than ``config.min_overlap`` of the science pixels.
    """
    xp = array_namespace(reference.image)
    shape = cmap.shape
    x_ref, y_ref, area = _full_map(cmap, xp)
    covered = _covered(x_ref, y_ref, reference.shape)

    # the reference catalogue on the science grid, the residual registration against the science's
    cat = reference.catalog
    px, py = invert_map(x_ref, y_ref, cat.x, cat.y, jacobian=cmap.jacobian, offset=cmap.offset)
    stats = _registration(reference, px, py, sci_catalog, sci_astro, match_radius=config.match_radius)
    ov, n, ox, oy, rx, ry, cnoise = host_scalars(covered.mean(), *stats)
    if ov < config.min_overlap:
        raise SkipCCD(
            f"reference {reference.path or '(in memory)'} covers {ov:.1%} of science "
            f"{science_path or '(in memory)'} (align.min_overlap = {config.min_overlap:.1%}); "
            "no difference image for this CCD: check the reference selection for this field/CCD",
            qa={"overlap_fraction": ov})
    correction = (0.0, 0.0)
    if config.refine_offset and _significant(n, ox, oy, rx, ry, config.refine_min_stars):
        # the aligned stars sit at sci + offset: map each science pixel as if it were pixel + offset
        correction = (ox, oy)
        (jxx, jxy), (jyx, jyy) = cmap.jacobian
        x_ref = x_ref + (jxx * ox + jxy * oy)
        y_ref = y_ref + (jyx * ox + jyy * oy)
        px, py = px - ox, py - oy
        covered = _covered(x_ref, y_ref, reference.shape)

    image, variance, mask, nodata, area_med = _resample_planes(reference, x_ref, y_ref, area, covered,
                                                               a=int(config.lanczos_order))
    carried = _carry_catalog(cat, px, py, area, shape)
    centres = jac = None
    if tile_centres is not None:
        centres, jac = _tile_geometry(x_ref, y_ref, tile_centres, shape)

    ast = None
    if n >= config.min_astrometric_stars and np.isfinite(rx) and np.isfinite(ry):
        ast = tuple(max(registration_noise(r, cnoise, n, mode=config.astrometric_noise), config.astrometric_rms_floor)
                    for r in (rx, ry))
    qa = {"overlap_fraction": ov, "ref_nodata_fraction": nodata.mean(), "pixel_area_ratio": area_med,
          "map_interp_error": cmap.max_error,
          "astrometric_correction_x": correction[0], "astrometric_correction_y": correction[1],
          "n_astrometric_stars": n, "astrometric_offset_x": ox - correction[0],
          "astrometric_offset_y": oy - correction[1], "astrometric_rms_x": ast[0] if ast else np.nan,
          "astrometric_rms_y": ast[1] if ast else np.nan, "astrometric_scatter_x": rx, "astrometric_scatter_y": ry, "astrometric_centroid_noise": cnoise}
    return StageResult(AlignedReference(image=image, variance=variance, mask=mask, catalog=carried,
                                        tile_centres=centres, tile_jacobian=jac, astrometric_rms=ast), qa)


def _full_map(cmap: CoarseMap, xp):
    """``x_ref, y_ref, area`` ``(ny, nx)`` on ``xp``'s device: the spline through the coarse map's
    nodes, or the map itself where it was evaluated at every pixel."""
    if cmap.nodes is not None:
        maps = coarse_to_full(to_device(cmap.nodes, xp, label="wcs_map"), cmap.step, cmap.shape)
    else:
        maps = to_device(cmap.full, xp, label="wcs_map_full")
    return maps[0], maps[1], maps[2]


def _registration(reference: ReferenceModel, px, py, sci_catalog, sci_astro, *, match_radius: float):
    """:func:`_residuals` of the science's astrometric stars (``sci_astro``) against the reference's
    (``reference.astro``) at their science-grid positions ``(px, py)``; no stars (0, NaN...)
    without a science catalogue."""
    xp = array_namespace(px, py)
    if sci_catalog is None or sci_astro is None or not len(sci_catalog) or not len(reference.catalog):
        return (xp.zeros((), xp.int64),) + (xp.full((), xp.nan),) * 5
    ra = reference.astro & xp.isfinite(px) & xp.isfinite(py)
    sci = sci_catalog.take(sci_astro)
    return _residuals(sci.x, sci.y, px[ra], py[ra], match_radius=match_radius,
                      cvar_s=centroid_variance(sci), cvar_r=centroid_variance(reference.catalog.take(ra)))


def _covered(x_ref, y_ref, ref_shape):
    """Science pixels whose reference position is defined and inside the reference (bool)."""
    xp = array_namespace(x_ref, y_ref)
    rny, rnx = ref_shape
    covered = xp.isfinite(x_ref) & xp.isfinite(y_ref)
    covered &= (x_ref >= -0.5) & (x_ref <= rnx - 0.5) & (y_ref >= -0.5) & (y_ref <= rny - 0.5)
    return covered


def _resample_planes(reference: ReferenceModel, x_ref, y_ref, area, covered, *, a: int):
    """The reference image and variance resampled onto the science grid (Lanczos-``a``, flux-
    conserving: x ``area`` and ``area**2``) and its mask carried there; pixels not ``covered``
    or not finite are ``NO_DATA``, filled with the median image value (0 without one) and the
    median variance (1). Returns ``(image, variance, mask, nodata, median area ratio)``."""
    xp = array_namespace(reference.image)
    planes = lanczos_resample(xp.stack([reference.image, reference.variance]), x_ref, y_ref, a=a, fill=np.nan)
    mask = resample_mask(reference.mask, x_ref, y_ref, a=a, no_data_bit=int(MaskBits.NO_DATA))
    image = planes[0] * area.astype(xp.float32)
    variance = planes[1] * (area * area).astype(xp.float32)
    nodata = ~xp.isfinite(image) | ~xp.isfinite(variance) | ~covered
    mask = mask | xp.where(nodata, xp.uint16(MaskBits.NO_DATA), xp.uint16(0))
    sub = (slice(None, None, 4), slice(None, None, 4))
    live = ~nodata[sub]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fill_img = xp.nanmedian(xp.where(live, image[sub], xp.nan))
        fill_var = xp.nanmedian(xp.where(live, variance[sub], xp.nan))
        area_med = xp.nanmedian(xp.where(covered[sub], area[sub], xp.nan))
    image = xp.where(nodata, xp.nan_to_num(fill_img).astype(xp.float32), image).astype(xp.float32)
    variance = xp.where(nodata, xp.nan_to_num(fill_var, nan=1.0).astype(xp.float32), variance).astype(xp.float32)
    return image, variance, mask, nodata, area_med


def _carry_catalog(cat: SourceCatalog, px, py, area, shape) -> SourceCatalog:
    """The reference catalogue at its science-grid positions ``(px, py)``: sources that land on
    the grid, their sizes scaled by the local linear scale ``sqrt(area)``."""
    xp = array_namespace(px, py, area)
    ny, nx = shape
    on = xp.isfinite(px) & xp.isfinite(py) & (px >= -0.5) & (px <= nx - 0.5) & (py >= -0.5) & (py <= ny - 0.5)
    scale = xp.sqrt(xp.nan_to_num(sample_bilinear(area, xp.clip(px, 0, nx - 1), xp.clip(py, 0, ny - 1)), nan=1.0))
    return cat.replace(x=px, y=py, a=cat.a / scale, b=cat.b / scale, size=cat.size / scale).take(on)


def _tile_geometry(x_ref, y_ref, tile_centres, shape):
    """Reference position ``(T, 2)`` and Jacobian ``d(ref)/d(sci)`` ``(T, 2, 2)`` of each science
    tile centre (host ``(T, 2)``), by central differences of the map (1 px)."""
    xp = array_namespace(x_ref, y_ref)
    ny, nx = shape
    tc = to_device(np.asarray(tile_centres, np.float64), xp, label="tile_centres")
    h = 1.0  # central differences need both neighbours inside the map
    cx = xp.clip(tc[:, 0], h, max(nx - 1 - h, h))
    cy = xp.clip(tc[:, 1], h, max(ny - 1 - h, h))
    xs = [sample_bilinear(x_ref, cx + d, cy + e) for d, e in ((0, 0), (h, 0), (-h, 0), (0, h), (0, -h))]
    ys = [sample_bilinear(y_ref, cx + d, cy + e) for d, e in ((0, 0), (h, 0), (-h, 0), (0, h), (0, -h))]
    centres = xp.stack([xs[0], ys[0]], axis=1)
    jac = xp.stack([xp.stack([(xs[1] - xs[2]) / (2 * h), (xs[3] - xs[4]) / (2 * h)], axis=1),
                    xp.stack([(ys[1] - ys[2]) / (2 * h), (ys[3] - ys[4]) / (2 * h)], axis=1)], axis=1)
    return centres, jac
