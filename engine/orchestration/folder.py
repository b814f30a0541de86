"""A night from a folder of FITS files: the :class:`~nightsift.engine.orchestration.sources.CCDSource`
of ``nightsift run --input DIR`` (and of a config's ``[input]`` section).

:func:`scan_folder` walks the folder once (recursively), reading headers only, and sorts every CCD
image it finds:

* **science** exposures, raw (ADU, calibrated here with the CCD's master) or calibrated (a ``BUNIT``
  other than ADU/DN/counts, a ``VARIANCE``/``ERR``/``WHT`` extension, or the preset's
  processed-frame mark);
* **bias**, **dark** and **flat** frames, one CCD per file or one per HDU of a multi-extension
  file, combined into each CCD's master (:func:`~nightsift.engine.stages.calibrate.make_master`),
  or calibration **bundles** (``BIAS``/``DARK``/``FLAT`` extensions, as ``nightsift simulate``
  writes them);
* **references**, one per CCD: files under a ``reference`` subfolder, files whose name matches
  ``reference_pattern``, or frames whose type keyword says reference/template/coadd.

Science frames are grouped into visits and CCDs by header keywords (:data:`PRESETS`: DECam, ZTF,
LSST/Rubin conventions, or the ``[input]`` keyword map). A multi-extension raw file (DECam's, with
60+ CCDs) gives one CCD per image HDU. The :class:`FolderPlan` says what was found and what was
ignored, and why; :class:`FolderNight` serves its CCD-visits to any night engine. A CCD-visit
that cannot run (no reference for its CCD, a raw frame without bias or flat frames) is *skipped*
with that reason; a file that cannot be read fails its own CCD-visits with a message naming it.
"""
from __future__ import annotations

import fnmatch
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..config import CalibrateConfig, InputConfig
from ..errors import InputError, SkipCCD
from .sources import CCDFrame, CCDStatic


__all__ = ["PRESETS", "Preset", "FolderFrame", "FolderPlan", "FolderNight", "scan_folder", "split_done"]


@dataclass(frozen=True)
class Preset:
    """Header conventions of a survey: keywords tried in order (the first present wins).

    ``calibrated`` lists ``(keyword, values)`` marks of a processed (calibrated) science frame, and
    ``calibrated_names`` file-name globs of one, on top of the general marks (``BUNIT`` in
    electrons, a noise-map extension); ``reference_names``: file-name globs of references (beside
    ``[input] reference_dir`` / ``reference_pattern``); ``ignored_names``: ``(glob, why)`` of the
    survey's other products that are not CCD images of the night (listed in the plan with why).
    """

    type_keys: tuple[str, ...]
    visit_keys: tuple[str, ...]
    ccd_keys: tuple[str, ...]
    calibrated: tuple[tuple[str, tuple[str, ...]], ...] = ()
    calibrated_names: tuple[str, ...] = ()
    reference_names: tuple[str, ...] = ()
    ignored_names: tuple[tuple[str, str], ...] = ()


#: ZTF's IRSA products beside ``*_sciimg.fits`` that are not CCD images of the night
_ZTF_OTHERS = (
    ("*mskimg.fits*", "ZTF bit-mask image: not read (masks come from SATURATE and the noise)"),
    ("*scimrefdiffimg*", "ZTF's own difference image"),
    ("*diffimgpsf*", "the PSF of ZTF's difference image"),
    ("*daopsfcent*", "ZTF's PSF at the image centre: not used (to use it, copy it to <stem>_psf.fits "
                     "with OVERSAMP = 1)"),
    ("*psfcat*", "a catalogue"), ("*sexcat*", "a catalogue"),
)


