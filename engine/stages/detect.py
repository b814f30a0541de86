"""Detection stage: peaks above threshold in S_corr, and the features of each candidate.

One candidate definition on every backend, for a batch of B CCDs at once:

1. signed local maxima of S_corr above ``detect.threshold`` off the excluded pixels
   (:func:`nightsift.kernels.peaks.find_peaks`; S_corr already is matched-filtered with unit
   variance, so the threshold is in sigma and a single pixel is a detection), with at least
   ``detect.min_area`` pixels of the same sign above threshold in their 3x3 neighbourhood;
2. sub-pixel positions from a 3x3 quadratic fit (:func:`nightsift.kernels.peaks.refine_peaks`);
3. each peak climbs to the peak of the PSF-flux image it sits on (:func:`climb_to_flux_peak`);
4. peaks of one sign ringing one small excluded patch are one candidate (:func:`merge_around_holes`);
5. greedy suppression of weaker peaks of the same sign within ``detect.dedup_radius``
   (:func:`nightsift.kernels.neighbours.suppress`).

Features: PSF-fit flux of D with the tile's P_D shifted to the sub-pixel position (identical to
``S / F_S`` evaluated between pixels), its error from the variance of S (background, source and
astrometric noise), S/N, the adaptive-moment FWHM and elongation of the candidate in D, bad pixels
in a box, the sign, the nearest reference source (distance, flux) and the local sky. The device
columns come back to the host once (:func:`candidate_tables` adds RA/Dec, magnitudes and ids).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nightsift.kernels import psf as kpsf
from nightsift.kernels._xp import array_namespace, host_scalar, ndimage_module, to_device, to_host
from nightsift.kernels.neighbours import nearest, suppress
from nightsift.kernels.peaks import find_peaks, refine_peaks
from nightsift.kernels.stamps import count_in_boxes, gather_stamps
from nightsift.kernels.tiles import tile_index

from ..config import DetectConfig
from ..io.fits import header_photometry
from ..records import (CANDID_INDEX, SourceCatalog, StageResult, SubtractionBatch, empty_candidates, make_candid,
                       unusable_of)

__all__ = ["Detections", "detect", "candidate_tables", "climb_to_flux_peak", "merge_around_holes",
           "pixel_scale_arcsec", "DETECTION_COLUMNS"]

#: the per-candidate columns computed on the device (one download: :func:`candidate_tables`)
DETECTION_COLUMNS = ("image", "x", "y", "flux", "fluxerr", "scorr", "fwhm", "elong", "nbad", "sign", "distnr",
                     "ref_flux", "sky")


@dataclass(frozen=True)
class Detections:
    """Candidates of a batch, as device columns (one row per candidate, sorted by (image, y, x)).

    ``columns`` maps each name of :data:`DETECTION_COLUMNS` to an ``(n,)`` array: ``image`` (index
    in the batch), ``x, y`` (0-based px), ``flux``, ``fluxerr`` (e-, aperture-corrected),
    ``scorr`` (signed sigma), ``fwhm`` (px, -999 where the moments diverge), ``elong``, ``nbad``,
    ``sign`` (+-1), ``distnr`` (px to the nearest reference source, inf when none within the
    radius), ``ref_flux`` (its flux, NaN when none), ``sky`` (e-).
    """

    columns: dict

    def __len__(self) -> int:
        return int(self.columns["x"].shape[0])


def _quadratic_offset(xp, img, b, xi, yi, sign):
    """Sub-pixel offset of the maximum of ``sign * img[b]`` around integer peaks (3-point
    parabolas along x and y; neighbours past the edge repeat the edge pixel)."""
    _, ny, nx = img.shape

    def at(yy, xx):
        return sign * img[b, xp.clip(yy, 0, ny - 1), xp.clip(xx, 0, nx - 1)].astype(xp.float64)

    c = at(yi, xi)
    left, right, down, up = at(yi, xi - 1), at(yi, xi + 1), at(yi - 1, xi), at(yi + 1, xi)
    ax = left - 2 * c + right
    ay = down - 2 * c + up
    dx = xp.where(ax < 0, 0.5 * (left - right) / xp.where(ax < 0, ax, -1.0), 0.0)
    dy = xp.where(ay < 0, 0.5 * (down - up) / xp.where(ay < 0, ay, -1.0), 0.0)
    return xp.clip(xp.nan_to_num(dx), -0.5, 0.5), xp.clip(xp.nan_to_num(dy), -0.5, 0.5)


def climb_to_flux_peak(flux, image, x, y, sign, *, max_steps, blocked=None):
    """Move peaks of S_corr to the peak of the PSF-flux image (``S / F_S``) they sit on.

    S_corr divides S by a noise that includes the source's own photon noise, so a bright
    transient has a flat or ring-shaped top in S_corr: the peak finder then sees several peaks
    1-2 FWHM from its centre (seen: four 5-sigma candidates on a square around one ZTF
    transient, three of them labelled bogus). S itself, the matched filter, has one peak per
    point source. Each peak climbs ``sign * flux`` by steepest ascent over its 3x3
    neighbourhood, at most ``max_steps`` pixels, never onto a ``blocked`` pixel, then gets a
    sub-pixel position from a quadratic fit of ``sign * flux``. On blank sky, where S_corr is S
    over a locally constant noise, nothing moves.

    Parameters
    ----------
    flux : ndarray (B, ny, nx)
        PSF flux of a point source centred on each pixel.
    image : ndarray (n,) int
        Image of each peak in the batch.
    x, y : ndarray (n,)
        Peak positions (pixels; rounded to the nearest pixel to start).
    sign : ndarray (n,) of +-1
    max_steps : ndarray (n,) int
        Most pixels each peak may move (e.g. the FWHM of P_D).
    blocked : ndarray (B, ny, nx) bool, optional
        Pixels a peak may not move onto.

    Returns
    -------
    x, y : ndarray (n,) float64, the refined sub-pixel positions.
    """
    xp = array_namespace(flux, x, y)
    _, ny, nx = flux.shape
    n = x.shape[0]
    xi = xp.clip(xp.rint(x).astype(xp.int64), 0, nx - 1)
    yi = xp.clip(xp.rint(y).astype(xp.int64), 0, ny - 1)
    if n == 0:
        return xp.zeros(0), xp.zeros(0)
    sg = sign.astype(xp.float64)
    oy = to_device(np.repeat(np.arange(-1, 2), 3), xp, dtype=np.int64, label="constants")
    ox = to_device(np.tile(np.arange(-1, 2), 3), xp, dtype=np.int64, label="constants")
    rows = xp.arange(n)
    for k in range(host_scalar(max_steps.max())):  # only the 3x3 neighbourhoods are read
        yy, xx = yi[:, None] + oy[None], xi[:, None] + ox[None]
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        yy, xx = xp.clip(yy, 0, ny - 1), xp.clip(xx, 0, nx - 1)
        v = sg[:, None] * flux[image[:, None], yy, xx].astype(xp.float64)
        ok &= xp.isfinite(v)
        if blocked is not None:
            ok &= ~blocked[image[:, None], yy, xx]
        v = xp.where(ok, v, -xp.inf)
        best = xp.argmax(v, axis=1)
        move = (v[rows, best] > v[:, 4]) & (k < max_steps)
        xi = xp.where(move, xi + ox[best], xi)
        yi = xp.where(move, yi + oy[best], yi)
    dx, dy = _quadratic_offset(xp, flux, image, xi, yi, sg)
    return xp.clip(xi + dx, 0, nx - 1), xp.clip(yi + dy, 0, ny - 1)


def _compact_patches(xp, lab, nlab: int, max_extent: int):
    """Per label (index 0 = background): True where the patch's bounding box fits in
    ``max_extent x max_extent`` pixels (a masked star core, not a bleed trail or an edge)."""
    out = xp.zeros(nlab + 1, bool)
    _, ny, nx = lab.shape
    flat = lab.reshape(-1)
    idx = xp.nonzero(flat)[0]
    if idx.shape[0] == 0:
        return out
    lb = flat[idx]
    yy = (idx // nx) % ny
    xx = idx % nx
    ext = []
    for c in (yy, xx):
        order = xp.lexsort(xp.stack([c, lb]))
        ls, cs = lb[order], c[order]
        first = xp.concatenate([xp.ones(1, bool), ls[1:] != ls[:-1]])
        last = xp.concatenate([ls[1:] != ls[:-1], xp.ones(1, bool)])
        span = xp.zeros(nlab + 1, xp.int64)
        span[ls[last]] = cs[last] - cs[first]
        ext.append(span)
    out = (ext[0] < max_extent) & (ext[1] < max_extent)
    out[0] = False
    return out


def merge_around_holes(image, x, y, value, sign, excluded, *, max_area: int, max_extent: int = 0, reach: int = 2):
    """Peaks of one sign that hug the same small excluded patch are one source.

    A hot pixel or a cosmic ray on a transient is masked and grown, and S_corr is zeroed there:
    the transient's signal survives only as a ring around the hole, which the peak finder sees as
    2-4 peaks (seen: a variable star at S/N 50 under a hot pixel came out as four candidates
    2.5 px from it, none matching it). Peaks within ``reach`` pixels of one excluded patch of at
    most ``max_area`` pixels, or of any area within a ``max_extent`` square (a saturated star's
    masked core: its residual ring held 8 peaks), are merged: the strongest is kept, moved to the
    mean position of the group (the ring's centre). Larger or elongated patches (bleed trails, CCD
    edges) are left alone: many sources may border them.

    Parameters
    ----------
    image : ndarray (n,) int
    x, y, value, sign : ndarray (n,)
    excluded : ndarray (B, ny, nx) bool
    max_area : int
    max_extent : int
        Patches whose bounding box fits in ``max_extent`` px (both axes) merge whatever their area.
    reach : int

    Returns
    -------
    keep : ndarray (n,) bool
    x, y : ndarray (n,) positions, moved for the kept peak of each merged group
    """
    xp = array_namespace(excluded, x, y)
    n = x.shape[0]
    keep = xp.ones(n, bool)
    if n == 0:
        return keep, x, y
    ndi = ndimage_module(xp)
    B, ny, nx = excluded.shape
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    lab, _ = ndi.label(excluded, structure=to_device(cross, xp, label="constants"))  # not across images
    area = xp.bincount(lab.reshape(-1))
    area[0] = max_area + 1
    compact = _compact_patches(xp, lab, area.shape[0] - 1, max_extent) if max_extent > 0 else xp.zeros(area.shape, bool)
    # the patch within reach of each peak: the largest label in its (2 reach + 1)^2 box
    box, _ = gather_stamps(lab, image, x, y, size=2 * reach + 1, fill=0)
    comp = box.reshape(n, -1).max(axis=1).astype(xp.int64)
    small = (comp > 0) & ((area[comp] <= max_area) | compact[comp])
    # groups: (patch, sign) of the small ones; strongest first within each group
    key = xp.where(small, comp * 2 + (sign > 0), -1)
    order = xp.lexsort(xp.stack([-xp.abs(value), key]))
    ks = key[order]
    first = xp.concatenate([xp.ones(1, bool), ks[1:] != ks[:-1]])
    seg = xp.cumsum(first) - 1
    counts = xp.bincount(seg)
    sx = xp.bincount(seg, weights=x[order])
    sy = xp.bincount(seg, weights=y[order])
    grouped = (ks >= 0) & (counts[seg] >= 2)
    keep_sorted = ~grouped | first
    new_x = xp.where(grouped & first, sx[seg] / counts[seg], x[order])
    new_y = xp.where(grouped & first, sy[seg] / counts[seg], y[order])
    keep[order] = keep_sorted
    x = x.copy()
    y = y.copy()
    x[order] = new_x
    y[order] = new_y
    return keep, x, y


def pixel_scale_arcsec(wcs) -> float:
    """Mean pixel side (arcsec) of a celestial WCS at its reference point."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def detect(sub: SubtractionBatch, *, sky, ref_cats, distnr_radius, config: DetectConfig,
           cutout_size: int = 63) -> StageResult:
    """Candidates (positive and negative) above ``config.threshold`` in S_corr, with features.

    Parameters
    ----------
    sub : SubtractionBatch
        Output of the subtraction stage for B CCDs.
    sky : ndarray (B, ny, nx)
        Science background maps (e-), for the ``sky`` feature.
    ref_cats : list of B SourceCatalog
        Reference sources on the science grid (``distnr``, ``ref_flux``).
    distnr_radius : sequence of B floats
        Search radius (px) of the nearest reference source (``detect.distnr_max_arcsec`` over the
        pixel scale).
    config : DetectConfig
    cutout_size : int
        Side of the cutouts (for the ``edge`` flag).

    Returns
    -------
    StageResult(Detections, qa) with qa lists ``n_peaks``, ``n_candidates``, ``n_positive``,
    ``n_negative`` (device arrays).
    """
    xp = array_namespace(sub.S_corr)
    B, ny, nx = sub.S_corr.shape
    T = len(sub.grid)
    pk = find_peaks(sub.S_corr, threshold=float(config.threshold), radius=0.0, excluded=sub.excluded)
    img, val, sign = pk.image, pk.value.astype(xp.float64), pk.sign.astype(xp.float64)
    if config.min_area > 1 and len(pk):
        above = sign[:, None] * _neighbourhood(xp, sub.S_corr, img, pk.y, pk.x) > config.threshold
        ok = above.sum(axis=1) >= config.min_area
        img, val, sign = img[ok], val[ok], sign[ok]
        pk = type(pk)(image=img, y=pk.y[ok], x=pk.x[ok], value=pk.value[ok], sign=pk.sign[ok])
    x, y = refine_peaks(sub.S_corr, pk)
    fwhm_pd = xp.zeros(B * T)
    for size, tiles, _ in _stamp_groups(sub, img):  # each CCD's P_D at its own stamp size
        fwhm_pd[tiles] = kpsf.half_max_fwhm(_crop(sub.P_D[tiles], size))
    if config.climb_to_flux_peak and x.shape[0]:
        tile = img * T + tile_index(sub.grid, x, y)
        steps = xp.ceil(fwhm_pd[tile]).astype(xp.int64)
        x, y = climb_to_flux_peak(sub.flux, img, x, y, sign, max_steps=steps, blocked=sub.excluded)
    if config.hole_merge_area > 0 and x.shape[0]:
        keep, x, y = merge_around_holes(img, x, y, val, sign, sub.excluded, max_area=config.hole_merge_area,
                                        max_extent=config.hole_merge_extent)
        img, x, y, val, sign = img[keep], x[keep], y[keep], val[keep], sign[keep]
    n_peaks = xp.bincount(img, minlength=B)
    keep = suppress(x, y, xp.abs(val), radius=config.dedup_radius, image=img, group=sign.astype(xp.int64))
    img, x, y, val, sign = img[keep], x[keep], y[keep], val[keep], sign[keep]
    order = xp.lexsort(xp.stack([x, y, img]))
    img, x, y, val, sign = img[order], x[order], y[order], val[order], sign[order]
    qa = {"n_peaks": n_peaks, "n_candidates": xp.bincount(img, minlength=B),
          "n_positive": xp.bincount(img[sign > 0], minlength=B),
          "n_negative": xp.bincount(img[sign < 0], minlength=B)}
    return StageResult(Detections(_features(sub, sky, ref_cats, distnr_radius, img, x, y, val, sign, fwhm_pd,
                                            config=config)), qa)


