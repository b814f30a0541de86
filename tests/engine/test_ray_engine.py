"""The Ray night engine against the local engine, under actor kills, and with a bad CCD.

One local Ray (2 CPUs, no dashboard, 200 MB object store) serves the module; a night is 3 visits
x 2 CCDs of 256 x 256 px. The inference pool is exercised with a small deterministic scorer
(score = a function of each cutout's centre difference pixel), so that scores can be checked
against the packets' own cutouts: a batch returned to the wrong CCD or in the wrong order shows.

Kills land inside the work they interrupt: the worker being killed holds (sleeps) in the middle of
it after leaving a marker file, and a thread kills it once the marker is there -- a subtraction
actor inside a CCD-visit, the writer half-way through an alert file, an inference actor inside a
batch, a subtraction actor's packaging thread (the batch's device half done, its alerts not yet
packaged). Each night must then equal the undisturbed one: same alerts and scores, one file per
CCD-visit, no candid twice, every CCD-visit recorded. A night on one actor running each visit's
CCDs as one batch equals the local engine's, CCD-visit by CCD-visit.
"""
from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from nightsift.engine.config import load_config  # noqa: E402
from nightsift.engine.io.avro import cutout_to_array  # noqa: E402
from nightsift.engine.orchestration.ledger import read_ledger  # noqa: E402
from nightsift.engine.orchestration.local import run_simulated_night  # noqa: E402
from nightsift.engine.orchestration.ray_engine import RayNight, SubtractionWorker, night_schedule  # noqa: E402

from .conftest import (FaultySource, Killer, alert_set, centre_score, disk_full_writer,  # noqa: E402
                       fake_scorer_factory, holding_scorer_factory, holding_writer, nan_frame_source,
                       no_temporaries, statuses, strip_scores)

N_VISITS, N_CCDS = 3, 2
ALL = {(v, c) for v in range(N_VISITS) for c in range(N_CCDS)}


def _config(out, backend="auto", **run):
    return load_config(None, simulate={"ny": 256, "nx": 256, "n_visits": N_VISITS, "n_ccds": N_CCDS,
                                       "n_transients": 10},
                       psf={"min_snr": 10.0, "min_stars": 2},  # a 256 px DECam CCD has few bright stars
                       package={"output_dir": str(out)}, classify={"backend": backend, "batch_size": 8},
                       run={"workers": 2, "inference_actors": 2, "inference_cpus": 0.0, "queue_depth": 2,
                            **run})


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
    assert len(alert_set(out)) > 50  # the undisturbed night every disturbed one is compared with
    return out, report, info


def _same_night(out, ref_out, ref_rep, rep):
    """``out`` is the undisturbed night ``ref_out``: every CCD-visit recorded with the same status,
    the same alerts (scores included), one file per CCD-visit, no candid twice, no temporaries."""
    ref = alert_set(ref_out)
    got = alert_set(out)  # fails on a duplicated candid
    assert len(got) > 50 and got == ref
    assert sorted(p.name for p in out.glob("*.avro")) == sorted(p.name for p in ref_out.glob("*.avro"))
    assert statuses(out) == statuses(ref_out) and set(statuses(out)) == ALL
    assert (rep.summary.n_done, rep.summary.n_failed, rep.summary.n_alerts) == \
        (ref_rep.summary.n_done, ref_rep.summary.n_failed, ref_rep.summary.n_alerts)
    assert no_temporaries(out)


def test_ray_night_equals_local_night(local_night, ray_night):
    (lout, lsum), (rout, rep, info) = local_night, ray_night
    assert lsum.n_done == rep.summary.n_done >= N_VISITS * N_CCDS - 1
    assert statuses(rout) == statuses(lout)
    local, remote = alert_set(lout), alert_set(rout)
    assert len(local) > 50
    assert sorted(local) == sorted(remote)
    assert all(strip_scores(remote[k]) == strip_scores(local[k]) for k in local)
    assert all(local[k]["candidate"]["rb"] is None for k in local)
    # the scores came back from the inference pool to the right alerts, in order
    for a in remote.values():
        diff = cutout_to_array(a["cutoutDifference"])
        want = centre_score(np.stack([diff] * 3, axis=-1)[None])["rb"][0]
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


def test_a_visit_runs_as_one_batch_and_equals_the_local_night(local_night, tmp_path):
    """One subtraction actor, batch_ccds = 2: each visit's two CCDs are one process_visit batch;
    the alerts are the local engine's (one CCD-visit per call), CCD-visit by CCD-visit."""
    lout, lsum = local_night
    with RayNight(_config(tmp_path, backend="none", workers=1, batch_ccds=2)) as engine:
        rep = engine.run(progress=False)
        info = engine.actor_info()
    assert rep.n_batches == N_VISITS and info[0]["n_batches"] == N_VISITS and info[0]["n_processed"] == len(ALL)
    recs = read_ledger(tmp_path)
    assert {r["qa"]["batch_size"] for r in recs if r["status"] == "done"} == {2}
    assert statuses(tmp_path) == statuses(lout)
    assert alert_set(tmp_path) == alert_set(lout) and rep.summary.n_alerts == lsum.n_alerts
    assert rep.plan is not None and rep.plan.n_actors == 1 and rep.plan.device_ccds_per_actor is None
    assert info[0]["resident_ccds"] == [0, 1] and info[0]["device_s"] > 0


