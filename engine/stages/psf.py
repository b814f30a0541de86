"""PSF stage: bright isolated stars -> an empirical PSF per tile; the reference's PSF carried
onto the science grid.

:func:`measure_psf` (science images every visit, the reference once per CCD in its own frame):

1. PSF-star candidates from the catalogue (:func:`select_psf_stars`): S/N >= ``psf.min_snr``,
   unflagged, no unusable pixel in the stamp, no catalogue neighbour with > 1 % of the flux within
   the stamp radius, not grossly elongated;
2. the stellar locus in adaptive moments among the brightest candidates (:func:`stellar_locus`:
   nothing resolved is smaller than a star, so the locus is the smallest size around which
   ``psf.min_stars`` sources cluster) sets the stamp size and cleans compact galaxies and blends
   from the candidates;
3. each tile stacks (Fourier-shifted, flux-normalised, clipped, S/N^2-weighted mean) the
   ``psf.max_stars`` brightest stars within 0.75 sqrt(2) tile cores of its centre (the nearest
   ``psf.min_stars`` if fewer): all tiles of an image in one batched stack;
4. a pixel-integrated elliptical Moffat + constant is fitted to every stack at once
   (:func:`nightsift.kernels.moffat.fit_moffat`): its FWHM is the tile's FWHM and its aperture
   correction the tile's; with ``psf.denoise`` the stack's wings are replaced by the model where
   they are not significantly different from it (:func:`nightsift.kernels.moffat.hybrid_psf`) and
   the result fitted again;
5. the catalogue learns which sources are point sources (adaptive size on the locus; what the
   flux ratio trusts as stars) and which were PSF stars.

:func:`carry_psf` moves a reference PSF model (per reference tile) to the science tiles: each
science tile centre is mapped into the reference, and the PSF of the reference tile there is
resampled through the local Jacobian of the map with the alignment's own Lanczos kernel, averaged
over the sub-pixel phases a star can have (what the stack of aligned stars would show), then
re-centred and re-fitted. The reference is thus measured once per CCD, not once per visit.

All of it runs on the device the images live on; the host reads a few numbers per batch (the
stellar loci, which set the stamp sizes, and the star counts, which decide failures).
"""
from __future__ import annotations

import warnings

import numpy as np

from nightsift.kernels import psf as kpsf
from nightsift.kernels._xp import array_namespace, host_scalars, is_host, to_device
from nightsift.kernels.moffat import fit_moffat, hybrid_psf, stack_variance
from nightsift.kernels.neighbours import max_within
from nightsift.kernels.resample import lanczos_resample
from nightsift.kernels.sources import FLAG_MASKED
from nightsift.kernels.stamps import count_in_boxes, gather_stamps
from nightsift.kernels.tiles import TileGrid, tile_index

from ..config import PSFConfig
from ..errors import AlgorithmFailure
from ..records import PSFModel, SourceCatalog, StageResult, unusable_of

__all__ = ["measure_psf", "carry_psf", "select_psf_stars", "stellar_locus", "locus_tolerance", "stamp_fwhm",
           "MIN_PSF_FWHM"]

#: adaptive-moment FWHM (px) below which a source is a pixel-scale artefact, not a star (a single
#: hot pixel or a cosmic-ray hit measures ~0.7 px; ZTF's undersampled stars ~1.8 px)
MIN_PSF_FWHM = 1.0


def stamp_fwhm(stamps, *, sigma: float):
    """Adaptive-moment FWHM (px) of each stamp ``(n, s, s)``, the moments started at ``sigma`` px."""
    _, _, mxx, myy, mxy = kpsf.moments(stamps, sigma=max(float(sigma), 0.8))
    fwhm, _ = kpsf.shape_from_moments(mxx, myy, mxy)
    return fwhm


def locus_tolerance(snr):
    """Relative width of the stellar locus at S/N ``snr``: adaptive-moment sizes of S/N 50 stars
    scatter by ~2 %, plus 5 % for the PSF's variation over the CCD and undersampling."""
    return 0.05 + 2.0 / snr