def _neighbourhood(xp, img, b, y, x):
    """The 3x3 neighbourhoods ``(n, 9)`` of integer pixels (edges repeat)."""
    _, ny, nx = img.shape
    oy = to_device(np.repeat(np.arange(-1, 2), 3), xp, dtype=np.int64, label="constants")
    ox = to_device(np.tile(np.arange(-1, 2), 3), xp, dtype=np.int64, label="constants")
    return img[b[:, None], xp.clip(y[:, None] + oy, 0, ny - 1), xp.clip(x[:, None] + ox, 0, nx - 1)]


def _crop(stamps, size: int):
    """The central ``size x size`` of ``(n, s, s)`` stamps."""
    h = (stamps.shape[-1] - size) // 2
    return stamps[:, h:h + size, h:h + size] if h > 0 else stamps


def _stamp_groups(sub: SubtractionBatch, img):
    """``(size, tiles, members)`` per distinct PSF stamp size of the batch's CCDs: their tile rows
    (device int) and which candidates (``img``) belong to them (device bool)."""
    xp = array_namespace(sub.P_D, img)
    B, T = len(sub), len(sub.grid)
    sizes = list(sub.stamp) if sub.stamp else [sub.P_D.shape[-1]] * B
    out = []
    for size in sorted(set(sizes)):
        ccds = [b for b in range(B) if sizes[b] == size]
        tiles = to_device(np.concatenate([np.arange(b * T, (b + 1) * T) for b in ccds]), xp, label="batch_index")
        cc = to_device(np.asarray(ccds, np.int64), xp, label="batch_index")
        out.append((size, tiles, xp.isin(img, cc)))
    return out


