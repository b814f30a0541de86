"""The labeling app: ranking, stretch, PNG, SQLite store, the HTTP API (urllib) and the page in a
real headless browser (Chromium through Selenium; skipped with the reason where either is absent)."""
from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import threading
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from nightsift.engine.discover.app import encode_png, make_server, priority, stretch
from nightsift.engine.discover.labels import LabelStore

THRESHOLD = 0.4
N_ALERTS = 12


# ----------------------------------------------------------------------------- pure pieces

def test_priority_uncertainty_and_anomaly():
    rb = np.array([0.4, 0.0, 1.0, 0.7, np.nan, np.nan])
    an = np.array([0.0, 1.0, 2.0, np.nan, 3.0, np.nan])
    p, u, a = priority(rb, an, threshold=0.4, weight=0.5)
    np.testing.assert_allclose(u[:4], [1.0, 1 - 0.4 / 0.6, 0.0, 0.5])
    np.testing.assert_allclose(a[[0, 1, 2, 4]], [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(p, [0.5, 0.5 * (1 / 3) + 0.5 * (1 / 3), 1 / 3, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="threshold"):
        priority(rb, an, threshold=1.0)


def test_label_store_real_bogus_reads_each_latest_label(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    for candid, lab in ((1, "bogus"), (1, "real"), (2, "bogus"), (3, "interesting"), (4, "real"), (4, "interesting")):
        store.add(candid, lab, user="x")
    assert store.real_bogus() == ({1: 1, 2: 0}, 2)  # the latest counts; interesting left out
    assert store.real_bogus(interesting="bogus") == ({1: 1, 2: 0, 3: 0, 4: 0}, 0)
    assert store.real_bogus(interesting="real") == ({1: 1, 2: 0, 3: 1, 4: 1}, 0)
    with pytest.raises(ValueError, match="interesting must be skip, real or bogus"):
        store.real_bogus(interesting="maybe")


def test_stretch_ranges():
    rng = np.random.default_rng(1)
    img = rng.normal(100, 5, (63, 63))
    img[31, 31] = 1e5  # a bright core does not wash out the sky
    img[0, :5] = np.nan
    g = stretch(img)
    assert g.dtype == np.uint8 and g[31, 31] == 255 and (g[0, :5] == 0).all()
    assert 20 < np.median(g) < 200  # the sky sits in the grey levels, not black or white
    d = rng.normal(0, 5, (63, 63))
    d[31, 31], d[10, 10] = 500, -500
    gd = stretch(d, symmetric=True)
    assert gd[31, 31] == 255 and gd[10, 10] == 0 and abs(int(np.median(gd)) - 128) < 20
    assert (stretch(np.full((5, 5), np.nan)) == 0).all()


def _decode_png(data: bytes) -> np.ndarray:
    """Minimal reader of the greyscale PNGs encode_png writes (the oracle is the PNG spec)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", None, None
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if tag == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert (depth, ctype) == (8, 0)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def test_encode_png_roundtrip():
    g = (np.arange(63 * 40) % 256).astype(np.uint8).reshape(40, 63)
    np.testing.assert_array_equal(_decode_png(encode_png(g)), g)
    import io

    from PIL import Image  # a second, independent reader (Pillow: installed with matplotlib, a dependency)

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(g)))), g)


def test_label_store(tmp_path):
    s = LabelStore(tmp_path / "l.sqlite")
    s.add(5, "real", user="ana")
    s.add(5, "bogus", user="ben")
    s.add(7, "interesting", user="ana")
    assert s.latest() == {5: "bogus", 7: "interesting"} and len(s) == 3
    rows = s.rows()
    assert [r["user"] for r in rows] == ["ana", "ben", "ana"] and rows[0]["time"].endswith("+00:00")
    with pytest.raises(ValueError):
        s.add(1, "maybe", user="ana")
    with pytest.raises(ValueError):
        s.add(1, "real", user=" ")
    (tmp_path / "x.sqlite").write_bytes(b"not a database at all, no indeed" * 40)
    from nightsift.engine.errors import InputError

    with pytest.raises(InputError, match="x.sqlite"):
        LabelStore(tmp_path / "x.sqlite")


# ----------------------------------------------------------------------------- a server on synthetic alerts

def _write_alerts(path):
    """N_ALERTS packets with cutouts (a star in the science, a residual in the difference),
    real/bogus scores and anomaly scores."""
    from nightsift.engine.io.avro import write_alerts
    from nightsift.engine.records import empty_candidates
    from nightsift.engine.stages.cutouts import triplets_of
    from nightsift.engine.stages.package import build_alerts

    rng = np.random.default_rng(7)
    ny = nx = 256
    yy, xx = np.mgrid[:ny, :nx]
    c = empty_candidates(N_ALERTS)
    c["xpos"] = rng.uniform(40, 216, N_ALERTS)
    c["ypos"] = rng.uniform(40, 216, N_ALERTS)
    c["snr"] = rng.uniform(5, 50, N_ALERTS)
    c["flux"], c["fluxerr"], c["fwhm"], c["elong"] = 1000.0, 50.0, 3.5, 1.1
    c["magpsf"], c["sigmapsf"], c["scorr"], c["isdiffpos"] = 20.0, 0.05, 8.0, True
    c["distnr"] = c["magnr"] = -999.0
    sci = rng.normal(200, 10, (ny, nx)).astype(np.float32)
    ref = rng.normal(200, 5, (ny, nx)).astype(np.float32)
    diff = rng.normal(0, 10, (ny, nx)).astype(np.float32)
    for x, y in zip(c["xpos"], c["ypos"]):
        g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2)).astype(np.float32)
        sci += 2000 * g
        diff += 1500 * g
    rb = np.linspace(0.0, 1.0, N_ALERTS)
    anomaly = rng.uniform(0.3, 0.6, N_ALERTS)
    anomaly[0] = 0.95  # a confidently bogus but very odd one
    alerts = build_alerts(c, triplets=triplets_of(c, sci, ref, diff), shape=sci.shape, header={"MJD-OBS": 60000.0},
                          visit=3, ccd=1, scores={"rb": rb, "anomaly_score": anomaly}).value
    write_alerts(path, alerts)
    return alerts


@pytest.fixture
def server(tmp_path):
    alerts = _write_alerts(tmp_path / "alerts" / "visit00000003_ccd001.avro")
    srv = make_server(tmp_path / "alerts", tmp_path / "labels.sqlite", user="tester", threshold=THRESHOLD)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, alerts, tmp_path / "labels.sqlite"
    srv.shutdown()
    srv.server_close()
    t.join(5)


def _get(srv, path, *, token=True, header=False, host=None):
    url = f"http://127.0.0.1:{srv.port}{path}"
    headers = {}
    if token and header:
        headers["X-Nightsift-Token"] = srv.token
    elif token:
        url += ("&" if "?" in url else "?") + f"token={srv.token}"
    if host:
        headers["Host"] = host
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers, r.read()


def _post(srv, body, *, token=True, ctype="application/json"):
    headers = {"Content-Type": ctype}
    if token:
        headers["X-Nightsift-Token"] = token if isinstance(token, str) else srv.token
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/label", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def _status(fn, *a, **k) -> int:
    try:
        return fn(*a, **k)[0]
    except urllib.error.HTTPError as e:
        e.close()  # it holds the response socket
        return e.code


def test_http_token_host_and_binding(server):
    srv, _, _ = server
    assert srv.server_address[0] == "127.0.0.1"
    assert srv.url.startswith(f"http://127.0.0.1:{srv.port}/?token=") and len(srv.token) >= 32
    assert _status(_get, srv, "/", token=False) == 403
    assert _status(_get, srv, "/api/queue?token=wrong", token=False) == 403
    assert _status(_get, srv, "/api/queue", host="evil.example:80") == 403
    st, headers, body = _get(srv, "/")
    assert st == 200 and b"app.js" in body and "default-src 'self'" in headers["Content-Security-Policy"]
    assert _get(srv, "/api/queue", header=True)[0] == 200
    # a POST needs the header: a token in the query string is not enough
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/label?token={srv.token}",
                                 data=b'{"candid": 1, "label": "real"}', headers={"Content-Type": "application/json"},
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403
    e.value.close()
    assert _status(_post, srv, {"candid": 1, "label": "real"}, token="nope") == 403


def test_http_queue_ranking_and_cutouts(server):
    srv, alerts, _ = server
    q = json.loads(_get(srv, "/api/queue")[2])
    assert q["threshold"] == THRESHOLD and q["user"] == "tester"
    items = q["items"]
    assert len(items) == N_ALERTS and q["progress"] == {"labeled": 0, "total": N_ALERTS,
                                                          "by_label": {"real": 0, "bogus": 0, "interesting": 0}}
    pr = [it["priority"] for it in items]
    assert pr == sorted(pr, reverse=True)
    rb = np.array([a["candidate"]["rb"] for a in alerts])
    an = np.array([a["candidate"]["anomaly_score"] for a in alerts])
    want, _, _ = priority(rb, an, threshold=THRESHOLD)
    assert items[0]["candid"] == str(alerts[int(np.argmax(want))]["candid"])
    # the most anomalous alert ranks high although its score is far from the threshold
    odd = str(alerts[0]["candid"])
    assert [it["candid"] for it in items].index(odd) < N_ALERTS // 2
    assert {"snr", "fwhm", "elong", "magpsf"} <= set(items[0]["features"])
    for kind in ("science", "template", "difference"):
        st, headers, png = _get(srv, f"/api/cutout/{items[0]['candid']}/{kind}.png")
        assert st == 200 and headers["Content-Type"] == "image/png"
        img = _decode_png(png)
        assert img.shape == (63, 63)
        if kind != "template":  # the reference has no source: the transient is new
            assert img[31, 31] > np.quantile(img, 0.95)
    assert _status(_get, srv, "/api/cutout/123/science.png") == 404
    assert _status(_get, srv, f"/api/cutout/{items[0]['candid']}/other.png") == 404


def test_http_label_goes_to_sqlite(server):
    srv, alerts, db = server
    cid = str(alerts[3]["candid"])
    st, res = _post(srv, {"candid": cid, "label": "interesting"})
    assert st == 200 and res["progress"]["labeled"] == 1 and res["progress"]["by_label"]["interesting"] == 1
    assert _status(_post, srv, {"candid": cid, "label": "maybe"}) == 400
    assert _status(_post, srv, {"candid": "999", "label": "real"}) == 404
    assert _status(_post, srv, {"candid": cid, "label": "real"}, ctype="text/plain") == 415
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT candid, label, user, time FROM labels").fetchall()
    assert rows[0][:3] == (int(cid), "interesting", "tester") and "T" in rows[0][3]
    q = json.loads(_get(srv, "/api/queue")[2])
    assert next(it for it in q["items"] if it["candid"] == cid)["label"] == "interesting"


# ----------------------------------------------------------------------------- the page in a real browser

def _browser():
    """A headless Chromium driven by Selenium, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; see README: browser test)")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_browser_label_with_keys(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv, _, db = server
    drv = _browser()
    try:
        drv.get(srv.url)
        WebDriverWait(drv, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        order = json.loads(_get(srv, "/api/queue")[2])["items"]
        assert drv.find_element(By.ID, "card").get_attribute("data-candid") == order[0]["candid"]
        # the cutouts load (the token travels in the image URLs)
        WebDriverWait(drv, 20).until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#cutouts img')].every(i => i.complete && i.naturalWidth === 63)"))
        body = drv.find_element(By.TAG_NAME, "body")
        for key in "rbi":
            body.send_keys(key)
        WebDriverWait(drv, 20).until(lambda d: d.find_element(By.ID, "progress").text.startswith("3 / "))
        assert drv.find_element(By.ID, "progress").text == f"3 / {N_ALERTS} labeled"
        body.send_keys("p")  # back to the third labeled one: the page shows its label
        assert "labeled interesting" in drv.find_element(By.ID, "title").text
        drv.save_screenshot(str(tmp_path / "label_page.png"))
    finally:
        drv.quit()
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT candid, label, user FROM labels ORDER BY id").fetchall()
    assert rows == [(int(order[0]["candid"]), "real", "tester"), (int(order[1]["candid"]), "bogus", "tester"),
                    (int(order[2]["candid"]), "interesting", "tester")]


def test_cli_label_serves_until_stopped(tmp_path):
    """`nightsift label` end to end in a subprocess: it prints the URL, serves, stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    _write_alerts(tmp_path / "a.avro")
    db = tmp_path / "l.sqlite"
    env = {**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"}
    proc = subprocess.Popen([sys.executable, "-m", "nightsift.engine.cli", "label", str(tmp_path / "a.avro"),
                             "--db", str(db), "--user", "cli-user", "--threshold", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # a shell starts it with SIGINT at its default; a library earlier in the
                            # suite can leave SIGINT ignored in pytest, which a child would inherit
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = None
        for _ in range(5):
            line = proc.stdout.readline()
            if line.startswith("open "):
                url = line.split()[1]
                break
        assert url and url.startswith("http://127.0.0.1:"), line
        port, token = int(url.split(":")[2].split("/")[0]), url.split("token=")[1]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/label", method="POST",
                                     data=json.dumps({"candid": "300100000", "label": "bogus"}).encode(),
                                     headers={"Content-Type": "application/json", "X-Nightsift-Token": token})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["row"]["user"] == "cli-user"
    finally:
        proc.send_signal(signal.SIGINT)
        try:  # a bound on a hang, not on speed: a loaded 2-core machine took over 20 s to stop it
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leak the server (and its pipes) into the next test
            out, err = proc.communicate()
            pytest.fail(f"`nightsift label` did not stop within 120 s of SIGINT: {err[-2000:]}")
    assert proc.returncode == 0, err
    assert "labeled 1 of 12" in out
    assert LabelStore(db).latest() == {300100000: "bogus"}


# ----------------------------------------------------------------------------- hostile requests (issue #14)

def _post_raw(srv, raw: bytes):
    """POST a raw JSON body; returns (status, parsed JSON body) also for error statuses."""
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/label", data=raw,
                                 headers={"Content-Type": "application/json", "X-Nightsift-Token": srv.token},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


@pytest.mark.parametrize("candid", [b"1e999", b"-1e999", b"NaN", b"1.5", b"1e300", b"true", b"null",
                                    b"99999999999999999999999", b"-3", b'"12abc"', b'""', b"[1]", b"{}",
                                    b'"1e999"', b'" 7"'])
def test_http_label_refuses_non_integer_candids_with_a_json_400(server, candid):
    """``{"candid": 1e999}`` used to raise OverflowError in the handler and drop the connection."""
    srv, alerts, db = server
    status, body = _post_raw(srv, b'{"candid": ' + candid + b', "label": "real"}')
    assert status == 400 and body["ok"] is False and "candid" in body["error"]
    # the server is still there, and nothing was recorded
    assert _status(_get, srv, "/api/progress") == 200
    assert LabelStore(db).rows() == []


def test_http_label_accepts_an_integer_or_its_decimal_string(server):
    srv, alerts, _ = server
    cid = int(alerts[2]["candid"])
    assert _post_raw(srv, b'{"candid": %d, "label": "bogus"}' % cid)[0] == 200
    assert _post_raw(srv, b'{"candid": "%d", "label": "real"}' % cid)[0] == 200


def test_label_server_times_out_idle_connections(tmp_path):
    """An idle (or slow-loris) connection is closed after the socket timeout instead of holding a
    server thread forever."""
    import socket
    import time

    _write_alerts(tmp_path / "alerts" / "visit00000003_ccd001.avro")
    srv = make_server(tmp_path / "alerts", tmp_path / "labels.sqlite", user="t", threshold=THRESHOLD, timeout=0.5)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"GET /api/progress HTTP/1.1\r\nHost: 127.0.0.1")  # never finishes the request
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
        s.close()
        assert _status(_get, srv, "/api/progress") == 200
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_label_database_is_created_private(tmp_path):
    import os
    import stat

    store = LabelStore(tmp_path / "sub" / "labels.sqlite")
    store.add(5, "real", user="me")
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_labeling_page_refuses_packets_without_a_candid_clearly(tmp_path):
    """A Rubin packet (diaSource, no top-level candid) gets a clear error naming the file, not a KeyError."""
    from nightsift.engine.discover.app import load_alerts
    from nightsift.engine.errors import InputError

    from ..conftest import shared_data

    src = sorted(shared_data("rubin/alerts").glob("*.avro"))[0]
    d = tmp_path / "rubin"
    d.mkdir()
    shutil.copy(src, d / src.name)
    with pytest.raises(InputError, match="not a ZTF-convention alert packet") as e:
        load_alerts(d)
    assert src.name in str(e.value)
    assert len(load_alerts(shared_data("ztf/alerts_drb"))) == 137  # ZTF packets are served (139 files, 2 repeats)