def _holding_packager(marker_dir, hold: tuple, hold_s: float = 60.0):
    """A :class:`SubtractionWorker` that holds inside the packaging of the batch holding CCD-visit
    ``hold`` (after its device half, before its alerts are packaged), the first time only, after
    writing its pid to ``marker_dir/held``."""
    import os
    import time
    from pathlib import Path

    class HoldingPackager(SubtractionWorker):
        def _package(self, loaded, device):
            held = Path(marker_dir, "held")
            if tuple(hold) in [tuple(k) for k in loaded.keys] and not held.exists():
                held.write_text(str(os.getpid()))
                time.sleep(hold_s)
                Path(marker_dir, "released").touch()
            return super()._package(loaded, device)

    return HoldingPackager


def test_packaging_worker_killed_after_the_device_half(ray_night, tmp_path):
    """A subtraction actor dies in its packaging thread (the batch's device work done, its alerts
    not packaged yet; the next batch may be on the device): the batch runs again, nothing lost or doubled."""
    rout, ref_rep, _ = ray_night
    held = (1, 1)
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    with RayNight(_config(out), scorer_factory=fake_scorer_factory,
                  subtraction_cls=_holding_packager(marks, held)) as engine:
        slot = engine.slot_of(held[1])
        pid_before = engine.actor_info()[slot]["pid"]

        def kill(marker: str):
            assert marker == str(pid_before)
            ray.kill(engine.slots[slot].actor, no_restart=False)

        killer = Killer(marks / "held", kill)
        killer.start()
        rep = engine.run(progress=False)
        killer.check()
        pid_after = engine.actor_info()[slot]["pid"]
    assert not (marks / "released").exists() and pid_after != pid_before
    recs = {(r["visit"], r["ccd"]): r for r in read_ledger(out)}
    assert recs[held]["attempts"] >= 2 and recs[held]["status"] == "done"
    assert rep.n_retries >= 1 and rep.n_restarts >= 1
    _same_night(out, rout, ref_rep, rep)


def test_subtraction_actor_killed_inside_a_ccd_visit(ray_night, tmp_path):
    """A subtraction actor dies while it runs a CCD-visit (and, at the same moment, an inference
    actor and the writer): that CCD-visit and the one queued behind it run again, nothing is lost
    or duplicated."""
    rout, ref_rep, _ = ray_night
    held = (1, 0)  # the actor of CCD 0 holds inside load_frame of visit 1
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    cfg = _config(out)
    source = FaultySource(cfg.simulate, cfg.calibrate, marker_dir=marks, hold=[held])
    with RayNight(cfg, source, scorer_factory=fake_scorer_factory) as engine:
        pids_before = [s["pid"] for s in engine.actor_info()]
        slot = engine.slot_of(held[1])

        def kill(marker: str):
            assert marker.split()[0] == str(pids_before[slot])  # the held CCD-visit runs on that actor
            ray.kill(engine.slots[slot].actor, no_restart=False)  # a crash: Ray restarts it
            ray.kill(engine.inference[0], no_restart=False)
            ray.kill(engine.writer, no_restart=False)

        killer = Killer(marks / "held", kill)
        killer.start()
        rep = engine.run(progress=False)
        killer.check()
        pids_after = [s["pid"] for s in engine.actor_info()]
    assert not (marks / "released").exists()  # the kill landed while the CCD-visit was running
    assert pids_after[slot] != pids_before[slot]  # it really died and came back
    recs = {(r["visit"], r["ccd"]): r for r in read_ledger(out)}
    assert recs[held]["attempts"] >= 2 and recs[held]["status"] == "done"  # the killed CCD-visit was retried
    assert rep.n_retries >= 1 and rep.n_restarts >= 1
    _same_night(out, rout, ref_rep, rep)


def test_writer_killed_in_the_middle_of_a_write(ray_night, tmp_path):
    """The writer dies half-way through an alert file (half of it in the temporary, no record
    yet, more writes queued behind it): every write is done again, once."""
    rout, ref_rep, _ = ray_night
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    with RayNight(_config(out), scorer_factory=fake_scorer_factory, writer_cls=holding_writer(marks)) as engine:
        pid_before = ray.get(engine.writer.info.remote())["pid"]
        half_written = {}

        def kill(marker: str):
            pid, name = marker.split()
            assert pid == str(pid_before)
            half_written["tmp"] = sorted(p.name for p in out.glob(f".{name}.*.tmp"))
            ray.kill(engine.writer, no_restart=False)

        killer = Killer(marks / "held", kill)
        killer.start()
        rep = engine.run(progress=False)
        killer.check()
        pid_after = ray.get(engine.writer.info.remote())["pid"]
    assert len(half_written["tmp"]) == 1  # the kill landed while a write was in flight
    assert not (marks / "released").exists() and pid_after != pid_before
    assert rep.n_retries >= 1 and rep.n_restarts >= 1
    _same_night(out, rout, ref_rep, rep)


