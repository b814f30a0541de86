"""One simulated CCD pair: a raw science frame (with its calibration frames) and a calibrated
archival reference of the same sky, with the truth of everything injected.

Randomness is split by :class:`numpy.random.SeedSequence` so that the pieces are independent and
reproducible:

* static per CCD, from ``(seed, ccd)``: reference WCS, detector (bias, flat, hot pixels, bad
  columns), stars, galaxies, reference PSF/sky/noise (a :class:`~.static.StaticScene`, shared by
  the visits of a CCD), calibration frames;
* per visit, from ``(seed, ccd, visit)``: science geometry (offset/rotation/scale vs the reference),
  seeing and PSF pattern, sky, transparency, transients, cosmic rays, noise.

Changing ``visit`` therefore re-observes the same sky against the same reference; changing ``ccd``
or ``seed`` changes the sky.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import ConfigError
from ..records import CalibrationFrames, Exposure, MaskBits, RawFrame
from .detector import COSMIC_RAY_DTYPE, DetectorModel, make_cosmic_rays
from .instruments import InstrumentProfile, get_profile
from .options import SimulationOptions, as_options
from .psf import PSFField, draw_psf_field
from .scene import (
    GALAXY_DTYPE, STAR_DTYPE, Geometry, SkyModel, StaticSky, draw_geometry, render_galaxies,
    science_wcs_header, shape_params, transform_shape,
)
from .static import StaticScene, simulate_static
from .units import flux_to_mag, limiting_mag, mag_to_flux, mjd_to_isot

__all__ = ["TRANSIENT_DTYPE", "TRANSIENT_KINDS", "SimulatedCCD", "simulate_ccd_pair"]


#: truth table of the injected transients (one row per transient; see SimulatedCCD)
TRANSIENT_DTYPE = np.dtype([
    ("id", "i8"),  # index within this CCD and visit
    ("kind", "U8"),  # 'isolated' | 'nuclear' | 'variable'
    ("ra", "f8"), ("dec", "f8"),  # deg, ICRS
    ("x", "f8"), ("y", "f8"),  # 0-based science pixel position
    ("x_ref", "f8"), ("y_ref", "f8"),  # 0-based reference pixel position
    ("flux", "f8"),  # e- in the calibrated science image minus the reference-equivalent flux
                     # (science zero point); < 0 for a fading variable star
    ("mag", "f8"),  # MAGZP_sci - 2.5 log10(|flux| / EXPTIME)
    ("snr", "f8"),  # approximate ideal PSF-fit S/N in the science image alone
    ("host", "i8"),  # galaxy id for 'nuclear', else -1
    ("star", "i8"),  # star id for 'variable', else -1
    ("fwhm", "f8"),  # true science PSF FWHM at (x, y), pixels
    ("masked", "?"),  # a saturated, hot, bad-column or cosmic-ray pixel lies in its 5x5 box
])

#: transient kinds and their default shares
TRANSIENT_KINDS = ("isolated", "nuclear", "variable")


@dataclass(frozen=True)
class SimulatedCCD:
    """A simulated science/reference pair of one CCD with its truth.

    Attributes
    ----------
    science_raw : RawFrame
        ``data`` ndarray (ny, nx) float32 in ADU: integers, bias included, dark current, flat
        response, Poisson + read noise, saturation (clipped at ``SATURATE``, charge bled along
        columns), hot pixels, bad columns, cosmic rays. ``header``: TAN WCS with a CD matrix, GAIN
        (e-/ADU), RDNOISE (e-), SATURATE (ADU), EXPTIME (s), FILTER, MJD-OBS, DATE-OBS, CCDNUM,
        VISIT, INSTRUME, MAGZP (mag giving 1 e-/s), SEEING (true FWHM at the CCD centre, arcsec),
        FWHM (the same, pixels), FWHMPIX (FWHM of the PSF convolved with the pixel, what a fit to
        pixel values measures), SKYLEVEL (e- per pixel at the centre), MAGLIM (ideal 5-sigma
        point-source limit), BIASLEV (ADU), DARKCUR (e-/s), PIXSCALE (arcsec/px), SIMSEED.
    calibration : CalibrationFrames
        Raw bias/dark/flat stacks ``(n_calib, ny, nx)`` float32 ADU of this CCD (darks of
        ``EXPTIME`` s with hot pixels, flats showing the bad columns, no cosmic rays). Generated on
        first access and cached (they cost ~3 frames of read-out each).
    reference : Exposure
        The archival reference: mean of ``ref_ncombine`` calibrated exposures in e- (sky *not*
        subtracted, dark subtracted, flat-fielded), float32; ``variance`` float32 e^2 from the
        noiseless model ``(model + dark t + RN^2) / ncombine``; ``mask`` uint16 with ``MaskBits.SAT``
        on saturated pixels and their bleed trails; its own WCS (see ``geometry``), PSF
        (``psf_ref``) and sky (``sky_ref``). Header: WCS, EXPTIME (of each combined exposure),
        MAGZP, SEEING, FWHM, FWHMPIX, GAIN=1, SATURATE (e-), NCOMBINE, FILTER, MJD-OBS, CCDNUM, INSTRUME.
    transients : structured ndarray, TRANSIENT_DTYPE
        The injected transients of this visit (empty when ``transients=False``).
    stars : structured ndarray, STAR_DTYPE
        Every star drawn for this CCD, including ones just off the CCD whose light may fall on it
        (use ``in_sci`` / ``in_ref``).
    galaxies : structured ndarray, GALAXY_DTYPE
    artifacts : dict
        ``cosmic_rays`` (COSMIC_RAY_DTYPE pixel list: id, y, x, electrons),
        ``hot_pixels`` (y, x, dark e-/s), ``bad_columns`` (x, y0, y1, response),
        ``saturated`` bool (ny, nx): science pixels at SATURATE (cores, bleed trails, hot pixels).
    psf_sci, psf_ref : PSFField
        True PSFs; ``psf_sci.fwhm(x, y)`` is the continuous-Moffat FWHM in pixels at any position,
        ``psf_sci.stamp(x, y)`` the pixelised PSF exactly as sources were drawn.
    detector : DetectorModel
        True bias, flat, dark map, gain, read noise, full well of the CCD.
    sky_sci, sky_ref : SkyModel
        True sky (e- per pixel, calibrated units).
    geometry : Geometry
        Science-to-reference pixel map (offset, rotation, scale).
    profile : InstrumentProfile
    meta : dict
        seed, visit, ccd, seeing_sci / seeing_ref (arcsec, centre), zp_sci / zp_ref, maglim_sci /
        maglim_ref (ideal 5-sigma), mag_sat (typical saturation magnitude), mjd_sci, mjd_ref,
        filter, n_calib.

    Notes
    -----
    Every source (star, galaxy, transient) is drawn on a finite stamp whose sum is normalised to its
    truth flux: the truth flux is the flux inside the stamp (radius >= 6 FWHM for point sources,
    enough to hold all but 1e-3 of the Moffat; 4 r_eff + 4 FWHM for galaxies). Sources near the
    edge lose the part of the stamp that falls off the CCD.
    """

    science_raw: RawFrame
    reference: Exposure
    transients: np.ndarray
    stars: np.ndarray
    galaxies: np.ndarray
    artifacts: dict
    psf_sci: PSFField
    psf_ref: PSFField
    detector: DetectorModel
    sky_sci: SkyModel
    sky_ref: SkyModel
    geometry: Geometry
    profile: InstrumentProfile
    meta: dict = field(default_factory=dict)

    @functools.cached_property
    def calibration(self) -> CalibrationFrames:
        m = self.meta
        n = int(m["n_calib"])
        rng = np.random.default_rng(np.random.SeedSequence([int(m["seed"]), int(m["ccd"]), 3]))
        t = float(self.profile.exptime)
        return CalibrationFrames(
            bias=self.detector.bias_frames(n, rng),
            dark=self.detector.dark_frames(n, t, rng),
            flat=self.detector.flat_frames(n, 0.4 * self.detector.full_well, rng),
            dark_exptime=t,
        )

    @property
    def psf_fwhm_sci(self):
        """Callable ``(x, y) -> FWHM`` (pixels) of the true science PSF."""
        return self.psf_sci.fwhm

    @property
    def psf_fwhm_ref(self):
        """Callable ``(x, y) -> FWHM`` (pixels) of the true reference PSF."""
        return self.psf_ref.fwhm

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.science_raw.data.shape)  # type: ignore[return-value]

    def science_exposure(self) -> Exposure:
        """The science frame calibrated with the *true* detector model (a perfect calibrate
        stage), for tests that start after calibration.

        ``image = ((raw - bias) * gain - dark * t) / flat`` (e-, float32), ``variance =
        (max((raw - bias) * gain, 0) + RN^2) / flat^2`` (e^2), ``mask``: BAD on hot pixels and bad
        columns, SAT on saturated pixels, CR on cosmic-ray pixels."""
        d = self.detector
        t = float(self.science_raw.header["EXPTIME"])
        e = (self.science_raw.data - d.bias_image()) * np.float32(d.gain)
        flat = d.flat
        img = (e - d.dark_map() * np.float32(t)) / flat
        var = (np.maximum(e, 0) + np.float32(d.read_noise ** 2)) / (flat * flat)
        mask = np.zeros(self.shape, np.uint16)
        mask[d.bad_pixel_mask()] |= np.uint16(MaskBits.BAD)
        mask[self.artifacts["saturated"]] |= np.uint16(MaskBits.SAT)
        cr = self.artifacts["cosmic_rays"]
        if cr.size:
            mask[cr["y"], cr["x"]] |= np.uint16(MaskBits.CR)
        hdr = self.science_raw.header.copy()
        hdr["BUNIT"] = "electron"
        hdr["GAIN"] = 1.0
        hdr["SATURATE"] = float(d.full_well)
        return Exposure(image=img.astype(np.float32), variance=var.astype(np.float32), mask=mask,
                        wcs=WCS(hdr), header=hdr)


# ----------------------------------------------------------------------------------------------
# one visit
# ----------------------------------------------------------------------------------------------
def simulate_ccd_pair(profile: str | InstrumentProfile = "decam", options: SimulationOptions | None = None, *,
                      static: StaticScene | None = None, **overrides) -> SimulatedCCD:
    """Simulate one CCD: a raw science frame, its calibration frames and a calibrated reference.

    The usual call names the options as keywords, ``simulate_ccd_pair("decam", shape=(512, 512),
    seed=1, n_transients=20)``; code that passes a set of options around builds a
    :class:`SimulationOptions` once and hands it over (keywords given as well override its fields).

    Parameters
    ----------
    profile : str or InstrumentProfile
        ``"decam"``, ``"ztf"``, ``"lsst"`` (see :data:`PROFILES`) or a custom profile.
    options : SimulationOptions, optional
        What to simulate (default ``SimulationOptions()``); each field is documented there.
    static : StaticScene, optional
        The static part of this CCD from :func:`simulate_static` with the same profile and options
        (the visit and the per-visit options may differ): many visits of one CCD share it instead
        of rebuilding it. Default: built here.
    **overrides
        Fields of :class:`SimulationOptions` (``shape=``, ``seed=``, ``visit=``, ``ccd=``,
        ``n_transients=``, ...) applied to ``options``; an unknown name raises ``TypeError``.

    Returns
    -------
    SimulatedCCD

    Raises
    ------
    ConfigError
        Invalid options, an unknown profile, or a ``static`` built for another CCD or options.
    """
    p = get_profile(profile)
    o = as_options(options, overrides).resolved(p)
    st = static if static is not None else simulate_static(p, o)
    if not st.matches(p, o):
        raise ConfigError(f"simulate: the static scene passed (static=) is of another CCD or other options "
                          f"(key {st.key[1:]}) than CCD {o.ccd} of seed {o.seed}; build it with "
                          "simulate_static(profile, options) from the same profile and options")
    r_geom, r_psf, r_sky, r_tr, r_cr, r_noise, r_zp, r_star, r_var = (
        np.random.default_rng(s)
        for s in np.random.SeedSequence([int(o.seed), int(o.ccd), int(o.visit), 2]).spawn(9))
    ep = _draw_epoch(p, o, st, r_geom, r_psf, r_sky, r_zp)
    pl = _place_sky(st.sky, ep, p.exptime)

    tr = np.zeros(0, TRANSIENT_DTYPE)
    star_flux_sci = pl.star_flux.copy()
    if o.transients and o.n_transients > 0:
        tr = _draw_transients(r_tr, p, o, st, ep, pl, r_var)
        var = tr["star"][tr["kind"] == "variable"]
        star_flux_sci[var] += tr["flux"][tr["kind"] == "variable"]

    raw, saturated, crs = _observe(p, o, st, ep, pl, star_flux_sci, tr, r_cr, r_noise, _star_changes(o, pl, r_star))
    _flag_masked(tr, st.detector, saturated, crs)
    stars = _star_truth(st, pl, star_flux_sci, saturated, tr, o.shape)
    galaxies = _galaxy_truth(st, pl, o.shape)

    mjd = st.mjd_night + 0.02 * int(o.visit)
    ny, nx = o.shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    arts: dict[str, Any] = dict(cosmic_rays=crs, hot_pixels=st.detector.hot_pixels,
                                bad_columns=st.detector.bad_columns, saturated=saturated)
    meta = dict(seed=int(o.seed), visit=int(o.visit), ccd=int(o.ccd), n_ccds=o.n_ccds, filter=o.filter,
                seeing_sci=float(ep.psf.fwhm_arcsec(xc, yc)),
                seeing_ref=float(st.psf_ref.fwhm_arcsec(xc, yc)),
                zp_sci=float(ep.zp), zp_ref=float(p.zero_point), maglim_sci=float(ep.maglim),
                maglim_ref=float(st.maglim_ref), mag_sat=float(st.mag_sat), mjd_sci=float(mjd),
                mjd_ref=float(st.meta["mjd_ref"]), n_calib=int(o.n_calib))
    return SimulatedCCD(science_raw=RawFrame(data=raw, header=_science_header(p, o, ep, mjd)),
                        reference=st.reference, transients=tr, stars=stars, galaxies=galaxies,
                        artifacts=arts, psf_sci=ep.psf, psf_ref=st.psf_ref, detector=st.detector,
                        sky_sci=ep.sky, sky_ref=st.sky_ref, geometry=ep.geometry, profile=p, meta=meta)


@dataclass(frozen=True)
class _Epoch:
    """The conditions of one science epoch."""

    geometry: Geometry
    header: fits.Header  # science WCS header
    wcs: WCS
    pixel_scale: float  # arcsec/px of the science grid
    psf: PSFField
    sky: SkyModel
    zp: float  # MAGZP (mag giving 1 e-/s)
    bkg: float  # background variance per pixel at the sky level (e^2)
    maglim: float  # ideal 5-sigma point-source limit


def _draw_epoch(p: InstrumentProfile, o: SimulationOptions, st: StaticScene, r_geom, r_psf, r_sky,
                r_zp) -> _Epoch:
    """Geometry and WCS, PSF, sky and transparency of the science epoch."""
    t = p.exptime
    geom = o.geometry if o.geometry is not None else draw_geometry(r_geom)
    sci_hdr = science_wcs_header(st.ref_hdr, geom, o.shape)
    sci_wcs = WCS(sci_hdr)
    pixscale_sci = p.pixel_scale * geom.scale
    if o.seeing is not None:
        see = float(o.seeing)
    else:
        see = p.seeing_fwhm * float(np.clip(r_psf.lognormal(0.0, 0.15), 0.7, 1.8))
    psf_sci = draw_psf_field(r_psf, o.shape, see / pixscale_sci, p.moffat_beta,
                             growth=p.psf_corner_growth, ellipticity=p.psf_ellipticity,
                             pixel_scale=pixscale_sci, vary=o.psf_variation)
    sky_rate = float(o.sky) if o.sky is not None else p.sky * float(r_sky.uniform(0.8, 1.3))
    sky_sci = SkyModel(level=sky_rate * t, gx=float(r_sky.uniform(-0.01, 0.01)),
                       gy=float(r_sky.uniform(-0.01, 0.01)), shape=o.shape)
    zp_sci = p.zero_point - abs(float(r_zp.normal(0.0, 0.03)))
    bkg = sky_sci.level + p.dark_current * t + p.read_noise ** 2
    maglim = limiting_mag(psf_sci, bkg, zp_sci, t)
    return _Epoch(geometry=geom, header=sci_hdr, wcs=sci_wcs, pixel_scale=pixscale_sci, psf=psf_sci,
                  sky=sky_sci, zp=zp_sci, bkg=bkg, maglim=maglim)


@dataclass(frozen=True)
class _SkyInEpoch:
    """The static sky on the science grid of one epoch: pixel positions, galaxy shapes (science
    pixels) and fluxes (e-) at the epoch's zero point, before any variability."""

    sx: np.ndarray
    sy: np.ndarray
    star_flux: np.ndarray
    gx: np.ndarray
    gy: np.ndarray
    g11: np.ndarray
    g12: np.ndarray
    g22: np.ndarray
    gal_flux: np.ndarray


