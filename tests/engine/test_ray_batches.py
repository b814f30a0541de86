"""The Ray engine's batches, memory plan and placement, without a GPU (issue #16).

* the driver's batching (:meth:`_NightRun.next_batch`) on a stand-in engine: a batch closes on
  ``batch_ccds``, on its visit being complete on that actor, or on ``batch_deadline_s`` -- never
  holding a visit back for a straggler CCD;
* the memory plan (:func:`plan_memory`): the numbers of a 189-CCD 4k visit on one GPU, the
  refusal when the statics fit nowhere, and the per-CCD estimate against a real CCD's statics;
* statics beyond the device budget: kept on the host and uploaded with each batch, on the strict
  device stand-in (every crossing explicit), giving the same alerts as statics kept resident;
* placement: more GPU actors than GPUs, or cupy without a GPU, refused at start with the numbers.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nightsift.engine.config import load_config
from nightsift.engine.errors import ConfigError
from nightsift.engine.io.avro import read_alerts
from nightsift.engine.orchestration.plan import GIB, plan_memory, statics_bytes_per_ccd
from nightsift.engine.orchestration.sources import SimulatedNight
from nightsift.engine.orchestration.task import StaticsCache, run_ccd_visits

from ..strict_device import strict_namespace


# -- batching --------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 0.0


def _night(schedule, *, batch=3, deadline=1.0, n_slots=1, gpus=0):
    """A :class:`_NightRun` over a stand-in engine whose clock the test moves."""
    from nightsift.engine.orchestration.ray_engine import _NightRun, _Slot

    run = SimpleNamespace(queue_depth=2, batch_ccds=batch, batch_deadline_s=deadline, task_retries=2)
    slots = [_Slot(actor=None) for _ in range(n_slots)]
    engine = SimpleNamespace(run_cfg=run, n_subtraction=n_slots, slots=slots, slot_of=lambda c: int(c) % n_slots,
                             n_retries=0, n_restarts=0, n_replaced=0, gpus=gpus)
    night = _NightRun(engine, schedule, progress=False, on_written=None)
    clock = _Clock()
    night.now = lambda: clock.t
    return night, slots, clock


def _ccds(tasks):
    return [(t.visit, t.ccd) for t in tasks]


def test_a_batch_closes_on_size_on_a_complete_visit_or_on_its_deadline():
    # visit 0: CCDs 0-3 at t=0, its straggler CCD 4 at t=10; visit 1: CCDs 0-1 at t=0
    night, (slot,), clock = _night([(0.0, 0, [0, 1, 2, 3]), (0.0, 1, [0, 1]), (10.0, 0, [4])], batch=3)
    night.arrive()
    assert _ccds(night.next_batch(0, slot)) == [(0, 0), (0, 1), (0, 2)]  # full: closes on size
    assert night.next_batch(0, slot) == []  # CCD 3 waits for visit 0's CCD 4 ...
    clock.t = 0.5
    assert night.next_batch(0, slot) == []
    clock.t = 1.0  # ... until the deadline: the visit is not held back for its straggler
    assert _ccds(night.next_batch(0, slot)) == [(0, 3)]
    assert _ccds(night.next_batch(0, slot)) == [(1, 0), (1, 1)]  # visit 1 complete: closes at once
    assert not slot.queue
    clock.t = 10.0
    night.arrive()
    assert _ccds(night.next_batch(0, slot)) == [(0, 4)]  # nothing else of visit 0 to come
    vs = night.visits[0]
    assert (vs.n_ccds, vs.t_arrival) == (5, 10.0)  # latency counts from its last CCD's arrival


def test_batches_follow_the_ccd_pinning_and_suspects_run_alone():
    night, slots, clock = _night([(0.0, 0, [0, 1, 2, 3, 4])], batch=8, n_slots=2)
    night.arrive()
    assert _ccds(night.next_batch(0, slots[0])) == [(0, 0), (0, 2), (0, 4)]  # ccd % 2 == 0, visit complete
    assert _ccds(night.next_batch(1, slots[1])) == [(0, 1), (0, 3)]
    night2, (slot,), _ = _night([(0.0, 0, [0, 1, 2])], batch=8)
    night2.arrive()
    slot.suspects.add((0, 1))  # after a crash, one CCD-visit at a time
    assert [len(night2.next_batch(0, slot)) for _ in range(3)] == [1, 1, 1]


def test_batch_size_zero_is_eight_on_a_gpu_actor_and_one_on_numpy():
    schedule = [(0.0, 0, list(range(10)))]
    for gpus, want in ((1, [8, 2]), (0, [1] * 10)):
        night, (slot,), _ = _night(schedule, batch=0, gpus=gpus)
        night.arrive()
        assert [len(night.next_batch(0, slot)) for _ in range(len(want))] == want and not slot.queue


# -- the memory plan -------------------------------------------------------------------------------
def test_memory_plan_of_a_189_ccd_4k_visit_on_one_gpu():
    per = statics_bytes_per_ccd(4096, 4096)
    assert per == 4096 * 4096 * 24  # float32 x 5 planes + uint16 x 2: ~400 MB, not float64
    plan = plan_memory(n_ccds=189, shape=(4096, 4096), n_actors=1, device=True, device_budget_gib=40,
                       host_memory_bytes=512 * GIB)
    on = int(40 * GIB // per)
    assert (plan.ccds_per_actor, plan.device_ccds_per_actor) == (189, on) and on == 106
    assert plan.host_bytes == (189 - on) * per
    text = plan.describe()
    assert "189 CCDs x 384 MB" in text and "106 per GPU on the device" in text and "83 per GPU in pinned host" in text
    # 4 GPUs: every CCD's statics on a device, nothing on the host
    plan4 = plan_memory(n_ccds=189, shape=(4096, 4096), n_actors=4, device=True, device_budget_gib=40,
                        host_memory_bytes=512 * GIB)
    assert (plan4.ccds_per_actor, plan4.device_ccds_per_actor, plan4.host_bytes) == (48, 48, 0)
    # numpy: the host is the device
    cpu = plan_memory(n_ccds=189, shape=(4096, 4096), n_actors=2, device=False, device_budget_gib=40,
                      host_memory_bytes=512 * GIB)
    assert cpu.device_ccds_per_actor is None and cpu.host_bytes == 189 * per


def test_memory_plan_refuses_statics_that_fit_nowhere():
    with pytest.raises(ConfigError, match=r"83 of each GPU actor's 189 CCDs beyond run.device_budget_gib = 40 need "
                                          r"31\.1 GiB of host memory .* allows 9\.6 GiB"):
        plan_memory(n_ccds=189, shape=(4096, 4096), n_actors=1, device=True, device_budget_gib=40,
                    host_memory_bytes=16 * GIB)
    with pytest.raises(ConfigError, match=r"all 189 CCDs \(numpy backend\) need 70\.9 GiB"):
        plan_memory(n_ccds=189, shape=(4096, 4096), n_actors=2, device=False, device_budget_gib=40,
                    host_memory_bytes=64 * GIB)


def _sim_config(out, n_ccds=2):
    return load_config(None, simulate={"ny": 256, "nx": 256, "n_visits": 1, "n_ccds": n_ccds, "n_transients": 10},
                       psf={"min_snr": 10.0, "min_stars": 2}, package={"output_dir": str(out)},
                       classify={"backend": "none"})


def test_the_plan_estimate_is_a_real_ccds_statics(tmp_path):
    cfg = _sim_config(tmp_path)
    cache = StaticsCache(SimulatedNight(cfg.simulate, cfg.calibrate), config=cfg)
    statics, _ = cache.get(0, 0)
    est = statics_bytes_per_ccd(256, 256)
    assert est <= statics.nbytes <= 1.05 * est  # the PSF stamps are the only thing left out
    assert statics.reference.image.dtype == np.float32 and statics.reference.mask.dtype == np.uint16
    assert statics.master.flat.dtype == np.float32 and statics.master.bad_pixel_mask.dtype == np.uint16


# -- statics beyond the budget: on the host, uploaded with each batch ----------------------------
def _alerts(path):
    return [dict(a, cutoutScience=None, cutoutTemplate=None, cutoutDifference=None) for a in read_alerts(path)]


def test_host_kept_statics_are_uploaded_with_the_batch_and_change_nothing(tmp_path):
    sx = strict_namespace()
    keys = [(0, 0), (0, 1)]
    runs = {}
    for slots in (None, 1):  # every CCD resident; CCD 1 beyond the budget
        out = tmp_path / f"slots{slots}"
        cfg = _sim_config(out)
        cache = StaticsCache(SimulatedNight(cfg.simulate, cfg.calibrate), config=cfg, xp=sx, device_slots=slots)
        recs = run_ccd_visits(cache.source, keys, config=cfg, cache=cache)
        h2d0 = sx.stats.h2d_bytes
        again = run_ccd_visits(cache.source, keys, config=cfg, cache=cache)  # statics loaded: the second visit
        runs[slots] = (cache, recs, again, sx.stats.h2d_bytes - h2d0, out)
    resident, host = runs[None], runs[1]
    assert resident[0].host_ccds() == [] and host[0].host_ccds() == [1]
    kept, _ = host[0]._items[1]
    assert isinstance(kept.reference.image, np.ndarray) and isinstance(kept.master.flat, np.ndarray)  # host planes
    assert not isinstance(host[0]._items[0][0].reference.image, np.ndarray)  # CCD 0 stays on the device
    assert host[0].device_nbytes < host[0].nbytes
    # the second batch uploaded CCD 1's planes again (and only them) on top of what the resident run moved
    assert host[0].n_uploaded == 2 and resident[0].n_uploaded == 0
    planes = statics_bytes_per_ccd(256, 256)
    assert host[3] - resident[3] == planes
    for a, b in zip(resident[1] + resident[2], host[1] + host[2]):
        assert (a["status"], a["n_alerts"]) == (b["status"], b["n_alerts"]) == ("done", a["n_alerts"])
    for k in keys:
        name = f"visit{k[0]:08d}_ccd{k[1]:03d}.avro"
        assert _alerts(resident[4] / name) == _alerts(host[4] / name) and len(_alerts(host[4] / name)) > 0


# -- placement -------------------------------------------------------------------------------------
def _placement(backend, workers, gpus):
    from nightsift.engine.orchestration.ray_engine import RayNight

    stub = SimpleNamespace(run_cfg=SimpleNamespace(backend=backend, workers=workers), gpus=gpus)
    RayNight._check_placement(stub)


def test_more_gpu_actors_than_gpus_is_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"run.workers = 3 GPU subtraction actors but the Ray cluster has 2 GPU"):
        _placement("auto", 3, 2)
    with pytest.raises(ConfigError, match=r"run.backend = 'cupy' but the Ray cluster has no GPU"):
        _placement("cupy", 0, 0)
    _placement("auto", 2, 2)  # one per GPU
    _placement("auto", 0, 2)  # 0 = one per GPU
    _placement("auto", 4, 0)  # no GPU: CPU actors, as many as asked


def test_engine_refuses_at_start_statics_that_do_not_fit(ray_cluster, tmp_path):
    """The plan is made before any actor starts: a night whose statics fit nowhere stops at once."""
    from nightsift.engine.orchestration.ray_engine import RayNight

    cfg = load_config(None, simulate={"ny": 4096, "nx": 4096, "n_visits": 1, "n_ccds": 20000},
                      package={"output_dir": str(tmp_path)}, classify={"backend": "none"}, run={"workers": 1})
    with pytest.raises(ConfigError, match=r"all 20000 CCDs \(numpy backend\) need 7500\.0 GiB of host memory"):
        RayNight(cfg)
    assert ray_cluster.is_initialized() and not list(tmp_path.iterdir())


# -- raw frames uploaded ahead of their batch (a GPU actor's loading thread) ---------------------
def test_frames_uploaded_ahead_change_nothing_and_a_nan_frame_still_fails(tmp_path):
    from nightsift.engine.orchestration.task import FrameUploader, load_ccd_visits, package_ccd_visits, run_device_half

    from .conftest import nan_frame_source

    sx = strict_namespace()
    keys = [(0, 0), (0, 1)]
    out = {}
    for ahead in (False, True):
        cfg = _sim_config(tmp_path / f"ahead{ahead}")
        source = nan_frame_source(cfg.simulate, cfg.calibrate, bad=(0, 1))
        cache = StaticsCache(source, config=cfg, xp=sx)
        upload = FrameUploader(sx) if ahead else None
        loaded = load_ccd_visits(source, keys, cache=cache, upload=upload)
        if ahead:  # on the device before the chain runs: the strict stand-in refuses any implicit copy back
            assert all(not isinstance(f.raw.data, np.ndarray) for f in loaded.frames)
            assert loaded.xfer["xfer_h2d_bytes"] >= 2 * 256 * 256 * 4  # both raw frames, counted
        out[ahead] = package_ccd_visits(loaded, run_device_half(loaded, config=cfg), config=cfg)
    for a, b in zip(out[False], out[True]):
        assert (a["status"], a["n_alerts"], a.get("error")) == (b["status"], b["n_alerts"], b.get("error"))
    good, bad = out[True]
    assert good["status"] == "done" and good["n_alerts"] > 0
    assert bad["status"] == "failed" and "no finite pixel" in bad["error"]
    name = "visit00000000_ccd000.avro"
    assert _alerts(tmp_path / "aheadFalse" / name) == _alerts(tmp_path / "aheadTrue" / name)
