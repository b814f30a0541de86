"""The Ray night engine: subtraction actors pinned to CCDs, an inference actor pool, one writer.

::

    driver (this module)                 subtraction actors (1 GPU each, or CPU cores)
    --------------------                 ---------------------------------------------
    visits arrive -> per-actor queues -> SubtractionWorker.process(visit, ccd)      ccd % n_actors
      (bounded: queue_depth per actor)     reference + master calibration resident per CCD
                                           run_ccd_visits -> process_visit (the chain)
                                             scorer = InferenceClient: cutout batches ->
                                               InferenceWorker.score (object store, bounded
                                               in flight with ray.wait: a slow classifier
                                               slows intake instead of growing memory)
                                           -> (meta, Avro bytes)
    meta arrives -> AlertWriter.write(meta, bytes ref)  -- alert file + ledger record, atomic
    ack arrives  -> progress bar, per-visit latency, summary

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

import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from ..config import ClassifyConfig, Config, from_dict, to_dict
from ..io.atomic import atomic_write
from ..errors import ConfigError, NightsiftError, TransientFailure
from ..io.avro import alert_path
from .ledger import record_path, write_record
from .sources import CCDSource, SimulatedNight
from .task import TRUTH_KEYS, NightSummary, StaticsCache, run_ccd_visits, summarize

log = logging.getLogger("nightsift.ray")

__all__ = [
    "RayNight", "NightReport", "VisitStats", "SubtractionWorker", "InferenceWorker", "InferenceClient",
    "AlertWriter", "TransientFailure", "default_scorer_factory", "run_ray_night", "ray_available",
    "night_schedule",
]


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
    """Body of a subtraction actor: runs the chain for the CCDs pinned to it.

    The static part of each CCD it serves (master calibration, reference exposure) is loaded on
    the first visit and kept resident (at most ``max_resident`` CCDs, least recently used
    evicted). The chain's alert file is written to a private staging folder, read back as bytes
    and returned, so that the writer persists it wherever it runs.

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
        CCD statics kept resident; 0 = all it is given.
    """

    def __init__(self, config: dict, source: CCDSource, *, slot: int = 0, inference: list | None = None,
                 inference_in_flight: int = 4, score_versions: dict | None = None, max_resident: int = 0):
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
        self.gpu, xp = self._setup_gpu()
        self.statics = StaticsCache(source, config=self._stage_config, xp=xp, max_resident=max_resident)

    def _setup_gpu(self):
        """When Ray gave this actor a GPU (it sees it as device 0): bound CuPy's memory pool and
        size its cuFFT plan cache for this CCD size (:mod:`nightsift.engine.backend`); the
        chain then runs there (its statics live there). Returns ``(device name or None, xp)``."""
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
        t = self.config.subtract.tile_size or max(self.config.simulate.ny, self.config.simulate.nx)
        side = t + 2 * self.config.subtract.tile_margin
        configure_memory_pool(xp, fraction=0.9)
        configure_fft_plan_cache(xp, n_plans=fft_plans_needed([(side, side)]) + 8)
        return f"cuda:{ids[0]}", xp

    def info(self) -> dict:
        """Health probe and state: pid, node, resident CCDs, resident bytes, GPU."""
        return {"slot": self.slot, "pid": os.getpid(), "node": socket.gethostname(), "gpu": self.gpu,
                "resident_ccds": self.statics.ccds(), "n_processed": self.n_processed,
                "resident_bytes": self.statics.nbytes}

    def process(self, visit: int, ccd: int) -> tuple[dict, bytes | None]:
        """Run one CCD-visit. Returns ``(meta, avro_bytes)``; ``avro_bytes`` is ``None`` unless
        ``meta["status"] == "done"``. Raises only :class:`TransientFailure` (retry me)."""
        meta = run_ccd_visits(self.source, [(visit, ccd)], config=self._stage_config, cache=self.statics,
                              scorer=self.scorer)[0]
        payload = None
        if meta["status"] == "done":
            with open(meta["alerts_path"], "rb") as fh:
                payload = fh.read()
            os.unlink(meta["alerts_path"])
        meta.pop("alerts_path", None)
        meta.update(slot=self.slot, pid=os.getpid())
        self.n_processed += 1
        return meta, payload

    def __del__(self):
        shutil.rmtree(getattr(self, "_staging", ""), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------
_LEDGER_EXTRA = ("n_truth", "n_found", "n_truth_snr7", "n_found_snr7", "attempts", "slot", "wall_s")


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
        extra = {k: meta[k] for k in _LEDGER_EXTRA if k in meta and (status == "done" or k not in TRUTH_KEYS)}
        write_record(self.output_dir, meta["visit"], meta["ccd"], status=status, error=error,
                     n_alerts=meta.get("n_alerts", 0) if status == "done" else 0,
                     alerts_path=str(path) if status == "done" else None, qa=meta.get("qa"), extra=extra)

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
                _unlink(path)
            target = record_path(self.output_dir, v, c)
            self._write_record(meta, status, error, path)
        except OSError as e:
            status, error = "failed", (f"alert writer could not write {e.filename or target}: OSError "
                                       f"[Errno {e.errno}] {e.strerror or e}")
            log.error("visit %d ccd %d: %s", v, c, error)
            try:
                _unlink(path)  # no alert file without a done record
                self._write_record(meta, status, error, path)
            except OSError as e2:
                error += f" (its failed record could not be written either: {e2})"
        self.n_written += 1
        return {"visit": v, "ccd": c, "status": status, "error": error, "pid": os.getpid()}


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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


@dataclass
class _Slot:
    actor: Any
    queue: deque = field(default_factory=deque)
    inflight: dict = field(default_factory=dict)  # meta ref -> (task, payload ref)
    state: str = "ok"  # ok | recovering
    probe: Any = None
    probe_after: float = 0.0
    recovering_since: float = 0.0
    # CCD-visits in flight when the actor died; while any is left they run one at a time, so that
    # a death is charged to the CCD-visit that caused it, not to those queued behind it
    suspects: set = field(default_factory=set)


class RayNight:
    """A night engine on Ray: create it (starts or joins Ray, creates the actors), :meth:`run` one
    or more nights, :meth:`close`. Also a context manager.

    Parameters
    ----------
    config : Config
        ``[run]`` sizes the actors (``workers``, ``subtraction_cpus``, ``inference_actors``,
        ``inference_cpus``, ``inference_resource``, ``queue_depth``, ``inference_in_flight``, ``max_restarts``,
        ``task_retries``, ``max_resident_ccds``, ``backend``) and says where Ray is (``address``,
        ``object_store_mb``); ``[classify]`` the scorer; ``[package] output_dir`` the output.
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
    """

    def __init__(self, config: Config, source: CCDSource | None = None, *, scorer_factory: Callable | None = None,
                 init_kwargs: dict | None = None, restart_timeout_s: float = 120.0,
                 writer_cls: type | None = None):
        import ray

        self.writer_cls = writer_cls or AlertWriter
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
        cls = ray.remote(SubtractionWorker).options(**self._actor_opts(**kw))
        return cls.remote(self._cfg_dict, self.source, slot=slot, inference=self.inference_names or None,
                          inference_in_flight=int(self.run_cfg.inference_in_flight),
                          score_versions=self.score_versions,
                          max_resident=int(self.run_cfg.max_resident_ccds))

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
        return [(t.visit, t.ccd, i) for i, s in enumerate(self.slots) for t, _ in s.inflight.values()]

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
        import ray
        import ray.exceptions as rx
        from tqdm import tqdm

        if schedule is None:
            s = self.config.simulate
            schedule = night_schedule(s.n_visits, range(s.n_ccds))
        schedule = sorted(schedule, key=lambda x: x[0])
        keys = [(int(v), int(c)) for _, v, ccds in schedule for c in ccds]
        if len(set(keys)) != len(keys):
            raise ValueError("RayNight.run: the schedule lists a (visit, ccd) more than once")
        n_tasks = len(keys)
        depth = max(1, int(self.run_cfg.queue_depth))
        max_writes = depth * self.n_subtraction + 2
        retries = int(self.run_cfg.task_retries)
        visits: dict[int, VisitStats] = {}
        results: dict[tuple[int, int], dict] = {}
        writes: dict = {}  # write ref -> (meta, payload ref)
        write_queue: deque = deque()
        writer_state = {"state": "ok", "probe": None, "after": 0.0, "since": 0.0}
        events: list = []
        upcoming = deque(schedule)
        n_retries0, n_restarts0, n_replaced0 = self.n_retries, self.n_restarts, self.n_replaced
        bar = tqdm(total=n_tasks, unit="ccd", desc="night", disable=not progress, dynamic_ncols=True)
        t0 = time.monotonic()
        n_alerts = 0

        def now():
            return time.monotonic() - t0

        def submit(slot: _Slot):
            limit = 1 if slot.suspects else depth  # after a crash its CCD-visits run one at a time
            while slot.state == "ok" and slot.queue and len(slot.inflight) < limit and len(writes) + len(write_queue) < max_writes:
                task = slot.queue.popleft()
                task.attempts += 1
                task.alone = limit == 1
                meta_ref, payload_ref = slot.actor.process.options(num_returns=2).remote(task.visit, task.ccd)
                slot.inflight[meta_ref] = (task, payload_ref)

        def fail_record(task: _Task, error: str) -> dict:
            return {"visit": task.visit, "ccd": task.ccd, "status": "failed", "error": error, "attempts": task.attempts}

        def start_recovery(slot: _Slot):
            if slot.state != "recovering":
                slot.state, slot.recovering_since = "recovering", now()
                self.n_restarts += 1
            slot.probe, slot.probe_after = None, now() + 0.2

        def submit_write(meta: dict, payload_ref):
            if writer_state["state"] != "ok":
                write_queue.append((meta, payload_ref))
                return
            writes[self.writer.write.remote(meta, payload_ref)] = (meta, payload_ref)

        while len(results) < n_tasks:
            # arrivals
            while upcoming and upcoming[0][0] <= now():
                _, v, ccds = upcoming.popleft()
                visits[v] = VisitStats(visit=v, n_ccds=len(ccds), t_arrival=now())
                for c in ccds:
                    self.slots[self.slot_of(c)].queue.append(_Task(v, c))
            # health probes of recovering actors
            for i, slot in enumerate(self.slots):
                if slot.state == "recovering" and slot.probe is None and now() >= slot.probe_after:
                    if now() - slot.recovering_since > self.restart_timeout_s:
                        self._replace(i, "no answer after a crash")
                    else:
                        slot.probe = slot.actor.info.remote()
            if writer_state["state"] == "recovering" and writer_state["probe"] is None and now() >= writer_state["after"]:
                if now() - writer_state["since"] > self.restart_timeout_s:
                    self._replace_writer("no answer after a crash")
                    writer_state.update(state="ok")
                else:
                    writer_state["probe"] = self.writer.info.remote()
            if writer_state["state"] == "ok":
                while write_queue:
                    submit_write(*write_queue.popleft())
            for slot in self.slots:
                submit(slot)
            # wait for anything
            waitables = [r for s in self.slots for r in s.inflight] + list(writes)
            waitables += [s.probe for s in self.slots if s.probe is not None]
            if writer_state["probe"] is not None:
                waitables.append(writer_state["probe"])
            timeout = 0.5
            if upcoming:
                timeout = min(timeout, max(0.0, upcoming[0][0] - now()))
            if not waitables:
                time.sleep(min(timeout, 0.05) if timeout else 0.01)
                continue
            ready, _ = ray.wait(waitables, num_returns=1, timeout=timeout)
            if ready:
                more, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0)
                ready = list(dict.fromkeys(ready + more))
            for ref in ready:
                # a probe
                probed = next((i for i, s in enumerate(self.slots) if s.probe is not None and s.probe == ref), None)
                if probed is not None:
                    slot = self.slots[probed]
                    slot.probe = None
                    try:
                        ray.get(ref)
                        slot.state = "ok"
                        log.warning("subtraction actor %d is back; %d CCD-visits resubmitted", probed, len(slot.queue))
                    except rx.ActorDiedError:
                        self._replace(probed, "actor died for good")
                    except _retryable():
                        slot.probe_after = now() + 0.5
                    continue
                if writer_state["probe"] is not None and ref == writer_state["probe"]:
                    writer_state["probe"] = None
                    try:
                        ray.get(ref)
                        writer_state["state"] = "ok"
                    except rx.ActorDiedError:
                        self._replace_writer("writer died for good")
                        writer_state["state"] = "ok"
                    except _retryable():
                        writer_state["after"] = now() + 0.5
                    continue
                # a write acknowledged
                if ref in writes:
                    meta, payload_ref = writes.pop(ref)
                    try:
                        ack = ray.get(ref)
                    except _retryable() as e:
                        log.warning("writer lost visit %d ccd %d (%s); writing again", meta["visit"], meta["ccd"],
                                    type(e).__name__)
                        self.n_retries += 1
                        if writer_state["state"] == "ok":
                            writer_state.update(state="recovering", since=now(), after=now() + 0.2, probe=None)
                            self.n_restarts += 1
                        write_queue.append((meta, payload_ref))
                        continue
                    key = (meta["visit"], meta["ccd"])
                    if key in results:
                        continue
                    if ack.get("status", meta["status"]) != meta["status"]:  # the writer could not write it
                        meta = {k: v for k, v in meta.items() if k not in TRUTH_KEYS}
                        meta.update(status=ack["status"], error=ack["error"], n_alerts=0)
                    results[key] = meta
                    vs = visits[meta["visit"]]
                    vs.n_written += 1
                    vs.n_alerts += meta.get("n_alerts", 0)
                    n_alerts += meta.get("n_alerts", 0)
                    if vs.n_written == vs.n_ccds:
                        vs.t_done = now()
                    ev = {"visit": meta["visit"], "ccd": meta["ccd"], "status": meta["status"],
                          "n_alerts": meta.get("n_alerts", 0), "t": now(), "attempts": meta.get("attempts", 1)}
                    events.append(ev)
                    el = now()
                    bar.set_postfix_str(f"visits {sum(x.t_done == x.t_done for x in visits.values())}/{len(schedule)} "
                                        f"alerts {n_alerts} ({n_alerts / el if el > 0 else 0:.0f}/s) "
                                        f"failed {sum(r['status'] != 'done' for r in results.values())}", refresh=False)
                    bar.update()
                    if on_written is not None:
                        on_written(self, ev)
                    continue
                # a CCD-visit returned
                i, slot = next((i, s) for i, s in enumerate(self.slots) if ref in s.inflight)
                task, payload_ref = slot.inflight.pop(ref)
                try:
                    meta = ray.get(ref)
                except (rx.RayTaskError, TransientFailure) as e:
                    cause = getattr(e, "cause", e)
                    if isinstance(cause, TransientFailure) and task.attempts <= retries:
                        self.n_retries += 1
                        log.warning("visit %d ccd %d: %s; retrying", task.visit, task.ccd, cause)
                        slot.queue.appendleft(task)
                        continue
                    meta, payload_ref = fail_record(task, f"{type(cause).__name__}: {cause}"), None
                except _retryable() as e:
                    # The actor died (or restarted) with this CCD-visit in flight. The death is
                    # charged to it for good only when it was running alone: CCD-visits queued
                    # behind the culprit are retried, one at a time, and never lost for its sake.
                    task.deaths += 1
                    slot.suspects.add((task.visit, task.ccd))
                    start_recovery(slot)
                    if task.deaths <= retries or not (task.alone or task.deaths > retries + depth):
                        self.n_retries += 1
                        log.warning("visit %d ccd %d: actor %d %s with it in flight; retrying (death %d, limit %d)",
                                    task.visit, task.ccd, i, type(e).__name__, task.deaths, retries + 1)
                        slot.queue.appendleft(task)
                        continue
                    last = "the last time running it alone" if task.alone else "never alone (retry limit)"
                    meta, payload_ref = fail_record(
                        task, f"worker died: subtraction actor {i} died {task.deaths} times with this CCD-visit in "
                              f"flight, {last} (a crash or an out-of-memory kill in the chain): "
                              f"{type(e).__name__}: {str(e).splitlines()[0]}"), None
                slot.suspects.discard((task.visit, task.ccd))
                meta["attempts"] = task.attempts
                submit_write(meta, payload_ref)
        bar.close()
        wall = now()
        per_ccd = [results[k] for k in sorted(results)]
        for r in per_ccd:
            if r["status"] != "done":
                log.warning("visit %d ccd %d %s: %s", r["visit"], r["ccd"], r["status"],
                            (r.get("error") or "").splitlines()[0])
        summary = summarize(per_ccd, wall_s=wall)
        return NightReport(summary=summary, visits=[visits[v] for v in sorted(visits)],
                           n_retries=self.n_retries - n_retries0, n_restarts=self.n_restarts - n_restarts0,
                           n_replaced=self.n_replaced - n_replaced0, n_subtraction_actors=self.n_subtraction,
                           n_inference_actors=len(self.inference), scoring=self.scoring, gpus=self.gpus,
                           events=events)

    def _replace(self, i: int, why: str):
        import ray

        log.warning("subtraction actor %d replaced (%s)", i, why)
        try:
            ray.kill(self.slots[i].actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        slot = self.slots[i]
        slot.actor = self._new_subtraction(i)
        slot.state, slot.probe = "ok", None
        self.n_replaced += 1

    def _replace_writer(self, why: str):
        import ray

        log.warning("alert writer replaced (%s)", why)
        try:
            ray.kill(self.writer, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        self.writer = self._new_writer()
        self.n_replaced += 1


def run_ray_night(config: Config, *, progress: bool = True, init_kwargs: dict | None = None) -> NightReport:
    """``nightsift run`` on Ray: the simulated night of ``config.simulate``, every visit at once."""
    with RayNight(config, init_kwargs=init_kwargs) as engine:
        return engine.run(progress=progress)
