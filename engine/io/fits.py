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
images are in electrons: :func:`read_exposure` multiplies by ``GAIN`` unless the header says
``BUNIT = 'electron'`` (which :func:`write_exposure` always writes).

``SATURATE`` is the level of the file's own pixel values at which the detector saturated (the
SExtractor/SWarp convention): ADU in an ADU file (a raw frame: bias included; a calibrated ADU
image: as its pipeline left it), so ``SATURATE * GAIN`` e- once :func:`read_exposure` has
scaled the image; e- in a ``BUNIT = 'electron'`` file (the simulator's references and science
exposures write it so, with ``GAIN = 1``). :func:`read_exposure` flags ``MaskBits.SAT`` where the
image reaches ``saturation_fraction * SATURATE`` (grown by ``saturation_grow`` px, as
:func:`~nightsift.engine.stages.calibrate.calibrate_frames` does for raw frames), on top of any
``MASK`` extension; a file without ``SATURATE`` relies on its ``MASK``. A frame calibrated by
nightsift has no single e- saturation level (bias, dark and flat differ per pixel), so its
header keeps the raw level as ``SATURADU`` and drops ``SATURATE``; its ``MASK`` carries ``SAT``
per pixel. Writing what :func:`read_exposure` returned and reading it again changes nothing.

File layout written by :func:`write_exposure`: an empty primary HDU, then ``IMAGE`` (float32,
e-, the full metadata header plus the WCS), ``VARIANCE`` (float32, e-^2, WCS), ``MASK``
(uint16 :class:`~nightsift.engine.records.MaskBits`, WCS, one ``MB_<NAME>`` card per bit).
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import InputError
from ..records import Exposure, MaskBits, RawFrame

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
_ELECTRON_UNITS = {"electron", "electrons", "e-", "e"}
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


def _load(path, *, hdu=None, extensions: Sequence[str] = ()):
    """Open ``path`` and return ``(header, data, {extname: data})``, raising InputError on any
    unreadable, truncated or image-less file."""
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
    """``(zero point, EXPTIME)`` of an e- image: what turns its fluxes into magnitudes,
    ``m = zp - 2.5 log10(flux / EXPTIME)``.

    ``None`` when either card is absent or EXPTIME is not positive: then no magnitude can be
    made (the callers give NaN / null, never a default zero point). Broken values raise
    :class:`InputError` (:func:`header_float`).
    """
    zp, exptime = header_zero_point(header, path=path), header_exptime(header, path=path)
    if zp is None or exptime is None or exptime <= 0:
        return None
    return zp, exptime


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


def _electron_scale(header: fits.Header, path: str) -> float:
    """Factor from file units to electrons: 1 if ``BUNIT`` is electrons, else ``GAIN``."""
    bunit = str(header.get("BUNIT", "")).strip().lower()
    if bunit in _ELECTRON_UNITS:
        return 1.0
    return _positive_key(
        header,
        "GAIN",
        path,
        f"the image is in ADU (BUNIT = {bunit or 'not set'!r}) so GAIN (e-/ADU) is needed to convert "
        "it to electrons; add GAIN, or set BUNIT = 'electron' if the data already are in e-",
    )


def estimate_variance(image: np.ndarray, valid: np.ndarray | None = None, *, mesh: int = 64) -> np.ndarray:
    """Per-pixel variance (e-^2) of a calibrated image (e-) that came without one.

    ``variance = sigma_bkg(x, y)**2 + max(image - bkg(x, y), 0)``: the first term is the
    *empirical* background variance (sep's sigma-clipped background RMS map in meshes of
    ``mesh`` px, which measures sky Poisson + read noise + whatever the reduction added, and
    stays right for sky-subtracted images whose sky photons are no longer in the pixel values);
    the second is the Poisson variance of the sources above the background, which in electrons
    is the electron count itself (in ADU it would be ``(image - bkg) / GAIN``, hence "GAIN-
    equivalent"). For a coadd the source term is exact only if the coadd is a sum in electrons.

    Parameters
    ----------
    image : ndarray (ny, nx) float, e-
    valid : ndarray (ny, nx) bool, optional
        Pixels to use for the background (default: finite pixels).
    mesh : int
        Background mesh size (pixels); shrunk for small images.

    Returns
    -------
    ndarray (ny, nx) float32, e-^2
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
    var = rms.astype(np.float64) ** 2 + np.clip(filled - back, 0.0, None)
    return var.astype(np.float32)


def _mask_bits(m: np.ndarray, path: str) -> np.ndarray:
    """A MASK extension as uint16 :class:`MaskBits`; values that cannot be bit flags are refused
    (a negative, fractional or > 16-bit value: a mask of another convention or a broken file)."""
    where = f"{path}[MASK]"
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


def _saturation_mask(image: np.ndarray, finite: np.ndarray, header: fits.Header, scale: float, path: str,
                     config) -> np.ndarray | None:
    """``SAT`` pixels of a calibrated image (e-) from its header's ``SATURATE`` (see the module
    docstring for its units), grown like the raw frames' saturation; ``None`` without SATURATE.

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
                          "image's pixels (e- when BUNIT = 'electron', else ADU); correct it or remove the card")
    level_e = level * scale
    sat = finite & (image >= config.saturation_fraction * level_e)
    frac = float(sat.mean())
    if frac > 0.5:
        raise InputError(
            f"{frac:.0%} of the pixels are at or above {config.saturation_fraction:g} x SATURATE "
            f"({level:g} {'e-' if scale == 1.0 else 'ADU'}): an overexposed frame, or SATURATE in other units "
            "than the pixels; drop the frame or correct SATURATE",
            path=path,
        )
    return dilate(sat, iterations=config.saturation_grow, structure="square")


