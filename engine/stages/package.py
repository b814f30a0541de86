"""Package stage: one ZTF-style alert record per candidate, with its three 63x63 cutouts.

The records match the nightsift alert schema (``engine/io/schema``, see
:mod:`nightsift.engine.io.avro`) and are written by :func:`nightsift.engine.io.avro.write_alerts`.

Identifiers, deterministic so a rerun of a CCD makes the same packets:

* ``pid = visit * 1000 + ccd`` (the science image of one CCD of one visit; ``ccd < 1000``);
* ``candid = pid * 100000 + index`` = ``(visit * 1000 + ccd) * 100000 + index``, with ``index`` the
  row of the candidate table (``< 100000``), the packing of the detection stage. The ``candid``
  already in the table is kept when it is set (non-zero), so that ids survive a filtering of rows
  between detection and packaging; zero entries are packed here;
* ``objectId = f"{survey}{candid}"``: one object per candidate. There is no association of
  detections across visits yet (``prv_candidates`` is null), so an object is a candidate.

Conventions that follow ZTF rather than nightsift's tables: ``xpos``/``ypos`` are 1-based (FITS)
in the packet (the table's 0-based value + 1), ``isdiffpos`` is ``"t"``/``"f"``, ``fid`` is
1/2/3 for g/r/i (0 for any other filter), ``jd = MJD-OBS + 2400000.5`` (start of exposure).
Table sentinels (``distnr``/``magnr`` = -999) and NaN become null in nullable fields.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from nightsift.kernels._xp import to_host

from ..errors import InputError
from ..io.avro import SCHEMA_VERSION, make_cutout_record
from ..io.fits import header_exptime, header_zero_point, pixel_unit
from ..records import CANDID_CCD, CANDID_INDEX, CANDIDATE_DTYPE, MAX_VISIT, StageResult, make_candid

__all__ = ["build_alerts", "filter_id", "filter_name", "ZTF_FILTER_IDS", "SCORE_FIELDS", "PUBLISHER"]

#: value of the packets' ``publisher`` field
PUBLISHER = "nightsift"
#: candidate fields that ``scores`` may fill (name -> version field filled from ``score_versions``)
SCORE_FIELDS = {"rb": "rbversion", "drb": "drbversion", "anomaly_score": None}
#: ZTF's filter ids (``fid``) of its filter names
ZTF_FILTER_IDS = {"g": 1, "r": 2, "i": 3}


def filter_id(name: str | None) -> int:
    """ZTF filter id from a FILTER header value: g -> 1, r -> 2, i -> 3, anything else -> 0.

    The first word counts, with a ``ZTF_`` prefix removed (``"r DECam SDSS c0002 ..."`` -> 2,
    ``"ZTF_g"`` -> 1, ``"VR DECam ..."`` -> 0).
    """
    if not name:
        return 0
    word = str(name).strip().split()[0].lower() if str(name).strip() else ""
    if word.startswith("ztf_"):
        word = word[4:]
    return ZTF_FILTER_IDS.get(word, 0)


def filter_name(fid) -> str:
    """The filter name of a ZTF ``fid`` (1 -> g, 2 -> r, 3 -> i; anything else -> "")."""
    return next((k for k, v in ZTF_FILTER_IDS.items() if v == fid), "")


def _julian_date(header) -> float:
    if header is not None and "MJD-OBS" in header:
        try:
            return float(header["MJD-OBS"]) + 2400000.5
        except (TypeError, ValueError):
            raise InputError(f"science header MJD-OBS is not a number: {header['MJD-OBS']!r}") from None
    if header is not None and "DATE-OBS" in header:
        from astropy.time import Time

        try:
            return float(Time(header["DATE-OBS"], scale="utc").jd)
        except ValueError:
            raise InputError(f"science header DATE-OBS is not a date: {header['DATE-OBS']!r}") from None
    raise InputError("science header has neither MJD-OBS nor DATE-OBS: the alert time (jd) is unknown; "
                     "add MJD-OBS (start of exposure) to the science frame header")


def _opt(v, *, sentinel: float | None = None) -> float | None:
    """NaN (and a sentinel) -> None for nullable fields."""
    v = float(v)
    if not np.isfinite(v) or (sentinel is not None and v == sentinel):
        return None
    return v


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nightsift")
    except Exception:  # noqa: BLE001 - not installed (source checkout): still package
        return "unknown"


def build_alerts(candidates: np.ndarray, *, triplets: np.ndarray, shape: tuple[int, int], header, visit: int,
                 ccd: int, scores: Mapping[str, np.ndarray] | None = None,
                 score_versions: Mapping[str, str] | None = None, diffmaglim: float | None = None,
                 survey: str = "nightsift") -> StageResult:
    """Alert records (ZTF convention) for every candidate of one CCD of one visit.

    Parameters
    ----------
    candidates : ndarray (n,) of :data:`~nightsift.engine.records.CANDIDATE_DTYPE`
        The detection table; ``n = 0`` gives an empty list.
    triplets : ndarray (n, s, s, 3) float32
        The cutouts of the cutouts stage (:func:`nightsift.engine.stages.cutouts.cut_triplets`):
        science minus its background, aligned reference, difference times the candidate's sign
        (ZTF's convention: a negative candidate's difference cutout is reference minus science);
        NaN outside the CCD. The packets carry exactly what the classifier scored.
    shape : (ny, nx)
        CCD shape (for ``mindtoedge``).
    header : astropy.io.fits.Header or mapping
        Science header: ``MJD-OBS`` (or ``DATE-OBS``) required; ``FILTER``, ``EXPTIME``,
        ``MAGZP``/``MAGZPT``/``MAGZERO``, ``FIELD`` used when present.
    visit, ccd : int
        Visit (exposure) number (>= 0) and CCD number (0..999); they make ``pid``/``candid``.
    scores : mapping of str to ndarray (n,), optional
        Classifier outputs for the candidate fields ``rb``, ``drb``, ``anomaly_score``
        (:data:`SCORE_FIELDS`); NaN -> null. Fields not given are null.
    score_versions : mapping of str to str, optional
        Model versions, ``{"rb": "...", "drb": "..."}`` -> ``rbversion``/``drbversion``.
    diffmaglim : float, optional
        5-sigma limiting magnitude of the difference image, when the caller measured it.
    survey : str
        Prefix of ``objectId`` (``PackageConfig.survey``).

    Returns
    -------
    StageResult
        ``value``: list of n alert dicts (schema ``nightsift.alert``), in table order; cutouts are
        float32 gzipped FITS; ``candidate.edge`` is true for any candidate whose cutouts cross the
        CCD edge. ``qa``: ``n_alerts``, ``n_edge``, ``n_scored``.

    Raises
    ------
    InputError
        Wrong table dtype, triplets that do not match the table, a bad ``scores`` entry, a header
        without observation time, or ids out of range.
    """
    cand, triplets, scores = _checked_inputs(candidates, triplets, visit, ccd, scores)
    visit, ccd = int(visit), int(ccd)
    n = len(cand)
    versions = dict(score_versions or {})

    jd = _julian_date(header)
    qa: dict[str, Any] = {"n_alerts": n, "n_edge": 0, "n_scored": int(n if scores else 0)}
    if n == 0:
        return StageResult([], qa)

    image = _image_fields(header, jd=jd, visit=visit, ccd=ccd, diffmaglim=diffmaglim)
    unit = pixel_unit(header)  # the cutouts' BUNIT: e-, or the image's own flux unit
    candid = _candids(cand, visit, ccd)
    version = _version()

    edge = cand["edge"] | ~np.isfinite(triplets).reshape(n, -1).all(axis=1)
    qa["n_edge"] = int(edge.sum())
    ny, nx = shape
    x, y = cand["xpos"], cand["ypos"]
    mindtoedge = np.minimum.reduce([x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y])

    alerts = []
    for k in range(n):
        record = _candidate_record(cand[k], int(candid[k]), image, mindtoedge=mindtoedge[k], edge=bool(edge[k]),
                                   visit=visit, ccd=ccd, version=version)
        for name, values in scores.items():
            record[name] = _opt(values[k])
            vfield = SCORE_FIELDS[name]
            if vfield is not None and name in versions:
                record[vfield] = str(versions[name])
        alerts.append(_packet(cand[k], record, triplets[k], survey=survey, unit=unit))
    return StageResult(alerts, qa)


def _checked_inputs(candidates, triplets, visit, ccd, scores):
    """``(table, host triplets, scores as float64 arrays)`` after the checks of :func:`build_alerts`."""
    cand = np.asarray(candidates)
    if cand.dtype != CANDIDATE_DTYPE:
        missing = sorted(set(CANDIDATE_DTYPE.names) - set(cand.dtype.names or ()))
        raise InputError(f"candidates must be a CANDIDATE_DTYPE table; missing fields: {missing or 'dtype differs'}",
                         stage="package")
    triplets = to_host(triplets)
    if triplets.ndim != 4 or triplets.shape[0] != len(cand) or triplets.shape[-1] != 3:
        raise InputError(f"triplets of shape {triplets.shape} do not match {len(cand)} candidates (n, s, s, 3)",
                         stage="package")
    visit, ccd = int(visit), int(ccd)
    if not (0 <= ccd < CANDID_CCD and 0 <= visit <= MAX_VISIT):
        raise InputError(f"visit must be in 0..{MAX_VISIT} and ccd in 0..{CANDID_CCD - 1}, got {visit}, {ccd}",
                         stage="package")
    n = len(cand)
    if n >= CANDID_INDEX:
        raise InputError(f"{n} candidates on one CCD: more than the {CANDID_INDEX - 1} a candid can number; "
                         "the detection threshold is far too low or the subtraction failed", stage="package")
    scores = dict(scores or {})
    unknown = sorted(set(scores) - set(SCORE_FIELDS))
    if unknown:
        raise InputError(f"unknown score fields {unknown}; known: {sorted(SCORE_FIELDS)}", stage="package")
    for k, v in scores.items():
        v = np.asarray(to_host(v), dtype=np.float64).reshape(-1)
        if v.shape != (n,):
            raise InputError(f"scores[{k!r}] has {v.shape[0]} values for {n} candidates", stage="package")
        scores[k] = v
    return cand, triplets, scores


def _candids(cand: np.ndarray, visit: int, ccd: int) -> np.ndarray:
    """The table's ``candid`` where set (non-zero), else packed from ``(visit, ccd, row)``; unique."""
    candid = np.where(cand["candid"] != 0, cand["candid"], make_candid(visit, ccd, np.arange(len(cand))))
    if len(np.unique(candid)) != len(cand):
        raise InputError("candidate ids (candid) in the table are not unique", stage="package")
    return candid


