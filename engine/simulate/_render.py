"""Numba kernels of the simulator: pixel-integrated Moffat and Sersic stamps, stamp accumulation,
charge bleeding.

All coordinates are 0-based pixel coordinates with ``x`` the column and ``y`` the row; a pixel
``[j, i]`` covers ``[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]``. Pixel integration is a midpoint rule on
an ``n x n`` sub-grid whose ``n`` is chosen per pixel from its distance to the centre (fine in the
core, coarse in the smooth wings), which keeps the integral accurate to ~1e-3 of the pixel value
while costing ~10^4 evaluations per star.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, inline="always")
def _mpow(q, beta, twobeta):
    """``(1 + q)**-beta``; multiplications and one sqrt when ``2 beta`` is a small integer."""
    if twobeta > 0:
        w = 1.0 / (1.0 + q)
        v = 1.0
        for _ in range(twobeta // 2):
            v *= w
        if twobeta % 2 == 1:
            v *= math.sqrt(w)
        return v
    return math.exp(-beta * math.log1p(q))


@njit(cache=True, nogil=True)
def _moffat_fill(out, cx, cy, c11, c12, c22, beta, n_core, q_core, q_mid):
    """Fill ``out`` (S, S) with the pixel-integrated elliptical Moffat ``(1 + Q)**-beta``,
    ``Q = c11 dx^2 + 2 c12 dx dy + c22 dy^2``, centred at stamp coordinates ``(cx, cy)``.

    Pixels whose centre has ``Q < q_core`` are integrated on ``n_core^2`` sub-samples, those with
    ``Q < q_mid`` on 3x3, the rest at their centre. Returns the sum (unnormalised)."""
    ny, nx = out.shape
    total = 0.0
    tb = 2.0 * beta
    twobeta = int(tb) if (tb == math.floor(tb) and tb <= 16) else 0
    for j in range(ny):
        dy0 = j - cy
        for i in range(nx):
            dx0 = i - cx
            q0 = c11 * dx0 * dx0 + 2.0 * c12 * dx0 * dy0 + c22 * dy0 * dy0
            if q0 < q_core:
                n = n_core
            elif q0 < q_mid:
                n = 3
            else:
                n = 1
            if n == 1:
                v = _mpow(q0, beta, twobeta)
            else:
                v = 0.0
                step = 1.0 / n
                for b in range(n):
                    dy = dy0 - 0.5 + (b + 0.5) * step
                    for a in range(n):
                        dx = dx0 - 0.5 + (a + 0.5) * step
                        q = c11 * dx * dx + 2.0 * c12 * dx * dy + c22 * dy * dy
                        v += _mpow(q, beta, twobeta)
                v *= step * step
            out[j, i] = v
            total += v
    return total


@njit(cache=True, nogil=True, parallel=True)
def _point_stamps(buf, offs, xs, ys, c11, c12, c22, beta, n_core, q_core, q_mid, half, scale):
    for k in prange(xs.shape[0]):
        h = half[k]
        s = 2 * h + 1
        st = buf[offs[k]: offs[k] + s * s].reshape((s, s))
        ix = math.floor(xs[k] + 0.5)
        iy = math.floor(ys[k] + 0.5)
        tot = _moffat_fill(st, h + xs[k] - ix, h + ys[k] - iy, c11[k], c12[k], c22[k], beta,
                           n_core[k], q_core, q_mid)
        scale[k] /= tot


@njit(cache=True, nogil=True)
def _add_point_stamps(image, buf, offs, xs, ys, half, scale):
    ny, nx = image.shape
    for k in range(xs.shape[0]):
        h = half[k]
        s = 2 * h + 1
        ix = int(math.floor(xs[k] + 0.5))
        iy = int(math.floor(ys[k] + 0.5))
        o = offs[k]
        for j in range(s):
            yy = iy - h + j
            if yy < 0 or yy >= ny:
                continue
            for i in range(s):
                xx = ix - h + i
                if xx < 0 or xx >= nx:
                    continue
                image[yy, xx] += buf[o + j * s + i] * scale[k]


def render_moffat_points(image, xs, ys, fluxes, c11, c12, c22, beta, n_core, q_core, q_mid, half):
    """Add point sources to ``image`` (ny, nx) float64 in place.

    Source ``k`` is a pixel-integrated elliptical Moffat at ``(xs[k], ys[k])`` on a
    ``(2 half[k] + 1)^2`` stamp centred on the nearest pixel, normalised so that the *stamp* sums to
    ``fluxes[k]`` (parts of the stamp outside the image are dropped). Stamps are computed in
    parallel and added in order, so the result does not depend on the thread count."""
    ny, nx = image.shape
    ix = np.floor(xs + 0.5)
    iy = np.floor(ys + 0.5)
    vis = np.flatnonzero((ix + half >= 0) & (iy + half >= 0) & (ix - half < nx) & (iy - half < ny))
    if vis.size == 0:
        return
    xs, ys, fl = xs[vis], ys[vis], np.array(fluxes[vis], dtype=np.float64)
    c11, c12, c22, n_core, half = c11[vis], c12[vis], c22[vis], n_core[vis], half[vis]
    sizes = (2 * half + 1) ** 2
    offs = np.zeros(vis.size, np.int64)
    np.cumsum(sizes[:-1], out=offs[1:])
    for lo in range(0, vis.size, 4096):  # bounded scratch memory
        sl = slice(lo, lo + 4096)
        o = offs[sl] - offs[lo]
        buf = np.empty(int(o[-1] + sizes[sl][-1]))
        sc = fl[sl].copy()
        _point_stamps(buf, o, xs[sl], ys[sl], c11[sl], c12[sl], c22[sl], beta, n_core[sl], q_core,
                      q_mid, half[sl], sc)
        _add_point_stamps(image, buf, o, xs[sl], ys[sl], half[sl], sc)


@njit(cache=True, nogil=True, parallel=True)
def moffat_stamps(out, cxs, cys, c11, c12, c22, beta, n_core, q_core, q_mid):
    """Fill ``out`` (N, S, S) with unit-sum pixel-integrated Moffat stamps centred at
    ``(cxs[k], cys[k])`` (stamp coordinates)."""
    for k in prange(out.shape[0]):
        tot = _moffat_fill(out[k], cxs[k], cys[k], c11[k], c12[k], c22[k], beta, n_core[k], q_core,
                           q_mid)
        out[k] /= tot


@njit(cache=True, nogil=True, parallel=True)
def sersic_stamps(out, cxs, cys, g11, g12, g22, n, bn, r_trunc, pad, n_sub):
    """Fill ``out`` (N, S, S) with unit-sum pixel-integrated Sersic stamps.

    ``Q = g11 dx^2 + 2 g12 dx dy + g22 dy^2`` is ``(r / r_eff)^2`` on the elliptical radius; the
    profile ``exp(-bn (Q^(1/(2n)) - 1))`` is truncated at ``sqrt(Q) >= r_trunc``. Pixels whose
    centre lies beyond ``r_trunc + pad[k]`` (``pad`` >= half a pixel diagonal in r_eff units) are
    skipped. Pixels within 2 px of the centre use a 9x9 sub-grid (cuspy n=4 cores), the others
    ``n_sub x n_sub``."""
    N, S, _ = out.shape
    q_trunc = r_trunc * r_trunc
    for k in prange(N):
        inv2n = 0.5 / n[k]
        qskip = (r_trunc + pad[k]) ** 2
        tot = 0.0
        for j in range(S):
            dy0 = j - cys[k]
            for i in range(S):
                dx0 = i - cxs[k]
                q0 = g11[k] * dx0 * dx0 + 2.0 * g12[k] * dx0 * dy0 + g22[k] * dy0 * dy0
                if q0 > qskip:
                    out[k, j, i] = 0.0
                    continue
                m = 9 if (dx0 * dx0 + dy0 * dy0) < 4.0 else n_sub
                step = 1.0 / m
                v = 0.0
                for b in range(m):
                    dy = dy0 - 0.5 + (b + 0.5) * step
                    for a in range(m):
                        dx = dx0 - 0.5 + (a + 0.5) * step
                        q = g11[k] * dx * dx + 2.0 * g12[k] * dx * dy + g22[k] * dy * dy
                        if q < q_trunc:
                            v += math.exp(-bn[k] * (q ** inv2n - 1.0))
                v *= step * step
                out[k, j, i] = v
                tot += v
        if tot > 0:
            for j in range(S):
                for i in range(S):
                    out[k, j, i] /= tot


@njit(cache=True, nogil=True)
def add_stamps(image, stamps, x0s, y0s, scales):
    """``image[y0:y0+S, x0:x0+S] += scales[k] * stamps[k]`` for every ``k``, clipped to the image."""
    ny, nx = image.shape
    N, S, _ = stamps.shape
    for k in range(N):
        for j in range(S):
            yy = y0s[k] + j
            if yy < 0 or yy >= ny:
                continue
            for i in range(S):
                xx = x0s[k] + i
                if xx < 0 or xx >= nx:
                    continue
                image[yy, xx] += stamps[k, j, i] * scales[k]


@njit(cache=True, nogil=True)
def bleed_columns(img, full_well):
    """Spill charge above ``full_well`` along columns, in place (``img`` (ny, nx) in e-).

    Each run of over-full pixels in a column is set to ``full_well`` and its excess charge is
    shared equally up and down the column, filling neighbours to ``full_well`` in turn (a bleed
    trail). Charge that reaches the CCD edge is lost. Returns the number of pixels changed."""
    ny, nx = img.shape
    changed = 0
    hit = np.zeros(nx, np.bool_)
    for y in range(ny):  # row-major scan for the (few) columns that need work
        for x in range(nx):
            if img[y, x] > full_well:
                hit[x] = True
    for x in range(nx):
        if not hit[x]:
            continue
        y = 0
        while y < ny:
            if img[y, x] <= full_well:
                y += 1
                continue
            start = y
            excess = 0.0
            while y < ny and img[y, x] >= full_well:
                excess += img[y, x] - full_well
                img[y, x] = full_well
                changed += 1
                y += 1
            end = y
            down = 0.5 * excess
            up = excess - down
            k = start - 1
            while down > 0 and k >= 0:
                room = full_well - img[k, x]
                if room > 0:
                    take = room if room < down else down
                    img[k, x] += take
                    down -= take
                    changed += 1
                k -= 1
            k = end
            while up > 0 and k < ny:
                room = full_well - img[k, x]
                if room > 0:
                    take = room if room < up else up
                    img[k, x] += take
                    up -= take
                    changed += 1
                k += 1
    return changed
