"""Package stage: candidate table + images -> ZTF-style alert records."""
import fastavro.validation
import numpy as np
import pytest
from astropy.io import fits

from nightsift.engine.errors import InputError
from nightsift.engine.io import avro
from nightsift.engine.records import empty_candidates
from nightsift.engine.records import make_candid
from nightsift.engine.stages.cutouts import triplets_of
from nightsift.engine.stages.package import build_alerts, filter_id, filter_name

NY, NX = 200, 300


def _images(seed=0):
    rng = np.random.default_rng(seed)
    sci = rng.normal(100.0, 5.0, (NY, NX)).astype(np.float32)
    ref = rng.normal(80.0, 3.0, (NY, NX)).astype(np.float32)
    diff = rng.normal(0.0, 7.0, (NY, NX)).astype(np.float32)
    return sci, ref, diff


def _header(**kw):
    h = fits.Header()
    h["MJD-OBS"] = 60000.25
    h["FILTER"] = "r DECam SDSS c0002 6415.0 1480.0"
    h["EXPTIME"] = 90.0
    h["MAGZP"] = 31.2
    for k, v in kw.items():
        h[k] = v
    return h


def _candidates():
    c = empty_candidates(4)
    c["xpos"] = [150.0, 2.0, 299.0, 80.4]
    c["ypos"] = [100.0, 50.0, 199.0, 120.6]
    c["ra"] = [10.0, 10.1, 10.2, 10.3]
    c["dec"] = [-5.0, -5.1, -5.2, -5.3]
    c["flux"] = [1000.0, -500.0, 300.0, 2000.0]
    c["fluxerr"] = [50.0, 60.0, 70.0, 80.0]
    c["snr"] = np.abs(c["flux"]) / c["fluxerr"]
    c["magpsf"] = [20.0, 21.0, 21.5, 19.5]
    c["sigmapsf"] = [0.05, 0.1, 0.2, 0.04]
    c["scorr"] = [20.0, -8.0, 5.0, 25.0]
    c["fwhm"] = 3.5
    c["elong"] = 1.1
    c["nbad"] = [0, 1, 0, 0]
    c["isdiffpos"] = [True, False, True, True]
    c["distnr"] = [1.5, -999.0, np.nan, 0.3]
    c["magnr"] = [18.0, -999.0, np.nan, 17.0]
    c["sky"] = 100.0
    return c


def _build(cands=None, **kw):
    sci, ref, diff = _images()
    cands = _candidates() if cands is None else cands
    args = dict(header=_header(), visit=4321, ccd=17, shape=sci.shape)
    if cands.dtype.names and "xpos" in cands.dtype.names and "isdiffpos" in cands.dtype.names:
        args["triplets"] = triplets_of(cands, sci, ref, diff)
    else:
        args["triplets"] = np.zeros((len(cands), 63, 63, 3), np.float32)
    args.update(kw)
    return build_alerts(cands, **args), (sci, ref, diff)


def test_one_alert_per_candidate_with_fields():
    res, _ = _build()
    alerts = res.value
    assert len(alerts) == 4 and res.qa["n_alerts"] == 4
    c0 = alerts[0]["candidate"]
    assert c0["jd"] == pytest.approx(60000.25 + 2400000.5, abs=1e-9)
    assert c0["fid"] == 2 and c0["exptime"] == 90.0 and c0["magzpsci"] == pytest.approx(31.2)
    assert [a["candidate"]["isdiffpos"] for a in alerts] == ["t", "f", "t", "t"]
    assert c0["xpos"] == 151.0 and c0["ypos"] == 101.0  # 1-based in the packet, as ZTF
    assert c0["visit"] == 4321 and c0["ccd"] == 17 and c0["pid"] == 4321 * 1000 + 17
    assert c0["flux"] == 1000.0 and c0["scorr"] == 20.0 and c0["snr"] == 20.0
    assert alerts[1]["candidate"]["distnr"] is None and alerts[1]["candidate"]["magnr"] is None  # -999
    assert alerts[2]["candidate"]["distnr"] is None  # NaN
    assert c0["distnr"] == 1.5 and c0["rb"] is None and c0["drb"] is None
    assert alerts[0]["prv_candidates"] is None
    assert all(a["schemavsn"] == avro.SCHEMA_VERSION for a in alerts)


def test_candid_packing_unique_deterministic():
    res1, _ = _build()
    res2, _ = _build()
    ids = [a["candid"] for a in res1.value]
    assert ids == [a["candid"] for a in res2.value]
    assert ids == [(4321 * 1000 + 17) * 100000 + k for k in range(4)]
    assert ids == list(make_candid(4321, 17, np.arange(4)))
    assert len(set(ids)) == 4
    assert [a["objectId"] for a in res1.value] == [a["objectId"] for a in res2.value]
    assert all(a["candidate"]["candid"] == a["candid"] for a in res1.value)
    # different CCD / visit -> different ids
    res3, _ = _build(ccd=18)
    assert not set(ids) & {a["candid"] for a in res3.value}
    # ids already set by the detection stage are kept
    c = _candidates()
    c["candid"] = [11, 12, 13, 14]
    res4, _ = _build(c)
    assert [a["candid"] for a in res4.value] == [11, 12, 13, 14]