def _features(sub: SubtractionBatch, sky, ref_cats, distnr_radius, img, x, y, val, sign, fwhm_pd, *,
              config: DetectConfig) -> dict:
    xp = array_namespace(sub.D, x)
    B, ny, nx = sub.D.shape
    T = len(sub.grid)
    n = x.shape[0]
    tile = img * T + tile_index(sub.grid, x, y)
    xi, yi = xp.rint(x).astype(xp.int64), xp.rint(y).astype(xp.int64)
    flux = xp.zeros(n)
    fw = xp.zeros(n)
    el = xp.zeros(n)
    # per group of CCDs with one PSF stamp size: PSF-fit flux of D with the tile's P_D shifted onto
    # the candidate, and the candidate's shape in D (adaptive moments of sign * D, started at the
    # FWHM of its tile's P_D)
    for size, _, members in _stamp_groups(sub, img):
        k = xp.nonzero(members)[0]
        if k.shape[0] == 0:
            continue
        d_st, _ = gather_stamps(sub.D, img[k], x[k], y[k], size=size, fill=0.0)
        d_st = d_st.astype(xp.float64)
        p = kpsf.fourier_shift(_crop(sub.P_D[tile[k]], size), x[k] - xi[k], y[k] - yi[k])
        flux[k] = sub.apcorr[tile[k]] * (d_st * p).sum(axis=(1, 2)) / (sub.F_D[tile[k]] * (p * p).sum(axis=(1, 2)))
        _, _, mxx, myy, mxy = kpsf.moments(d_st * sign[k][:, None, None], sigma=fwhm_pd[tile[k]] / kpsf.FWHM_PER_SIGMA)
        fw[k], el[k] = kpsf.shape_from_moments(mxx, myy, mxy)
    fluxerr = sub.flux_err[img, yi, xi].astype(xp.float64)  # aperture-corrected too
    nbad = count_in_boxes(unusable_of(sub.mask), img, x, y, half=config.nbad_halfwidth)
    dist = xp.full(n, xp.inf)
    ref_flux = xp.full(n, xp.nan)
    rx = [c.x for c in ref_cats]
    if n and sum(int(c.x.shape[0]) for c in ref_cats):
        ri = xp.concatenate([xp.full(len(c), b, xp.int64) for b, c in enumerate(ref_cats)])
        rxx, ryy = xp.concatenate(rx), xp.concatenate([c.y for c in ref_cats])
        rf = xp.concatenate([c.flux for c in ref_cats])
        j, dist = nearest(x, y, rxx, ryy, radius=float(max(distnr_radius)), image1=img, image2=ri)
        lim = to_device(np.asarray(distnr_radius, np.float64), xp, label="detect_parameters")[img]
        hit = (j >= 0) & (dist <= lim)
        dist = xp.where(hit, dist, xp.inf)
        ref_flux = xp.where(hit, rf[xp.where(hit, j, 0)], xp.nan)
    cols = {"image": img, "x": x, "y": y, "flux": flux, "fluxerr": fluxerr, "scorr": val,
            "fwhm": xp.nan_to_num(fw, nan=-999.0), "elong": xp.nan_to_num(el, nan=-999.0), "nbad": nbad,
            "sign": sign, "distnr": dist, "ref_flux": ref_flux, "sky": sky[img, yi, xi].astype(xp.float64)}
    return cols


