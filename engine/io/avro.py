"""Avro alert packets in the ZTF convention: write and read nightsift alerts, read real ZTF packets.

The schema files sit beside this module in ``schema/`` (shipped as package data), one file per
named type, named ``<full name>.avsc`` so :func:`fastavro.schema.load_schema` resolves the
references between them:

* ``nightsift.alert.avsc`` -- the packet: ``schemavsn``, ``publisher``, ``objectId``, ``candid``,
  ``candidate``, ``prv_candidates`` (nullable array, null for now), ``cutoutScience``,
  ``cutoutTemplate``, ``cutoutDifference`` (as ``ztf.alert``);
* ``nightsift.alert.candidate.avsc`` -- ZTF candidate field names, types and meanings where a field
  exists (``candid``, ``jd``, ``fid``, ``pid``, ``ra``, ``dec``, ``magpsf``, ``isdiffpos`` 't'/'f',
  ``xpos``/``ypos`` 1-based as ZTF, ``rb``, ``drb``, ...), nightsift fields (``flux``, ``scorr``,
  ``visit``, ``ccd``, ``anomaly_score``, ``edge``, ...) nullable with null defaults;
* ``nightsift.alert.prv_candidate.avsc``, ``nightsift.alert.cutout.avsc``
  (``fileName`` + ``stampData``: gzipped FITS bytes, as ZTF).

Unions are written ``["null", T]`` with default null (the Avro rule: a default matches the first
branch); ZTF writes ``[T, "null"]``, which readers resolve to the same data.

One file holds the alerts of one CCD of one visit (:func:`alert_path`); it is written atomically,
so a rerun replaces it and a crash never leaves a half-written packet file behind.
"""
from __future__ import annotations

import functools
import gzip
import io
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import fastavro
import fastavro.read
import fastavro.schema
import fastavro.validation
import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

from .atomic import atomic_write
from ..errors import InputError

__all__ = [
    "SCHEMA_DIR",
    "SCHEMA_VERSION",
    "ZTF_STAMP_SIZE",
    "alert_schema",
    "alert_path",
    "write_alerts",
    "read_alerts",
    "make_cutout_record",
    "cutout_to_array",
    "read_ztf_packet",
    "iter_ztf_packets",
]

#: folder of the ``.avsc`` files (package data)
SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
#: value of the ``schemavsn`` field of nightsift packets
SCHEMA_VERSION = "nightsift-0.1"
#: side of ZTF cutouts (pixels)
ZTF_STAMP_SIZE = 63

_CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


@functools.lru_cache(maxsize=1)
def alert_schema() -> dict:
    """The parsed nightsift alert schema (``nightsift.alert``), loaded once from ``SCHEMA_DIR``.

    Returns
    -------
    dict
        A fastavro parsed schema, usable with :func:`fastavro.writer` and
        :func:`fastavro.validation.validate`. Do not modify it (it is cached).
    """
    return fastavro.schema.load_schema(SCHEMA_DIR / "nightsift.alert.avsc")


def alert_path(output_dir: str | os.PathLike, visit: int, ccd: int) -> Path:
    """Deterministic packet file of one CCD of one visit: ``output_dir/visit{visit:08d}_ccd{ccd:03d}.avro``.

    The same (visit, ccd) always maps to the same file, so a rerun replaces it instead of adding
    duplicate alerts.
    """
    visit, ccd = int(visit), int(ccd)
    if visit < 0 or ccd < 0:
        raise ValueError(f"visit and ccd must be >= 0, got visit={visit}, ccd={ccd}")
    return Path(output_dir) / f"visit{visit:08d}_ccd{ccd:03d}.avro"


def write_alerts(path: str | os.PathLike, alerts: list[dict], *, codec: str = "null", validate: bool = True) -> Path:
    """Write alert records to one Avro container file, atomically.

    The records go to a temporary file in the same folder, which is flushed, synced and then
    renamed over ``path`` (:func:`os.replace`): readers see the old file or the new one, never
    a partial one, and no temporary file is left behind, also when writing fails. The file is
    readable like the FITS products (``0o644`` under umask 022; :func:`~.atomic.atomic_write`), so
    a broker running as another user can read it.

    Parameters
    ----------
    path : str or PathLike
        Destination file (usually :func:`alert_path`); its folder is created if missing.
    alerts : list of dict
        Records matching :func:`alert_schema` (as made by
        :func:`nightsift.engine.stages.package.build_alerts`). An empty list writes a valid
        container file with the schema and no records.
    codec : str, keyword-only
        Avro block codec; ``"null"`` as ZTF (the cutouts are already gzipped).
    validate : bool, keyword-only
        Check every record against the schema while writing (about 0.85 ms per alert on one CPU
        core, half the cost of building it); turn off only for records known to be valid.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        If a record does not match the schema (the message names the field and the file).
    """
    path = Path(path)

    def write(fh):
        try:
            fastavro.writer(fh, alert_schema(), alerts, codec=codec, validator=validate)
        except (fastavro.validation.ValidationError, ValueError, TypeError) as e:
            raise InputError(f"alert record does not match the nightsift schema: {e}", path=str(path)) from None

    return atomic_write(path, write)


