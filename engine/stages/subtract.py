"""Subtraction stage: ZOGY on a batch of science exposures and their aligned references.

Steps, for B CCDs at once on the device they live on: pixels unusable in either image are set to
0 (their variance to the image's median); the flux ratio F_r/F_n is measured from point sources
common to both catalogues (:func:`flux_ratio`, with the photometric zero points as a prior);
every image is cut into equal padded tiles (one PSF pair per tile) and the batched ZOGY kernel
runs on all B x T tiles in one call (:func:`nightsift.kernels.zogy.zogy`: float32 FFTs, PSFs
embedded on the device); the tile cores are stitched; the residual sky offset of D is removed
per tile (blank sky only); S_corr is zeroed on the grown mask, and divided by its blank-sky
standard deviation when ``subtract.renormalize_scorr`` (reported as ``scorr_std_raw``).
"""
from __future__ import annotations

import warnings

import numpy as np

from nightsift.kernels import psf as kpsf
from nightsift.kernels import tiles as ktiles
from nightsift.kernels._xp import array_namespace, to_device
from nightsift.kernels.morphology import dilate
from nightsift.kernels.background import median_mad_sigma, residual_sigma, robust_sigma
from nightsift.kernels.neighbours import count_within, nearest
from nightsift.kernels.stamps import count_in_boxes, gather_stamps
from nightsift.kernels.zogy import zogy

from ..config import SubtractConfig
from ..errors import AlgorithmFailure
from ..io.fits import header_photometry
from ..records import StageResult, SubtractionBatch, unusable_of

__all__ = ["subtract", "flux_ratio", "zero_point_flux_ratio", "combine_flux_ratio", "blank_sky", "paint_discs",
           "psf_fluxes", "decide_flux_ratio", "flux_ratio_warning"]


def psf_fluxes(image, model, x, y):
    """PSF-fit fluxes of sources at sub-pixel ``(x, y)``: ``sum(P I) / sum(P^2)`` with the tile's
    PSF shifted onto each source. In units where the PSF model sums to 1, i.e. exactly the flux
    normalisation ZOGY uses. ``image`` (ny, nx) and ``model`` (a PSFModel) on one device."""
    xp = array_namespace(image, x)
    s = model.stamps.shape[-1]
    st, _ = gather_stamps(image[None], None, x, y, size=s, fill=0.0)
    p = kpsf.fourier_shift(model.stamps[model.tile_of(x, y)], x - xp.rint(x), y - xp.rint(y))
    return (st.astype(xp.float64) * p).sum(axis=(1, 2)) / (p * p).sum(axis=(1, 2))


def zero_point_flux_ratio(sci_header, ref_header) -> float | None:
    """F_r expected from the photometric calibration of both images, or None.

    ``10**(0.4 (MAGZP_ref - MAGZP_sci)) * EXPTIME_ref / EXPTIME_sci`` with MAGZP (or MAGZPT /
    MAGZERO) the magnitude giving 1 e-/s in each image (e- images); None when either header lacks
    a zero point or a positive exposure time (:func:`~nightsift.engine.io.fits.header_photometry`).
    """
    sci, ref = header_photometry(sci_header), header_photometry(ref_header)
    if sci is None or ref is None:
        return None
    (zs, ts), (zr, tr) = sci, ref
    return float(10 ** (0.4 * (zr - zs)) * tr / ts)


