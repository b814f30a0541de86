"""Subtraction stage: ZOGY on a science exposure and a reference aligned onto its grid.

Steps: background-subtract both images (from the PSF stage), replace pixels unusable in either
image by 0 (their variance by the tile's median), measure the flux ratio F_r/F_n from stars
common to both, cut the CCD into equal padded tiles (one PSF pair per tile), run the batched ZOGY
kernel on the whole tile stack, stitch the tile cores, and zero S_corr on the grown mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nightsift.kernels import psf as kpsf
from nightsift.kernels import tiles as ktiles
from nightsift.kernels.background import robust_sigma
from nightsift.kernels.zogy import zogy

from ..config import SubtractConfig
from ..errors import AlgorithmFailure
from ..records import UNUSABLE, Exposure, StageResult, ZERO_POINT_KEYS
from .psf import ImagePSF


@dataclass(frozen=True)
class Subtraction:
    """ZOGY products on the science pixel grid.

    Attributes
    ----------
    D : ndarray (ny, nx) float32
        Proper difference image (unit-variance white noise on blank sky), in units of F_D.
    difference : ndarray (ny, nx) float32
        ``D / F_D``: the difference in science flux units (e-), what the cutouts show.
    S_corr : ndarray (ny, nx) float32
        Corrected score (sigma); 0 on the grown mask.
    flux : ndarray (ny, nx) float32
        ``apcorr * S / F_S``: total flux (e-, science units) of a point source centred on each
        pixel (PSF flux times the science PSF's aperture correction).
    flux_err : ndarray (ny, nx) float32
        1-sigma error of ``flux`` (background, source and astrometric noise).
    P_D : ndarray (T, s, s) float64
        PSF of D per tile (unit sum, centre pixel s // 2).
    F_D, F_S : ndarray (T,)
        Flux zero point of D and the normalisation of S per tile.
    mask : ndarray (ny, nx) uint16
        Union of the science and aligned-reference masks.
    excluded : ndarray (ny, nx) bool
        Pixels where S_corr was zeroed (unusable pixels grown by ``mask_grow``).
    grid : TileGrid
    F_r : float
        Reference flux zero point relative to the science (F_n = 1).
    apcorr : ndarray (T,)
        Aperture correction of the science PSF per tile, applied to ``flux``/``flux_err`` (and
        to the candidates' fluxes): PSF flux with the unit-sum model -> total flux.
    """

    D: np.ndarray
    difference: np.ndarray
    S_corr: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    P_D: np.ndarray
    F_D: np.ndarray
    F_S: np.ndarray
    mask: np.ndarray
    excluded: np.ndarray
    grid: ktiles.TileGrid
    F_r: float
    apcorr: np.ndarray | None = None


def psf_fluxes(image: np.ndarray, model, x, y) -> np.ndarray:
    """PSF-fit fluxes of sources at sub-pixel ``(x, y)``: ``sum(P I) / sum(P^2)`` with the tile's
    PSF shifted onto each source. In units where the PSF model sums to 1, i.e. exactly the flux
    normalisation ZOGY uses."""
    from nightsift.kernels.stamps import extract_stamps

    s = model.stamps.shape[-1]
    xi, yi = np.rint(x), np.rint(y)
    st, _ = extract_stamps(image, x, y, size=s, fill=0.0)
    p = kpsf.fourier_shift(model.stamps[model.grid.tile_of(x, y)], x - xi, y - yi)
    return (np.asarray(st, np.float64) * p).sum(axis=(1, 2)) / (p * p).sum(axis=(1, 2))


def zero_point_flux_ratio(sci_header, ref_header) -> float | None:
    """F_r expected from the photometric calibration of both images, or None.

    ``10**(0.4 (MAGZP_ref - MAGZP_sci)) * EXPTIME_ref / EXPTIME_sci`` with MAGZP (or MAGZPT /
    MAGZERO) the magnitude giving 1 e-/s in each image (e- images); None when either header lacks
    a zero point or an exposure time.
    """
    def get(h, keys):
        for k in keys:
            if h is not None and k in h:
                try:
                    v = float(h[k])
                except (TypeError, ValueError):
                    return None
                return v if np.isfinite(v) else None
        return None

    zs, zr = get(sci_header, ZERO_POINT_KEYS), get(ref_header, ZERO_POINT_KEYS)
    ts, tr = get(sci_header, ("EXPTIME",)), get(ref_header, ("EXPTIME",))
    if None in (zs, zr, ts, tr) or ts <= 0 or tr <= 0:
        return None
    return float(10 ** (0.4 * (zr - zs)) * tr / ts)


#: relative distance from the zero-point F_r within which star ratios are trusted; a star-based F_r
#: farther than this from it is replaced by it
PRIOR_WINDOW = 0.3


def flux_ratio(sci: np.ndarray, ref: np.ndarray, sci_psf: ImagePSF, ref_psf: ImagePSF, *, unusable,
               min_snr: float = 20.0, match_radius: float = 1.0, prior: float | None = None,
               prior_window: float = PRIOR_WINDOW, star_rms: float = 0.03):
    """F_r / F_n from isolated stars found in both background-subtracted images on one grid.

    Each star's flux is a PSF fit with its own image's PSF (so the ratio carries exactly the PSF
    normalisations ZOGY uses); the ratio is the inverse-variance-weighted mean of the per-star
    ratios after 3-sigma clipping. Returns ``(ratio, n_stars, error of the ratio)``.

    ``prior`` (e.g. :func:`zero_point_flux_ratio`) guards against a field where most common
    sources changed (transients on galaxy nuclei, variable stars; a sparse star field): only
    ratios within ``prior_window`` (relative) of it are used when at least 3 are; the measured
    value still sets F_r (the zero points need not include this CCD's flat or aperture terms).

    The returned error is at least ``star_rms / sqrt(n)`` of the ratio (PSF-model errors per
    star) and at least the robust scatter of the kept ratios over ``sqrt(n)``.
    """
    from scipy.spatial import cKDTree

    sc, rc = sci_psf.catalog, ref_psf.catalog
    s = sc[(sc["snr"] >= min_snr) & (sc["flag"] == 0)]
    r = rc[(rc["snr"] >= min_snr) & (rc["flag"] == 0)]
    if len(s) == 0 or len(r) == 0:
        return np.nan, 0, np.nan
    d, j = cKDTree(np.c_[r["x"], r["y"]]).query(np.c_[s["x"], s["y"]], distance_upper_bound=match_radius)
    ok = np.isfinite(d)
    s, r = s[ok], r[j[ok]]
    ny, nx = sci.shape
    h = max(sci_psf.model.stamps.shape[-1], ref_psf.model.stamps.shape[-1]) // 2
    xi, yi = np.rint(s["x"]).astype(int), np.rint(s["y"]).astype(int)
    inside = (xi >= h) & (xi < nx - h) & (yi >= h) & (yi < ny - h)
    s, r, xi, yi = s[inside], r[inside], xi[inside], yi[inside]
    if len(s) == 0:
        return np.nan, 0, np.nan
    integ = np.pad(np.cumsum(np.cumsum(unusable.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    nbad = integ[yi + h + 1, xi + h + 1] - integ[yi - h, xi + h + 1] - integ[yi + h + 1, xi - h] + integ[yi - h, xi - h]
    # isolated: no other source within the stamp (a neighbour biases both fits differently)
    tree = cKDTree(np.c_[sc["x"], sc["y"]])
    crowded = np.array([len(tree.query_ball_point([a, b], r=h)) > 1 for a, b in zip(s["x"], s["y"])], bool)
    x = 0.5 * (s["x"] + r["x"])
    y = 0.5 * (s["y"] + r["y"])
    fs = psf_fluxes(sci, sci_psf.model, x, y)
    fr = psf_fluxes(ref, ref_psf.model, x, y)
    # point sources only (adaptive-moment size on the stellar locus of both images, see
    # psf.psf_stage): a galaxy may host a transient, which would bias its ratio
    point = s["point"] & r["point"]
    good = (nbad == 0) & ~crowded & (fs > 0) & (fr > 0)
    if (good & point).sum() >= 5:  # a small CCD may hold too few stars: then use every source
        good &= point
    if good.sum() == 0:
        return np.nan, 0, np.nan
    fs, fr = fs[good], fr[good]
    ratio = fr / fs
    # error of each ratio from both fluxes' S/N (the catalogue S/N of each image)
    rel = np.hypot(1 / s["snr"][good], 1 / r["snr"][good])
    w = 1 / (ratio * rel) ** 2
    # Start from the median, not the weighted mean: sources that changed between the epochs (a
    # variable star, a transient on a galaxy nucleus) are outliers with high S/N, and a crowded CCD
    # can hold dozens; a weighted mean they pull would let the clipping keep them (seen: F_r 0.29
    # instead of 1.04 with 32 such sources among 48 stars).
    keep = np.ones(ratio.size, bool)
    if prior is not None and prior > 0:
        near = np.abs(ratio / prior - 1) < prior_window
        if near.sum() >= 3:
            keep = near
    mean = float(np.median(ratio[keep]))
    window = keep.copy()
    for _ in range(5):
        resid = (ratio - mean) * np.sqrt(w)
        scale = max(1.0, 1.4826 * float(np.median(np.abs(resid[keep]))))
        keep = window & (np.abs(resid) < 3 * scale)
        mean = float(np.sum(w[keep] * ratio[keep]) / np.sum(w[keep]))
    n = int(keep.sum())
    err = scale / np.sqrt(np.sum(w[keep]))
    # the S/N-based error knows nothing of PSF-model errors, which move single-star ratios by a few
    # % (seen: 2-4 % scatter among S/N > 100 stars); never claim better than their scatter allows
    err = max(err, star_rms * mean / np.sqrt(n))
    if n >= 3:
        err = max(err, 1.4826 * float(np.median(np.abs(ratio[keep] - mean))) / np.sqrt(n))
    return float(mean), n, float(err)


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


def subtract(science: Exposure, reference: Exposure, sci_psf: ImagePSF, ref_psf: ImagePSF, *,
             config: SubtractConfig, astrometric_rms: tuple[float, float] | None = None,
             dtype=None, xp=np) -> StageResult:
    """ZOGY difference, score and corrected score of a science/aligned-reference pair.

    Parameters
    ----------
    science : Exposure
        Calibrated science exposure (e-).
    reference : Exposure
        Reference aligned onto the science grid (same shape), e-.
    sci_psf, ref_psf : ImagePSF
        PSF-stage results for both images on the same tile grid.
    config : SubtractConfig
    astrometric_rms : (float, float), optional
        Registration RMS (px) from the alignment; ``config.default_astrometric_rms`` if None.
    dtype : real dtype of the FFT computation (default ``config.fft_dtype``).
    xp : numpy or cupy
        Where the ZOGY kernel runs (inputs are moved there once, results moved back).

    Returns
    -------
    StageResult(Subtraction, qa) with qa ``F_r``, ``n_flux_stars``, ``sigma_n``, ``sigma_r``,
    ``scorr_std`` (robust, on unmasked pixels), ``scorr_mean``, ``excluded_fraction``.
    """
    if science.shape != reference.shape:
        raise AlgorithmFailure(f"science {science.shape} and aligned reference {reference.shape} differ in shape",
                               stage="subtract")
    grid = sci_psf.model.grid
    N = np.asarray(science.image, dtype=np.float32) - sci_psf.sky
    R = np.asarray(reference.image, dtype=np.float32) - ref_psf.sky
    mask = (np.asarray(science.mask) | np.asarray(reference.mask)).astype(np.uint16)
    unusable = (mask & UNUSABLE) != 0
    stamp = max(sci_psf.model.stamps.shape[-1], ref_psf.model.stamps.shape[-1])
    prior = zero_point_flux_ratio(science.header, reference.header)
    F_r, n_flux, F_r_err = flux_ratio(N, R, sci_psf, ref_psf, unusable=unusable, prior=prior)
    qa = {"F_r": F_r, "n_flux_stars": n_flux, "F_r_err": F_r_err, "F_r_zero_points": prior}
    if prior is not None:
        if not np.isfinite(F_r) or n_flux == 0 or abs(F_r / prior - 1) > PRIOR_WINDOW:
            # no usable common star (a small or sparse CCD), or only changed ones: both images are
            # photometrically calibrated, so use the zero points (they miss this CCD's flat and
            # aperture terms, a few %)
            F_r, F_r_err = prior, float("nan")
            qa.update(F_r=F_r, F_r_err=F_r_err, F_r_source="zero_points")
        elif config.zero_point_rms > 0:
            F_r_stars = F_r
            F_r, F_r_err = combine_flux_ratio(F_r, F_r_err, prior, config.zero_point_rms)
            qa.update(F_r=F_r, F_r_err=F_r_err, F_r_stars=F_r_stars, F_r_source="stars+zero_points")
        else:
            qa["F_r_source"] = "stars"
    elif not np.isfinite(F_r) or n_flux < 3:
        raise AlgorithmFailure(f"flux ratio: only {n_flux} stars common to science and reference and no "
                               "photometric zero points (MAGZP, EXPTIME) in the headers (need 3 stars; check "
                               "the overlap and the reference depth)", stage="subtract", qa=qa)

    V_N = np.asarray(science.variance, dtype=np.float32)
    V_R = np.asarray(reference.variance, dtype=np.float32)
    N = np.where(unusable, 0, N)
    R = np.where(unusable, 0, R)
    med_vn = float(np.median(V_N[~unusable])) if (~unusable).any() else 1.0
    med_vr = float(np.median(V_R[~unusable])) if (~unusable).any() else 1.0
    V_N = np.where(unusable | ~np.isfinite(V_N), med_vn, V_N)
    V_R = np.where(unusable | ~np.isfinite(V_R), med_vr, V_R)

    # batched tiles: one (T, ty, tx) stack per quantity
    tN = ktiles.cut_tiles(N, grid, fill=0.0)
    tR = ktiles.cut_tiles(R, grid, fill=0.0)
    tVN = ktiles.cut_tiles(V_N, grid, fill=med_vn)
    tVR = ktiles.cut_tiles(V_R, grid, fill=med_vr)
    ts = grid.tile_shape
    pn = _pad_stamps(sci_psf.model.stamps, stamp)
    pr = _pad_stamps(ref_psf.model.stamps, stamp)
    tPn, tPr = kpsf.embed_psf(pn, ts), kpsf.embed_psf(pr, ts)
    # background noise per tile for the optimal filter: the median variance of the tile
    sig_n = np.sqrt(np.median(tVN.reshape(len(grid), -1), axis=1))
    sig_r = np.sqrt(np.median(tVR.reshape(len(grid), -1), axis=1))
    if astrometric_rms is None:
        astrometric_rms = (config.default_astrometric_rms, config.default_astrometric_rms)

    dev = (lambda a: xp.asarray(a)) if xp is not np else (lambda a: a)  # noqa: E731
    res = zogy(dev(tN), dev(tR), dev(tPn), dev(tPr), dev(tVN), dev(tVR), sigma_n=dev(sig_n), sigma_r=dev(sig_r),
               F_r=F_r, astrometric_rms=astrometric_rms, dtype=dtype or np.dtype(config.fft_dtype))
    host = (lambda a: np.asarray(a.get() if hasattr(a, "get") else a))  # noqa: E731
    F_S = host(res.F_S)
    D_tiles = host(res.D)
    D = ktiles.stitch_tiles(D_tiles.astype(np.float32), grid)
    difference = ktiles.stitch_tiles((D_tiles / host(res.F_D)[:, None, None]).astype(np.float32), grid)
    S_corr = ktiles.stitch_tiles(host(res.S_corr).astype(np.float32), grid)
    fs = F_S[:, None, None]
    flux = ktiles.stitch_tiles((host(res.S) / fs).astype(np.float32), grid)
    flux_err = ktiles.stitch_tiles((np.sqrt(host(res.V_S + res.V_ast)) / fs).astype(np.float32), grid)
    P_D = kpsf.crop_embedded(host(res.P_D), stamp)

    excluded = unusable
    if config.mask_grow > 0 and unusable.any():
        excluded = ndimage.binary_dilation(unusable, iterations=config.mask_grow)

    # Residual sky: an error in either sky estimate (faint-source confusion biases the sky of the
    # shallower image by a few % of sigma) leaves a smooth offset B_D in D (unit white noise, so a
    # mesh median measures it to ~1 % of sigma; the median, since star residuals skew the mean). Remove it from D and, consistently,
    # from S (offset F_D B_D, P_D has unit sum), S_corr and the flux maps.
    blank = blank_sky(sci_psf, ref_psf, excluded)
    if config.remove_difference_offset:
        # Residual sky: faint-source confusion biases the sky estimate of the shallower image by a
        # few % of sigma, which leaves an offset B in D (seen as a shifted S_corr mean). Measure B
        # per tile as the symmetric-clipped mean of D on blank sky (not the median: Poisson noise
        # makes D's pixels slightly skewed, while S_corr, a smoothed D, is Gaussian and follows
        # D's mean; 1e5-1e6 pixels make it precise to ~0.003 sigma) and
        # remove it from D and, consistently, from S (offset F_D B: P_D has unit sum), S_corr and
        # the flux maps.
        F_D_t, offsets = host(res.F_D), np.zeros(len(grid))
        for t, (y0, x0) in enumerate(grid.origins):
            sl = (slice(y0, y0 + grid.core), slice(x0, x0 + grid.core))
            b = blank[sl]
            if b.sum() > 1000:
                offsets[t] = _clipped_mean(D[sl][b])
        for t, (y0, x0) in enumerate(grid.origins):
            sl = (slice(y0, y0 + grid.core), slice(x0, x0 + grid.core))
            B = offsets[t]
            with np.errstate(divide="ignore", invalid="ignore"):
                S_corr[sl] -= np.where(flux_err[sl] > 0, F_D_t[t] * B / (flux_err[sl] * F_S[t]), 0).astype(np.float32)
            flux[sl] -= np.float32(F_D_t[t] * B / F_S[t])
            D[sl] -= np.float32(B)
            difference[sl] -= np.float32(B / F_D_t[t])
        qa["difference_offset"] = float(np.median(offsets))
    S_corr[excluded] = 0.0
    D[unusable] = 0.0
    difference[unusable] = 0.0

    live = S_corr[blank]
    std_raw = robust_sigma(live[:: max(1, live.size // 2_000_000)]) if live.size else float("nan")
    qa["scorr_std_raw"] = std_raw
    if config.renormalize_scorr and np.isfinite(std_raw) and std_raw > 0:
        S_corr /= np.float32(std_raw)
        flux_err *= np.float32(std_raw)
        live = S_corr[blank]
    qa.update(sigma_n=float(np.median(sig_n)), sigma_r=float(np.median(sig_r)),
              F_D=float(np.median(host(res.F_D))), n_tiles=len(grid),
              astrometric_rms_x=float(astrometric_rms[0]), astrometric_rms_y=float(astrometric_rms[1]),
              scorr_std=robust_sigma(live[:: max(1, live.size // 2_000_000)]) if live.size else float("nan"),
              scorr_mean=float(np.median(live)) if live.size else float("nan"),
              excluded_fraction=float(excluded.mean()), blank_fraction=float(blank.mean()))
    apcorr = np.asarray(sci_psf.model.apcorr, dtype=np.float64)
    for t, (y0, x0) in enumerate(grid.origins):
        sl = (slice(y0, y0 + grid.core), slice(x0, x0 + grid.core))
        flux[sl] *= np.float32(apcorr[t])
        flux_err[sl] *= np.float32(apcorr[t])
    qa["apcorr"] = float(np.median(apcorr))
    sub = Subtraction(D=D, difference=difference, S_corr=S_corr, flux=flux, flux_err=flux_err, P_D=P_D, F_D=host(res.F_D), F_S=F_S,
                      mask=mask, excluded=excluded, grid=grid, F_r=F_r, apcorr=apcorr)
    return StageResult(sub, qa)


def blank_sky(sci_psf: ImagePSF, ref_psf: ImagePSF, excluded: np.ndarray) -> np.ndarray:
    """Pixels of blank sky: usable, and farther than 3 PSF FWHM (or 3 isophotal semi-major axes,
    at most 64 px) from every source detected in either image. Falls back to all usable pixels if that leaves
    less than 10 % of the CCD (a crowded field)."""
    ny, nx = excluded.shape
    fwhm = max(float(np.max(sci_psf.model.fwhm)), float(np.max(ref_psf.model.fwhm)))
    near = np.zeros((ny, nx), bool)
    for cat in (sci_psf.catalog, ref_psf.catalog):
        if len(cat) == 0:
            continue
        # 3 FWHM, or 3 isophotal semi-major axes for an extended source, capped (a satellite trail
        # or a huge galaxy would otherwise mask a disc of its whole length)
        r = np.minimum(np.maximum(3 * fwhm, 3 * cat["a"]), max(3 * fwhm, 64.0))
        paint_discs(near, cat["x"], cat["y"], r)
    blank = ~excluded & ~near
    return blank if blank.mean() >= 0.1 else ~excluded


def paint_discs(mask: np.ndarray, x, y, r) -> None:
    """Set ``mask`` (bool, (ny, nx), in place) True within radius ``r`` of each ``(x, y)``.

    Cost is the discs' area (one bounding box per source), not the image's area per radius as a
    binary dilation would be: ~0.1 s for 20,000 sources on a 4k x 4k CCD.
    """
    ny, nx = mask.shape
    for xc, yc, rc in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(r, float)):
        xi, yi = int(round(xc)), int(round(yc))
        ri = int(np.ceil(rc))
        y0, y1 = max(yi - ri, 0), min(yi + ri + 1, ny)
        x0, x1 = max(xi - ri, 0), min(xi + ri + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1) - yi)[:, None]
        dx = (np.arange(x0, x1) - xi)[None, :]
        mask[y0:y1, x0:x1] |= dx * dx + dy * dy <= ri * ri


def _clipped_mean(v: np.ndarray, clip: float = 4.0) -> float:
    """Mean of ``v`` within +-clip robust sigmas of the median (symmetric, so unbiased for a
    slightly skewed core)."""
    med = np.median(v)
    sig = 1.4826 * np.median(np.abs(v - med))
    return float(np.mean(v[np.abs(v - med) <= clip * sig]))


def _pad_stamps(stamps: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad centred ``(T, s, s)`` stamps to ``(T, size, size)``."""
    s = stamps.shape[-1]
    if s == size:
        return stamps
    p = (size - s) // 2
    return np.pad(stamps, ((0, 0), (p, p), (p, p)))