def _image_fields(header, *, jd: float, visit: int, ccd: int, diffmaglim: float | None) -> dict[str, Any]:
    """The candidate fields that are the same for every candidate of the image."""
    fid = filter_id(header.get("FILTER") if header is not None else None)
    exptime = header_exptime(header)
    magzp = header_zero_point(header)
    field = header.get("FIELD") if header is not None else None
    field = int(field) if isinstance(field, (int, np.integer)) and not isinstance(field, bool) else None
    return {"jd": jd, "fid": fid, "pid": visit * CANDID_CCD + ccd,
            "diffmaglim": None if diffmaglim is None else _opt(diffmaglim), "field": field,
            "magzpsci": magzp, "exptime": exptime}


def _candidate_record(c, cid: int, image: Mapping[str, Any], *, mindtoedge: float, edge: bool, visit: int,
                      ccd: int, version: str) -> dict[str, Any]:
    """The ``candidate`` record of one table row (scores null: the caller fills them)."""
    return {
        "jd": image["jd"],
        "fid": image["fid"],
        "pid": image["pid"],
        "diffmaglim": image["diffmaglim"],
        "programid": 0,
        "candid": cid,
        "isdiffpos": "t" if c["isdiffpos"] else "f",
        "rcid": None,
        "field": image["field"],
        "xpos": float(c["xpos"]) + 1.0,
        "ypos": float(c["ypos"]) + 1.0,
        "ra": float(c["ra"]),
        "dec": float(c["dec"]),
        "magpsf": float(c["magpsf"]),
        "sigmapsf": float(c["sigmapsf"]),
        "distnr": _opt(c["distnr"], sentinel=-999.0),
        "magnr": _opt(c["magnr"], sentinel=-999.0),
        "sky": _opt(c["sky"]),
        "fwhm": _opt(c["fwhm"]),
        "mindtoedge": _opt(mindtoedge),
        "elong": _opt(c["elong"]),
        "nbad": int(c["nbad"]),
        "rb": None,
        "rbversion": None,
        "scorr": _opt(c["scorr"]),
        "magzpsci": image["magzpsci"],
        "exptime": image["exptime"],
        "drb": None,
        "drbversion": None,
        "flux": _opt(c["flux"]),
        "fluxerr": _opt(c["fluxerr"]),
        "snr": _opt(c["snr"]),
        "visit": visit,
        "ccd": ccd,
        "anomaly_score": None,
        "edge": edge,
        "nightsift_version": version,
    }


