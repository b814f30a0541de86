"""The QA report of one subtraction (a CCD-visit): ``qa.json`` and a PNG quicklook.

``nightsift subtract`` writes both beside its products; what they hold is the CCD-visit's QA dict
(:attr:`nightsift.engine.pipeline.CCDResult.qa`, every stage's numbers and the ``warnings`` the
stages raised) arranged for a reader, plus what only the command knows (input files, per-tile PSF
widths from the products, the configuration's hash):

* :func:`build_qa_report` -- the report (a JSON-ready dict, :data:`QA_SCHEMA` /
  :data:`QA_SCHEMA_VERSION`; non-finite numbers are ``null``);
* :func:`write_qa_report` -- atomically (a reader never sees half a file);
* :func:`read_qa_report` -- a ``qa.json``, or a night's ledger record (``records/*.json``: a night
  keeps each CCD-visit's QA there, so it writes no second copy) arranged the same way;
* :func:`format_qa_summary` -- the plain-text lines of a report;
* :func:`display_bin`, :func:`save_quicklook` -- science, aligned reference, difference and S_corr
  binned for display (any CCD size, on the array module of the planes) with the candidates circled.

Pixel coordinates are 0-based ``(x, y)`` = (column, row); PSF widths and astrometric scatter in
pixels of the science grid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nightsift.kernels._xp import array_namespace

from .errors import InputError
from .io.atomic import atomic_write

__all__ = ["QA_SCHEMA", "QA_SCHEMA_VERSION", "QUICKLOOK_INCHES", "QUICKLOOK_DPI", "build_qa_report",
           "config_hash", "display_bin", "format_qa_summary", "qa_report_from_record", "read_qa_report",
           "quicklook_path", "quicklook_planes", "quicklook_title", "save_quicklook", "save_result_quicklook",
           "write_qa_report", "write_subtraction_report"]

#: what a ``qa.json`` says it is, and the version of its layout (raised when a key changes meaning
#: or goes away; new keys do not raise it)
QA_SCHEMA = "nightsift.qa"
QA_SCHEMA_VERSION = 1

#: quicklook figure: inches and dots per inch (the PNG is ``QUICKLOOK_INCHES * QUICKLOOK_DPI`` px)
QUICKLOOK_INCHES = (10.0, 10.0)
QUICKLOOK_DPI = 100
#: longest side (px) of a plane binned for display: a 4096^2 CCD is shown 8x8-binned
QUICKLOOK_MAX_SIDE = 1024
#: candidates labelled with their S/N on the quicklook (the best ones)
QUICKLOOK_LABELS = 8


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def json_safe(v: Any):
    """``v`` with numpy scalars and arrays as Python numbers and lists, non-finite floats as None
    (JSON has no NaN); dicts, lists and tuples converted recursively. Floats keep full precision."""
    if isinstance(v, Mapping):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [json_safe(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v


def config_hash(config) -> str:
    """Short SHA-256 (16 hex digits) of a configuration's settings: two subtractions with the same
    hash ran with the same settings. ``package.output_dir`` (where, not how) is left out."""
    from .config import to_dict

    d = to_dict(config)
    d.get("package", {}).pop("output_dir", None)
    text = json.dumps(json_safe(d), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _version() -> str:
    from .stages.package import _version as package_version

    return package_version()


def _tiles(values) -> dict:
    """Per-tile values (host) with their min / median / max; ``None`` entries where not finite."""
    a = np.asarray(values, dtype=np.float64).ravel()
    ok = a[np.isfinite(a)]
    stat = (lambda f: float(f(ok)) if ok.size else None)  # noqa: E731
    return {"tiles": json_safe(a), "min": stat(np.min), "median": stat(np.median), "max": stat(np.max)}


def _psf_section(qa: Mapping, prefix: str, model=None, *, psf_file: str | None = None) -> dict:
    """PSF widths of one image (``prefix`` "sci" or "ref"): per tile when its host PSF ``model``
    is given (:class:`~nightsift.engine.records.PSFModel`), else the QA's min / median / max."""
    if model is not None:
        out = {"fwhm_px": _tiles(model.fwhm), "n_stars_per_tile": json_safe(np.asarray(model.n_stars).ravel())}
        n_stars = int(np.sum(model.n_stars))
        locus = float(model.locus)
    else:
        out = {"fwhm_px": {"tiles": None, "min": qa.get(f"{prefix}_psf_fwhm_min"),
                           "median": qa.get(f"{prefix}_psf_fwhm"), "max": qa.get(f"{prefix}_psf_fwhm_max")}}
        n_stars, locus = None, None
    source = (qa.get(f"psf_source_{prefix}") or qa.get(f"{prefix}_psf_source")
              or (f"file:{psf_file}" if psf_file else "measured"))
    out.update(source=source, n_stars=qa.get(f"{prefix}_psf_n_stars", n_stars),
               locus_fwhm_px=qa.get(f"{prefix}_psf_locus_fwhm", locus), apcorr=qa.get(f"{prefix}_psf_apcorr"))
    return out


