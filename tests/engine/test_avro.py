"""Avro alert packets: schema, atomic writes, round trips, real ZTF packets."""
import json
import os
from pathlib import Path

import fastavro
import fastavro.validation
import numpy as np
import pytest

from nightsift.engine.errors import InputError
from nightsift.engine.io import avro

ZTF_ALERTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ztf" / "alerts"


def _alert(candid: int, rng, *, edge=False, rb=None) -> dict:
    """A minimal valid nightsift alert: required fields only, the rest left to the defaults."""
    stamps = rng.normal(size=(3, 63, 63)).astype(np.float32)
    if edge:
        stamps[:, :, :10] = np.nan
    cand = {
        "jd": 2460000.5 + candid * 1e-3, "fid": 2, "pid": 1000, "programid": 0, "candid": candid,
        "isdiffpos": "t", "ra": 150.0 + candid * 1e-4, "dec": -30.0, "magpsf": 20.5, "sigmapsf": 0.1,
        "xpos": 100.5, "ypos": 200.25, "rb": rb, "edge": edge, "visit": 1, "ccd": 0, "flux": 1234.5,
    }
    return {
        "schemavsn": avro.SCHEMA_VERSION, "publisher": "nightsift", "objectId": f"nightsift{candid}",
        "candid": candid, "candidate": cand, "prv_candidates": None,
        "cutoutScience": avro.make_cutout_record(stamps[0], file_name=f"c{candid}_sci.fits.gz"),
        "cutoutTemplate": avro.make_cutout_record(stamps[1], file_name=f"c{candid}_ref.fits.gz"),
        "cutoutDifference": avro.make_cutout_record(stamps[2], file_name=f"c{candid}_diff.fits.gz"),
    }, stamps


def test_schema_loads_with_ztf_shape():
    s = avro.alert_schema()
    assert s["name"] == "nightsift.alert"
    assert [f["name"] for f in s["fields"]] == [
        "schemavsn", "publisher", "objectId", "candid", "candidate", "prv_candidates",
        "cutoutScience", "cutoutTemplate", "cutoutDifference"]
    cand = next(f for f in s["fields"] if f["name"] == "candidate")["type"]
    names = {f["name"]: f for f in cand["fields"]}
    for k in ("candid", "jd", "fid", "pid", "diffmaglim", "programid", "ra", "dec", "magpsf", "sigmapsf",
              "isdiffpos", "xpos", "ypos", "fwhm", "elong", "nbad", "distnr", "magnr", "rb", "drb", "field",
              "rcid", "scorr", "flux", "fluxerr", "snr", "ccd", "visit", "anomaly_score", "edge",
              "nightsift_version"):
        assert k in names, k
    # nightsift additions are nullable with a null default
    for k in ("scorr", "flux", "fluxerr", "snr", "ccd", "visit", "anomaly_score", "edge", "nightsift_version", "rb"):
        assert names[k]["type"][0] == "null" and names[k]["default"] is None, k
    # the schema files are valid JSON beside the module (package data)
    for p in sorted(avro.SCHEMA_DIR.glob("*.avsc")):
        json.loads(p.read_text())


@pytest.mark.skipif(not ZTF_ALERTS.is_dir(), reason=f"real ZTF packets not found at {ZTF_ALERTS}")
def test_candidate_types_match_ztf_where_fields_exist():
    with open(sorted(ZTF_ALERTS.glob("*.avro"))[0], "rb") as fh:
        ztf = fastavro.reader(fh).writer_schema
    zc = {f["name"]: f["type"] for f in next(f for f in ztf["fields"] if f["name"] == "candidate")["type"]["fields"]}
    ours = {f["name"]: f["type"] for f in
            next(f for f in avro.alert_schema()["fields"] if f["name"] == "candidate")["type"]["fields"]}
    shared = set(zc) & set(ours)
    assert len(shared) >= 25

    def base(t):
        return sorted(x for x in (t if isinstance(t, list) else [t]) if x != "null")

    for k in shared:
        assert base(zc[k]) == base(ours[k]), k


def test_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    pairs = [_alert(i + 1, rng, edge=(i == 2), rb=0.25 * i if i else None) for i in range(4)]
    alerts = [a for a, _ in pairs]
    p = avro.write_alerts(avro.alert_path(tmp_path, 12, 3), alerts)
    assert p.name == "visit00000012_ccd003.avro"
    back = avro.read_alerts(p)
    assert len(back) == 4
    for (a, stamps), b in zip(pairs, back):
        assert b["candid"] == a["candid"] and b["objectId"] == a["objectId"]
        for k, v in a["candidate"].items():
            if isinstance(v, float):
                assert b["candidate"][k] == pytest.approx(v, rel=1e-6), k  # float fields are float32
            else:
                assert b["candidate"][k] == v, k
        assert b["candidate"]["scorr"] is None and b["candidate"]["drb"] is None  # defaults filled
        for key, st in zip(("cutoutScience", "cutoutTemplate", "cutoutDifference"), stamps):
            assert b[key]["fileName"] == a[key]["fileName"]
            arr = avro.cutout_to_array(b[key])
            assert arr.dtype == np.float32 and arr.shape == (63, 63)
            np.testing.assert_array_equal(arr, st)  # NaN padding survives too


