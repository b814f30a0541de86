"""Survey-scale night on the Ray engine: an LSST-like cadence replayed at reduced pixel size.

    python bench/night.py                                  # 189 CCDs/visit every 30-40 s, 3 visits, 512 px
    python bench/night.py --visits 4 --ccds 24 --alerts-per-visit 1270 --out bench/night-24ccd.json
    python bench/night.py --visits 10 --ccds 189 --size 4096 --backend auto   # on a GPU node
    python bench/night.py --visits 2 --ccds 4 --size 1024 --cadence 0 0 --transients 40 --scorer none
        # CPU capacity (every visit at once) and its ratio to the one-CCD chain in the same run

What it does:

* **cadence**: visit ``v`` arrives ``cadence`` seconds after visit ``v-1`` (uniform in
  ``--cadence LOW HIGH``, seeded); all ``--ccds`` CCDs of a visit arrive together and are queued
  on the subtraction actors they are pinned to (``ccd % n_actors``), as
  :class:`nightsift.engine.orchestration.ray_engine.RayNight` does for ``nightsift run``;
* **alert density**: ``--alerts-per-visit`` (LSST: about 10,000) sets the injected transients per
  CCD: ``--probe`` CCDs run with 0 and with 40 transients measure the bogus candidates per CCD at
  this pixel size and the candidates per transient, and the simulator injects
  ``n_transients = (target / ccds - bogus) / per_transient``;
* **data**: each subtraction actor simulates its CCD-visit's raw frame (standing in for reading
  it), keeps each CCD's reference and master calibration resident from the first visit on, and
  runs the whole chain; alerts go through the writer to ``--out-dir`` (deleted at the end unless
  ``--keep``).

Reported (table on stdout + JSON):

* sustained alerts/s (alerts written / time from the first arrival to the last write);
* capacity alerts/s: alerts / actor busy time (what the actors could do with no idle wait),
  and whether it keeps up with the cadence;
* visit latency p50 / p99 / max: from a visit's arrival to its last CCD's alerts written;
* CPU utilisation of the night's processes (driver + Ray + actors) and of the whole machine;
  GPU utilisation and memory from ``nvidia-smi`` when there is one;
* memory over time: PSS (proportional set size: shared pages split, so the sum over processes
  is honest) of the driver and every process under it, sampled every ``--sample`` s, split into
  heaps (``Pss_Anon``) and shared memory (``Pss_Shmem``: Ray's object store, whose pages are
  touched progressively up to ``--object-store-mb`` and then reused), with the slope after the
  first visit (when every CCD's reference has become resident);
* projected alerts per night: ``min(capacity, arrival rate) x --night-hours``.

* **batches** (issue #16): each subtraction actor runs the CCDs of a visit it owns as batches of
  ``--batch`` (``run.batch_ccds``); capacity in CCD-visits/s from the actors' device time, the
  throughput (CCD-visits / time to the last write; with ``--cadence 0 0`` every visit arrives at
  once, so this is the measured capacity), and the ratio to the one-CCD chain timed in this
  process before Ray starts (``single_ccd_rate``; per core: ``engine / (actors x single)``);
* the statics memory plan printed by the engine; GPU rows ``unmeasured (no GPU)`` without one.

Linux only (reads /proc). Timings include the simulator (it stands in for I/O).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------
# /proc sampling
# ----------------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _pss_bytes(pid: int) -> dict[str, int]:
    """``Pss`` and its ``Pss_Anon`` (heaps) / ``Pss_Shmem`` (Ray's object store lives in /dev/shm)
    parts, bytes."""
    out = {"Pss": 0, "Pss_Anon": 0, "Pss_Shmem": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def _machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return float(sum(v) - idle), float(sum(v))


def _gpu_sample() -> dict | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        rows = [[float(x) for x in line.split(",")] for line in out.strip().splitlines() if line.strip()]
        return {"util_pct": [r[0] for r in rows], "mem_mib": [r[1] for r in rows]}
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class Sampler(threading.Thread):
    """Every ``period`` s: PSS/RSS of this process tree, its CPU time, machine CPU, GPU."""

    def __init__(self, period: float):
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self.t0 = time.monotonic()
        self._cpu_dead = 0.0
        self._last_cpu: dict[int, float] = {}

    def sample(self) -> dict:
        pids = process_tree(os.getpid())
        cpu_now = {p: _cpu_seconds(p) for p in pids}
        # processes that ended since the last sample keep their last CPU time
        self._cpu_dead += sum(v for p, v in self._last_cpu.items() if p not in cpu_now)
        self._last_cpu = cpu_now
        busy, total = _machine_busy()
        rss = [_rss_bytes(p) for p in pids]
        pss = [_pss_bytes(p) for p in pids]
        mb = {k: sum(x[k] for x in pss) / 2**20 for k in ("Pss", "Pss_Anon", "Pss_Shmem")}
        return {"t": time.monotonic() - self.t0, "n_proc": len(pids), "pss_mb": mb["Pss"],
                "anon_mb": mb["Pss_Anon"], "shmem_mb": mb["Pss_Shmem"],
                "max_rss_mb": max(rss) / 2**20 if rss else 0.0, "cpu_s": self._cpu_dead + sum(cpu_now.values()),
                "machine_busy": busy, "machine_total": total, "gpu": _gpu_sample()}

    def run(self):
        self.t0 = time.monotonic()
        while not self._halt.is_set():
            self.samples.append(self.sample())
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join()
        self.samples.append(self.sample())


# ----------------------------------------------------------------------------------------------
def _config(args, out_dir: Path, n_transients: int, n_ccds: int):
    from nightsift.engine.config import load_config

    return load_config(
        args.config,
        simulate={"instrument": args.instrument, "ny": args.size, "nx": args.size, "n_ccds": n_ccds,
                  "n_transients": n_transients, "seed": args.seed},
        psf={"min_snr": args.psf_min_snr, "min_stars": args.psf_min_stars},
        package={"output_dir": str(out_dir)},
        classify={"backend": args.scorer},
        run={"backend": args.backend, "workers": args.workers, "queue_depth": args.queue_depth,
             "inference_cpus": args.inference_cpus, "batch_ccds": args.batch, "batch_deadline_s": args.batch_deadline,
             "device_budget_gib": args.device_budget_gib, "package_threads": args.package_threads},
    )


def single_ccd_rate(args, cfg, n_timed: int = 2) -> dict:
    """The one-CCD chain in this process, before Ray starts (the CPU baseline of issue #16): CCD 0's
    statics prepared once (timed apart: what ``process_ccd`` adds per call), then its frame
    simulated and run through ``process_visit`` with B = 1 (packaged, written) ``n_timed`` times
    after one warm-up. Returns seconds per CCD-visit and the rates."""
    from nightsift.engine.backend import get_backend
    from nightsift.engine.orchestration.sources import SimulatedNight
    from nightsift.engine.pipeline import VisitFrame, prepare_statics, process_visit

    xp = get_backend(cfg.run.backend)
    src = SimulatedNight(cfg.simulate, cfg.calibrate)
    static = src.load_static(0, 0)
    t0 = time.perf_counter()
    st = prepare_statics(static.reference, static.master, config=cfg, xp=xp, ccd=0)
    t_statics = time.perf_counter() - t0
    times, cpu = [], []
    for v in range(n_timed + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        fr = src.load_frame(v, 0, static)
        process_visit([VisitFrame(v, 0, raw=fr.raw, truth=fr.truth)], [st], config=cfg)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t = float(np.mean(times[1:]))
    return {"s_per_ccd_visit": t, "ccd_visits_per_s": 1.0 / t, "prepare_statics_s": t_statics,
            "process_ccd_s": t + t_statics, "process_ccd_per_s": 1.0 / (t + t_statics), "timed": n_timed,
            "cpu_s_per_ccd_visit": float(np.mean(cpu[1:]))}


def probe_density(args, n_ccds: int, n_probe_transients: int = 40) -> tuple[float, float, float]:
    """Candidates per CCD as ``bogus + per_transient * n_transients``, from ``--probe`` CCDs run with
    0 and with ``n_probe_transients`` transients (in this process, before Ray starts; a transient
    may give more than one candidate: a variable star's dipole, a nuclear residual).

    Returns ``(bogus, per_transient, seconds per CCD)``.
    """
    from nightsift.engine.orchestration.sources import SimulatedNight
    from nightsift.engine.pipeline import process_ccd

    counts: dict[int, list[int]] = {0: [], n_probe_transients: []}
    times = []
    for n_tr in counts:
        cfg = _config(args, Path(tempfile.mkdtemp(prefix="nightsift-probe-")), n_tr, n_ccds)
        src = SimulatedNight(cfg.simulate, cfg.calibrate)
        for ccd in np.linspace(0, n_ccds - 1, args.probe).astype(int):
            t0 = time.perf_counter()
            try:
                st = src.load_static(0, int(ccd))
                res = process_ccd(src.load_frame(0, int(ccd), st).raw, st.master, st.reference, config=cfg,
                                  visit=0, ccd=int(ccd), write=False)
                counts[n_tr].append(len(res.candidates))
            except Exception as e:  # noqa: BLE001 -- a failed probe CCD is reported, not fatal
                print(f"  probe ccd {ccd}: {type(e).__name__}: {str(e)[:100]}")
            times.append(time.perf_counter() - t0)
        shutil.rmtree(cfg.package.output_dir, ignore_errors=True)
    bogus = float(np.mean(counts[0])) if counts[0] else 0.0
    full = float(np.mean(counts[n_probe_transients])) if counts[n_probe_transients] else bogus + n_probe_transients
    return bogus, max(0.1, (full - bogus) / n_probe_transients), float(np.mean(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--visits", type=int, default=3)
    ap.add_argument("--ccds", type=int, default=189, help="CCDs per visit (LSST: 189)")
    ap.add_argument("--size", type=int, default=512, help="CCD side in pixels (LSST: 4096)")
    ap.add_argument("--cadence", type=float, nargs=2, default=(30.0, 40.0), metavar=("LOW", "HIGH"),
                    help="seconds between visits, drawn uniformly (LSST: 30-40 s)")
    ap.add_argument("--alerts-per-visit", type=int, default=10000, help="target alerts per visit (LSST: ~10,000)")
    ap.add_argument("--transients", type=int, default=None, help="transients per CCD (default: from the target)")
    ap.add_argument("--probe", type=int, default=3, help="CCDs probed (twice) for the alert density")
    ap.add_argument("--instrument", default="decam")
    ap.add_argument("--psf-min-snr", type=float, default=10.0, help="small CCDs have few bright stars")
    ap.add_argument("--psf-min-stars", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--scorer", default="auto", help="classify.backend (auto: the shipped model when present)")
    ap.add_argument("--backend", default="numpy", help="run.backend: numpy, cupy or auto")
    ap.add_argument("--workers", type=int, default=0, help="subtraction actors (0: one per GPU / free core)")
    ap.add_argument("--inference-cpus", type=float, default=1.0)
    ap.add_argument("--queue-depth", type=int, default=2, help="batches in flight per subtraction actor")
    ap.add_argument("--batch", type=int, default=0,
                    help="run.batch_ccds: CCD-visits of a visit per batch (0: 8 on GPU actors, 1 on numpy ones)")
    ap.add_argument("--batch-deadline", type=float, default=0.2, help="run.batch_deadline_s")
    ap.add_argument("--device-budget-gib", type=float, default=40.0, help="run.device_budget_gib (GPU actors)")
    ap.add_argument("--package-threads", type=int, default=2, help="run.package_threads per subtraction actor")
    ap.add_argument("--no-single", action="store_true", help="skip the single-CCD baseline")
    ap.add_argument("--single-timed", type=int, default=2, help="timed runs of the single-CCD baseline")
    ap.add_argument("--warm", action="store_true",
                    help="run one untimed visit first, so that the timed night starts with every CCD's statics "
                         "loaded (as a night does after its first visit)")
    ap.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray on this machine)")
    ap.add_argument("--object-store-mb", type=int, default=512)
    ap.add_argument("--night-hours", type=float, default=10.0, help="for the alerts/night projection")
    ap.add_argument("--sample", type=float, default=1.0, help="memory/CPU sampling period, s")
    ap.add_argument("--config", help="TOML config applied under the flags")
    ap.add_argument("--out", default="bench/night.json")
    ap.add_argument("--out-dir", default=None, help="alert folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the alerts")
    args = ap.parse_args(argv)

    import ray

    from nightsift.engine.orchestration.ray_engine import GPU_BATCH_CCDS, RayNight, night_schedule

    per_ccd_target = args.alerts_per_visit / args.ccds
    if args.transients is None:
        bogus, per_tr, t_probe = probe_density(args, args.ccds)
        n_tr = max(0, int(round((per_ccd_target - bogus) / per_tr)))
        print(f"probe: {bogus:.1f} bogus candidates per {args.size}x{args.size} CCD + {per_tr:.2f} per transient, "
              f"{t_probe:.2f} s/CCD in one process; injecting {n_tr} transients per CCD for ~{per_ccd_target:.0f} "
              f"alerts/CCD")
    else:
        bogus, per_tr, t_probe, n_tr = float("nan"), float("nan"), float("nan"), args.transients
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="nightsift-night-"))
    cfg = _config(args, out_dir, n_tr, args.ccds)
    init = {}
    if args.address is None:
        init = dict(num_cpus=os.cpu_count(), include_dashboard=False,
                    object_store_memory=args.object_store_mb * 2**20, log_to_driver=False)
    else:
        cfg = cfg.replace(run={"address": args.address})
    schedule = night_schedule(args.visits, range(args.ccds), cadence_s=tuple(args.cadence), seed=args.seed)
    single = None
    if not args.no_single:
        single = single_ccd_rate(args, cfg.replace(package={"output_dir": tempfile.mkdtemp(prefix="nightsift-one-")}),
                                 n_timed=args.single_timed)
        print(f"single CCD in one process: {single['s_per_ccd_visit']:.2f} s per CCD-visit (statics resident), "
              f"+{single['prepare_statics_s']:.2f} s for process_ccd's statics")
    load0 = os.getloadavg()
    sampler = Sampler(args.sample)
    t_start = time.monotonic()
    with RayNight(cfg, init_kwargs=init) as engine:
        if args.warm:  # every CCD's statics loaded and measured (its first visit) before the timed night
            t0 = time.monotonic()
            engine.run([(0.0, args.visits, list(range(args.ccds)))], progress=False)
            print(f"warm-up visit (statics of {args.ccds} CCDs loaded): {time.monotonic() - t0:.1f} s")
        t_ready = time.monotonic() - t_start
        sampler.start()
        report = engine.run(schedule, progress=sys.stderr.isatty())
        sampler.stop()
        infos_end = engine.actor_info()
    s = report.summary
    wall = s.wall_s
    batch = args.batch or (GPU_BATCH_CCDS if report.gpus else 1)  # run.batch_ccds = 0: the engine's choice
    busy = [r.get("wall_s", 0.0) for r in s.per_ccd]
    device = [r.get("device_s", 0.0) for r in s.per_ccd]
    n_act = report.n_subtraction_actors
    # capacity: what the actors' devices could do with no idle wait (their device-locked time: with
    # batches overlapping, a CCD-visit's wall time includes waiting for the device)
    capacity_ccd = len(device) / (sum(device) / n_act) if sum(device) > 0 else float("nan")
    t_last = max((e["t"] for e in report.events), default=wall)
    throughput_ccd = s.n_tasks / t_last if t_last > 0 else float("nan")
    alerts_per_ccd = s.n_alerts / max(1, s.n_done)
    capacity = capacity_ccd * alerts_per_ccd
    cad = float(np.mean(args.cadence))
    arrival = args.ccds * alerts_per_ccd / cad if cad > 0 else float("inf")  # --cadence 0 0: all at once
    lat = np.array([v.latency_s for v in report.visits])
    smp = sampler.samples
    cpu_util = (smp[-1]["cpu_s"] - smp[0]["cpu_s"]) / ((smp[-1]["t"] - smp[0]["t"]) * os.cpu_count())
    # CPU seconds per CCD-visit (driver + Ray + actors): comparable with the one-CCD chain's on a
    # machine shared with other work, where wall-clock rates are not
    cpu_per_ccd = (smp[-1]["cpu_s"] - smp[0]["cpu_s"]) / max(1, s.n_tasks)
    mach = (smp[-1]["machine_busy"] - smp[0]["machine_busy"]) / (smp[-1]["machine_total"] - smp[0]["machine_total"])
    pss = np.array([x["pss_mb"] for x in smp])
    anon = np.array([x["anon_mb"] for x in smp])
    shmem = np.array([x["shmem_mb"] for x in smp])
    t_s = np.array([x["t"] for x in smp])
    half = len(pss) // 2
    first_done = report.visits[0].t_done if report.visits else 0.0
    after = t_s >= first_done  # references of every CCD resident from here on
    def _slope(y):
        return float(np.polyfit(t_s[after], y[after], 1)[0] * 60) if after.sum() >= 3 else float("nan")

    slope, slope_anon = _slope(pss), _slope(anon)
    gpu_util = [np.mean(x["gpu"]["util_pct"]) for x in smp if x["gpu"]]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "gpus": report.gpus},
        "setup": {"visits": args.visits, "ccds_per_visit": args.ccds, "ccd_size": args.size, "instrument": args.instrument,
                  "cadence_s": list(args.cadence), "alerts_per_visit_target": args.alerts_per_visit,
                  "bogus_per_ccd_probe": bogus, "candidates_per_transient_probe": per_tr, "probe_s_per_ccd": t_probe, "transients_per_ccd": n_tr,
                  "subtraction_actors": n_act, "warm_up_visit": bool(args.warm), "inference_actors": report.n_inference_actors,
                  "scoring": report.scoring, "engine_start_s": t_ready},
        "ccd_visits": {"total": s.n_tasks, "done": s.n_done, "failed": s.n_failed, "skipped": s.n_skipped},
        "alerts": s.n_alerts, "alerts_per_visit": s.n_alerts / args.visits, "wall_s": wall,
        "sustained_alerts_per_s": s.n_alerts / wall,
        "capacity_alerts_per_s": capacity, "capacity_ccds_per_s": capacity_ccd,
        "throughput_ccd_visits_per_s": throughput_ccd,
        "single_ccd": single,
        "ratio_to_single_ccd": (throughput_ccd / single["ccd_visits_per_s"]) if single else None,
        "ratio_to_one_process_per_core": (throughput_ccd / (single["ccd_visits_per_s"] * n_act)) if single else None,
        "cpu_s_per_ccd_visit": cpu_per_ccd,
        "cpu_ratio_single_over_engine": (single["cpu_s_per_ccd_visit"] / cpu_per_ccd) if single else None,
        "batches": report.n_batches, "batch_ccds": batch,
        "plan": report.plan.describe() if report.plan else None,
        "load_average_start": list(load0), "load_average_end": list(os.getloadavg()),
        "gpu": ({"visit_latency_s": "unmeasured (no GPU)", "gpu_utilisation": "unmeasured (no GPU)",
                 "device_memory": "unmeasured (no GPU)"} if not report.gpus else None),
        "arrival_alerts_per_s": arrival, "keeps_up": bool(capacity >= arrival),
        "actor_s_per_ccd_mean": float(np.mean(busy)),
        "visit_latency_s": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                            "max": float(lat.max()), "per_visit": [round(float(x), 2) for x in lat]},
        "cpu_utilisation_night": cpu_util, "cpu_utilisation_machine": mach,
        "gpu_utilisation_pct_mean": float(np.mean(gpu_util)) if gpu_util else None,
        "memory": {"pss_mb_first_half_mean": float(pss[:max(1, half)].mean()),
                   "pss_mb_second_half_mean": float(pss[half:].mean()), "pss_mb_max": float(pss.max()),
                   "max_process_rss_mb": float(max(x["max_rss_mb"] for x in smp)),
                   "after_first_visit": {"from_s": first_done, "pss_mb_min": float(pss[after].min()) if after.any() else None,
                                         "pss_mb_max": float(pss[after].max()) if after.any() else None,
                                         "slope_mb_per_min": slope,
                                         "anon_mb_min": float(anon[after].min()) if after.any() else None,
                                         "anon_mb_max": float(anon[after].max()) if after.any() else None,
                                         "anon_slope_mb_per_min": slope_anon,
                                         "shmem_mb_max": float(shmem.max())},
                   "samples": [{"t": round(float(t), 1), "pss_mb": round(float(p), 1), "anon_mb": round(float(a), 1),
                                "shmem_mb": round(float(m), 1)} for t, p, a, m in zip(t_s, pss, anon, shmem)]},
        "resident_mb_per_actor": [round(i["resident_bytes"] / 2**20, 1) for i in infos_end],
        "device_resident_mb_per_actor": [round(i["device_bytes"] / 2**20, 1) for i in infos_end] if report.gpus else None,
        "actor_device_s": [i["device_s"] for i in infos_end],
        "projected_alerts_per_night": min(capacity, arrival) * args.night_hours * 3600,
        "night_hours": args.night_hours,
        "retries": report.n_retries, "actors_replaced": report.n_replaced,
    }
    rows = [
        ("CCD-visits done / failed", f"{s.n_done} / {s.n_failed} of {s.n_tasks} ({args.visits} visits x {args.ccds} CCDs, {args.size} px)"),
        ("actors", f"{n_act} subtraction, {report.n_inference_actors} inference (scoring: {report.scoring}), {report.gpus} GPUs"),
        ("alerts (per visit)", f"{s.n_alerts} ({result['alerts_per_visit']:.0f}; target {args.alerts_per_visit})"),
        ("sustained alerts/s", f"{result['sustained_alerts_per_s']:.1f}  over {wall:.1f} s"),
        ("capacity alerts/s", f"{capacity:.1f}  ({capacity_ccd:.2f} CCD-visits/s from the device half's time alone, "
                              f"{result['actor_s_per_ccd_mean']:.2f} actor wall-s per CCD)"),
        ("throughput CCD-visits/s", f"{throughput_ccd:.3f}  ({s.n_tasks} in {t_last:.1f} s, {report.n_batches} batches "
                                    f"of <= {batch})"),
        ("single CCD (one process)", "skipped" if not single else
         f"{single['ccd_visits_per_s']:.3f} CCD-visits/s ({single['s_per_ccd_visit']:.2f} s, statics resident; "
         f"process_ccd {single['process_ccd_s']:.2f} s) -> engine / single = {result['ratio_to_single_ccd']:.2f}, "
         f"engine / ({n_act} x single) = {result['ratio_to_one_process_per_core']:.2f}"),
        ("CPU-s per CCD-visit", f"engine {cpu_per_ccd:.2f} (driver + Ray + actors)" + (
            "" if not single else f", one-CCD chain {single['cpu_s_per_ccd_visit']:.2f} -> single / engine = "
                                  f"{result['cpu_ratio_single_over_engine']:.2f} (> 1: the engine does a CCD-visit "
                                  f"in fewer CPU-s)")),
        ("statics plan", result["plan"] or "n/a"),
        ("load average start / end", f"{load0[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"),
        ("arrival alerts/s", f"{arrival:.1f}  (cadence {args.cadence[0]:.0f}-{args.cadence[1]:.0f} s) -> "
                             f"{'keeps up' if result['keeps_up'] else 'falls behind'}"),
        ("visit latency p50 / p99 / max", f"{result['visit_latency_s']['p50']:.1f} / {result['visit_latency_s']['p99']:.1f} / "
                                          f"{result['visit_latency_s']['max']:.1f} s  (per visit {result['visit_latency_s']['per_visit']})"),
        ("CPU utilisation", f"night processes {cpu_util:.0%} of {os.cpu_count()} cores; machine {mach:.0%}"),
        ("GPU utilisation", "unmeasured (no GPU)" if not gpu_util else f"{np.mean(gpu_util):.0f}% mean"),
        ("GPU visit latency / device memory", "unmeasured (no GPU)" if not report.gpus else
         f"see visit latency above; device statics {result['device_resident_mb_per_actor']} MB per actor"),
        ("memory PSS 1st / 2nd half / max", f"{result['memory']['pss_mb_first_half_mean']:.0f} / "
                                            f"{result['memory']['pss_mb_second_half_mean']:.0f} / {pss.max():.0f} MB"),
        ("memory after 1st visit", f"PSS {result['memory']['after_first_visit']['pss_mb_min'] or 0:.0f}-"
                                   f"{result['memory']['after_first_visit']['pss_mb_max'] or 0:.0f} MB ({slope:+.1f} MB/min); "
                                   f"heaps (Pss_Anon) {result['memory']['after_first_visit']['anon_mb_min'] or 0:.0f}-"
                                   f"{result['memory']['after_first_visit']['anon_mb_max'] or 0:.0f} MB ({slope_anon:+.1f} MB/min); "
                                   f"object store pages (Pss_Shmem) max {shmem.max():.0f} MB"),
        ("projected alerts / night", f"{result['projected_alerts_per_night']:.3g} ({args.night_hours:g} h at "
                                     f"min(capacity, arrival), {args.size} px CCDs)"),
    ]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {args.out}")
    if not args.keep and args.out_dir is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if s.n_done else 1


if __name__ == "__main__":
    sys.exit(main())