def stellar_locus(fwhm, *, min_count: int = 3, width: float = 0.03):
    """Adaptive-moment FWHM of the stars among bright sources: the smallest size around which at
    least ``min_count`` sources cluster (device 0-d array; NaN for no source).

    Every source is the PSF convolved with its own profile, so nothing resolved is smaller than a
    star; galaxies spread to larger sizes, and in a small or high-latitude field they may
    outnumber the stars (seen: 3 stars among 19 bright reference sources, whose median size was a
    galaxy's, and a reference PSF measured 60 % broad). Scanning the sorted log sizes from below,
    the first window ``[v, v (1 + 2 width)]`` holding ``min_count`` sources is the locus; it is
    refined as the median of the sources within ``1.5 width`` of that window's median. Falls back
    to the median of all sizes when no window holds ``min_count``.

    Parameters
    ----------
    fwhm : ndarray (n,)
        Adaptive-moment FWHMs (px) of bright, isolated, unmasked sources (NaN and sizes below
        :data:`MIN_PSF_FWHM` ignored).
    min_count : int
    width : float
        Relative half-width of the window (~ the scatter of stellar sizes).
    """
    xp = array_namespace(fwhm)
    if is_host(xp):
        fwhm = np.asarray(fwhm, np.float64)
    v = xp.where(xp.isfinite(fwhm) & (fwhm >= MIN_PSF_FWHM), fwhm, xp.inf)
    ls = xp.sort(xp.log(v))  # invalid ones (+inf) last
    n = ls.shape[0]
    m = xp.isfinite(ls).sum()
    if n == 0:
        return xp.full((), xp.nan)
    idx = xp.arange(n)
    ends = xp.searchsorted(ls, ls + 2 * width, side="right")
    ends = xp.minimum(ends, m)
    full = (ends - idx >= min_count) & (idx < m)
    i = xp.argmax(full)
    any_full = full[i]

    def range_median(lo, hi):
        k = hi - lo
        a = ls[xp.clip(lo + (k - 1) // 2, 0, n - 1)]
        b = ls[xp.clip(lo + k // 2, 0, n - 1)]
        return 0.5 * (a + b)

    centre = range_median(i, ends[i])
    lo = xp.searchsorted(ls, centre - 1.5 * width, side="right")
    hi = xp.minimum(xp.searchsorted(ls, centre + 1.5 * width, side="left"), m)
    refined = range_median(lo, hi)
    overall = range_median(xp.zeros((), xp.int64), m)
    out = xp.where(any_full, refined, overall)
    return xp.where(m > 0, xp.exp(out), xp.nan)


def core_half(fwhm: float, config: PSFConfig) -> int:
    """Half-side (px) of the box around a PSF star that must hold no unusable pixel: its core,
    ``psf.core_radius_fwhm`` FWHMs (at least 2 px). Unusable pixels in the wings are left out of
    the stack instead (:func:`nightsift.kernels.psf.stack_psf`)."""
    f = fwhm if np.isfinite(fwhm) and fwhm > 0 else config.default_fwhm
    return max(2, int(np.ceil(config.core_radius_fwhm * f)))


def select_psf_stars(cat: SourceCatalog, unusable, image: int, shape, *, stamp: int, core: int,
                     config: PSFConfig):
    """Device bool ``(n,)``: bright sources with no ``unusable`` (``(B, ny, nx)`` bool) pixel in
    their core (a ``2 core + 1`` box of image ``image``; the wings may hold some: they are left
    out of the stack), no other flag than a masked pixel in the aperture, inside the image by half
    a stamp, isolated (no non-artefact neighbour with more than ``psf.isolation_flux`` of the flux
    within ``psf.isolation_radius`` stamp half-sides), and not grossly elongated."""
    xp = array_namespace(cat.x)
    ny, nx = shape
    h = stamp // 2
    n = len(cat)
    ok = (cat.snr >= config.min_snr) & ((cat.flag & ~xp.int32(FLAG_MASKED)) == 0)
    ok &= (cat.x >= h) & (cat.x < nx - h - 1) & (cat.y >= h) & (cat.y < ny - h - 1)
    if n == 0:
        return ok
    ok &= count_in_boxes(unusable, image, cat.x, cat.y, half=min(core, h)) == 0
    # single-pixel artefacts (an unmasked hot pixel, a cosmic ray: the peak holds most of the
    # aperture flux) do not count as neighbours: the stack's clipping removes them
    sharp = cat.peak > 0.6 * xp.maximum(cat.flux, 1e-30)
    brightest = max_within(cat.x, cat.y, cat.x, cat.y, cat.flux, radius=config.isolation_radius * h,
                           self_index=xp.arange(n, dtype=xp.int64), where2=~sharp)
    ok &= ~(brightest > config.isolation_flux * cat.flux)
    # not grossly elongated (an edge-on galaxy, a blend); the stellar locus is chosen later, on
    # adaptive moments
    ok &= cat.b > config.max_axis_ratio * cat.a
    return ok


def _brightest(xp, sel, flux, limit: int | None = None):
    """Indices of the selected rows, brightest first (at most ``limit``)."""
    idx = xp.nonzero(sel)[0]
    idx = idx[xp.argsort(-flux[idx], kind="stable")]
    return idx if limit is None else idx[:limit]


def _stamp_for(config: PSFConfig, fwhm: float, max_stamp: int) -> int:
    f = fwhm if np.isfinite(fwhm) and fwhm > 0 else config.default_fwhm
    return int(min(max(config.stamp_size, int(2 * np.ceil(config.stamp_radius_fwhm * f) + 1)), max_stamp))


def _tile_members(xp, x, y, flux_order_ok, centres, *, core: int, min_stars: int, max_stars: int):
    """``(T, K)`` rows of the stars each tile stacks (brightest first) and their validity.

    The stars inside ``0.75 sqrt(2)`` cores of the tile centre, or the ``min_stars`` nearest when
    fewer; at most ``max_stars``. ``x, y`` are ordered brightest first.
    """
    n = x.shape[0]
    d = xp.hypot(x[None, :] - centres[:, 0:1], y[None, :] - centres[:, 1:2])  # (T, n)
    d = xp.where(flux_order_ok[None, :], d, xp.inf)  # only usable stars count, also for the fallback
    near = d <= core * 0.75 * np.sqrt(2)
    k = min(min_stars, n) - 1
    kth = xp.sort(d, axis=1)[:, k:k + 1]
    few = near.sum(axis=1, keepdims=True) < min_stars
    elig = xp.where(few, d <= kth, near) & xp.isfinite(d)
    rank = xp.cumsum(elig, axis=1)
    member = elig & (rank <= max_stars)
    K = min(max_stars, n)
    key = xp.where(member, rank, n + max_stars + 1)
    cols = xp.argsort(key, axis=1, kind="stable")[:, :K]
    valid = xp.take_along_axis(member, cols, axis=1)
    return cols, valid


def measure_psf(images, masks, catalogs, sky_sigma, grid: TileGrid, *, config: PSFConfig, fwhm_guess,
                paths=None, prefix: str = "") -> StageResult:
    """Per-tile empirical PSFs of a batch of background-subtracted images.

    Parameters
    ----------
    images : ndarray (B, ny, nx) float32, e-
        Background-subtracted images (unusable pixels 0).
    masks : ndarray (B, ny, nx) uint16
    catalogs : list of B SourceCatalog
        Their sources (:func:`nightsift.engine.stages.measure.measure_images`).
    sky_sigma : sequence of B floats
        Background noise (e-, host numbers).
    grid : TileGrid
        One PSF per tile (the same grid for every image of the batch).
    config : PSFConfig
    fwhm_guess : sequence of B floats
        First FWHM guesses (px): the stamp of the first candidate selection.
    paths : sequence of B str, optional
        For messages.
    prefix : str
        Of the QA keys (``"sci_"`` / ``"ref_"``).

    Returns
    -------
    StageResult
        ``value``: list of B items, each ``(PSFModel, SourceCatalog)`` (the catalogue with its
        ``psf_star``, ``size`` and ``point`` columns filled) or an :class:`AlgorithmFailure`
        (too few PSF stars: that image cannot be subtracted; the others go on). ``qa``: lists of
        B values ``psf_fwhm`` (median px), ``psf_fwhm_min/max``, ``psf_n_stars``,
        ``psf_n_candidates``, ``psf_stamp``, ``psf_locus_fwhm``, ``psf_n_rejected``, ``psf_apcorr``
        (prefixed).
    """
    xp = array_namespace(images, masks)
    B = images.shape[0]
    paths = list(paths) if paths is not None else [None] * B
    unusable = unusable_of(masks)
    max_stamp = 2 * grid.margin + 1  # the tile margin must hold half a PSF (no wrap-around)

    # 1-2: candidates at the guessed stamp size, their adaptive sizes, the stellar locus (one read)
    loci = _stellar_loci(images, unusable, catalogs, fwhm_guess, max_stamp=max_stamp, config=config)
    # 3: the stars of each image (device), their counts (one read)
    stars = [_psf_stars(images, unusable, b, cat, loci[b] if np.isfinite(loci[b]) else fwhm_guess[b], loci[b],
                        max_stamp=max_stamp, config=config) for b, cat in enumerate(catalogs)]
    vals = host_scalars(*[s["n_use"] for s in stars], *[s["n_rej"] for s in stars],
                        *[xp.asarray(s["locus"]) if not np.isscalar(s["locus"]) else s["locus"] for s in stars])
    n_use, n_rej, locus_h = vals[:B], vals[B:2 * B], vals[2 * B:]

    # 3-5: per image, the tiles' stacks and Moffat fits, or a failure
    out, qa_rows = [], []
    centres = to_device(grid.centres(), xp, label="tile_centres")
    for b, cat in enumerate(catalogs):
        s = stars[b]
        n_cand = int(s["idx"].shape[0])
        row = {"psf_n_candidates": n_cand, "psf_stamp": s["stamp"], "psf_locus_fwhm": loci[b],
               "psf_n_rejected": int(n_rej[b])}
        qa_rows.append(row)
        if n_use[b] < config.min_stars or n_cand < config.min_stars:
            where = f"{paths[b]}: " if paths[b] else ""
            out.append(AlgorithmFailure(
                f"{where}too few PSF stars: {n_cand} bright isolated unsaturated stars found, need "
                f"{config.min_stars} (lower psf.min_snr or psf.min_stars, or check the image)",
                stage="psf", qa={prefix + k: v for k, v in row.items()}))
            continue
        model = _tile_psfs(s, cat, centres, grid, sky_sigma[b], float(locus_h[b]), config=config)
        psf_star = xp.zeros(len(cat), bool)
        psf_star[s["idx"][s["use"]]] = True
        out.append((model, _point_sources(images, unusable, b, cat.replace(psf_star=psf_star), model.locus,
                                          s["stamp"], min_snr=config.point_min_snr)))
        row.update(psf_fwhm=xp.median(model.fwhm), psf_fwhm_min=model.fwhm.min(), psf_fwhm_max=model.fwhm.max(),
                   psf_n_stars=int(n_use[b]), psf_apcorr=xp.median(model.apcorr))
    keys = sorted({k for r in qa_rows for k in r})
    qa = {prefix + k: [r.get(k, float("nan")) for r in qa_rows] for k in keys}
    return StageResult(out, qa)


def _stellar_loci(images, unusable, catalogs, fwhm_guess, *, max_stamp: int, config: PSFConfig) -> list[float]:
    """The stellar locus (adaptive-moment FWHM, px; NaN where none) of each image, from the
    ``4 psf.max_stars`` brightest candidates selected at the guessed stamp size (one host read)."""
    xp = array_namespace(images)
    _, ny, nx = images.shape
    loci = []
    for b, cat in enumerate(catalogs):
        s0 = _stamp_for(config, fwhm_guess[b], max_stamp)
        first = _brightest(xp, select_psf_stars(cat, unusable, b, (ny, nx), stamp=s0,
                                                core=core_half(fwhm_guess[b], config), config=config),
                           cat.flux, 4 * config.max_stars)
        st, _ = gather_stamps(images[b:b + 1], None, cat.x[first], cat.y[first], size=s0, fill=0.0)
        sizes = stamp_fwhm(st.astype(xp.float64), sigma=fwhm_guess[b] / kpsf.FWHM_PER_SIGMA)
        loci.append(stellar_locus(sizes, min_count=config.min_stars))
    return [v if np.isfinite(v) else float("nan") for v in host_scalars(*loci)]


def _psf_stars(images, unusable, b: int, cat: SourceCatalog, guess: float, locus: float, *, max_stamp: int,
               config: PSFConfig) -> dict:
    """The PSF stars of image ``b`` (device arrays, nothing read on the host).

    Candidates (:func:`select_psf_stars`) at the stamp size of ``guess`` (px, the locus or the
    first guess), brightest first; their stamps (holes filled symmetrically for the centroid and
    the size), windowed centroids (the catalogue's where the window ran away), and PSFEx-style
    cleaning: sources off the stellar ``locus`` (NaN: the median size of the brightest) are not
    used unless that leaves fewer than ``psf.min_stars``.

    Returns
    -------
    dict with ``idx`` (catalogue rows), ``st``, ``holes``, ``cdx``, ``cdy``, ``use``, ``stamp``,
    ``locus``, ``n_use``, ``n_rej`` (0-d device counts).
    """
    xp = array_namespace(images)
    _, ny, nx = images.shape
    stamp = _stamp_for(config, guess, max_stamp)
    idx = _brightest(xp, select_psf_stars(cat, unusable, b, (ny, nx), stamp=stamp,
                                          core=core_half(guess, config), config=config), cat.flux)
    x, y = cat.x[idx], cat.y[idx]
    st, _ = gather_stamps(images[b:b + 1], None, x, y, size=stamp, fill=0.0)
    st = st.astype(xp.float64)
    holes, _ = gather_stamps(unusable[b:b + 1], None, x, y, size=stamp, fill=False)  # masked wing pixels
    st = _symmetric_fill(st, holes)  # for the centroid and the size; the stack leaves holes out
    dx0, dy0 = x - xp.rint(x), y - xp.rint(y)
    cdx, cdy = kpsf.centroid(st, sigma=max(guess / kpsf.FWHM_PER_SIGMA, 0.8))
    # trust the windowed centroid unless it ran away (neighbour); then keep the catalogue's
    far = (xp.abs(cdx - dx0) > 0.5) | (xp.abs(cdy - dy0) > 0.5)
    cdx, cdy = xp.where(far, dx0, cdx), xp.where(far, dy0, cdy)
    # PSFEx-style cleaning: compact galaxies and blends are wider than the stellar locus
    size = stamp_fwhm(st, sigma=guess / kpsf.FWHM_PER_SIGMA)
    if not np.isfinite(locus):  # no cluster of sizes: the median of the brightest (NaN without any: fails)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            locus = xp.nanmedian(size[:max(config.min_stars, 10)]) if size.shape[0] else xp.full((), xp.nan)
    clean = xp.isfinite(size) & (xp.abs(size / locus - 1) < locus_tolerance(cat.snr[idx])) & ~far
    use = xp.where(clean.sum() >= config.min_stars, clean, xp.ones_like(clean))
    return dict(idx=idx, st=st, holes=holes, cdx=cdx, cdy=cdy, use=use, stamp=stamp, locus=locus,
                n_use=use.sum(), n_rej=(~clean).sum())


def _tile_psfs(stars: dict, cat: SourceCatalog, centres, grid: TileGrid, sky_sigma: float, locus: float, *,
               config: PSFConfig) -> PSFModel:
    """Each tile's PSF from the stars of :func:`_psf_stars`: the S/N^2-weighted clipped stack of its
    members (:func:`_tile_members`), the Moffat fit, and with ``psf.denoise`` the hybrid of stack
    and model fitted again."""
    xp = array_namespace(stars["st"])
    use, idx = stars["use"], stars["idx"]
    snr = cat.snr[idx]
    weights = xp.where(use, xp.minimum(snr, config.max_weight_snr) ** 2, 0.0)
    cols, valid = _tile_members(xp, cat.x[idx], cat.y[idx], use, centres, core=grid.core,
                                min_stars=config.min_stars, max_stars=config.max_stars)
    w = xp.where(valid, weights[cols], 0.0)
    psf = kpsf.stack_psf(stars["st"][cols], stars["cdx"][cols], stars["cdy"][cols], weights=w,
                         masked=stars["holes"][cols])
    fit = fit_moffat(psf)
    if config.denoise:
        var = stack_variance(stars["st"], w, sky_sigma, psf, members=cols)
        psf = hybrid_psf(psf, var, fit.model, fit.fwhm, k=config.denoise_k)
        fit = fit_moffat(psf)
    return PSFModel(stamps=psf, fwhm=fit.fwhm, apcorr=fit.apcorr, n_stars=valid.sum(axis=1), grid=grid, locus=locus)


def _symmetric_fill(stamps, holes):
    """Star stamps with their unusable pixels (``holes``) replaced by the point-symmetric pixel
    about the stamp centre where that one is usable: a PSF is nearly symmetric, so a hole in the
    wings no longer pulls a windowed centroid or an adaptive size away (0 where both are holes)."""
    xp = array_namespace(stamps)
    mirror = holes[:, ::-1, ::-1]
    return xp.where(holes, xp.where(mirror, 0.0, stamps[:, ::-1, ::-1]), stamps).astype(stamps.dtype)


def _point_sources(images, unusable, b: int, cat: SourceCatalog, locus: float, stamp: int, *,
                   min_snr: float) -> SourceCatalog:
    """Fill ``size`` (adaptive FWHM) and ``point`` (on the stellar locus) for the bright sources
    (S/N >= ``min_snr``: ``psf.point_min_snr``) with no other flag than a masked pixel in the
    aperture (:func:`_symmetric_fill`): what the flux ratio trusts as stars (a galaxy may host a
    transient)."""
    xp = array_namespace(cat.x)
    if not np.isfinite(locus) or len(cat) == 0:
        return cat
    bright = (cat.snr >= min_snr) & ((cat.flag & ~xp.int32(FLAG_MASKED)) == 0)
    idx = xp.nonzero(bright)[0]
    st, _ = gather_stamps(images[b:b + 1], None, cat.x[idx], cat.y[idx], size=stamp, fill=0.0)
    holes, _ = gather_stamps(unusable[b:b + 1], None, cat.x[idx], cat.y[idx], size=stamp, fill=False)
    st = _symmetric_fill(st, holes)
    size = xp.full(len(cat), xp.nan)
    size[idx] = stamp_fwhm(st.astype(xp.float64), sigma=locus / kpsf.FWHM_PER_SIGMA)
    point = bright & (xp.abs(size / locus - 1) < locus_tolerance(xp.maximum(cat.snr, 1e-30)))
    return cat.replace(size=size, point=point)


# ------------------------------------------------------------------------------------------------
# the reference PSF, carried onto the science grid
# ------------------------------------------------------------------------------------------------
#: sub-pixel phases (per axis) averaged when a PSF is resampled through the alignment
_PHASES = (-1.0 / 3.0, 0.0, 1.0 / 3.0)


def carry_psf(ref: PSFModel, tile_centres, tile_jacobian, grid: TileGrid, *, lanczos_order: int = 3) -> PSFModel:
    """The reference PSF as the aligned reference shows it, per science tile.

    Parameters
    ----------
    ref : PSFModel
        Per-tile PSFs on the reference's own grid (device arrays).
    tile_centres : ndarray (T, 2) float64
        Reference-grid position ``(x, y)`` of each science tile centre
        (:class:`~nightsift.engine.stages.align.AlignedReference`).
    tile_jacobian : ndarray (T, 2, 2) float64
        ``d(ref)/d(sci)`` at those centres.
    grid : TileGrid
        The science tiling.
    lanczos_order : int
        The alignment's Lanczos order.

    Returns
    -------
    PSFModel on ``grid``: unit-sum stamps of the reference's stamp size, FWHM and aperture
    correction from a fresh Moffat fit (science pixels), the reference tiles' star counts.

    Notes
    -----
    A star at reference position ``q`` appears in the aligned reference as
    ``A(u) = sum_k L(q + J u - k) P(k - q)`` (``u`` the science-pixel offset from its aligned
    position, ``L`` the Lanczos kernel): the PSF sampled at the star's sub-pixel phase,
    interpolated through the local affine map. The stamp is shifted to each of a 3 x 3 set of
    phases, resampled through ``J`` around its centre, shifted back and averaged, then re-centred.
    """
    xp = array_namespace(ref.stamps, tile_centres, tile_jacobian)
    T = len(grid)
    rt = tile_index(ref.grid, tile_centres[:, 0], tile_centres[:, 1])
    stamps = ref.stamps[rt]  # (T, s, s)
    s = stamps.shape[-1]
    c = s // 2
    off = xp.arange(s, dtype=xp.float64) - c
    vv, uu = xp.meshgrid(off, off, indexing="ij")  # output (science) pixel offsets v (row), u (col)
    J = tile_jacobian
    Jinv = xp.linalg.inv(J)
    acc = xp.zeros((T, s, s))
    for py in _PHASES:
        for px in _PHASES:
            shifted = kpsf.fourier_shift(stamps, xp.full(T, px), xp.full(T, py))
            xs = c + J[:, 0, 0, None, None] * uu + J[:, 0, 1, None, None] * vv
            ys = c + J[:, 1, 0, None, None] * uu + J[:, 1, 1, None, None] * vv
            res = lanczos_resample(shifted[:, None], xs, ys, a=int(lanczos_order), fill=0.0)[:, 0]
            # the star sits at science offset J^-1 (px, py): move it back onto the centre
            bx = Jinv[:, 0, 0] * px + Jinv[:, 0, 1] * py
            by = Jinv[:, 1, 0] * px + Jinv[:, 1, 1] * py
            acc += kpsf.fourier_shift(res, -bx, -by)
    psf = kpsf.recenter(acc / acc.sum(axis=(1, 2), keepdims=True))
    fit = fit_moffat(psf)
    return PSFModel(stamps=psf, fwhm=fit.fwhm, apcorr=fit.apcorr, n_stars=ref.n_stars[rt], grid=grid,
                    locus=ref.locus)