#: header conventions per ``[input] preset`` (the README's table); ``CCDID+QID`` is ZTF's readout
#: channel ``4 (CCDID - 1) + QID - 1`` (= ``RCID``, 0..63)
PRESETS: dict[str, Preset] = {
    "decam": Preset(("OBSTYPE",), ("EXPNUM",), ("CCDNUM",),
                    calibrated=(("PROCTYPE", ("instcal", "resampled", "stacked")),)),
    "ztf": Preset(("IMGTYPE",), ("EXPID",), ("RCID", "CCDID+QID", "CCDID"),
                  calibrated_names=("*sciimg.fits*",), reference_names=("*refimg.fits*",),
                  ignored_names=_ZTF_OTHERS),
    "lsst": Preset(("IMGTYPE", "OBSTYPE"), ("VISIT", "EXPID", "EXPOSURE"), ("DETECTOR",),
                   calibrated_names=("calexp*", "*calexp*.fits*"),
                   reference_names=("*template*.fits*", "*coadd*.fits*")),
    "generic": Preset(("IMAGETYP", "OBSTYPE", "IMGTYPE", "OBS_TYPE"), ("EXPNUM", "EXPID", "VISIT", "EXPOSURE"),
                      ("CCDNUM", "DETECTOR", "CCDID")),
}

#: frame-type keyword values (lower case) per kind, for every preset
TYPE_VALUES: dict[str, tuple[str, ...]] = {
    "science": ("object", "science", "sci", "sciimg", "light"),
    "bias": ("bias", "zero"),
    "dark": ("dark",),
    "flat": ("flat", "dome flat", "domeflat", "dflat", "twilight flat", "sky flat", "skyflat", "flatfield"),
    "reference": ("reference", "template", "coadd", "refimg", "deep"),
}
#: extension names of noise maps and masks: planes of a CCD image, not CCD images
PLANE_NAMES = frozenset({"VARIANCE", "VAR", "MASK", "ERR", "ERROR", "SIGMA", "RMS", "NOISE", "WHT", "WEIGHT",
                         "IVM", "IVAR", "INVVAR", "DQ", "BPM"})
NOISE_NAMES = PLANE_NAMES - {"MASK", "DQ", "BPM"}
#: ``BUNIT`` values of a raw image (ADU); any other ``BUNIT`` (electron, electron/s, nJy, MJy/sr, ...)
#: is a calibrated one, read with its unit by ``read_exposure``
RAW_UNITS = ("", "adu", "dn", "data number", "count", "counts")
#: extensions of a calibration bundle (``nightsift simulate``'s ``*_calib.fits``)
BUNDLE_NAMES = ("BIAS", "DARK", "FLAT")


@dataclass(frozen=True)
class FolderFrame:
    """One CCD image found in the folder.

    Attributes
    ----------
    path : str
    hdu : int or None
        Its HDU in a multi-extension file; ``None``: the file's one CCD image (the reader picks it).
    kind : str
        science, bias, dark, flat, reference or bundle.
    ccd : int
    visit : int or None
        Science frames only.
    calibrated : bool
        A calibrated science frame or reference (read with ``read_exposure``), else raw ADU.
    exptime : float
        ``EXPTIME`` (``DARKTIME`` for a bundle), 0 when absent.
    shape : (ny, nx)
        From ``NAXIS2, NAXIS1`` (``()`` for a bundle).
    """

    path: str
    hdu: int | None
    kind: str
    ccd: int
    visit: int | None = None
    calibrated: bool = False
    exptime: float = 0.0
    shape: tuple = ()

    @property
    def where(self) -> str:
        return self.path if self.hdu is None else f"{self.path}[{self.hdu}]"