def candidate_tables(host: dict, *, batch: int, wcs, headers, visits, ccds, F_r, shape,
                     cutout_size: int = 63) -> list[np.ndarray]:
    """Per-CCD :data:`~nightsift.engine.records.CANDIDATE_DTYPE` tables from the detection columns
    brought to the host (RA/Dec from each science WCS, magnitudes from its zero point).

    Parameters
    ----------
    host : dict
        :data:`DETECTION_COLUMNS` as numpy arrays (one download of :class:`Detections`).
    batch : int
    wcs, headers, visits, ccds, F_r : sequences of B
        Science WCS and header, ids, flux ratio of each CCD.
    shape : (ny, nx)

    Notes
    -----
    ``magpsf`` (and ``magnr``) need the science zero point (MAGZP / MAGZPT / MAGZERO) and a
    positive EXPTIME (:func:`~nightsift.engine.io.fits.header_photometry`): without them they are
    NaN (null in the packets), never a made-up zero point.
    """
    ny, nx = shape
    r = cutout_size // 2
    img = host["image"].astype(np.int64)
    out = []
    for b in range(batch):
        sel = img == b
        n = int(sel.sum())
        if n >= CANDID_INDEX:
            raise ValueError(f"{n} candidates on one CCD: more than a candid can number")
        c = empty_candidates(n)
        if n == 0:
            out.append(c)
            continue
        g = {k: v[sel] for k, v in host.items()}
        x, y = g["x"], g["y"]
        c["candid"] = make_candid(visits[b], ccds[b], np.arange(n))
        c["xpos"], c["ypos"] = x, y
        ra, dec = wcs[b].all_pix2world(x, y, 0)
        c["ra"], c["dec"] = ra, dec
        flux, fluxerr = g["flux"], g["fluxerr"]
        c["flux"], c["fluxerr"] = flux, fluxerr
        phot = header_photometry(headers[b])
        with np.errstate(divide="ignore", invalid="ignore"):
            if phot is None:
                c["magpsf"] = np.nan
            else:
                zp, exptime = phot
                c["magpsf"] = np.where(np.abs(flux) > 0, zp - 2.5 * np.log10(np.abs(flux) / exptime), 99.0)
            c["snr"] = np.abs(flux) / fluxerr
            c["sigmapsf"] = 1.0857362 / c["snr"]
        c["scorr"] = g["scorr"]
        c["isdiffpos"] = g["sign"] > 0
        c["fwhm"], c["elong"] = g["fwhm"], g["elong"]
        c["nbad"] = g["nbad"]
        found = np.isfinite(g["distnr"])
        c["distnr"] = np.where(found, g["distnr"], -999.0)
        fr = g["ref_flux"] / max(F_r[b], 1e-30)
        with np.errstate(divide="ignore", invalid="ignore"):
            if phot is None:
                c["magnr"] = np.where(found, np.nan, -999.0)
            else:
                c["magnr"] = np.where(found & (fr > 0), zp - 2.5 * np.log10(fr / exptime), -999.0)
        c["sky"] = g["sky"]
        xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
        c["edge"] = (xi - r < 0) | (yi - r < 0) | (xi + r >= nx) | (yi + r >= ny)
        out.append(c)
    return out


