"""PSF stage: bright isolated stars -> an empirical PSF per tile; the reference's PSF carried
onto the science grid.

:func:`measure_psf` (science images every visit, the reference once per CCD in its own frame):

1. PSF-star candidates from the catalogue (:func:`select_psf_stars`): S/N >= ``psf.min_snr``,
   unflagged, no unusable pixel in the stamp, no catalogue neighbour with > 1 % of the flux within
   the stamp radius, not grossly elongated;
2. the stellar locus in adaptive moments among the brightest candidates (:func:`stellar_locus`:
   nothing resolved is smaller than a star, so the locus is the smallest size around which
   ``psf.min_stars`` sources cluster) sets the stamp size and cleans compact galaxies and blends
   from the candidates; where those candidates are mostly galaxies (a galaxy-rich field, where
   few stars pass the isolation test), the lower envelope of all sources' sizes from S/N
   ``psf.locus_min_snr`` is the locus (:func:`_stellar_loci`), and when fewer than
   ``psf.min_stars`` isolated stars sit on it they are chosen again with a smaller isolation
   radius (the crowded retry); a field whose stars make no locus fails with one line rather than
   stack galaxies;
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
           "MIN_PSF_FWHM", "psf_warnings", "point_sources"]

#: most sources (brightest first) whose sizes give the lower envelope of the stellar locus
#: (:func:`_stellar_loci`): all bright sources of a 4k x 4k CCD, a few MB of stamps
LOCUS_POOL = 2000

#: :func:`_stellar_loci`'s verdicts besides 0 (the bright isolated candidates' locus): the
#: locus is the lower envelope of all sizes; the same, but sources well below it say the stars are
#: too few to make one (the image fails rather than take galaxies for its PSF)
FLOOR, FLOOR_UNSURE = 1, 2

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
                     config: PSFConfig, min_snr: float | None = None, isolation: float | None = None):
    """Device bool ``(n,)``: bright sources with no ``unusable`` (``(B, ny, nx)`` bool) pixel in
    their core (a ``2 core + 1`` box of image ``image``; the wings may hold some: they are left
    out of the stack), no other flag than a masked pixel in the aperture, inside the image by half
    a stamp, isolated (no non-artefact neighbour with more than ``psf.isolation_flux`` of the flux
    within ``psf.isolation_radius`` stamp half-sides), and not grossly elongated.

    ``min_snr`` (default ``psf.min_snr``) and ``isolation`` (the isolation radius in px, default
    ``psf.isolation_radius`` half-stamps; 0 = no isolation test) are the crowded-field retry's
    (:func:`measure_psf`) and the stellar locus's (:func:`_stellar_loci`)."""
    xp = array_namespace(cat.x)
    ny, nx = shape
    h = stamp // 2
    n = len(cat)
    ok = (cat.snr >= (config.min_snr if min_snr is None else min_snr)) & ((cat.flag & ~xp.int32(FLAG_MASKED)) == 0)
    ok &= (cat.x >= h) & (cat.x < nx - h - 1) & (cat.y >= h) & (cat.y < ny - h - 1)
    if n == 0:
        return ok
    ok &= count_in_boxes(unusable, image, cat.x, cat.y, half=min(core, h)) == 0
    # single-pixel artefacts (an unmasked hot pixel, a cosmic ray: the peak holds most of the
    # aperture flux) do not count as neighbours: the stack's clipping removes them
    sharp = cat.peak > 0.6 * xp.maximum(cat.flux, 1e-30)
    radius = config.isolation_radius * h if isolation is None else float(isolation)
    if radius > 0:
        brightest = max_within(cat.x, cat.y, cat.x, cat.y, cat.flux, radius=radius,
                               self_index=xp.arange(n, dtype=xp.int64), where2=~sharp)
        ok &= ~(brightest > config.isolation_flux * cat.flux)
    else:  # no isolation test (the stellar locus's pool): a single-pixel artefact is still no star
        ok &= ~sharp
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
                paths=None, prefix: str = "", poisson_scale=None) -> StageResult:
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
    poisson_scale : sequence of B floats, optional
        Image units per e- of images not in e- (``NSPOISS``), for the stars' photon noise in the
        stack's variance; ``None``: e- images.

    Returns
    -------
    StageResult
        ``value``: list of B items, each ``(PSFModel, SourceCatalog)`` (the catalogue with its
        ``psf_star``, ``size`` and ``point`` columns filled) or an :class:`AlgorithmFailure`
        (too few PSF stars: that image cannot be subtracted; the others go on). ``qa``: lists of
        B values ``psf_fwhm`` (median px), ``psf_fwhm_min/max``, ``psf_n_stars``,
        ``psf_n_candidates``, ``psf_stamp``, ``psf_locus_fwhm``, ``psf_n_rejected``, ``psf_apcorr``,
        ``psf_locus_floored`` (0; 1: the locus is the lower envelope of sizes, the bright
        candidates being galaxies; 2: no star mode, the image failed) and ``psf_crowded`` (1: the
        stars came from the crowded retry) (prefixed).
    """
    xp = array_namespace(images, masks)
    B = images.shape[0]
    paths = list(paths) if paths is not None else [None] * B
    unusable = unusable_of(masks)
    max_stamp = 2 * grid.margin + 1  # the tile margin must hold half a PSF (no wrap-around)

    # 1-2: candidates at the guessed stamp size, their adaptive sizes, the stellar locus (one read)
    loci, floored, rich = _stellar_loci(images, unusable, catalogs, fwhm_guess, max_stamp=max_stamp, config=config)
    # 3: the stars of each image (device), their counts (one read; a second for a crowded retry)
    stars = [_psf_stars(images, unusable, b, cat, loci[b] if np.isfinite(loci[b]) else fwhm_guess[b], loci[b],
                        max_stamp=max_stamp, config=config) for b, cat in enumerate(catalogs)]
    counts = _star_counts(stars)
    crowded = _crowded_retry(images, unusable, catalogs, stars, counts, loci, rich, max_stamp=max_stamp,
                             config=config)

    # 3-5: per image, the tiles' stacks and Moffat fits, or a failure
    out, qa_rows = [], []
    centres = to_device(grid.centres(), xp, label="tile_centres")
    for b, cat in enumerate(catalogs):
        s = stars[b]
        n_use, n_rej, locus_h, n_clean = counts[b]
        n_cand = int(s["idx"].shape[0])
        row = {"psf_n_candidates": n_cand, "psf_stamp": s["stamp"], "psf_locus_fwhm": loci[b],
               "psf_n_rejected": int(n_rej), "psf_locus_floored": int(floored[b]), "psf_crowded": int(crowded[b])}
        qa_rows.append(row)
        failure = _too_few(n_use, n_cand, n_clean, floored[b], loci[b], paths[b], config)
        if failure is not None:
            out.append(AlgorithmFailure(failure, stage="psf", qa={prefix + k: v for k, v in row.items()}))
            continue
        model = _tile_psfs(s, cat, centres, grid, sky_sigma[b], float(locus_h), config=config,
                           poisson_scale=1.0 if poisson_scale is None else float(poisson_scale[b]))
        psf_star = xp.zeros(len(cat), bool)
        psf_star[s["idx"][s["use"]]] = True
        out.append((model, point_sources(images, unusable, b, cat.replace(psf_star=psf_star), model.locus,
                                          s["stamp"], min_snr=config.point_min_snr)))
        row.update(psf_fwhm=xp.median(model.fwhm), psf_fwhm_min=model.fwhm.min(), psf_fwhm_max=model.fwhm.max(),
                   psf_n_stars=int(n_use), psf_apcorr=xp.median(model.apcorr))
    keys = sorted({k for r in qa_rows for k in r})
    qa = {prefix + k: [r.get(k, float("nan")) for r in qa_rows] for k in keys}
    return StageResult(out, qa)


def _star_counts(stars: list[dict]) -> list[tuple]:
    """``(n_use, n_rej, locus, n_clean)`` of each image's stars, host numbers (one read)."""
    vals = host_scalars(*[v for s in stars for v in (s["n_use"], s["n_rej"], s["n_clean"])],
                        *[s["locus"] for s in stars])
    B = len(stars)
    return [(vals[3 * b], vals[3 * b + 1], vals[3 * B + b], vals[3 * b + 2]) for b in range(B)]