@dataclass
class FolderPlan:
    """What :func:`scan_folder` found: the night's CCD-visits and each CCD's reference and calibration.

    Attributes
    ----------
    root : str
    preset : str
    science : dict
        ``(visit, ccd) -> FolderFrame``.
    references : dict
        ``ccd -> FolderFrame``.
    calibration : dict
        ``ccd -> {"bias" | "dark" | "flat" | "bundle": [FolderFrame, ...]}``.
    skip : dict
        ``(visit, ccd) -> reason`` of CCD-visits that cannot run (their records say why).
    ignored : list of str
        ``"path: reason"`` of files (or HDUs) not used.
    notes : list of str
        What had to be assumed (visit numbers from DATE-OBS, no darks, ...): printed with the plan.
    """

    root: str
    preset: str
    science: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    skip: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def tasks(self) -> list[tuple[int, int]]:
        """Every CCD-visit with a science frame, sorted by (visit, ccd)."""
        return sorted(self.science)

    @property
    def visits(self) -> list[int]:
        return sorted({v for v, _ in self.science})

    @property
    def ccds(self) -> list[int]:
        return sorted({c for _, c in self.science})

    def describe(self) -> list[str]:
        """The plan in lines: counts, what was found per kind, then notes, skips and ignored files."""
        n_raw = sum(not f.calibrated for f in self.science.values())
        cal = {k: sum(len(d.get(k, ())) for d in self.calibration.values()) for k in ("bias", "dark", "flat", "bundle")}
        lines = [f"{len(self.visits)} visits x {len(self.ccds)} CCDs = {len(self.science)} CCD-visits "
                 f"({n_raw} raw, {len(self.science) - n_raw} calibrated); preset {self.preset}",
                 f"references for {len(self.references)} CCDs; calibration frames: "
                 + ", ".join(f"{n} {k}" for k, n in cal.items())]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"skip visit {v} ccd {c}: {why}" for (v, c), why in sorted(self.skip.items())]
        lines += [f"ignored {why}" for why in self.ignored]
        return lines


# ----------------------------------------------------------------------------------------------
# reading headers
# ----------------------------------------------------------------------------------------------
def _first(header, keys) -> tuple[str | None, object]:
    """``(key, value)`` of the first of ``keys`` in ``header`` (``CCDID+QID``: ZTF's readout channel)."""
    for k in keys:
        if "+" in k:
            a, b = k.split("+")
            if a in header and b in header:
                try:
                    return k, 4 * (int(header[a]) - 1) + int(header[b]) - 1
                except (TypeError, ValueError):
                    continue
        elif k in header and header[k] not in (None, ""):
            return k, header[k]
    return None, None


def _read_headers(path: Path) -> tuple[list[tuple[int, str, fits.Header, int]], str | None]:
    """``([(hdu index, EXTNAME, header merged with the primary's, NAXIS), ...], damage)`` of a file,
    headers only; ``damage`` says where reading stopped in a truncated or corrupt file (the HDUs
    before it are kept: the CCD-visits they hold fail when their pixels are read, naming the file)."""
    from ..io.fits import _merged_header

    out, damage = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
                i = 0
                while True:
                    try:
                        h = hdul[i]
                    except IndexError:
                        break
                    out.append((i, str(h.name).upper(), _merged_header(hdul, i), int(h.header.get("NAXIS", 0))))
                    i += 1
                damage = _short(path, hdul[i - 1].fileinfo()) if i else None
        except Exception as e:  # noqa: BLE001 -- any damage: reported in the plan, the file named
            damage = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return out, damage


def _short(path: Path, info: dict | None) -> str | None:
    """"truncated: ..." when the file ends before the last HDU's data do (a transfer cut short: astropy
    lists the HDUs whose headers it can read, without complaint); ``None`` for a whole or gzipped file."""
    if not info or path.suffix.lower() == ".gz":
        return None
    need, size = int(info["datLoc"]) + int(info["datSpan"]), path.stat().st_size
    return f"truncated: {size} bytes where its headers declare {need}" if size < need else None


def _frame_type(header, path: Path, keys, ref: bool) -> tuple[str, str | None]:
    """``(kind, why-ignored)`` of a CCD image: its type keyword, else a reference folder/pattern,
    else its file name (``bias``/``zero``, ``dark``, ``flat`` in it), else science."""
    key, value = _first(header, keys)
    if key is not None:
        v = str(value).strip().lower()
        for kind, values in TYPE_VALUES.items():
            if v in values:
                return ("reference" if ref and kind == "science" else kind), None
        return "", f"{key} = {value!r} is not a science, calibration or reference frame"
    if ref:
        return "reference", None
    name = path.name.lower()
    for kind, words in (("bias", ("bias", "zero")), ("dark", ("dark",)), ("flat", ("flat",))):
        if any(w in name for w in words):
            return kind, None
    return "science", None


def _matches(name: str, globs) -> bool:
    return any(fnmatch.fnmatch(name.lower(), g.lower()) for g in globs if g)


