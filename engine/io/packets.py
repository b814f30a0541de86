"""Alert packets of either survey, recognised per packet: ZTF (a ``candidate`` record) or Rubin (a
``diaSource``), read into one set of triplets and ZTF-named records.

:func:`read_packets` takes files and folders (``*.avro`` in a folder, by name), reads each alert
with :func:`nightsift.engine.io.avro.read_ztf_packet`'s triplet rules (ZTF) or
:func:`nightsift.engine.io.rubin.rubin_alert` (Rubin), and skips what it cannot read: a truncated
or non-Avro file, an empty one, an alert of an unknown schema, a missing or broken cutout. Each skip
is one line (``file: problem``) in :attr:`PacketSet.skipped`; when nothing at all can be read the
call raises one :class:`~nightsift.engine.errors.InputError`.

Each record carries ``survey`` (``"ztf"``/``"rubin"``), ``file`` (the packet file's name) and the
packet's own real/bogus score: ``own_score`` and ``own_score_name`` -- ZTF's ``drb`` (braai) where
the packet has it, else ZTF's ``rb``; Rubin's ``reliability``.

Real-data rule: survey packets are for measuring nightsift's classifier; never train on them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import InputError
from .rubin import is_rubin_alert, rubin_alert

__all__ = ["SURVEYS", "PacketSet", "packet_files", "read_packets"]

#: the surveys whose packets are recognised
SURVEYS = ("ztf", "rubin")
_ZTF_CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


@dataclass(frozen=True)
class PacketSet:
    """The readable alerts of some packet files.

    Attributes
    ----------
    triplets : ndarray (n, size, size, 3) float32
        Science, reference, difference (nightsift's sign convention), NaN = no data.
    records : list of dict (n,)
        Candidate records with ZTF's field names (module docstring), in file order.
    skipped : list of str
        One line per packet (or file) that could not be read: ``file: problem``.
    n_files : int
        Packet files looked at.
    braai_stamps : list or None
        With ``keep_stamps``: for each ZTF alert the three cutouts as stored (for braai's exact
        ZTF preprocessing); None for Rubin alerts.
    """

    triplets: np.ndarray
    records: list
    skipped: list = field(default_factory=list)
    n_files: int = 0
    braai_stamps: list | None = None


def packet_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The packet files of ``paths``: files as given, folders' ``*.avro`` by name.

    Raises
    ------
    InputError
        A path that does not exist, or no packet file at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.avro")))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError("no such file or folder of alert packets", path=str(p))
    if not files:
        raise InputError("no .avro alert packets here", path=", ".join(map(str, paths)))
    return files


def _survey(alert: Any) -> str | None:
    if is_rubin_alert(alert):
        return "rubin"
    if isinstance(alert, Mapping) and "candidate" in alert:
        return "ztf"
    return None


def _ztf_alert(alert: Mapping[str, Any], path: str, size: int) -> tuple[np.ndarray, dict]:
    """A ZTF alert's triplet (:func:`.avro.read_ztf_packet`'s rules) and candidate record; a null
    cutout is refused here (the chain's reader keeps it as NaN; a score of it would mean nothing)."""
    from .avro import ztf_triplet

    for key in _ZTF_CUTOUTS:
        rec = alert.get(key)
        if not rec or not rec.get("stampData"):
            raise InputError(f"{key} is missing", path=path)
    cand = dict(alert.get("candidate") or {})
    cand.setdefault("objectId", alert.get("objectId"))
    cand["survey"] = "ztf"
    return ztf_triplet(alert, path, size), cand


def _own_score(rec: dict) -> None:
    if rec["survey"] == "rubin":
        name = "reliability"
    else:
        name = "drb" if rec.get("drb") is not None else "rb"
    v = rec.get(name)
    rec["own_score_name"] = name
    rec["own_score"] = None if v is None or not np.isfinite(v) else float(v)


def _braai_stamps(alert: Mapping[str, Any], path: str) -> tuple:
    from .avro import cutout_to_array

    return tuple(cutout_to_array(alert[k], path=path) for k in _ZTF_CUTOUTS)


#: what a broken packet can raise while it is decoded (beside InputError)
_DECODE_ERRORS = (InputError, ValueError, TypeError, KeyError, IndexError, AttributeError, OSError, EOFError)


def read_packets(paths, *, size: int = 63, surveys: tuple[str, ...] = SURVEYS,
                 keep_stamps: bool = False) -> PacketSet:
    """Read the alerts of ``paths`` (files or folders of ``*.avro``), each by its own schema.

    Parameters
    ----------
    paths : path or iterable of paths
    size : int
        Side of the triplets (63, as ZTF and braai).
    surveys : tuple of str
        Surveys to keep; an alert of another survey is skipped with a line.
    keep_stamps : bool
        Keep ZTF's cutouts as stored (:attr:`PacketSet.braai_stamps`).

    Notes
    -----
    An alert whose ``candid`` was read already (the same packet twice, as in two of ../shared's
    alerts_drb files) is skipped with a line naming both files: every figure counts an alert once.

    Raises
    ------
    InputError
        A path that does not exist, or not one readable alert (the message gives the count and
        the first problem).
    """
    from .avro import read_alerts

    files = packet_files(paths)
    trips, recs, stamps, skipped = [], [], [], []
    seen: dict[tuple[str, int], str] = {}  # (survey, candid) -> where first read
    for f in files:
        try:
            alerts = read_alerts(f)
        except InputError as e:
            skipped.append(f"{f.name}: {_short(e, f)}")
            continue
        if not alerts:
            skipped.append(f"{f.name}: holds no alert")
            continue
        for i, alert in enumerate(alerts):
            where = f.name if len(alerts) == 1 else f"{f.name}[{i}]"
            survey = _survey(alert)
            if survey is None:
                keys = ", ".join(list(alert)[:6]) if isinstance(alert, Mapping) else type(alert).__name__
                skipped.append(f"{where}: unknown alert schema (fields {keys}, ...; expected ZTF's 'candidate' "
                               "or Rubin's 'diaSource')")
                continue
            if survey not in surveys:
                skipped.append(f"{where}: a {survey} packet, not {'/'.join(surveys)}")
                continue
            try:
                if survey == "rubin":
                    trip, rec = rubin_alert(alert, path=str(f), size=size)
                else:
                    trip, rec = _ztf_alert(alert, str(f), size)
                st = _braai_stamps(alert, str(f)) if keep_stamps and survey == "ztf" else None
            except _DECODE_ERRORS as e:
                skipped.append(f"{where}: {_short(e, f)}")
                continue
            key = (survey, rec.get("candid"))
            if key[1] is not None and key in seen:  # one alert counted once in every figure
                skipped.append(f"{where}: candid {key[1]} read already from {seen[key]} (duplicate packet)")
                continue
            seen[key] = where
            rec["file"] = f.name
            _own_score(rec)
            trips.append(trip)
            recs.append(rec)
            stamps.append(st)
    if not recs:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise InputError(f"none of {len(files)} packet file(s) could be read{first}",
                         path=str(files[0].parent) if len(files) > 1 else str(files[0]))
    return PacketSet(triplets=np.stack(trips).astype(np.float32, copy=False), records=recs, skipped=skipped,
                     n_files=len(files), braai_stamps=stamps if keep_stamps else None)


def _short(e: Exception, f: Path) -> str:
    """The problem of ``e`` on one line, without the file path InputError puts first."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    for prefix in (f"{f}: ", f"{f.name}: "):
        msg = msg.removeprefix(prefix)
    if not isinstance(e, InputError):
        msg = f"{type(e).__name__}: {msg}"
    # the Avro reader's advice is for nightsift's own packets (rerun the CCD): not for a survey's
    head, sep, _ = msg.partition("; the file is corrupt or truncated")
    return f"{head}; truncated, or not an Avro alert packet: fetch it again" if sep else msg