def _crowded_retry(images, unusable, catalogs, stars: list[dict], counts: list[tuple], loci, rich, *,
                   max_stamp: int, config: PSFConfig) -> list[bool]:
    """Images with a stellar locus but fewer than ``psf.min_stars`` isolated bright stars on it,
    or whose bright candidates are mostly resolved (``rich``: a galaxy-rich field, where the few
    isolated stars stack into a fragile PSF; seen: 3 stars, 10 % broad), try again with
    :func:`_psf_stars`'s ``crowded`` selection; the retry replaces ``stars[b]`` and ``counts[b]``
    in place when it finds enough and more stars on the locus. Returns which images use it (one
    host read for those that tried)."""
    todo = [b for b in range(len(stars)) if np.isfinite(loci[b]) and (counts[b][3] < config.min_stars or rich[b])
            and config.crowded_isolation_fwhm > 0]
    if not todo:
        return [False] * len(stars)
    retry = {b: _psf_stars(images, unusable, b, catalogs[b], loci[b], loci[b], max_stamp=max_stamp, config=config,
                           crowded=True) for b in todo}
    got = dict(zip(todo, _star_counts([retry[b] for b in todo])))
    used = [False] * len(stars)
    for b in todo:
        if got[b][3] >= config.min_stars and got[b][3] > counts[b][3]:
            stars[b], counts[b], used[b] = retry[b], got[b], True
    return used