def _calibrated(header, names: set[str], path: Path, preset: Preset, science_kind: str) -> bool:
    """A calibrated image (e-, or a noise map beside it, or the preset's processed mark), else raw ADU."""
    if science_kind != "auto":
        return science_kind == "calibrated"
    if str(header.get("BUNIT", "")).strip().lower() not in RAW_UNITS or names & NOISE_NAMES:
        return True
    return _matches(path.name, preset.calibrated_names) or \
        any(str(header.get(k, "")).strip().lower() in vals for k, vals in preset.calibrated)


# ----------------------------------------------------------------------------------------------
# the scan
# ----------------------------------------------------------------------------------------------
@dataclass
class _Scan:
    """Mutable state of one scan (the plan being filled, and the science frames' raw keys)."""

    cfg: InputConfig
    preset: Preset
    plan: FolderPlan
    science: list = field(default_factory=list)  # (visit value or None, date key, FolderFrame kwargs)

    @property
    def type_keys(self):
        return ((self.cfg.type_key,) if self.cfg.type_key else ()) + self.preset.type_keys

    @property
    def visit_keys(self):
        return ((self.cfg.visit_key,) if self.cfg.visit_key else ()) + self.preset.visit_keys

    @property
    def ccd_keys(self):
        return ((self.cfg.ccd_key,) if self.cfg.ccd_key else ()) + self.preset.ccd_keys


def _is_reference_path(path: Path, root: Path, cfg: InputConfig, preset: Preset) -> bool:
    parts = path.relative_to(root).parts[:-1]
    return (bool(cfg.reference_dir) and cfg.reference_dir in parts) or \
        _matches(path.name, (cfg.reference_pattern,) + preset.reference_names)


def _ccd_of(scan: _Scan, header, images: list, idx: int, where: str) -> int | None:
    """The CCD number of an image HDU: the keyword map's, else (a MEF) its order, else 0 (noted)."""
    key, value = _first(header, scan.ccd_keys)
    if key is not None:
        try:
            return int(value)
        except (TypeError, ValueError):
            scan.plan.ignored.append(f"{where}: {key} = {value!r} is not a CCD number")
            return None
    if len(images) > 1:
        scan.plan.notes.append(f"{where}: no {'/'.join(scan.ccd_keys)}: CCD number {images.index(idx)} "
                               "from its HDU order")
        return images.index(idx)
    scan.plan.notes.append(f"{where}: no {'/'.join(scan.ccd_keys)}: taken as CCD 0")
    return 0


def _scan_file(scan: _Scan, path: Path, root: Path) -> None:
    """Sort the CCD images of one file into the plan."""
    hdus, damage = _read_headers(path)
    if damage and not hdus:
        scan.plan.ignored.append(f"{path}: not a readable FITS file ({damage})")
        return
    if damage:
        scan.plan.notes.append(f"{path}: damaged after HDU {len(hdus) - 1} ({damage}); its CCD-visits will fail")
    names = {name for _, name, _, _ in hdus}
    primary = hdus[0][2]
    if set(BUNDLE_NAMES) <= names:
        _add_bundle(scan, path, primary)
        return
    images = [i for i, name, _, naxis in hdus if naxis == 2 and name not in PLANE_NAMES]
    if not images:
        scan.plan.ignored.append(f"{path}: no 2-D image HDU")
        return
    ref = _is_reference_path(path, root, scan.cfg, scan.preset)
    for i, _, header, _ in hdus:
        if i not in images:
            continue
        hdu = None if len(images) == 1 else i
        where = str(path) if hdu is None else f"{path}[{i}]"
        kind, why = _frame_type(header, path, scan.type_keys, ref)
        if why:
            scan.plan.ignored.append(f"{where}: {why}")
            continue
        ccd = _ccd_of(scan, header, images, i, where)
        if ccd is None:
            continue
        calibrated = _calibrated(header, names, path, scan.preset, scan.cfg.science_kind)
        kw = dict(path=str(path), hdu=hdu, kind=kind, ccd=ccd, calibrated=calibrated or kind == "reference",
                  exptime=float(header.get("EXPTIME", 0.0) or 0.0),
                  shape=(int(header.get("NAXIS2", 0)), int(header.get("NAXIS1", 0))))
        if kind == "science":
            _, visit = _first(header, scan.visit_keys)
            scan.science.append((visit, (str(header.get("DATE-OBS", header.get("MJD-OBS", ""))),
                                         str(header.get("FILTER", ""))), kw))
        elif kind == "reference":
            _add_reference(scan.plan, FolderFrame(**kw))
        else:
            scan.plan.calibration.setdefault(ccd, {}).setdefault(kind, []).append(FolderFrame(**kw))


