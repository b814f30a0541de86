"""Detection stage: peaks above threshold in S_corr, and the features of each candidate.

Positive and negative candidates are found with sep on ``+S_corr`` and ``-S_corr`` (S_corr already
is matched-filtered with unit variance, so the threshold is in sigma and no extra filter is used),
refined to sub-pixel positions with a 3x3 quadratic fit, and deduplicated per sign. Fluxes are PSF
fits of D with the tile's P_D shifted to the sub-pixel position (identical to ``S / F_S`` evaluated
between pixels); errors come from the variance of S (background, source and astrometric noise).
"""
from __future__ import annotations

import numpy as np
import sep
from scipy import ndimage
from scipy.spatial import cKDTree

from nightsift.kernels import psf as kpsf
from nightsift.kernels.stamps import extract_stamps

from ..config import DetectConfig
from ..records import UNUSABLE, ZERO_POINT_KEYS, StageResult, empty_candidates, make_candid
from .subtract import Subtraction

def zero_point(header) -> float:
    """Photometric zero point (mag for 1 e-/s) from MAGZP / MAGZPT / MAGZERO, else 25.0."""
    for key in ZERO_POINT_KEYS:
        if header is not None and key in header:
            return float(header[key])
    return 25.0


def find_peaks(S_corr: np.ndarray, *, threshold: float, min_area: int, excluded=None):
    """Signed peaks of S_corr above ``threshold``: arrays ``(x, y, value, sign)``.

    ``x, y`` are sub-pixel (3x3 quadratic fit around the peak pixel); one peak per sep object.
    """
    ny, nx = S_corr.shape
    xs, ys, vs, sg = [], [], [], []
    m = None if excluded is None else np.ascontiguousarray(excluded, dtype=bool)
    sep.set_extract_pixstack(max(300000, S_corr.size // 4))
    for sign in (1, -1):
        img = np.ascontiguousarray(sign * S_corr, dtype=np.float32)
        objs = sep.extract(img, threshold, err=None, mask=m, minarea=min_area, filter_kernel=None,
                           deblend_cont=0.005, clean=False)
        if len(objs) == 0:
            continue
        xi = objs["xpeak"].astype(int)
        yi = objs["ypeak"].astype(int)
        val = img[yi, xi]
        dx, dy = _quadratic_offset(img, xi, yi)
        # a peak on the last row/column may interpolate past it: keep positions on the grid
        xs.append(np.clip(xi + dx, 0, nx - 1))
        ys.append(np.clip(yi + dy, 0, ny - 1))
        vs.append(sign * val)
        sg.append(np.full(len(objs), sign))
    if not xs:
        z = np.zeros(0)
        return z, z, z, z.astype(int)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(vs), np.concatenate(sg)


def _quadratic_offset(img, xi, yi, sign=1.0):
    """Sub-pixel offset of the maximum of ``sign * img`` around integer peaks (3-point parabolas
    along x and y; neighbours past the edge repeat the edge pixel)."""
    ny, nx = img.shape
    xl, xr = np.clip(xi - 1, 0, nx - 1), np.clip(xi + 1, 0, nx - 1)
    yl, yr = np.clip(yi - 1, 0, ny - 1), np.clip(yi + 1, 0, ny - 1)
    c = sign * img[yi, xi]
    left, right, down, up = sign * img[yi, xl], sign * img[yi, xr], sign * img[yl, xi], sign * img[yr, xi]
    ax = left - 2 * c + right
    ay = down - 2 * c + up
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(ax < 0, 0.5 * (left - right) / ax, 0.0)
        dy = np.where(ay < 0, 0.5 * (down - up) / ay, 0.0)
    return np.clip(np.nan_to_num(dx), -0.5, 0.5), np.clip(np.nan_to_num(dy), -0.5, 0.5)


def climb_to_flux_peak(flux: np.ndarray, x, y, sign, *, max_steps, blocked=None):
    """Move peaks of S_corr to the peak of the PSF-flux image (``S / F_S``) they sit on.

    S_corr divides S by a noise that includes the source's own photon noise, so a bright
    transient has a flat or ring-shaped top in S_corr: sep then finds several peaks 1-2 FWHM
    from its centre (seen: four 5-sigma candidates on a square around one ZTF transient, three of
    them labelled bogus). S itself, the matched filter, has one peak per point source. Each peak
    climbs ``sign * flux`` by steepest ascent over its 3x3 neighbourhood, at most ``max_steps``
    pixels, never onto a ``blocked`` pixel, then gets a sub-pixel position from a quadratic fit
    of ``sign * flux``. On blank sky, where S_corr is S over a locally constant noise, nothing
    moves.

    Parameters
    ----------
    flux : ndarray (ny, nx)
        PSF flux of a point source centred on each pixel (``Subtraction.flux``).
    x, y : ndarray (n,)
        Peak positions (pixels; rounded to the nearest pixel to start).
    sign : ndarray (n,) of +-1
    max_steps : int or ndarray (n,)
        Most pixels each peak may move (e.g. the FWHM of P_D).
    blocked : ndarray (ny, nx) bool, optional
        Pixels a peak may not move onto (S_corr's excluded pixels).

    Returns
    -------
    x, y : ndarray (n,) float, the refined sub-pixel positions.
    """
    ny, nx = flux.shape
    xi = np.clip(np.rint(x).astype(int), 0, nx - 1)
    yi = np.clip(np.rint(y).astype(int), 0, ny - 1)
    if len(xi) == 0:
        return np.zeros(0), np.zeros(0)
    sg = np.asarray(sign, np.float64)
    img = np.asarray(flux)
    blk = None if blocked is None else np.asarray(blocked, bool)
    steps = np.broadcast_to(np.asarray(max_steps), xi.shape)
    oy, ox = np.divmod(np.arange(9), 3)
    oy, ox = oy - 1, ox - 1
    for k in range(int(steps.max())):  # only the 3x3 neighbourhoods are read: no full-image copy
        yy, xx = yi[:, None] + oy[None], xi[:, None] + ox[None]
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
        v = sg[:, None] * img[yy, xx].astype(np.float64)
        ok &= np.isfinite(v)
        if blk is not None:
            ok &= ~blk[yy, xx]
        v = np.where(ok, v, -np.inf)
        best = np.argmax(v, axis=1)
        move = (v[np.arange(len(xi)), best] > v[:, 4]) & (k < steps)
        if not move.any():
            break
        xi = np.where(move, xi + ox[best], xi)
        yi = np.where(move, yi + oy[best], yi)
    dx, dy = _quadratic_offset(img, xi, yi, sg)
    return np.clip(xi + dx, 0, nx - 1), np.clip(yi + dy, 0, ny - 1)


def merge_around_holes(x, y, value, sign, excluded, *, max_area: int, reach: int = 2):
    """Peaks of one sign that hug the same small excluded patch are one source.

    A hot pixel or a cosmic ray on a transient is masked and grown, and S_corr is zeroed there:
    the transient's signal survives only as a ring around the hole, which sep finds as 2-4 peaks
    (seen: a variable star at S/N 50 under a hot pixel came out as four candidates 2.5 px from
    it, none matching it). Peaks within ``reach`` pixels of one excluded patch of at most
    ``max_area`` pixels are merged: the strongest is kept, moved to the mean position of the
    group (the ring's centre). Larger patches (bleed trails, CCD edges) are left alone: many
    sources may border them.

    Parameters
    ----------
    x, y, value, sign : ndarray (n,)
        Peaks (sub-pixel positions, S_corr value, +-1).
    excluded : ndarray (ny, nx) bool
        Pixels where S_corr was zeroed.
    max_area : int
        Largest patch (pixels) treated as a hole in one source.
    reach : int
        How far (pixels) from the patch a peak may be.

    Returns
    -------
    keep : ndarray (m,) int, indices of the peaks kept
    x, y : ndarray (n,) positions, moved for the kept peak of each merged group
    """
    x, y = np.array(x, dtype=np.float64), np.array(y, dtype=np.float64)
    sign, value = np.asarray(sign), np.asarray(value)
    if len(x) == 0 or excluded is None or not np.any(excluded):
        return np.arange(len(x)), x, y
    lab, _ = ndimage.label(excluded)
    area = np.bincount(lab.ravel())
    area[0] = max_area + 1
    near = ndimage.maximum_filter(lab, size=2 * reach + 1)
    ny, nx = excluded.shape
    comp = near[np.clip(np.rint(y).astype(int), 0, ny - 1), np.clip(np.rint(x).astype(int), 0, nx - 1)]
    small = area[comp] <= max_area
    keep = np.ones(len(x), bool)
    for patch, sg in set(zip(comp[small].tolist(), sign[small].tolist())):
        members = np.flatnonzero(small & (comp == patch) & (sign == sg))
        if members.size < 2:
            continue
        best = members[np.argmax(np.abs(value[members]))]
        x[best], y[best] = x[members].mean(), y[members].mean()
        keep[members] = False
        keep[best] = True
    return np.flatnonzero(keep), x, y


def deduplicate(x, y, value, sign, *, radius: float) -> np.ndarray:
    """Indices kept after suppressing, within each sign, peaks closer than ``radius`` to a
    stronger one. Deterministic: ties broken by position."""
    if len(x) == 0:
        return np.zeros(0, int)
    order = np.lexsort((x, y, -np.abs(value)))  # strongest first; ties by (y, x)
    rank = np.empty(len(x), int)
    rank[order] = np.arange(len(x))
    keep = np.ones(len(x), bool)
    tree = cKDTree(np.c_[x, y])
    for i in order:
        if not keep[i]:
            continue
        for j in tree.query_ball_point([x[i], y[i]], r=radius):
            if rank[j] > rank[i] and sign[j] == sign[i]:
                keep[j] = False
    idx = np.flatnonzero(keep)
    return idx[np.lexsort((x[idx], y[idx]))]


def detect(sub: Subtraction, *, wcs, header, sky, ref_catalog=None, visit: int = 0, ccd: int = 0,
           config: DetectConfig, cutout_size: int = 63) -> StageResult:
    """Candidates (positive and negative) above ``config.threshold`` in S_corr, with features.

    Parameters
    ----------
    sub : Subtraction
        Output of the subtraction stage.
    wcs : astropy.wcs.WCS
        Science WCS (for ra, dec).
    header : astropy.io.fits.Header
        Science header (EXPTIME, zero point MAGZP/MAGZPT/MAGZERO).
    sky : ndarray (ny, nx)
        Science background map (e-), for the ``sky`` feature.
    ref_catalog : source table of the aligned reference (x, y, flux), optional
        For ``distnr`` (pixels) and ``magnr`` (science-equivalent magnitude).
    visit, ccd : int
        Used in the deterministic ``candid``.

    Returns
    -------
    StageResult(candidates, qa): a :data:`~nightsift.engine.records.CANDIDATE_DTYPE` table sorted by
    (ypos, xpos); qa ``n_candidates``, ``n_positive``, ``n_negative``.
    """
    x, y, val, sign = find_peaks(sub.S_corr, threshold=config.threshold, min_area=config.min_area,
                                 excluded=sub.excluded)
    fwhm_pd = np.array([kpsf.half_max_fwhm(sub.P_D[t]) for t in range(len(sub.P_D))])
    if config.climb_to_flux_peak and len(x):
        steps = np.ceil(fwhm_pd[sub.grid.tile_of(x, y)]).astype(int)
        x, y = climb_to_flux_peak(sub.flux, x, y, sign, max_steps=steps, blocked=sub.excluded)
    if config.hole_merge_area > 0:
        keep, x, y = merge_around_holes(x, y, val, sign, sub.excluded, max_area=config.hole_merge_area)
        x, y, val, sign = x[keep], y[keep], val[keep], sign[keep]
    keep = deduplicate(x, y, val, sign, radius=config.dedup_radius)
    x, y, val, sign = x[keep], y[keep], val[keep], sign[keep]
    n = len(x)
    qa = {"n_peaks": int(len(keep)), "n_candidates": n, "n_positive": int((sign > 0).sum()),
          "n_negative": int((sign < 0).sum())}
    if n == 0:
        return StageResult(empty_candidates(), qa)

    ny, nx = sub.D.shape
    tile = sub.grid.tile_of(x, y)
    s = sub.P_D.shape[-1]
    xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
    dx, dy = x - xi, y - yi
    d_st, _ = extract_stamps(sub.D, x, y, size=s, fill=0.0)
    d_st = np.asarray(d_st, dtype=np.float64)
    p = kpsf.fourier_shift(sub.P_D[tile], dx, dy)
    F_D = sub.F_D[tile]
    apcorr = np.ones(len(sub.F_D)) if sub.apcorr is None else np.asarray(sub.apcorr)
    flux = apcorr[tile] * (d_st * p).sum(axis=(1, 2)) / (F_D * (p * p).sum(axis=(1, 2)))
    fluxerr = sub.flux_err[yi, xi].astype(np.float64)  # aperture-corrected too

    c = empty_candidates(n)
    c["candid"] = make_candid(visit, ccd, np.arange(n))
    c["xpos"], c["ypos"] = x, y
    ra, dec = wcs.all_pix2world(x, y, 0)
    c["ra"], c["dec"] = ra, dec
    c["flux"], c["fluxerr"] = flux, fluxerr
    exptime = float(header.get("EXPTIME", 1.0)) if header is not None else 1.0
    zp = zero_point(header)
    with np.errstate(divide="ignore", invalid="ignore"):
        c["magpsf"] = np.where(np.abs(flux) > 0, zp - 2.5 * np.log10(np.abs(flux) / exptime), 99.0)
        c["snr"] = np.abs(flux) / fluxerr
        c["sigmapsf"] = 1.0857362 / c["snr"]
    c["scorr"] = val
    c["isdiffpos"] = sign > 0

    # shape of the candidate in D (adaptive moments of sign * D)
    sig0 = fwhm_pd[tile] / 2.3548
    _, _, mxx, myy, mxy = kpsf.moments(d_st * sign[:, None, None], sigma=float(np.median(sig0)))
    fw, el = kpsf.shape_from_moments(mxx, myy, mxy)
    c["fwhm"] = np.nan_to_num(fw, nan=-999.0)
    c["elong"] = np.nan_to_num(el, nan=-999.0)

    # unusable pixels in the (2 h + 1)^2 box
    h = config.nbad_halfwidth
    bad = ((sub.mask & UNUSABLE) != 0).astype(np.int32)
    integ = np.pad(np.cumsum(np.cumsum(bad, 0), 1), ((1, 0), (1, 0)))
    y0, y1 = np.clip(yi - h, 0, ny), np.clip(yi + h + 1, 0, ny)
    x0, x1 = np.clip(xi - h, 0, nx), np.clip(xi + h + 1, 0, nx)
    c["nbad"] = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]

    c["distnr"], c["magnr"] = -999.0, -999.0
    if ref_catalog is not None and len(ref_catalog):
        d, j = cKDTree(np.c_[ref_catalog["x"], ref_catalog["y"]]).query(np.c_[x, y])
        c["distnr"] = d
        fr = ref_catalog["flux"][j] / max(sub.F_r, 1e-30)
        with np.errstate(divide="ignore", invalid="ignore"):
            c["magnr"] = np.where(fr > 0, zp - 2.5 * np.log10(fr / exptime), -999.0)
    c["sky"] = np.asarray(sky)[yi, xi]
    r = cutout_size // 2
    c["edge"] = (xi - r < 0) | (yi - r < 0) | (xi + r >= nx) | (yi + r >= ny)
    return StageResult(c, qa)