def _too_few(n_use: int, n_cand: int, n_clean: int, floored: int, locus: float, path, config: PSFConfig):
    """Why an image cannot have a PSF (its message), or None: fewer than ``psf.min_stars``
    candidates or stars used, or -- where the locus had to come from the lower envelope of
    sizes (a galaxy-dominated field) -- fewer than that on the locus (the old fallback of every
    candidate would be a PSF made of galaxies), or no star mode at all (:data:`FLOOR_UNSURE`)."""
    where = f"{path}: " if path else ""
    if n_use < config.min_stars or n_cand < config.min_stars:
        return (f"{where}too few PSF stars: {n_cand} bright isolated unsaturated stars found, need "
                f"{config.min_stars} (lower psf.min_snr or psf.min_stars, or check the image)")
    if floored == FLOOR_UNSURE:
        return (f"{where}too few PSF stars: the bright sources are resolved (galaxies; their smallest cluster "
                f"measures {locus:.2f} px) and fewer than 3 smaller ones from S/N {config.locus_min_snr:g} "
                "make no stellar locus: lower psf.locus_min_snr, or give a PSF file")
    if floored and n_clean < config.min_stars:
        return (f"{where}too few PSF stars: the smallest sources (FWHM {locus:.2f} px) are {int(n_clean)} usable "
                f"stars among {n_cand} bright candidates, need {config.min_stars}; the others are resolved "
                "(a galaxy-dominated field): lower psf.locus_min_snr or psf.min_stars, or give a PSF file")
    return None


def _stellar_loci(images, unusable, catalogs, fwhm_guess, *, max_stamp: int,
                  config: PSFConfig) -> tuple[list[float], list[int], list[bool]]:
    """The stellar locus (adaptive-moment FWHM, px; NaN where none) of each image, whether it
    had to be taken from the lower envelope of all sources' sizes (0, :data:`FLOOR`,
    :data:`FLOOR_UNSURE`), and whether the bright candidates are mostly resolved (their median
    size above ``psf.locus_resolved_ratio`` times the envelope's: a galaxy-rich field) (one host
    read).

    Two pools at the guessed stamp size: the ``4 psf.max_stars`` brightest PSF-star candidates
    (isolated, S/N >= ``psf.min_snr``: the locus of a well-populated field), and the lower
    envelope: every unflagged, unsharp, not grossly elongated source from S/N
    ``psf.locus_min_snr`` (the brightest :data:`LOCUS_POOL`), isolated or not. Nothing resolved,
    nor any blend, is smaller than a star, so the smallest populated size mode of that pool is
    the stars even where galaxies outnumber them many times -- where isolation, which a star
    among many faint galaxies rarely passes, leaves the bright isolated candidates mostly
    galaxies (seen: 1 isolated star among 74 bright candidates, a locus of 5.7 px for a 2.1 px
    PSF). When the bright pool's locus (its median size where no cluster) exceeds
    ``psf.locus_resolved_ratio`` times the envelope's, the envelope is the locus ("floored").
    """
    xp = array_namespace(images)
    _, ny, nx = images.shape
    vals = []
    for b, cat in enumerate(catalogs):
        s0 = _stamp_for(config, fwhm_guess[b], max_stamp)
        core = core_half(fwhm_guess[b], config)
        sigma = fwhm_guess[b] / kpsf.FWHM_PER_SIGMA
        first = _brightest(xp, select_psf_stars(cat, unusable, b, (ny, nx), stamp=s0, core=core, config=config),
                           cat.flux, 4 * config.max_stars)
        sizes = _sizes(images, b, cat, first, s0, sigma)
        pool = _brightest(xp, select_psf_stars(cat, unusable, b, (ny, nx), stamp=s0, core=core, config=config,
                                               min_snr=config.locus_min_snr, isolation=0), cat.flux, LOCUS_POOL)
        psizes = _sizes(images, b, cat, pool, s0, sigma)
        floor = stellar_locus(psizes, min_count=max(3, config.min_stars), width=0.05)
        below = ((psizes >= MIN_PSF_FWHM) & (psizes < floor / config.locus_resolved_ratio)).sum()
        on = (xp.abs(psizes / floor - 1) <= 0.1).sum()
        above = ((psizes > 1.1 * floor) & (psizes <= config.locus_resolved_ratio * floor)).sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            typical = xp.nanmedian(xp.where(sizes >= MIN_PSF_FWHM, sizes, xp.nan)) if sizes.shape[0] \
                else xp.full((), xp.nan)
        vals += [stellar_locus(sizes, min_count=config.min_stars), floor, typical, below, above - on]
    host = [float(v) for v in host_scalars(*vals)]
    loci, floored, rich = [], [], []
    for b in range(len(catalogs)):
        bright, floor, typical, below, rising = host[5 * b:5 * b + 5]
        seen = bright if np.isfinite(bright) else typical
        low = bool(np.isfinite(floor) and np.isfinite(seen) and seen > config.locus_resolved_ratio * floor)
        loci.append(floor if low else (bright if np.isfinite(bright) else float("nan")))
        # a star mode has nothing real below it (sharp artefacts and sub-pixel sizes are out of the
        # pool) and a gap above it (galaxies start further up): a source well below a "floor", or
        # more sources just above it than on it, say it is the small end of the galaxies and the
        # stars are too few to cluster (seen: one star at 2.7 px under a "floor" of 5.7 px)
        floored.append(0 if not low else (FLOOR_UNSURE if below >= 1 or rising > 0 else FLOOR))
        rich.append(bool(np.isfinite(floor) and np.isfinite(typical) and typical > config.locus_resolved_ratio * floor))
    return loci, floored, rich