def _place_sky(sky: StaticSky, ep: _Epoch, t: float) -> _SkyInEpoch:
    S, G = sky.stars, sky.galaxies
    if S["ra"].size:
        sx, sy = (np.asarray(a) for a in ep.wcs.all_world2pix(S["ra"], S["dec"], 0))
    else:
        sx, sy = np.zeros(0), np.zeros(0)
    if G["ra"].size:
        gx, gy = (np.asarray(a) for a in ep.wcs.all_world2pix(G["ra"], G["dec"], 0))
    else:
        gx, gy = np.zeros(0), np.zeros(0)
    g11, g12, g22 = transform_shape(G["g11"], G["g12"], G["g22"], ep.geometry.matrix)
    return _SkyInEpoch(sx=sx, sy=sy, star_flux=mag_to_flux(S["mag"], ep.zp, t), gx=gx, gy=gy,
                       g11=g11, g12=g12, g22=g22, gal_flux=mag_to_flux(G["mag"], ep.zp, t))


def _inside(x, y, shape, edge=0.0):
    ny, nx = shape
    return (x >= -0.5 + edge) & (x <= nx - 0.5 - edge) & (y >= -0.5 + edge) & (y <= ny - 0.5 - edge)


def _far_from(x, y, ox, oy, radius):
    """Bool per (x, y): farther than radius[k] from every (ox[k], oy[k])."""
    ok = np.ones(x.size, bool)
    for s in range(0, ox.size, 2048):
        dx = x[:, None] - ox[None, s:s + 2048]
        dy = y[:, None] - oy[None, s:s + 2048]
        ok &= ~np.any(dx * dx + dy * dy < radius[None, s:s + 2048] ** 2, axis=1)
    return ok


