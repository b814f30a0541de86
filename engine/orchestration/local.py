"""Run a night on this machine: a process pool over (visit, CCD) tasks, a progress bar, a ledger.

One bad CCD never stops the night: its error kind and message are recorded in the ledger and the
other CCDs go on. Outputs are idempotent per (visit, CCD): alert files and records are replaced
on a rerun, never appended. (The Ray engine for clusters and GPUs builds on the same task
function.)
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from ..config import Config, from_dict, to_dict
from ..errors import AlgorithmFailure, SkipCCD
from .ledger import write_record

log = logging.getLogger("nightsift.night")


@dataclass(frozen=True)
class NightSummary:
    """Totals of a night. ``per_ccd`` holds one dict per CCD-visit (status, counts, QA)."""

    n_tasks: int
    n_done: int
    n_failed: int
    n_skipped: int
    n_alerts: int
    n_truth: int
    n_found: int
    n_truth_snr7: int
    n_found_snr7: int
    n_matched_candidates: int
    wall_s: float
    per_ccd: list

    @property
    def completeness(self) -> float:
        return self.n_found / self.n_truth if self.n_truth else float("nan")

    @property
    def completeness_snr7(self) -> float:
        return self.n_found_snr7 / self.n_truth_snr7 if self.n_truth_snr7 else float("nan")

    @property
    def purity(self) -> float:
        return self.n_matched_candidates / self.n_alerts if self.n_alerts else float("nan")


def simulated_ccd_task(config_dict: dict, visit: int, ccd: int) -> dict:
    """Simulate one CCD-visit, run the chain, write its alerts and ledger record, score against
    the truth. Never raises for a stage failure: the outcome is in the returned dict."""
    from ..classify.runtime import pipeline_scorer
    from ..pipeline import process_ccd
    from ..simulate import simulate_visit_ccd
    from ..stages.calibrate import make_master
    from ..truth import expected_snr, match_candidates

    config = from_dict(config_dict)
    out_dir = config.package.output_dir
    t0 = time.perf_counter()
    rec = {"visit": visit, "ccd": ccd}
    try:
        sim = simulate_visit_ccd(config.simulate, visit=visit, ccd=ccd)
        master = make_master(sim.calibration, header=sim.science_raw.header, config=config.calibrate)
        res = process_ccd(sim.science_raw, master, sim.reference, config=config, visit=visit, ccd=ccd,
                          keep_products=True, scorer=pipeline_scorer(config.classify))  # loaded once per process
        m = match_candidates(res.candidates, sim.transients)
        snr = expected_snr(sim.transients, res.products.subtraction.flux_err)
        rec.update(status="done", n_alerts=res.n_alerts, n_truth=len(sim.transients), n_found=int(m.found.sum()),
                   n_truth_snr7=int((snr >= 7).sum()), n_found_snr7=int(m.found[snr >= 7].sum()),
                   n_matched=int((m.truth_index >= 0).sum()), qa=res.qa)
        write_record(out_dir, visit, ccd, status="done", n_alerts=res.n_alerts, alerts_path=str(res.alerts_path),
                     qa=res.qa, extra={k: rec[k] for k in ("n_truth", "n_found", "n_truth_snr7", "n_found_snr7")})
    except (SkipCCD, AlgorithmFailure) as e:
        status = "skipped" if isinstance(e, SkipCCD) else "failed"
        rec.update(status=status, error=f"{type(e).__name__}: {e}", qa=getattr(e, "qa", {}))
        write_record(out_dir, visit, ccd, status=status, error=rec["error"], qa=rec["qa"])
    except Exception as e:  # a bug or an unforeseen input: record it with its traceback, go on
        rec.update(status="failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
        write_record(out_dir, visit, ccd, status="failed", error=rec["error"])
    rec["wall_s"] = time.perf_counter() - t0
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
    results.sort(key=lambda r: (r["visit"], r["ccd"]))
    for r in results:
        if r["status"] != "done":
            log.warning("visit %d ccd %d %s: %s", r["visit"], r["ccd"], r["status"], r.get("error", "").splitlines()[0])
    g = lambda k: int(np.sum([r.get(k, 0) for r in results]))  # noqa: E731
    return NightSummary(n_tasks=len(tasks), n_done=sum(r["status"] == "done" for r in results),
                        n_failed=sum(r["status"] == "failed" for r in results),
                        n_skipped=sum(r["status"] == "skipped" for r in results), n_alerts=g("n_alerts"),
                        n_truth=g("n_truth"), n_found=g("n_found"), n_truth_snr7=g("n_truth_snr7"),
                        n_found_snr7=g("n_found_snr7"), n_matched_candidates=g("n_matched"),
                        wall_s=time.perf_counter() - t0, per_ccd=results)
