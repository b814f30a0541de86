"""FITS in and out (astropy), with validation at the boundary.

Every problem with an input file raises :class:`~nightsift.engine.errors.InputError` whose
message (one line) names the file, the problem and the fix: missing file, truncated or corrupt
FITS, a header of more than :data:`MAX_HEADER_CARDS` cards, no 2-D image HDU, an all-NaN or
constant frame, a missing or unusable celestial WCS -- including any WCS card astropy would have
to repair or drop (:func:`celestial_wcs`: nothing is repaired silently) --, missing ``GAIN`` /
``SATURATE`` / ``EXPTIME`` (raw frames), a frame mostly at or above ``SATURATE``, a ``MASK`` that
cannot be :class:`~nightsift.engine.records.MaskBits`, mismatched extension shapes.

Units
-----
:class:`~nightsift.engine.records.RawFrame` data stay in ADU. :class:`~nightsift.engine.records.Exposure`
images are in electrons when they can be: :func:`read_exposure` multiplies an ADU image (or one
without ``BUNIT``) by ``GAIN`` unless the header says ``BUNIT = 'electron'`` (which
:func:`write_exposure` writes for them). An image in a count-rate or flux unit (``BUNIT``
electron/s, counts/s, Jy, nJy, MJy/sr: :mod:`nightsift.engine.io.units`) read with a noise map
(a ``VARIANCE``, ``ERR`` or ``WHT`` extension, or a separate file), or counts with a noise map but
no ``GAIN``, stays in its own unit (``BUNIT`` kept, the variance in its square): no stage needs
electrons, since S/N, ZOGY's source noise and the detection threshold all come from the variance
map; magnitudes use a zero point in that unit (:func:`header_photometry`). ``GAIN`` is needed only
where the noise must be estimated from the image (no noise map): then it is e- per image unit.
The stages' source-Poisson terms (catalogue S/N, the PSF stack's variance) take the image units
per e- from the header card ``NSPOISS`` (``1 / GAIN`` when the file gives one, else measured on
the noise map: :func:`_poisson_scale`); an e- image has none and is unchanged.

``SATURATE`` is the level of the file's own pixel values at which the detector saturated (the
SExtractor/SWarp convention; in a flux-unit file, that unit): ADU in an ADU file (a raw frame:
bias included; a calibrated ADU image: as its pipeline left it), so ``SATURATE * GAIN`` e- once
:func:`read_exposure` has scaled the image; e- in a ``BUNIT = 'electron'`` file (the simulator's references and science
exposures write it so, with ``GAIN = 1``). :func:`read_exposure` flags ``MaskBits.SAT`` where the
image reaches ``saturation_fraction * SATURATE`` (grown by ``saturation_grow`` px, as
:func:`~nightsift.engine.stages.calibrate.calibrate_frames` does for raw frames), on top of any
``MASK`` extension; a file without ``SATURATE`` relies on its ``MASK``. A frame calibrated by
nightsift has no single e- saturation level (bias, dark and flat differ per pixel), so its
header keeps the raw level as ``SATURADU`` and drops ``SATURATE``; its ``MASK`` carries ``SAT``
per pixel. Writing what :func:`read_exposure` returned and reading it again changes nothing.

File layout written by :func:`write_exposure`: an empty primary HDU, then ``IMAGE`` (float32,
e- or the unit kept, the full metadata header plus the WCS), ``VARIANCE`` (float32, its square, WCS), ``MASK``
(uint16 :class:`~nightsift.engine.records.MaskBits`, WCS, one ``MB_<NAME>`` card per bit).
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import InputError
from ..records import UNUSABLE, Exposure, MaskBits, RawFrame
from .units import NOISE_EXTENSIONS, noise_kind_of, noise_to_variance, photometry_divisor, unit_kind, zero_point_of

__all__ = [
    "read_raw",
    "read_exposure",
    "write_exposure",
    "write_image",
    "check_same_shape",
    "celestial_wcs",
    "estimate_variance",
    "replace_wcs",
    "header_float",
    "header_zero_point",
    "header_exptime",
    "header_photometry",
    "input_qa",
    "pixel_unit",
]

log = logging.getLogger(__name__)

#: header keywords that describe the HDU structure, not the observation
_STRUCTURAL = {
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "XTENSION", "PCOUNT",
    "GCOUNT", "EXTNAME", "EXTVER", "BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM", "INHERIT",
    "ZIMAGE", "ZBITPIX", "ZNAXIS", "ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2", "ZCMPTYPE",
    "ZQUANTIZ", "ZDITHER0", "ZSIMPLE", "ZEXTEND", "ZTENSION", "ZPCOUNT", "ZGCOUNT", "ZNAME1",
    "ZVAL1", "ZNAME2", "ZVAL2", "",
}
#: header keywords of a WCS (stripped before a new WCS is written, so old and new never mix)
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSDIM|WCSNAME|CRPIX\d|CRVAL\d|CDELT\d|CTYPE\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|"
    r"PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|EQUINOX|EPOCH|MJDREF|(A|B|AP|BP)_(ORDER|DMAX|\d+_\d+)|"
    r"WAT\d_\d+|LTM\d_\d|LTV\d)$"
)
#: extensions that accompany an image (noise maps, masks): never taken for the image itself
_COMPANION_HDUS = frozenset(NOISE_EXTENSIONS) | {"MASK", "DQ", "CON", "CTX", "EXP", "EXPMAP"}
#: most header cards nightsift reads (a CCD header has hundreds; a header of millions is a broken or
#: hostile file, and astropy would spend minutes and gigabytes parsing it)
MAX_HEADER_CARDS = 50_000


# ---------------------------------------------------------------------------------------------
# low-level reading
# ---------------------------------------------------------------------------------------------
def _is_2d_image(h) -> bool:
    """An image HDU with two axes (for a compressed HDU astropy shows the image header)."""
    return isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and h.header.get("NAXIS", 0) == 2


def _choose_image(hdul: fits.HDUList, hdu, path: str) -> int:
    if hdu is not None:
        try:
            idx = hdul.index_of(hdu)
        except (KeyError, IndexError):
            names = [h.name for h in hdul]
            raise InputError(f"has no HDU {hdu!r} (HDUs: {names}); pick one of those", path=path) from None
        if not _is_2d_image(hdul[idx]):
            raise InputError(
                f"HDU {hdu!r} is not a 2-D image (shape {getattr(hdul[idx], 'shape', None)}); "
                "pass the HDU of one CCD image",
                path=path,
            )
        return idx
    for i, h in enumerate(hdul):
        if h.name in ("IMAGE", "SCI") and _is_2d_image(h):
            return i
    for i, h in enumerate(hdul):
        if _is_2d_image(h) and h.name not in _COMPANION_HDUS:
            return i
    for i, h in enumerate(hdul):  # a file of a noise map alone (read_exposure(noise=))
        if _is_2d_image(h):
            return i
    shapes = [(h.name, getattr(h, "shape", None)) for h in hdul]
    raise InputError(
        f"contains no 2-D image HDU (HDUs and shapes: {shapes}); nightsift needs one CCD image "
        "(ny, nx) per HDU",
        path=path,
    )


def _merged_header(hdul: fits.HDUList, idx: int) -> fits.Header:
    """The image HDU's header, with non-structural cards of the primary header it lacks (MEF)."""
    header = hdul[idx].header.copy()
    if idx != 0:
        for card in hdul[0].header.cards:
            key = card.keyword
            if key in _STRUCTURAL or key in ("COMMENT", "HISTORY") or key in header:
                continue
            header.append(card)
    return header