def test_rerun_replaces_and_leaves_no_temp_files(tmp_path):
    rng = np.random.default_rng(6)
    alerts = [_alert(i + 1, rng)[0] for i in range(3)]
    p = avro.alert_path(tmp_path / "out", 7, 1)
    avro.write_alerts(p, alerts)
    avro.write_alerts(avro.alert_path(tmp_path / "out", 7, 1), alerts)  # rerun of the same CCD
    assert sorted(os.listdir(tmp_path / "out")) == [p.name]
    assert [a["candid"] for a in avro.read_alerts(p)] == [1, 2, 3]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    rng = np.random.default_rng(7)
    good = [_alert(1, rng)[0]]
    p = avro.write_alerts(tmp_path / "a.avro", good)
    before = p.read_bytes()
    bad = _alert(2, rng)[0]
    bad["candidate"]["isdiffpos"] = 1  # wrong type: must be the string 't' or 'f'
    with pytest.raises(InputError, match="a.avro"):
        avro.write_alerts(p, [good[0], bad])
    assert os.listdir(tmp_path) == ["a.avro"] and p.read_bytes() == before


def test_write_is_deterministic(tmp_path):
    a1 = [_alert(1, np.random.default_rng(8))[0]]
    a2 = [_alert(1, np.random.default_rng(8))[0]]
    p1 = avro.write_alerts(tmp_path / "x1.avro", a1)
    p2 = avro.write_alerts(tmp_path / "x2.avro", a2)
    # identical records -> identical record bytes (the container's sync marker is random)
    r1, r2 = avro.read_alerts(p1), avro.read_alerts(p2)
    assert r1[0]["cutoutScience"]["stampData"] == r2[0]["cutoutScience"]["stampData"]


def test_empty_alert_list_is_a_valid_file(tmp_path):
    p = avro.write_alerts(avro.alert_path(tmp_path, 1, 0), [])
    assert p.exists() and p.stat().st_size > 0
    assert avro.read_alerts(p) == []
    with open(p, "rb") as fh:
        assert fastavro.reader(fh).writer_schema["name"] == "nightsift.alert"


def test_our_packets_validate_against_schema():
    rng = np.random.default_rng(9)
    for a in (_alert(1, rng)[0], _alert(2, rng, edge=True, rb=0.9)[0]):
        assert fastavro.validation.validate(a, avro.alert_schema(), raise_errors=True)
    a = _alert(3, rng)[0]
    a["candidate"]["fid"] = "r"
    assert not fastavro.validation.validate(a, avro.alert_schema(), raise_errors=False)


def test_corrupt_file_raises_input_error_naming_path(tmp_path):
    rng = np.random.default_rng(10)
    p = avro.write_alerts(tmp_path / "good.avro", [_alert(i + 1, rng)[0] for i in range(3)])
    raw = p.read_bytes()
    bad = tmp_path / "garbage.avro"
    bad.write_bytes(b"this is not an avro file at all")
    with pytest.raises(InputError, match="garbage.avro"):
        avro.read_alerts(bad)
    for cut in (10, len(raw) // 2, len(raw) - 20):
        trunc = tmp_path / f"trunc{cut}.avro"
        trunc.write_bytes(raw[:cut])
        with pytest.raises(InputError, match=f"trunc{cut}.avro"):
            avro.read_alerts(trunc)
    with pytest.raises(InputError, match="missing.avro"):
        avro.read_alerts(tmp_path / "missing.avro")
    with pytest.raises(InputError, match="garbage.avro"):
        avro.read_ztf_packet(bad)


def test_cutout_record_header_and_bad_bytes():
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    rec = avro.make_cutout_record(arr, file_name="x.fits.gz", header={"BUNIT": "e-", "CANDID": 5})
    assert rec["stampData"][:2] == b"\x1f\x8b"  # gzipped, as ZTF
    out = avro.cutout_to_array(rec)
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, arr.astype(np.float32))
    with pytest.raises(InputError, match="x.fits.gz"):
        avro.cutout_to_array({"fileName": "x.fits.gz", "stampData": b"\x1f\x8bnot gzip"})


def test_alert_path_is_deterministic(tmp_path):
    assert avro.alert_path(tmp_path, 5, 7) == avro.alert_path(str(tmp_path), 5, 7)
    assert avro.alert_path(tmp_path, 5, 7) != avro.alert_path(tmp_path, 5, 8)
    with pytest.raises(ValueError):
        avro.alert_path(tmp_path, -1, 0)


