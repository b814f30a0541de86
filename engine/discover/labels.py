"""Expert labels in SQLite: who said what about which candidate, and when.

One table, append-only (a relabel adds a row; the latest row of a candidate is its label)::

    labels(id INTEGER PRIMARY KEY, candid INTEGER, label TEXT, user TEXT, time TEXT, source TEXT)

``label`` is one of :data:`LABELS`; ``time`` is ISO 8601 UTC (``2026-11-26T23:59:01.123456+00:00``);
``source`` names where the alert came from (the alert file), for the record. The file is a plain
SQLite database: ``sqlite3 labels.sqlite 'select * from labels'`` reads it. A new database is
created readable by its owner only (``0o600``: labels carry user names); SQLite gives its journal
files the database's permissions.

Each call opens its own connection (the labeling page serves requests from several threads), with
a busy timeout so that concurrent writers wait instead of failing.
"""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError

__all__ = ["LABELS", "LabelStore"]

#: the labels an expert can give
LABELS = ("real", "bogus", "interesting")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    candid INTEGER NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('real', 'bogus', 'interesting')),
    user TEXT NOT NULL,
    time TEXT NOT NULL,
    source TEXT
);
CREATE INDEX IF NOT EXISTS labels_candid ON labels (candid);
"""


class LabelStore:
    """The label database at ``path`` (created with its table when missing).

    Raises
    ------
    InputError
        If ``path`` exists but is not a nightsift label database (not SQLite, or a ``labels``
        table of another shape).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # create it private before SQLite opens it (SQLite would create it 0o644 under umask 022)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise InputError(f"cannot create the label database ({e.strerror or e})", path=str(self.path)) from None
        try:
            with closing(self._connect()) as con, con:
                con.executescript(_SCHEMA)
                cols = [r[1] for r in con.execute("PRAGMA table_info(labels)")]
        except sqlite3.DatabaseError as e:
            raise InputError(f"not a SQLite label database ({e})", path=str(self.path)) from None
        want = ["id", "candid", "label", "user", "time", "source"]
        if cols != want:
            raise InputError(f"table 'labels' has columns {cols}, expected {want}", path=str(self.path))

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10.0)

    def add(self, candid: int, label: str, *, user: str, time: datetime | None = None, source: str | None = None) -> dict:
        """Record one label; returns the row as a dict.

        Raises
        ------
        ValueError
            ``label`` not in :data:`LABELS`, or an empty ``user``.
        """
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if not user or not str(user).strip():
            raise ValueError("user must be a non-empty name")
        t = (time or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat()
        with closing(self._connect()) as con, con:
            cur = con.execute("INSERT INTO labels (candid, label, user, time, source) VALUES (?, ?, ?, ?, ?)",
                              (int(candid), label, str(user).strip(), t, source))
            rid = cur.lastrowid
        return {"id": rid, "candid": int(candid), "label": label, "user": str(user).strip(), "time": t, "source": source}

    def rows(self) -> list[dict]:
        """Every label row, oldest first."""
        with closing(self._connect()) as con:
            cur = con.execute("SELECT id, candid, label, user, time, source FROM labels ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def latest(self) -> dict[int, str]:
        """``{candid: label}`` from each candidate's latest row."""
        with closing(self._connect()) as con:
            cur = con.execute("SELECT candid, label FROM labels WHERE id IN (SELECT MAX(id) FROM labels GROUP BY candid)")
            return {int(c): str(lab) for c, lab in cur.fetchall()}

    def real_bogus(self, *, interesting: str = "skip") -> tuple[dict[int, int], int]:
        """Each candidate's latest label as ``1`` (real) or ``0`` (bogus), for training or as a
        reference; an ``interesting`` one is left out (``"skip"``) or read as ``"real"``/``"bogus"``.
        Returns ``({candid: 0 or 1}, number of interesting labels left out)``.

        Raises
        ------
        ValueError
            ``interesting`` not one of skip, real, bogus.
        """
        if interesting not in ("skip", "real", "bogus"):
            raise ValueError(f"interesting must be skip, real or bogus, got {interesting!r}")
        out, skipped = {}, 0
        for candid, lab in self.latest().items():
            if lab == "interesting":
                if interesting == "skip":
                    skipped += 1
                    continue
                lab = interesting
            out[candid] = 1 if lab == "real" else 0
        return out, skipped

    def __len__(self) -> int:
        with closing(self._connect()) as con:
            return int(con.execute("SELECT COUNT(*) FROM labels").fetchone()[0])
