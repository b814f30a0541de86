"""The Ray night engine: subtraction actors pinned to CCDs, an inference actor pool, one writer.

::

    driver (this module)                 subtraction actors (1 GPU each, or CPU cores)
    --------------------                 ---------------------------------------------
    visits arrive -> per-actor queues    SubtractionWorker.process_batch([(visit, ccd), ...])
      ccd % n_actors (pinned; a           a batch = CCD-visits of one visit (<= batch_ccds), up
      restarted actor reloads its          to queue_depth batches at once in threads:
      CCDs' statics)                       load: frames + statics (StaticsCache: on the device
    batches close on batch_ccds, on          within device_budget_gib, the rest in pinned host
      the visit being complete on that       memory uploaded on a copy stream)  -- overlaps --
      actor, or on batch_deadline_s        device: process_visit(package=False) under the
      (stragglers never hold a visit)        actor's device lock, one batch at a time
    <= queue_depth batches per actor       host: package_threads threads score (InferenceClient:
                                             cutout batches -> InferenceWorker.score, bounded in
                                             flight with ray.wait: a slow classifier slows
                                             intake instead of growing memory), compress the
                                             cutouts, build and stage the Avro
                                           -> (meta, Avro bytes) per CCD-visit
    meta arrives -> AlertWriter.write(meta, bytes ref)  -- alert file + ledger record, atomic
    ack arrives  -> progress bar, per-visit latency, summary

At start-up the engine refuses (ConfigError, with the numbers) what would hang or not fit: more
GPU subtraction actors than GPUs, a cupy backend without a GPU, CCD statics that fit neither the
devices' budget nor host memory (the memory plan, :mod:`~nightsift.engine.orchestration.plan`,
printed).

Fault tolerance is nightsift's, not :class:`ray.util.ActorPool`'s:

* every actor has ``max_restarts`` (``[run] max_restarts``); Ray's own task retries are off so
  that every retry is seen, counted and logged here;
* a CCD-visit whose actor died or restarted under it (``ActorUnavailableError``,
  ``ActorDiedError``, a lost object) goes back to the front of its actor's queue once the actor
  answers a health probe again; an actor that is dead for good (restarts exhausted, or no answer
  within ``restart_timeout_s``) is replaced by a new one in the same slot;
* a death is charged to the CCD-visit that caused it, not to those queued behind it: the
  CCD-visits in flight when an actor died run again one at a time, and one is recorded
  ``failed`` ("worker died: ...") only after its actor died ``[run] task_retries`` + 1 times with
  it in flight, the last time running alone;
* outputs are idempotent per (visit, CCD): the writer replaces the alert file
  (:func:`~nightsift.engine.io.avro.alert_path`) and the ledger record atomically, so a CCD-visit
  processed twice (an actor killed after its work was done, or the writer killed mid-write) never
  duplicates an alert; the writer's own I/O errors (a full disk) fail that CCD-visit, not the night;
* a CCD that fails for a reason of its own (bad input, too few PSF stars) is recorded
  ``failed``/``skipped`` with its error and the night goes on; it is not retried.

The same code runs on this machine (``nightsift run``: a local Ray with this machine's cores) and
on a cluster (``nightsift run --address auto`` after ``ray start``; see docker/). Alert bytes travel
to the writer through the object store, so workers need no shared file system.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from ..config import ClassifyConfig, Config, from_dict, to_dict
from ..io.atomic import atomic_write
from ..errors import ConfigError, NightsiftError, TransientFailure
from ..io.avro import alert_path
from .ledger import discard, record_path, write_outcome
from .sources import CCDSource, SimulatedNight, night_tasks, visit_schedule
from .plan import MemoryPlan, plan_memory
from .task import (TRUTH_KEYS, FrameUploader, NightSummary, StaticsCache, failed_record, load_ccd_visits,
                   package_ccd_visits, run_device_half, summarize)

log = logging.getLogger("nightsift.ray")

__all__ = [
    "RayNight", "NightReport", "VisitStats", "SubtractionWorker", "InferenceWorker", "InferenceClient",
    "AlertWriter", "TransientFailure", "default_scorer_factory", "run_ray_night", "ray_available",
    "night_schedule",
]


#: CCD-visits per batch on a GPU actor when ``run.batch_ccds = 0`` (numpy actors: 1)
GPU_BATCH_CCDS = 8


def ray_available() -> bool:
    """True if Ray can be imported here."""
    try:
        import ray  # noqa: F401
    except Exception:
        return False
    return True


def _retryable():
    """Ray errors after which a task may simply be run again (actor restart, lost worker/object)."""
    import ray.exceptions as rx

    return (rx.RayActorError, rx.WorkerCrashedError, rx.ObjectLostError, rx.NodeDiedError,
            rx.LocalRayletDiedError)


# ----------------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------------
def default_scorer_factory(classify: ClassifyConfig):
    """The real/bogus scorer for ``classify`` (:func:`nightsift.engine.classify.runtime.pipeline_scorer`).

    Returns ``None`` (no scores in the packets) when ``classify.backend == "none"``, and, for
    ``backend == "auto"`` only, when the classifier or its runtime is not installed. A backend
    named explicitly that cannot load raises, naming it.
    """
    if classify.backend == "none":
        return None
    try:
        from ..classify.runtime import pipeline_scorer
    except ImportError as e:
        if classify.backend == "auto":
            log.warning("real/bogus scorer unavailable (%s): alerts carry no rb score", e)
            return None
        raise ConfigError(f"classify.backend = {classify.backend!r} but the classifier cannot be imported ({e})") from e
    # "auto" with nothing to score with: None (logged there); a configured or shipped model that
    # cannot load is an error, never a night of rb = null
    return pipeline_scorer(classify)


class InferenceWorker:
    """Body of an inference actor: holds one loaded scorer and scores cutout batches.

    Parameters
    ----------
    classify : dict
        The ``[classify]`` section as a dict.
    scorer_factory : callable
        ``factory(ClassifyConfig) -> scorer or None`` (default :func:`default_scorer_factory`).
        A scorer maps ``triplets (n, 63, 63, 3) float32 -> dict[str, ndarray (n,)]``.
    """

    def __init__(self, classify: dict, scorer_factory: Callable | None = None):
        factory = scorer_factory or default_scorer_factory
        self.error = None
        try:
            self.scorer = factory(ClassifyConfig(**classify))
        except Exception as e:  # reported through ready(); the driver decides
            self.scorer, self.error = None, f"{type(e).__name__}: {e}"
        self.n_scored = 0

    def ready(self) -> dict:
        versions = getattr(self.scorer, "versions", None)
        return {"scorer": self.scorer is not None, "backend": getattr(self.scorer, "backend", None),
                "error": self.error, "pid": os.getpid(),
                "node": socket.gethostname(), "versions": dict(versions) if versions else None}

    def score(self, triplets: np.ndarray) -> dict:
        if self.scorer is None:
            raise TransientFailure(f"inference actor {os.getpid()} has no scorer ({self.error})")
        out = self.scorer(triplets)
        self.n_scored += len(triplets)
        return {k: np.asarray(v) for k, v in out.items()}


class InferenceClient:
    """The ``scorer`` handed to :func:`~nightsift.engine.pipeline.process_visit` inside a
    subtraction actor: splits the cutout triplets into batches, puts each in the object store and
    sends it to the inference actors round robin, with at most ``max_in_flight`` batches
    outstanding (``ray.wait``). Scores come back in the order of the triplets.

    A batch whose actor restarted or died is sent again (to the next actor) after a short
    back-off, up to ``retries`` times; then :class:`TransientFailure` is raised, which the driver
    treats as a retryable failure of the CCD-visit. ``versions`` (the model's, e.g.
    ``{"rb": "...", "drb": "..."}``) fill the packets' ``rbversion``/``drbversion``.
    """

    def __init__(self, actors: list, *, batch_size: int = 256, max_in_flight: int = 4, retries: int = 3,
                 backoff_s: float = 0.5, versions: dict | None = None):
        if not actors:
            raise ValueError("InferenceClient needs at least one inference actor")
        self.actors = list(actors)
        self.batch_size = int(batch_size)
        self.max_in_flight = max(1, int(max_in_flight))
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.versions = versions
        self._next = 0
        self.n_retried = 0

    def __call__(self, triplets: np.ndarray) -> dict:
        import ray

        n = len(triplets)
        batches = deque((i, 0) for i in range(0, n, self.batch_size))
        refs = {i: ray.put(np.ascontiguousarray(triplets[i:i + self.batch_size])) for i, _ in batches}
        results: dict[int, dict] = {}
        inflight: dict = {}
        while batches or inflight:
            while batches and len(inflight) < self.max_in_flight:
                i, attempt = batches.popleft()
                actor = self.actors[self._next % len(self.actors)]
                self._next += 1
                inflight[actor.score.remote(refs[i])] = (i, attempt)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for r in ready:
                i, attempt = inflight.pop(r)
                try:
                    results[i] = ray.get(r)
                except _retryable() + (TransientFailure,) as e:
                    if attempt >= self.retries:
                        raise TransientFailure(f"inference pool unavailable after {attempt + 1} tries: "
                                               f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
                    self.n_retried += 1
                    time.sleep(self.backoff_s * (attempt + 1))
                    batches.appendleft((i, attempt + 1))
        keys = results[0].keys() if results else ()
        return {k: np.concatenate([results[i][k] for i in sorted(results)]) for k in keys}


# ----------------------------------------------------------------------------------------------
# subtraction
# ----------------------------------------------------------------------------------------------
class SubtractionWorker:
    """Body of a subtraction actor: runs batches of CCD-visits of the CCDs pinned to it.

    A batch (CCD-visits of one visit, :meth:`process_batch`) goes through three phases:

    1. **load** -- its raw frames (the source; on a GPU uploaded here by :class:`FrameUploader`
       through pinned buffers on a copy stream) and its CCDs' statics (:class:`StaticsCache`:
       loaded and measured on first use; those kept on the host by the memory plan are uploaded
       on the copy stream too);
    2. **device** -- :func:`~nightsift.engine.pipeline.process_visit` (``package=False``) under the
       actor's device lock: one batch on the device at a time;
    3. **host** -- scoring (the inference pool, bounded in flight), cutout compression, Avro
       packaging and staging of the alert files in ``package_threads`` threads.

    The actor runs ``queue_depth`` calls concurrently (a threaded actor), so the next batch's
    load (and upload) and the previous batch's host half overlap this batch's device half: on
    cupy the raw frames and the host-kept statics are uploaded on a non-blocking copy stream from
    pinned memory (a pool of staging buffers: a double buffer with two batches in flight); on
    numpy there is no upload
    to overlap (the host is the device, and the next batch's frames are read under the device
    lock): what overlaps is the last batch's packaging, on the cores the chain leaves idle.

    The alert files are written to a private staging folder, read back as bytes and returned, so
    that the writer persists them wherever it runs.

    Parameters
    ----------
    config : dict
        The whole configuration as a dict (:func:`~nightsift.engine.config.to_dict`).
    source : CCDSource
        Where statics and frames come from (e.g. :class:`SimulatedNight`).
    slot : int
        This actor's slot number (for logs).
    inference : list of str, optional
        Names of the inference actors (looked up here with :func:`ray.get_actor`: handles
        passed as constructor arguments would pin objects a restart depends on); ``None`` = no
        scores.
    max_resident : int
        CCD statics kept; 0 = all it is given.
    device_slots : int, optional
        CCDs whose statics stay on the device (the memory plan); ``None`` = all.
    """

    def __init__(self, config: dict, source: CCDSource, *, slot: int = 0, inference: list | None = None,
                 inference_in_flight: int = 4, score_versions: dict | None = None, max_resident: int = 0,
                 device_slots: int | None = None):
        self.config = from_dict(config)
        self.source = source
        self.slot = slot
        self._staging = tempfile.mkdtemp(prefix=f"nightsift-stage{slot}-")
        self._stage_config = self.config.replace(package={"output_dir": self._staging})
        self.scorer = None
        if inference:
            import ray

            self.scorer = InferenceClient([ray.get_actor(n) for n in inference], batch_size=self.config.classify.batch_size,
                                          max_in_flight=inference_in_flight, versions=score_versions)
        self.n_processed = 0
        self.n_batches = 0
        self.device_s = 0.0
        self._device = threading.RLock()  # one batch on the device at a time (re-entered by the statics cache)
        self.gpu, xp = self._setup_gpu()
        stream = xp.cuda.Stream(non_blocking=True) if self.gpu is not None else None
        self.upload = FrameUploader(xp, stream) if self.gpu is not None else None  # raw frames ahead of the device
        self.statics = StaticsCache(source, config=self._stage_config, xp=xp, max_resident=max_resident,
                                    device_slots=device_slots, device_lock=self._device, copy_stream=stream)

    def _setup_gpu(self):
        """When Ray gave this actor a GPU (it sees it as device 0): bound CuPy's memory pool and
        size its cuFFT plan cache for this CCD size (:mod:`nightsift.engine.backend`); the
        chain then runs there (its statics live there). Returns ``(device name or None, xp)``.

        Raises ConfigError when ``run.device_budget_gib`` exceeds the GPU's memory."""
        ids = []
        try:
            import ray

            if ray.is_initialized():
                ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        except Exception:  # noqa: BLE001 -- not inside Ray
            ids = []
        if not ids or self.config.run.backend == "numpy":
            return None, np
        from ..backend import configure_fft_plan_cache, configure_memory_pool, fft_plans_needed, get_backend

        try:
            xp = get_backend(self.config.run.backend)
        except NightsiftError as e:
            log.warning("subtraction actor %d: GPU %s assigned but unusable (%s)", self.slot, ids, e)
            return None, np
        if xp is np:
            return None, np
        total = xp.cuda.Device().mem_info[1]
        if self.config.run.device_budget_gib * 2 ** 30 > 0.8 * total:
            raise ConfigError(f"run.device_budget_gib = {self.config.run.device_budget_gib:g} but GPU {ids[0]} has "
                              f"{total / 2 ** 30:.1f} GiB: the statics budget must leave >= 20 % for the batches")
        t = self.config.subtract.tile_size or max(self.config.simulate.ny, self.config.simulate.nx)
        side = t + 2 * self.config.subtract.tile_margin
        configure_memory_pool(xp, fraction=0.9)
        configure_fft_plan_cache(xp, n_plans=fft_plans_needed([(side, side)]) + 8)
        return f"cuda:{ids[0]}", xp

    def info(self) -> dict:
        """Health probe and state: pid, node, resident CCDs (those kept on the host too), bytes, GPU."""
        return {"slot": self.slot, "pid": os.getpid(), "node": socket.gethostname(), "gpu": self.gpu,
                "resident_ccds": self.statics.ccds(), "host_ccds": self.statics.host_ccds(),
                "n_processed": self.n_processed, "n_batches": self.n_batches, "device_s": round(self.device_s, 3),
                "resident_bytes": self.statics.nbytes, "device_bytes": self.statics.device_nbytes,
                "n_uploaded": self.statics.n_uploaded}

    def process_batch(self, keys: list) -> tuple:
        """Run CCD-visits of one visit as one batch. Returns ``(meta, avro_bytes)`` for each key in
        order, flattened (``num_returns = 2 * len(keys)``); ``avro_bytes`` is ``None`` unless
        ``meta["status"] == "done"``. Raises only :class:`TransientFailure` (retry me)."""
        keys = [(int(v), int(c)) for v, c in keys]
        # a GPU actor loads (and uploads) the next batch while the device runs this one; on numpy the
        # host is the device: nothing to upload, and reading the frames competes for the same cores
        with self._device if self.gpu is None else contextlib.nullcontext():
            loaded = load_ccd_visits(self.source, keys, cache=self.statics, upload=self.upload)
        with self._device:
            t0 = time.perf_counter()
            device = run_device_half(loaded, config=self._stage_config)
            t_device = time.perf_counter() - t0
            self.device_s += t_device
        metas = self._package(loaded, device)
        out = []
        for meta in metas:
            payload = None
            if meta["status"] == "done":
                with open(meta["alerts_path"], "rb") as fh:
                    payload = fh.read()
                os.unlink(meta["alerts_path"])
            meta.pop("alerts_path", None)
            meta.update(slot=self.slot, pid=os.getpid(), device_s=round(t_device / len(keys), 4))
            out += [meta, payload]
        self.n_processed += len(keys)
        self.n_batches += 1
        return tuple(out)

    def _package(self, loaded, device) -> list[dict]:
        """The batch's host half off the device lock (:func:`package_ccd_visits`)."""
        return package_ccd_visits(loaded, device, config=self._stage_config, scorer=self.scorer,
                                  threads=int(self.config.run.package_threads))

    def __del__(self):
        shutil.rmtree(getattr(self, "_staging", ""), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------
class AlertWriter:
    """Body of the writer actor: persists one CCD-visit's alert file and its ledger record.

    Both are replaced atomically, so writing the same CCD-visit twice leaves one file and one
    record. A CCD-visit that did not finish has its alert file from an earlier run removed, so
    the alerts on disk are always those of the ``done`` records.

    The writer's own I/O errors (a full disk, a folder gone read-only) are not the night's end:
    that CCD-visit is recorded ``failed`` with an error naming the file and the OS error (its
    alert file removed), the answer says so, and the next CCD-visit is written as usual.
    """

    def __init__(self, output_dir: str):
        self.output_dir = str(output_dir)
        self.n_written = 0

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": socket.gethostname(), "n_written": self.n_written}

    def _write_file(self, path, payload: bytes) -> None:
        """The one place alert bytes reach the disk (atomic: the old file or the new one)."""
        atomic_write(path, lambda fh: fh.write(payload))

    def _write_record(self, meta: dict, status: str, error: str | None, path) -> None:
        write_outcome(self.output_dir, dict(meta, status=status, error=error), alerts_path=str(path))

    def write(self, meta: dict, payload: bytes | None) -> dict:
        """Persist one CCD-visit. Returns ``{visit, ccd, status, error, pid}``: ``status`` is
        ``failed`` (``error`` naming the file) when this writer could not write it."""
        v, c = meta["visit"], meta["ccd"]
        path = alert_path(self.output_dir, v, c)
        status, error = meta["status"], meta.get("error")
        target = path
        try:
            if status == "done":
                self._write_file(path, payload)
            else:
                discard(path)
            target = record_path(self.output_dir, v, c)
            self._write_record(meta, status, error, path)
        except OSError as e:
            status, error = "failed", (f"alert writer could not write {e.filename or target}: OSError "
                                       f"[Errno {e.errno}] {e.strerror or e}")
            log.error("visit %d ccd %d: %s", v, c, error)
            try:
                discard(path)  # no alert file without a done record
                self._write_record(meta, status, error, path)
            except OSError as e2:
                error += f" (its failed record could not be written either: {e2})"
        self.n_written += 1
        return {"visit": v, "ccd": c, "status": status, "error": error, "pid": os.getpid()}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
@dataclass
class VisitStats:
    """One visit of the night. ``latency_s``: from its arrival (all its CCDs released) to its last
    CCD's alerts and record written."""

    visit: int
    n_ccds: int
    t_arrival: float
    n_written: int = 0
    n_alerts: int = 0
    t_done: float = math.nan

    @property
    def latency_s(self) -> float:
        return self.t_done - self.t_arrival


@dataclass
class NightReport:
    """What :meth:`RayNight.run` returns: the same :class:`NightSummary` as the local engine, the
    per-visit statistics and the engine's own counts (retries, restarts, replacements)."""

    summary: NightSummary
    visits: list
    n_retries: int = 0
    n_restarts: int = 0
    n_replaced: int = 0
    n_subtraction_actors: int = 0
    n_inference_actors: int = 0
    scoring: str = "none"
    gpus: int = 0
    events: list = field(default_factory=list)
    n_batches: int = 0  #: batches sent to the subtraction actors (retries included)
    plan: MemoryPlan | None = None  #: the statics memory plan of the engine

    @property
    def alerts_per_s(self) -> float:
        return self.summary.n_alerts / self.summary.wall_s if self.summary.wall_s > 0 else math.nan


def night_schedule(n_visits: int, ccds: Iterable[int], *, cadence_s: float | tuple[float, float] = 0.0,
                   seed: int = 0) -> list[tuple[float, int, list[int]]]:
    """Arrival times of a night's visits: ``[(t_offset_s, visit, [ccd, ...]), ...]``.

    ``cadence_s`` is the time between visits: a number, or ``(low, high)`` drawn uniformly per
    visit (seeded); 0 releases every visit at once (reprocessing a night already on disk).
    """
    ccds = [int(c) for c in ccds]
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for v in range(int(n_visits)):
        out.append((t, v, list(ccds)))
        step = rng.uniform(*cadence_s) if isinstance(cadence_s, tuple) else float(cadence_s)
        t += step
    return out


@dataclass
class _Task:
    visit: int
    ccd: int
    attempts: int = 0  # times submitted
    deaths: int = 0  # times its actor died while it was in flight
    alone: bool = False  # the only CCD-visit in flight on its actor (since its last submission)
    t_queued: float = 0.0  # when it (last) joined its actor's queue


@dataclass
class _Health:
    """Whether an actor answers: ``ok``, or ``recovering`` after it crashed under work -- then probed
    (``info()``) until it answers again, and replaced when it is dead for good or stays silent
    longer than ``restart_timeout_s``."""

    state: str = "ok"  # ok | recovering
    probe: Any = None  # the info() reference in flight
    probe_after: float = 0.0  # when the next probe may go
    recovering_since: float = 0.0

    def start_recovery(self, now: float) -> bool:
        """Mark the actor recovering, first probe in 0.2 s; True when it was ``ok`` (a new crash).
        An actor already recovering keeps its probe."""
        if self.state != "ok":
            return False
        self.state, self.recovering_since = "recovering", now
        self.probe, self.probe_after = None, now + 0.2
        return True


@dataclass
class _Slot:
    actor: Any
    queue: deque = field(default_factory=deque)
    inflight: dict = field(default_factory=dict)  # meta ref -> (task, payload ref, batch number)
    health: _Health = field(default_factory=_Health)
    # CCD-visits in flight when the actor died; while any is left they run one at a time, so that
    # a death is charged to the CCD-visit that caused it, not to those queued behind it
    suspects: set = field(default_factory=set)


class _Watched(NamedTuple):
    """An actor whose crashes are recovered from: a subtraction actor or the writer."""

    name: str
    health: _Health
    actor: Any
    replace: Callable[[str], None]  # replace(why): a new actor in its place
    queued: int  # work waiting for it


class _NightRun:
    """One night on a :class:`RayNight`: its queues, work and writes in flight, results and progress.

    :meth:`loop` turns until every CCD-visit of the schedule is written: visits arrive on their
    CCDs' actors' queues, recovering actors (the writer too) are probed, work and writes are
    submitted within their bounds, and each reference that is ready is a probe's answer
    (:meth:`answer_probe`), a write's acknowledgement (:meth:`acknowledged`) or a CCD-visit back
    from its actor (:meth:`returned`). The engine's counts (retries, restarts, replacements) are
    the engine's; :meth:`report` gives this night's share.
    """

    def __init__(self, engine: "RayNight", schedule, *, progress: bool, on_written):
        from tqdm import tqdm

        self.engine, self.on_written = engine, on_written
        self.schedule = sorted(schedule, key=lambda x: x[0])
        keys = [(int(v), int(c)) for _, v, ccds in self.schedule for c in ccds]
        if len(set(keys)) != len(keys):
            raise ValueError("RayNight.run: the schedule lists a (visit, ccd) more than once")
        self.n_tasks = len(keys)
        self.depth = max(1, int(engine.run_cfg.queue_depth))  # batches in flight per actor
        self.batch = int(engine.run_cfg.batch_ccds) or (GPU_BATCH_CCDS if engine.gpus else 1)
        self.deadline = float(engine.run_cfg.batch_deadline_s)
        # CCDs of each (visit, actor slot) not arrived yet: a batch of a visit whose CCDs have all
        # arrived on that actor closes at once
        self.unarrived: dict[tuple[int, int], int] = {}
        for _, v, ccds in self.schedule:
            for c in ccds:
                k = (int(v), engine.slot_of(c))
                self.unarrived[k] = self.unarrived.get(k, 0) + 1
        self.n_batches = 0
        # pending writes that hold back new work
        self.max_writes = self.depth * self.batch * engine.n_subtraction + 2
        self.retries = int(engine.run_cfg.task_retries)
        self.upcoming = deque(self.schedule)
        self.visits: dict[int, VisitStats] = {}
        self.results: dict[tuple[int, int], dict] = {}
        self.writes: dict = {}  # write ref -> (meta, payload ref)
        self.write_queue: deque = deque()  # writes waiting while the writer recovers
        self.writer_health = _Health()
        self.events: list = []
        self.n_alerts = 0
        self.counts0 = (engine.n_retries, engine.n_restarts, engine.n_replaced)
        self.bar = tqdm(total=self.n_tasks, unit="ccd", desc="night", disable=not progress, dynamic_ncols=True)
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def loop(self) -> None:
        """Run until every CCD-visit is written."""
        while len(self.results) < self.n_tasks:
            self.arrive()
            self.probe_recovering()
            if self.writer_health.state == "ok":
                while self.write_queue:
                    self.submit_write(*self.write_queue.popleft())
            for slot in self.engine.slots:
                self.submit(slot)
            for ref in self.wait():
                if self.answer_probe(ref):
                    continue
                if ref in self.writes:
                    self.acknowledged(ref)
                else:
                    self.returned(ref)

    # -- intake and submission ---------------------------------------------------------------
    def arrive(self) -> None:
        """Queue the CCD-visits of the visits whose time has come, each on its CCD's actor. A visit
        may arrive in parts (its late CCDs in a later schedule entry): its latency counts from its
        last CCD's arrival."""
        while self.upcoming and self.upcoming[0][0] <= self.now():
            _, v, ccds = self.upcoming.popleft()
            vs = self.visits.get(v)
            if vs is None:
                vs = self.visits[v] = VisitStats(visit=v, n_ccds=0, t_arrival=self.now())
            vs.n_ccds += len(ccds)
            vs.t_arrival = self.now()
            for c in ccds:
                slot = self.engine.slot_of(c)
                self.unarrived[(v, slot)] -= 1
                self.engine.slots[slot].queue.append(_Task(v, c, t_queued=self.now()))

    def next_batch(self, i: int, slot: _Slot) -> list[_Task]:
        """The next batch of ``slot`` (number ``i``), taken off its queue: the CCD-visits of the visit
        at the queue's head, up to ``batch_ccds``, once the batch is full, its visit has no CCD of
        this actor still to arrive, or its head has waited ``batch_deadline_s``; else none yet.
        One CCD-visit alone while the actor has suspects (a crash is pinned on its culprit)."""
        head = slot.queue[0]
        if slot.suspects:
            return [slot.queue.popleft()]
        same = [t for t in slot.queue if t.visit == head.visit][:self.batch]
        if (len(same) < self.batch and self.unarrived.get((head.visit, i), 0) > 0
                and self.now() - head.t_queued < self.deadline):
            return []
        for t in same:
            slot.queue.remove(t)
        return same

    def submit(self, slot: _Slot) -> None:
        """Send ``slot``'s queued CCD-visits to its actor as batches while it is ``ok``: at most
        ``queue_depth`` batches in flight (one CCD-visit at a time while it has suspects), and none
        while ``max_writes`` wait."""
        i = self.engine.slots.index(slot)
        limit = 1 if slot.suspects else self.depth  # after a crash its CCD-visits run one at a time
        while (slot.health.state == "ok" and slot.queue and len({b for _, _, b in slot.inflight.values()}) < limit
               and len(self.writes) + len(self.write_queue) < self.max_writes):
            tasks = self.next_batch(i, slot)
            if not tasks:
                return
            self.n_batches += 1
            for task in tasks:
                task.attempts += 1
                task.alone = limit == 1
            refs = slot.actor.process_batch.options(num_returns=2 * len(tasks)).remote(
                [(t.visit, t.ccd) for t in tasks])
            for k, task in enumerate(tasks):
                slot.inflight[refs[2 * k]] = (task, refs[2 * k + 1], self.n_batches)

    def submit_write(self, meta: dict, payload_ref) -> None:
        """Send one CCD-visit to the writer, or queue it while the writer recovers."""
        if self.writer_health.state != "ok":
            self.write_queue.append((meta, payload_ref))
            return
        self.writes[self.engine.writer.write.remote(meta, payload_ref)] = (meta, payload_ref)

    def wait(self) -> list:
        """The references ready now: work, writes and probes in flight, waited for up to 0.5 s or
        until the next visit arrives."""
        import ray

        waitables = [r for s in self.engine.slots for r in s.inflight] + list(self.writes)
        waitables += [w.health.probe for w in self.watched() if w.health.probe is not None]
        timeout = 0.5
        if self.upcoming:
            timeout = min(timeout, max(0.0, self.upcoming[0][0] - self.now()))
        if any(s.queue for s in self.engine.slots):  # a batch waiting for its visit's stragglers
            timeout = min(timeout, max(0.01, self.deadline / 2))
        if not waitables:
            time.sleep(min(timeout, 0.05) if timeout else 0.01)
            return []
        ready, _ = ray.wait(waitables, num_returns=1, timeout=timeout)
        if ready:
            more, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0)
            ready = list(dict.fromkeys(ready + more))
        return ready

    # -- health: the subtraction actors and the writer alike ---------------------------------
    def watched(self):
        """Every actor recovered from crashes (:class:`_Watched`): the subtraction actors, then the writer."""
        eng = self.engine
        for i, slot in enumerate(eng.slots):
            yield _Watched(f"subtraction actor {i}", slot.health, slot.actor, functools.partial(eng._replace, i),
                           len(slot.queue))
        yield _Watched("alert writer", self.writer_health, eng.writer, self._replace_writer, len(self.write_queue))

    def _replace_writer(self, why: str) -> None:
        self.engine._replace_writer(why)
        self.writer_health = _Health()

    def probe_recovering(self) -> None:
        """Probe each recovering actor once its back-off is over; replace one silent too long."""
        for w in self.watched():
            h = w.health
            if h.state == "recovering" and h.probe is None and self.now() >= h.probe_after:
                if self.now() - h.recovering_since > self.engine.restart_timeout_s:
                    w.replace("no answer after a crash")
                else:
                    h.probe = w.actor.info.remote()

    def answer_probe(self, ref) -> bool:
        """Handle ``ref`` if it is a probe's answer (True): the actor is back (its queued work goes
        again), dead for good (replaced), or not up yet (probed again in 0.5 s)."""
        import ray
        import ray.exceptions as rx

        for w in self.watched():
            if w.health.probe is None or w.health.probe != ref:
                continue
            w.health.probe = None
            try:
                ray.get(ref)
                w.health.state = "ok"
                log.warning("%s is back; %d queued for it resubmitted", w.name, w.queued)
            except rx.ActorDiedError:
                w.replace("died for good")
            except _retryable():
                w.health.probe_after = self.now() + 0.5
            return True
        return False

    # -- answers -----------------------------------------------------------------------------
    def acknowledged(self, ref) -> None:
        """The writer answered a write: the CCD-visit is recorded (``failed`` when the writer could
        not write it), or the write was lost with the writer, which recovers, and is queued again."""
        import ray

        meta, payload_ref = self.writes.pop(ref)
        try:
            ack = ray.get(ref)
        except _retryable() as e:
            log.warning("writer lost visit %d ccd %d (%s); writing again", meta["visit"], meta["ccd"], type(e).__name__)
            self.engine.n_retries += 1
            if self.writer_health.start_recovery(self.now()):
                self.engine.n_restarts += 1
            self.write_queue.append((meta, payload_ref))
            return
        key = (meta["visit"], meta["ccd"])
        if key in self.results:
            return
        if ack.get("status", meta["status"]) != meta["status"]:  # the writer could not write it
            meta = {k: v for k, v in meta.items() if k not in TRUTH_KEYS}
            meta.update(status=ack["status"], error=ack["error"], n_alerts=0)
        self.record(key, meta)

    def record(self, key: tuple[int, int], meta: dict) -> None:
        """A CCD-visit is written: counted in its visit and the night, shown, handed to ``on_written``."""
        self.results[key] = meta
        n = meta.get("n_alerts", 0)
        vs = self.visits[meta["visit"]]
        vs.n_written += 1
        vs.n_alerts += n
        self.n_alerts += n
        if vs.n_written == vs.n_ccds:
            vs.t_done = self.now()
        ev = {"visit": meta["visit"], "ccd": meta["ccd"], "status": meta["status"], "n_alerts": n, "t": self.now(),
              "attempts": meta.get("attempts", 1)}
        self.events.append(ev)
        el = self.now()
        n_failed = sum(r["status"] != "done" for r in self.results.values())
        self.bar.set_postfix_str(f"visits {sum(x.t_done == x.t_done for x in self.visits.values())}/"
                                 f"{len(self.schedule)} alerts {self.n_alerts} "
                                 f"({self.n_alerts / el if el > 0 else 0:.0f}/s) failed {n_failed}", refresh=False)
        self.bar.update()
        if self.on_written is not None:
            self.on_written(self.engine, ev)

    def returned(self, ref) -> None:
        """A CCD-visit came back from its actor: written, or run again (a transient failure, its
        actor's death), or failed for good."""
        import ray
        import ray.exceptions as rx

        i, slot = next((i, s) for i, s in enumerate(self.engine.slots) if ref in s.inflight)
        task, payload_ref, _ = slot.inflight.pop(ref)
        try:
            meta = ray.get(ref)
        except (rx.RayTaskError, TransientFailure) as e:
            cause = getattr(e, "cause", e)
            if isinstance(cause, TransientFailure) and task.attempts <= self.retries:
                self.engine.n_retries += 1
                log.warning("visit %d ccd %d: %s; retrying", task.visit, task.ccd, cause)
                slot.queue.appendleft(task)
                return
            meta, payload_ref = failed_record(task.visit, task.ccd, f"{type(cause).__name__}: {cause}",
                                              attempts=task.attempts), None
        except _retryable() as e:
            meta, payload_ref = self.actor_died(i, slot, task, e), None
            if meta is None:
                return
        slot.suspects.discard((task.visit, task.ccd))
        meta["attempts"] = task.attempts
        self.submit_write(meta, payload_ref)

    def actor_died(self, i: int, slot: _Slot, task: _Task, e: BaseException) -> dict | None:
        """The actor of ``slot`` died (or restarted) with ``task`` in flight: ``None`` when the task
        runs again, else its failed record.

        The death is charged to it for good only when it was running alone: CCD-visits queued
        behind the culprit are retried, one at a time, and never lost for its sake.
        """
        task.deaths += 1
        slot.suspects.add((task.visit, task.ccd))
        if slot.health.start_recovery(self.now()):
            self.engine.n_restarts += 1
        if task.deaths <= self.retries or not (task.alone or task.deaths > self.retries + self.depth):
            self.engine.n_retries += 1
            log.warning("visit %d ccd %d: actor %d %s with it in flight; retrying (death %d, limit %d)",
                        task.visit, task.ccd, i, type(e).__name__, task.deaths, self.retries + 1)
            slot.queue.appendleft(task)
            return None
        last = "the last time running it alone" if task.alone else "never alone (retry limit)"
        return failed_record(task.visit, task.ccd,
                             f"worker died: subtraction actor {i} died {task.deaths} times with this CCD-visit in "
                             f"flight, {last} (a crash or an out-of-memory kill in the chain): "
                             f"{type(e).__name__}: {str(e).splitlines()[0]}", attempts=task.attempts)

    def report(self) -> "NightReport":
        """This night's :class:`NightReport` (closes the progress bar)."""
        eng = self.engine
        self.bar.close()
        summary = summarize(list(self.results.values()), wall_s=self.now())
        n_retries0, n_restarts0, n_replaced0 = self.counts0
        return NightReport(summary=summary, visits=[self.visits[v] for v in sorted(self.visits)],
                           n_retries=eng.n_retries - n_retries0, n_restarts=eng.n_restarts - n_restarts0,
                           n_replaced=eng.n_replaced - n_replaced0, n_subtraction_actors=eng.n_subtraction,
                           n_inference_actors=len(eng.inference), scoring=eng.scoring, gpus=eng.gpus,
                           events=self.events, n_batches=self.n_batches, plan=eng.plan)


