"""Alignment: resample the reference onto the science pixel grid through both WCSs.

For every science pixel ``(x, y)`` the position in the reference is
``ref_wcs.world2pix(sci_wcs.pix2world(x, y))``. astropy evaluates that map exactly on a coarse
grid (every ``config.map_step`` px, plus half-pixel offsets for the Jacobian) and a tensor cubic
spline (:func:`nightsift.kernels.resample.interpolate_coarse_grid`) fills in every pixel; the
spline error is reported in the QA (``map_interp_error``, px, measured at cell centres).

The reference image and variance are resampled with a normalised Lanczos-a kernel
(:func:`nightsift.kernels.resample.lanczos_resample`, variance with the plain weights: see that
module) and made flux-conserving: a science pixel covers ``|det J|`` reference pixels
(``J = d(ref pix)/d(sci pix)``), so the image is multiplied by ``|det J|`` and the variance by
``|det J|**2``. The mask is carried with :func:`~nightsift.kernels.resample.resample_mask`
(a flagged reference pixel flags its whole Lanczos footprint). Science pixels the reference does
not cover are ``NO_DATA``, filled with the median aligned sky (image) and median variance so
FFTs downstream see no NaN.

Optionally (``config.refine_offset``, off by default) a significant residual offset measured on
the matched stars -- a zero-point error between the two WCSs -- is removed by resampling once
more with the map shifted by it (``astrometric_correction_x/y`` in the QA; the residual QA is
then measured again). On the DECam cutouts of ../shared/data (identical WCS headers, stars
~0.55 px apart between the epochs) this halves the number of dipole candidates.

QA: ``overlap_fraction``, ``nodata_fraction``, ``pixel_area_ratio`` (median ``|det J|``),
``map_interp_error`` (px), and the residual astrometry measured on bright isolated stars matched
between the science image and the aligned reference: ``n_astrometric_stars``,
``astrometric_offset_x/y`` (median ref - sci, px) and ``astrometric_rms_x/y`` (robust,
1.4826 MAD, px; NaN with fewer than 3 stars).
"""
from __future__ import annotations

import warnings

import numpy as np
from astropy.wcs import WCS

from ...kernels.resample import interpolate_coarse_grid, lanczos_resample, resample_mask
from ..config import AlignConfig
from ..errors import InputError, SkipCCD
from ..io.fits import replace_wcs
from ..records import UNUSABLE, Exposure, MaskBits, StageResult

__all__ = ["align", "science_to_reference_map", "astrometric_residuals"]

_H = 0.5  # half-step (px) of the central differences for the Jacobian


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