def _add_bundle(scan: _Scan, path: Path, primary) -> None:
    key, value = _first(primary, scan.ccd_keys)
    if key is None:
        scan.plan.ignored.append(f"{path}: calibration bundle ({'/'.join(BUNDLE_NAMES)}) without "
                                 f"{'/'.join(scan.ccd_keys)}: its CCD is unknown; add the keyword")
        return
    exptime = float(primary.get("DARKTIME", primary.get("EXPTIME", 0.0)) or 0.0)
    scan.plan.calibration.setdefault(int(value), {}).setdefault("bundle", []).append(
        FolderFrame(str(path), None, "bundle", int(value), exptime=exptime))


def _add_reference(plan: FolderPlan, frame: FolderFrame) -> None:
    other = plan.references.get(frame.ccd)
    if other is None:
        plan.references[frame.ccd] = frame
    elif other.path != frame.path:
        plan.ignored.append(f"{frame.where}: a second reference for CCD {frame.ccd} (using {other.where}); "
                            "keep one reference per CCD")


def _visits(scan: _Scan) -> None:
    """Number the science frames' visits (the visit keyword, else DATE-OBS + FILTER order) and
    file them by (visit, ccd); a second frame of one CCD-visit is ignored, named."""
    dates = sorted({date for v, date, _ in scan.science if v is None})
    if dates:
        scan.plan.notes.append(f"{len(dates)} visits numbered by DATE-OBS + FILTER order "
                               f"(no {'/'.join(scan.visit_keys)} in their headers)")
    for value, date, kw in scan.science:
        try:
            visit = int(value) if value is not None else dates.index(date)
        except (TypeError, ValueError):
            scan.plan.ignored.append(f"{kw['path']}: visit number {value!r} is not an integer")
            continue
        frame = FolderFrame(**kw, visit=visit)
        other = scan.plan.science.get((visit, frame.ccd))
        if other is not None:  # a raw frame and its calibrated product: the calibrated one is used
            if frame.calibrated and not other.calibrated:
                frame, other = other, frame
            scan.plan.ignored.append(f"{frame.where}: a second science frame of visit {visit} ccd {frame.ccd} "
                                     f"(using {other.where}{', calibrated' if other.calibrated else ''})")
            frame = other
        scan.plan.science[(visit, frame.ccd)] = frame


def _skips(plan: FolderPlan) -> None:
    """The reason each CCD-visit that cannot run is skipped; a note for CCDs without darks."""
    from ..records import CANDID_CCD, MAX_VISIT

    for (visit, ccd), f in plan.science.items():
        cal = plan.calibration.get(ccd, {})
        if not (0 <= visit <= MAX_VISIT and 0 <= ccd < CANDID_CCD):
            plan.skip[(visit, ccd)] = (f"{f.where}: visit {visit} / CCD {ccd} outside the 0..{MAX_VISIT} / "
                                       f"0..{CANDID_CCD - 1} that alert ids hold; set [input] visit_key to a "
                                       "per-night counter (Rubin: SEQNUM) or ccd_key")
        elif ccd not in plan.references:
            plan.skip[(visit, ccd)] = f"no reference for CCD {ccd} in {plan.root}; add one (a 'reference' subfolder)"
        elif not f.calibrated and not cal.get("bundle") and not (cal.get("bias") and cal.get("flat")):
            plan.skip[(visit, ccd)] = (f"raw science frame {f.where} but no bias and flat frames for CCD {ccd}; "
                                       "add them, or give calibrated frames")
    for ccd in sorted({c for (_, c), f in plan.science.items() if not f.calibrated}):
        cal = plan.calibration.get(ccd, {})
        if cal.get("bias") and cal.get("flat") and not cal.get("dark") and not cal.get("bundle"):
            plan.notes.append(f"CCD {ccd}: no dark frames: dark current taken as 0")