# ----------------------------------------------------------------------------------------------
# transients
# ----------------------------------------------------------------------------------------------
def _draw_transients(rng, p: InstrumentProfile, o: SimulationOptions, st: StaticScene, ep: _Epoch,
                     pl: _SkyInEpoch, r_var) -> np.ndarray:
    """The ``o.n_transients`` transients of this epoch (TRANSIENT_DTYPE): isolated ones first,
    then nuclear ones (on galaxies), then variable stars; a kind short of hosts/stars falls back
    to isolated. ``r_var``: the stream of :attr:`SimulationOptions.bright_variables` (unused when
    it is 0, so nothing else moves)."""
    n, t = o.n_transients, p.exptime
    fr = np.asarray(o.transient_fractions, float)
    _, n_nuc, n_var = rng.multinomial(n, fr / fr.sum())
    lo, hi = o.mag_range if o.mag_range is not None else (ep.maglim - 5.0, ep.maglim + 0.3)
    absflux = mag_to_flux(rng.uniform(lo, hi, n), ep.zp, t)
    hosts, vstars = _pick_hosts_and_stars(rng, n_nuc, n_var, ep.maglim, st, pl, o.shape, o.edge)
    n_iso = n - hosts.size - vstars.size
    xs, ys = _place_isolated(rng, n_iso, ep, st, pl, o.shape, o.edge)

    tr = np.zeros(n, TRANSIENT_DTYPE)
    tr["id"] = np.arange(n)
    tr["host"] = -1
    tr["star"] = -1
    a, b = n_iso, n_iso + hosts.size
    tr["kind"][:a] = "isolated"
    tr["x"][:a], tr["y"][:a] = xs[:n_iso], ys[:n_iso]
    tr["flux"][:a] = absflux[:a]
    tr["kind"][a:b] = "nuclear"
    tr["x"][a:b], tr["y"][a:b] = pl.gx[hosts], pl.gy[hosts]
    tr["host"][a:b] = hosts
    tr["flux"][a:b] = absflux[a:b]
    tr["kind"][b:] = "variable"
    tr["x"][b:], tr["y"][b:] = pl.sx[vstars], pl.sy[vstars]
    tr["star"][b:] = vstars
    fade = rng.uniform(size=vstars.size) < 0.5
    tr["flux"][b:] = np.where(fade, -np.minimum(absflux[b:], 0.9 * pl.star_flux[vstars]), absflux[b:])
    if o.bright_variables > 0 and vstars.size:
        _brighten_variables(r_var, o.bright_variables, tr[b:], vstars, ep.maglim, st, pl, o.shape, o.edge)
    _fill_transient_truth(tr, st, ep, pl, t)
    return tr