def science_to_reference_map(
    sci_wcs: WCS, ref_wcs: WCS, shape: tuple[int, int], *, step: int = 32, sci_offset: tuple[float, float] = (0.0, 0.0)
):
    """Reference pixel position and pixel-area ratio of every science pixel.

    Parameters
    ----------
    sci_wcs, ref_wcs : astropy.wcs.WCS
        Celestial WCSs of the science and reference images (TAN, TPV, SIP, ...).
    shape : (ny, nx)
        Shape of the science image.
    step : int, keyword-only
        Spacing (px) of the coarse grid on which the map is evaluated exactly.
    sci_offset : (dx, dy), keyword-only
        Science pixel ``(x, y)`` is mapped as if it were ``(x + dx, y + dy)``: moves the aligned
        image by ``(-dx, -dy)`` science pixels (used to remove a measured residual offset).

    Returns
    -------
    x_ref, y_ref : ndarray (ny, nx) float64
        0-based reference column/row of each science pixel centre (NaN where undefined).
    area_ratio : ndarray (ny, nx) float64
        ``|det d(ref pix)/d(sci pix)|``: reference pixels per science pixel.
    max_error : float
        Largest difference (px) between the interpolated and the exact map at up to 400 coarse
        cell centres (0 when the map was evaluated exactly everywhere).
    """
    ny, nx = int(shape[0]), int(shape[1])
    ncy = int(np.ceil((ny - 1) / step)) + 1
    ncx = int(np.ceil((nx - 1) / step)) + 1
    gy, gx = np.mgrid[0:ncy, 0:ncx].astype(np.float64) * step
    gx += sci_offset[0]
    gy += sci_offset[1]
    offsets = [(0, 0), (_H, 0), (-_H, 0), (0, _H), (0, -_H)]
    X = np.stack([gx + dx for dx, dy in offsets])
    Y = np.stack([gy + dy for dx, dy in offsets])
    xr, yr = _map_points(sci_wcs, ref_wcs, X, Y)

    if np.all(np.isfinite(xr) & np.isfinite(yr)):
        det = (xr[1] - xr[2]) * (yr[3] - yr[4]) - (xr[3] - xr[4]) * (yr[1] - yr[2])
        area = np.abs(det) / (2 * _H) ** 2
        x_ref = interpolate_coarse_grid(xr[0], step, (ny, nx))
        y_ref = interpolate_coarse_grid(yr[0], step, (ny, nx))
        area_ratio = interpolate_coarse_grid(area, step, (ny, nx))
        # check the interpolation at cell centres (where a spline is least constrained)
        cy = (np.arange(ncy - 1) * step + step // 2).clip(0, ny - 1)
        cx = (np.arange(ncx - 1) * step + step // 2).clip(0, nx - 1)
        if cy.size and cx.size:
            rs = np.random.default_rng(0)
            pick_y = rs.choice(cy, size=min(400, cy.size * cx.size))
            pick_x = rs.choice(cx, size=pick_y.size)
            ex, ey = _map_points(sci_wcs, ref_wcs, pick_x + sci_offset[0], pick_y + sci_offset[1])
            err = np.hypot(x_ref[pick_y, pick_x] - ex, y_ref[pick_y, pick_x] - ey)
            max_error = float(np.nanmax(err)) if np.isfinite(err).any() else 0.0
        else:
            max_error = 0.0
        return x_ref, y_ref, area_ratio, max_error

    # Part of the grid has no defined mapping (fields far apart, projection edge): evaluate every
    # pixel exactly, rows in blocks to bound memory. Rare, and slower (seconds per 4k CCD).
    x_ref = np.empty((ny, nx))
    y_ref = np.empty((ny, nx))
    area_ratio = np.empty((ny, nx))
    cols = np.arange(nx, dtype=np.float64) + sci_offset[0]
    for y0 in range(0, ny, 256):
        rows = np.arange(y0, min(ny, y0 + 256), dtype=np.float64) + sci_offset[1]
        yy, xx = np.meshgrid(rows, cols, indexing="ij")
        bx, by = _map_points(sci_wcs, ref_wcs, np.stack([xx + dx for dx, dy in offsets]),
                             np.stack([yy + dy for dx, dy in offsets]))
        det = (bx[1] - bx[2]) * (by[3] - by[4]) - (bx[3] - bx[4]) * (by[1] - by[2])
        x_ref[y0:y0 + rows.size] = bx[0]
        y_ref[y0:y0 + rows.size] = by[0]
        area_ratio[y0:y0 + rows.size] = np.abs(det) / (2 * _H) ** 2
    return x_ref, y_ref, area_ratio, 0.0


def _detect_stars(image: np.ndarray, bad: np.ndarray, *, thresh: float = 10.0, max_stars: int = 500):
    """Bright, isolated, unflagged stars: (x, y) arrays with windowed centroids (sep)."""
    import sep

    data = np.ascontiguousarray(image, dtype=np.float64)
    badm = np.ascontiguousarray(bad, dtype=bool)
    ny, nx = data.shape
    bw = min(64, max(8, nx // 4))
    bh = min(64, max(8, ny // 4))
    bkg = sep.Background(data, mask=badm, bw=bw, bh=bh)
    sub = data - bkg.back()
    try:
        objs = sep.extract(sub, thresh, err=bkg.globalrms, mask=badm, minarea=5)
    except Exception:  # sep's pixel-stack overflow on extremely crowded frames
        return np.empty(0), np.empty(0)
    if objs.size == 0:
        return np.empty(0), np.empty(0)
    good = (objs["flag"] == 0) & (objs["a"] > 0) & np.isfinite(objs["x"]) & np.isfinite(objs["y"])
    objs = objs[good]
    if objs.size == 0:
        return np.empty(0), np.empty(0)
    sigma = float(np.median(np.sqrt(0.5 * (objs["a"] ** 2 + objs["b"] ** 2))))
    sigma = min(max(sigma, 0.8), 10.0)
    # isolated: no other detection within 6 sigma (~2.5 FWHM), far from the edge
    from scipy.spatial import cKDTree

    pos = np.column_stack([objs["x"], objs["y"]])
    if len(pos) > 1:
        d, _ = cKDTree(pos).query(pos, k=2)
        iso = d[:, 1] > 6 * sigma
    else:
        iso = np.ones(len(pos), bool)
    edge = 4 * sigma
    inside = (pos[:, 0] > edge) & (pos[:, 0] < nx - 1 - edge) & (pos[:, 1] > edge) & (pos[:, 1] < ny - 1 - edge)
    objs = objs[iso & inside]
    objs = objs[np.argsort(objs["flux"])[::-1][:max_stars]]
    if objs.size == 0:
        return np.empty(0), np.empty(0)
    x, y, flag = sep.winpos(sub, objs["x"], objs["y"], np.full(objs.size, sigma), mask=badm)
    ok = (flag == 0) & np.isfinite(x) & np.isfinite(y)
    return np.asarray(x[ok]), np.asarray(y[ok])


def _typical(values: np.ndarray, sel: np.ndarray, fallback: float) -> float:
    """Median of ``values[sel]`` from a 1-in-16 subsample (a fill value, not a measurement)."""
    v = values[::4, ::4][sel[::4, ::4]]
    if v.size == 0:
        v = values[sel]
    return float(np.median(v)) if v.size else fallback


def _qa_windows(shape: tuple[int, int], max_pixels: int = 2048 * 2048):
    """Slices in which stars are detected: the whole image, or for bigger CCDs the central half
    (in each axis) of every cell of a 4x4 grid -- a quarter of the area, spread over the whole
    field so distortion residuals near the edges are still seen -- to bound the cost."""
    ny, nx = shape
    if ny * nx <= max_pixels:
        return [(slice(0, ny), slice(0, nx))]
    out = []
    for j in range(4):
        for i in range(4):
            cy, cx = (2 * j + 1) * ny // 8, (2 * i + 1) * nx // 8
            hy, hx = ny // 16, nx // 16
            out.append((slice(cy - hy, cy + hy), slice(cx - hx, cx + hx)))
    return out


def astrometric_residuals(
    sci_image: np.ndarray,
    sci_bad: np.ndarray,
    ref_image: np.ndarray,
    ref_bad: np.ndarray,
    *,
    match_radius: float = 1.5,
    max_stars: int = 500,
) -> dict[str, float | int]:
    """Residual offset between two images on one pixel grid, from matched bright isolated stars.

    Parameters
    ----------
    sci_image, ref_image : ndarray (ny, nx) float, e-
    sci_bad, ref_bad : ndarray (ny, nx) bool
        Pixels to ignore (flagged or not covered).
    match_radius : float, keyword-only
        Largest separation (px) of a match.
    max_stars : int, keyword-only
        At most this many of the brightest isolated stars are used (per image).

    Returns
    -------
    dict
        ``n_astrometric_stars``; ``astrometric_offset_x/y`` (median ref - sci, px);
        ``astrometric_rms_x/y`` (1.4826 MAD, px). NaN where fewer than 3 stars match.
    """
    from scipy.spatial import cKDTree

    parts_s, parts_r = [], []
    windows = _qa_windows(np.shape(sci_image))
    per_window = max(20, max_stars // len(windows))
    for sl in windows:
        oy, ox = sl[0].start, sl[1].start
        x, y = _detect_stars(sci_image[sl], sci_bad[sl], max_stars=per_window)
        parts_s.append((x + ox, y + oy))
        x, y = _detect_stars(ref_image[sl], ref_bad[sl], max_stars=per_window)
        parts_r.append((x + ox, y + oy))
    xs = np.concatenate([p[0] for p in parts_s])
    ys = np.concatenate([p[1] for p in parts_s])
    xr = np.concatenate([p[0] for p in parts_r])
    yr = np.concatenate([p[1] for p in parts_r])
    out: dict[str, float | int] = {
        "n_astrometric_stars": 0,
        "astrometric_offset_x": float("nan"),
        "astrometric_offset_y": float("nan"),
        "astrometric_rms_x": float("nan"),
        "astrometric_rms_y": float("nan"),
    }
    if xs.size == 0 or xr.size == 0:
        return out
    d, j = cKDTree(np.column_stack([xr, yr])).query(np.column_stack([xs, ys]), distance_upper_bound=match_radius)
    hit = np.isfinite(d)
    # keep one-to-one matches only
    jj = j[hit]
    uniq, counts = np.unique(jj, return_counts=True)
    single = np.isin(jj, uniq[counts == 1])
    idx_s = np.nonzero(hit)[0][single]
    idx_r = jj[single]
    dx = xr[idx_r] - xs[idx_s]
    dy = yr[idx_r] - ys[idx_s]
    out["n_astrometric_stars"] = int(dx.size)
    if dx.size >= 3:
        out["astrometric_offset_x"] = float(np.median(dx))
        out["astrometric_offset_y"] = float(np.median(dy))
        out["astrometric_rms_x"] = float(1.4826 * np.median(np.abs(dx - np.median(dx))))
        out["astrometric_rms_y"] = float(1.4826 * np.median(np.abs(dy - np.median(dy))))
    return out


def _significant_offset(astro: dict, min_stars: int) -> bool:
    """Enough stars, and a median offset > 0.01 px and > 3x its own error (1.25 rms / sqrt(n))."""
    n = astro["n_astrometric_stars"]
    if n < max(min_stars, 3):
        return False
    off = np.hypot(astro["astrometric_offset_x"], astro["astrometric_offset_y"])
    err = 1.25 * np.hypot(astro["astrometric_rms_x"], astro["astrometric_rms_y"]) / np.sqrt(n)
    return bool(np.isfinite(off) and off > 0.01 and off > 3 * err)


def _resample_reference(reference: Exposure, x_ref, y_ref, area_ratio, covered, a: int):
    """Image, variance, mask of the reference on the science grid, and the NO_DATA pixels."""
    # reference planes; flagged-bad / no-data pixels get a neutral value so they cannot ring
    rimg = np.asarray(reference.image, dtype=np.float32)
    rvar = np.asarray(reference.variance, dtype=np.float32)
    rmask = np.asarray(reference.mask, dtype=np.uint16)
    junk = (rmask & np.uint16(MaskBits.BAD | MaskBits.NO_DATA)) != 0
    junk |= ~np.isfinite(rimg) | ~np.isfinite(rvar)
    if junk.any():
        ok = ~junk
        rimg = np.where(junk, _typical(rimg, ok, 0.0), rimg).astype(np.float32)
        rvar = np.where(junk, _typical(rvar, ok, 1.0), rvar).astype(np.float32)

    planes = lanczos_resample(np.stack([rimg, rvar]), x_ref, y_ref, a=a, fill=np.nan)
    mask = resample_mask(rmask, x_ref, y_ref, a=a, no_data_bit=int(MaskBits.NO_DATA))
    image = planes[0] * area_ratio
    variance = planes[1] * area_ratio**2
    nodata = ~np.isfinite(image) | ~np.isfinite(variance) | ~covered
    mask[nodata] |= np.uint16(MaskBits.NO_DATA)
    live = ~nodata
    image = np.where(nodata, _typical(image, live, 0.0), image).astype(np.float32)
    variance = np.where(nodata, _typical(variance, live, 1.0), variance).astype(np.float32)

    return image, variance, mask, nodata


def align(science: Exposure, reference: Exposure, *, config: AlignConfig) -> StageResult:
    """Resample the reference onto the science pixel grid.

    Parameters
    ----------
    science : Exposure
        Defines the output grid (shape, WCS). Its image/mask are used only for the QA.
    reference : Exposure
        Calibrated reference (e-, e-^2, mask), any shape/orientation/scale with a celestial WCS.
    config : AlignConfig, keyword-only
        ``lanczos_order``, ``min_overlap``, ``map_step``, ``match_radius``, ``refine_offset``,
        ``refine_min_stars``.

    Returns
    -------
    StageResult
        ``value``: :class:`Exposure` on the science grid (image float32 e- per science pixel,
        variance float32 e-^2, mask uint16 with ``NO_DATA`` where the reference does not cover,
        ``wcs = science.wcs``, the reference's header with the science WCS, ``path`` of the
        reference). ``qa``: see the module docstring.

    Raises
    ------
    SkipCCD
        If the reference covers less than ``config.min_overlap`` of the science pixels.
    InputError
        If an image is not 2-D or its variance/mask shape differs from its image.
    """
    a = int(config.lanczos_order)
    for name, e in (("science", science), ("reference", reference)):
        if np.ndim(e.image) != 2:
            raise InputError(f"{name} image must be 2-D, got shape {np.shape(e.image)}", path=e.path)
        if np.shape(e.variance) != np.shape(e.image) or np.shape(e.mask) != np.shape(e.image):
            raise InputError(f"{name} variance/mask shapes differ from its image {np.shape(e.image)}", path=e.path)
    shape = science.shape
    x_ref, y_ref, area_ratio, map_err = science_to_reference_map(
        science.wcs, reference.wcs, shape, step=config.map_step
    )
    rny, rnx = reference.shape
    covered = np.isfinite(x_ref) & np.isfinite(y_ref)
    covered &= (x_ref >= -0.5) & (x_ref <= rnx - 0.5) & (y_ref >= -0.5) & (y_ref <= rny - 0.5)
    overlap = float(covered.mean())
    if overlap < config.min_overlap:
        raise SkipCCD(
            f"reference {reference.path or '(in memory)'} covers {overlap:.1%} of science "
            f"{science.path or '(in memory)'} (align.min_overlap = {config.min_overlap:.1%}); "
            "no difference image for this CCD: check the reference selection for this field/CCD",
            qa={"overlap_fraction": overlap},
        )

    image, variance, mask, nodata = _resample_reference(reference, x_ref, y_ref, area_ratio, covered, a)
    sci_bad = (np.asarray(science.mask) & UNUSABLE) != 0
    astro = astrometric_residuals(np.asarray(science.image), sci_bad | nodata, image,
                                  ((mask & UNUSABLE) != 0) | nodata, match_radius=config.match_radius)
    correction = (0.0, 0.0)
    if config.refine_offset and _significant_offset(astro, config.refine_min_stars):
        # the aligned stars sit at sci + offset: map each science pixel as if it were pixel + offset
        correction = (astro["astrometric_offset_x"], astro["astrometric_offset_y"])
        x_ref, y_ref, area_ratio, map_err = science_to_reference_map(
            science.wcs, reference.wcs, shape, step=config.map_step, sci_offset=correction
        )
        covered = np.isfinite(x_ref) & np.isfinite(y_ref)
        covered &= (x_ref >= -0.5) & (x_ref <= rnx - 0.5) & (y_ref >= -0.5) & (y_ref <= rny - 0.5)
        image, variance, mask, nodata = _resample_reference(reference, x_ref, y_ref, area_ratio, covered, a)
        astro = astrometric_residuals(np.asarray(science.image), sci_bad | nodata, image,
                                      ((mask & UNUSABLE) != 0) | nodata, match_radius=config.match_radius)

    header = replace_wcs(reference.header, science.wcs)
    header["ALIGNTO"] = (str(science.path or ""), "science image whose grid this is")
    aligned = Exposure(image=image, variance=variance, mask=mask, wcs=science.wcs, header=header, path=reference.path)

    qa: dict[str, float | int | str] = {
        "overlap_fraction": overlap,
        "nodata_fraction": float(np.count_nonzero(mask & MaskBits.NO_DATA)) / mask.size,
        "pixel_area_ratio": _typical(area_ratio, covered, float("nan")),
        "map_interp_error": map_err,
        "astrometric_correction_x": correction[0],
        "astrometric_correction_y": correction[1],
    }
    qa.update(astro)
    return StageResult(aligned, qa)
