"""One CCD-visit task and one night summary, shared by every night engine.

:func:`run_ccd_visits` is what a worker does -- a local process, a Ray subtraction actor: take
CCD-visits from a :class:`~nightsift.engine.orchestration.sources.CCDSource`, keep each CCD's
statics resident (:class:`StaticsCache`: master calibration and reference, the reference measured
once), run :func:`~nightsift.engine.pipeline.process_visit` on them as one batch, score the
candidates against the injected truth when the night is simulated, and return one outcome record
per CCD-visit. It never raises for a CCD's own problem (bad data, too few PSF stars): that is the
record's ``status`` (``skipped`` / ``failed``) and ``error``. :func:`summarize` turns records into
the :class:`NightSummary` every engine reports.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..errors import NightsiftError, SkipCCD, TransientFailure
from ..pipeline import CCDStatics, VisitFrame, prepare_statics, process_visit

log = logging.getLogger("nightsift.night")

__all__ = ["NightSummary", "StaticsCache", "run_ccd_visits", "summarize", "TRUTH_KEYS"]

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
    """The night's totals from its per-CCD-visit records (sorted by visit, CCD)."""
    per_ccd = sorted(records, key=lambda r: (r["visit"], r["ccd"]))
    g = lambda k: int(np.sum([r.get(k, 0) for r in per_ccd]))  # noqa: E731
    return NightSummary(n_tasks=len(per_ccd), n_done=sum(r["status"] == "done" for r in per_ccd),
                        n_failed=sum(r["status"] == "failed" for r in per_ccd),
                        n_skipped=sum(r["status"] == "skipped" for r in per_ccd), n_alerts=g("n_alerts"),
                        n_truth=g("n_truth"), n_found=g("n_found"), n_truth_snr7=g("n_truth_snr7"),
                        n_found_snr7=g("n_found_snr7"), n_matched_candidates=g("n_matched"), wall_s=wall_s,
                        per_ccd=per_ccd)


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


def _error(e: BaseException, *, trace: bool) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg + "\n" + traceback.format_exc(limit=4) if trace else msg


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
    :data:`TRUTH_KEYS`. A CCD-visit that failed for a reason of its own has its error; a bug
    (any other exception) fails the CCD-visits of the batch with a traceback.
    """
    from ..truth import match_candidates

    t0 = time.perf_counter()
    out: list[dict | None] = [None] * len(keys)
    frames, statics, where, truths = [], [], [], []
    for i, (visit, ccd) in enumerate(keys):
        rec = {"visit": int(visit), "ccd": int(ccd)}
        try:
            st, static = cache.get(visit, ccd)
            frame = source.load_frame(visit, ccd, static)
        except TransientFailure:
            raise
        except (SkipCCD, NightsiftError) as e:
            rec.update(status="skipped" if isinstance(e, SkipCCD) else "failed", error=_error(e, trace=False),
                       qa=dict(getattr(e, "qa", {})))
            out[i] = rec
            continue
        except Exception as e:  # a bug or an unforeseen input: recorded with its traceback
            rec.update(status="failed", error=_error(e, trace=True), qa={})
            out[i] = rec
            continue
        frames.append(VisitFrame(int(visit), int(ccd), raw=frame.raw, truth=frame.truth))
        statics.append(st)
        where.append(i)
        truths.append(frame.truth)
    t_load = time.perf_counter() - t0
    if frames:
        try:
            results = process_visit(frames, statics, config=config, scorer=scorer)
        except TransientFailure:
            raise  # infrastructure (the inference pool): the engine retries the CCD-visits
        except Exception as e:  # a bug of the chain: every CCD-visit of the batch failed with it
            for i in where:
                out[i] = {"visit": keys[i][0], "ccd": keys[i][1], "status": "failed", "error": _error(e, trace=True),
                          "qa": {}}
            results = []
        for i, res, truth in zip(where, results, truths):
            rec = {"visit": res.visit, "ccd": res.ccd, "status": res.status, "n_alerts": res.n_alerts,
                   "alerts_path": str(res.alerts_path) if res.alerts_path else None,
                   "qa": dict(res.qa, t_load=round(t_load / max(len(frames), 1), 4))}
            if res.error is not None:
                rec["error"] = _error(res.error, trace=False)
            if truth is not None and res.status == "done":
                m = match_candidates(res.candidates, truth)
                snr = res.truth_snr
                rec.update(n_truth=len(truth), n_found=int(m.found.sum()), n_truth_snr7=int((snr >= 7).sum()),
                           n_found_snr7=int(m.found[snr >= 7].sum()), n_matched=int((m.truth_index >= 0).sum()))
            out[i] = rec
    wall = time.perf_counter() - t0
    for rec in out:
        rec.setdefault("n_alerts", 0)
        rec["wall_s"] = round(wall / max(len(keys), 1), 4)
    return out