def _flux_ratio_section(qa: Mapping) -> dict:
    """F_r and where it came from (``source``: "stars" -- fitted on the stars common to both
    images; "zero_points" -- the headers' photometric zero points; "stars+zero_points" -- the
    stars' value combined with the zero points' as a prior), and both values when both exist."""
    source = qa.get("F_r_source")
    stars = qa.get("F_r_stars", qa.get("F_r") if source == "stars" else None)
    return {"value": qa.get("F_r"), "source": source, "err": qa.get("F_r_err"), "stars": stars,
            "zero_points": qa.get("F_r_zero_points"), "n_stars": qa.get("n_flux_stars")}


def _astrometry_section(qa: Mapping) -> dict:
    """``rms_*``: ZOGY's astrometric noise (the registration error it assumed); ``scatter_*``: the
    matched stars' residual scatter; ``centroid_noise_px``: the part their own noise explains."""
    rx, ry = qa.get("astrometric_rms_x"), qa.get("astrometric_rms_y")
    rms = math.hypot(rx, ry) if isinstance(rx, (int, float)) and isinstance(ry, (int, float)) else None
    return {"rms_px": rms, "rms_x_px": rx, "rms_y_px": ry, "n_stars": qa.get("n_astrometric_stars"),
            "offset_x_px": qa.get("astrometric_offset_x"), "offset_y_px": qa.get("astrometric_offset_y"),
            "correction_x_px": qa.get("astrometric_correction_x"),
            "correction_y_px": qa.get("astrometric_correction_y"),
            "scatter_x_px": qa.get("astrometric_scatter_x"), "scatter_y_px": qa.get("astrometric_scatter_y"),
            "centroid_noise_px": qa.get("astrometric_centroid_noise")}


def _report_from_qa(qa: Mapping, *, visit: int, ccd: int, status: str = "done", error: str | None = None) -> dict:
    """The sections every report has, from a CCD-visit's flat QA dict alone."""
    return {
        "schema": QA_SCHEMA, "schema_version": QA_SCHEMA_VERSION, "visit": int(visit), "ccd": int(ccd),
        "status": status, "error": error,
        "psf": {"science": _psf_section(qa, "sci"), "reference": _psf_section(qa, "ref")},
        "flux_ratio": _flux_ratio_section(qa),
        "scorr": {"std_raw": qa.get("scorr_std_raw"), "std": qa.get("scorr_std"), "mean": qa.get("scorr_mean"),
                  "blank_fraction": qa.get("blank_fraction"), "excluded_fraction": qa.get("excluded_fraction")},
        "astrometry": _astrometry_section(qa),
        "coverage": {"overlap_fraction": qa.get("overlap_fraction"),
                     "sci_nodata_fraction": qa.get("sci_nodata_fraction"),
                     "ref_nodata_fraction": qa.get("ref_nodata_fraction")},
        "candidates": {"n": qa.get("n_candidates"), "n_positive": qa.get("n_positive"),
                       "n_negative": qa.get("n_negative"), "n_alerts": qa.get("n_alerts"), "n_edge": qa.get("n_edge")},
        "times_s": {k[2:]: v for k, v in qa.items() if k.startswith("t_")},
        "warnings": [str(w) for w in qa.get("warnings") or []],
        "qa": dict(qa),
    }


