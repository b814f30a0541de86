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

import contextlib
import logging
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, TypeVar

import numpy as np

from ..config import Config
from ..errors import NightsiftError, SkipCCD, TransientFailure
from ..pipeline import CCDStatics, VisitFrame, package_results, prepare_statics, process_visit
from nightsift.kernels._xp import count_transfers, to_device, to_host

log = logging.getLogger("nightsift.night")

__all__ = ["NightSummary", "StaticsCache", "FrameUploader", "LoadedBatch", "failed_record", "load_ccd_visits", "package_ccd_visits",
           "record_outcome", "run_and_record", "run_ccd_visits", "run_device_half", "statics_to_device",
           "statics_to_host", "summarize", "truth_counts", "TRUTH_KEYS"]

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
    """The statics of the CCDs a worker serves (least recently used evicted), on its device or,
    beyond ``device_slots`` CCDs, in (pinned, on a GPU) host memory uploaded with each batch.

    Parameters
    ----------
    source : CCDSource
    config : Config
    xp : module
        The worker's array module (numpy, or cupy on its GPU).
    max_resident : int
        CCDs kept; 0 = all.
    device_slots : int, optional
        CCDs whose statics stay on the device (the memory plan,
        :func:`~nightsift.engine.orchestration.plan.plan_memory`); the others' large planes are
        kept on the host and uploaded by :meth:`get` (on ``copy_stream``). ``None`` = all (numpy:
        the host is the device).
    device_lock : lock, optional
        Held while a CCD's reference is measured (:func:`prepare_statics` runs on the device): a
        worker whose batches overlap serialises its device work on it.
    copy_stream : cupy Stream, optional
        Stream of the uploads of host-kept statics, so that they overlap the batch running on the
        compute stream (cupy; ``None`` elsewhere).
    """

    def __init__(self, source, *, config: Config, xp=np, max_resident: int = 0, device_slots: int | None = None,
                 device_lock=None, copy_stream=None):
        from ..backend import retain_host_memory

        retain_host_memory(config.run.retain_host_memory)  # a worker's process: see the config field
        self.source, self.config, self.xp = source, config, xp
        self.max_resident = int(max_resident)
        self.device_slots = None if device_slots is None or xp is np else int(device_slots)
        self._device_lock = device_lock or contextlib.nullcontext()
        self._copy_stream = copy_stream
        self._lock = threading.RLock()
        self._items: OrderedDict[int, tuple] = OrderedDict()
        self._on_host: set[int] = set()
        self.n_loaded = 0
        self.n_uploaded = 0

    def get(self, visit: int, ccd: int) -> tuple[CCDStatics, object]:
        """``(statics on the device, the source's static record)`` of ``ccd``, loading and
        measuring its reference on first use; statics kept on the host are uploaded here."""
        with self._lock:
            item = self._items.get(ccd)
            if item is None:
                item = self._load(visit, ccd)
            else:
                self._items.move_to_end(ccd)
            statics, static = item
            on_host = ccd in self._on_host
        if on_host:
            statics = statics_to_device(statics, self.xp, stream=self._copy_stream)
            self.n_uploaded += 1
        return statics, static

    def _load(self, visit: int, ccd: int) -> tuple:
        static = self.source.load_static(visit, ccd)
        with self._device_lock:
            statics = prepare_statics(static.reference, static.master, config=self.config, xp=self.xp, ccd=ccd,
                                      psf_file=getattr(static, "psf_file", None))
        on_device = sum(c not in self._on_host for c in self._items)
        if self.device_slots is not None and on_device >= self.device_slots:
            statics = statics_to_host(statics)
            self._on_host.add(ccd)
        item = self._items[ccd] = (statics, static)
        self.n_loaded += 1
        if self.max_resident and len(self._items) > self.max_resident:
            old, _ = self._items.popitem(last=False)
            self._on_host.discard(old)
        return item

    def ccds(self) -> list[int]:
        return list(self._items)

    def host_ccds(self) -> list[int]:
        """The CCDs whose statics are kept on the host (uploaded with each batch)."""
        return [c for c in self._items if c in self._on_host]

    @property
    def nbytes(self) -> int:
        """Bytes of every kept CCD's statics (device and host)."""
        return int(sum(s.nbytes for s, _ in self._items.values()))

    @property
    def device_nbytes(self) -> int:
        """Bytes of the statics resident on the device."""
        return int(sum(s.nbytes for c, (s, _) in self._items.items() if c not in self._on_host))


