"""One CCD-visit task and one night summary, shared by every night engine.

:func:`run_ccd_visits` is what a worker does -- a local process, a Ray subtraction actor: take
CCD-visits from a :class:`~nightsift.engine.orchestration.sources.CCDSource`, keep each CCD's
statics resident (:class:`StaticsCache`: master calibration and reference, the reference measured
once), run :func:`~nightsift.engine.pipeline.process_visit` on them as one batch, score the
candidates against the injected truth when the night is simulated, and return one outcome record
per CCD-visit. It never raises for a CCD's own problem (bad data, too few PSF stars): that is the
record's ``status`` (``skipped`` / ``failed``) and ``error``. :func:`summarize` turns records into
the :class:`NightSummary` every engine reports.

:func:`record_outcome` is the one mapping from what a CCD-visit raised to its record (every
engine, the real/bogus dataset builder); :func:`run_and_record` runs a call under it.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

from ..config import Config
from ..errors import NightsiftError, SkipCCD, TransientFailure
from ..pipeline import CCDStatics, VisitFrame, prepare_statics, process_visit

log = logging.getLogger("nightsift.night")

__all__ = ["NightSummary", "StaticsCache", "failed_record", "record_outcome", "run_and_record", "run_ccd_visits",
           "summarize", "truth_counts", "TRUTH_KEYS"]

T = TypeVar("T")

#: outcome keys filled when the night is simulated (truth scoring)
TRUTH_KEYS = ("n_truth", "n_found", "n_truth_snr7", "n_found_snr7", "n_matched")


@dataclass(frozen=True)
class NightSummary:
    """Totals of a night. ``per_ccd`` holds one record per CCD-visit (status, counts, QA)."""

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


def summarize(records: list[dict], *, wall_s: float) -> NightSummary:
    """The night's totals from its per-CCD-visit records (sorted by visit, CCD); each CCD-visit not
    done is logged with the first line of its error."""
    per_ccd = sorted(records, key=lambda r: (r["visit"], r["ccd"]))
    for r in per_ccd:
        if r["status"] != "done":
            log.warning("visit %d ccd %d %s: %s", r["visit"], r["ccd"], r["status"],
                        (r.get("error") or "").splitlines()[0])
    g = lambda k: int(np.sum([r.get(k, 0) for r in per_ccd]))  # noqa: E731
    return NightSummary(n_tasks=len(per_ccd), n_done=sum(r["status"] == "done" for r in per_ccd),
                        n_failed=sum(r["status"] == "failed" for r in per_ccd),
                        n_skipped=sum(r["status"] == "skipped" for r in per_ccd), n_alerts=g("n_alerts"),
                        n_truth=g("n_truth"), n_found=g("n_found"), n_truth_snr7=g("n_truth_snr7"),
                        n_found_snr7=g("n_found_snr7"), n_matched_candidates=g("n_matched"), wall_s=wall_s,
                        per_ccd=per_ccd)


def truth_counts(candidates: np.ndarray, truth: np.ndarray, truth_snr: np.ndarray) -> dict:
    """The :data:`TRUTH_KEYS` of one simulated CCD-visit: injected transients (all, and those of
    expected S/N >= 7), those found, and the candidates matched to one."""
    from ..truth import match_candidates

    m = match_candidates(candidates, truth)
    bright = truth_snr >= 7
    return {"n_truth": len(truth), "n_found": int(m.found.sum()), "n_truth_snr7": int(bright.sum()),
            "n_found_snr7": int(m.found[bright].sum()), "n_matched": int((m.truth_index >= 0).sum())}


class StaticsCache:
    """The statics of the CCDs a worker serves, resident on its device (least recently used evicted).

    Parameters
    ----------
    source : CCDSource
    config : Config
    xp : module
        The worker's array module (numpy, or cupy on its GPU).
    max_resident : int
        CCDs kept; 0 = all.
    """

    def __init__(self, source, *, config: Config, xp=np, max_resident: int = 0):
        from ..backend import retain_host_memory

        retain_host_memory(config.run.retain_host_memory)  # a worker's process: see the config field
        self.source, self.config, self.xp = source, config, xp
        self.max_resident = int(max_resident)
        self._items: OrderedDict[int, tuple] = OrderedDict()
        self.n_loaded = 0

    def get(self, visit: int, ccd: int) -> tuple[CCDStatics, object]:
        """``(statics on the device, the source's static record)`` of ``ccd``, loading and
        measuring its reference on first use."""
        item = self._items.get(ccd)
        if item is None:
            static = self.source.load_static(visit, ccd)
            statics = prepare_statics(static.reference, static.master, config=self.config, xp=self.xp, ccd=ccd)
            item = (statics, static)
            self._items[ccd] = item
            self.n_loaded += 1
            if self.max_resident and len(self._items) > self.max_resident:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(ccd)
        return item

    def ccds(self) -> list[int]:
        return list(self._items)

    @property
    def nbytes(self) -> int:
        return int(sum(s.nbytes for s, _ in self._items.values()))


def record_outcome(e: BaseException) -> dict:
    """The outcome of a CCD-visit that raised ``e``: its record's ``status``, ``error`` and ``qa``.

    * :class:`~nightsift.engine.errors.SkipCCD` -> ``skipped``;
    * any other :class:`~nightsift.engine.errors.NightsiftError` (an ``AlgorithmFailure``, an
      ``InputError``: the CCD's own problem) -> ``failed`` with its type and message;
    * any other exception (a bug, an unforeseen input) -> ``failed`` with its type, message and
      where it was raised (``file:line``, then the innermost frames of its traceback).

    ``qa`` holds what the stage measured before it gave up (a ``NightsiftError``'s ``qa``).
    """
    if isinstance(e, NightsiftError):
        return {"status": "skipped" if isinstance(e, SkipCCD) else "failed", "error": f"{type(e).__name__}: {e}",
                "qa": dict(getattr(e, "qa", {}))}
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    trace = "\nTraceback (innermost frames):\n" + "".join(traceback.format_list(frames[-4:])) if frames else ""
    return {"status": "failed", "error": f"{type(e).__name__}: {e}{where}{trace}".rstrip(), "qa": {}}


def run_and_record(call: Callable[[], T]) -> tuple[T | None, dict | None]:
    """``(call(), None)``; ``(None, record_outcome(e))`` when it raised ``e``: a CCD-visit never stops
    the night. :class:`~nightsift.engine.errors.TransientFailure` propagates (infrastructure, not
    the CCD: the engine retries the CCD-visit), as does what is not an ``Exception`` (an interrupt)."""
    try:
        return call(), None
    except TransientFailure:
        raise
    except Exception as e:  # noqa: BLE001 -- recorded, with where it happened when it is a bug
        return None, record_outcome(e)


def failed_record(visit: int, ccd: int, error: str, *, attempts: int) -> dict:
    """The record of a CCD-visit an engine gave up on (its worker died, its retries ran out)."""
    return {"visit": int(visit), "ccd": int(ccd), "status": "failed", "error": error, "n_alerts": 0, "qa": {},
            "attempts": int(attempts)}


def _load(source, cache: StaticsCache, visit: int, ccd: int) -> tuple[VisitFrame, CCDStatics]:
    """The frame of a CCD-visit and its CCD's statics (loaded and measured on first use)."""
    st, static = cache.get(visit, ccd)
    frame = source.load_frame(visit, ccd, static)
    return VisitFrame(int(visit), int(ccd), raw=frame.raw, truth=frame.truth), st


def run_ccd_visits(source, keys, *, config: Config, cache: StaticsCache, scorer=None) -> list[dict]:
    """Run CCD-visits as one batch and return their outcome records (never raises for a CCD).

    Parameters
    ----------
    source : CCDSource
        Frames (and, through ``cache``, statics).
    keys : sequence of (visit, ccd)
    config : Config
        ``package.output_dir`` is where the alert files go.
    cache : StaticsCache
    scorer : callable, optional
        Real/bogus scorer (see :func:`~nightsift.engine.pipeline.process_visit`).

    Returns
    -------
    list of dict, one per key in order: ``visit``, ``ccd``, ``status`` (done / failed / skipped),
    ``error``, ``n_alerts``, ``alerts_path``, ``qa``, ``wall_s`` and, for a simulated night,
    :data:`TRUTH_KEYS`. A CCD-visit that failed is recorded by :func:`record_outcome`; a bug of
    the chain (an exception out of ``process_visit``) fails every CCD-visit of the batch with it.
    Only :class:`~nightsift.engine.errors.TransientFailure` is raised (the engine retries).
    """
    t0 = time.perf_counter()
    out: list[dict | None] = [None] * len(keys)
    frames, statics, where = [], [], []
    for i, (visit, ccd) in enumerate(keys):
        loaded, failure = run_and_record(lambda: _load(source, cache, visit, ccd))
        if failure is not None:
            out[i] = {"visit": int(visit), "ccd": int(ccd), **failure}
            continue
        frames.append(loaded[0])
        statics.append(loaded[1])
        where.append(i)
    t_load = round((time.perf_counter() - t0) / max(len(frames), 1), 4)
    if frames:
        results, failure = run_and_record(lambda: process_visit(frames, statics, config=config, scorer=scorer))
        for i, frame, res in zip(where, frames, results or [None] * len(frames)):
            out[i] = (_result_record(res, frame.truth, t_load) if failure is None
                      else {"visit": frame.visit, "ccd": frame.ccd, **failure, "qa": dict(failure["qa"])})
    wall = time.perf_counter() - t0
    for rec in out:
        rec.setdefault("n_alerts", 0)
        rec["wall_s"] = round(wall / max(len(keys), 1), 4)
    return out


def _result_record(res, truth, t_load: float) -> dict:
    """The outcome record of one CCD-visit the chain ran (a ``CCDResult``), scored against its truth
    when it is simulated and done."""
    rec = {"visit": res.visit, "ccd": res.ccd, "status": res.status, "n_alerts": res.n_alerts,
           "alerts_path": str(res.alerts_path) if res.alerts_path else None, "qa": dict(res.qa, t_load=t_load)}
    if res.error is not None:
        rec["error"] = record_outcome(res.error)["error"]
    if truth is not None and res.status == "done":
        rec.update(truth_counts(res.candidates, truth, res.truth_snr))
    return rec
