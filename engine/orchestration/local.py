"""Run a night on this machine: a process pool over (visit, CCD) tasks, a progress bar, a ledger.

Each task is :func:`~nightsift.engine.orchestration.task.run_ccd_visits` -- the task every night
engine runs (the Ray engine's subtraction actors too) -- and each worker process keeps the statics
of the CCDs it has served (:class:`~nightsift.engine.orchestration.task.StaticsCache`: the
reference is measured once per CCD and process, not once per visit). One bad CCD never stops the
night: its error kind and message are recorded in the ledger and the other CCDs go on. Outputs
are idempotent per (visit, CCD): alert files and records are replaced on a rerun, never appended.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from ..config import Config, from_dict, to_dict
from .ledger import write_record
from .task import TRUTH_KEYS, NightSummary, StaticsCache, run_ccd_visits, summarize

log = logging.getLogger("nightsift.night")

__all__ = ["NightSummary", "simulated_ccd_task", "run_simulated_night"]

#: this process's statics (one night configuration at a time)
_CACHE: dict[str, StaticsCache] = {}


def _worker_cache(config: Config, config_dict: dict) -> StaticsCache:
    from ..backend import get_backend
    from .sources import SimulatedNight

    key = json.dumps(config_dict, sort_keys=True, default=str)
    cache = _CACHE.get(key)
    if cache is None:
        _CACHE.clear()
        cache = StaticsCache(SimulatedNight(config.simulate, config.calibrate), config=config,
                             xp=get_backend(config.run.backend), max_resident=config.run.max_resident_ccds)
        _CACHE[key] = cache
    return cache


def simulated_ccd_task(config_dict: dict, visit: int, ccd: int) -> dict:
    """Simulate and process one CCD-visit, write its alerts and ledger record, score it against
    the truth. Never raises for a stage failure: the outcome is in the returned record."""
    from ..classify.runtime import pipeline_scorer

    config = from_dict(config_dict)
    cache = _worker_cache(config, config_dict)
    rec = run_ccd_visits(cache.source, [(visit, ccd)], config=config, cache=cache,
                         scorer=pipeline_scorer(config.classify))[0]  # the scorer is loaded once per process
    write_record(config.package.output_dir, visit, ccd, status=rec["status"], error=rec.get("error"),
                 n_alerts=rec["n_alerts"], alerts_path=rec.get("alerts_path"), qa=rec.get("qa"),
                 extra={k: rec[k] for k in TRUTH_KEYS[:-1] if k in rec})
    return rec


def run_simulated_night(config: Config, *, workers: int = 0, progress: bool = True) -> NightSummary:
    """Simulate and process ``n_visits x n_ccds`` CCD-visits with ``workers`` processes."""
    from tqdm import tqdm

    from ..classify.runtime import resolve_model

    if config.classify.backend not in ("none", "auto"):
        resolve_model(config.classify)  # a missing model or Edge TPU runtime fails here, not per CCD
    sim = config.simulate
    tasks = [(v, c) for v in range(sim.n_visits) for c in range(sim.n_ccds)]
    workers = workers or config.run.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    cfg = to_dict(config)
    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=len(tasks), unit="ccd", desc="night", disable=not progress)
    n_alerts = 0
    if workers == 1:
        it = (simulated_ccd_task(cfg, v, c) for v, c in tasks)
        for r in it:
            results.append(r)
            n_alerts += r.get("n_alerts", 0)
            bar.set_postfix(alerts=n_alerts, failed=sum(x["status"] != "done" for x in results))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futs = [pool.submit(simulated_ccd_task, cfg, v, c) for v, c in tasks]
            for f in as_completed(futs):
                r = f.result()
                results.append(r)
                n_alerts += r.get("n_alerts", 0)
                bar.set_postfix(alerts=n_alerts, failed=sum(x["status"] != "done" for x in results))
                bar.update()
    bar.close()
    for r in sorted(results, key=lambda r: (r["visit"], r["ccd"])):
        if r["status"] != "done":
            log.warning("visit %d ccd %d %s: %s", r["visit"], r["ccd"], r["status"], (r.get("error") or "").splitlines()[0])
    return summarize(results, wall_s=time.perf_counter() - t0)