def _input(exposure) -> dict | None:
    """What the report says of one input image: path, its unit (``BUNIT`` of the exposure as read:
    the unit the chain worked in) and ``GAIN``, shape."""
    if exposure is None:
        return None
    h = exposure.header if exposure.header is not None else {}
    return {"path": str(Path(exposure.path).resolve()) if exposure.path else None, "bunit": h.get("BUNIT"),
            "gain": h.get("GAIN"), "shape": list(np.shape(exposure.image))}


def _nodata_fraction(mask) -> float:
    from .records import MaskBits

    return float(np.mean((np.asarray(mask) & int(MaskBits.NO_DATA)) != 0))


def build_qa_report(result, *, config, science=None, reference=None, psf_files: Mapping[str, str] | None = None,
                    products: Mapping[str, str] | None = None) -> dict:
    """The QA report of one subtraction, ready for :func:`write_qa_report`.

    Parameters
    ----------
    result : CCDResult
        From :func:`~nightsift.engine.pipeline.process_pair` (or a night's chain); its
        ``products``, when kept, give the per-tile PSF widths and the science no-data fraction.
    config : Config
        The configuration it ran with (its hash is recorded).
    science, reference : Exposure, optional
        The inputs (path, ``BUNIT``, ``GAIN``, shape).
    psf_files : mapping, optional
        ``{"sci": path, "ref": path}`` of PSFs given as files (the PSF source, unless the QA
        names one as ``psf_source_sci`` / ``psf_source_ref``: ``"measured"`` or ``"file:<name>"``).
    products : mapping, optional
        Product name -> file written beside the report (recorded as given).

    Returns
    -------
    dict
        JSON-ready (numpy values converted, non-finite numbers ``None``): ``schema``,
        ``schema_version``, ``nightsift_version``, ``config_hash``, ``visit``, ``ccd``, ``status``,
        ``inputs``, ``shape``, ``pixel_scale_arcsec``, ``psf`` (``science`` / ``reference``:
        ``fwhm_px`` with ``tiles`` / ``min`` / ``median`` / ``max``, ``source``, ``n_stars``),
        ``flux_ratio``, ``scorr``, ``astrometry``, ``coverage``, ``candidates``, ``times_s``,
        ``warnings``, ``products``, ``alerts_path`` and the flat ``qa`` it was made from.
    """
    qa = dict(result.qa)
    rep = _report_from_qa(qa, visit=result.visit, ccd=result.ccd, status=result.status,
                          error=None if result.error is None else str(result.error))
    files = {k: str(v) for k, v in (psf_files or {}).items() if v}
    p = result.products
    if p is not None:
        rep["psf"] = {"science": _psf_section(qa, "sci", p.sci_psf.model, psf_file=files.get("sci")),
                      "reference": _psf_section(qa, "ref", p.ref_psf.model, psf_file=files.get("ref"))}
        if rep["coverage"]["sci_nodata_fraction"] is None:
            rep["coverage"]["sci_nodata_fraction"] = _nodata_fraction(p.science.mask)
    else:
        for key, name in (("sci", "science"), ("ref", "reference")):
            rep["psf"][name] = _psf_section(qa, key, psf_file=files.get(key))
    c = result.candidates
    if len(c) and "isdiffpos" in (c.dtype.names or ()):
        pos = int(c["isdiffpos"].sum())
        rep["candidates"].update(n=len(c), n_positive=pos, n_negative=len(c) - pos)
    scale = None
    if p is not None and p.science.wcs is not None:
        from .stages.detect import pixel_scale_arcsec

        scale = pixel_scale_arcsec(p.science.wcs)
    head = {k: rep.pop(k) for k in ("schema", "schema_version")}
    head.update(nightsift_version=_version(), config_hash=config_hash(config),
                **{k: rep.pop(k) for k in ("visit", "ccd", "status", "error")},
                inputs={"science": _input(science), "reference": _input(reference)},
                shape=list(result.shape), pixel_scale_arcsec=scale, products=dict(products or {}),
                alerts_path=str(result.alerts_path) if result.alerts_path else None)
    return json_safe(head | rep)