def _read_records(path: Path) -> tuple[list[dict], dict]:
    try:
        with open(path, "rb") as fh:
            reader = fastavro.reader(fh)
            return list(reader), reader.writer_schema
    except FileNotFoundError:
        raise InputError("alert file not found", path=str(path)) from None
    except (OSError, ValueError, EOFError, TypeError, KeyError, IndexError, UnicodeDecodeError,
            fastavro.read.SchemaResolutionError) as e:
        raise InputError(
            f"not a readable Avro container file ({type(e).__name__}: {e}); the file is corrupt or "
            "truncated: delete it and rerun the CCD that wrote it",
            path=str(path),
        ) from None


def read_alerts(path: str | os.PathLike) -> list[dict]:
    """Read every alert record of an Avro container file.

    Returns
    -------
    list of dict
        The records as written (cutouts still gzipped FITS bytes: see :func:`cutout_to_array`).
        An empty container file gives ``[]``.

    Raises
    ------
    InputError
        If the file is missing, truncated or not Avro (the message names the file).
    """
    return _read_records(Path(path))[0]


def make_cutout_record(array, *, file_name: str, header: Mapping[str, Any] | fits.Header | None = None) -> dict:
    """A cutout record as ZTF writes it: ``{"fileName", "stampData"}`` with gzipped FITS bytes.

    Parameters
    ----------
    array : ndarray (ny, nx)
        The cutout, stored as a float32 primary HDU (NaN kept: it marks padding outside the CCD).
    file_name : str, keyword-only
        Name recorded in ``fileName`` (ZTF: ``candid<candid>_pid<pid>_targ_sci.fits.gz``).
    header : mapping or astropy Header, optional, keyword-only
        Extra FITS cards (``BUNIT``, ...); keys must be valid FITS keywords.

    Returns
    -------
    dict
        ``{"fileName": str, "stampData": bytes}``. The bytes are reproducible: the gzip stream has
        no timestamp, so the same array gives the same bytes.
    """
    data = np.asarray(array, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"a cutout must be 2-D (ny, nx), got shape {data.shape}")
    # A one-HDU FITS file written directly, 3x faster than PrimaryHDU.writeto (the same file but for
    # card comments and EXTEND): 80-character header cards padded to 2880 bytes, then big-endian
    # float32 data padded likewise.
    hdr = fits.Header()
    hdr["SIMPLE"] = True
    hdr["BITPIX"] = -32
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = data.shape[1]
    hdr["NAXIS2"] = data.shape[0]
    if header is not None:
        for key, value in (header.items() if hasattr(header, "items") else header):
            hdr[key] = value
    body = data.astype(">f4").tobytes()
    body += b"\0" * (-len(body) % 2880)
    raw = hdr.tostring().encode("ascii") + body
    return {"fileName": str(file_name), "stampData": gzip.compress(raw, mtime=0)}


def cutout_to_array(record: Mapping[str, Any], *, path: str | None = None) -> np.ndarray:
    """Decode a cutout record (gzipped or plain FITS bytes) to a native float32 array.

    Parameters
    ----------
    record : dict
        ``{"fileName": ..., "stampData": bytes}`` (nightsift or ZTF).
    path : str, optional, keyword-only
        The packet file, named in error messages.

    Returns
    -------
    ndarray (ny, nx) float32
        The image of the first HDU holding data (63 x 63 for most ZTF cutouts, smaller at CCD edges).

    Raises
    ------
    InputError
        If the bytes are not (gzipped) FITS with a 2-D image.
    """
    raw = record["stampData"]
    name = record.get("fileName", "?")
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        with warnings.catch_warnings():
            # ZTF stamps have a SIMPLE card astropy finds non-standard: harmless
            warnings.simplefilter("ignore", VerifyWarning)
            with fits.open(io.BytesIO(raw), memmap=False) as hdul:
                data = next((h.data for h in hdul if h.data is not None), None)
                data = None if data is None else np.array(data, dtype=np.float32)
    except (OSError, ValueError, EOFError, TypeError, IndexError) as e:
        raise InputError(f"cutout {name!r} is not valid (gzipped) FITS ({e})", path=path) from None
    if data is None or data.ndim != 2:
        raise InputError(f"cutout {name!r} holds no 2-D image", path=path)
    return data