def _pick_hosts_and_stars(rng, n_nuc: int, n_var: int, maglim: float, st: StaticScene, pl: _SkyInEpoch,
                          shape, edge):
    """Indices of the host galaxies (bright enough, inside the CCD) of nuclear transients and of
    the stars (unsaturated, well above the limit) turned variable."""
    gmag, smag = st.sky.galaxies["mag"], st.sky.stars["mag"]
    cand = np.flatnonzero(_inside(pl.gx, pl.gy, shape, edge) & (gmag < maglim - 0.5))
    hosts = rng.choice(cand, size=min(n_nuc, cand.size), replace=False) if cand.size else np.zeros(0, int)
    cand = np.flatnonzero(_inside(pl.sx, pl.sy, shape, edge) & (smag > st.mag_sat + 1.0)
                          & (smag < maglim - 1.0) & ~st.star_sat_ref)
    vstars = rng.choice(cand, size=min(n_var, cand.size), replace=False) if cand.size else np.zeros(0, int)
    return hosts, vstars


def _brighten_variables(rng, share: float, tv: np.ndarray, vstars: np.ndarray, maglim: float,
                        st: StaticScene, pl: _SkyInEpoch, shape, edge) -> None:
    """Move a ``share`` of the variable stars ``tv`` (a view of the transient table; ``vstars`` their
    stars, in place) onto bright stars: unsaturated in the reference, ``mag_sat`` to ``maglim - 4``,
    uniform in magnitude, flux change +-3-70 % of the star's (log-uniform; the sign drawn before is
    kept). Fewer when there are not enough bright stars."""
    smag = st.sky.stars["mag"]
    cand = np.flatnonzero(_inside(pl.sx, pl.sy, shape, edge) & (smag > st.mag_sat) & (smag < maglim - 4.0)
                          & ~st.star_sat_ref)
    cand = np.setdiff1d(cand, vstars)
    n = min(int(rng.binomial(vstars.size, share)), cand.size)
    if n == 0:
        return
    w = np.ones(cand.size)  # uniform in magnitude: weight each star by 1 / (stars per unit magnitude)
    hist, edges = np.histogram(smag[cand], bins=np.arange(np.floor(smag[cand].min()), smag[cand].max() + 1.0, 0.5))
    w /= hist[np.clip(np.searchsorted(edges, smag[cand], side="right") - 1, 0, hist.size - 1)]
    pick = rng.choice(cand, size=n, replace=False, p=w / w.sum())
    frac = 10.0 ** rng.uniform(np.log10(0.03), np.log10(0.7), n)
    vstars[:n] = pick
    tv["x"][:n], tv["y"][:n], tv["star"][:n] = pl.sx[pick], pl.sy[pick], pick
    tv["flux"][:n] = np.sign(tv["flux"][:n]) * frac * pl.star_flux[pick]