def _packet(c, record: dict[str, Any], stamps: np.ndarray, *, survey: str, unit: str = "e-") -> dict[str, Any]:
    """The alert of table row ``c``: ids, its ``candidate`` record and the three cutouts of
    ``stamps`` (s, s, 3), whose headers give the stamp's 0-based corner on the CCD."""
    cid, pid = record["candid"], record["pid"]
    half = stamps.shape[0] // 2
    x0 = int(np.rint(c["xpos"])) - half
    y0 = int(np.rint(c["ypos"])) - half
    stamp_header = {"CANDID": cid, "X0": x0, "Y0": y0, "EDGE": record["edge"]}
    stem = f"candid{cid}_pid{pid}"
    diffname = "diffpos" if c["isdiffpos"] else "diffneg"
    return {
        "schemavsn": SCHEMA_VERSION,
        "publisher": PUBLISHER,
        "objectId": f"{survey}{cid}",
        "candid": cid,
        "candidate": record,
        "prv_candidates": None,
        "cutoutScience": make_cutout_record(stamps[..., 0], file_name=f"{stem}_targ_sci.fits.gz",
                                            header={**stamp_header, "BUNIT": unit}),
        "cutoutTemplate": make_cutout_record(stamps[..., 1], file_name=f"{stem}_ref.fits.gz", header=stamp_header),
        "cutoutDifference": make_cutout_record(stamps[..., 2], file_name=f"{stem}_targ_{diffname}.fits.gz",
                                               header={**stamp_header, "BUNIT": unit}),
    }