def qa_report_from_record(record: Mapping) -> dict:
    """A night's ledger record (:func:`~nightsift.engine.orchestration.ledger.write_record`)
    arranged as a QA report (no inputs, per-tile widths or config hash: the record has none)."""
    rep = _report_from_qa(record.get("qa") or {}, visit=record["visit"], ccd=record["ccd"],
                          status=record.get("status", "done"), error=record.get("error"))
    rep["alerts_path"] = record.get("alerts_path")
    return json_safe(rep)


def write_qa_report(path, report: Mapping) -> Path:
    """Write ``report`` as indented JSON, atomically; non-finite numbers as ``null``."""
    text = json.dumps(json_safe(report), indent=1, allow_nan=False)
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def read_qa_report(path) -> dict:
    """A ``qa.json`` (:func:`write_qa_report`), or a night's ledger record, as a QA report.

    Raises
    ------
    InputError
        Not found, not JSON, or neither a QA report of a known schema version nor a ledger record.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: QA report not found") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: not a readable JSON QA report ({e}); rerun the subtraction to rewrite it") from None
    if isinstance(d, dict) and d.get("schema") == QA_SCHEMA:
        if d.get("schema_version") != QA_SCHEMA_VERSION:
            raise InputError(f"{p}: QA report schema version {d.get('schema_version')!r}, this nightsift reads "
                             f"{QA_SCHEMA_VERSION}; rerun the subtraction with this version")
        return d
    if isinstance(d, dict) and {"visit", "ccd", "status", "qa"} <= set(d):
        return qa_report_from_record(d)
    raise InputError(f"{p}: neither a nightsift QA report (qa.json) nor a night's ledger record")


def _num(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def format_qa_summary(report: Mapping) -> str:
    """Plain-text summary of a QA report (a few lines; the warnings one per line at the end)."""
    r = report
    psf = r["psf"]
    lines = [f"visit {r['visit']} ccd {r['ccd']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")]
    for name in ("science", "reference"):
        f = psf[name]["fwhm_px"]
        lines.append(f"  {name} PSF FWHM {_num(f['median'], '.2f')} px (tiles {_num(f['min'], '.2f')}-"
                     f"{_num(f['max'], '.2f')}), {_num(psf[name]['n_stars'], 'd')} stars, {psf[name]['source']}")
    fr = r["flux_ratio"]
    lines.append(f"  F_r {_num(fr['value'], '.4f')} ({fr['source']}; stars {_num(fr['stars'], '.4f')} from "
                 f"{_num(fr['n_stars'], 'd')}, zero points {_num(fr['zero_points'], '.4f')})")
    s, a = r["scorr"], r["astrometry"]
    lines.append(f"  S_corr blank-sky std {_num(s['std_raw'])} before renormalisation, {_num(s['std'])} after")
    lines.append(f"  astrometric rms {_num(a['rms_px'])} px ({_num(a['n_stars'], 'd')} stars)")
    c = r["candidates"]
    lines.append(f"  candidates {_num(c['n'], 'd')} ({_num(c['n_positive'], 'd')} +, {_num(c['n_negative'], 'd')} -)")
    lines.append(f"  warnings: {len(r['warnings'])}")
    lines += [f"  warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the quicklook
# ------------------------------------------------------------------------------------------------
def display_factor(shape, *, max_side: int = QUICKLOOK_MAX_SIDE) -> int:
    """The binning that brings a ``(ny, nx)`` plane's longest side to at most ``max_side``."""
    return max(1, -(-max(shape) // max_side))


def display_bin(image, *, max_side: int = QUICKLOOK_MAX_SIDE, chunk_pixels: int = 1 << 20):
    """Block-mean of ``image`` ``(ny, nx)`` for display, on its own array module.

    The factor is :func:`display_factor`; the last ``ny % f`` rows and ``nx % f`` columns are
    left out; non-finite pixels are ignored (a block with none finite is NaN). Blocks of rows are
    binned in turn (about ``chunk_pixels`` input pixels each), so a 4096^2 frame needs no full
    float copy. Returns a float32 ``(ny // f, nx // f)`` array of the input's module.
    """
    xp = array_namespace(image)
    ny, nx = image.shape
    f = display_factor((ny, nx), max_side=max_side)
    h, w = ny // f, nx // f
    out = xp.empty((h, w), dtype=xp.float32)
    rows = max(1, chunk_pixels // (f * f * max(w, 1)))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        blk = image[r0 * f:r1 * f, :w * f].astype(xp.float32, copy=False).reshape(r1 - r0, f, w, f)
        good = xp.isfinite(blk)
        s = xp.sum(xp.where(good, blk, 0), axis=(1, 3))
        n = xp.sum(good, axis=(1, 3))
        out[r0:r1] = xp.where(n > 0, s / xp.maximum(n, 1), xp.nan)
    return out


def _limits(plane, symmetric: bool) -> tuple[float, float]:
    """zscale limits of a binned plane (symmetric about 0 for a difference)."""
    from astropy.visualization import ZScaleInterval

    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return -1.0, 1.0
    lo, hi = ZScaleInterval().get_limits(finite)
    if symmetric:
        m = max(abs(lo), abs(hi)) or 1.0
        return -m, m
    return (lo, hi) if hi > lo else (lo - 1.0, lo + 1.0)


def save_quicklook(path, planes: Mapping[str, np.ndarray], *, factor: int, candidates=None, title: str = "") -> Path:
    """Write the quicklook PNG: the four binned host planes, candidates circled.

    Parameters
    ----------
    path : str or Path
    planes : mapping
        ``science``, ``reference`` (aligned), ``difference``, ``scorr``: binned for display
        (:func:`display_bin`), host arrays.
    factor : int
        The binning of ``planes`` (candidate positions are divided by it).
    candidates : CANDIDATE_DTYPE array, optional
        Circled on every panel (green: positive, red: negative); the :data:`QUICKLOOK_LABELS`
        best by S/N labelled on the difference.
    title : str
    """
    from matplotlib.figure import Figure

    from .plotting import save_figure

    fig = Figure(figsize=QUICKLOOK_INCHES)  # not pyplot: safe in the packaging threads of a night
    axes = fig.subplots(2, 2).ravel()
    panels = (("science", "science", False), ("reference", "aligned reference", False),
              ("difference", "difference", True), ("scorr", "S_corr", True))
    c = candidates if candidates is not None and len(candidates) else None
    for ax, (key, label, symmetric) in zip(axes, panels):
        img = np.asarray(planes[key], dtype=np.float32)
        lo, hi = (-5.0, 5.0) if key == "scorr" else _limits(img, symmetric)
        ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"{label}  [{lo:.3g}, {hi:.3g}]" + (f"  (binned {factor}x{factor})" if factor > 1 else ""),
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if c is not None:
            _mark(ax, c, factor, label=key == "difference")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=QUICKLOOK_DPI)


def _mark(ax, c, factor: int, *, label: bool) -> None:
    """Circle the candidates ``c`` (0-based pixel positions) on a plane binned ``factor`` times."""
    x, y = (c["xpos"] + 0.5) / factor - 0.5, (c["ypos"] + 0.5) / factor - 0.5
    for sign, colour in ((True, "lime"), (False, "red")):
        sel = c["isdiffpos"] == sign
        ax.scatter(x[sel], y[sel], s=80, facecolors="none", edgecolors=colour, linewidths=0.8)
    if label:
        for k in np.argsort(-c["snr"])[:QUICKLOOK_LABELS]:
            ax.annotate(f"{c['snr'][k]:.0f}", (x[k], y[k]), xytext=(6, 6), textcoords="offset points",
                        color="lime" if c["isdiffpos"][k] else "red", fontsize=8,
                        bbox={"facecolor": "black", "alpha": 0.6, "linewidth": 0, "pad": 1})


def quicklook_title(report: Mapping) -> str:
    """The quicklook's title from a QA report: CCD-visit, F_r, S_corr std, warnings count."""
    fr, s = report["flux_ratio"], report["scorr"]
    n = len(report["warnings"])
    return (f"visit {report['visit']} ccd {report['ccd']}   F_r {_num(fr['value'], '.4f')} ({fr['source']})   "
            f"S_corr std {_num(s['std_raw'])}   {n} warning{'s' if n != 1 else ''}")


def quicklook_planes(products) -> tuple[dict, int]:
    """The four planes of a CCD-visit's host products (:class:`~nightsift.engine.pipeline.CCDProducts`)
    binned for display: science less its background, aligned reference, difference, S_corr; and the
    binning factor."""
    sci = products.science.image
    planes = {"science": display_bin(sci - products.sci_psf.sky if products.sci_psf.sky is not None else sci),
              "reference": display_bin(products.reference.image),
              "difference": display_bin(products.subtraction.difference),
              "scorr": display_bin(products.subtraction.S_corr)}
    return planes, display_factor(np.shape(sci))


def write_subtraction_report(out_dir, result, *, config, science=None, reference=None,
                             psf_files: Mapping[str, str] | None = None, products: Mapping[str, str] | None = None,
                             quicklook: bool = True) -> tuple[dict, Path, Path | None]:
    """Write ``qa.json`` (and ``quicklook.png`` when ``quicklook`` and the result kept its products)
    into ``out_dir``; returns ``(report, qa path, quicklook path or None)``. See
    :func:`build_qa_report` for the arguments. An ``OSError`` of the writes propagates."""
    out = Path(out_dir)
    names = dict(products or {})
    png = None
    if quicklook and result.products is not None:
        names["quicklook"] = "quicklook.png"
    report = build_qa_report(result, config=config, science=science, reference=reference, psf_files=psf_files,
                             products=names)
    with _naming(out / "qa.json"):
        qa_path = write_qa_report(out / "qa.json", report)
    if "quicklook" in names:
        planes, factor = quicklook_planes(result.products)
        with _naming(out / "quicklook.png"):
            png = save_quicklook(out / "quicklook.png", planes, factor=factor, candidates=result.candidates,
                                 title=quicklook_title(report))
    return report, qa_path, png


@contextlib.contextmanager
def _naming(path: Path):
    """Re-raise an ``OSError`` of writing ``path`` naming ``path`` (not the temporary beside it)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def quicklook_path(alerts_path) -> Path:
    """A night's quicklook beside its alert file: ``visit…_ccd….avro`` -> ``visit…_ccd…_quicklook.png``."""
    p = Path(alerts_path)
    return p.with_name(f"{p.stem}_quicklook.png")


def save_result_quicklook(alerts_path, result) -> Path:
    """Write the quicklook of a night's CCD-visit (its :attr:`CCDResult.quicklook` planes, made on
    the device when ``package.quicklook`` is on) beside its alert file; returns the PNG's path."""
    planes = dict(zip(("science", "reference", "difference", "scorr"), result.quicklook))
    report = _report_from_qa(result.qa, visit=result.visit, ccd=result.ccd, status=result.status)
    path = quicklook_path(alerts_path)
    with _naming(path):
        return save_quicklook(path, planes, factor=display_factor(result.shape), candidates=result.candidates,
                              title=quicklook_title(report))
