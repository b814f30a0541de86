"""``nightsift label``: a local web page to label alerts real / bogus / interesting.

The page shows a queue of alerts ranked for labeling (:func:`priority`): first the ones the
classifier is least sure about (score near the operating threshold) and the most anomalous ones
(anomaly score high among the alerts). For the current alert it shows the three cutouts as PNG
images (:func:`stretch`: zscale lower limit and an asinh stretch that keeps faint sky and bright
cores visible; the difference symmetric about zero, grey = 0), its features, and buttons with the
keyboard shortcuts ``r`` (real), ``b`` (bogus), ``i`` (interesting), ``n``/``->`` next, ``p``/``<-``
previous. Each label goes to SQLite (:class:`~nightsift.engine.discover.labels.LabelStore`) with
the user and the UTC time; the page shows the progress.

Security (it is a local tool, but a browser visits other sites too):

* the server binds to 127.0.0.1 only;
* every request needs the random token printed at start (``?token=`` in the URL the page is
  opened with, which the page puts on its script, style and image links; the
  ``X-Nightsift-Token`` header for the API); a POST needs the header (a cross-site form cannot
  set it) and a JSON body;
* the ``Host`` header must be ``127.0.0.1:PORT`` or ``localhost:PORT`` (no DNS rebinding);
* responses carry ``Content-Security-Policy: default-src 'self'`` (no inline script) and
  ``Cache-Control: no-store``;
* a malformed request gets a 4xx with a JSON error, never a dropped connection: a ``candid`` is a
  JSON integer or a string of decimal digits in ``[0, 2**63 - 1]`` (``1e999``, ``1.5``, ``true``
  are 400s); every connection has a socket timeout (``timeout``, default 30 s), so an idle or
  slow client cannot hold a server thread forever.

Only the standard library serves it (:mod:`http.server`); PNGs are encoded here (:func:`encode_png`).
"""
from __future__ import annotations

import functools
import hmac
import json
import logging
import re
import secrets
import struct
import threading
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import InputError
from .labels import LABELS, LabelStore

__all__ = ["FEATURE_FIELDS", "CUTOUT_KINDS", "priority", "stretch", "encode_png", "load_alerts", "LabelQueue",
           "make_server", "LabelServer"]

log = logging.getLogger("nightsift.label")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: candidate fields shown beside the cutouts (those present in the packet)
FEATURE_FIELDS = ("magpsf", "sigmapsf", "snr", "scorr", "fwhm", "elong", "nbad", "isdiffpos", "distnr", "magnr",
                  "sky", "mindtoedge", "edge", "ra", "dec", "xpos", "ypos", "jd", "fid", "visit", "ccd")
#: cutout name in URLs -> packet field
CUTOUT_KINDS = {"science": "cutoutScience", "template": "cutoutTemplate", "difference": "cutoutDifference"}
_MAX_BODY = 16_384
#: largest candid (ZTF's are signed 64-bit integers)
_CANDID_MAX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")


# ----------------------------------------------------------------------------- pure functions