def _pad_ztf(stamp: np.ndarray, pos_x: float, pos_y: float, size: int) -> np.ndarray:
    """Pad a ZTF cutout truncated at a CCD edge back to ``size x size`` with NaN.

    ZTF cuts the stamps off where the CCD ends, so the missing rows (columns) are on the side of
    the CCD edge the candidate is near. ZTF ``xpos``/``ypos`` are 1-based: a candidate whose
    0-based position ``pos - 1`` is less than ``size // 2`` lost pixels at the low side (pad
    before), any other lost them at the high side (pad after). That keeps the candidate on the
    stamp's centre pixel (checked on the 7 truncated packets of the shared sample).
    """
    ny, nx = stamp.shape
    half = size // 2
    pads = []
    for n, pos in ((ny, pos_y), (nx, pos_x)):
        missing = size - n
        low = pos is not None and np.isfinite(pos) and (pos - 1.0) < half
        pads.append((missing, 0) if low else (0, missing))
    return np.pad(stamp, pads, mode="constant", constant_values=np.nan)


def ztf_triplet(alert: dict, path: str, size: int) -> np.ndarray:
    cand = alert.get("candidate") or {}
    chans = []
    for key in _CUTOUTS:
        rec = alert.get(key)
        if rec is None:  # ZTF cutouts are nullable: a missing one is all NaN
            chans.append(np.full((size, size), np.nan, np.float32))
            continue
        stamp = cutout_to_array(rec, path=path)
        if stamp.shape[0] > size or stamp.shape[1] > size:
            raise InputError(f"{key} is {stamp.shape}, larger than {size}x{size}", path=path)
        if stamp.shape != (size, size):
            stamp = _pad_ztf(stamp, cand.get("xpos"), cand.get("ypos"), size)
        chans.append(stamp)
    return np.stack(chans, axis=-1).astype(np.float32, copy=False)


def read_ztf_packet(path: str | os.PathLike, *, size: int = ZTF_STAMP_SIZE) -> tuple[np.ndarray, dict]:
    """Read one real ZTF alert packet (schema 3.x) into a cutout triplet and its candidate.

    Parameters
    ----------
    path : str or PathLike
        A ZTF ``.avro`` packet (one alert per file; with more, the first is read).
    size : int, keyword-only
        Side of the returned cutouts (63 as ZTF).

    Returns
    -------
    triplet : ndarray (size, size, 3) float32
        Channels (science, reference, difference) = ZTF (cutoutScience, cutoutTemplate,
        cutoutDifference), in ZTF units (DN), NaN untouched. Cutouts that ZTF truncated at a CCD
        edge (e.g. 63 x 44) are padded back to ``size x size`` with NaN on the side of the edge
        (see ``_pad_ztf``), so the candidate stays on the centre pixel; a null cutout is all NaN.
    candidate : dict
        The ``candidate`` record as ZTF wrote it (``rb``, ``magpsf``, ``isdiffpos``, 1-based
        ``xpos``/``ypos``, ...), plus ``objectId`` copied from the packet.

    Raises
    ------
    InputError
        If the file is missing, not Avro, holds no alert or a bad cutout (naming the file).
    """
    path = Path(path)
    records, _ = _read_records(path)
    if not records:
        raise InputError("Avro file holds no alert", path=str(path))
    alert = records[0]
    cand = dict(alert.get("candidate") or {})
    cand.setdefault("objectId", alert.get("objectId"))
    return ztf_triplet(alert, str(path), size), cand


def iter_ztf_packets(directory: str | os.PathLike, *, size: int = ZTF_STAMP_SIZE) -> Iterator[tuple[Path, np.ndarray, dict]]:
    """Yield ``(path, triplet, candidate)`` for every alert of every ``*.avro`` file, by file name.

    ``triplet`` and ``candidate`` are as :func:`read_ztf_packet`. Raises :class:`InputError` if
    ``directory`` does not exist, or on the first unreadable file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("not a folder of ZTF .avro packets", path=str(directory))
    for p in sorted(directory.glob("*.avro")):
        records, _ = _read_records(p)
        for alert in records:
            cand = dict(alert.get("candidate") or {})
            cand.setdefault("objectId", alert.get("objectId"))
            yield p, ztf_triplet(alert, str(p), size), cand
