"""PSF stage: find bright isolated stars and build an empirical PSF per tile.

The PSF of a tile is the robust stack of the stars nearest to the tile (their sub-pixel centres
shifted onto the stamp centre with Fourier phase ramps), so it follows PSF variations across the
CCD at the scale of the tiles. Each PSF is also fitted with a pixel-integrated elliptical Moffat
profile to report its FWHM (pixels) -- the number compared with the seeing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from scipy import optimize

from nightsift.kernels import psf as kpsf
from nightsift.kernels.background import background, robust_sigma
from nightsift.kernels.stamps import extract_stamps
from nightsift.kernels.tiles import TileGrid

from ..config import PSFConfig
from ..errors import AlgorithmFailure
from ..records import UNUSABLE, StageResult

#: source catalogue of an image (numpy structured array)
SOURCE_DTYPE = np.dtype([("x", "f8"), ("y", "f8"), ("flux", "f8"), ("fluxerr", "f8"), ("snr", "f8"),
                         ("a", "f8"), ("b", "f8"), ("peak", "f8"), ("flag", "i4"), ("psf_star", "?"),
                         ("fwhm_w", "f8"), ("point", "?")])


@dataclass(frozen=True)
class PSFModel:
    """Empirical PSFs of one image, one per tile of ``grid``.

    Attributes
    ----------
    stamps : ndarray (T, s, s) float64
        Unit-sum PSF stamps, centre pixel ``s // 2``.
    fwhm : ndarray (T,)
        FWHM (pixels) of each tile's PSF from a pixel-integrated Moffat fit.
    n_stars : ndarray (T,) int
        Stars stacked into each tile's PSF.
    grid : TileGrid
        The tiling the PSFs belong to.
    star_index : ndarray (n,) int
        Rows of the source catalogue used as PSF stars.
    apcorr : ndarray (T,)
        Aperture correction per tile: total flux of a point source / its PSF-fit flux with the
        unit-sum stamp (typically 1.00-1.02). A stamp is normalised over its own area and over a
        background that faint unresolved sources bias high by a few % of sigma; both make PSF
        fluxes low by ~1-2 %. From the Moffat + constant fit of the stack (see :func:`moffat_fit`).
    locus : float
        Adaptive-moment FWHM (px) of the stellar locus (:func:`stellar_locus`).
    """

    stamps: np.ndarray
    fwhm: np.ndarray
    n_stars: np.ndarray
    grid: TileGrid
    star_index: np.ndarray
    apcorr: np.ndarray | None = None
    #: adaptive-moment FWHM (px) of the stellar locus the PSF stars were chosen around
    locus: float = float("nan")

    def __post_init__(self):
        if self.apcorr is None:
            object.__setattr__(self, "apcorr", np.ones(len(self.fwhm)))

    def fwhm_at(self, x, y):
        return self.fwhm[self.grid.tile_of(x, y)]


def source_catalog(image, sky_sigma: float, *, mask=None, threshold: float = 5.0, min_area: int = 5) -> np.ndarray:
    """Detect sources in a background-subtracted image with sep (``threshold`` x ``sky_sigma``).

    Returns a :data:`SOURCE_DTYPE` table; ``snr`` is the isophotal flux over its noise.
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    m = None if mask is None else np.ascontiguousarray(mask, dtype=bool)
    sep.set_extract_pixstack(max(300000, data.size // 4))
    sep.set_sub_object_limit(4096)
    try:
        objs = sep.extract(data, threshold, err=float(sky_sigma), mask=m, minarea=min_area,
                           deblend_cont=0.005, clean=True)
    except Exception as e:  # sep raises plain Exceptions for pixel-stack overflows
        raise AlgorithmFailure(f"source extraction failed: {e}", stage="psf") from None
    out = np.zeros(len(objs), SOURCE_DTYPE)
    out["x"], out["y"], out["flux"] = objs["x"], objs["y"], objs["flux"]
    noise = np.sqrt(np.maximum(objs["npix"], 1) * sky_sigma**2 + np.maximum(objs["flux"], 0))
    out["fluxerr"] = noise
    out["snr"] = objs["flux"] / noise
    out["a"], out["b"], out["peak"], out["flag"] = objs["a"], objs["b"], objs["peak"], objs["flag"]
    out["fwhm_w"] = np.nan
    return out


def select_psf_stars(cat: np.ndarray, shape, *, mask, stamp: int, config: PSFConfig) -> np.ndarray:
    """Indices of bright, isolated, unsaturated, point-like sources, brightest first."""
    ny, nx = shape
    h = stamp // 2
    ok = (cat["snr"] >= config.min_snr) & (cat["flag"] == 0)
    ok &= (cat["x"] >= h) & (cat["x"] < nx - h - 1) & (cat["y"] >= h) & (cat["y"] < ny - h - 1)
    if ok.sum() == 0:
        return np.zeros(0, int)
    # no unusable pixel (saturated core, bad column) inside the stamp
    if mask is not None:
        bad = (mask & UNUSABLE) != 0
        integ = np.pad(np.cumsum(np.cumsum(bad, 0), 1), ((1, 0), (1, 0)))
        xi = np.rint(cat["x"]).astype(int)
        yi = np.rint(cat["y"]).astype(int)
        y0, y1 = np.clip(yi - h, 0, ny), np.clip(yi + h + 1, 0, ny)
        x0, x1 = np.clip(xi - h, 0, nx), np.clip(xi + h + 1, 0, nx)
        nbad = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]
        ok &= nbad == 0
    # isolation: no other source with > 1% of the flux within the stamp radius
    from scipy.spatial import cKDTree

    # (single-pixel artefacts -- an unmasked hot pixel, a cosmic ray: the peak pixel holds most of
    # the isophotal flux -- do not count as neighbours: the stack's clipping removes them)
    sharp = cat["peak"] > 0.6 * np.maximum(cat["flux"], 1e-30)
    tree = cKDTree(np.c_[cat["x"][~sharp], cat["y"][~sharp]])
    pairs = np.flatnonzero(~sharp)[tree.query_pairs(r=config.isolation_radius * h * np.sqrt(2), output_type="ndarray")]
    for i, j in pairs:
        if cat["flux"][j] > 0.01 * cat["flux"][i]:
            ok[i] = False
        if cat["flux"][i] > 0.01 * cat["flux"][j]:
            ok[j] = False
    # not grossly elongated (an edge-on galaxy, a blend); the stellar locus is chosen later, on
    # adaptive moments: sep's isophotal sizes grow with S/N, so a bright star looks as large as a
    # compact galaxy of half its flux
    ok &= cat["b"] > 0.6 * cat["a"]
    idx = np.flatnonzero(ok)
    return idx[np.argsort(-cat["flux"][idx])]


#: adaptive-moment FWHM (px) below which a source is a pixel-scale artefact, not a star (a single
#: hot pixel or a cosmic-ray hit measures ~0.7 px; ZTF's undersampled stars ~1.8 px)
MIN_PSF_FWHM = 1.0


def adaptive_fwhm(image, x, y, *, size: int, sigma: float) -> np.ndarray:
    """Adaptive-moment FWHM (px; :func:`kernels.psf.moments`) of sources at ``(x, y)``: unlike
    isophotal sizes it does not depend on the source's S/N. NaN where the moments diverge."""
    if len(x) == 0:
        return np.zeros(0)
    st, _ = extract_stamps(image, x, y, size=size, fill=0.0)
    return stamp_fwhm(np.asarray(st, np.float64), sigma=sigma)


def stamp_fwhm(stamps: np.ndarray, *, sigma: float) -> np.ndarray:
    """Adaptive-moment FWHM (px) of each stamp ``(n, s, s)``, the moments started at ``sigma`` px."""
    _, _, mxx, myy, mxy = kpsf.moments(stamps, sigma=max(sigma, 0.8))
    fwhm, _ = kpsf.shape_from_moments(mxx, myy, mxy)
    return np.asarray(fwhm, dtype=np.float64)


def stellar_locus(fwhm, *, min_count: int = 3, width: float = 0.03) -> float:
    """Adaptive-moment FWHM of the stars among bright sources: the smallest size around which at
    least ``min_count`` sources cluster.

    Every source is the PSF convolved with its own profile, so nothing resolved is smaller than a
    star; galaxies spread to larger sizes, and in a small or high-latitude field they may
    outnumber the stars (seen: 3 stars among 19 bright reference sources, whose median size was
    a galaxy's, and a reference PSF measured 60 % broad). Scanning the sorted log sizes from
    below, the first window ``[v, v * (1 + 2 width)]`` holding ``min_count`` sources is the
    locus; it is refined as the median of the sources within ``1.5 width`` of that window's
    median. Falls back to the median of all sizes when no window holds ``min_count``; NaN for no
    source.

    Parameters
    ----------
    fwhm : array_like (n,)
        Adaptive-moment FWHMs (px) of bright, isolated, unmasked sources (NaN and sizes below
        :data:`MIN_PSF_FWHM` ignored).
    min_count : int
        Sources that make a locus (the PSF's ``min_stars``).
    width : float
        Relative half-width of the window (~ the scatter of stellar sizes).
    """
    v = np.asarray(fwhm, np.float64)
    # below 1 px is no PSF a survey samples, but an unmasked hot pixel or cosmic ray (~0.7 px)
    ls = np.sort(np.log(v[np.isfinite(v) & (v >= MIN_PSF_FWHM)]))
    if ls.size == 0:
        return float("nan")
    ends = np.searchsorted(ls, ls + 2 * width, side="right")
    full = np.flatnonzero(ends - np.arange(ls.size) >= min_count)
    if full.size == 0:
        return float(np.exp(np.median(ls)))
    i = int(full[0])
    centre = np.median(ls[i:ends[i]])
    return float(np.exp(np.median(ls[np.abs(ls - centre) < 1.5 * width])))


def locus_tolerance(snr) -> np.ndarray:
    """Relative width of the stellar locus at S/N ``snr``: adaptive-moment sizes of S/N 50 stars
    scatter by ~2 %, plus 5 % for the PSF's variation over the CCD and undersampling."""
    return 0.05 + 2.0 / np.asarray(snr, np.float64)


def _moffat_stamp(p, s, over=3):
    amp, fwhm, beta, q, theta, dx, dy = p[:7]
    c = s // 2
    sub = (np.arange(over) + 0.5) / over - 0.5
    yy, xx = np.mgrid[0:s, 0:s].astype(float) - c
    xx = xx[..., None, None] + sub[None, None, None, :] - dx
    yy = yy[..., None, None] + sub[None, None, :, None] - dy
    ct, st = np.cos(theta), np.sin(theta)
    u = xx * ct + yy * st
    v = -xx * st + yy * ct
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    r2 = (u**2 * q + v**2 / q) / alpha**2  # geometric-mean FWHM = fwhm
    return amp * ((1 + r2) ** (-beta)).mean(axis=(-1, -2))


def moffat_fit(psf: np.ndarray) -> dict:
    """Fit a pixel-integrated elliptical Moffat plus a constant to a unit-sum PSF stamp.

    Returns a dict with ``fwhm`` (px, geometric mean of the major and minor FWHMs of the
    intrinsic profile), ``beta``, ``pedestal`` (the constant, per pixel, in units of the stamp's
    sum) and ``apcorr``: the factor turning a PSF-fit flux made with this stamp into the total
    flux of a point source of this Moffat profile, ``sum(psf^2) / sum(M psf)`` with ``M`` the
    fitted profile normalised to unit integral over the whole plane. It corrects both the flux
    outside the stamp and the pedestal a biased background leaves in the stamp.
    """
    s = psf.shape[0]
    f0 = kpsf.half_max_fwhm(psf)
    p0 = [psf.max(), max(f0 * 0.95, 1.0), 3.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    lo = [0, 0.5, 1.1, 0.5, -np.pi, -1, -1, -0.05 * psf.max()]
    hi = [np.inf, s, 20.0, 2.0, np.pi, 1, 1, 0.05 * psf.max()]
    res = optimize.least_squares(lambda p: (_moffat_stamp(p, s) + p[7] - psf).ravel(), p0, bounds=(lo, hi),
                                 x_scale="jac", max_nfev=300)
    amp, fwhm, beta = res.x[:3]
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    total = amp * np.pi * alpha**2 / (beta - 1)  # integral of the Moffat over the plane
    M = _moffat_stamp(res.x, s) / total
    apcorr = float(np.sum(psf * psf) / np.sum(M * psf))
    # no correction rather than a wrong one: a failed fit, or an undersampled PSF (FWHM < 2.5 px),
    # whose sub-pixel-shifted stack is broadened by aliasing so that the Moffat misfits its wings
    if not np.isfinite(apcorr) or abs(apcorr - 1) > 0.1 or fwhm < 2.5:
        apcorr = 1.0
    return {"fwhm": float(fwhm), "beta": float(beta), "pedestal": float(res.x[7]), "apcorr": apcorr,
            "model": _moffat_stamp(res.x, s) + res.x[7]}


def stack_variance(stamps: np.ndarray, weights: np.ndarray, sky_sigma: float, psf: np.ndarray) -> np.ndarray:
    """Per-pixel variance of :func:`kernels.psf.stack_psf`'s weighted mean of flux-normalised stamps.

    Each star ``i`` (flux ``F_i`` in its stamp, e-) contributes ``(sky_sigma^2 + F_i psf) / F_i^2``
    per pixel (background plus the star's own photon noise), weighted as in the stack.

    Parameters
    ----------
    stamps : ndarray (n, s, s), e-
        The background-subtracted star stamps that were stacked.
    weights : ndarray (n,)
        Their weights in the stack.
    sky_sigma : float
        Background noise per pixel (e-).
    psf : ndarray (s, s)
        The unit-sum stack.

    Returns
    -------
    ndarray (s, s): variance of each stack pixel (unit-sum units squared).
    """
    F = np.maximum(np.asarray(stamps, np.float64).sum(axis=(1, 2)), 1e-30)
    w = np.asarray(weights, np.float64) * (F > 0)
    w = w / w.sum()
    sky = float(sky_sigma) ** 2 * np.sum(w**2 / F**2)
    src = np.sum(w**2 / F) * np.maximum(psf, 0.0)
    return sky + src


def hybrid_psf(psf: np.ndarray, variance: np.ndarray, fit: dict, *, k: float = 2.0,
               core: float = 2.0) -> np.ndarray:
    """The stack in the core; in the wings the analytic PSF plus the significant part of the
    stack's departure from it (unit sum).

    Outside ``core`` FWHMs of the centre, ``P = M + r * max(0, 1 - k^2 var / r^2)`` with
    ``r = psf - M`` and ``M`` the fitted Moffat + constant (:func:`moffat_fit`); inside, the
    stack as it is (its S/N is high there, and the FWHM and centroid stay the stack's). Where few
    stars are stacked the empirical wings are mostly noise; that noise, convolved with a bright
    star in ZOGY, leaves a square speckle the size of the stamp in D and dozens of 5-sigma peaks
    in S_corr. Where the wings depart from the Moffat by more than ``k`` sigma (trefoil, a
    diffraction spike, a halo) the departure is kept, shrunk towards the model by the
    positive-part James-Stein factor.

    Parameters
    ----------
    psf : ndarray (s, s)
        Unit-sum stack.
    variance : ndarray (s, s)
        Its per-pixel variance (:func:`stack_variance`).
    fit : dict
        :func:`moffat_fit` of ``psf`` (``model``: the fitted stamp, ``fwhm``).
    """
    M = np.asarray(fit["model"], np.float64)
    r = psf - M
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(r != 0, np.maximum(0.0, 1.0 - k * k * variance / (r * r)), 0.0)
    s = psf.shape[-1]
    yy, xx = np.mgrid[0:s, 0:s] - s // 2
    f = np.where(np.hypot(xx, yy) <= core * fit["fwhm"], 1.0, f)
    out = M + f * r
    return out / out.sum()


def moffat_fwhm(psf: np.ndarray) -> tuple[float, float]:
    """``(FWHM px, beta)`` of :func:`moffat_fit`."""
    fit = moffat_fit(psf)
    return fit["fwhm"], fit["beta"]


def measure_psf(image, *, mask, sky_sigma: float, grid: TileGrid, config: PSFConfig,
                fwhm_guess: float | None = None, catalog: np.ndarray | None = None) -> StageResult:
    """Empirical PSF per tile of a background-subtracted image.

    Parameters
    ----------
    image : ndarray (ny, nx), e-
        Background-subtracted image.
    mask : ndarray (ny, nx) uint16
        MaskBits; stars touching unusable pixels are not used.
    sky_sigma : float
        Background noise (e-) for detection.
    grid : TileGrid
        One PSF is built for each tile; a tile uses the stars nearest its centre.
    catalog : SOURCE_DTYPE array, optional
        Precomputed :func:`source_catalog` of ``image``.

    Returns
    -------
    StageResult(PSFModel, qa) with qa ``psf_fwhm`` (median px), ``psf_fwhm_min/max``,
    ``psf_n_stars``, ``psf_n_candidates``.

    Raises
    ------
    AlgorithmFailure
        Fewer than ``config.min_stars`` usable stars on the whole image.
    """
    img = np.asarray(image)
    cat = source_catalog(img, sky_sigma, mask=(mask & UNUSABLE) != 0) if catalog is None else catalog
    max_stamp = 2 * grid.margin + 1  # the tile margin must hold half a PSF (no wrap-around)

    def stamp_for(f):
        return min(max(config.stamp_size, int(2 * np.ceil(config.stamp_radius_fwhm * f) + 1)), max_stamp)

    bright = cat[(cat["snr"] > config.min_snr) & (cat["flag"] == 0)]
    iso = float(np.median(2.3548 * np.sqrt(bright["a"] * bright["b"]))) if len(bright) else 3.0
    # the stellar locus in adaptive moments, among bright isolated candidates (a stamp sized from
    # the isophotal guess, which galaxies bias high: a conservative isolation radius)
    first = select_psf_stars(cat, img.shape, mask=mask, stamp=stamp_for(iso), config=config)
    first = first[: 4 * config.max_stars]
    sizes = adaptive_fwhm(img, cat["x"][first], cat["y"][first], size=stamp_for(iso), sigma=iso / 2.3548)
    locus = stellar_locus(sizes, min_count=config.min_stars)
    if fwhm_guess is None:
        fwhm_guess = locus if np.isfinite(locus) else iso
    stamp = stamp_for(fwhm_guess)
    idx = select_psf_stars(cat, img.shape, mask=mask, stamp=stamp, config=config)
    qa = {"psf_n_candidates": int(idx.size), "psf_stamp": int(stamp), "psf_locus_fwhm": float(locus)}
    if idx.size < config.min_stars:
        raise AlgorithmFailure(
            f"too few PSF stars: {idx.size} bright isolated unsaturated stars found, need "
            f"{config.min_stars} (lower psf.min_snr or psf.min_stars, or check the image)",
            stage="psf", qa=qa)
    stars = cat[idx]
    st, _ = extract_stamps(img, stars["x"], stars["y"], size=stamp, fill=0.0)
    st = np.asarray(st, dtype=np.float64)
    dx0 = stars["x"] - np.rint(stars["x"])
    dy0 = stars["y"] - np.rint(stars["y"])
    cdx, cdy = kpsf.centroid(st, sigma=max(fwhm_guess / 2.3548, 0.8))
    # trust the windowed centroid unless it ran away (neighbour); then keep sep's
    far = (np.abs(cdx - dx0) > 0.5) | (np.abs(cdy - dy0) > 0.5)
    cdx, cdy = np.where(far, dx0, cdx), np.where(far, dy0, cdy)
    # PSFEx-style cleaning: compact galaxies and blends are wider in adaptive moments than the
    # stellar locus; they would broaden the stack.
    size = stamp_fwhm(st, sigma=fwhm_guess / 2.3548)
    if not np.isfinite(locus):
        locus = float(np.nanmedian(size[: max(config.min_stars, min(10, size.size))]))
    clean = np.isfinite(size) & (np.abs(size / locus - 1) < locus_tolerance(stars["snr"])) & ~far
    if clean.sum() >= config.min_stars:
        stars, st, cdx, cdy, idx = stars[clean], st[clean], cdx[clean], cdy[clean], idx[clean]
    qa["psf_n_rejected"] = int((~clean).sum())
    weights = np.minimum(stars["snr"], 1000.0) ** 2

    T = len(grid)
    stamps = np.zeros((T, stamp, stamp))
    fwhm = np.zeros(T)
    nst = np.zeros(T, int)
    used = []
    centres = np.array([(y0 + grid.core / 2 - 0.5, x0 + grid.core / 2 - 0.5) for y0, x0 in grid.origins])
    for t in range(T):
        cy, cx = centres[t]
        d = np.hypot(stars["x"] - cx, stars["y"] - cy)
        # the stars inside the tile (plus half a tile around it); the nearest ones if too few
        near = np.flatnonzero(d <= grid.core * 0.75 * np.sqrt(2))
        if near.size < config.min_stars:
            near = np.argsort(d)[: config.min_stars]
        near = near[np.argsort(-stars["flux"][near])][: config.max_stars]
        stamps[t] = kpsf.stack_psf(st[near], cdx[near], cdy[near], weights=weights[near])
        nst[t] = near.size
        used.append(near)
    apcorr = np.ones(T)
    uniq = {}
    for t in range(T):  # tiles sharing one star set share one fit
        key = stamps[t].tobytes()
        if key not in uniq:
            fit = moffat_fit(stamps[t])
            final = stamps[t]
            if config.denoise:
                near = used[t]
                var = stack_variance(st[near], weights[near], sky_sigma, stamps[t])
                final = hybrid_psf(stamps[t], var, fit, k=config.denoise_k)
                fit = moffat_fit(final)
            uniq[key] = (fit["fwhm"], fit["apcorr"], final)
        fwhm[t], apcorr[t], stamps[t] = uniq[key]
    qa.update(psf_fwhm=float(np.median(fwhm)), psf_fwhm_min=float(fwhm.min()), psf_fwhm_max=float(fwhm.max()),
              psf_n_stars=int(idx.size), psf_apcorr=float(np.median(apcorr)))
    return StageResult(PSFModel(stamps=stamps, fwhm=fwhm, n_stars=nst, grid=grid, star_index=idx,
                                apcorr=apcorr, locus=float(locus)), qa)



@dataclass(frozen=True)
class ImagePSF:
    """What the PSF stage learns about one image on the science grid.

    Attributes
    ----------
    sky : ndarray (ny, nx) float32, e-      smooth background
    sky_sigma : float, e-                   robust background noise per pixel
    catalog : SOURCE_DTYPE array            sources above 5 sigma (``psf_star`` marks the PSF stars)
    model : PSFModel                        per-tile PSFs
    """

    sky: np.ndarray
    sky_sigma: float
    catalog: np.ndarray
    model: PSFModel


def psf_stage(exposure, *, grid: TileGrid, config: PSFConfig, prefix: str = "") -> StageResult:
    """Background, source catalogue and per-tile PSFs of a calibrated exposure.

    ``prefix`` names the QA keys (``"sci_"`` / ``"ref_"``). Raises AlgorithmFailure (naming the
    file) when the image has too few PSF stars.
    """
    sky, _rms, sigma = image_background(exposure.image, mask=exposure.mask)
    sub = np.asarray(exposure.image, dtype=np.float32) - sky
    bad = (exposure.mask & UNUSABLE) != 0
    cat = source_catalog(sub, sigma, mask=bad)
    try:
        res = measure_psf(sub, mask=exposure.mask, sky_sigma=sigma, grid=grid, config=config, catalog=cat)
    except AlgorithmFailure as e:
        where = f"{exposure.path}: " if exposure.path else ""
        raise AlgorithmFailure(where + str(e), stage="psf", qa={prefix + k: v for k, v in e.qa.items()}) from None
    cat["psf_star"][res.value.star_index] = True  # our own fresh catalogue
    # point sources (S/N >= 20, unflagged): adaptive-moment size on the stellar locus; what the
    # flux ratio (subtract.flux_ratio) trusts as stars
    model = res.value
    bright = np.flatnonzero((cat["snr"] >= 20) & (cat["flag"] == 0))
    if np.isfinite(model.locus) and bright.size:
        cat["fwhm_w"][bright] = adaptive_fwhm(sub, cat["x"][bright], cat["y"][bright],
                                              size=model.stamps.shape[-1], sigma=model.locus / 2.3548)
        cat["point"][bright] = np.abs(cat["fwhm_w"][bright] / model.locus - 1) < locus_tolerance(cat["snr"][bright])
    qa = {prefix + k: v for k, v in res.qa.items()}
    qa[prefix + "sky"] = float(np.median(sky))
    qa[prefix + "sky_sigma"] = sigma
    qa[prefix + "n_sources"] = int(len(cat))
    return StageResult(ImagePSF(sky=sky, sky_sigma=sigma, catalog=cat, model=res.value), qa)


def image_background(image, *, mask=None, box: int = 64):
    """Background map, background-noise map and a robust global noise (e-) of an image."""
    bad = None if mask is None else (mask & UNUSABLE) != 0
    sky, rms = background(image, box=box, mask=bad)
    resid = np.asarray(image) - sky
    sel = resid if bad is None else resid[~bad]
    sigma = robust_sigma(sel[:: max(1, sel.size // 2_000_000)])
    return sky, rms, sigma