def _exposure_mask(image: np.ndarray, finite: np.ndarray, header: fits.Header, mask_ext, scale: float, path: str,
                   config) -> np.ndarray:
    """The uint16 mask of a calibrated image: its ``MASK`` extension (``None``: none), plus ``SAT``
    from ``SATURATE`` (:func:`_saturation_mask`); a warning when neither can flag saturation."""
    mask = np.zeros(image.shape, dtype=np.uint16)
    if mask_ext is not None:
        check_same_shape(image, mask_ext, (path + "[IMAGE]", path + "[MASK]"))
        mask |= _mask_bits(np.asarray(mask_ext), path)
    sat = _saturation_mask(image, finite, header, scale, path, config)
    if sat is not None:
        mask[sat] |= np.uint16(MaskBits.SAT)
    elif mask_ext is None:
        log.warning("%s: no SATURATE card and no MASK extension: saturated pixels cannot be flagged "
                    "(add SATURATE in the pixels' units, or a MASK with the SAT bit)", path)
    return mask


def _exposure_variance(image: np.ndarray, finite: np.ndarray, mask: np.ndarray, var_ext, scale: float,
                       path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(variance, unusable)`` float64 e-^2 and bool: the ``VARIANCE`` extension in e-^2
    (``None``: estimated, :func:`estimate_variance`); non-finite or negative values are unusable.

    Raises
    ------
    InputError
        A VARIANCE extension of another shape, or with no usable value under a finite pixel.
    """
    if var_ext is None:
        variance = estimate_variance(image, finite & ((mask & int(MaskBits.NO_DATA)) == 0)).astype(np.float64)
        return variance, ~np.isfinite(variance)
    check_same_shape(image, var_ext, (path + "[IMAGE]", path + "[VARIANCE]"))
    variance = np.asarray(var_ext, dtype=np.float64) * scale**2
    bad_var = ~np.isfinite(variance) | (variance < 0)
    if np.all(bad_var | ~finite):
        raise InputError(
            "VARIANCE extension has no finite, non-negative value; rewrite it or drop the "
            "extension to let nightsift estimate the variance",
            path=path,
        )
    return variance, bad_var


def read_exposure(path, *, hdu: int | str | None = None, config=None) -> Exposure:
    """Read a calibrated image (e.g. a reference) with its variance and mask.

    Parameters
    ----------
    path : str or Path
        FITS file: the image HDU (``IMAGE``/``SCI``, or ``hdu``, or the first 2-D image) and,
        optionally, extensions named ``VARIANCE`` (e-^2, or ADU^2 if the image is in ADU) and
        ``MASK`` (integer :class:`MaskBits`).
    hdu : int or str, keyword-only, optional
        Index or EXTNAME of the image HDU.
    config : CalibrateConfig, keyword-only, optional
        ``saturation_fraction`` and ``saturation_grow`` for the ``SAT`` pixels flagged from
        ``SATURATE`` (default: :class:`~nightsift.engine.config.CalibrateConfig`'s).

    Returns
    -------
    Exposure
        ``image`` (ny, nx) float32 e-, ``variance`` float32 e-^2, ``mask`` uint16, ``wcs``,
        ``header`` (with ``BUNIT = 'electron'``), ``path``. Without a ``VARIANCE`` extension the
        variance is estimated with :func:`estimate_variance`. Non-finite image pixels (and
        non-finite or negative variances) are flagged ``NO_DATA`` and filled with the local
        background (image) and the median variance, so FFT-based stages see no NaN. Pixels at
        or above ``saturation_fraction * SATURATE`` are flagged ``SAT`` (module docstring: units).

    Raises
    ------
    InputError
        As :func:`read_raw` (no GAIN needed when ``BUNIT = 'electron'``), plus extensions whose
        shape differs from the image, a SATURATE that is not a positive number, and a frame
        mostly at or above SATURATE.
    """
    if config is None:
        from ..config import CalibrateConfig

        config = CalibrateConfig()
    spath = str(path)
    header, data, extra = _load(path, hdu=hdu, extensions=("VARIANCE", "MASK"))
    data = np.asarray(data, dtype=np.float64)
    _check_pixels(data, spath)
    wcs = celestial_wcs(header, data.shape, path=spath)
    scale = _electron_scale(header, spath)
    image = data * scale
    finite = np.isfinite(image)

    mask = _exposure_mask(image, finite, header, extra.get("MASK"), scale, spath, config)
    variance, bad_var = _exposure_variance(image, finite, mask, extra.get("VARIANCE"), scale, spath)
    nodata = ~finite | bad_var
    if nodata.any():
        mask[nodata] |= np.uint16(MaskBits.NO_DATA)
        fill_img = np.median(image[finite])
        image = np.where(finite, image, fill_img)
        variance = np.where(bad_var, np.median(variance[~bad_var]), variance)

    header = header.copy()
    header["BUNIT"] = ("electron", "image in e-, variance in e-^2 (nightsift)")
    return Exposure(
        image=image.astype(np.float32),
        variance=variance.astype(np.float32),
        mask=mask,
        wcs=wcs,
        header=header,
        path=spath,
    )


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
    head["BUNIT"] = ("electron", "image in e-, variance in e-^2 (nightsift)")
    vhead = whdr.copy()
    vhead["BUNIT"] = ("electron2", "variance of IMAGE (e-^2)")
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
