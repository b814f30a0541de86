"""Rubin alert packets: the reader on the 100 real packets (placement, sign, features), an injected
source with the sign convention checked against ZTF's, and broken packets (one line each).

The real packets are for measuring only: nothing here (or anywhere) trains on them.
"""
from __future__ import annotations

import io
import json
import math
import shutil

import fastavro
import numpy as np
import pytest
from astropy.io import fits

from nightsift.engine.classify.preprocess import preprocess
from nightsift.engine.errors import InputError
from nightsift.engine.io.packets import read_packets
from nightsift.engine.io.rubin import NJY_AB_ZERO_POINT, read_rubin_packets, rubin_alert

from ..conftest import shared_data


def _records(path):
    with open(path, "rb") as fh:
        r = fastavro.reader(fh)
        return list(r), r.writer_schema


@pytest.fixture(scope="module")
def rubin_dir():
    return shared_data("rubin") / "alerts"


@pytest.fixture(scope="module")
def rubin(rubin_dir):
    return read_rubin_packets(rubin_dir)


def _raw(path):
    """diaSource and the stored cutouts (science, template, difference) with their headers."""
    alert = _records(path)[0][0]
    cut = []
    for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        with fits.open(io.BytesIO(alert[k])) as h:
            cut.append((h[0].data.astype(np.float64), h[0].header.copy()))
    return alert["diaSource"], cut


@pytest.mark.data
def test_all_100_packets_read_with_ztf_named_features(rubin, rubin_dir):
    files = sorted(rubin_dir.glob("*.avro"))
    assert len(files) == 100 and rubin.skipped == [] and rubin.n_files == 100
    assert rubin.triplets.shape == (100, 63, 63, 3) and rubin.triplets.dtype == np.float32
    rel = np.array([r["reliability"] for r in rubin.records])
    assert (rel >= 0.5).sum() == 67  # the data README
    for f, r in zip(files, rubin.records):
        src, _ = _raw(f)
        assert r["survey"] == "rubin" and r["file"] == f.name and r["candid"] == src["diaSourceId"]
        assert f.name.startswith(str(r["candid"]))
        assert (r["xpos"], r["ypos"]) == (src["x"] + 1, src["y"] + 1)  # ZTF's 1-based convention
        assert r["isdiffpos"] == ("f" if src["psfFlux"] < 0 else "t")
        assert r["own_score_name"] == "reliability" and r["own_score"] == pytest.approx(src["reliability"])
        # AB magnitude of |psfFlux| in nJy: 3631 Jy is magnitude 0
        assert 3631e9 * 10 ** (-0.4 * r["magpsf"]) == pytest.approx(abs(src["psfFlux"]), rel=1e-9)
        assert r["sigmapsf"] == pytest.approx(2.5 / math.log(10) * src["psfFluxErr"] / abs(src["psfFlux"]))
        assert r["jd"] == pytest.approx(src["midpointMjdTai"] + 2400000.5)
    assert NJY_AB_ZERO_POINT == pytest.approx(31.4, abs=0.002)
    fwhm = np.array([r["fwhm"] for r in rubin.records], float)
    assert 2.0 < np.nanmedian(fwhm) < 6.0  # ~0.7" at 0.2"/px from the adaptive moments (arcsec^2)