def test_inference_actor_killed_while_scoring(ray_night, tmp_path):
    """An inference actor dies inside a batch: the batch is scored again by the pool, the
    alerts carry the same scores as the undisturbed night's."""
    rout, ref_rep, _ = ray_night
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    with RayNight(_config(out), scorer_factory=holding_scorer_factory(marks)) as engine:
        pids = [ray.get(a.ready.remote())["pid"] for a in engine.inference]
        killed = {}

        def kill(marker: str):
            k = pids.index(int(marker))  # the actor that is scoring
            killed["k"] = k
            ray.kill(engine.inference[k], no_restart=False)

        killer = Killer(marks / "held", kill)
        killer.start()
        rep = engine.run(progress=False)
        killer.check()
        pid_after = ray.get(engine.inference[killed["k"]].ready.remote())["pid"]
    assert not (marks / "released").exists()  # the kill landed while the batch was being scored
    assert pid_after != pids[killed["k"]]
    _same_night(out, rout, ref_rep, rep)


def test_bad_ccd_is_recorded_and_the_night_goes_on(ray_night, tmp_path):
    rout, _, _ = ray_night
    cfg = _config(tmp_path, task_retries=2)
    source = nan_frame_source(cfg.simulate, cfg.calibrate, bad=(1, 0))
    with RayNight(cfg, source, scorer_factory=fake_scorer_factory) as engine:
        rep = engine.run(night_schedule(2, range(N_CCDS)), progress=False)
    recs = {(r["visit"], r["ccd"]): r for r in read_ledger(tmp_path)}
    assert len(recs) == 2 * N_CCDS
    bad = recs[(1, 0)]
    assert bad["status"] == "failed" and bad["attempts"] == 1  # bad data is not retried
    assert "InputError" in bad["error"] and "no finite pixel" in bad["error"] and "visit1_ccd0" in bad["error"]
    ref_status = {k: s for k, s in statuses(rout).items() if k[0] < 2 and k != (1, 0)}
    assert {k: r["status"] for k, r in recs.items() if k != (1, 0)} == ref_status
    assert rep.summary.n_failed == 1 + sum(s == "failed" for s in ref_status.values())
    assert not (tmp_path / "visit00000001_ccd000.avro").exists()
    # the other CCD-visits' alerts are those of the undisturbed night
    ref = {k: a for k, a in alert_set(rout).items() if a["candidate"]["visit"] < 2}
    got = alert_set(tmp_path)
    assert len(got) > 0
    assert got == {k: a for k, a in ref.items() if (a["candidate"]["visit"], a["candidate"]["ccd"]) != (1, 0)}


def test_disk_full_fails_one_ccd_visit_not_the_night(ray_night, tmp_path):
    """The writer's own OSError (ENOSPC while writing one alert file) is that CCD-visit's recorded
    failure, naming the file and the OS error; the night goes on."""
    rout, ref_rep, _ = ray_night
    bad = (1, 1)
    with RayNight(_config(tmp_path), scorer_factory=fake_scorer_factory, writer_cls=disk_full_writer(bad)) as engine:
        rep = engine.run(night_schedule(2, range(N_CCDS)), progress=False)
    recs = {(r["visit"], r["ccd"]): r for r in read_ledger(tmp_path)}
    assert set(recs) == {(v, c) for v in range(2) for c in range(N_CCDS)}
    rec = recs[bad]
    assert rec["status"] == "failed" and rec["n_alerts"] == 0 and rec["alerts_path"] is None
    assert str(tmp_path / "visit00000001_ccd001.avro") in rec["error"]
    assert "[Errno 28] No space left on device" in rec["error"]
    assert not (tmp_path / "visit00000001_ccd001.avro").exists() and no_temporaries(tmp_path)
    failed = {(r["visit"], r["ccd"]): r for r in rep.summary.per_ccd}[bad]
    assert failed["status"] == "failed" and failed["error"] == rec["error"]
    assert statuses(rout)[bad] == "done"  # so its alert file is written (and hits the full disk)
    ref_status = {k: s for k, s in statuses(rout).items() if k[0] < 2 and k != bad}
    assert {k: r["status"] for k, r in recs.items() if k != bad} == ref_status
    ref = {k: a for k, a in alert_set(rout).items()
           if a["candidate"]["visit"] < 2 and (a["candidate"]["visit"], a["candidate"]["ccd"]) != bad}
    got = alert_set(tmp_path)
    assert len(got) > 0 and got == ref
    assert rep.summary.n_alerts == len(ref)
    assert rep.summary.n_failed == 1 + sum(s == "failed" for s in ref_status.values())


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
