"""Pixel units of images as users have them, their noise maps, and zero points in those units.

Used by :func:`nightsift.engine.io.fits.read_exposure` (the reading boundary) and by
:func:`nightsift.engine.io.fits.header_photometry` (magnitudes, the zero-point flux ratio).

Kinds of ``BUNIT`` (:func:`unit_kind`)
--------------------------------------
``electron``
    e- collected in the exposure (``electron``, ``e-``): nightsift's own unit.
``count``
    counts of the whole exposure in other units (``adu``, ``DN``, ``counts``; also no ``BUNIT``):
    ``GAIN`` (e-/unit) turns them into e-, as it always has.
``rate``
    counts per second (``electron/s``, ``counts/s``, ``adu/s``, ``cps``): HST/JWST count-rate images.
``flux``
    a flux density per pixel (``Jy``, ``mJy``, ``uJy``, ``nJy``, ``Jy/pix``) or per steradian
    (``MJy/sr``: the JWST, Spitzer and WISE surface-brightness unit), parsed by ``astropy.units``.
``unknown``
    anything else.

An image of kind ``rate`` or ``flux`` read with a noise map stays in its own unit: every stage
of the chain works in sigma (the variance map carries the noise, ZOGY's source noise included), so
nothing needs electrons. Its zero point (:func:`zero_point_of`) is the AB magnitude of a source
whose pixels sum to 1 unit (``count``/``electron``: 1 unit per second of ``EXPTIME``, the
``MAGZP`` convention nightsift has always used); :func:`photometry_divisor` says which.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ..errors import InputError

__all__ = [
    "unit_kind",
    "photometry_divisor",
    "jy_per_unit",
    "zero_point_of",
    "NOISE_EXTENSIONS",
    "NOISE_KINDS",
    "noise_kind_of",
    "noise_to_variance",
    "poisson_scale_of",
]

#: AB magnitude of 1 Jy is 2.5 log10(3631) = 8.90
AB_JY = 3631.0
ELECTRON_UNITS = frozenset({"electron", "electrons", "e-", "e"})
_COUNTS = ("adu", "dn", "count", "counts", "ct", "cts")
COUNT_UNITS = frozenset(_COUNTS)
_PER_SECOND = ("/s", "/sec", "/second", " s-1", " s**-1", " s^-1", "s-1")
RATE_UNITS = frozenset({c + s for c in tuple(ELECTRON_UNITS) + _COUNTS for s in _PER_SECOND} | {"cps"})


def _norm(bunit) -> str:
    return " ".join(str(bunit if bunit is not None else "").split()).strip().lower()


def _astropy_unit(bunit: str):
    """The astropy unit of ``bunit`` (case kept: MJy is not mJy), or ``None`` when it cannot be parsed."""
    import astropy.units as u

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return u.Unit(str(bunit).strip(), parse_strict="raise")
        except (ValueError, TypeError):
            return None


def _flux_unit(bunit: str):
    """``(Jy per unit, per_sr)`` of a flux-density ``bunit``, or ``None`` when it is not one."""
    import astropy.units as u

    unit = _astropy_unit(bunit)
    if unit is None:
        return None
    for base, per_sr in ((u.Jy, False), (u.Jy / u.sr, True), (u.Jy / u.pix, False)):
        if unit.is_equivalent(base):
            return float(unit.to(base)), per_sr
    return None


def unit_kind(bunit) -> str:
    """``"electron"``, ``"count"``, ``"rate"``, ``"flux"`` or ``"unknown"`` (module docstring);
    a missing/empty ``BUNIT`` is ``"count"`` (an ADU image, as nightsift always took it)."""
    s = _norm(bunit)
    if s in ELECTRON_UNITS:
        return "electron"
    if s == "" or s in COUNT_UNITS:
        return "count"
    if s in RATE_UNITS:
        return "rate"
    if _flux_unit(str(bunit)) is not None:
        return "flux"
    return "unknown"


def photometry_divisor(header, exptime: float | None) -> float | None:
    """What a flux (summed pixel values) is divided by before ``zp - 2.5 log10(...)``: ``EXPTIME``
    for an image of counts (``electron``, ``count``, or a ``BUNIT`` nightsift does not know: the
    convention of every e- image), 1 for a ``rate`` or ``flux`` image (already per second or a flux
    density; ``EXPTIME`` not needed). ``None`` when ``EXPTIME`` is needed and absent or not > 0."""
    bunit = header.get("BUNIT") if header is not None else None
    if unit_kind(bunit) in ("rate", "flux"):
        return 1.0
    if exptime is None or exptime <= 0:
        return None
    return exptime


def _pixel_area_sr(header, wcs, path: str | None) -> float:
    """Pixel solid angle (sr): ``PIXAR_SR``, else the WCS's pixel area at its reference point."""
    from .fits import header_float

    if header is not None and "PIXAR_SR" in header:
        area = header_float(header, "PIXAR_SR", path=path)
        if area > 0:
            return area
        raise InputError(f"header PIXAR_SR = {area} is not > 0; correct it (the pixel solid angle in sr)", path=path)
    if wcs is None:
        raise InputError("BUNIT is per steradian but there is no PIXAR_SR and no WCS to measure the pixel area; "
                         "add PIXAR_SR (sr)", path=path)
    from astropy.wcs.utils import proj_plane_pixel_area

    return float(proj_plane_pixel_area(wcs.celestial)) * (math.pi / 180.0) ** 2