@pytest.mark.data
def test_cutouts_placed_by_their_wcs_cropped_or_padded_pixel_for_pixel(rubin, rubin_dir):
    """Every channel's centre pixel is the stored pixel nearest the source's WCS position; cutouts of
    30-88 px become 63x63: cropped (all finite) or padded with NaN (exactly the stored pixels)."""
    sizes = set()
    for f, t in zip(sorted(rubin_dir.glob("*.avro")), rubin.triplets):
        src, cut = _raw(f)
        for c, (data, hdr) in enumerate(cut):
            sizes.add(data.shape)
            cx, cy = int(np.rint(hdr["CRPIX1"] - 1)), int(np.rint(hdr["CRPIX2"] - 1))  # CRVAL = the source
            assert hdr["CRVAL1"] == pytest.approx(src["ra"], abs=1e-9)
            sign = -1.0 if (c == 2 and src["psfFlux"] < 0) else 1.0
            assert t[31, 31, c] == np.float32(sign * data[cy, cx]) or np.isnan(data[cy, cx])
            ny, nx = data.shape
            n_in = (min(cy, 31) + 1 + min(ny - 1 - cy, 31)) * (min(cx, 31) + 1 + min(nx - 1 - cx, 31))
            assert np.isfinite(t[..., c]).sum() == n_in - (~np.isfinite(
                data[max(cy - 31, 0):cy + 32, max(cx - 31, 0):cx + 32])).sum()
    assert min(s[0] for s in sizes) <= 31 and max(s[0] for s in sizes) > 63  # both cases present


@pytest.mark.data
def test_source_sits_on_the_centre_pixel(rubin):
    """The brightest |difference| pixel is within 2 px of the centre for Rubin's reliable sources
    (all of the S/N >= 7 ones), and the signed peak is centred on average (the packets' CUTMINX/Y
    cards would put it one pixel off in x and y)."""
    d = np.nan_to_num(rubin.triplets[..., 2])
    rel = np.array([r["reliability"] for r in rubin.records]) >= 0.5
    snr = np.array([r["snr"] for r in rubin.records])
    off = []
    for img in d:
        py, px = np.unravel_index(np.argmax(np.abs(img)), img.shape)
        off.append(max(abs(px - 31), abs(py - 31)))
    off = np.array(off)
    assert np.mean(off[rel] <= 2) >= 0.9
    assert np.all(off[rel & (snr >= 7)] <= 2) and (rel & (snr >= 7)).sum() >= 30
    win = d[:, 26:37, 26:37]  # signed: the model's convention makes a real source's centre positive
    peak = np.array([np.unravel_index(np.argmax(w), w.shape) for w in win]) - 5
    assert np.all(np.abs(peak[rel].mean(axis=0)) < 0.4)


@pytest.mark.data
def test_negative_sources_present_as_ztf_negatives_do(rubin):
    """Rubin stores science - template also for negative sources; the reader hands the model template
    - science for them, so the centre is positive -- as ZTF stores its negatives (185 of 185 in the
    shared ZTF sample have a positive centre)."""
    from nightsift.engine.io.avro import iter_ztf_packets

    ztf_neg = [np.nanmean(t[30:33, 30:33, 2]) > 0 for _, t, c in iter_ztf_packets(shared_data("ztf") / "alerts")
               if c["isdiffpos"] == "f"]
    assert len(ztf_neg) == 185 and all(ztf_neg)
    centre = np.nanmean(rubin.triplets[:, 30:33, 30:33, 2], axis=(1, 2))
    neg = np.array([r["isdiffpos"] == "f" for r in rubin.records])
    rel = np.array([r["reliability"] for r in rubin.records]) >= 0.5
    assert neg.sum() == 56 and (neg & rel).sum() == 46
    assert np.mean(centre[neg & rel] > 0) >= 0.85 and np.mean(centre[~neg & rel] > 0) >= 0.75
    x = preprocess(rubin.triplets)
    assert np.mean(x[neg & rel, 30:33, 30:33, 2].mean(axis=(1, 2)) > 0) >= 0.85  # what the model sees