def _check_primary_header_size(p: Path, spath: str) -> None:
    """Refuse a primary header of more than :data:`MAX_HEADER_CARDS` cards before astropy parses it
    (a scan of the raw 2880-byte blocks for the END card)."""
    block = 2880
    try:
        with open(p, "rb") as fh:
            for _ in range(-(-MAX_HEADER_CARDS * 80 // block) + 1):
                chunk = fh.read(block)
                if len(chunk) < block:
                    return  # short file: astropy reports it as truncated
                for i in range(0, block, 80):
                    if chunk[i:i + 8] == b"END     ":
                        return
    except OSError as e:
        raise InputError(f"cannot be read ({e.strerror or e})", path=spath) from None
    raise InputError(f"has a primary header of more than {MAX_HEADER_CARDS} cards (no END card in its first "
                     f"{MAX_HEADER_CARDS * 80 / 1e6:.0f} MB): a corrupt file or not a CCD image; regenerate it",
                     path=spath)


def _load(path, *, hdu=None, extensions: Sequence[str] = (), ext_headers: dict | None = None):
    """Open ``path`` and return ``(header, data, {extname: data})``, raising InputError on any
    unreadable, truncated or image-less file. ``ext_headers``, when given, receives the header of
    each extension read."""
    p = Path(path)
    spath = str(p)
    if not p.exists():
        raise InputError("file not found; check the path (and that the night's data are mounted)", path=spath)
    if p.is_dir():
        raise InputError("is a directory, not a FITS file; pass the file inside it", path=spath)
    _check_primary_header_size(p, spath)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(p, memmap=False)
        except (OSError, ValueError, TypeError, IndexError, KeyError) as e:
            raise InputError(
                f"is not a readable FITS file ({e}); the file is corrupt or not FITS: copy or "
                "regenerate it",
                path=spath,
            ) from None
        try:
            if len(hdul) == 0:
                raise InputError("is an empty FITS file (no HDUs); copy or regenerate it", path=spath)
            idx = _choose_image(hdul, hdu, spath)
            if len(hdul[idx].header) > MAX_HEADER_CARDS:
                raise InputError(f"HDU {idx} has a header of {len(hdul[idx].header)} cards (more than "
                                 f"{MAX_HEADER_CARDS}): not a CCD image header; strip it", path=spath)
            header = _merged_header(hdul, idx)
            data = np.array(hdul[idx].data)
            extra = {}
            for name in extensions:
                if name in hdul and hdul[name].data is not None:
                    extra[name] = np.array(hdul[name].data)
                    if ext_headers is not None:
                        ext_headers[name] = hdul[name].header.copy()
        except InputError:
            raise
        except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError) as e:
            raise InputError(
                f"is truncated or corrupt: its data could not be read ({e}); copy or regenerate the file",
                path=spath,
            ) from None
        finally:
            hdul.close()
    for w in caught:
        text = str(w.message)
        if "truncated" in text or "corrupt" in text.lower():
            raise InputError(
                f"is truncated or corrupt ({text.splitlines()[0]}); copy or regenerate the file", path=spath
            )
        log.debug("%s: %s", spath, text)
    return header, data, extra


def _check_pixels(data: np.ndarray, path: str, what: str = "image") -> None:
    finite = np.isfinite(data)
    if not finite.any():
        raise InputError(
            f"{what} has no finite pixel (all NaN/inf): an empty or failed readout; drop this frame "
            "or re-reduce it",
            path=path,
        )
    vals = data[finite]
    if vals.min() == vals.max():
        raise InputError(
            f"{what} is constant (every finite pixel = {vals.min():g}): an empty or failed readout; "
            "drop this frame or re-reduce it",
            path=path,
        )


#: astropy's WCS fixes that only restate the header (a date from DATE-OBS, a unit spelling, the
#: observatory position, a spectral-axis convention, AIPS NCP/GLS -> SIN/SFL): the mapping stays
_HARMLESS_FIXES = frozenset({"datfix", "unitfix", "obsfix", "spcfix", "celfix"})
_FIX_MESSAGE = re.compile(r"^'(\w+)' made the change '(.*)'\.?$", re.S)
#: numeric cards of the celestial mapping that the WCS built must have taken as written
_MAPPING_KEY = re.compile(r"^(CRPIX[12]|CRVAL[12]|CD[12]_[12]|PV[12]_\d+)$")


def _one_line(e: Exception) -> str:
    """A wcslib/astropy message in one line: its explanatory lines, without 'ERROR n in f() at line
    L of file F:' locations."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = "; ".join(ln.rstrip(".") for ln in lines if not re.match(r"^ERROR \d+ in ", ln)) or "; ".join(lines)
    return text or type(e).__name__


def _has_sip(header: fits.Header) -> bool:
    return any(k in header for k in ("A_ORDER", "B_ORDER"))


def _declared_distortion(header: fits.Header) -> bool:
    """True when astropy's removal of a second distortion follows the header's own declaration:
    CTYPE ends in -SIP or -TPV, or is pre-2012 SCAMP (-TAN with PV cards and no SIP cards)."""
    ctypes = [str(header.get(f"CTYPE{i}", "")).strip().upper() for i in (1, 2)]
    if all(c.endswith(("-SIP", "-TPV")) for c in ctypes):
        return True
    return all(c.endswith("-TAN") for c in ctypes) and not _has_sip(header)


def _wcs_repairs(caught, header: fits.Header) -> list[str]:
    """What astropy had to repair in ``header``'s WCS, from the FITSFixedWarnings it raised."""
    from astropy.wcs import FITSFixedWarning

    problems = []
    for w in caught:
        if not issubclass(w.category, FITSFixedWarning):
            continue  # io.fits VerifyWarnings repeat what FITSFixedWarning says about the card
        text = str(w.message).strip()
        m = _FIX_MESSAGE.match(text)
        if m:
            if m.group(1) not in _HARMLESS_FIXES:
                problems.append(f"astropy's {m.group(1)} would change the WCS ({m.group(2)})")
            continue
        if text.startswith("Removed redundant"):
            if not _declared_distortion(header):
                problems.append("both SIP (A_*/B_*) and SCAMP PV distortion cards under CTYPE -TAN: astropy "
                                "would drop the SIP; keep one and name it in CTYPE (-SIP or -TPV)")
            continue
        card, _, why = text.partition("\n")
        card = " ".join(card.split())
        problems.append(f"card {card} is unusable ({why.strip().rstrip('.') or 'rejected'}): astropy would drop it")
    return problems


def _untaken_cards(header: fits.Header, wcs: WCS) -> list[str]:
    """Mapping cards (CRPIX, CRVAL, CD, PV of the two celestial axes) whose number the WCS did not
    take as written (e.g. a CD card beside a PC matrix, which wcslib ignores without a word)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = wcs.to_header(relax=True)
    sip_wins = all(str(header.get(f"CTYPE{i}", "")).strip().upper().endswith("-SIP") for i in (1, 2))
    matrix = wcs.pixel_scale_matrix
    problems = []
    for key in header:
        if not _MAPPING_KEY.match(key):
            continue
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # a non-number is reported by _wcs_repairs
        if key.startswith("CD"):
            got = matrix[int(key[2]) - 1, int(key[4]) - 1]
        elif key.startswith("PV"):
            if sip_wins:
                continue  # SCAMP PV beside a declared SIP: the header says which one applies
            got = out.get(key, 0.0)
        else:
            got = out.get(key)
        if got is None or not np.isclose(float(got), float(value), rtol=1e-9, atol=0.0):
            if key.startswith("CRVAL1") and got is not None and np.isclose(float(got) % 360.0, float(value) % 360.0,
                                                                           rtol=1e-12, atol=1e-12):
                continue
            problems.append(f"card {key} = {value!r} is not what the WCS uses ({got!r})")
    return problems


def celestial_wcs(header: fits.Header, shape: tuple[int, int], *, path: str | None = None) -> WCS:
    """The celestial WCS of ``header``, checked to map the image centre to finite (RA, Dec).

    Nothing is repaired silently: a WCS card astropy cannot parse (it would drop it: one bad
    character in a CD or TPV ``PV`` card moves the WCS by pixels), a mapping card (CRPIX, CRVAL,
    CD, PV) that the WCS built does not use as written, or a fix of astropy's that changes the
    mapping is an :class:`InputError` naming the file and the card. Fixes that only restate the
    header pass: ``datfix`` (MJD-OBS from DATE-OBS), ``unitfix``, ``obsfix``, ``spcfix``,
    ``celfix``; so does dropping a second distortion when CTYPE names the one that applies
    (``-SIP``, ``-TPV``, or pre-2012 SCAMP: ``-TAN`` with PV cards and no SIP cards).

    Raises
    ------
    InputError
        If the header has no celestial WCS, a card astropy had to repair or drop, or a WCS that
        cannot be evaluated (e.g. a singular CD matrix); one line naming the file.
    """
    fix = (
        "the image needs an astrometric solution (CTYPE1/2 = 'RA---TAN'/'DEC--TAN' or TPV/SIP, "
        "CRVAL1/2, CRPIX1/2, CD1_1..CD2_2); solve it first (e.g. astrometry.net or SCAMP) and "
        "write the WCS into the header"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wcs = WCS(header, naxis=2)
        except Exception as e:  # astropy raises many types for broken WCS cards
            raise InputError(f"has an invalid WCS ({_one_line(e)}); {fix}", path=path) from None
    problems = _wcs_repairs(caught, header)
    if problems:
        raise InputError(f"WCS {'; '.join(problems)}; the WCS would silently move: correct the header "
                         "(or re-solve the astrometry)", path=path)
    if not wcs.has_celestial or wcs.naxis != 2:
        raise InputError(f"has no celestial WCS (CTYPE = {list(wcs.wcs.ctype)}); {fix}", path=path)
    problems = _untaken_cards(header, wcs)
    if problems:
        raise InputError(f"WCS {'; '.join(problems)}: the header is ambiguous (e.g. CD beside PC); keep one "
                         "description of the mapping", path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ny, nx = shape
            world = wcs.all_pix2world([[(nx - 1) / 2.0, (ny - 1) / 2.0]], 0)
        except Exception as e:
            raise InputError(f"has a WCS that cannot be evaluated ({_one_line(e)}); {fix}", path=path) from None
    if not np.all(np.isfinite(world)):
        raise InputError(f"has a WCS that maps the image centre to non-finite coordinates; {fix}", path=path)
    return wcs


def header_float(header, key: str, *, path: str | None = None, default: float | None = None,
                 fix: str | None = None) -> float:
    """A finite number from ``header[key]``: the one parser of numeric header values.

    Returns ``default`` when the key is absent and a default is given. ``fix`` (what the user
    should do) ends every message.

    Raises
    ------
    InputError
        The key is missing (and no default), not a number, or not finite; the message names the
        file and the key.
    """
    if header is None or key not in header:
        if default is not None:
            return float(default)
        raise InputError(f"header has no {key}; {fix or 'add it (see nightsift.engine.io.fits.read_raw)'}", path=path)
    tail = f"; {fix}" if fix else ""
    try:
        value = float(header[key])
    except (TypeError, ValueError):
        raise InputError(f"header {key} = {header[key]!r} is not a number{tail}", path=path) from None
    if not np.isfinite(value):
        raise InputError(f"header {key} = {header[key]!r} is not finite{tail}", path=path)
    return value


def _optional_float(header, keys, path: str | None) -> float | None:
    """The first of ``keys`` present in ``header`` (:func:`header_float`), ``None`` when none is."""
    for key in keys:
        if header is not None and key in header:
            return header_float(header, key, path=path)
    return None


def header_zero_point(header, *, path: str | None = None) -> float | None:
    """The photometric zero point (MAGZP / MAGZPT / MAGZERO, mag giving 1 e-/s) of ``header``,
    as a float; ``None`` when none is present.

    Raises
    ------
    InputError
        A present key whose value is not a finite number (naming the file and the key): a broken
        zero point must not silently become "no zero point".
    """
    from ..records import ZERO_POINT_KEYS

    return _optional_float(header, ZERO_POINT_KEYS, path)


def header_exptime(header, *, path: str | None = None) -> float | None:
    """``EXPTIME`` (s) of ``header`` as a float; ``None`` when absent (InputError when broken, as
    :func:`header_zero_point`)."""
    return _optional_float(header, ("EXPTIME",), path)


def header_photometry(header, *, path: str | None = None) -> tuple[float, float] | None:
    """``(zero point, divisor)`` of an image: what turns its fluxes into magnitudes,
    ``m = zp - 2.5 log10(flux / divisor)``.

    The divisor is ``EXPTIME`` for an image of counts (e-, ADU, no or an unknown ``BUNIT``: every
    e- image, as always) and 1 for a count-rate or flux-density image (``BUNIT`` electron/s,
    MJy/sr, nJy, ...: :func:`~nightsift.engine.io.units.photometry_divisor`), whose zero point
    (``MAGZP``, or the one :func:`read_exposure` derived) is the magnitude of 1 unit summed.
    ``None`` when the zero point is absent, or EXPTIME is needed and absent or not positive: then
    no magnitude can be made (the callers give NaN / null, never a default zero point). Broken
    values raise :class:`InputError` (:func:`header_float`).
    """
    zp = header_zero_point(header, path=path)
    if zp is None:
        return None
    divisor = photometry_divisor(header, header_exptime(header, path=path))
    if divisor is None:
        return None
    return zp, divisor


def _positive_key(header: fits.Header, key: str, path: str, fix: str, *, allow_zero: bool = False) -> float:
    """A required positive (``allow_zero``: non-negative) number (:func:`header_float`)."""
    value = header_float(header, key, path=path, fix=fix)
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"header {key} = {value} is not {'>= 0' if allow_zero else '> 0'}; {fix}", path=path)
    return value


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def read_raw(path, *, hdu: int | str | None = None) -> RawFrame:
    """Read one raw CCD frame (ADU) and check it is usable.

    Parameters
    ----------
    path : str or Path
        FITS file. The image is ``hdu`` if given, else the HDU named ``IMAGE``/``SCI``, else the
        first 2-D image HDU. In a multi-extension file the primary header's cards that the
        image header lacks (EXPTIME, MJD-OBS, FILTER, ...) are merged in.
    hdu : int or str, keyword-only, optional
        Index or EXTNAME of the CCD to read.

    Returns
    -------
    RawFrame
        ``data`` (ny, nx) float32 ADU, the merged header, ``path``.

    Raises
    ------
    InputError
        Missing/corrupt/truncated file, no 2-D image, all-NaN or constant data, no celestial WCS,
        ``GAIN`` / ``SATURATE`` / ``EXPTIME`` missing or invalid.
    """
    spath = str(path)
    header, data, _ = _load(path, hdu=hdu)
    data = np.asarray(data, dtype=np.float32)
    _check_pixels(data, spath)
    celestial_wcs(header, data.shape, path=spath)
    _positive_key(header, "GAIN", spath, "add GAIN (e-/ADU) to the header (from the instrument's gain table)")
    _positive_key(header, "SATURATE", spath, "add SATURATE (ADU) to the header (the full-well/ADC limit)")
    _positive_key(header, "EXPTIME", spath, "add EXPTIME (s) to the header", allow_zero=True)
    return RawFrame(data=data, header=header, path=spath)


@dataclass(frozen=True)
class _Units:
    """How :func:`read_exposure` takes an image's pixels (module docstring, "Units").

    ``bunit``: BUNIT as written (``''`` when absent); ``kind``: :func:`~.units.unit_kind`;
    ``scale``: file unit -> the exposure's unit (``GAIN`` for counts made e-, else 1);
    ``electrons``: the exposure is in e-; ``gain``: e- per exposure unit, for the source noise
    of an estimated variance (1 for e-; NaN when a noise map is given)."""

    bunit: str
    kind: str
    scale: float
    electrons: bool
    gain: float

    @property
    def label(self) -> str:
        """The unit of the file's pixels, for messages."""
        return "e-" if self.kind == "electron" else ("ADU" if self.electrons else self.bunit or "ADU")


def _no_noise_error(bunit: str, path: str) -> InputError:
    return InputError(
        f"the image is in {bunit or 'ADU (no BUNIT)'} with no GAIN and no noise map: add a VARIANCE, ERR or WHT "
        "extension, pass a noise file (--sci-noise/--ref-noise, read_exposure(noise=)), or set GAIN (e- per "
        "image unit); set BUNIT = 'electron' if the data already are in e-",
        path=path,
    )


def _exposure_units(header: fits.Header, path: str, has_noise: bool) -> _Units:
    """The :class:`_Units` of an image: e- stay e-; counts (ADU, no BUNIT) with ``GAIN`` become e-
    (as nightsift always did, noise map or not); a rate or flux image with a noise map, or counts
    with a noise map and no ``GAIN``, stay in their unit; without a noise map ``GAIN`` (e- per unit)
    is needed to estimate the noise.

    Raises
    ------
    InputError
        No GAIN and no noise map; a GAIN that is not a positive number; an unknown BUNIT with a
        noise map (nightsift cannot tell what its zero point or saturation level mean).
    """
    bunit = str(header.get("BUNIT", "")).strip()
    kind = unit_kind(bunit)
    if kind == "electron":
        return _Units(bunit, kind, 1.0, True, 1.0)
    has_gain = "GAIN" in header
    if kind == "unknown" and has_noise:
        raise InputError(f"BUNIT = {bunit!r} is not a unit nightsift knows; set BUNIT to one of electron, adu, "
                         "electron/s, counts/s, Jy, nJy, MJy/sr (or convert the image)", path=path)
    if not has_gain and not has_noise:
        raise _no_noise_error(bunit, path)
    if kind in ("rate", "flux") or not has_gain:
        if has_noise:
            return _Units(bunit, kind, 1.0, False, float("nan"))
        gain = _positive_key(header, "GAIN", path, f"GAIN is e- per image unit ({bunit}), used to estimate the "
                             "noise of an image without a noise map; correct it or give a noise map")
        return _Units(bunit, kind, 1.0, False, gain)
    gain = _positive_key(
        header,
        "GAIN",
        path,
        f"the image is in ADU (BUNIT = {bunit or 'not set'!r}) so GAIN (e-/ADU) is needed to convert "
        "it to electrons; add GAIN, or set BUNIT = 'electron' if the data already are in e-",
    )
    return _Units(bunit, kind, gain, True, 1.0)


def estimate_variance(image: np.ndarray, valid: np.ndarray | None = None, *, mesh: int = 64,
                      gain: float = 1.0) -> np.ndarray:
    """Per-pixel variance (e-^2) of a calibrated image (e-) that came without one.

    ``variance = sigma_bkg(x, y)**2 + max(image - bkg(x, y), 0) / gain``: the first term is the
    *empirical* background variance (sep's sigma-clipped background RMS map in meshes of
    ``mesh`` px, which measures sky Poisson + read noise + whatever the reduction added, and
    stays right for sky-subtracted images whose sky photons are no longer in the pixel values);
    the second is the Poisson variance of the sources above the background, which in electrons
    is the electron count itself (``gain = 1``; an image in other units passes its e- per unit,
    hence "GAIN-equivalent"). For a coadd the source term is exact only if the coadd is a sum in
    electrons, or ``gain`` is its effective gain (e.g. ``GAIN * NCOMBINE`` for a mean of frames).

    Parameters
    ----------
    image : ndarray (ny, nx) float, e- (or any unit with ``gain`` its e- per unit)
    valid : ndarray (ny, nx) bool, optional
        Pixels to use for the background (default: finite pixels).
    mesh : int
        Background mesh size (pixels); shrunk for small images.
    gain : float, keyword-only
        e- per unit of ``image`` (1: the image is in e-).

    Returns
    -------
    ndarray (ny, nx) float32, e-^2 (the image's unit squared)
    """
    import sep

    img = np.ascontiguousarray(image, dtype=np.float64)
    ok = np.isfinite(img) if valid is None else (np.asarray(valid, bool) & np.isfinite(img))
    filled = np.where(ok, img, np.median(img[ok]))
    ny, nx = img.shape
    bw, bh = min(mesh, max(nx // 2, 8)), min(mesh, max(ny // 2, 8))
    bkg = sep.Background(np.ascontiguousarray(filled), mask=~ok, bw=bw, bh=bh, fw=3, fh=3)
    back = bkg.back()
    rms = bkg.rms()
    source = np.clip(filled - back, 0.0, None)
    var = rms.astype(np.float64) ** 2 + (source if gain == 1.0 else source / gain)
    return var.astype(np.float32)


#: Rubin/LSST (afw) mask planes, named by the ``MP_<NAME> = bit`` cards of their MASK header, that
#: mean a :class:`MaskBits` flag (DETECTED, INTRP, SUSPECT, ... carry no such meaning: left out)
_AFW_PLANES = {"BAD": MaskBits.BAD, "SAT": MaskBits.SAT, "NO_DATA": MaskBits.NO_DATA, "CR": MaskBits.CR,
               "EDGE": MaskBits.EDGE}


def _afw_mask(m: np.ndarray, mheader) -> np.ndarray | None:
    """A Rubin (afw) mask as :class:`MaskBits`, from its ``MP_*`` plane cards; ``None`` when the
    header has none (a nightsift mask writes ``MB_*`` cards)."""
    planes = {k[3:]: v for k, v in (mheader or {}).items() if k.startswith("MP_") and isinstance(v, int)}
    if not planes or m.dtype.kind not in "ui":
        return None
    bits = m.astype(np.int64)
    out = np.zeros(m.shape, np.uint16)
    for name, bit in planes.items():
        if name in _AFW_PLANES and 0 <= bit < 63:
            out[((bits >> bit) & 1) == 1] |= np.uint16(_AFW_PLANES[name])
    return out


def _mask_bits(m: np.ndarray, path: str, mheader=None) -> np.ndarray:
    """A MASK extension as uint16 :class:`MaskBits` (a Rubin mask translated by its ``MP_*`` plane
    cards, :func:`_afw_mask`); values that cannot be bit flags are refused (a negative, fractional
    or > 16-bit value: a mask of another convention or a broken file)."""
    where = f"{path}[MASK]"
    afw = _afw_mask(m, mheader)
    if afw is not None:
        return afw
    fix = "MASK must hold nightsift MaskBits (non-negative integers < 65536: BAD=1, SAT=2, NO_DATA=4, ...)"
    if m.dtype.kind == "f":
        if not np.isfinite(m).all() or np.any(m != np.round(m)):
            raise InputError(f"holds non-integer values (float {m.dtype}, e.g. NaN or fractions); {fix}", path=where)
    elif m.dtype.kind not in "ui":
        raise InputError(f"has dtype {m.dtype}, not integer; {fix}", path=where)
    lo, hi = (float(m.min()), float(m.max())) if m.size else (0.0, 0.0)
    if lo < 0 or hi > 0xFFFF:
        raise InputError(f"holds values from {lo:g} to {hi:g}, outside 0..65535; {fix}", path=where)
    return m.astype(np.uint16)


def _saturation_mask(image: np.ndarray, finite: np.ndarray, header: fits.Header, units: _Units, path: str,
                     config) -> np.ndarray | None:
    """``SAT`` pixels of a calibrated image from its header's ``SATURATE`` (in the file's pixel
    units: see the module docstring), grown like the raw frames' saturation; ``None`` without
    SATURATE.

    Raises
    ------
    InputError
        SATURATE not a positive number, or most of the frame at or above it (an overexposed frame,
        or SATURATE in other units than the pixels).
    """
    from nightsift.kernels.morphology import dilate

    if "SATURATE" not in header:
        return None
    level = _positive_key(header, "SATURATE", path, "SATURATE is the saturation level in the units of the "
                          "image's pixels (e- when BUNIT = 'electron', else BUNIT's, ADU without one); correct it or "
                          "remove the card")
    level_e = level * units.scale
    sat = finite & (image >= config.saturation_fraction * level_e)
    frac = float(sat.mean())
    if frac > 0.5:
        raise InputError(
            f"{frac:.0%} of the pixels are at or above {config.saturation_fraction:g} x SATURATE "
            f"({level:g} {units.label}): an overexposed frame, or SATURATE in other units "
            "than the pixels; drop the frame or correct SATURATE",
            path=path,
        )
    return dilate(sat, iterations=config.saturation_grow, structure="square")


def _exposure_mask(image: np.ndarray, finite: np.ndarray, header: fits.Header, mask_ext, units: _Units, path: str,
                   config, mheader=None) -> np.ndarray:
    """The uint16 mask of a calibrated image: its ``MASK`` extension (``None``: none), plus ``SAT``
    from ``SATURATE`` (:func:`_saturation_mask`); a warning when neither can flag saturation."""
    mask = np.zeros(image.shape, dtype=np.uint16)
    if mask_ext is not None:
        check_same_shape(image, mask_ext, (path + "[IMAGE]", path + "[MASK]"))
        mask |= _mask_bits(np.asarray(mask_ext), path, mheader)
    sat = _saturation_mask(image, finite, header, units, path, config)
    if sat is not None:
        mask[sat] |= np.uint16(MaskBits.SAT)
    elif mask_ext is None:
        log.warning("%s: no SATURATE card and no MASK extension: saturated pixels cannot be flagged "
                    "(add SATURATE in the pixels' units, or a MASK with the SAT bit)", path)
    return mask


@dataclass(frozen=True)
class _Noise:
    """A noise map as found: ``data`` (file units), ``kind`` (variance/sigma/ivar), ``where`` (for
    messages: ``file[EXT]``), ``label`` (for the ``NSNOISE`` card)."""

    data: np.ndarray
    kind: str
    where: str
    label: str


def _noise_in_file(extra: dict, path: str, noise_kind: str | None) -> _Noise | None:
    """The image file's own noise extension (the first of :data:`~.units.NOISE_EXTENSIONS`)."""
    for name in NOISE_EXTENSIONS:
        if name in extra:
            kind = noise_kind_of(name, None, None, explicit=noise_kind, path=path)
            return _Noise(np.asarray(extra[name]), kind, f"{path}[{name}]", f"{name} extension ({kind})")
    return None


def _noise_file(noise, image_bunit: str, noise_kind: str | None) -> _Noise:
    """A separate noise file: its noise extension if it has one, else its image HDU; the kind from
    ``noise_kind``, the extension's name, or its BUNIT against the image's (:func:`~.units.noise_kind_of`)."""
    npath = str(noise)
    heads: dict = {}
    nheader, ndata, nextra = _load(noise, extensions=NOISE_EXTENSIONS, ext_headers=heads)
    name = next((n for n in NOISE_EXTENSIONS if n in nextra), None)
    if name is not None:
        ndata, nheader = nextra[name], heads[name]
    extname = name or nheader.get("EXTNAME")
    kind = noise_kind_of(extname, nheader.get("BUNIT"), image_bunit, explicit=noise_kind, path=npath)
    where = f"{npath}[{extname}]" if extname else npath
    return _Noise(np.asarray(ndata), kind, where, f"file {Path(npath).name} ({kind})")


def _exposure_variance(image: np.ndarray, finite: np.ndarray, mask: np.ndarray, noise: _Noise | None, units: _Units,
                       path: str, image_where: str, est_gain: float) -> tuple[np.ndarray, np.ndarray]:
    """``(variance, unusable)`` float64 (the exposure's unit squared) and bool: the noise map as a
    variance (:func:`~.units.noise_to_variance`, times ``scale**2`` for counts made e-), or
    estimated (:func:`estimate_variance` with ``est_gain``) when there is none.

    Raises
    ------
    InputError
        A noise map of another shape (naming both), or with no usable value under a finite pixel.
    """
    if noise is None:
        valid = finite & ((mask & int(MaskBits.NO_DATA)) == 0)
        variance = estimate_variance(image, valid, gain=est_gain).astype(np.float64)
        return variance, ~np.isfinite(variance)
    check_same_shape(image, noise.data, (image_where, noise.where))
    variance, bad_var = noise_to_variance(noise.data, noise.kind)
    variance = variance * units.scale**2
    if np.all(bad_var | ~finite):
        what = {"variance": "finite, non-negative value", "sigma": "finite error > 0",
                "ivar": "finite inverse variance > 0"}[noise.kind]
        raise InputError(f"noise map {noise.where} has no {what} under a finite pixel; rewrite it, or drop it and "
                         "set GAIN to let nightsift estimate the variance", path=path)
    return variance, bad_var


def _coadd_gain(header: fits.Header, units: _Units, path: str, config) -> float:
    """e- per exposure unit for an estimated variance: ``units.gain``, times ``NCOMBINE`` when
    ``calibrate.coadd_gain = "ncombine"`` (a mean of NCOMBINE frames whose GAIN is one frame's)."""
    if config.coadd_gain != "ncombine" or "NCOMBINE" not in header:
        return units.gain
    n = _positive_key(header, "NCOMBINE", path, "NCOMBINE is the number of frames in the coadd; correct it")
    return units.gain * n


def _measured_poisson(image: np.ndarray, variance: np.ndarray, valid: np.ndarray, *, mesh: int = 64,
                      min_pixels: int = 25) -> float:
    """Image units per e- implied by a noise map: the median of ``(V - V_bkg) / (I - I_bkg)`` over
    the pixels of sources more than 20 background sigma above the background (the variance a unit
    of source flux adds: its Poisson noise). 0 when fewer than ``min_pixels`` such pixels exist or
    the map adds nothing on sources (a background-only inverse-variance map)."""
    import sep

    ok = valid & np.isfinite(image) & np.isfinite(variance)
    if ok.sum() < 4 * min_pixels:
        return 0.0
    ny, nx = image.shape
    bw, bh = min(mesh, max(nx // 2, 8)), min(mesh, max(ny // 2, 8))

    def background(a):
        filled = np.ascontiguousarray(np.where(ok, a, np.median(a[ok])), dtype=np.float64)
        return sep.Background(filled, mask=~ok, bw=bw, bh=bh, fw=3, fh=3)

    bi = background(image)
    src = image - bi.back()
    bright = ok & (src > 20.0 * bi.globalrms)
    if bright.sum() < min_pixels:
        return 0.0
    dv = variance - background(variance).back()
    return max(float(np.median(dv[bright] / src[bright])), 0.0)


def _poisson_scale(image, variance, valid, header: fits.Header, units: _Units, noise: _Noise | None,
                   est_gain: float, path: str) -> tuple[float, str] | None:
    """``(image units per e-, where from)`` of an image kept in its own unit (``None`` for e-):
    ``1 / GAIN`` of an estimated variance or of a file that gives GAIN (e- per unit), else what
    its noise map implies (:func:`_measured_poisson`)."""
    if units.electrons:
        return None
    if noise is None:
        return 1.0 / est_gain, "GAIN"
    if "GAIN" in header:
        return 1.0 / _positive_key(header, "GAIN", path, "GAIN is e- per image unit; correct or remove it"), "GAIN"
    return _measured_poisson(image, variance, valid), "noise map"


def _noted_header(header: fits.Header, units: _Units, noise: _Noise | None, n_bad: int, wcs, path: str,
                  poisson: tuple[float, str] | None = None) -> fits.Header:
    """The exposure's header: ``BUNIT`` of its pixels, the original unit (``NSBUNIT``), the noise
    source (``NSNOISE``) and the pixels its unusable values masked (``NSBADNOI``), and a zero point
    derived in the image's unit (:func:`~.units.zero_point_of`) when it has none (``NSZPSRC``)."""
    from ..records import ZERO_POINT_KEYS

    header = header.copy()
    if "NSBUNIT" not in header:
        header["NSBUNIT"] = (units.bunit or "none", "pixel unit of the file as given (nightsift)")
    if units.electrons:
        header["BUNIT"] = ("electron", "image in e-, variance in e-^2 (nightsift)")
    elif not units.bunit:
        header["BUNIT"] = ("adu", "no BUNIT in the file: counts, kept as they are (nightsift)")
    if noise is not None:
        header["NSNOISE"] = (noise.label, "noise map the variance came from (nightsift)")
        header["NSBADNOI"] = (n_bad, "pixels masked NO_DATA: unusable noise value")
    elif "NSNOISE" not in header:
        header["NSNOISE"] = ("estimated", "variance estimated from the image (nightsift)")
    if poisson is not None:
        header["NSPOISS"] = (float(f"{poisson[0]:.6e}"), "image unit per e-: source Poisson terms (nightsift)")
        header["NSPOISRC"] = (poisson[1], "NSPOISS from this")
    if units.scale == 1.0 and not any(k in header for k in ZERO_POINT_KEYS):
        zp = zero_point_of(header, wcs=wcs, path=path)
        if zp is not None:
            header["MAGZP"] = (round(zp[0], 6), "AB mag of 1 pixel unit summed (/EXPTIME for counts)")
            header["NSZPSRC"] = (zp[1], "MAGZP derived by nightsift from this")
    return header


def read_exposure(path, *, hdu: int | str | None = None, config=None, noise=None,
                  noise_kind: str | None = None) -> Exposure:
    """Read a calibrated image (e.g. a reference) with its noise map and mask.

    Parameters
    ----------
    path : str or Path
        FITS file: the image HDU (``IMAGE``/``SCI``, or ``hdu``, or the first 2-D image that is
        not a noise map or mask) and, optionally, a noise extension -- ``VARIANCE``/``VAR``
        (variance), ``ERR``/``ERROR``/``SIGMA``/``RMS``/``NOISE`` (1-sigma error),
        ``IVAR``/``IVM``/``WHT``/``WEIGHT``/``WGT`` (absolute inverse variance), preferred in
        that order, in the image's unit (squared, inverse squared) -- and ``MASK`` (integer
        :class:`MaskBits`, or a Rubin mask with ``MP_*`` plane cards), in any HDU order.
    hdu : int or str, keyword-only, optional
        Index or EXTNAME of the image HDU.
    config : CalibrateConfig, keyword-only, optional
        ``saturation_fraction`` and ``saturation_grow`` for the ``SAT`` pixels flagged from
        ``SATURATE``, ``coadd_gain`` (default: :class:`~nightsift.engine.config.CalibrateConfig`'s).
    noise : str or Path, keyword-only, optional
        A separate noise file (its noise extension, else its image HDU), used instead of ``path``'s.
    noise_kind : str, keyword-only, optional
        ``"variance"``, ``"sigma"`` (``"err"``) or ``"ivar"`` (``"wht"``): when EXTNAME and BUNIT
        do not say it.

    Returns
    -------
    Exposure
        ``image`` (ny, nx) float32, ``variance`` float32 (its unit squared), ``mask`` uint16,
        ``wcs``, ``header``, ``path``; in e- (e- images, counts with ``GAIN``: as always) or the
        file's own unit (module docstring, "Units"). The header notes the file's unit
        (``NSBUNIT``), the noise source (``NSNOISE``), the pixels masked for unusable noise
        (``NSBADNOI``), a zero point derived in its unit when it has none (``NSZPSRC``) and its
        units per e- (``NSPOISS``, :func:`_poisson_scale`). No noise map: the variance is
        estimated (:func:`estimate_variance`). Non-finite pixels and unusable noise values (not
        finite, a negative variance, an error or inverse variance <= 0) are flagged ``NO_DATA``
        and filled with the median image and variance (FFTs see no NaN); ``SAT`` as above.

    Raises
    ------
    InputError
        As :func:`read_raw` but GAIN is needed only without a noise map (or BUNIT e-); plus a noise
        map or mask of another shape (naming both), a noise map with no usable value or of a kind
        that cannot be told, an unknown BUNIT with a noise map, a bad SATURATE or one most of the
        frame reaches.
    """
    if config is None:
        from ..config import CalibrateConfig

        config = CalibrateConfig()
    spath = str(path)
    heads: dict = {}
    header, data, extra = _load(path, hdu=hdu, extensions=NOISE_EXTENSIONS + ("MASK",), ext_headers=heads)
    data = np.asarray(data, dtype=np.float64)
    _check_pixels(data, spath)
    wcs = celestial_wcs(header, data.shape, path=spath)
    found = (_noise_file(noise, str(header.get("BUNIT", "")).strip(), noise_kind) if noise is not None
             else _noise_in_file(extra, spath, noise_kind))
    units = _exposure_units(header, spath, found is not None)
    image = data * units.scale
    finite = np.isfinite(image)

    mask = _exposure_mask(image, finite, header, extra.get("MASK"), units, spath, config, heads.get("MASK"))
    est_gain = _coadd_gain(header, units, spath, config)
    variance, bad_var = _exposure_variance(image, finite, mask, found, units, spath,
                                           f"{spath}[{header.get('EXTNAME', 'IMAGE')}]", est_gain)
    poisson = _poisson_scale(image, variance, (mask & UNUSABLE) == 0, header, units, found, est_gain, spath)
    nodata = ~finite | bad_var
    if nodata.any():
        mask[nodata] |= np.uint16(MaskBits.NO_DATA)
        fill_img = np.median(image[finite])
        image = np.where(finite, image, fill_img)
        variance = np.where(bad_var, np.median(variance[~bad_var]), variance)
    return Exposure(
        image=image.astype(np.float32),
        variance=variance.astype(np.float32),
        mask=mask,
        wcs=wcs,
        header=_noted_header(header, units, found, int(bad_var.sum()), wcs, spath, poisson),
        path=spath,
    )


def input_qa(header, prefix: str) -> dict:
    """QA entries of an exposure's input as :func:`read_exposure` noted them in its header:
    ``<prefix>unit`` (the file's BUNIT), ``<prefix>noise`` (where the variance came from),
    ``<prefix>noise_masked`` (pixels masked for an unusable noise value); absent cards are left out."""
    out = {}
    for key, card in (("unit", "NSBUNIT"), ("noise", "NSNOISE"), ("noise_masked", "NSBADNOI"),
                      ("zp_source", "NSZPSRC"), ("poisson_scale", "NSPOISS")):
        if header is not None and card in header:
            out[prefix + key] = header[card]
    return out


def _clean_header(header: fits.Header | None, *, strip_wcs: bool = False) -> fits.Header:
    out = fits.Header()
    if header is None:
        return out
    for card in header.cards:
        key = card.keyword
        if key in _STRUCTURAL or (strip_wcs and _WCS_KEY.match(key)):
            continue
        out.append(card)
    return out


def _wcs_header(wcs: WCS) -> fits.Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy notes non-standard (TPV/SIP) keywords: informational
        return wcs.to_header(relax=True)


def replace_wcs(header: fits.Header | None, wcs: WCS) -> fits.Header:
    """A copy of ``header`` without structural or WCS cards, plus the cards of ``wcs``.

    Used when an image moves to another pixel grid (an aligned reference keeps its metadata
    but takes the science WCS) and when writing, so old and new WCS keywords never mix.
    """
    head = _clean_header(header, strip_wcs=True)
    head.extend(_wcs_header(wcs), update=True)
    return head


def _kept_unit(header) -> str | None:
    """The ``BUNIT`` of an exposure :func:`read_exposure` kept in its file's unit (it wrote
    ``NSBUNIT``, and BUNIT is not e-), ``None`` for an e- exposure."""
    if header is None or "NSBUNIT" not in header or "BUNIT" not in header:
        return None
    unit = str(header["BUNIT"]).strip()
    return None if unit_kind(unit) == "electron" else unit


def pixel_unit(header) -> str:
    """The unit of an exposure's pixels as :func:`read_exposure` left them: ``"e-"``, or the file's
    own flux unit when it was kept (a flux-unit image with a noise map)."""
    return _kept_unit(header) or "e-"


def write_exposure(path, exposure: Exposure, *, overwrite: bool = True) -> None:
    """Write an :class:`Exposure` as a multi-extension FITS file (IMAGE, VARIANCE, MASK).

    The WCS cards of ``exposure.header`` are replaced by ``exposure.wcs`` (so an aligned
    reference carries the science grid's WCS); every other card is kept in the ``IMAGE`` header,
    with ``BUNIT = 'electron'``. :func:`read_exposure` reads the file back unchanged
    (image, variance in float32, mask in uint16).

    Parameters
    ----------
    path : str or Path
    exposure : Exposure
    overwrite : bool, keyword-only
        Replace an existing file (default True).
    """
    whdr = _wcs_header(exposure.wcs)
    head = replace_wcs(exposure.header, exposure.wcs)
    vhead = whdr.copy()
    unit = _kept_unit(exposure.header)
    if unit is None:
        head["BUNIT"] = ("electron", "image in e-, variance in e-^2 (nightsift)")
        vhead["BUNIT"] = ("electron2", "variance of IMAGE (e-^2)")
    else:
        head["BUNIT"] = (unit, "image in the file's unit, variance in its square (nightsift)")
        vhead["COMMENT"] = f"variance of IMAGE, ({unit})^2"
    mhead = whdr.copy()
    for bit in MaskBits:
        mhead[f"MB_{bit.name}"[:8]] = (int(bit), f"mask bit {bit.name}")
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(np.asarray(exposure.image, dtype=np.float32), header=head, name="IMAGE"),
            fits.ImageHDU(np.asarray(exposure.variance, dtype=np.float32), header=vhead, name="VARIANCE"),
            fits.ImageHDU(np.asarray(exposure.mask, dtype=np.uint16), header=mhead, name="MASK"),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long HIERARCH-free cards are fine
        hdul.writeto(Path(path), overwrite=overwrite)


def write_image(path, array, header: fits.Header | None = None, *, overwrite: bool = True) -> None:
    """Write one 2-D array (e.g. a difference image or S_corr map) as a primary-HDU FITS file.

    Parameters
    ----------
    path : str or Path
    array : ndarray (ny, nx)
        Written with its own dtype (cupy arrays are moved to the host).
    header : astropy.io.fits.Header, optional
        Cards to carry (structural cards are dropped; astropy writes its own).
    overwrite : bool, keyword-only
    """
    from ...kernels import to_numpy

    arr = to_numpy(array)
    if arr.ndim != 2:
        raise ValueError(f"write_image: expected a 2-D array, got shape {arr.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        fits.PrimaryHDU(arr, header=_clean_header(header)).writeto(Path(path), overwrite=overwrite)


def check_same_shape(a, b, paths: Sequence[str | None] = (None, None)) -> None:
    """Raise :class:`InputError` if two arrays (or shapes) differ in shape.

    Parameters
    ----------
    a, b : ndarray or tuple
        Arrays (anything with ``.shape``) or shapes.
    paths : (str or None, str or None)
        Where ``a`` and ``b`` came from, for the message.
    """
    sa = tuple(a.shape) if hasattr(a, "shape") else tuple(a)
    sb = tuple(b.shape) if hasattr(b, "shape") else tuple(b)
    if sa != sb:
        pa, pb = (list(paths) + [None, None])[:2]
        raise InputError(
            f"shape {sa} does not match shape {sb} of {pb or 'the other input'}; both must be the "
            "same CCD (check that the files belong together: same detector, same trimming)",
            path=pa,
        )