def jy_per_unit(header, *, wcs=None, path: str | None = None) -> float | None:
    """Jy of a source whose pixels sum to 1 unit of ``BUNIT`` (a ``flux`` kind), ``None`` otherwise.
    ``MJy/sr``-like units use the pixel solid angle (``PIXAR_SR``, else the WCS)."""
    got = _flux_unit(str(header.get("BUNIT", ""))) if header is not None else None
    if got is None:
        return None
    factor, per_sr = got
    return factor * _pixel_area_sr(header, wcs, path) if per_sr else factor


def zero_point_of(header, *, wcs=None, path: str | None = None) -> tuple[float, str] | None:
    """A zero point in the image's own unit derived from its header, and where it came from.

    The AB magnitude of a source whose pixels sum to 1 unit (divided by :func:`photometry_divisor`),
    ``m = -2.5 log10(f_Jy / 3631)``, from (first that applies):

    * ``BUNIT`` a flux density (``nJy``, ``Jy``, ``MJy/sr`` with ``PIXAR_SR`` or the WCS pixel area);
    * ``PHOTFNU`` (Jy per unit/s, the HST/JWST inverse sensitivity): ``8.90 - 2.5 log10(PHOTFNU)``;
    * ``PHOTFLAM`` (erg/s/cm^2/A per unit/s) with ``PHOTPLAM`` (A):
      ``-2.5 log10(PHOTFLAM) - 5 log10(PHOTPLAM) - 2.408``.

    ``None`` when none applies (no magnitudes then; never a default). The caller uses it only
    when the header has no ``MAGZP``/``MAGZPT``/``MAGZERO`` of its own.

    Raises
    ------
    InputError
        A present PHOTFNU/PHOTFLAM/PHOTPLAM/PIXAR_SR that is not a positive finite number.
    """
    from .fits import header_float

    if header is None:
        return None
    jy = jy_per_unit(header, wcs=wcs, path=path)
    if jy is not None:
        return -2.5 * math.log10(jy / AB_JY), f"BUNIT {str(header['BUNIT']).strip()}"
    fix = "correct it (the inverse sensitivity of the image's unit) or remove it"
    if "PHOTFNU" in header:
        fnu = header_float(header, "PHOTFNU", path=path, fix=fix)
        if fnu > 0:
            return -2.5 * math.log10(fnu / AB_JY), "PHOTFNU"
        raise InputError(f"header PHOTFNU = {fnu} is not > 0; {fix}", path=path)
    if "PHOTFLAM" in header and "PHOTPLAM" in header:
        flam = header_float(header, "PHOTFLAM", path=path, fix=fix)
        plam = header_float(header, "PHOTPLAM", path=path, fix=fix)
        if flam > 0 and plam > 0:
            # f_nu = f_lambda lambda^2 / c; AB = -2.5 log10(f_nu [erg/s/cm^2/Hz]) - 48.60
            return -2.5 * math.log10(flam) - 5.0 * math.log10(plam) - 48.60 + 2.5 * math.log10(2.99792458e18), \
                "PHOTFLAM/PHOTPLAM"
        raise InputError(f"header PHOTFLAM = {flam}, PHOTPLAM = {plam} must both be > 0; {fix}", path=path)
    return None


