"""Run a night on this machine: a pool of worker processes over (visit, CCD) tasks, a progress bar, a ledger.

Each task is :func:`~nightsift.engine.orchestration.task.run_ccd_visits` -- the task every night
engine runs (the Ray engine's subtraction actors too) -- and each worker process keeps the statics
of the CCDs it has served (:class:`~nightsift.engine.orchestration.task.StaticsCache`: the
reference is measured once per CCD and process, not once per visit). One bad CCD never stops the
night: its error kind and message are recorded in the ledger and the other CCDs go on. Outputs
are idempotent per (visit, CCD): alert files and records are replaced on a rerun, never appended.

Worker processes are *spawned*, never forked: a fork of a process that already ran the chain
inherits GNU OpenMP's thread pool and aborts ("fork() called from a process already using GNU
OpenMP"). Each worker runs one CCD-visit at a time, so a worker that dies (an OOM kill, a
segfault, an abort) is known to have died on that CCD-visit: it is replaced by a fresh process,
which runs the CCD-visit once more; a second death records it ``failed`` ("worker died: ...").
The other workers and their CCD-visits are not disturbed, and every CCD-visit of the night ends
with a record.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from multiprocessing.connection import wait as wait_ready

from ..config import Config, from_dict, to_dict
from ..io.avro import alert_path
from .ledger import discard, write_outcome
from .sources import night_tasks
from .task import NightSummary, StaticsCache, failed_record, record_outcome, run_ccd_visits, summarize

log = logging.getLogger("nightsift.night")

__all__ = ["NightSummary", "simulated_ccd_task", "run_simulated_night", "WORKER_RUNS"]

#: times a CCD-visit is run in a worker process before a worker's death on it is final
#: (one retry, in a fresh process)
WORKER_RUNS = 2

#: this process's statics for :func:`simulated_ccd_task` (one night configuration at a time)
_CACHE: dict[str, StaticsCache] = {}


def _new_cache(config: Config, source=None) -> StaticsCache:
    from ..backend import get_backend
    from .sources import SimulatedNight

    source = source if source is not None else SimulatedNight(config.simulate, config.calibrate)
    return StaticsCache(source, config=config, xp=get_backend(config.run.backend),
                        max_resident=config.run.max_resident_ccds)


def _worker_cache(config: Config, config_dict: dict) -> StaticsCache:
    key = json.dumps(config_dict, sort_keys=True, default=str)
    cache = _CACHE.get(key)
    if cache is None:
        _CACHE.clear()
        cache = _CACHE[key] = _new_cache(config)
    return cache


def _record(config: Config, rec: dict) -> None:
    """Write ``rec`` to the ledger; a CCD-visit that is not done keeps no alert file (nor quicklook) of
    an earlier run."""
    if rec["status"] != "done":
        from ..report import quicklook_path

        path = alert_path(config.package.output_dir, rec["visit"], rec["ccd"])
        discard(path)
        discard(quicklook_path(path))
    write_outcome(config.package.output_dir, rec)


def _night_task(config: Config, cache: StaticsCache, scorer, visit: int, ccd: int, attempt: int = 1) -> dict:
    rec = run_ccd_visits(cache.source, [(visit, ccd)], config=config, cache=cache, scorer=scorer)[0]
    rec["attempts"] = int(attempt)
    _record(config, rec)
    return rec


def simulated_ccd_task(config_dict: dict, visit: int, ccd: int) -> dict:
    """Simulate and process one CCD-visit in this process, write its alerts and ledger record,
    score it against the truth. Never raises for a stage failure: the outcome is in the returned
    record."""
    from ..classify.runtime import pipeline_scorer

    config = from_dict(config_dict)
    cache = _worker_cache(config, config_dict)
    return _night_task(config, cache, pipeline_scorer(config.classify), visit, ccd)


# ----------------------------------------------------------------------------------------------
# the pool
# ----------------------------------------------------------------------------------------------
def _worker_main(conn, config_dict: dict, source) -> None:
    """Body of a worker process: receive ``(visit, ccd, attempt)``, answer ``("ok", record)``; ``None`` ends it.

    Setting up (statics cache, scorer) happens before the first answer; an error there is answered
    ``("raise", exception)`` and ends the worker (the night cannot run: a missing model, say). An
    unexpected error of one CCD-visit outside the chain (its ledger record could not be written)
    is answered as that CCD-visit's failed record.
    """
    try:
        from ..classify.runtime import pipeline_scorer

        config = from_dict(config_dict)
        cache = _new_cache(config, source)
        scorer = pipeline_scorer(config.classify)  # loaded once per process
    except BaseException as e:  # noqa: BLE001 -- reported to the driver, which stops the night
        conn.send(("raise", _picklable(e)))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the driver is gone
            return
        if msg is None:
            return
        visit, ccd, attempt = msg
        try:
            rec = _night_task(config, cache, scorer, visit, ccd, attempt)
        except Exception as e:  # noqa: BLE001 -- a TransientFailure too: this engine has no pool to retry
            rec = failed_record(visit, ccd, record_outcome(e)["error"], attempts=attempt)
            try:
                _record(config, rec)  # no alert file without a done record
            except OSError:
                pass  # the summary still has it
        conn.send(("ok", rec))


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def _death(exitcode) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with code {exitcode}"


class _Worker:
    """One spawned worker process and the CCD-visit it is running (``None`` when idle)."""

    def __init__(self, ctx, config_dict: dict, source, n: int):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, config_dict, source),
                                   name=f"nightsift-worker-{n}", daemon=True)
        self.process.start()
        child.close()
        self.task = None

    def send(self, task, attempt: int) -> None:
        self.task = task
        try:
            self.conn.send((*task, attempt))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass  # dead already: its sentinel says so and the task is charged to the death

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.conn.send(None)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


def _run_pool(config: Config, tasks: list, *, workers: int, source, on_record) -> None:
    """Run ``tasks`` on ``workers`` spawned processes, calling ``on_record(rec)`` once per task."""
    ctx = mp.get_context("spawn")
    cfg = to_dict(config)
    queue = deque(tasks)
    runs: dict[tuple[int, int], int] = {}
    n_started = 0

    def start():
        nonlocal n_started
        n_started += 1
        return _Worker(ctx, cfg, source, n_started)

    pool = [start() for _ in range(min(workers, len(tasks)))]
    try:
        while queue or any(w.task is not None for w in pool):
            for w in pool:
                if w.task is None and queue:
                    task = queue.popleft()
                    runs[task] = runs.get(task, 0) + 1
                    w.send(task, runs[task])
            busy = [w for w in pool if w.task is not None]
            ready = set(wait_ready([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for k, w in enumerate(pool):
                if w.task is None or (w.conn not in ready and w.process.sentinel not in ready):
                    continue
                got = None
                try:
                    if w.conn.poll():
                        got = w.conn.recv()
                except (EOFError, OSError):
                    got = None
                if got is not None:
                    kind, value = got
                    if kind == "raise":
                        raise value
                    w.task = None
                    on_record(value)
                    if not w.process.is_alive():  # answered, then died: replace it before it gets work
                        w.stop()
                        pool[k] = start()
                    continue
                # the worker died on its CCD-visit
                task, pid = w.task, w.process.pid
                w.task = None
                w.stop()
                how = _death(w.process.exitcode)
                pool[k] = start()
                v, c = task
                if runs[task] < WORKER_RUNS:
                    log.warning("visit %d ccd %d: worker process %d %s; running it again in a fresh process",
                                v, c, pid, how)
                    runs[task] += 1
                    pool[k].send(task, runs[task])
                    continue
                rec = failed_record(v, c, f"worker died: process {pid} {how} while running visit {v} ccd {c}, "
                                          f"{runs[task]} times (the last in a fresh process): an out-of-memory "
                                          f"kill, a crash or an abort in the chain", attempts=runs[task])
                try:
                    _record(config, rec)
                except OSError as e:  # the summary still has it
                    log.error("visit %d ccd %d: its record could not be written: %s", v, c, e)
                on_record(rec)
    finally:
        for w in pool:
            w.stop()


def run_simulated_night(config: Config, *, workers: int = 0, progress: bool = True, source=None,
                        tasks=None) -> NightSummary:
    """Simulate and process ``n_visits x n_ccds`` CCD-visits (or ``source``'s) with ``workers`` processes.

    Parameters
    ----------
    config : Config
    workers : int
        Worker processes (0: ``config.run.workers``, else the number of cores). With 1 the night
        runs in this process (no protection against the process dying).
    progress : bool
        Show a progress bar.
    source : CCDSource, optional
        Where statics and frames come from (default: :class:`SimulatedNight` of
        ``config.simulate``); picklable by reference, since spawned workers import it.
    tasks : list of (visit, ccd), optional
        The CCD-visits to run (a resumed night's remainder); default: the source's own list
        (:func:`~nightsift.engine.orchestration.sources.night_tasks`).

    Returns
    -------
    NightSummary
        One record per CCD-visit, whatever happened to it (a worker that died on it included).
    """
    from tqdm import tqdm

    from ..classify.runtime import check_model, pipeline_scorer

    check_model(config.classify)  # a missing, damaged or unrunnable model fails here, not per CCD
    if tasks is None:
        tasks = night_tasks(source, config)
    workers = workers or config.run.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=len(tasks), unit="ccd", desc="night", disable=not progress)

    def on_record(r: dict):
        results.append(r)
        bar.set_postfix(alerts=sum(x.get("n_alerts", 0) for x in results),
                        failed=sum(x["status"] != "done" for x in results))
        bar.update()

    try:
        if workers == 1:
            cache = _new_cache(config, source)
            scorer = pipeline_scorer(config.classify)
            for v, c in tasks:
                on_record(_night_task(config, cache, scorer, v, c))
        else:
            _run_pool(config, tasks, workers=workers, source=source, on_record=on_record)
    finally:
        bar.close()
    return summarize(results, wall_s=time.perf_counter() - t0)