@pytest.mark.data
@pytest.mark.skipif(not ZTF_ALERTS.is_dir(), reason=f"real ZTF packets not found at {ZTF_ALERTS}")
def test_real_ztf_packets():
    n = 0
    for path, triplet, cand in avro.iter_ztf_packets(ZTF_ALERTS):
        n += 1
        assert triplet.shape == (63, 63, 3) and triplet.dtype == np.float32
        assert 0.0 <= cand["rb"] <= 1.0
        assert cand["isdiffpos"] in ("t", "f") and cand["objectId"].startswith("ZTF")
    assert n == 499
    triplet, cand = avro.read_ztf_packet(path)
    assert triplet.shape == (63, 63, 3) and "rb" in cand and "magpsf" in cand


@pytest.mark.data
@pytest.mark.skipif(not ZTF_ALERTS.is_dir(), reason=f"real ZTF packets not found at {ZTF_ALERTS}")
def test_real_ztf_edge_packets_are_padded_on_the_edge_side():
    truncated = []
    for p in sorted(ZTF_ALERTS.glob("*.avro")):
        with open(p, "rb") as fh:
            rec = next(fastavro.reader(fh))
        shape = avro.cutout_to_array(rec["cutoutDifference"]).shape
        if shape != (63, 63):
            truncated.append((p, shape))
    assert len(truncated) == 7  # the shared sample holds 7 edge-truncated packets (53x63, 63x44, ...)
    near_centre = 0
    for p, (ny, nx) in truncated:
        triplet, cand = avro.read_ztf_packet(p)
        nan_cols = np.isnan(triplet).all(axis=(0, 2))
        nan_rows = np.isnan(triplet).all(axis=(1, 2))
        assert nan_cols.sum() >= 63 - nx and nan_rows.sum() >= 63 - ny
        # all these candidates are near the high x or y edge of the 3072 x 3080 readout channel,
        # so the padding is after the data
        if nx < 63:
            assert nan_cols[nx:].all() and cand["xpos"] > 3000
        if ny < 63:
            assert nan_rows[ny:].all() and cand["ypos"] > 3000
        assert np.isfinite(triplet[31, 31]).all()
        d = np.nan_to_num(triplet[..., 2] * (1 if cand["isdiffpos"] == "t" else -1), nan=-np.inf)
        j, i = np.unravel_index(np.argmax(d), d.shape)
        near_centre += abs(j - 31) <= 4 and abs(i - 31) <= 4
    assert near_centre >= 6  # the transient stays on the centre (one packet has a brighter neighbour)


def test_ztf_padding_side_follows_the_edge():
    stamp = np.ones((63, 40), np.float32)
    # near the low x edge (1-based xpos 10 -> 0-based 9 < 31): columns lost on the left
    out = avro._pad_ztf(stamp, 10.0, 500.0, 63)
    assert out.shape == (63, 63) and np.isnan(out[:, :23]).all() and (out[:, 23:] == 1).all()
    # near the high x edge: columns lost on the right
    out = avro._pad_ztf(stamp, 3060.0, 500.0, 63)
    assert np.isnan(out[:, 40:]).all() and (out[:, :40] == 1).all()


def test_cutout_is_standard_fits():
    import gzip
    import io
    import warnings

    from astropy.io import fits

    arr = np.random.default_rng(11).normal(size=(63, 63)).astype(np.float32)
    arr[0, :5] = np.nan
    rec = avro.make_cutout_record(arr, file_name="x.fits.gz", header={"CANDID": 123, "EDGE": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(io.BytesIO(gzip.decompress(rec["stampData"]))) as hdul:
            hdul.verify("exception")
            assert hdul[0].header["CANDID"] == 123 and hdul[0].header["EDGE"] is True
            np.testing.assert_array_equal(hdul[0].data, arr)


def test_rewrite_sweeps_a_killed_writers_temporary(tmp_path):
    """A writer killed mid-write leaves its temporary; the next write of that file removes it."""
    from nightsift.engine.io.atomic import atomic_write

    target = tmp_path / "visit00000001_ccd002.avro"
    stale = tmp_path / ".visit00000001_ccd002.avro.abc123.tmp"
    stale.write_bytes(b"half a file")
    other = tmp_path / ".visit00000001_ccd003.avro.abc123.tmp"  # another CCD's: not ours to touch
    other.write_bytes(b"x")
    atomic_write(target, lambda fh: fh.write(b"data"))
    assert target.read_bytes() == b"data" and not stale.exists() and other.exists()


def test_alert_files_are_readable_like_fits_products(tmp_path):
    """Alert files get 0o644 under umask 022, as the FITS products do (a broker under another user
    reads them), not the 0o600 of the temporary they are written through."""
    import stat

    from nightsift.engine.io.fits import write_image

    old = os.umask(0o022)
    try:
        p = avro.write_alerts(tmp_path / "a.avro", [_alert(1, np.random.default_rng(2))[0]])
        write_image(tmp_path / "d.fits", np.zeros((4, 4), np.float32))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644 == stat.S_IMODE(os.stat(tmp_path / "d.fits").st_mode)