def detect_subtraction(sub, *, config: DetectConfig, sky=None, ref_catalog=None, wcs=None, header=None,
                       visit: int = 0, ccd: int = 0, distnr_radius: float = 30.0) -> np.ndarray:
    """The candidate table of one CCD's :class:`~nightsift.engine.records.Subtraction` (host or
    device arrays): :func:`detect` with B = 1 and :func:`candidate_tables`, for tools and tests
    that re-run the detection (another threshold, say) on a kept subtraction. Without ``wcs`` the
    RA/Dec are NaN."""
    xp = array_namespace(sub.S_corr)
    one = SubtractionBatch(D=sub.D[None], difference=sub.difference[None], S_corr=sub.S_corr[None],
                           flux=sub.flux[None], flux_err=sub.flux_err[None], mask=sub.mask[None],
                           excluded=sub.excluded[None], P_D=sub.P_D, F_D=sub.F_D, F_S=sub.F_S,
                           apcorr=sub.apcorr if sub.apcorr is not None else xp.ones(len(sub.F_D)), grid=sub.grid,
                           F_r=(sub.F_r,))
    sky = xp.zeros(sub.D.shape, xp.float32) if sky is None else sky
    empty = None
    if ref_catalog is None:
        z = xp.zeros(0)
        empty = SourceCatalog(x=z, y=z, flux=z, fluxerr=z, snr=z, a=z, b=z, peak=z, flag=xp.zeros(0, xp.int32),
                              size=z, point=xp.zeros(0, bool), psf_star=xp.zeros(0, bool))
    det = detect(one, sky=sky[None], ref_cats=[ref_catalog or empty], distnr_radius=[distnr_radius],
                 config=config).value
    host = {k: to_host(v) for k, v in det.columns.items()}
    w = wcs if wcs is not None else _NoWCS()
    return candidate_tables(host, batch=1, wcs=[w], headers=[header], visits=[visit], ccds=[ccd], F_r=[sub.F_r],
                            shape=tuple(sub.D.shape))[0]


class _NoWCS:
    def all_pix2world(self, x, y, origin):
        return np.full(np.shape(x), np.nan), np.full(np.shape(y), np.nan)