def _fits_bytes(data, crpix, crval, *, extra_hdus=True):
    """A Rubin-like cutout: float32 primary in nJy, CRPIX/CRVAL/PC and no CTYPE, plus UNCERT and PSF HDUs."""
    h = fits.Header()
    h["BUNIT"] = "nJy"
    h["CRPIX1"], h["CRPIX2"] = crpix
    h["CRVAL1"], h["CRVAL2"] = crval
    h["PC1_1"], h["PC1_2"], h["PC2_1"], h["PC2_2"] = -5.5e-5, 0.0, 0.0, 5.5e-5
    hdus = [fits.PrimaryHDU(data.astype(np.float32), h)]
    if extra_hdus:
        hdus += [fits.ImageHDU(np.ones_like(data, np.float32), name="UNCERT"),
                 fits.ImageHDU(np.ones((41, 41)), name="PSFIMAGE")]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def _injected(rng, *, flux):
    """Science, template and Rubin difference (science - template) of a 41x37 cutout with a source of
    ``flux`` in the difference at 0-based (20.3, 17.6), and the alert around them."""
    ny, nx, (x0, y0) = 37, 41, (20.3, 17.6)
    yy, xx = np.mgrid[:ny, :nx]
    star = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 1.6 ** 2))
    tmpl = 300.0 + rng.normal(0, 20, (ny, nx)) + 4000 * star
    sci = 300.0 + rng.normal(0, 25, (ny, nx)) + (4000 + flux) * star
    diff = sci - tmpl
    ra, dec = 150.0, 2.0
    cut = {k: _fits_bytes(a, (x0 + 1, y0 + 1), (ra, dec))
           for k, a in (("cutoutScience", sci), ("cutoutTemplate", tmpl), ("cutoutDifference", diff))}
    src = {"diaSourceId": 7, "diaObjectId": 8, "ra": ra, "dec": dec, "x": 1000.3, "y": 2000.6, "psfFlux": flux,
           "psfFluxErr": 100.0, "snr": abs(flux) / 100, "is_negative": False, "reliability": 0.9, "midpointMjdTai": 6e4,
           "ixx": 0.1, "iyy": 0.1, "ixy": 0.0, "band": "r", "visit": 1, "detector": 2}
    return {"alertId": 1, "diaSource": src, **cut}, (sci, tmpl, diff)


def test_injected_negative_source_gives_the_ztf_convention_input(rng):
    """A source that faded (psfFlux < 0): the model input equals that of the ZTF-convention triplet
    (science, template, template - science) cut around the same pixel, bit for bit; the source is on
    the centre pixel; a positive source keeps science - template."""
    from nightsift.kernels.stamps import extract_triplets

    alert, (sci, tmpl, diff) = _injected(rng, flux=-3000.0)
    trip, rec = rubin_alert(alert, path="injected.avro")
    assert rec["isdiffpos"] == "f" and rec["sign_from"] == "psfFlux"
    ztf_like = extract_triplets(sci, tmpl, tmpl - sci, [20.3], [17.6])[0]
    np.testing.assert_array_equal(trip, ztf_like)
    assert np.unravel_index(np.nanargmax(trip[..., 2]), (63, 63)) == (31, 31) and trip[31, 31, 2] > 0
    assert np.isnan(trip[0, 0, 0]) and np.isfinite(trip).sum() == 3 * 37 * 41  # padded with NaN, all kept
    x = preprocess(trip)
    np.testing.assert_array_equal(x, preprocess(ztf_like))
    # units: the normalisation takes each cutout in its own noise units, so nJy vs DN does not matter
    np.testing.assert_allclose(preprocess(trip * np.float32(57.5)), x, atol=2e-5)
    assert rec["fwhm"] == pytest.approx(2 * math.sqrt(2 * math.log(2)) * math.sqrt(0.1) / 0.198, rel=1e-6)

    alert, (sci, tmpl, diff) = _injected(rng, flux=+3000.0)
    trip, rec = rubin_alert(alert, path="injected.avro")
    assert rec["isdiffpos"] == "t"
    np.testing.assert_array_equal(trip[..., 2], extract_triplets(sci, tmpl, diff, [20.3], [17.6])[0][..., 2])
    assert trip[31, 31, 2] > 0