def flux_ratio(N, R, sci_psf, ref_psf, sci_cat, ref_cat, unusable, *, prior: float | None,
               config: SubtractConfig, match_radius: float = 1.0, star_rms: float = 0.03, min_point: int = 5):
    """F_r / F_n from isolated point sources found in both background-subtracted images of one CCD
    (``unusable``: its ``(ny, nx)`` bool map of pixels unusable in either).

    Each star's flux is a PSF fit with its own image's PSF (so the ratio carries exactly the PSF
    normalisations ZOGY uses); the ratio is the inverse-variance-weighted mean of the per-star
    ratios after 3-sigma clipping, started from the median (sources that changed between the
    epochs -- a variable star, a transient on a nucleus -- are high-S/N outliers a weighted mean
    would follow). Stars from ``config.flux_ratio_min_snr``; ``prior`` (the zero points' F_r) keeps
    only ratios within ``config.flux_ratio_prior_window`` of it when at least 3 are.

    Returns device 0-d arrays ``(ratio, n_stars, error)``: the error is at least ``star_rms /
    sqrt(n)`` of the ratio (PSF-model errors per star) and at least the robust scatter of the kept
    ratios over ``sqrt(n)``. NaN ratio and 0 stars when nothing matches.
    """
    xp = array_namespace(N)
    nan = xp.full((), xp.nan)
    s_ok = (sci_cat.snr >= config.flux_ratio_min_snr) & (sci_cat.flag == 0)
    r_ok = (ref_cat.snr >= config.flux_ratio_min_snr) & (ref_cat.flag == 0)
    si = xp.nonzero(s_ok)[0]
    ri = xp.nonzero(r_ok)[0]
    if si.shape[0] == 0 or ri.shape[0] == 0:
        return nan, xp.zeros((), xp.int64), nan
    j, _ = nearest(sci_cat.x[si], sci_cat.y[si], ref_cat.x[ri], ref_cat.y[ri], radius=match_radius)
    hit = j >= 0
    si, rj = si[hit], ri[j[hit]]
    ny, nx = N.shape
    h = max(sci_psf.stamps.shape[-1], ref_psf.stamps.shape[-1]) // 2
    sx, sy = sci_cat.x[si], sci_cat.y[si]
    xi, yi = xp.rint(sx), xp.rint(sy)
    inside = (xi >= h) & (xi < nx - h) & (yi >= h) & (yi < ny - h)
    nbad = count_in_boxes(unusable[None], 0, sx, sy, half=h)
    # isolated: no other science source within the stamp (a neighbour biases both fits differently)
    crowd = count_within(sx, sy, sci_cat.x, sci_cat.y, radius=float(h), self_index=si)
    x = 0.5 * (sx + ref_cat.x[rj])
    y = 0.5 * (sy + ref_cat.y[rj])
    xc, yc = xp.clip(x, 0, nx - 1), xp.clip(y, 0, ny - 1)
    fs = psf_fluxes(N, sci_psf, xc, yc)
    fr = psf_fluxes(R, ref_psf, xc, yc)
    # point sources only (adaptive size on the stellar locus of both images): a galaxy may host a
    # transient, which would bias its ratio; a small CCD may hold too few: then every source
    point = sci_cat.point[si] & ref_cat.point[rj]
    usable = inside & (nbad == 0) & (fs > 0) & (fr > 0)
    good = usable & (crowd == 0)
    # a galaxy-rich field leaves few stars alone within a stamp: point sources with neighbours
    # (whose light is in both images, and barely under a PSF's core) are better than galaxies,
    # whose ratio follows the PSFs' (seen: 12 % off with 2.1 vs 2.0 px PSFs)
    crowded = usable & point
    good = xp.where((good & point).sum() >= min_point, good & point,
                    xp.where(crowded.sum() >= 3, crowded, good))
    ratio = xp.where(good, fr / xp.where(good, fs, 1.0), xp.nan)
    rel = xp.hypot(1 / sci_cat.snr[si], 1 / ref_cat.snr[rj])
    w = xp.where(good, 1 / (ratio * rel) ** 2, 0.0)
    keep = good
    if prior is not None and prior > 0:
        near = good & (xp.abs(ratio / prior - 1) < config.flux_ratio_prior_window)
        keep = xp.where(near.sum() >= 3, near, good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no usable star: NaN, decided by the caller
        mean = xp.nanmedian(xp.where(keep, ratio, xp.nan))
        window = keep
        scale = xp.ones(())
        for _ in range(5):
            resid = (ratio - mean) * xp.sqrt(w)
            scale = xp.maximum(1.0, residual_sigma(xp.where(keep, resid, xp.nan)))
            keep = window & (xp.abs(resid) < 3 * scale)
            mean = (xp.where(keep, w * ratio, 0.0).sum()) / xp.where(keep, w, 0.0).sum()
        n = keep.sum()
        err = scale / xp.sqrt(xp.where(keep, w, 0.0).sum())
        # the S/N-based error knows nothing of PSF-model errors, which move single-star ratios by a
        # few % (seen: 2-4 % scatter among S/N > 100 stars); never claim better than that
        err = xp.maximum(err, star_rms * mean / xp.sqrt(n))
        scatter = residual_sigma(xp.where(keep, ratio - mean, xp.nan)) / xp.sqrt(n)
        err = xp.where(n >= 3, xp.maximum(err, scatter), err)
    ok = n > 0
    return xp.where(ok, mean, xp.nan), n, xp.where(ok, err, xp.nan)


def combine_flux_ratio(stars: float, stars_err: float, prior: float, prior_rms: float) -> tuple[float, float]:
    """Inverse-variance mean of the star-based F_r and the zero-point F_r.

    Parameters
    ----------
    stars, stars_err : float
        :func:`flux_ratio` and its error.
    prior : float
        :func:`zero_point_flux_ratio`.
    prior_rms : float
        Relative error of the zero-point ratio (survey zero points per CCD: ~1-3 %).

    Returns
    -------
    (F_r, error). With many stars the stars decide; on a sparse CCD (3-5 faint stars scatter
    by 5-10 %) the zero points pull F_r back (seen: 0.905 from 4 stars for 1.024).
    """
    wp = 1.0 / (prior_rms * prior) ** 2
    ws = 1.0 / stars_err**2
    return float((ws * stars + wp * prior) / (ws + wp)), float(1.0 / np.sqrt(ws + wp))


def decide_flux_ratio(stars: float, n: int, err: float, prior: float | None, *, config: SubtractConfig,
                      path: str | None = None) -> tuple[float, dict]:
    """F_r for ZOGY from the stars' value and the zero points' (host numbers), with its QA.

    Raises
    ------
    AlgorithmFailure
        Fewer than 3 common stars and no photometric zero points in the headers.
    """
    qa = {"F_r": stars, "n_flux_stars": n, "F_r_err": err, "F_r_zero_points": prior, "F_r_source": "stars"}
    if prior is not None:
        off = min(config.flux_ratio_prior_window, config.flux_ratio_tolerance)
        if not np.isfinite(stars) or n == 0 or abs(stars / prior - 1) > off:
            # no usable common star (a small or sparse CCD), only changed ones, or a star fit that
            # disagrees with the zero points beyond what their flat and aperture terms explain (a
            # few %; :func:`flux_ratio_warning` says so loudly): both images are photometrically
            # calibrated, and a PSF measured on galaxies biases every star's fit (seen: 20 %), so
            # use the zero points
            if np.isfinite(stars) and n > 0:
                qa["F_r_stars"] = stars
            qa.update(F_r=prior, F_r_err=float("nan"), F_r_source="zero_points", F_r_stars=stars)
            return prior, qa
        if config.zero_point_rms > 0:
            f, e = combine_flux_ratio(stars, err, prior, config.zero_point_rms)
            qa.update(F_r=f, F_r_err=e, F_r_stars=stars, F_r_source="stars+zero_points")
            return f, qa
        return stars, qa
    if not np.isfinite(stars) or n < 3:
        where = f"{path}: " if path else ""
        raise AlgorithmFailure(f"{where}flux ratio: only {n} stars common to science and reference and no "
                               "photometric zero points (MAGZP, EXPTIME) in the headers (need 3 stars; check "
                               "the overlap and the reference depth)", stage="subtract", qa=qa)
    return stars, qa


def flux_ratio_warning(stars: float, n: int, prior: float | None, *, config: SubtractConfig) -> str | None:
    """A one-line QA warning when the star-fitted F_r and the zero points' disagree by more than
    ``subtract.flux_ratio_tolerance`` (:func:`decide_flux_ratio` then takes the zero points), or
    None (also without zero points or without a star value)."""
    if prior is None or not np.isfinite(stars) or n <= 0 or not prior > 0:
        return None
    off = stars / prior - 1
    if abs(off) <= config.flux_ratio_tolerance:
        return None
    return (f"flux ratio from {int(n)} stars {stars:.3f} is {100 * off:+.0f}% off the zero points' {prior:.3f} "
            f"(tolerance {100 * config.flux_ratio_tolerance:.0f}%): the zero points' value is used; check the PSFs "
            "and the MAGZP/EXPTIME cards")


def paint_discs(shape, image, x, y, r, *, buckets=(8, 16, 32, 64)):
    """Boolean ``(B, ny, nx)`` map True within radius ``r`` of each ``(x, y)`` of image ``image``.

    Sources are painted in radius buckets (one gather-free scatter of their bounding boxes per
    bucket, radius at most the bucket's), so the cost is the discs' area, not the image's.
    Radii are capped at the last bucket.
    """
    xp = array_namespace(x, y, r)
    B, ny, nx = shape
    out = xp.zeros(shape, bool)
    if x.shape[0] == 0:
        return out
    ri = xp.ceil(xp.minimum(r, buckets[-1])).astype(xp.int64)
    lo = 0
    for hi in buckets:
        sel = xp.nonzero((ri > lo) & (ri <= hi))[0]
        lo = hi
        if sel.shape[0] == 0:
            continue
        off = xp.arange(-hi, hi + 1, dtype=xp.int64)
        xc, yc = xp.rint(x[sel]).astype(xp.int64), xp.rint(y[sel]).astype(xp.int64)
        rr = ri[sel]
        dy = off[None, :, None]
        dx = off[None, None, :]
        inside = dx * dx + dy * dy <= (rr * rr)[:, None, None]
        yy = xp.broadcast_to(yc[:, None, None] + dy, inside.shape)
        xx = xp.broadcast_to(xc[:, None, None] + dx, inside.shape)
        inside = inside & (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        bb = xp.broadcast_to(image[sel][:, None, None], inside.shape)
        out[bb[inside], yy[inside], xx[inside]] = True
    return out


def blank_sky(shape, sci_cats, ref_cats, fwhm, excluded):
    """Pixels of blank sky ``(B, ny, nx)``: usable, and farther than 3 PSF FWHM (or 3 semi-major
    axes of an extended source, at most 64 px) from every source detected in either image. An
    image where that leaves less than 10 % of the CCD (a crowded field) uses all usable pixels.

    ``fwhm`` (B,) device: the largest PSF FWHM of the two images of each CCD.
    """
    xp = array_namespace(excluded)
    xs, ys, rs, ims = [], [], [], []
    for b, (sc, rc) in enumerate(zip(sci_cats, ref_cats)):
        for cat in (sc, rc):
            if len(cat) == 0:
                continue
            f = fwhm[b]
            size = xp.maximum(cat.a, xp.nan_to_num(cat.size) / kpsf.FWHM_PER_SIGMA)
            r = xp.minimum(xp.maximum(3 * f, 3 * size), xp.maximum(3 * f, 64.0))
            xs.append(cat.x)
            ys.append(cat.y)
            rs.append(r)
            ims.append(xp.full(len(cat), b, xp.int64))
    if xs:
        near = paint_discs(excluded.shape, xp.concatenate(ims), xp.concatenate(xs), xp.concatenate(ys),
                           xp.concatenate(rs))
    else:
        near = xp.zeros(excluded.shape, bool)
    blank = ~excluded & ~near
    B = excluded.shape[0]
    frac = blank.reshape(B, -1).mean(axis=1)
    return xp.where((frac >= 0.1)[:, None, None], blank, ~excluded)


def _clipped_mean_rows(v, *, clip: float = 4.0, min_count: int = 1000):
    """Per row of ``v`` (n, m) (NaN = not used): the mean within +-clip robust sigmas of the
    median (symmetric, so unbiased for a slightly skewed core); 0 for rows with fewer than
    ``min_count`` values."""
    xp = array_namespace(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med, sig = median_mad_sigma(v, axis=1)
        med, sig = med[:, None], sig[:, None]
        keep = xp.abs(v - med) <= clip * sig
        n = keep.sum(axis=1)
        mean = xp.where(keep, v, 0.0).sum(axis=1) / xp.maximum(n, 1)
    count = xp.isfinite(v).sum(axis=1)
    return xp.where(count > min_count, mean, 0.0)


def subtract(N, R, V_N, V_R, mask_sci, mask_ref, sci_psfs, ref_psfs, sci_cats, ref_cats, *, F_r, astrometric_rms,
             config: SubtractConfig, dtype=None) -> StageResult:
    """ZOGY difference, score and corrected score of a batch of science/aligned-reference pairs.

    Parameters
    ----------
    N, R : ndarray (B, ny, nx) float32, e-
        Background-subtracted science images and aligned references.
    V_N, V_R : ndarray (B, ny, nx) float32, e-^2
        Their variances.
    mask_sci, mask_ref : ndarray (B, ny, nx) uint16
    sci_psfs, ref_psfs : list of B PSFModel
        Per-tile PSFs on one tile grid (the reference's carried onto the science grid).
    sci_cats, ref_cats : list of B SourceCatalog
        On the science grid (for the blank-sky mask).
    F_r : sequence of B floats
        Flux ratios (:func:`decide_flux_ratio`).
    astrometric_rms : sequence of B (float, float)
        Registration RMS (px) per CCD.
    config : SubtractConfig
    dtype : real dtype of the FFTs (default ``config.fft_dtype``).

    Returns
    -------
    StageResult
        ``value``: :class:`~nightsift.engine.records.SubtractionBatch` (``.ccd(b)`` gives one
        CCD's :class:`~nightsift.engine.records.Subtraction`). ``qa``: ``(B,)`` arrays or lists
        ``sigma_n``, ``sigma_r``, ``F_D``, ``n_tiles``, ``astrometric_rms_x/y``, ``scorr_std_raw``,
        ``scorr_std``, ``scorr_mean``, ``excluded_fraction``, ``blank_fraction``,
        ``difference_offset``, ``apcorr``.
    """
    xp = array_namespace(N, R, V_N, V_R)
    B, ny, nx = N.shape
    grid = sci_psfs[0].grid
    T = len(grid)
    f32 = xp.float32
    mask = mask_sci | mask_ref
    unusable = unusable_of(mask)
    N, R, V_N, V_R, med_vn, med_vr = _usable_inputs(N, R, V_N, V_R, unusable)
    D, S_corr, flux, flux_err, P_D, F_D, F_S, sig_n, sig_r = _zogy_tiles(
        N, R, V_N, V_R, med_vn, med_vr, sci_psfs, ref_psfs, F_r=F_r, astrometric_rms=astrometric_rms,
        dtype=np.dtype(dtype or config.fft_dtype))

    excluded = dilate(unusable, iterations=config.mask_grow, structure="cross")
    fwhm = xp.stack([xp.maximum(sp.fwhm.max(), rp.fwhm.max()) for sp, rp in zip(sci_psfs, ref_psfs)])
    blank = blank_sky((B, ny, nx), sci_cats, ref_cats, fwhm, excluded)
    qa = {}
    if config.remove_difference_offset:
        D, S_corr, flux, offsets = _remove_difference_offset(D, S_corr, flux, flux_err, blank, F_D, F_S, grid)
        qa["difference_offset"] = xp.median(offsets.reshape(B, T), axis=1)
    difference = D / ktiles.per_tile(F_D.astype(f32), grid, batch=B)
    S_corr = xp.where(excluded, f32(0), S_corr)
    D = xp.where(unusable, f32(0), D)
    difference = xp.where(unusable, f32(0), difference)

    S_corr, flux_err, live, std_raw = _scorr_on_blank_sky(S_corr, flux_err, blank,
                                                          renormalize=config.renormalize_scorr)
    qa["scorr_std_raw"] = std_raw
    apcorr = xp.concatenate([p.apcorr for p in sci_psfs]).astype(xp.float64)
    ap_map = ktiles.per_tile(apcorr.astype(f32), grid, batch=B)
    flux = flux * ap_map
    flux_err = flux_err * ap_map
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        qa.update(sigma_n=xp.median(sig_n.reshape(B, T), axis=1), sigma_r=xp.median(sig_r.reshape(B, T), axis=1),
                  F_D=xp.median(F_D.reshape(B, T), axis=1), n_tiles=[T] * B,
                  astrometric_rms_x=[float(a[0]) for a in astrometric_rms],
                  astrometric_rms_y=[float(a[1]) for a in astrometric_rms],
                  scorr_std=robust_sigma(live, axis=-1), scorr_mean=xp.nanmedian(live, axis=1),
                  excluded_fraction=excluded.reshape(B, -1).mean(axis=1),
                  blank_fraction=blank.reshape(B, -1).mean(axis=1),
                  apcorr=xp.median(apcorr.reshape(B, T), axis=1))
    batch = SubtractionBatch(D=D, difference=difference, S_corr=S_corr, flux=flux, flux_err=flux_err, mask=mask,
                             excluded=excluded, P_D=P_D, F_D=F_D, F_S=F_S, apcorr=apcorr, grid=grid,
                             F_r=tuple(float(f) for f in F_r),
                             stamp=tuple(max(a.stamps.shape[-1], b.stamps.shape[-1])
                                         for a, b in zip(sci_psfs, ref_psfs)))
    return StageResult(batch, qa)


def _usable_inputs(N, R, V_N, V_R, unusable):
    """The images with their unusable pixels 0, the variances with those (and non-finite ones) at
    each image's median usable variance (from every 4th pixel; 1 for a fully masked image), and
    those medians ``(B,)``: ``(N, R, V_N, V_R, med_vn, med_vr)``."""
    xp = array_namespace(N, R, V_N, V_R)
    B = N.shape[0]
    f32 = xp.float32
    N = xp.where(unusable, f32(0), N)
    R = xp.where(unusable, f32(0), R)
    sub = (slice(None), slice(None, None, 4), slice(None, None, 4))
    usable_s = ~unusable[sub]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fully masked image: NaN -> 1 below
        med_vn = xp.nan_to_num(xp.nanmedian(xp.where(usable_s, V_N[sub], xp.nan).reshape(B, -1), axis=1), nan=1.0)
        med_vr = xp.nan_to_num(xp.nanmedian(xp.where(usable_s, V_R[sub], xp.nan).reshape(B, -1), axis=1), nan=1.0)
    V_N = xp.where(unusable | ~xp.isfinite(V_N), med_vn.astype(f32)[:, None, None], V_N)
    V_R = xp.where(unusable | ~xp.isfinite(V_R), med_vr.astype(f32)[:, None, None], V_R)
    return N, R, V_N, V_R, med_vn, med_vr


def _zogy_tiles(N, R, V_N, V_R, med_vn, med_vr, sci_psfs, ref_psfs, *, F_r, astrometric_rms, dtype):
    """ZOGY on every tile of the batch in one call, stitched back onto the CCDs.

    The ``(B, ny, nx)`` inputs are cut into one ``(B * T, s, s)`` stack per quantity (variances
    padded with each image's median), the PSF stamps embedded at the tile size, the background
    noise of each tile taken as the square root of its median variance.

    Returns
    -------
    D, S_corr, flux, flux_err : ndarray (B, ny, nx) float32
        Stitched tile cores (``flux = S / F_S``, ``flux_err`` its error with astrometric noise).
    P_D : (B * T, s, s) float64
        PSF of D, cropped to the batch's largest PSF stamp.
    F_D, F_S, sig_n, sig_r : (B * T,) float64
    """
    xp = array_namespace(N, R, V_N, V_R)
    B = N.shape[0]
    grid = sci_psfs[0].grid
    T = len(grid)
    f32 = xp.float32
    tN = ktiles.cut_tiles(N, grid, fill=0.0)
    tR = ktiles.cut_tiles(R, grid, fill=0.0)
    tVN = ktiles.cut_tiles(V_N, grid, fill=np.nan)
    tVR = ktiles.cut_tiles(V_R, grid, fill=np.nan)
    ccd = xp.repeat(xp.arange(B), T)
    tVN = xp.where(xp.isnan(tVN), med_vn.astype(f32)[ccd][:, None, None], tVN)
    tVR = xp.where(xp.isnan(tVR), med_vr.astype(f32)[ccd][:, None, None], tVR)
    stamp = max(max(p.stamps.shape[-1] for p in sci_psfs), max(p.stamps.shape[-1] for p in ref_psfs))
    pn = xp.concatenate([_pad_stamps(p.stamps, stamp) for p in sci_psfs]).astype(f32)
    pr = xp.concatenate([_pad_stamps(p.stamps, stamp) for p in ref_psfs]).astype(f32)
    ts = grid.tile_shape
    tPn, tPr = kpsf.embed_psf(pn, ts), kpsf.embed_psf(pr, ts)
    # background noise per tile for the optimal filter: the median variance of the tile
    sig_n = xp.sqrt(xp.median(tVN[:, ::4, ::4].reshape(B * T, -1), axis=1))
    sig_r = xp.sqrt(xp.median(tVR[:, ::4, ::4].reshape(B * T, -1), axis=1))
    host = np.array([[F_r[b]] + list(astrometric_rms[b]) for b in range(B)], np.float64)
    par = to_device(np.repeat(host, T, axis=0), xp, label="zogy_parameters")
    res = zogy(tN, tR, tPn, tPr, tVN, tVR, sigma_n=sig_n, sigma_r=sig_r, F_r=par[:, 0],
               astrometric_rms=(par[:, 1], par[:, 2]), dtype=dtype)
    del tN, tR, tVN, tVR, tPn, tPr
    F_D, F_S = res.F_D.astype(xp.float64), res.F_S.astype(xp.float64)
    inv = 1.0 / F_S
    D = ktiles.stitch_tiles(res.D.astype(f32), grid, batch=B)
    S_corr = ktiles.stitch_tiles(res.S_corr.astype(f32), grid, batch=B)
    flux = ktiles.stitch_tiles((res.S * inv[:, None, None].astype(res.S.dtype)).astype(f32), grid, batch=B)
    flux_err = ktiles.stitch_tiles((xp.sqrt(res.V_S + res.V_ast) * inv[:, None, None].astype(res.S.dtype)).astype(f32),
                                   grid, batch=B)
    P_D = kpsf.crop_embedded(res.P_D, stamp).astype(xp.float64)
    return D, S_corr, flux, flux_err, P_D, F_D, F_S, sig_n, sig_r


def _remove_difference_offset(D, S_corr, flux, flux_err, blank, F_D, F_S, grid):
    """Remove the residual sky offset of D per tile; returns ``(D, S_corr, flux, offsets)``.

    Faint-source confusion biases the sky estimate of the shallower image by a few % of sigma,
    which leaves an offset B_D in D (unit white noise, seen as a shifted S_corr mean). It is
    measured per tile as the symmetric-clipped mean of D on blank sky (every 2nd pixel of the tile
    core; not the median: Poisson noise makes D's pixels slightly skewed, while S_corr, a smoothed
    D, follows D's mean) and removed from D and, consistently, from S (offset F_D B_D: P_D has unit
    sum), S_corr and the flux map. ``offsets`` is ``(B * T,)``.
    """
    xp = array_namespace(D, S_corr, blank)
    B = D.shape[0]
    T = len(grid)
    f32 = xp.float32
    cD = ktiles.core_views(D, grid)[:, ::2, ::2]
    cb = ktiles.core_views(blank.astype(f32), grid)[:, ::2, ::2]
    v = xp.where(cb == 1, cD, xp.nan).reshape(B * T, -1)
    offsets = _clipped_mean_rows(v, min_count=1000 // 4)
    off_map = ktiles.per_tile(offsets.astype(f32), grid, batch=B)
    fd_map = ktiles.per_tile(F_D.astype(f32), grid, batch=B)
    fs_map = ktiles.per_tile(F_S.astype(f32), grid, batch=B)
    with np.errstate(divide="ignore", invalid="ignore"):
        S_corr = S_corr - xp.where(flux_err > 0, fd_map * off_map / (flux_err * fs_map), f32(0))
    flux = flux - fd_map * off_map / fs_map
    D = D - off_map
    return D, S_corr, flux, offsets


def _scorr_on_blank_sky(S_corr, flux_err, blank, *, renormalize: bool):
    """The robust standard deviation of S_corr on blank sky per CCD (a subsample of at most ~2
    million pixels), and with ``renormalize`` S_corr divided by it (``flux_err`` multiplied).

    Returns ``(S_corr, flux_err, live, std_raw)``: ``live`` the ``(B, m)`` blank-sky subsample of
    the (renormalised) S_corr, NaN elsewhere; ``std_raw`` ``(B,)`` the standard deviation before.
    """
    xp = array_namespace(S_corr, flux_err, blank)
    B, ny, nx = S_corr.shape
    step = max(1, int(np.sqrt(ny * nx / 2_000_000)))
    blank_s = blank[:, ::step, ::step].reshape(B, -1)
    live = xp.where(blank_s, S_corr[:, ::step, ::step].reshape(B, -1), xp.nan)
    std_raw = robust_sigma(live, axis=-1)
    if renormalize:
        ok = xp.isfinite(std_raw) & (std_raw > 0)
        fac = xp.where(ok, std_raw, 1.0).astype(xp.float32)[:, None, None]
        S_corr = S_corr / fac
        flux_err = flux_err * fac
        live = live / fac.reshape(B, 1)
    return S_corr, flux_err, live, std_raw


def _pad_stamps(stamps, size: int):
    """Zero-pad centred ``(T, s, s)`` stamps to ``(T, size, size)``."""
    xp = array_namespace(stamps)
    s = stamps.shape[-1]
    if s == size:
        return stamps
    p = (size - s) // 2
    out = xp.zeros(stamps.shape[:-2] + (size, size), dtype=stamps.dtype)
    out[..., p:p + s, p:p + s] = stamps
    return out