def _place_isolated(rng, n_iso: int, ep: _Epoch, st: StaticScene, pl: _SkyInEpoch, shape, edge):
    """``(x, y)`` of ``n_iso`` isolated transients: away from bright stars and galaxies and 4 FWHM
    from each other, or anywhere when the field is too crowded for that."""
    ny, nx = shape
    fw_c = ep.psf.fwhm0
    gmag, smag = st.sky.galaxies["mag"], st.sky.stars["mag"]
    bright = smag < ep.maglim - 1.0
    rad_s = np.where(smag < st.mag_sat, 12.0, 3.0) * fw_c
    re, _, _ = shape_params(pl.g11, pl.g12, pl.g22)
    gsel = gmag < ep.maglim - 0.5
    ox = np.r_[pl.sx[bright], pl.gx[gsel]]
    oy = np.r_[pl.sy[bright], pl.gy[gsel]]
    orad = np.r_[rad_s[bright], 2.0 * re[gsel] + 2.0 * fw_c]
    xs, ys = np.zeros(0), np.zeros(0)
    for _ in range(10):
        if xs.size >= n_iso:
            break
        m = 20 * max(n_iso, 1)
        cx = rng.uniform(edge, nx - 1 - edge, m)
        cy = rng.uniform(edge, ny - 1 - edge, m)
        ok = _far_from(cx, cy, ox, oy, orad)
        cx, cy = cx[ok], cy[ok]
        keep = []
        for k in range(cx.size):  # mutual spacing 4 FWHM
            px = np.r_[xs, cx[keep]]
            py = np.r_[ys, cy[keep]]
            if np.all((px - cx[k]) ** 2 + (py - cy[k]) ** 2 > (4 * fw_c) ** 2):
                keep.append(k)
            if xs.size + len(keep) >= n_iso:
                break
        xs, ys = np.r_[xs, cx[keep]], np.r_[ys, cy[keep]]
    if xs.size < n_iso:  # crowded: accept anywhere
        k = n_iso - xs.size
        xs = np.r_[xs, rng.uniform(edge, nx - 1 - edge, k)]
        ys = np.r_[ys, rng.uniform(edge, ny - 1 - edge, k)]
    return xs, ys