def test_is_negative_gives_the_sign_only_without_psf_flux(rng):
    alert, _ = _injected(rng, flux=-3000.0)
    alert["diaSource"].update(psfFlux=None, is_negative=True)
    trip, rec = rubin_alert(alert)
    assert rec["isdiffpos"] == "f" and rec["sign_from"] == "is_negative" and rec["magpsf"] is None
    alert["diaSource"].update(is_negative=None)
    with pytest.raises(InputError, match="sign"):
        rubin_alert(alert, path="x.avro")


def test_truncated_or_misplaced_cutouts_are_input_errors(rng):
    alert, _ = _injected(rng, flux=-3000.0)
    full = alert["cutoutDifference"]
    for cut in (full[:6000], full[:200]):  # data cut short; header cut short
        with pytest.raises(InputError, match="cutoutDifference is not valid FITS"):
            rubin_alert({**alert, "cutoutDifference": cut}, path="x.avro")
    alert["diaSource"].update(ra=150.1)  # 6.5 arcmin away: off every cutout
    with pytest.raises(InputError, match="outside the 37x41 cutout"):
        rubin_alert(alert, path="x.avro")


def _write(path, schema, records):
    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records)


@pytest.mark.data
def test_broken_packets_each_give_one_line_and_the_rest_are_read(tmp_path, rubin_dir):
    good = sorted(rubin_dir.glob("*.avro"))[:3]
    for f in good:
        shutil.copy(f, tmp_path / f.name)
    ztf_good = sorted((shared_data("ztf") / "alerts").glob("*.avro"))[0]
    shutil.copy(ztf_good, tmp_path / "ztf_good.avro")
    raw = good[0].read_bytes()
    (tmp_path / "truncated.avro").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "random.avro").write_bytes(np.random.default_rng(1).bytes(5000))
    recs, schema = _records(good[1])
    recs[0]["cutoutTemplate"] = b"SIMPLE  =  this is not FITS" + bytes(100)
    _write(tmp_path / "corrupt_fits.avro", schema, recs)
    recs, schema = _records(good[2])
    recs[0]["cutoutScience"] = None
    _write(tmp_path / "no_science.avro", schema, recs)
    zrecs, zschema = _records(ztf_good)
    zrecs[0]["cutoutTemplate"] = None
    _write(tmp_path / "ztf_no_template.avro", zschema, zrecs)
    _write(tmp_path / "unknown.avro", {"type": "record", "name": "x", "fields": [{"name": "foo", "type": "int"}]},
           [{"foo": 1}])
    _write(tmp_path / "empty.avro", schema, [])

    ps = read_packets(tmp_path)
    bad = {"truncated.avro": "truncated", "random.avro": "Avro", "corrupt_fits.avro": "cutoutTemplate is not valid FITS",
           "no_science.avro": "cutoutScience is missing", "ztf_no_template.avro": "cutoutTemplate is missing",
           "unknown.avro": "unknown alert schema", "empty.avro": "no alert"}
    assert len(ps.skipped) == len(bad) and ps.n_files == 4 + len(bad)
    for line in ps.skipped:
        name = line.split(":")[0]
        assert bad.pop(name) in line and "\n" not in line and "Traceback" not in line
    assert bad == {}
    assert [r["survey"] for r in ps.records] == ["rubin"] * 3 + ["ztf"] and len(ps.triplets) == 4
    assert ps.records[3]["own_score_name"] == "rb"

    only = read_rubin_packets(tmp_path)  # the ZTF packet is not Rubin: one more line
    assert len(only.records) == 3 and any(s.startswith("ztf_good.avro: a ztf packet") for s in only.skipped)


def test_nothing_readable_is_one_input_error(tmp_path):
    (tmp_path / "a.avro").write_bytes(b"not avro at all")
    (tmp_path / "b.avro").write_bytes(b"")
    with pytest.raises(InputError) as e:
        read_rubin_packets(tmp_path)
    assert "none of 2 packet file(s) could be read" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="no such file"):
        read_packets(tmp_path / "missing")
    json.dumps(str(e.value))