#: the large planes of a CCD's statics: (attribute of CCDStatics, attribute of it)
_PLANES = (("reference", "image"), ("reference", "variance"), ("reference", "mask"), ("master", "bias"),
           ("master", "dark_rate"), ("master", "flat"), ("master", "bad_pixel_mask"))


def _move_planes(statics: CCDStatics, move) -> CCDStatics:
    """``statics`` with each large plane replaced by ``move(plane)`` (small arrays stay put)."""
    parts = {}
    for part in ("reference", "master"):
        obj = getattr(statics, part)
        if obj is not None:
            parts[part] = replace(obj, **{a: move(getattr(obj, a)) for p, a in _PLANES if p == part})
    return replace(statics, **parts)


def _pinned_copy(host: np.ndarray) -> np.ndarray:
    """``host`` in page-locked memory when cupy is here (its uploads then run asynchronously on a
    copy stream), else ``host`` itself."""
    try:
        import cupyx
    except ImportError:
        return host
    buf = cupyx.empty_pinned(host.shape, host.dtype)
    np.copyto(buf, host)
    return buf


def statics_to_host(statics: CCDStatics) -> CCDStatics:
    """A CCD's statics with its large planes in (pinned) host memory (its PSF and catalogue, small,
    stay on the device)."""
    return _move_planes(statics, lambda a: _pinned_copy(to_host(a, label="statics")))


def statics_to_device(statics: CCDStatics, xp, *, stream=None) -> CCDStatics:
    """The host-kept planes of ``statics`` uploaded to ``xp`` for one batch (on ``stream`` when given:
    cupy copies from pinned memory run asynchronously there; the stream is synchronised before
    this returns, so the batch may use them on any stream)."""
    ctx = stream if stream is not None else contextlib.nullcontext()
    with ctx:
        out = _move_planes(statics, lambda a: to_device(a, xp, label="statics"))
    if stream is not None:
        stream.synchronize()
    return out


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
    return VisitFrame(int(visit), int(ccd), raw=frame.raw, science=frame.science, truth=frame.truth,
                      psf=getattr(frame, "psf", None)), st


@dataclass
class LoadedBatch:
    """CCD-visits of one batch with their frames and statics loaded (:func:`load_ccd_visits`).

    ``records`` holds one slot per key: ``None`` until the chain has run, or the record of a
    CCD-visit that could not be loaded; ``where`` maps ``frames[j]`` to its key's position."""

    keys: list
    frames: list = field(default_factory=list)
    statics: list = field(default_factory=list)
    where: list = field(default_factory=list)
    records: list = field(default_factory=list)
    t0: float = 0.0
    t_load: float = 0.0
    xfer: dict = field(default_factory=dict)  #: crossings of the loading (``xfer_*``, whole batch)


