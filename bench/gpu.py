"""The production chain (``nightsift.engine.pipeline.process_visit``) on numpy and cupy, batched:
ms per CCD-visit per stage, pairs/s, bytes moved, peak memory, against two references on the same
batch and device (one ``rfft2``; plain single-tile ZOGY with the true PSFs).

One command on a GPU machine (cupy, and NVIDIA's numba-cuda for the Numba CUDA kernels)::

    python bench/gpu.py                           # 4096^2; cupy at B = 1 4 8 16, numpy at B = 1
    python bench/gpu.py --batches 1 8             # what bench/gpu_check.sh runs (~5 min)
    nsys profile -t cuda,nvtx -o gpu python bench/gpu.py --batches 8 --repeat 2 --backends cupy

and on a CPU, small, to prove the script (numpy only)::

    python bench/gpu.py --backends numpy --size 1024 --batches 1 2 4 --repeat 1

What is timed is ``process_visit(frames, statics, config=cfg, write=True)`` itself -- the code
``nightsift run`` runs -- never a copy of a stage. ``cfg`` is the default ``Config`` with
``run.sync_stage_times = True`` (the device is synchronised after every stage, so the chain's own
``t_<stage>`` QA times are the stages' times; production leaves it off and may run a little faster)
and ``package.output_dir`` a temporary folder (the write stage, Avro files, is part of the chain).
No real/bogus scorer unless ``--scorer`` (the shipped int8 model through
``engine.classify.runtime.pipeline_scorer``; it runs on the host CPU).

Data: ``--distinct`` (default 2) DECam-like CCD pairs from ``nightsift.engine.simulate.
simulate_ccd_pair`` (raw frame, calibration frames -> ``make_master``, reference), seed ``--seed``,
``max(30, size // 32)`` transients each (star density x 512/size under 512^2). Simulating a 4096^2
pair takes ~1 min of CPU, so the pairs are cached under ``--cache`` (``.npz`` planes + ``.json``
FITS headers, keyed by profile, size, seed, CCD and a hash of the simulator/calibration sources). A
batch of ``B`` CCD-visits repeats the distinct pairs (member ``b`` of the batch is pair ``b %
distinct``, with its CCD and statics): the work per CCD does not depend on which CCD it is. The
statics (``prepare_statics``: master calibration and reference measured once, resident on the
device) are prepared once per distinct CCD and backend, timed separately (``statics_s``) and reused
by every batch, as in a night.

Per backend and batch ``B``: one warm-up run (JIT compilation, cuFFT plans, pool growth; at B = 1
it also keeps the products for the numpy-vs-cupy check), then ``--repeat`` timed runs (numpy:
``--numpy-repeat``, default 1 when cupy also runs). Reported:

``wall``            median wall time of ``process_visit`` per CCD-visit (ms) and pairs/s = B / wall
``t_<stage>``       the chain's stage times (``engine.pipeline.STAGES``; per batch in the QA,
                    divided by B here), median over the runs
``xfer``            host<->device bytes per CCD-visit each way, copies and scalar reads per batch
                    (the chain's ``xfer_*`` QA; **0 on numpy by construction**: nothing crosses)
``peak device``     cupy: the memory pool's peak of used bytes over the warm-up run (an allocator
                    hook), its reserved bytes and the device's used memory (``mem_info``) after
                    the runs; statics included
``peak RSS``        host high-water mark over this B (``/proc/self/clear_refs``; cached input
                    pairs included)
``fft_floor``       one ``rfft2`` of the ``(B, size, size)`` float32 science batch
``plain_zogy``      ``nightsift.kernels.zogy.zogy`` on the whole ``(B, size, size)`` stacks as
                    single tiles (science calibrated with the true detector, reference, their
                    variance maps, the TRUE PSFs of the simulation at the CCD centre embedded with
                    ``kernels.psf.embed_psf``), float32, astrometric term on; ``x_plain`` =
                    wall per CCD-visit / plain ZOGY per pair

With both backends, the B = 1 runs are compared: S_corr relative L2 ``||cupy - numpy|| / ||numpy||``
and candidate identity (same count; positions within 0.05 px; any that differ are listed).

A batch that fails (e.g. out of device memory at B = 16) is recorded as an error row and the run
goes on. The JSON (``--out``) is rewritten after every row, so a run cut short keeps what it had.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nightsift-bench"
CACHE_VERSION = 1
PROFILE = "decam"
SEED = 2026
CHECK_TOLERANCE_PX = 0.05
CHECK_REL_L2 = 1e-3


# ------------------------------------------------------------------------------------------------
# simulated pairs, cached on disk
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchPair:
    """One simulated CCD pair as the chain reads it, plus what the references need.

    ``raw``/``master``/``reference`` go into the chain; ``science_image``/``science_variance`` (the
    raw frame calibrated with the simulator's true detector) and the true PSFs feed plain ZOGY;
    ``transients`` is the truth for completeness (bench/chain.py).
    """

    ccd: int
    raw: object  # RawFrame
    master: object  # MasterCalibration
    reference: object  # Exposure
    science_image: np.ndarray
    science_variance: np.ndarray
    transients: np.ndarray
    psf_sci: object  # PSFField
    psf_ref: object  # PSFField
    meta: dict
    simulate_s: float  # seconds the simulation + master took when it was made
    cached: bool  # loaded from the cache (True) or simulated by this process


def n_transients_for(size: int) -> int:
    return max(30, size // 32)


def star_density_for(size: int) -> float:
    """The simulator's default star density, raised on CCDs under 512^2 (a 256^2 DECam-like
    reference can hold fewer than the 3 PSF stars the chain needs)."""
    return 1.0 if size >= 512 else 512.0 / size


def _source_hash() -> str:
    """Hash of what the cached data depend on: the simulator and the master calibration code,
    and the default calibration settings."""
    import nightsift.engine.simulate as simpkg
    from nightsift.engine.config import Config
    from nightsift.engine.stages import calibrate

    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for p in sorted(Path(simpkg.__file__).parent.glob("*.py")) + [Path(calibrate.__file__)]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr(Config().calibrate).encode())
    return h.hexdigest()[:12]


def cache_key(profile: str, size: int, seed: int, ccd: int) -> str:
    dens = star_density_for(size)
    d = "" if dens == 1.0 else f"-stars{dens:g}"
    return f"{profile}-{size}x{size}-seed{seed}-ccd{ccd}-t{n_transients_for(size)}{d}-{_source_hash()}"


def _hdr_str(h) -> str:
    return h.tostring()


def _simulate_to_cache(profile: str, size: int, seed: int, ccd: int, cache: str) -> str:
    """Simulate one pair, make its master, write ``<key>.npz`` + ``<key>.json``; returns the key.
    (Run in a worker process when several pairs are missing.)"""
    from nightsift.engine.config import Config
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.calibrate import make_master

    key = cache_key(profile, size, seed, ccd)
    t0 = time.perf_counter()
    sim = simulate_ccd_pair(profile, shape=(size, size), seed=seed, ccd=ccd, n_transients=n_transients_for(size),
                            star_density=star_density_for(size))
    master = make_master(sim.calibration, header=sim.science_raw.header, config=Config().calibrate)
    sci = sim.science_exposure()
    dt = time.perf_counter() - t0
    ref = sim.reference
    arrays = dict(raw=np.asarray(sim.science_raw.data), ref_image=ref.image, ref_variance=ref.variance,
                  ref_mask=ref.mask, science_image=sci.image, science_variance=sci.variance,
                  bias=master.bias, dark_rate=master.dark_rate, flat=master.flat,
                  bad_pixel_mask=master.bad_pixel_mask, transients=sim.transients)
    scalars = {f.name: float(getattr(master, f.name)) for f in dataclasses.fields(master)
               if f.name not in ("bias", "dark_rate", "flat", "bad_pixel_mask")}
    meta = {"raw_header": _hdr_str(sim.science_raw.header), "ref_header": _hdr_str(ref.header),
            "ref_wcs": _hdr_str(ref.wcs.to_header(relax=True)), "master": scalars,
            "psf_sci": dataclasses.asdict(sim.psf_sci), "psf_ref": dataclasses.asdict(sim.psf_ref),
            "meta": json.loads(json.dumps(sim.meta, default=lambda o: o.item() if hasattr(o, "item") else str(o))),
            "simulate_s": dt, "profile": profile, "size": size, "seed": seed, "ccd": ccd}
    d = Path(cache)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.{os.getpid()}"
    np.savez(f"{tmp}.npz", **arrays)
    Path(f"{tmp}.json").write_text(json.dumps(meta))
    os.replace(f"{tmp}.npz", d / f"{key}.npz")
    os.replace(f"{tmp}.json", d / f"{key}.json")
    # the same pair made by older simulator/calibration code is stale: remove it
    prefix, _ = key.rsplit("-", 1)
    stale = re.compile(re.escape(prefix) + r"-[0-9a-f]{12}\.(npz|json)$")
    for f in d.iterdir():
        if stale.match(f.name) and not f.name.startswith(key + "."):
            f.unlink(missing_ok=True)
    return key


def _psf_field(d: dict):
    from nightsift.engine.simulate import PSFField

    return PSFField(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _load_cached(cache: Path, key: str, ccd: int, *, cached: bool) -> BenchPair:
    from astropy.io import fits
    from astropy.wcs import WCS

    from nightsift.engine.records import Exposure, RawFrame
    from nightsift.engine.stages.calibrate import MasterCalibration

    meta = json.loads((cache / f"{key}.json").read_text())
    with np.load(cache / f"{key}.npz") as z:
        a = {k: z[k] for k in z.files}
    raw = RawFrame(data=a["raw"], header=fits.Header.fromstring(meta["raw_header"]))
    ref = Exposure(image=a["ref_image"], variance=a["ref_variance"], mask=a["ref_mask"],
                   wcs=WCS(fits.Header.fromstring(meta["ref_wcs"])), header=fits.Header.fromstring(meta["ref_header"]))
    master = MasterCalibration(bias=a["bias"], dark_rate=a["dark_rate"], flat=a["flat"],
                               bad_pixel_mask=a["bad_pixel_mask"], **meta["master"])
    return BenchPair(ccd=ccd, raw=raw, master=master, reference=ref, science_image=a["science_image"],
                     science_variance=a["science_variance"], transients=a["transients"],
                     psf_sci=_psf_field(meta["psf_sci"]), psf_ref=_psf_field(meta["psf_ref"]), meta=meta["meta"],
                     simulate_s=float(meta["simulate_s"]), cached=cached)


def load_pairs(size: int, n: int, *, seed: int = SEED, profile: str = PROFILE, cache=DEFAULT_CACHE,
               jobs: int = 0, log=print) -> list[BenchPair]:
    """``n`` distinct simulated pairs (CCDs 0..n-1) of ``size``^2, from the cache or simulated into it.

    ``jobs``: worker processes for the missing ones (0: ``min(missing, cpus // 4)``, at least 1).
    """
    cache = Path(cache)
    keys = [cache_key(profile, size, seed, c) for c in range(n)]
    missing = [c for c, k in enumerate(keys) if not ((cache / f"{k}.npz").exists() and (cache / f"{k}.json").exists())]
    if missing:
        jobs = jobs or max(1, min(len(missing), (os.cpu_count() or 1) // 4))
        log(f"simulating {len(missing)} {profile} pair(s) of {size}^2 into {cache} ({jobs} process(es)) ...")
        t0 = time.perf_counter()
        if jobs > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork after Numba threads started
            with ctx.Pool(jobs) as pool:
                pool.starmap(_simulate_to_cache, [(profile, size, seed, c, str(cache)) for c in missing])
        else:
            for c in missing:
                _simulate_to_cache(profile, size, seed, c, str(cache))
        log(f"  done in {time.perf_counter() - t0:.1f} s")
    return [_load_cached(cache, k, c, cached=c not in missing) for c, k in enumerate(keys)]


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------
def sync(xp) -> None:
    from nightsift.kernels._xp import is_cupy

    if is_cupy(xp):
        xp.cuda.Device().synchronize()


@contextlib.contextmanager
def nvtx_range(xp, name: str):
    from nightsift.kernels._xp import is_cupy

    rng = None
    if is_cupy(xp):
        try:
            from cupy.cuda import nvtx

            rng = nvtx
        except Exception:  # pragma: no cover - cupy without NVTX
            rng = None
    if rng:
        rng.RangePush(name)
    try:
        yield
    finally:
        if rng:
            rng.RangePop()


@contextlib.contextmanager
def track_device_peak(xp):
    """Peak of the cupy pool's used bytes over the block (an allocator hook: one Python call per
    allocation, so only around untimed runs). Yields a dict whose ``peak`` is filled in; numpy: 0."""
    from nightsift.kernels._xp import is_cupy

    out = {"peak": 0}
    if not is_cupy(xp):
        yield out
        return
    pool = xp.get_default_memory_pool()
    out["peak"] = int(pool.used_bytes())

    def malloc(size):
        mem = pool.malloc(size)
        used = pool.used_bytes()
        if used > out["peak"]:
            out["peak"] = int(used)
        return mem

    with xp.cuda.using_allocator(malloc):  # thread-local; the default pool allocator after the block
        yield out


def free_device(xp) -> None:
    from nightsift.kernels._xp import is_cupy

    if is_cupy(xp):
        sync(xp)
        xp.fft.config.get_plan_cache().clear()
        xp.get_default_memory_pool().free_all_blocks()
        xp.get_default_pinned_memory_pool().free_all_blocks()


def device_memory(xp) -> dict:
    from nightsift.engine.backend import memory_stats
    from nightsift.kernels._xp import is_cupy

    if not is_cupy(xp):
        return {}
    free, total = xp.cuda.Device().mem_info
    st = memory_stats(xp)
    return {"pool_reserved_bytes": st["pool_bytes"], "pool_used_bytes": st["used_bytes"],
            "device_used_bytes": int(total - free), "device_total_bytes": int(total)}


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_average() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------
# the references: rfft2 floor and plain single-tile ZOGY with the true PSFs
# ------------------------------------------------------------------------------------------------
def true_psf_stamp(psf, size: int) -> np.ndarray:
    """The simulation's true pixelised PSF at the CCD centre, ``(size, size)`` float32, unit sum."""
    ny, nx = psf.shape
    st = psf.stamp((nx - 1) / 2.0, (ny - 1) / 2.0, size)
    return (st / st.sum()).astype(np.float32)


def plain_zogy_inputs(pairs: list[BenchPair], B: int, xp, *, stamp_size: int) -> dict:
    """The ``(B, ny, nx)`` stacks plain ZOGY reads, on ``xp``'s device: science (true calibration)
    and reference minus their medians, their variance maps, the true centre PSFs embedded, sigma
    (sqrt of the median variance) and F_r (from the headers' zero points) per image."""
    from nightsift.kernels.psf import embed_psf

    n = len(pairs)
    idx = [b % n for b in range(B)]
    ny, nx = pairs[0].science_image.shape
    host = {}
    N = np.empty((B, ny, nx), np.float32)
    R = np.empty((B, ny, nx), np.float32)
    VN = np.empty((B, ny, nx), np.float32)
    VR = np.empty((B, ny, nx), np.float32)
    sn, sr, fr = np.empty(B), np.empty(B), np.empty(B)
    for b, i in enumerate(idx):
        p = pairs[i]
        sub = (slice(None, None, 4), slice(None, None, 4))
        N[b] = p.science_image - np.float32(np.nanmedian(p.science_image[sub]))
        R[b] = p.reference.image - np.float32(np.nanmedian(p.reference.image[sub]))
        VN[b] = p.science_variance
        VR[b] = p.reference.variance
        sn[b] = np.sqrt(np.nanmedian(p.science_variance[sub]))
        sr[b] = np.sqrt(np.nanmedian(p.reference.variance[sub]))
        hs, hr = p.raw.header, p.reference.header
        try:  # e- per unit flux: EXPTIME 10^(0.4 MAGZP); F_r = reference / science
            fr[b] = (float(hr["EXPTIME"]) * 10 ** (0.4 * float(hr["MAGZP"]))) / \
                (float(hs["EXPTIME"]) * 10 ** (0.4 * float(hs["MAGZP"])))
        except (KeyError, ValueError, TypeError):
            fr[b] = 1.0
    for name, arr in (("N", N), ("R", R), ("V_N", VN), ("V_R", VR)):
        host[name] = xp.asarray(arr)
    del N, R, VN, VR
    Pn = np.stack([true_psf_stamp(pairs[i].psf_sci, stamp_size) for i in idx])
    Pr = np.stack([true_psf_stamp(pairs[i].psf_ref, stamp_size) for i in idx])
    host["P_n"] = embed_psf(xp.asarray(Pn), (ny, nx))
    host["P_r"] = embed_psf(xp.asarray(Pr), (ny, nx))
    host["sigma_n"], host["sigma_r"], host["F_r"] = sn, sr, fr
    return host


def run_plain_zogy(inp: dict, *, astrometric_rms: float):
    from nightsift.kernels.zogy import zogy

    return zogy(inp["N"], inp["R"], inp["P_n"], inp["P_r"], inp["V_N"], inp["V_R"], sigma_n=inp["sigma_n"],
                sigma_r=inp["sigma_r"], F_r=inp["F_r"], astrometric_rms=(astrometric_rms, astrometric_rms),
                dtype=np.float32)


def run_fft_floor(inp: dict):
    from nightsift.kernels._xp import array_namespace, fft_kwargs, fft_module

    xp = array_namespace(inp["N"])
    return fft_module(xp).rfft2(inp["N"], axes=(-2, -1), **fft_kwargs(xp))


def median_time(fn, xp, repeat: int, *, warm: bool) -> float:
    """Median seconds of ``fn()`` (device synchronised at both ends); ``warm``: one untimed call first."""
    if warm:
        out = fn()
        sync(xp)
        del out
    ts = []
    for _ in range(max(1, repeat)):
        sync(xp)
        t0 = time.perf_counter()
        out = fn()
        sync(xp)
        ts.append(time.perf_counter() - t0)
        del out
    return float(np.median(ts))


def time_references(pairs, B, xp, *, cfg, repeat: int) -> dict:
    """``fft_floor`` and ``plain_zogy`` on the same (B, size, size) batch and device (ms per pair)."""
    out = {}
    inp = None
    try:
        inp = plain_zogy_inputs(pairs, B, xp, stamp_size=cfg.psf.stamp_size)
        out["fft_floor_ms_per_pair"] = 1e3 * median_time(lambda: run_fft_floor(inp), xp, max(3, repeat), warm=True) / B
        ast = cfg.subtract.default_astrometric_rms
        out["plain_zogy_ms_per_pair"] = 1e3 * median_time(lambda: run_plain_zogy(inp, astrometric_rms=ast), xp,
                                                          repeat, warm=True) / B
    except Exception as exc:  # e.g. out of device memory at a large batch
        out["reference_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        del inp
        free_device(xp)
    return out


# ------------------------------------------------------------------------------------------------
# the chain
# ------------------------------------------------------------------------------------------------
def bench_config(output_dir: str, *, scorer: bool = False):
    from nightsift.engine.config import Config

    over = {"run": {"sync_stage_times": True}, "package": {"output_dir": output_dir}}
    if scorer:
        over["classify"] = {"backend": "tflite"}
    return Config().replace(**over)


def make_scorer(cfg):
    from nightsift.engine.classify.runtime import pipeline_scorer

    s = pipeline_scorer(cfg.classify)
    if s is None:
        raise SystemExit("--scorer: no scorer could be loaded (classify.backend = tflite)")
    return s


def prepare_all_statics(pairs, cfg, xp) -> tuple[list, list[float]]:
    """``prepare_statics`` once per distinct CCD on ``xp``'s device; seconds per CCD."""
    from nightsift.engine.pipeline import prepare_statics

    statics, secs = [], []
    for p in pairs:
        sync(xp)
        t0 = time.perf_counter()
        statics.append(prepare_statics(p.reference, p.master, config=cfg, xp=xp, ccd=p.ccd))
        sync(xp)
        secs.append(time.perf_counter() - t0)
    return statics, secs


def batch_inputs(pairs, statics, B: int, visit: int):
    """B CCD-visits: member ``b`` is distinct pair ``b % n`` (its CCD, its statics reused) observed
    at visit ``visit + b // n``, so every (visit, CCD) -- the alert file's name -- is unique."""
    from nightsift.engine.pipeline import VisitFrame

    n = len(pairs)
    frames = [VisitFrame(visit=visit + b // n, ccd=pairs[b % n].ccd, raw=pairs[b % n].raw) for b in range(B)]
    return frames, [statics[b % n] for b in range(B)]


def run_visit(frames, statics, xp, cfg, *, scorer=None, keep_products=False, out_dir: str, label=""):
    """One ``process_visit`` call (alerts written into a fresh ``out_dir``); wall seconds and results."""
    from nightsift.engine.pipeline import process_visit

    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    sync(xp)
    with nvtx_range(xp, label or f"process_visit B={len(frames)}"):
        t0 = time.perf_counter()
        res = process_visit(frames, statics, config=cfg, scorer=scorer, write=True, keep_products=keep_products)
        sync(xp)
        wall = time.perf_counter() - t0
    return wall, res


def summarise_run(wall: float, res: list, B: int) -> dict:
    from nightsift.engine.pipeline import STAGES

    stage = {}
    for s in STAGES:
        vals = [r.qa[f"t_{s}"] for r in res if f"t_{s}" in r.qa]
        stage[s] = float(max(vals)) if vals else float("nan")  # the batch's time (same for every member)
    qa0 = next((r.qa for r in res if "xfer_h2d_bytes" in r.qa), {})
    statuses = {}
    for r in res:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    errors = sorted({f"{type(r.error).__name__}: {str(r.error)[:200]}" for r in res if r.error is not None})
    return {"wall_s": wall, "stage_s": stage, "n_candidates": int(sum(len(r.candidates) for r in res)),
            "n_alerts": int(sum(r.n_alerts for r in res)), "statuses": statuses, "errors": errors,
            "xfer": {k: qa0.get(k) for k in ("xfer_h2d_bytes", "xfer_d2h_bytes", "xfer_h2d_count",
                                             "xfer_d2h_count", "xfer_scalar_reads")}}


def check_products(res: list) -> dict:
    """What the numpy-vs-cupy check compares, from a B = 1 keep_products run (host arrays)."""
    r = res[0]
    if r.products is None:
        return {"error": f"no products (status {r.status}: {r.error})"}
    c = r.candidates
    return {"S_corr": np.asarray(r.products.subtraction.S_corr, np.float64),
            "x": np.asarray(c["xpos"], float), "y": np.asarray(c["ypos"], float),
            "sign": np.asarray(c["isdiffpos"], bool), "scorr": np.asarray(c["scorr"], float)}


def compare_backends(a: dict, b: dict, *, tol: float = CHECK_TOLERANCE_PX) -> dict:
    """cupy (``a``) against numpy (``b``): S_corr relative L2 and candidate identity."""
    if "error" in a or "error" in b:
        return {"error": a.get("error") or b.get("error"), "pass": False}
    sa, sb = a["S_corr"], b["S_corr"]
    fin = np.isfinite(sa) & np.isfinite(sb)
    rel = float(np.linalg.norm((sa - sb)[fin]) / max(np.linalg.norm(sb[fin]), 1e-300))
    diffs = []
    used = np.zeros(len(a["x"]), bool)
    for i in range(len(b["x"])):
        if len(a["x"]):
            d = np.hypot(a["x"] - b["x"][i], a["y"] - b["y"][i])
            d[used] = np.inf
            j = int(np.argmin(d))
            dist = float(d[j])
        else:
            j, dist = -1, float("inf")
        if j >= 0 and dist <= tol and a["sign"][j] == b["sign"][i]:
            used[j] = True
            continue
        diffs.append({"numpy": [round(float(b["x"][i]), 3), round(float(b["y"][i]), 3), bool(b["sign"][i]),
                                round(float(b["scorr"][i]), 2)],
                      "nearest_cupy": None if j < 0 else [round(float(a["x"][j]), 3), round(float(a["y"][j]), 3),
                                                         bool(a["sign"][j]), round(float(a["scorr"][j]), 2)],
                      "distance_px": None if j < 0 else round(dist, 4)})
    for j in np.flatnonzero(~used):  # cupy candidates no numpy one claimed
        diffs.append({"numpy": None, "cupy_only": [round(float(a["x"][j]), 3), round(float(a["y"][j]), 3),
                                                   bool(a["sign"][j]), round(float(a["scorr"][j]), 2)]})
    same = len(a["x"]) == len(b["x"])
    return {"scorr_rel_l2": rel, "n_candidates_numpy": int(len(b["x"])), "n_candidates_cupy": int(len(a["x"])),
            "same_count": same, "tolerance_px": tol, "differing": diffs, "candidates_identical": same and not diffs,
            "pass": bool(same and not diffs and rel < CHECK_REL_L2),
            "pass_rule": f"same candidates (positions within {tol} px, same sign) and S_corr relative L2 "
                         f"< {CHECK_REL_L2:g}"}


def bench_backend(name, xp, pairs, batches, repeat, args, *, on_row, check_store) -> tuple[dict, list]:
    """Statics once, then every batch size: warm-up + ``repeat`` timed runs + references."""
    statics_info = {"backend": name}
    rows = []
    tmp = tempfile.mkdtemp(prefix=f"nightsift-bench-{name}-")
    try:
        cfg = bench_config(tmp, scorer=args.scorer)
        scorer = make_scorer(cfg) if args.scorer else None
        pairs = pairs[:max(1, min(len(pairs), max(batches)))]  # the distinct CCDs these batches use
        try:
            statics, secs = prepare_all_statics(pairs, cfg, xp)
        except Exception as exc:
            statics_info["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
            rows.append({"backend": name, "batch": None, "error": "statics: " + statics_info["error"]})
            on_row(rows[-1])
            return statics_info, rows
        statics_info.update({"statics_s": float(min(secs)), "statics_s_per_ccd": secs,
                             "statics_bytes_per_ccd": int(statics[0].nbytes),
                             "note": "prepare_statics per distinct CCD (the first includes JIT compilation); "
                                     "statics_s = the fastest"})
        print(f"[{name}] statics: " + ", ".join(f"{s:.2f}" for s in secs) + " s per CCD", flush=True)
        visit = 0
        for B in batches:
            row = {"backend": name, "batch": B, "size": args.size, "distinct_ccds": len(pairs), "repeat": repeat}
            try:
                free_device(xp)
                rss_reset = reset_peak_rss()
                visit += B
                frames, st = batch_inputs(pairs, statics, B, visit)
                keep = B == 1 and check_store is not None
                t0 = time.perf_counter()
                with track_device_peak(xp) as peak:
                    wall, res = run_visit(frames, st, xp, cfg, scorer=scorer, keep_products=keep,
                                          out_dir=os.path.join(tmp, "alerts"), label=f"warm-up B={B}")
                row["warmup_s"] = time.perf_counter() - t0
                if keep:
                    check_store[name] = check_products(res)
                del res
                runs = []
                for _ in range(repeat):
                    visit += B
                    frames, st = batch_inputs(pairs, statics, B, visit)
                    wall, res = run_visit(frames, st, xp, cfg, scorer=scorer, out_dir=os.path.join(tmp, "alerts"))
                    runs.append(summarise_run(wall, res, B))
                    del res
                from nightsift.engine.pipeline import STAGES

                walls = [r["wall_s"] for r in runs]
                med = float(np.median(walls))
                last = runs[int(np.argsort(walls)[len(walls) // 2])]
                row["wall_ms_per_visit"] = 1e3 * med / B
                row["wall_ms_per_visit_runs"] = [1e3 * w / B for w in walls]
                row["pairs_per_s"] = B / med
                row["stage_ms_per_visit"] = {s: 1e3 * float(np.median([r["stage_s"][s] for r in runs])) / B
                                             for s in STAGES}
                row["stage_sum_ms_per_visit"] = float(sum(v for v in row["stage_ms_per_visit"].values()
                                                          if np.isfinite(v)))
                row["candidates_per_pair"] = last["n_candidates"] / B
                row["alerts_per_pair"] = last["n_alerts"] / B
                row["statuses"] = last["statuses"]
                if set(last["statuses"]) != {"done"}:
                    row["warning"] = f"not every CCD-visit was done: {last['statuses']}"
                if last["errors"]:
                    row["ccd_errors"] = last["errors"]
                x = last["xfer"]
                row["xfer"] = {"h2d_bytes_per_visit": x["xfer_h2d_bytes"], "d2h_bytes_per_visit": x["xfer_d2h_bytes"],
                               "h2d_copies_per_batch": x["xfer_h2d_count"], "d2h_copies_per_batch": x["xfer_d2h_count"],
                               "scalar_reads_per_batch": x["xfer_scalar_reads"],
                               "scalar_reads_per_visit": (x["xfer_scalar_reads"] or 0) / B}
                if name == "numpy":
                    row["xfer"]["note"] = "numpy: nothing crosses a host/device boundary, so 0 by construction"
                mem = device_memory(xp)
                if mem:
                    mem["peak_pool_used_bytes"] = peak["peak"]
                    mem["note"] = ("peak_pool_used_bytes: the pool's peak over the warm-up run (statics resident "
                                   "included); the others after the timed runs")
                row["device_memory"] = mem or None
                row["peak_host_rss_bytes"] = peak_rss_bytes()
                row["peak_host_rss_scope"] = "this B (clear_refs)" if rss_reset else "process (ru_maxrss)"
                row.update(time_references(pairs, B, xp, cfg=cfg, repeat=repeat))
                if "plain_zogy_ms_per_pair" in row:
                    row["ratio_to_plain_zogy"] = row["wall_ms_per_visit"] / row["plain_zogy_ms_per_pair"]
                    row["ratio_to_fft_floor"] = row["wall_ms_per_visit"] / row["fft_floor_ms_per_pair"]
            except Exception as exc:  # e.g. cupy OutOfMemoryError at B = 16: record it and go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc()
            finally:
                free_device(xp)
            rows.append(row)
            print(format_row(row), flush=True)
            on_row(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return statics_info, rows


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _f(v, fmt=".1f"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def format_row(r: dict) -> str:
    head = f"[{r['backend']} B={r['batch']}]"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    st = " ".join(f"{k}={v:.1f}" for k, v in r["stage_ms_per_visit"].items())
    return (f"{head} {r['wall_ms_per_visit']:.1f} ms/visit ({r['pairs_per_s']:.2f} pairs/s), "
            f"fft_floor {_f(r.get('fft_floor_ms_per_pair'), '.2f')} ms, plain ZOGY "
            f"{_f(r.get('plain_zogy_ms_per_pair'))} ms, x{_f(r.get('ratio_to_plain_zogy'), '.2f')}; "
            f"{r['candidates_per_pair']:.1f} cands/pair\n    [{st}]")


def markdown(result: dict) -> str:
    from nightsift.engine.pipeline import STAGES

    rows = result["results"]
    size = result["config"]["size"]
    lines = [f"\nproduction chain (process_visit), {size}x{size}, ms per CCD-visit (median of repeats)\n",
             "| backend | B | wall | pairs/s | cands/pair | H2D MB/visit | D2H MB/visit | copies/batch (h2d/d2h) "
             "| scalar reads/batch | peak dev GiB | peak RSS GiB | rfft2 floor | plain ZOGY | x plain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['batch']} | ERROR: {r['error'][:120]} |" + " |" * 12)
            continue
        x = r["xfer"]
        mem = r.get("device_memory") or {}
        peak = mem.get("peak_pool_used_bytes")
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['wall_ms_per_visit']:.1f} | {r['pairs_per_s']:.2f} | "
            f"{r['candidates_per_pair']:.1f} | {_f((x['h2d_bytes_per_visit'] or 0) / 1e6, '.1f')} | "
            f"{_f((x['d2h_bytes_per_visit'] or 0) / 1e6, '.2f')} | "
            f"{x['h2d_copies_per_batch']}/{x['d2h_copies_per_batch']} | {x['scalar_reads_per_batch']} | "
            f"{_f(None if peak is None else peak / 2**30, '.2f')} | "
            f"{r['peak_host_rss_bytes'] / 2**30:.2f} | {_f(r.get('fft_floor_ms_per_pair'), '.2f')} | "
            f"{_f(r.get('plain_zogy_ms_per_pair'))} | {_f(r.get('ratio_to_plain_zogy'), '.2f')} |")
    lines += ["", "stage ms per CCD-visit (t_<stage> QA / B, median of repeats)", "",
              "| backend | B | " + " | ".join(STAGES) + " | sum | wall |",
              "|---|---:|" + "---:|" * (len(STAGES) + 2)]
    for r in rows:
        if "error" in r:
            continue
        s = r["stage_ms_per_visit"]
        lines.append(f"| {r['backend']} | {r['batch']} | " + " | ".join(_f(s[k]) for k in STAGES)
                     + f" | {r['stage_sum_ms_per_visit']:.1f} | {r['wall_ms_per_visit']:.1f} |")
    for name, st in result["statics"].items():
        if "statics_s" in st:
            lines.append(f"\nstatics ({name}): prepare_statics {st['statics_s']:.2f} s per CCD (warm; per CCD: "
                         + ", ".join(f"{v:.2f}" for v in st["statics_s_per_ccd"]) + f" s), "
                         f"{st['statics_bytes_per_ccd'] / 2**20:.0f} MiB resident per CCD")
    lines.append("\nA batch of B repeats the distinct simulated pairs (member b = pair b % distinct, with its CCD "
                 "and statics): the work per CCD does not depend on which CCD it is. numpy moves 0 bytes by "
                 "construction.")
    chk = result.get("check")
    if chk:
        lines.append("\nnumpy vs cupy (B = 1): " + json.dumps({k: v for k, v in chk.items() if k != "differing"}))
        for d in chk.get("differing", [])[:50]:
            lines.append(f"  differs: {json.dumps(d)}")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod, dist in (("scipy", "scipy"), ("numba", "numba"), ("cupy", None), ("numba-cuda", "numba-cuda"),
                      ("astropy", "astropy")):
        try:
            if dist is None:
                import cupy

                out[mod] = cupy.__version__
            else:
                out[mod] = md.version(dist)
        except Exception:
            out[mod] = None
    return out


def run_env() -> dict:
    """Environment variables that change the timings (allocator, thread counts)."""
    keep = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LD_PRELOAD",
            "CUPY_CACHE_DIR", "NUMBA_ENABLE_CUDASIM", "CUDA_VISIBLE_DEVICES")
    return {k: v for k, v in sorted(os.environ.items()) if k in keep or k.startswith("MALLOC_")}


def machine(xps) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "numba_threads": os.environ.get("NUMBA_NUM_THREADS", "default"), "env": run_env(), "gpu": None}
    from nightsift.kernels._xp import is_cupy

    for _, xp in xps:
        if is_cupy(xp):
            props = xp.cuda.runtime.getDeviceProperties(0)
            nm = props["name"]
            info["gpu"] = nm.decode() if isinstance(nm, bytes) else str(nm)
            info["gpu_memory_bytes"] = int(props["totalGlobalMem"])
            info["cuda_runtime"] = int(xp.cuda.runtime.runtimeGetVersion())
            info["cuda_driver"] = int(xp.cuda.runtime.driverGetVersion())
    return info


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="CCD side in pixels (default 4096)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16],
                   help="batch sizes B (CCD-visits per process_visit call) for cupy, and for numpy when numpy is "
                        "the only backend asked for with --backends (default 1 4 8 16)")
    p.add_argument("--backends", nargs="+", choices=["numpy", "cupy"], default=None,
                   help="default: cupy if it imports and sees a GPU, plus numpy (at B = 1 only unless "
                        "--numpy-batches); an explicit 'cupy' without a GPU is recorded as an error")
    p.add_argument("--numpy-batches", type=int, nargs="+", default=None,
                   help="batch sizes for numpy (default: 1 when cupy also runs or by default; --batches when "
                        "--backends numpy alone is given)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per batch after the warm-up (median; default 3)")
    p.add_argument("--numpy-repeat", type=int, default=None,
                   help="timed runs per numpy batch (default: 1 when cupy also runs, else --repeat)")
    p.add_argument("--distinct", type=int, default=2, help="distinct simulated CCD pairs a batch cycles through (2)")
    p.add_argument("--seed", type=int, default=SEED, help=f"simulation seed (default {SEED})")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of cached simulated pairs (default %(default)s)")
    p.add_argument("--jobs", type=int, default=0,
                   help="processes simulating missing pairs (0: min(missing, cpus // 4), at least 1)")
    p.add_argument("--scorer", action="store_true",
                   help="score the triplets with the shipped int8 model (classify.backend = tflite, host CPU)")
    p.add_argument("--pool-limit-gib", type=float, default=0.0, help="bound CuPy's memory pool (GiB; 0: no bound)")
    p.add_argument("--no-check", action="store_true", help="skip the numpy-vs-cupy comparison at B = 1")
    p.add_argument("--out", default=None,
                   help="JSON output (default bench/gpu.json when cupy ran, else bench/gpu-cpu.json)")
    args = p.parse_args(argv)
    for name in ("size", "repeat", "distinct"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.numpy_repeat is not None and args.numpy_repeat < 1:
        p.error("--numpy-repeat must be >= 1")
    if min(args.batches + (args.numpy_batches or [1])) < 1:
        p.error("batch sizes must be >= 1")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from nightsift.engine.backend import retain_host_memory

    retain_host_memory()  # as a night's worker does (config run.retain_host_memory)
    from nightsift.engine import backend as bk
    from nightsift.engine.config import Config
    from nightsift.engine.pipeline import STAGES
    from nightsift.kernels.tiles import make_grid

    notes = []
    explicit = args.backends is not None
    wanted = args.backends if explicit else ["cupy", "numpy"]
    xps, skipped_rows = [], []
    for name in wanted:
        if name == "numpy":
            xps.append(("numpy", np))
            continue
        probe = bk.probe_gpu()
        if probe.ok:
            xps.append(("cupy", bk.get_backend("cupy")))
        else:
            msg = f"cupy not run: {probe.reason}"
            notes.append(msg)
            print("note:", msg, flush=True)
            if explicit:
                skipped_rows.append({"backend": "cupy", "batch": None, "error": msg})
    # cupy first: its numbers are the point; numpy (slow on a CPU) after
    xps.sort(key=lambda t: t[0] != "cupy")
    cupy_ran = any(n == "cupy" for n, _ in xps)
    out_path = Path(args.out) if args.out else BENCH / ("gpu.json" if cupy_ran else "gpu-cpu.json")
    numpy_only = explicit and wanted == ["numpy"]
    np_batches = args.numpy_batches or (args.batches if numpy_only else [1])
    np_repeat = args.numpy_repeat if args.numpy_repeat is not None else (1 if cupy_ran else args.repeat)
    if not args.numpy_batches and not numpy_only and any(n == "numpy" for n, _ in xps):
        notes.append("numpy timed at B = 1 only (default; --numpy-batches for more)")

    cfg = Config()
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/gpu.py " + " ".join(argv), "machine": machine(xps), "versions": versions(),
              "load_average_start": load_average(), "notes": notes, "stages": list(STAGES),
              "config": {"size": args.size, "batches": args.batches, "numpy_batches": np_batches,
                         "repeat": args.repeat, "numpy_repeat": np_repeat, "distinct_ccds": args.distinct,
                         "profile": PROFILE, "seed": args.seed, "n_transients_per_ccd": n_transients_for(args.size),
                         "star_density": star_density_for(args.size),
                         "tile_size": cfg.subtract.tile_size, "tile_margin": cfg.subtract.tile_margin,
                         "fft_dtype": cfg.subtract.fft_dtype, "psf_stamp": cfg.psf.stamp_size,
                         "scorer": "tflite int8" if args.scorer else None, "write": True,
                         "sync_stage_times": True},
              "data": None, "statics": {}, "results": list(skipped_rows), "check": None, "complete": False}

    def dump():
        result["load_average_end"] = load_average()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

    print(json.dumps({"machine": result["machine"], "versions": result["versions"]}), flush=True)
    if not xps:
        dump()
        print("nothing to run: " + "; ".join(notes))
        return 1
    t0 = time.perf_counter()
    biggest = max([*(args.batches if cupy_ran else []), *(np_batches if any(n == "numpy" for n, _ in xps) else [1])])
    pairs = load_pairs(args.size, max(1, min(args.distinct, biggest)), seed=args.seed, cache=args.cache, jobs=args.jobs)
    result["data"] = {"load_s": time.perf_counter() - t0, "cache": str(args.cache),
                      "from_cache": [p.cached for p in pairs], "simulate_s": [p.simulate_s for p in pairs],
                      "note": "a batch of B repeats the distinct pairs (member b = pair b % distinct, its CCD and "
                              "statics, at visit v + b // distinct); the work per "
                              "CCD does not depend on which CCD it is"}
    dump()

    check_store = {} if (not args.no_check and cupy_ran and any(n == "numpy" for n, _ in xps)
                         and 1 in args.batches and 1 in np_batches) else None
    for name, xp in xps:
        if name == "cupy":
            if args.pool_limit_gib > 0:
                bk.configure_memory_pool(xp, limit_bytes=int(args.pool_limit_gib * 2**30))
            g = make_grid((args.size, args.size), core=cfg.subtract.tile_size, margin=cfg.subtract.tile_margin)
            shapes = [(b * len(g), *g.tile_shape) for b in args.batches] + [(b, args.size, args.size)
                                                                            for b in args.batches]
            bk.configure_fft_plan_cache(xp, n_plans=bk.fft_plans_needed(shapes) + 16)
        batches, repeat = (args.batches, args.repeat) if name == "cupy" else (np_batches, np_repeat)
        st, rows = bench_backend(name, xp, pairs, batches, repeat, args,
                                 on_row=lambda r: (result["results"].append(r), dump()), check_store=check_store)
        result["statics"][name] = st
        dump()
    if check_store is not None:
        if {"numpy", "cupy"} <= set(check_store):
            result["check"] = compare_backends(check_store["cupy"], check_store["numpy"])
        else:
            result["check"] = {"error": "a B = 1 run failed on one backend", "pass": False}
    elif cupy_ran and not args.no_check:
        result["check"] = {"error": "not run: needs numpy and cupy both at B = 1", "pass": False}
    result["complete"] = True
    dump()
    print(markdown(result))
    print(f"\nwrote {out_path}")
    problems = [f"{r['backend']} B={r['batch']}: {r['error']}" for r in result["results"] if "error" in r]
    problems += [f"{r['backend']} B={r['batch']}: {r['warning']}" for r in result["results"] if "warning" in r]
    if result["check"] is not None and not result["check"].get("pass"):
        problems.append("numpy vs cupy check did not pass: "
                        + json.dumps({k: v for k, v in result["check"].items() if k != "differing"}))
    for msg in problems:
        print("FAIL:", msg)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
