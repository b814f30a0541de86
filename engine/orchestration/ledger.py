"""Per-CCD-visit outcome records: one small JSON file per (visit, CCD), written atomically.

A rerun of a CCD-visit replaces its record (and its alert file), so a night that is interrupted and
started again never loses or duplicates work; :func:`read_ledger` lists what is done or failed.
"""
from __future__ import annotations

import json
import math
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


def read_ledger(output_dir) -> list[dict]:
    """All records under ``output_dir/records``, sorted by (visit, ccd)."""
    recs = [json.loads(p.read_text()) for p in sorted((Path(output_dir) / "records").glob("visit*_ccd*.json"))]
    return sorted(recs, key=lambda r: (r["visit"], r["ccd"]))