def _fill_transient_truth(tr: np.ndarray, st: StaticScene, ep: _Epoch, pl: _SkyInEpoch, t: float) -> None:
    """Fill ``mag``, ``ra``/``dec``, ``x_ref``/``y_ref``, ``fwhm`` and ``snr`` of placed transients."""
    tr["mag"] = flux_to_mag(tr["flux"], ep.zp, t)
    ra, dec = ep.wcs.all_pix2world(tr["x"], tr["y"], 0)
    tr["ra"], tr["dec"] = ra, dec
    xr, yr = st.ref_wcs.all_world2pix(ra, dec, 0)
    tr["x_ref"], tr["y_ref"] = xr, yr
    tr["fwhm"] = ep.psf.fwhm(tr["x"], tr["y"])
    nea = ep.psf.noise_equivalent_area(tr["x"], tr["y"]) if tr.size else np.zeros(0)
    src = np.abs(tr["flux"]).copy()
    var_sel = tr["kind"] == "variable"
    src[var_sel] = pl.star_flux[tr["star"][var_sel]] + tr["flux"][var_sel]
    tr["snr"] = np.abs(tr["flux"]) / np.sqrt(nea * ep.bkg + np.maximum(src, 0))


# ----------------------------------------------------------------------------------------------
# the science frame and its truth tables
# ----------------------------------------------------------------------------------------------
def _star_changes(o: SimulationOptions, pl: _SkyInEpoch, rng) -> tuple:
    """Per-star ``(dx, dy, width)`` of the science epoch against the reference: proper motion
    (pixels; 0 when off) and PSF width factor (None when off); :attr:`SimulationOptions.
    star_psf_scatter`, ``proper_motion``. The draws come from their own stream: nothing else moves."""
    n = len(pl.sx)
    dx = dy = 0.0
    width = None
    if o.proper_motion > 0:
        dx, dy = rng.normal(0.0, o.proper_motion, (2, n))
    if o.star_psf_scatter > 0:
        lim = 3 * o.star_psf_scatter
        width = np.exp(np.clip(rng.normal(0.0, o.star_psf_scatter, n), -lim, lim))
    return dx, dy, width