def test_cutouts_and_edge_flag():
    res, (sci, ref, diff) = _build()
    alerts = res.value
    assert [a["candidate"]["edge"] for a in alerts] == [False, True, True, False]
    assert res.qa["n_edge"] == 2
    for a, (x, y) in zip(alerts, [(150, 100), (2, 50), (299, 199), (80, 121)]):
        s = avro.cutout_to_array(a["cutoutScience"])
        r = avro.cutout_to_array(a["cutoutTemplate"])
        d = avro.cutout_to_array(a["cutoutDifference"])
        assert s.shape == r.shape == d.shape == (63, 63)
        # ZTF convention: a negative candidate's difference cutout is reference - science
        sign = 1 if a["candidate"]["isdiffpos"] == "t" else -1
        assert s[31, 31] == sci[y, x] and r[31, 31] == ref[y, x] and d[31, 31] == sign * diff[y, x]
    a0 = alerts[0]
    np.testing.assert_array_equal(avro.cutout_to_array(a0["cutoutScience"]), sci[69:132, 119:182])
    e = avro.cutout_to_array(alerts[1]["cutoutDifference"])
    assert np.isnan(e[:, :29]).all() and np.isfinite(e[:, 29:]).all()
    assert alerts[1]["cutoutDifference"]["fileName"].endswith("diffneg.fits.gz")
    assert a0["cutoutScience"]["fileName"] == f"candid{a0['candid']}_pid{4321017}_targ_sci.fits.gz"
    # edge flag from the table is kept even when the stamp is inside the image
    c = _candidates()
    c["edge"][0] = True
    res2, _ = _build(c)
    assert res2.value[0]["candidate"]["edge"] is True


def test_scores_fill_fields_and_validate(tmp_path):
    rb = np.array([0.9, 0.1, np.nan, 0.5])
    res, _ = _build(scores={"rb": rb, "anomaly_score": np.arange(4.0)}, score_versions={"rb": "braai-d6_m7"},
                    diffmaglim=23.1)
    alerts = res.value
    assert alerts[0]["candidate"]["rb"] == 0.9 and alerts[2]["candidate"]["rb"] is None
    assert alerts[0]["candidate"]["rbversion"] == "braai-d6_m7"
    assert alerts[3]["candidate"]["anomaly_score"] == 3.0 and alerts[0]["candidate"]["diffmaglim"] == 23.1
    for a in alerts:
        assert fastavro.validation.validate(a, avro.alert_schema(), raise_errors=True)
    p = avro.write_alerts(avro.alert_path(tmp_path, 4321, 17), alerts)
    back = avro.read_alerts(p)
    assert [b["candid"] for b in back] == [a["candid"] for a in alerts]
    assert back[0]["candidate"]["rb"] == pytest.approx(0.9)
    np.testing.assert_array_equal(avro.cutout_to_array(back[3]["cutoutTemplate"]),
                                  avro.cutout_to_array(alerts[3]["cutoutTemplate"]))


def test_empty_table_gives_empty_list(tmp_path):
    res, _ = _build(empty_candidates())
    assert res.value == [] and res.qa["n_alerts"] == 0
    p = avro.write_alerts(avro.alert_path(tmp_path, 1, 1), res.value)
    assert avro.read_alerts(p) == []


def test_filter_ids():
    assert filter_id("g DECam SDSS c0001 4720.0 1520.0") == 1
    assert filter_id("r") == 2 and filter_id("ZTF_i") == 3 and filter_id("i") == 3
    assert filter_id("VR DECam c0007") == 0 and filter_id("z") == 0 and filter_id(None) == 0 and filter_id("") == 0
    assert [filter_name(filter_id(f)) for f in ("g", "r", "i")] == ["g", "r", "i"]
    assert filter_name(0) == "" and filter_name(None) == "" and filter_name(7) == ""


def test_date_obs_fallback_and_missing_time():
    h = _header()
    del h["MJD-OBS"]
    h["DATE-OBS"] = "2023-02-25T06:00:00"
    res, _ = _build(header=h)
    assert res.value[0]["candidate"]["jd"] == pytest.approx(60000.25 + 2400000.5, abs=1e-6)
    del h["DATE-OBS"]
    with pytest.raises(InputError, match="MJD-OBS"):
        _build(header=h)


def test_bad_inputs():
    with pytest.raises(InputError, match="unknown score"):
        _build(scores={"realbogus": np.zeros(4)})
    with pytest.raises(InputError, match="3 values for 4"):
        _build(scores={"rb": np.zeros(3)})
    with pytest.raises(InputError, match="CANDIDATE_DTYPE"):
        _build(np.zeros(3, dtype=[("xpos", "f8")]))
    with pytest.raises(InputError, match="do not match 4 candidates"):
        _build(triplets=np.zeros((3, 63, 63, 3), np.float32))
    with pytest.raises(InputError, match="ccd"):
        _build(ccd=1000)
    c = _candidates()
    c["candid"] = [5, 5, 6, 7]
    with pytest.raises(InputError, match="unique"):
        _build(c)


def test_inputs_not_modified():
    c = _candidates()
    c_copy = c.copy()
    sci, ref, diff = _images()
    trip = triplets_of(c, sci, ref, diff)
    trip_copy = trip.copy()
    build_alerts(c, triplets=trip, shape=sci.shape, header=_header(), visit=1, ccd=2)
    assert c.tobytes() == c_copy.tobytes()
    np.testing.assert_array_equal(trip, trip_copy)