# ---------------------------------------------------------------------------------------------
# noise maps
# ---------------------------------------------------------------------------------------------
#: what a noise map holds, by the names users give it
NOISE_KINDS = {
    "variance": "variance", "var": "variance",
    "sigma": "sigma", "err": "sigma", "error": "sigma", "rms": "sigma", "noise": "sigma", "stdev": "sigma",
    "ivar": "ivar", "wht": "ivar", "weight": "ivar", "wgt": "ivar", "ivm": "ivar", "invvar": "ivar",
    "inverse_variance": "ivar",
}
#: extension names of a noise map in the image's file, in order of preference: a variance (Rubin,
#: nightsift), then an error (JWST ERR holds the total, source Poisson included), then an inverse
#: variance (HST/JWST drizzle WHT with the IVM weighting, DES WGT)
NOISE_EXTENSIONS = ("VARIANCE", "VAR", "ERR", "ERROR", "SIGMA", "RMS", "NOISE", "IVAR", "INVVAR", "IVM", "WHT",
                    "WEIGHT", "WGT")


def noise_kind_of(extname: str | None, bunit, image_bunit, *, explicit: str | None = None,
                  path: str | None = None) -> str:
    """``"variance"``, ``"sigma"`` or ``"ivar"`` of a noise map: ``explicit`` (a name of
    :data:`NOISE_KINDS`), else its ``EXTNAME``, else its ``BUNIT`` against the image's (the same
    unit: sigma; squared: variance; inverse squared: inverse variance).

    Raises
    ------
    InputError
        An unknown ``explicit`` kind, or a map whose kind cannot be told.
    """
    if explicit is not None:
        kind = NOISE_KINDS.get(str(explicit).strip().lower())
        if kind is None:
            raise InputError(f"noise kind {explicit!r} is not one of variance, sigma (err), ivar (wht, ivm)", path=path)
        return kind
    kind = NOISE_KINDS.get(str(extname or "").strip().lower())
    if kind is not None:
        return kind
    nu, iu = _astropy_unit(str(bunit)) if bunit else None, _astropy_unit(str(image_bunit)) if image_bunit else None
    if nu is not None and iu is not None:
        for power, k in ((1, "sigma"), (2, "variance"), (-2, "ivar")):
            if nu == iu**power:
                return k
    raise InputError(f"cannot tell whether this noise map (EXTNAME {extname!r}, BUNIT {bunit!r}) holds variances, "
                     "errors or inverse variances: name its extension VARIANCE, ERR or WHT, give it the image's "
                     "BUNIT (squared for a variance), or pass the kind (noise_kind=, --sci-noise-kind)", path=path)


def noise_to_variance(noise: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(variance, unusable)`` float64 and bool from a noise map of ``kind``.

    Unusable: non-finite values everywhere; a negative variance (a zero variance is kept, as
    nightsift always has); an error <= 0; an inverse variance <= 0 (zero weight: no data).
    Unusable pixels are left for the caller to mask (``NO_DATA``) and count; their variance here
    is NaN.
    """
    a = np.asarray(noise, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "variance":
            bad = ~np.isfinite(a) | (a < 0)
            var = a
        elif kind == "sigma":
            bad = ~np.isfinite(a) | (a <= 0)
            var = a * a
        elif kind == "ivar":
            bad = ~np.isfinite(a) | (a <= 0)
            var = 1.0 / a
        else:
            raise ValueError(f"noise_to_variance: unknown kind {kind!r}")
        bad |= ~np.isfinite(var)
    return np.where(bad, np.nan, var), bad


def poisson_scale_of(header) -> float:
    """Image units per e- of an exposure (``NSPOISS``, written by
    :func:`~nightsift.engine.io.fits.read_exposure` for an image kept in its own unit): the
    variance one unit of source flux adds, for the stages' source-Poisson terms (catalogue
    ``fluxerr``, the PSF stack's variance). 1 for an e- image (no card); 0 when the noise map holds
    no source Poisson noise (an HST drizzle WHT: background only)."""
    if header is None or "NSPOISS" not in header:
        return 1.0
    v = float(header["NSPOISS"])
    return v if np.isfinite(v) and v >= 0 else 1.0