class FrameUploader:
    """Raw frames to the device ahead of their batch, so that their upload overlaps the batch
    before it (a GPU worker's loading thread): each frame is staged in a page-locked buffer taken
    from a pool (one per frame being uploaded: with two batches in flight, a double buffer) and
    copied on ``stream``, synchronised before the frame is handed on.

    Parameters
    ----------
    xp : module
        The worker's device array module (cupy; the strict stand-in in tests).
    stream : cupy Stream, optional
        The copy stream (``None``: the current stream).
    """

    def __init__(self, xp, stream=None):
        self.xp, self.stream = xp, stream
        self._free: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def _take(self, host: np.ndarray) -> np.ndarray:
        key = (host.shape, host.dtype.str)
        with self._lock:
            free = self._free.setdefault(key, [])
            buf = free.pop() if free else None
        if buf is None:
            buf = _pinned_copy(host)
        if buf is not host:
            np.copyto(buf, host)
        return buf

    def _give(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault((buf.shape, buf.dtype.str), []).append(buf)

    def __call__(self, frame: VisitFrame) -> VisitFrame:
        if frame.raw is None:
            return frame
        buf = self._take(np.asarray(frame.raw.data))
        try:
            with self.stream if self.stream is not None else contextlib.nullcontext():
                data = to_device(buf, self.xp, label="raw")
            if self.stream is not None:
                self.stream.synchronize()
        finally:
            self._give(buf)
        return replace(frame, raw=replace(frame.raw, data=data))


def load_ccd_visits(source, keys, *, cache: StaticsCache, upload: FrameUploader | None = None) -> LoadedBatch:
    """Load the frames of CCD-visits and their CCDs' statics (uploading those kept on the host, and
    the raw frames when ``upload`` is given); a CCD-visit that cannot be loaded gets its record
    (:func:`record_outcome`) here. The crossings made are added to the batch's QA ``xfer_*``."""
    t0 = time.perf_counter()
    loaded = LoadedBatch(keys=list(keys), records=[None] * len(keys), t0=t0)
    with count_transfers() as ledger:
        for i, (visit, ccd) in enumerate(loaded.keys):
            _load_one(loaded, i, source, cache, upload, visit, ccd)
    loaded.xfer = ledger.as_qa()
    loaded.t_load = round((time.perf_counter() - t0) / max(len(loaded.frames), 1), 4)
    return loaded


def _load_one(loaded: LoadedBatch, i: int, source, cache: StaticsCache, upload, visit: int, ccd: int) -> None:
    """Key ``i`` of ``loaded``: its frame (uploaded by ``upload``) and statics, or its failure record."""

    def load():
        frame, statics = _load(source, cache, visit, ccd)
        return (upload(frame) if upload is not None else frame), statics

    got, failure = run_and_record(load)
    if failure is not None:
        loaded.records[i] = {"visit": int(visit), "ccd": int(ccd), **failure}
        return
    loaded.frames.append(got[0])
    loaded.statics.append(got[1])
    loaded.where.append(i)


def run_device_half(loaded: LoadedBatch, *, config: Config) -> tuple[list | None, dict | None]:
    """The chain's device half on a loaded batch (:func:`process_visit` with ``package=False``):
    ``(results, None)``, or ``(None, failure)`` when the chain raised (a bug: the whole batch
    fails with it)."""
    if not loaded.frames:
        return [], None
    return run_and_record(lambda: process_visit(loaded.frames, loaded.statics, config=config, package=False))


def package_ccd_visits(loaded: LoadedBatch, device: tuple[list | None, dict | None], *, config: Config, scorer=None,
                       threads: int = 0) -> list[dict]:
    """The host half (score, package, write: :func:`package_results` in ``threads`` threads) and the
    outcome records of a batch, one per key in order (see :func:`run_ccd_visits`)."""
    results, failure = device
    if failure is None and results:
        results, failure = run_and_record(lambda: package_results(results, config=config, scorer=scorer,
                                                                  threads=threads))
    out = list(loaded.records)
    for i, frame, res in zip(loaded.where, loaded.frames, results or [None] * len(loaded.frames)):
        out[i] = (_result_record(res, frame.truth, loaded.t_load) if failure is None
                  else {"visit": frame.visit, "ccd": frame.ccd, **failure, "qa": dict(failure["qa"])})
    wall = time.perf_counter() - loaded.t0
    n = max(len(loaded.keys), 1)
    for rec in out:
        qa = rec.setdefault("qa", {})
        for k, v in loaded.xfer.items():  # the loader's uploads, shared out as process_visit does its own
            if v:
                qa[k] = qa.get(k, 0) + (v / n if "bytes" in k else v)
        rec.setdefault("n_alerts", 0)
        rec["wall_s"] = round(wall / max(len(loaded.keys), 1), 4)
    return out


def run_ccd_visits(source, keys, *, config: Config, cache: StaticsCache, scorer=None) -> list[dict]:
    """Run CCD-visits as one batch and return their outcome records (never raises for a CCD).

    :func:`load_ccd_visits`, :func:`run_device_half`, :func:`package_ccd_visits` in a row; a
    worker that overlaps batches (the Ray subtraction actor) calls them itself.

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
    loaded = load_ccd_visits(source, keys, cache=cache)
    return package_ccd_visits(loaded, run_device_half(loaded, config=config), config=config, scorer=scorer)


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