def _observe(p: InstrumentProfile, o: SimulationOptions, st: StaticScene, ep: _Epoch, pl: _SkyInEpoch,
             star_flux_sci, tr: np.ndarray, r_cr, r_noise, star_changes: tuple):
    """Render the science scene (calibrated e-, before the flat) and read it out through the
    detector: ``(raw ADU float32, saturated bool (ny, nx), cosmic rays)``. ``star_changes``:
    :func:`_star_changes`."""
    t = p.exptime
    model = ep.sky.image()
    dx, dy, width = star_changes
    ep.psf.render(model, pl.sx + dx, pl.sy + dy, star_flux_sci, width)
    G = st.sky.galaxies
    render_galaxies(model, ep.psf, pl.gx, pl.gy, pl.gal_flux, pl.g11, pl.g12, pl.g22, G["n"], G["bn"])
    pts = tr["kind"] != "variable"
    ep.psf.render(model, tr["x"][pts], tr["y"][pts], tr["flux"][pts])
    crs = make_cosmic_rays(o.shape, t, p.cosmic_rate, r_cr) if o.artifacts else np.zeros(0, COSMIC_RAY_DTYPE)
    raw, saturated = st.detector.read_out(model, t, r_noise, cosmic_rays=crs)
    return raw, saturated, crs


def _flag_masked(tr: np.ndarray, detector: DetectorModel, saturated: np.ndarray, crs: np.ndarray) -> None:
    """``tr["masked"]``: a saturated, hot, bad-column or cosmic-ray pixel lies in its 5x5 box."""
    bad = detector.bad_pixel_mask() | saturated
    if crs.size:
        bad[crs["y"], crs["x"]] = True
    if tr.size:
        ix, iy = np.floor(tr["x"] + 0.5).astype(int), np.floor(tr["y"] + 0.5).astype(int)
        for k in range(tr.size):
            tr["masked"][k] = bool(bad[max(iy[k] - 2, 0): iy[k] + 3, max(ix[k] - 2, 0): ix[k] + 3].any())


