"""The Ray night engine against the local engine, under actor kills, and with a bad CCD.

One local Ray (2 CPUs, no dashboard, 200 MB object store) serves the module; a night is 3 visits
x 2 CCDs of 256 x 256 px. The inference pool is exercised with a small deterministic scorer
(score = a function of each cutout's centre difference pixel), so that scores can be checked
against the packets' own cutouts: a batch returned to the wrong CCD or in the wrong order shows.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import cloudpickle  # noqa: E402  (comes with ray)

from nightsift.engine.config import load_config  # noqa: E402
from nightsift.engine.io.avro import cutout_to_array, read_alerts  # noqa: E402
from nightsift.engine.orchestration.ledger import read_ledger  # noqa: E402
from nightsift.engine.orchestration.local import run_simulated_night  # noqa: E402
from nightsift.engine.orchestration.ray_engine import RayNight, night_schedule  # noqa: E402
from nightsift.engine.orchestration.sources import CCDFrame, SimulatedNight  # noqa: E402
from nightsift.engine.records import RawFrame  # noqa: E402

# Ray workers do not import this test module: ship its helpers by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_VISITS, N_CCDS = 3, 2
SCORE_FIELDS = ("rb", "drb")


def _config(out, backend="auto", **run):
    return load_config(None, simulate={"ny": 256, "nx": 256, "n_visits": N_VISITS, "n_ccds": N_CCDS,
                                       "n_transients": 10},
                       psf={"min_snr": 10.0, "min_stars": 2},  # a 256 px DECam CCD has few bright stars
                       package={"output_dir": str(out)}, classify={"backend": backend, "batch_size": 8},
                       run={"workers": 2, "inference_actors": 2, "inference_cpus": 0.0, "queue_depth": 2,
                            **run})


def _centre_score(triplets):
    """Deterministic stand-in for the real/bogus model: a logistic of the centre difference pixel."""
    t = np.asarray(triplets, dtype=np.float64)
    c = t.shape[1] // 2
    s = (0.5 + 0.5 * np.tanh(t[:, c, c, 2] / 200.0)).astype(np.float32)
    return {"rb": s, "drb": s.copy()}


def fake_scorer_factory(classify):
    return _centre_score


class NaNFrameSource(SimulatedNight):
    """A simulated night whose frame of one (visit, ccd) is all NaN (a broken readout)."""

    def __init__(self, simulate, calibrate, bad):
        super().__init__(simulate, calibrate)
        self.bad = tuple(bad)

    def load_frame(self, visit, ccd, static):
        f = super().load_frame(visit, ccd, static)
        if (visit, ccd) != self.bad:
            return f
        raw = RawFrame(np.full_like(f.raw.data, np.nan), f.raw.header, path=f"sim/visit{visit}_ccd{ccd}.fits")
        return CCDFrame(visit=visit, ccd=ccd, raw=raw, truth=f.truth)


def alert_set(out) -> dict:
    """``{candid: alert record}`` of every packet file under ``out``; fails on a duplicated candid."""
    from pathlib import Path

    alerts = {}
    for p in sorted(Path(out).glob("visit*_ccd*.avro")):
        for a in read_alerts(p):
            assert a["candid"] not in alerts, f"candid {a['candid']} written twice"
            alerts[a["candid"]] = a
    return alerts


def _statuses(out) -> dict:
    return {(r["visit"], r["ccd"]): r["status"] for r in read_ledger(out)}


def _strip_scores(a: dict) -> dict:
    a = dict(a, candidate=dict(a["candidate"]))
    for k in SCORE_FIELDS + ("rbversion", "drbversion"):
        a["candidate"].pop(k, None)
    return a


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
                 configure_logging=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_night(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    # no scorer here: the packets are compared without their scores
    summary = run_simulated_night(_config(out, backend="none", engine="local"), workers=1, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def ray_night(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    with RayNight(_config(out), scorer_factory=fake_scorer_factory) as engine:
        report = engine.run(progress=False)
        info = engine.actor_info()
    return out, report, info


def test_ray_night_equals_local_night(local_night, ray_night):
    (lout, lsum), (rout, rep, info) = local_night, ray_night
    assert lsum.n_done == rep.summary.n_done >= N_VISITS * N_CCDS - 1
    assert _statuses(rout) == _statuses(lout)
    local, remote = alert_set(lout), alert_set(rout)
    assert len(local) > 50
    assert sorted(local) == sorted(remote)
    assert all(_strip_scores(remote[k]) == _strip_scores(local[k]) for k in local)
    assert all(local[k]["candidate"]["rb"] is None for k in local)
    # the scores came back from the inference pool to the right alerts, in order
    for a in remote.values():
        diff = cutout_to_array(a["cutoutDifference"])
        want = _centre_score(np.stack([diff] * 3, axis=-1)[None])["rb"][0]
        assert a["candidate"]["rb"] == pytest.approx(float(want), abs=1e-6)
    assert rep.scoring == "auto" and rep.n_inference_actors == 2 and rep.n_retries == 0
    # truth statistics as the local engine's
    assert (rep.summary.n_truth, rep.summary.n_found) == (lsum.n_truth, lsum.n_found)
    # every CCD stayed on its actor, which kept its reference resident
    recs = read_ledger(rout)
    assert all(r["slot"] == r["ccd"] % 2 and r["attempts"] == 1 for r in recs)
    assert [i["resident_ccds"] for i in info] == [[0], [1]]
    assert all(i["n_processed"] == N_VISITS for i in info)
    assert [v.n_written for v in rep.visits] == [N_CCDS] * N_VISITS
    assert all(v.latency_s > 0 for v in rep.visits)


def test_killed_actors_lose_and_duplicate_no_alert(ray_night, tmp_path):
    rout, ref_rep, _ = ray_night
    killed = {}

    def kill_mid_night(engine, event):
        if killed:
            return
        busy = engine.in_flight()
        assert busy, "nothing in flight to kill"
        visit, ccd, slot = busy[0]
        killed["slot"] = slot
        ray.kill(engine.slots[slot].actor, no_restart=False)  # a crash: Ray restarts it, its queue is lost
        ray.kill(engine.inference[0], no_restart=False)
        ray.kill(engine.writer, no_restart=False)
        killed["task"] = (visit, ccd)

    with RayNight(_config(tmp_path), scorer_factory=fake_scorer_factory) as engine:
        pids_before = [s["pid"] for s in engine.actor_info()]
        rep = engine.run(progress=False, on_written=kill_mid_night)
        pids_after = [s["pid"] for s in engine.actor_info()]
    assert killed, "the night ended before an actor could be killed"
    assert pids_after[killed["slot"]] != pids_before[killed["slot"]]  # it really died and came back
    assert rep.n_retries >= 1  # the CCD-visit it was running went round again
    assert (rep.summary.n_done, rep.summary.n_failed) == (ref_rep.summary.n_done, ref_rep.summary.n_failed)
    assert alert_set(tmp_path) == alert_set(rout)  # no loss, no duplicate, same scores
    assert _statuses(tmp_path) == _statuses(rout)
    recs = read_ledger(tmp_path)
    assert max(r["attempts"] for r in recs) >= 2
    v, c = killed["task"]
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "records").glob(".*.tmp"))
    assert (v, c) in {(r["visit"], r["ccd"]) for r in recs}


def test_bad_ccd_is_recorded_and_the_night_goes_on(ray_night, tmp_path):
    rout, _, _ = ray_night
    cfg = _config(tmp_path, task_retries=2)
    source = NaNFrameSource(cfg.simulate, cfg.calibrate, bad=(1, 0))
    with RayNight(cfg, source, scorer_factory=fake_scorer_factory) as engine:
        rep = engine.run(night_schedule(2, range(N_CCDS)), progress=False)
    recs = {(r["visit"], r["ccd"]): r for r in read_ledger(tmp_path)}
    assert len(recs) == 2 * N_CCDS
    bad = recs[(1, 0)]
    assert bad["status"] == "failed" and bad["attempts"] == 1  # bad data is not retried
    assert "InputError" in bad["error"] and "no finite pixel" in bad["error"] and "visit1_ccd0" in bad["error"]
    ref_status = {k: s for k, s in _statuses(rout).items() if k[0] < 2 and k != (1, 0)}
    assert {k: r["status"] for k, r in recs.items() if k != (1, 0)} == ref_status
    assert rep.summary.n_failed == 1 + sum(s == "failed" for s in ref_status.values())
    assert not (tmp_path / "visit00000001_ccd000.avro").exists()
    # the other CCD-visits' alerts are those of the undisturbed night
    ref = {k: a for k, a in alert_set(rout).items() if a["candidate"]["visit"] < 2}
    got = alert_set(tmp_path)
    assert got == {k: a for k, a in ref.items() if (a["candidate"]["visit"], a["candidate"]["ccd"]) != (1, 0)}


def test_schedule_and_config_flags():
    from nightsift.engine.cli import build_parser
    from nightsift.engine.errors import ConfigError

    s = night_schedule(3, [0, 1], cadence_s=(30.0, 40.0), seed=1)
    assert [v for _, v, _ in s] == [0, 1, 2] and s[0][0] == 0.0
    assert all(30.0 <= b[0] - a[0] <= 40.0 for a, b in zip(s, s[1:]))
    args = build_parser().parse_args(["run", "--engine", "local", "--address", "auto", "--workers", "3"])
    assert (args.engine, args.address, args.workers) == ("local", "auto", 3)
    with pytest.raises(ConfigError, match=r"run\.engine"):
        load_config(None, run={"engine": "spark"})