def priority(rb, anomaly, *, threshold: float, weight: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labeling priority of each alert: uncertainty and anomaly, both in [0, 1].

    Parameters
    ----------
    rb : array_like (n,) float
        Real/bogus scores in [0, 1] (NaN: not scored).
    anomaly : array_like (n,) float
        Anomaly scores, any scale, larger = more anomalous (NaN: none).
    threshold : float, keyword-only
        Operating threshold of the real/bogus score.
    weight : float, keyword-only
        Weight of the uncertainty; ``1 - weight`` that of the anomaly.

    Returns
    -------
    priority, uncertainty, anomaly_rank : ndarray (n,) float64
        ``uncertainty = 1 - |rb - threshold| / max(threshold, 1 - threshold)`` (1 at the threshold,
        0 at the farther end of [0, 1]); ``anomaly_rank`` = rank of the anomaly score among the
        finite ones, scaled to [0, 1] (1 = most anomalous); ``priority`` = their weighted mean, or
        the one that is defined, or 0 when neither is.
    """
    rb = np.asarray(rb, dtype=np.float64)
    an = np.asarray(anomaly, dtype=np.float64)
    if rb.shape != an.shape or rb.ndim != 1:
        raise ValueError(f"rb and anomaly must be 1-D of one length, got {rb.shape} and {an.shape}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    u = 1.0 - np.abs(np.clip(rb, 0, 1) - threshold) / max(threshold, 1.0 - threshold)
    a = np.full(an.shape, np.nan)
    fin = np.isfinite(an)
    k = int(fin.sum())
    if k == 1:
        a[fin] = 1.0
    elif k > 1:
        order = np.argsort(np.argsort(an[fin], kind="stable"), kind="stable")
        a[fin] = order / (k - 1)
    p = np.where(np.isfinite(u) & np.isfinite(a), weight * u + (1 - weight) * a,
                 np.where(np.isfinite(u), u, np.where(np.isfinite(a), a, 0.0)))
    return p, u, a


def stretch(image, *, symmetric: bool = False) -> np.ndarray:
    """An image to 8-bit grey for display: zscale and asinh.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        A cutout (e- or DN); NaN = no data.
    symmetric : bool, keyword-only
        For a difference image: zero maps to mid-grey, ``+-max|image|`` to white/black.

    Returns
    -------
    ndarray (ny, nx) uint8
        ``symmetric=False``: ``x`` = the image scaled so that the zscale lower limit is 0 and the
        maximum 1, shown as ``asinh(x / s) / asinh(1 / s)`` with the softening ``s`` chosen so
        that the zscale upper limit lands at half brightness (:func:`_softening`): the sky noise
        fills the lower grey levels and bright cores do not saturate. Linear when the zscale range
        is already half the full range or more. ``symmetric=True``: ``x = image / max|image|``
        in [-1, 1], shown as ``0.5 + 0.5 asinh(x / s) / asinh(1 / s)`` with ``s`` putting the
        zscale half-width at a quarter of the grey range from the middle. NaN pixels are 0 (black).
    """
    from astropy.visualization import ZScaleInterval

    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"stretch: image must be 2-D, got shape {a.shape}")
    fin = np.isfinite(a)
    out = np.zeros(a.shape, np.uint8)
    if not fin.any():
        return out
    v = a[fin]
    zlo, zhi = ZScaleInterval().get_limits(v)
    if symmetric:
        m = float(np.max(np.abs(v)))
        if m <= 0:
            out[fin] = 128
            return out
        soft = _softening(max(abs(zlo), abs(zhi)) / m)
        x = a / m
        y = 0.5 + 0.5 * (x if soft is None else np.arcsinh(x / soft) / np.arcsinh(1.0 / soft))
    else:
        lo, hi = float(zlo), float(np.max(v))
        if hi <= lo:
            out[fin] = 128
            return out
        soft = _softening(max((zhi - lo) / (hi - lo), 1e-12))
        x = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
        y = x if soft is None else np.arcsinh(x / soft) / np.arcsinh(1.0 / soft)
    out[fin] = np.round(np.clip(y[fin], 0.0, 1.0) * 255).astype(np.uint8)
    return out


def _softening(frac: float, target: float = 0.5) -> float | None:
    """Softening ``s`` of ``asinh(x / s) / asinh(1 / s)`` that maps ``x = frac`` to ``target``
    (bisection in log s; the map falls from 1 at s -> 0 to ``frac`` at s -> inf). ``None``
    (linear) when ``frac >= target``."""
    if frac >= target:
        return None
    lo, hi = -30.0, 3.0  # log10 s
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        s = 10.0 ** mid
        if np.arcsinh(frac / s) / np.arcsinh(1.0 / s) > target:
            lo = mid
        else:
            hi = mid
    return 10.0 ** (0.5 * (lo + hi))


def encode_png(gray: np.ndarray) -> bytes:
    """8-bit greyscale image ``(ny, nx) uint8`` -> PNG file bytes (no filter, zlib level 6)."""
    g = np.ascontiguousarray(gray, dtype=np.uint8)
    if g.ndim != 2 or 0 in g.shape:
        raise ValueError(f"encode_png: need a non-empty 2-D uint8 image, got shape {g.shape}")
    h, w = g.shape
    raw = np.hstack([np.zeros((h, 1), np.uint8), g]).tobytes()  # filter byte 0 before each row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- the queue

def load_alerts(path) -> list[tuple[dict, str]]:
    """``(alert, source file)`` for every alert of a ``.avro`` file or of every ``*.avro`` under a
    folder (sorted by name); a candid seen twice keeps its last packet.

    Raises
    ------
    InputError
        ``path`` missing, holding no ``.avro`` file, an unreadable file, or a packet without a
        ``candid`` (not the ZTF convention, e.g. Rubin's).
    """
    from ..io.avro import read_alerts

    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.avro"))
        if not files:
            raise InputError("no .avro alert files in this folder", path=str(p))
    elif p.exists():
        files = [p]
    else:
        raise InputError("alert file or folder not found", path=str(p))
    seen: dict[int, tuple[dict, str]] = {}
    for f in files:
        for a in read_alerts(f):
            if a.get("candid") is None:  # e.g. a Rubin packet (diaSource): not the ZTF convention served here
                raise InputError("not a ZTF-convention alert packet (no 'candid'; Rubin packets carry a "
                                 "diaSource instead): the labeling page serves nightsift and ZTF alerts", path=str(f))
            seen[int(a["candid"])] = (a, str(f))
    return list(seen.values())


def parse_candid(value) -> int | None:
    """A candid from a request: a JSON integer or a string of ASCII decimal digits in
    ``[0, 2**63 - 1]``; ``None`` for anything else (floats such as ``1e999`` or ``1.5``, booleans,
    signs, spaces, other digit scripts)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        n = int(value)
    else:
        return None
    return n if 0 <= n <= _CANDID_MAX else None


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def _json_value(v):
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v)
    return v if np.isfinite(v) else None


@dataclass
class _Item:
    candid: int
    source: str
    rb: float
    anomaly: float
    features: dict
    cutouts: dict


class LabelQueue:
    """Alerts ranked for labeling, their cutout PNGs, and the label store.

    Parameters
    ----------
    alerts : list of (alert dict, source str)
        As :func:`load_alerts` returns.
    store : LabelStore
    threshold : float
        Operating threshold of the real/bogus score (for the uncertainty).
    user : str
        Recorded with every label.
    weight : float
        Weight of uncertainty against anomaly in :func:`priority`.
    """

    def __init__(self, alerts, store: LabelStore, *, threshold: float, user: str, weight: float = 0.5):
        if not alerts:
            raise InputError("no alerts to label")
        items = []
        for alert, source in alerts:
            c = alert.get("candidate") or {}
            items.append(_Item(int(alert["candid"]), source, _float(c.get("rb")), _float(c.get("anomaly_score")),
                               {k: _json_value(c[k]) for k in FEATURE_FIELDS if k in c},
                               {k: alert.get(f) for k, f in CUTOUT_KINDS.items()}))
        p, u, a = priority([i.rb for i in items], [i.anomaly for i in items], threshold=threshold, weight=weight)
        order = sorted(range(len(items)), key=lambda k: (-p[k], items[k].candid))
        self.items = [items[k] for k in order]
        self.priority, self.uncertainty, self.anomaly_rank = p[order], u[order], a[order]
        self.by_candid = {it.candid: n for n, it in enumerate(self.items)}
        self.store = store
        self.threshold = float(threshold)
        self.user = str(user)
        self._png = functools.lru_cache(maxsize=4096)(self._make_png)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def progress(self) -> dict:
        latest = self.store.latest()
        mine = {c: lab for c, lab in latest.items() if c in self.by_candid}
        return {"labeled": len(mine), "total": len(self.items),
                "by_label": {lab: sum(v == lab for v in mine.values()) for lab in LABELS}}

    def queue(self) -> dict:
        latest = self.store.latest()
        items = []
        for n, it in enumerate(self.items):
            items.append({"candid": str(it.candid), "rb": _json_value(it.rb), "anomaly": _json_value(it.anomaly),
                          "priority": _json_value(self.priority[n]), "uncertainty": _json_value(self.uncertainty[n]),
                          "anomaly_rank": _json_value(self.anomaly_rank[n]), "features": it.features,
                          "source": Path(it.source).name, "label": latest.get(it.candid)})
        return {"items": items, "progress": self.progress(), "user": self.user, "threshold": self.threshold,
                "labels": list(LABELS)}

    def label(self, candid: int, label: str) -> dict:
        if candid not in self.by_candid:
            raise KeyError(candid)
        with self._lock:
            row = self.store.add(candid, label, user=self.user, source=self.items[self.by_candid[candid]].source)
        return {"ok": True, "row": row, "progress": self.progress()}

    def png(self, candid: int, kind: str) -> bytes:
        if candid not in self.by_candid:
            raise KeyError(candid)
        if kind not in CUTOUT_KINDS:
            raise KeyError(kind)
        return self._png(candid, kind)

    def _make_png(self, candid: int, kind: str) -> bytes:
        from ..io.avro import cutout_to_array

        it = self.items[self.by_candid[candid]]
        rec = it.cutouts.get(kind)
        img = np.full((63, 63), np.nan, np.float32) if rec is None else cutout_to_array(rec, path=it.source)
        return encode_png(stretch(img, symmetric=(kind == "difference")))


# ----------------------------------------------------------------------------- HTTP

_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/app.css": ("app.css", "text/css; charset=utf-8")}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class LabelServer(ThreadingHTTPServer):
    """The HTTP server of the labeling page (see the module docstring); ``url`` opens the page."""

    daemon_threads = True

    def __init__(self, queue: LabelQueue, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 timeout: float = 30.0):
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the labeling page binds to 127.0.0.1 only, not {host!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout!r}")
        super().__init__(("127.0.0.1", int(port)), _Handler)
        self.request_timeout = float(timeout)  #: socket timeout of each connection (s)
        self.queue = queue
        self.token = token or secrets.token_urlsafe(24)
        self.port = self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"


def make_server(alert_path, db_path, *, user: str, threshold: float, port: int = 0, token: str | None = None,
                weight: float = 0.5, timeout: float = 30.0) -> LabelServer:
    """Read the alerts, open the label database and bind the server (not yet serving: call
    ``serve_forever()``, in a thread for tests). ``timeout``: socket timeout of each connection (s)."""
    queue = LabelQueue(load_alerts(alert_path), LabelStore(db_path), threshold=threshold, user=user, weight=weight)
    return LabelServer(queue, port=port, token=token, timeout=timeout)


class _Handler(BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "nightsift-label"
    sys_version = ""

    def setup(self):
        self.timeout = self.server.request_timeout  # StreamRequestHandler sets it on the socket
        super().setup()

    def log_message(self, fmt, *args):  # requests go to the debug log, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- responses
    def _send(self, status: int, body: bytes, ctype: str):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in _SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str):
        self._json(status, {"ok": False, "error": message})

    # -- checks
    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        return host in (f"127.0.0.1:{self.server.port}", f"localhost:{self.server.port}")

    def _token_ok(self, *, header_only: bool) -> bool:
        given = self.headers.get("X-Nightsift-Token")
        if given is None and not header_only:
            given = (parse_qs(urlsplit(self.path).query).get("token") or [None])[0]
        return given is not None and hmac.compare_digest(given.encode(), self.server.token.encode())

    def _guard(self, *, header_only: bool = False) -> bool:
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "bad Host header")
            return False
        if not self._token_ok(header_only=header_only):
            self._error(HTTPStatus.FORBIDDEN, "missing or wrong token: open the URL printed by nightsift label")
            return False
        return True

    # -- routes
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if not self._guard():
            return
        path = urlsplit(self.path).path
        q = self.server.queue
        if path in _STATIC:
            name, ctype = _STATIC[path]
            body = (STATIC_DIR / name).read_bytes()
            if name == "index.html":  # its asset links carry the token too (every request needs it)
                body = body.replace(b"{{TOKEN}}", self.server.token.encode())
            return self._send(HTTPStatus.OK, body, ctype)
        if path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if path == "/api/queue":
            return self._json(HTTPStatus.OK, q.queue())
        if path == "/api/progress":
            return self._json(HTTPStatus.OK, q.progress())
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["api", "cutout"] and parts[3].endswith(".png"):
            candid = parse_candid(parts[2])
            if candid is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such candidate or cutout")
            try:
                png = q.png(candid, parts[3][:-4])
            except (KeyError, ValueError):
                return self._error(HTTPStatus.NOT_FOUND, "no such candidate or cutout")
            except InputError as e:
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(e))
            return self._send(HTTPStatus.OK, png, "image/png")
        return self._error(HTTPStatus.NOT_FOUND, f"no such page {path}")

    do_HEAD = do_GET

    def do_POST(self):  # noqa: N802
        if not self._guard(header_only=True):
            return
        if urlsplit(self.path).path != "/api/label":
            return self._error(HTTPStatus.NOT_FOUND, "POST goes to /api/label")
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 < n <= _MAX_BODY:
            return self._error(HTTPStatus.BAD_REQUEST, f"body must be 1..{_MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n))
            raw, lab = body["candid"], str(body["label"])
        except (ValueError, KeyError, TypeError, RecursionError):
            return self._error(HTTPStatus.BAD_REQUEST, 'body must be {"candid": ..., "label": ...}')
        candid = parse_candid(raw)
        if candid is None:
            return self._error(HTTPStatus.BAD_REQUEST, f"candid must be an integer in [0, {_CANDID_MAX}] (a JSON "
                                                       "integer or a string of digits)")
        if lab not in LABELS:
            return self._error(HTTPStatus.BAD_REQUEST, f"label must be one of {list(LABELS)}")
        try:
            res = self.server.queue.label(candid, lab)
        except KeyError:
            return self._error(HTTPStatus.NOT_FOUND, f"candid {candid} is not in this queue")
        return self._json(HTTPStatus.OK, res)
