"""Per-CCD-visit outcome records: one small JSON file per (visit, CCD), written atomically.

A rerun of a CCD-visit replaces its record (and its alert file), so a night that is interrupted and
started again never loses or duplicates work; :func:`read_ledger` lists what is done or failed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write


def record_path(output_dir, visit: int, ccd: int) -> Path:
    return Path(output_dir) / "records" / f"visit{visit:08d}_ccd{ccd:03d}.json"


def _clean(v: Any):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def write_record(output_dir, visit: int, ccd: int, *, status: str, error: str | None = None,
                 n_alerts: int = 0, alerts_path: str | None = None, qa: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Atomically write the outcome of one CCD-visit (``status``: done, failed, skipped); the record
    is readable like the alert files (``0o644`` under umask 022)."""
    if status not in ("done", "failed", "skipped"):
        raise ValueError(f"unknown status {status!r}")
    path = record_path(output_dir, visit, ccd)
    rec = {"visit": int(visit), "ccd": int(ccd), "status": status, "error": error, "n_alerts": int(n_alerts),
           "alerts_path": alerts_path, "qa": {k: _clean(v) for k, v in (qa or {}).items()}}
    rec.update({k: _clean(v) for k, v in (extra or {}).items()})
    return atomic_write(path, lambda fh: fh.write(json.dumps(rec, indent=1, sort_keys=True).encode()))


#: keys of an outcome record (:func:`~nightsift.engine.orchestration.task.run_ccd_visits`) kept in the
#: ledger beside the standard fields: how it ran, and its truth counts when it is done
_RUN_EXTRA = ("attempts", "slot", "wall_s")
_TRUTH_EXTRA = ("n_truth", "n_found", "n_truth_snr7", "n_found_snr7")


def write_outcome(output_dir, rec: dict, *, alerts_path: str | None = None) -> Path:
    """Write the ledger record of one outcome record ``rec`` (every night engine's).

    ``alerts_path`` (default ``rec["alerts_path"]``) is where its alert file was written. A
    CCD-visit that is not ``done`` is recorded with no alert file, no alerts and no truth counts.
    """
    done = rec["status"] == "done"
    extra = {k: rec[k] for k in _RUN_EXTRA + (_TRUTH_EXTRA if done else ()) if k in rec}
    return write_record(output_dir, rec["visit"], rec["ccd"], status=rec["status"], error=rec.get("error"),
                        n_alerts=rec.get("n_alerts", 0) if done else 0,
                        alerts_path=(alerts_path or rec.get("alerts_path")) if done else None, qa=rec.get("qa"),
                        extra=extra)


def discard(path) -> None:
    """Remove ``path`` (an alert file of an earlier run) if it exists: no alert file without a done record."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_ledger(output_dir) -> list[dict]:
    """All records under ``output_dir/records``, sorted by (visit, ccd)."""
    recs = [json.loads(p.read_text()) for p in sorted((Path(output_dir) / "records").glob("visit*_ccd*.json"))]
    return sorted(recs, key=lambda r: (r["visit"], r["ccd"]))