def _files(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` (any depth, linked folders followed once) whose name matches ``pattern``, sorted."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        out += [Path(dirpath) / f for f in filenames if _matches(f, (pattern,))]
    return sorted(p for p in out if p.is_file())


#: what a file beside an image may hold, by the word that ends its name: its PSF (``image_psf.fits``,
#: ``image.psf.fits``; PSFEx's ``image.psf`` is not FITS-named) or its noise map
#: (``image_wht.fits``, ``image.weight.fits`` as SWarp writes it, ``image_err.fits``, ...; the word
#: names the kind, :data:`nightsift.engine.io.units.NOISE_KINDS`)
SIDECAR_WORDS = ("psf", "var", "variance", "err", "error", "rms", "sigma", "wht", "weight", "wgt", "ivm", "ivar")
_FITS_ENDINGS = (".fits.gz", ".fits.fz", ".fits", ".fit", ".fz")


def _stem_and_word(name: str) -> tuple[str, str | None]:
    """``("image", "wht")`` of ``image_wht.fits`` / ``image.wht.fits``; ``(stem, None)`` otherwise."""
    low = name.lower()
    for ext in _FITS_ENDINGS:
        if low.endswith(ext):
            name, low = name[: -len(ext)], low[: -len(ext)]
            break
    for sep in ("_", "."):
        head, _, word = low.rpartition(sep)
        if head and word in SIDECAR_WORDS:
            return name[: len(head)], word
    return name, None


def _is_sidecar(path: Path, others: set[str]) -> bool:
    """A PSF or noise file whose image (same stem) is in the folder too: not an image of the night."""
    stem, word = _stem_and_word(path.name)
    return word is not None and any(f"{stem}{ext}" in others for ext in _FITS_ENDINGS)


def _sidecar(frame: FolderFrame, words) -> tuple[str, str] | None:
    """``(path, word)`` of the first file beside a single-image file named ``<stem>_<word>`` or
    ``<stem>.<word>`` (FITS, or PSFEx's bare ``.psf``), ``word`` in ``words``; a CCD of a
    multi-extension file has none (one file per image cannot tell its CCDs apart)."""
    if frame.hdu is not None:
        return None
    p = Path(frame.path)
    stem, _ = _stem_and_word(p.name)
    for word in words:
        names = [f"{stem}{sep}{word}{ext}" for sep in ("_", ".") for ext in _FITS_ENDINGS]
        names += [f"{stem}.psf"] if word == "psf" else []
        for name in names:
            if (p.parent / name).is_file():
                return str(p.parent / name), word
    return None


def psf_sidecar(frame: FolderFrame) -> str | None:
    """The PSF file beside a single-image file: ``<stem>.psf`` (PSFEx), ``<stem>_psf.fits`` or
    ``<stem>.psf.fits`` (a FITS PSF image, its sampling in its header), else ``None``."""
    found = _sidecar(frame, ("psf",))
    return found[0] if found else None


def noise_sidecar(frame: FolderFrame) -> tuple[str | None, str | None]:
    """``(path, kind word)`` of the noise map beside a single-image file (``<stem>_wht.fits``,
    ``<stem>.weight.fits``, ``<stem>_err.fits``, ``<stem>_var.fits``, ...), else ``(None, None)``:
    read with :func:`~nightsift.engine.io.fits.read_exposure` ``(noise=, noise_kind=)``."""
    found = _sidecar(frame, SIDECAR_WORDS[1:])
    return found if found else (None, None)


def scan_folder(cfg: InputConfig) -> FolderPlan:
    """Read the headers of every FITS file under ``cfg.dir`` and plan the night.

    Parameters
    ----------
    cfg : InputConfig
        ``dir``, ``preset`` and keyword map, ``pattern``, ``reference_dir`` / ``reference_pattern``,
        ``science_kind``.

    Returns
    -------
    FolderPlan

    Raises
    ------
    InputError
        The folder does not exist or holds no science frame.
    """
    root = Path(cfg.dir).expanduser().resolve()
    if not root.is_dir():
        raise InputError("is not a folder; pass the folder of the night's FITS files to --input", path=str(root))
    scan = _Scan(cfg=cfg, preset=PRESETS[cfg.preset], plan=FolderPlan(root=str(root), preset=cfg.preset))
    files = _files(root, cfg.pattern)
    by_folder: dict[Path, set[str]] = {}
    for path in files:
        by_folder.setdefault(path.parent, set()).add(path.name)
    for path in files:
        if _is_sidecar(path, by_folder[path.parent]):
            continue  # a PSF or noise map beside its image (psf_sidecar / noise_sidecar)
        why = next((why for glob, why in scan.preset.ignored_names if _matches(path.name, (glob,))), None)
        if why:
            scan.plan.ignored.append(f"{path}: {why}")
            continue
        _scan_file(scan, path, root)
    _visits(scan)
    _note_psfs(scan.plan)
    _skips(scan.plan)
    if not scan.plan.science:
        found = "; ".join(scan.plan.ignored[:3]) or f"no file matches {cfg.pattern!r}"
        raise InputError(f"holds no science frame ({found}); check [input] preset / type_key "
                         f"(preset {cfg.preset} reads the frame type from {'/'.join(scan.type_keys)})", path=str(root))
    return scan.plan


def _note_psfs(plan: FolderPlan) -> None:
    """Say in the plan how many frames bring their own PSF file (the rest have theirs measured)."""
    frames = list(plan.science.values()) + list(plan.references.values())
    n = sum(psf_sidecar(f) is not None for f in frames)
    if n:
        plan.notes.append(f"{n} of {len(frames)} science/reference frames bring a PSF file "
                          "(<stem>.psf, <stem>_psf.fits): used instead of measuring their PSF")
    n = sum(noise_sidecar(f)[0] is not None for f in frames)
    if n:
        plan.notes.append(f"{n} of {len(frames)} science/reference frames bring a noise map file "
                          "(<stem>_wht.fits, <stem>.weight.fits, <stem>_err.fits, <stem>_var.fits, ...)")


# ----------------------------------------------------------------------------------------------
# the source
# ----------------------------------------------------------------------------------------------
def _pixels(frame: FolderFrame) -> tuple[fits.Header, np.ndarray]:
    """Header (merged with a MEF's primary) and float32 data of one CCD image, InputError naming the file."""
    from ..io.fits import _load

    header, data, _ = _load(frame.path, hdu=frame.hdu)
    return header, np.asarray(data, dtype=np.float32)


def _bundle_plane(frame: FolderFrame, name: str) -> np.ndarray:
    """Extension ``name`` (BIAS, DARK, FLAT: a frame or a stack) of a calibration bundle, InputError naming the file."""
    try:
        with fits.open(frame.path, memmap=False) as hdul:
            return np.asarray(hdul[name].data, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 -- one line naming the file
        raise InputError(f"calibration bundle extension {name} could not be read "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); copy or regenerate the file",
                         path=frame.path) from None


def _stack(frames: list[FolderFrame]) -> tuple[np.ndarray, float]:
    """The frames' pixels as a ``(n, ny, nx)`` stack (ADU) and their exposure time (the first's)."""
    return np.stack([_pixels(f)[1] for f in frames]), float(frames[0].exptime) if frames else 0.0


def calibration_frames(cal: dict):
    """The :class:`~nightsift.engine.records.CalibrationFrames` of one CCD: its bundle, else its bias,
    dark (none: dark current 0, noted in the plan) and flat frames."""
    from ..records import CalibrationFrames

    if cal.get("bundle"):
        b = cal["bundle"][0]
        data = {k: _bundle_plane(b, k) for k in BUNDLE_NAMES}
        return CalibrationFrames(*(d if d.ndim == 3 else d[None] for d in data.values()), dark_exptime=b.exptime)
    bias, _ = _stack(cal["bias"])
    flat, _ = _stack(cal["flat"])
    if cal.get("dark"):
        dark, t_dark = _stack(cal["dark"])
    else:
        dark, t_dark = bias, 1.0  # dark - bias = 0: no dark current (noted in the plan)
    if not t_dark > 0:
        raise InputError(f"dark frames have EXPTIME {t_dark}; add the dark exposure time (s)", path=cal["dark"][0].path)
    return CalibrationFrames(bias=bias, dark=dark, flat=flat, dark_exptime=t_dark)


class FolderNight:
    """The :class:`~nightsift.engine.orchestration.sources.CCDSource` of a folder of FITS files.

    Parameters
    ----------
    plan : FolderPlan
        From :func:`scan_folder` (paths only: the source is small and picklable).
    calibrate : CalibrateConfig
        For the masters built from bias/dark/flat frames and the reading of calibrated frames.
    """

    def __init__(self, plan: FolderPlan, calibrate: CalibrateConfig):
        self.plan = plan
        self.calibrate = calibrate

    @classmethod
    def scan(cls, cfg: InputConfig, calibrate: CalibrateConfig) -> "FolderNight":
        return cls(scan_folder(cfg), calibrate)

    def tasks(self) -> list[tuple[int, int]]:
        """The night's CCD-visits (every science frame found), sorted."""
        return self.plan.tasks()

    @property
    def ccd_shape(self) -> tuple[int, int] | None:
        """The largest science CCD ``(ny, nx)`` of the night (what the Ray engine's memory plan sizes
        each CCD's statics by); ``None`` without science frames."""
        shapes = [f.shape for f in self.plan.science.values() if f.shape]
        return max(shapes, key=lambda s: s[0] * s[1]) if shapes else None

    def load_static(self, visit: int, ccd: int) -> CCDStatic:
        from ..io.fits import read_exposure
        from ..stages.calibrate import make_master

        ref = self.plan.references.get(ccd)
        if ref is None:
            raise SkipCCD(self.plan.skip.get((visit, ccd)) or f"no reference for CCD {ccd} in {self.plan.root}")
        noise, kind = noise_sidecar(ref)
        reference = read_exposure(ref.path, hdu=ref.hdu, config=self.calibrate, noise=noise, noise_kind=kind)
        raw = [f for (_, c), f in sorted(self.plan.science.items()) if c == ccd and not f.calibrated]
        cal = self.plan.calibration.get(ccd, {})
        master = None
        if raw and (cal.get("bundle") or (cal.get("bias") and cal.get("flat"))):
            header, _ = _pixels(raw[0])  # GAIN of the CCD, from its first raw science frame
            master = make_master(calibration_frames(cal), header=header, config=self.calibrate)
        return CCDStatic(ccd=ccd, master=master, reference=reference, psf_file=psf_sidecar(ref))

    def load_frame(self, visit: int, ccd: int, static: CCDStatic) -> CCDFrame:
        from ..io.fits import read_exposure, read_raw

        if (visit, ccd) in self.plan.skip:
            raise SkipCCD(self.plan.skip[(visit, ccd)])
        f = self.plan.science.get((visit, ccd))
        if f is None:
            raise SkipCCD(f"no science frame of visit {visit} ccd {ccd} in {self.plan.root}")
        psf = psf_sidecar(f)
        if f.calibrated:
            noise, kind = noise_sidecar(f)
            return CCDFrame(visit=visit, ccd=ccd, raw=None, psf=psf,
                            science=read_exposure(f.path, hdu=f.hdu, config=self.calibrate, noise=noise,
                                                  noise_kind=kind))
        return CCDFrame(visit=visit, ccd=ccd, raw=read_raw(f.path, hdu=f.hdu), psf=psf)


def split_done(tasks, output_dir) -> tuple[list[tuple[int, int]], list[dict]]:
    """``(CCD-visits still to run, ledger records of those already done)``: a resumed night skips a
    CCD-visit whose record says done and whose alert file is still there; the rest run again (their
    record and alert file are replaced, never appended)."""
    from .ledger import read_ledger

    done = {}
    for r in read_ledger(output_dir):
        if r.get("status") == "done" and (not r.get("alerts_path") or Path(r["alerts_path"]).exists()):
            done[(int(r["visit"]), int(r["ccd"]))] = r
    todo = [t for t in tasks if tuple(t) not in done]
    return todo, [done[tuple(t)] for t in tasks if tuple(t) in done]