def _sizes(images, b: int, cat: SourceCatalog, idx, stamp: int, sigma: float):
    """Adaptive-moment FWHMs (px) of the catalogue rows ``idx`` of image ``b``."""
    xp = array_namespace(images)
    st, _ = gather_stamps(images[b:b + 1], None, cat.x[idx], cat.y[idx], size=stamp, fill=0.0)
    return stamp_fwhm(st.astype(xp.float64), sigma=sigma)


def _psf_stars(images, unusable, b: int, cat: SourceCatalog, guess: float, locus: float, *, max_stamp: int,
               config: PSFConfig, crowded: bool = False) -> dict:
    """The PSF stars of image ``b`` (device arrays, nothing read on the host).

    Candidates (:func:`select_psf_stars`) at the stamp size of ``guess`` (px, the locus or the
    first guess), brightest first; their stamps (holes filled symmetrically for the centroid and
    the size), windowed centroids (the catalogue's where the window ran away), and PSFEx-style
    cleaning: sources off the stellar ``locus`` (NaN: the median size of the brightest) are not
    used unless that leaves fewer than ``psf.min_stars``. ``crowded``: the retry of a field whose
    isolated bright candidates hold too few stars (:func:`measure_psf`): candidates from S/N
    ``psf.locus_min_snr``, isolated within ``psf.crowded_isolation_fwhm`` locus FWHMs only (the
    stack's clipping removes a neighbour's wings further out).

    Returns
    -------
    dict with ``idx`` (catalogue rows), ``st``, ``holes``, ``cdx``, ``cdy``, ``use``, ``stamp``,
    ``locus``, ``n_use``, ``n_rej``, ``n_clean`` (0-d device counts).
    """
    xp = array_namespace(images)
    _, ny, nx = images.shape
    stamp = _stamp_for(config, guess, max_stamp)
    relax = dict(min_snr=min(config.min_snr, config.locus_min_snr),
                 isolation=config.crowded_isolation_fwhm * locus) if crowded else {}
    idx = _brightest(xp, select_psf_stars(cat, unusable, b, (ny, nx), stamp=stamp, core=core_half(guess, config),
                                          config=config, **relax), cat.flux)
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
                n_use=use.sum(), n_rej=(~clean).sum(), n_clean=clean.sum(), crowded=crowded)