class RayNight:
    """A night engine on Ray: create it (starts or joins Ray, creates the actors), :meth:`run` one
    or more nights, :meth:`close`. Also a context manager.

    Parameters
    ----------
    config : Config
        ``[run]`` sizes the actors (``workers``, ``subtraction_cpus``, ``inference_actors``,
        ``inference_cpus``, ``inference_resource``, ``queue_depth``, ``inference_in_flight``, ``max_restarts``,
        ``task_retries``, ``max_resident_ccds``, ``backend``), batches them (``batch_ccds``,
        ``batch_deadline_s``, ``package_threads``), plans their statics (``device_budget_gib``)
        and says where Ray is (``address``, ``object_store_mb``); ``[classify]`` the scorer; ``[package] output_dir`` the output.
    source : CCDSource, optional
        Default: :class:`SimulatedNight` of ``config.simulate``.
    scorer_factory : callable, optional
        ``factory(ClassifyConfig) -> scorer or None`` run in each inference actor (default
        :func:`default_scorer_factory`).
    init_kwargs : dict, optional
        Extra :func:`ray.init` arguments when this engine starts Ray (``num_cpus``,
        ``include_dashboard``, ...). Ignored when Ray is already initialised.
    restart_timeout_s : float
        How long an actor may take to come back after a crash before it is replaced.
    writer_cls : type
        Body of the writer actor (default :class:`AlertWriter`; tests inject I/O faults with a
        subclass).
    subtraction_cls : type
        Body of the subtraction actors (default :class:`SubtractionWorker`; tests hold one inside
        its packaging with a subclass).

    Raises
    ------
    ConfigError
        A GPU backend with more subtraction actors (``run.workers``) than the cluster has GPUs, or
        ``run.backend = "cupy"`` on a cluster without one (refused with the numbers instead of
        waiting forever for a GPU); CCD statics that fit neither the devices' budget nor the
        cluster's host memory (the memory plan, :func:`~nightsift.engine.orchestration.plan.plan_memory`).
    """

    def __init__(self, config: Config, source: CCDSource | None = None, *, scorer_factory: Callable | None = None,
                 init_kwargs: dict | None = None, restart_timeout_s: float = 120.0,
                 writer_cls: type | None = None, subtraction_cls: type | None = None):
        import ray

        self.writer_cls = writer_cls or AlertWriter
        self.subtraction_cls = subtraction_cls or SubtractionWorker
        self.config = config
        if scorer_factory is None and config.classify.backend != "none":
            try:
                from ..classify.runtime import check_model
            except ImportError:
                check_model = None  # no classifier installed: "auto" runs without scores (logged)
            if check_model is not None:
                check_model(config.classify)  # a damaged model stops the night before any actor starts
        self.run_cfg = config.run
        self.source = source if source is not None else SimulatedNight(config.simulate, config.calibrate)
        self.restart_timeout_s = float(restart_timeout_s)
        self._started_ray = False
        if not ray.is_initialized():
            kw = dict(init_kwargs or {})
            address = self.run_cfg.address or None
            if address is None and self.run_cfg.object_store_mb and "object_store_memory" not in kw:
                kw["object_store_memory"] = int(self.run_cfg.object_store_mb) * 1024 ** 2
            if address is not None:
                for k in ("num_cpus", "num_gpus", "object_store_memory", "include_dashboard"):
                    kw.pop(k, None)  # a cluster has its own resources
            kw.setdefault("configure_logging", False)
            ray.init(address=address, **kw)
            self._started_ray = True
        res = ray.cluster_resources()
        self.cluster_cpus = float(res.get("CPU", 0.0))
        self.gpus = int(res.get("GPU", 0)) if self.run_cfg.backend != "numpy" else 0
        self._cfg_dict = to_dict(config)
        self.n_restarts = 0
        self.n_replaced = 0
        self.n_retries = 0
        self._token = os.urandom(4).hex()
        self.slots, self.writer, self.inference = [], None, []
        try:
            self._check_placement()
            self.plan = self._plan_memory(float(res.get("memory", 0.0)))
            print(self.plan.describe(), file=sys.stderr, flush=True)
            log.info("%s", self.plan.describe())
            self._make_inference(scorer_factory)
            self.n_subtraction = self._n_subtraction()
            self.slots = [_Slot(actor=self._new_subtraction(i)) for i in range(self.n_subtraction)]
            self.writer = self._new_writer()
            # wait until every actor is up (constructors ran), so that timings do not include startup
            ray.get([s.actor.info.remote() for s in self.slots] + [self.writer.info.remote()])
        except BaseException:
            self.close()
            raise

    # -- actors ------------------------------------------------------------------------------
    def _actor_opts(self, **kw) -> dict:
        return dict(max_restarts=int(self.run_cfg.max_restarts), max_task_retries=0, **kw)

    def _make_inference(self, scorer_factory):
        import ray

        self.inference: list = []
        self.inference_names: list = []
        self.scoring = "none"
        self.score_versions = None
        if self.config.classify.backend == "none":
            return
        cls = ray.remote(InferenceWorker)
        opts = self._actor_opts(num_cpus=float(self.run_cfg.inference_cpus))
        if self.run_cfg.inference_resource:
            opts["resources"] = {self.run_cfg.inference_resource: 1}
        names = [f"nightsift-inference-{self._token}-{i}" for i in range(int(self.run_cfg.inference_actors))]
        actors = [cls.options(name=n, **opts).remote(to_dict(self.config)["classify"], scorer_factory) for n in names]
        infos = ray.get([a.ready.remote() for a in actors])
        errors = [i["error"] for i in infos if i["error"]]
        if errors and self.config.classify.backend != "auto":
            for a in actors:
                ray.kill(a)
            raise ConfigError(f"classify.backend = {self.config.classify.backend!r}: the scorer did not load in "
                              f"the inference actors: {errors[0]}")
        if not all(i["scorer"] for i in infos):
            log.warning("no real/bogus scorer (%s): alerts carry no score", errors[0] if errors else "unavailable")
            for a in actors:
                ray.kill(a)
            return
        self.inference = actors
        self.inference_names = names
        self.scoring = infos[0]["backend"] or self.config.classify.backend
        self.score_versions = infos[0]["versions"]

    def _check_placement(self) -> None:
        """One GPU actor per GPU: refuse (ConfigError, with the numbers) what would wait forever."""
        backend, workers = self.run_cfg.backend, int(self.run_cfg.workers)
        if backend == "cupy" and not self.gpus:
            raise ConfigError("run.backend = 'cupy' but the Ray cluster has no GPU (ray.cluster_resources() lists "
                              "none): start the GPU nodes, or set run.backend = 'auto' or 'numpy'")
        if self.gpus and workers > self.gpus:
            raise ConfigError(f"run.workers = {workers} GPU subtraction actors but the Ray cluster has {self.gpus} "
                              f"GPU(s): one subtraction actor per GPU; set run.workers <= {self.gpus} (0 = one per "
                              f"GPU) or add GPU nodes")

    def _plan_memory(self, host_memory_bytes: float) -> MemoryPlan:
        """The statics plan (printed at start-up) from the CCDs of the night and the actors."""
        ccds = sorted({c for _, c in self._night_keys()}) or [0]
        shape = getattr(self.source, "ccd_shape", None) or (self.config.simulate.ny, self.config.simulate.nx)
        n = self._n_subtraction_planned()
        per_actor = max(sum(1 for c in ccds if c % n == k) for k in range(n))
        return plan_memory(n_ccds=len(ccds), shape=tuple(shape), n_actors=n, device=bool(self.gpus),
                           device_budget_gib=float(self.run_cfg.device_budget_gib),
                           host_memory_bytes=host_memory_bytes, ccds_per_actor=per_actor)

    def _night_keys(self) -> list[tuple[int, int]]:
        """The ``(visit, ccd)`` of the source's night (:func:`~nightsift.engine.orchestration.sources.night_tasks`)."""
        return night_tasks(self.source, self.config)

    def _n_subtraction_planned(self) -> int:
        """Subtraction actors the night will have (before the inference pool exists: its CPUs are
        taken from the count as :meth:`_n_subtraction` will)."""
        if self.run_cfg.workers or self.gpus:
            return int(self.run_cfg.workers) or self.gpus
        free = self.cluster_cpus
        if not self.run_cfg.inference_resource and self.config.classify.backend != "none":
            free -= int(self.run_cfg.inference_actors) * float(self.run_cfg.inference_cpus)
        return max(1, int(free // (float(self.run_cfg.subtraction_cpus) or 1.0)))

    def _n_subtraction(self) -> int:
        if self.run_cfg.workers:
            return int(self.run_cfg.workers)
        if self.gpus:
            return self.gpus
        free = self.cluster_cpus
        if not self.run_cfg.inference_resource:  # the pool shares the subtraction nodes' cores
            free -= len(self.inference) * float(self.run_cfg.inference_cpus)
        per = float(self.run_cfg.subtraction_cpus) or 1.0
        return max(1, int(free // per))

    def _new_subtraction(self, slot: int):
        import ray

        kw = {"num_cpus": float(self.run_cfg.subtraction_cpus)}
        if self.gpus:
            kw["num_gpus"] = 1
        # queue_depth batches run at once: the next one loads (uploads) while this one computes
        kw["max_concurrency"] = max(1, int(self.run_cfg.queue_depth))
        cls = ray.remote(self.subtraction_cls).options(**self._actor_opts(**kw))
        return cls.remote(self._cfg_dict, self.source, slot=slot, inference=self.inference_names or None,
                          inference_in_flight=int(self.run_cfg.inference_in_flight),
                          score_versions=self.score_versions,
                          max_resident=int(self.run_cfg.max_resident_ccds),
                          device_slots=self.plan.device_ccds_per_actor)

    def _new_writer(self):
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # the output folder is the driver's: keep the writer on the driver's node
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        cls = ray.remote(self.writer_cls).options(**self._actor_opts(num_cpus=0, scheduling_strategy=here))
        return cls.remote(os.path.abspath(self.config.package.output_dir))

    def slot_of(self, ccd: int) -> int:
        """The subtraction actor slot a CCD is pinned to."""
        return int(ccd) % self.n_subtraction

    def actor_of(self, ccd: int):
        """The subtraction actor handle serving ``ccd`` now."""
        return self.slots[self.slot_of(ccd)].actor

    def in_flight(self) -> list[tuple[int, int, int]]:
        """``(visit, ccd, slot)`` of the CCD-visits submitted to actors and not yet returned."""
        return [(t.visit, t.ccd, i) for i, s in enumerate(self.slots) for t, _, _ in s.inflight.values()]

    def actor_info(self) -> list[dict]:
        """``info()`` of every subtraction actor (waits for their current task)."""
        import ray

        return ray.get([s.actor.info.remote() for s in self.slots])

    def close(self):
        """Kill the actors; shut Ray down if this engine started it."""
        import ray

        if not ray.is_initialized():
            return
        for a in [s.actor for s in self.slots] + [self.writer] + list(self.inference):
            if a is None:
                continue
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        if self._started_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the night ---------------------------------------------------------------------------
    def run(self, schedule: list[tuple[float, int, list[int]]] | None = None, *, progress: bool = True,
            on_written: Callable[["RayNight", dict], None] | None = None) -> NightReport:
        """Process a night.

        Parameters
        ----------
        schedule : list of (t_offset_s, visit, [ccd, ...]), optional
            When each visit's CCDs arrive, in seconds from the start (see :func:`night_schedule`).
            Default: every visit and CCD of ``config.simulate`` at once.
        progress : bool
            Show a progress bar (visits, CCD-visits, alerts/s).
        on_written : callable, optional
            ``on_written(engine, record)`` after each CCD-visit is written (tests use it to kill
            actors mid-night).

        Returns
        -------
        NightReport
        """
        if schedule is None:
            schedule = visit_schedule(night_tasks(self.source, self.config))
        night = _NightRun(self, schedule, progress=progress, on_written=on_written)
        night.loop()
        return night.report()

    def _replace(self, i: int, why: str):
        """A new subtraction actor in slot ``i`` (its queue and work in flight stay)."""
        slot = self.slots[i]
        slot.actor = self._renew(slot.actor, functools.partial(self._new_subtraction, i), f"subtraction actor {i}",
                                 why)
        slot.health = _Health()

    def _replace_writer(self, why: str):
        """A new writer actor."""
        self.writer = self._renew(self.writer, self._new_writer, "alert writer", why)

    def _renew(self, actor, make: Callable[[], Any], name: str, why: str):
        """Kill ``actor`` for good and return ``make()``, its replacement."""
        import ray

        log.warning("%s replaced (%s)", name, why)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 -- already gone
            pass
        new = make()
        self.n_replaced += 1
        return new


def run_ray_night(config: Config, *, progress: bool = True, init_kwargs: dict | None = None, source=None,
                  tasks=None) -> NightReport:
    """``nightsift run`` on Ray: the simulated night of ``config.simulate`` (or ``source``'s CCD-visits,
    or ``tasks`` of them: a resumed night's remainder), every visit at once."""
    with RayNight(config, source, init_kwargs=init_kwargs) as engine:
        return engine.run(visit_schedule(tasks) if tasks is not None else None, progress=progress)
