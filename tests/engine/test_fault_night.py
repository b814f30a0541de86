"""A night with bad CCDs and dead workers, on each engine: nothing lost, nothing duplicated.

One small night (2 visits x 3 CCDs of 512 x 512 px, no scorer) is run clean in this process, then
again with faults (:class:`~tests.engine.conftest.FaultySource`):

* ``NAN``: a raw frame of NaN (a bad CCD-visit, failed for its own reason, never retried);
* ``ONCE``: kills the process running it (SIGKILL, as an OOM kill) the first time only;
* ``ALWAYS``: kills the process running it every time.

Every CCD-visit must end with a record; ``ALWAYS`` is failed as a dead worker's after its retries,
the others are the clean night's, alert for alert. ``ALWAYS`` is run first on its worker/actor
with a good CCD-visit beside it, so a death charged to the wrong CCD-visit would lose a good one;
on Ray the two are one batch (``batch_ccds = 2``: CCDs 0 and 2 of visit 0 on actor 0), so its
first death is its batch mate's too.
The clean night runs the chain in this very process before the local engine starts its pool: a
forked pool would abort there (GNU OpenMP), a spawned one must not.
"""
from __future__ import annotations

import pytest

from nightsift.engine.config import load_config
from nightsift.engine.orchestration.ledger import read_ledger
from nightsift.engine.orchestration.local import WORKER_RUNS, run_simulated_night

from .conftest import FaultySource, alerts_by_ccd_visit, no_temporaries, statuses

N_VISITS, N_CCDS = 2, 3
ALL = {(v, c) for v in range(N_VISITS) for c in range(N_CCDS)}
ALWAYS, ONCE, NAN = (0, 0), (0, 1), (1, 1)  # CCD 0 shares its Ray actor (ccd % 2) with CCD 2
GOOD = ALL - {ALWAYS, NAN}


def _config(out, **run):
    return load_config(None, simulate={"ny": 512, "nx": 512, "n_visits": N_VISITS, "n_ccds": N_CCDS,
                                       "n_transients": 10},
                       package={"output_dir": str(out)}, classify={"backend": "none"},
                       run={"workers": 2, "queue_depth": 2, "batch_ccds": 2, **run})  # Ray: CCDs 0 and 2 one batch


def _faulty(cfg, marks):
    marks.mkdir()
    return FaultySource(cfg.simulate, cfg.calibrate, marker_dir=marks, nan=[NAN], kill_once=[ONCE],
                        kill_always=[ALWAYS])


@pytest.fixture(scope="module")
def clean_night(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    summary = run_simulated_night(_config(out, engine="local"), workers=1, progress=False)  # in this process
    by_ccd_visit = alerts_by_ccd_visit(out)
    assert summary.n_done == len(ALL) and set(by_ccd_visit) == ALL  # every CCD-visit of the clean night has alerts
    assert all(len(a) > 0 for a in by_ccd_visit.values())
    return out, by_ccd_visit


def _check_night(out, summary, clean, source, *, nan_runs=1):
    """Every CCD-visit recorded (ledger and summary), the good ones' alerts the clean night's."""
    cout, clean_alerts = clean
    recs = {(r["visit"], r["ccd"]): r for r in read_ledger(out)}
    assert set(recs) == ALL
    assert {(r["visit"], r["ccd"]) for r in summary.per_ccd} == ALL and summary.n_tasks == len(ALL)
    nan = recs[NAN]
    assert nan["status"] == "failed" and 1 <= nan["attempts"] <= nan_runs  # bad data is not retried
    assert "InputError" in nan["error"] and "no finite pixel" in nan["error"]
    assert source.kills(*ONCE) == 1 and recs[ONCE]["attempts"] == 2
    assert {k: recs[k]["status"] for k in GOOD} == {k: "done" for k in GOOD}
    assert {k: s for k, s in statuses(cout).items() if k in GOOD} == {k: recs[k]["status"] for k in GOOD}
    got = alerts_by_ccd_visit(out)  # one file per CCD-visit, no candid twice
    assert set(got) == GOOD
    assert all(got[k] == clean_alerts[k] for k in GOOD)
    assert summary.n_alerts == sum(len(clean_alerts[k]) for k in GOOD)
    assert no_temporaries(out)
    return recs


def test_local_night_with_bad_ccds_and_dead_workers(clean_night, tmp_path):
    out = tmp_path / "out"
    cfg = _config(out, engine="local")
    source = _faulty(cfg, tmp_path / "marks")
    summary = run_simulated_night(cfg, workers=2, progress=False, source=source)
    recs = _check_night(out, summary, clean_night, source)
    dead = recs[ALWAYS]
    assert source.kills(*ALWAYS) == WORKER_RUNS == 2  # retried once, in a fresh process
    assert dead["status"] == "failed" and dead["attempts"] == WORKER_RUNS
    assert dead["error"].startswith("worker died:") and "SIGKILL" in dead["error"]
    assert "visit 0 ccd 0" in dead["error"]
    assert {k: r["attempts"] for k, r in recs.items() if k in GOOD - {ONCE}} == {k: 1 for k in GOOD - {ONCE}}
    assert (summary.n_done, summary.n_failed) == (len(GOOD), 2)


def test_ray_night_with_bad_ccds_and_dead_actors(clean_night, ray_cluster, tmp_path):
    from nightsift.engine.orchestration.ray_engine import RayNight

    out = tmp_path / "out"
    cfg = _config(out, engine="ray", task_retries=2)
    source = _faulty(cfg, tmp_path / "marks")
    with RayNight(cfg, source) as engine:
        rep = engine.run(progress=False)
    # NAN sits behind ONCE on actor 1 (queue_depth 2): resubmitted once when ONCE kills the actor
    recs = _check_night(out, rep.summary, clean_night, source, nan_runs=2)
    dead = recs[ALWAYS]
    assert source.kills(*ALWAYS) == 3  # run 1 + task_retries
    assert dead["status"] == "failed" and dead["attempts"] == 3
    assert dead["error"].startswith("worker died: subtraction actor 0 died 3 times")
    # the good CCD-visit beside it on the same actor (its batch mate) was never charged with its deaths:
    # it died once in their batch, then ran alone and was done
    assert recs[(0, 2)]["status"] == "done" and recs[(0, 2)]["attempts"] == 2
    assert rep.n_batches > N_VISITS * 2  # batches, then one CCD-visit at a time after the crashes
    assert (rep.summary.n_done, rep.summary.n_failed) == (len(GOOD), 2)