def _tile_psfs(stars: dict, cat: SourceCatalog, centres, grid: TileGrid, sky_sigma: float, locus: float, *,
               config: PSFConfig, poisson_scale: float = 1.0) -> PSFModel:
    """Each tile's PSF from the stars of :func:`_psf_stars`: the S/N^2-weighted clipped stack of its
    members (:func:`_tile_members`), the Moffat fit, and with ``psf.denoise`` the hybrid of stack
    and model fitted again."""
    xp = array_namespace(stars["st"])
    use, idx = stars["use"], stars["idx"]
    snr = cat.snr[idx]
    weights = xp.where(use, xp.minimum(snr, config.max_weight_snr) ** 2, 0.0)
    # a crowded field's few stars (each with neighbours in its wings) are stacked all together in
    # every tile: the clipped mean of 3 such stars followed one star's neighbour (seen: 15 % broad)
    fewest = config.max_stars if stars.get("crowded") else config.min_stars
    cols, valid = _tile_members(xp, cat.x[idx], cat.y[idx], use, centres, core=grid.core,
                                min_stars=fewest, max_stars=config.max_stars)
    w = xp.where(valid, weights[cols], 0.0)
    psf = kpsf.stack_psf(stars["st"][cols], stars["cdx"][cols], stars["cdy"][cols], weights=w,
                         masked=stars["holes"][cols])
    fit = fit_moffat(psf)
    if config.denoise:
        var = stack_variance(stars["st"], w, sky_sigma, psf, members=cols, poisson_scale=poisson_scale)
        psf = hybrid_psf(psf, var, fit.model, fit.fwhm, k=config.denoise_k)
        fit = fit_moffat(psf)
    if stars.get("crowded"):
        # galaxies' light around a crowded field's stars leaves a pedestal in the stack; in a
        # stamp of ~1000 px around a ~2 px core, 1e-4 per pixel is 10 % of the flux taken from
        # the core, and every PSF-fit flux comes out that much high (seen: F_r 9-17 % off)
        psf = psf - fit.pedestal[:, None, None]
        psf = psf / psf.sum(axis=(1, 2), keepdims=True)
        fit = fit_moffat(psf)
    return PSFModel(stamps=psf, fwhm=fit.fwhm, apcorr=fit.apcorr, n_stars=valid.sum(axis=1), grid=grid, locus=locus)


def _symmetric_fill(stamps, holes):
    """Star stamps with their unusable pixels (``holes``) replaced by the point-symmetric pixel
    about the stamp centre where that one is usable: a PSF is nearly symmetric, so a hole in the
    wings no longer pulls a windowed centroid or an adaptive size away (0 where both are holes)."""
    xp = array_namespace(stamps)
    mirror = holes[:, ::-1, ::-1]
    return xp.where(holes, xp.where(mirror, 0.0, stamps[:, ::-1, ::-1]), stamps).astype(stamps.dtype)


def point_sources(images, unusable, b: int, cat: SourceCatalog, locus: float, stamp: int, *,
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


def psf_warnings(sci_fwhm: float, ref_fwhm: float, ref_own_fwhm: float, sci_seeing, ref_seeing, *,
                 config: PSFConfig) -> list[str]:
    """One-line QA warnings for implausible PSFs (host numbers; none for a plausible pair).

    Parameters
    ----------
    sci_fwhm : float
        Science PSF FWHM (px, median over tiles).
    ref_fwhm : float
        Reference PSF FWHM carried onto the science grid (science px, median over tiles).
    ref_own_fwhm : float
        Reference PSF FWHM in the reference's own pixels (median over its tiles).
    sci_seeing, ref_seeing : (float, str) or None
        Each header's seeing (px of its own image) and card
        (:func:`nightsift.engine.stages.measure.header_seeing`); None: no check.
    config : PSFConfig
        ``seeing_tolerance``, ``max_fwhm_ratio``.

    Notes
    -----
    A flag does not change the subtraction: the header's seeing is measured otherwise and the
    PSF is what the stars show; the flux ratio, which a wrong PSF biases, is checked against the
    zero points separately (:func:`nightsift.engine.stages.subtract.flux_ratio_warning`).
    """
    out = []
    tol = config.seeing_tolerance
    for what, fwhm, seen in (("sci", sci_fwhm, sci_seeing), ("ref", ref_own_fwhm, ref_seeing)):
        if seen is None or not np.isfinite(fwhm):
            continue
        value, key = seen
        if abs(fwhm / value - 1) > tol:
            out.append(f"{what} PSF FWHM {fwhm:.2f} px implausible: header {key} gives {value:.2f} px "
                       f"(tolerance {100 * tol:.0f}%)")
    if np.isfinite(sci_fwhm) and np.isfinite(ref_fwhm) and min(sci_fwhm, ref_fwhm) > 0:
        ratio = max(sci_fwhm, ref_fwhm) / min(sci_fwhm, ref_fwhm)
        if ratio > config.max_fwhm_ratio:
            out.append(f"sci PSF FWHM {sci_fwhm:.2f} px and ref {ref_fwhm:.2f} px differ {ratio:.1f}x (more than "
                       f"{config.max_fwhm_ratio:g}x): one PSF may be measured on galaxies")
    return out


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