def _star_truth(st: StaticScene, pl: _SkyInEpoch, star_flux_sci, saturated: np.ndarray, tr: np.ndarray,
                shape) -> np.ndarray:
    ny, nx = shape
    S, sx, sy = st.sky.stars, pl.sx, pl.sy
    stars = np.zeros(sx.size, STAR_DTYPE)
    stars["id"] = np.arange(sx.size)
    stars["ra"], stars["dec"] = S["ra"], S["dec"]
    stars["x"], stars["y"] = sx, sy
    stars["x_ref"], stars["y_ref"] = S["x_ref"], S["y_ref"]
    stars["mag"] = S["mag"]
    stars["flux_sci"] = star_flux_sci
    stars["flux_ref"] = st.star_flux_ref
    stars["in_sci"] = _inside(sx, sy, shape)
    stars["in_ref"] = _inside(S["x_ref"], S["y_ref"], shape)
    ixs, iys = np.floor(sx + 0.5).astype(int), np.floor(sy + 0.5).astype(int)
    on = stars["in_sci"] & (ixs >= 0) & (ixs < nx) & (iys >= 0) & (iys < ny)
    stars["saturated_sci"][on] = saturated[iys[on], ixs[on]]
    stars["saturated_ref"] = st.star_sat_ref
    if tr.size:
        stars["variable"][tr["star"][tr["kind"] == "variable"]] = True
    return stars


def _galaxy_truth(st: StaticScene, pl: _SkyInEpoch, shape) -> np.ndarray:
    G, gx, gy = st.sky.galaxies, pl.gx, pl.gy
    galaxies = np.zeros(gx.size, GALAXY_DTYPE)
    galaxies["id"] = np.arange(gx.size)
    galaxies["ra"], galaxies["dec"] = G["ra"], G["dec"]
    galaxies["x"], galaxies["y"] = gx, gy
    galaxies["x_ref"], galaxies["y_ref"] = G["x_ref"], G["y_ref"]
    galaxies["mag"] = G["mag"]
    galaxies["flux"] = pl.gal_flux
    galaxies["flux_ref"] = st.gal_flux_ref
    re, q, ang = shape_params(pl.g11, pl.g12, pl.g22)
    galaxies["r_eff"], galaxies["axis_ratio"], galaxies["angle"] = re, q, ang
    galaxies["sersic_n"] = G["n"]
    galaxies["in_sci"] = _inside(gx, gy, shape)
    galaxies["in_ref"] = _inside(G["x_ref"], G["y_ref"], shape)
    return galaxies


def _science_header(p: InstrumentProfile, o: SimulationOptions, ep: _Epoch, mjd: float) -> fits.Header:
    """The raw frame's header: the epoch's WCS and the keywords listed in :class:`SimulatedCCD`."""
    ny, nx = o.shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    h = ep.header.copy()
    h["BUNIT"] = "adu"
    h["INSTRUME"] = p.name
    h["FILTER"] = o.filter
    h["EXPTIME"] = (float(p.exptime), "s")
    h["MJD-OBS"] = mjd
    h["DATE-OBS"] = mjd_to_isot(mjd)
    h["CCDNUM"] = int(o.ccd)
    h["VISIT"] = int(o.visit)
    h["GAIN"] = (float(p.gain), "e-/ADU")
    h["RDNOISE"] = (float(p.read_noise), "e-")
    h["SATURATE"] = (float(p.saturation), "ADU")
    h["BIASLEV"] = (float(p.bias_level), "ADU")
    h["DARKCUR"] = (float(p.dark_current), "e-/s")
    h["MAGZP"] = (float(ep.zp), "mag giving 1 e-/s")
    h["SEEING"] = (float(ep.psf.fwhm_arcsec(xc, yc)), "true FWHM at centre, arcsec")
    h["FWHM"] = (float(ep.psf.fwhm(xc, yc)), "true FWHM at centre, pixels")
    h["FWHMPIX"] = (float(ep.psf.fwhm_pixelized(xc, yc)), "same, pixel-box convolved")
    h["SKYLEVEL"] = (float(ep.sky.level), "e- per pixel at the centre")
    h["MAGLIM"] = (float(ep.maglim), "ideal 5-sigma point-source limit")
    h["PIXSCALE"] = float(ep.pixel_scale)
    h["SIMSEED"] = int(o.seed)
    return h
