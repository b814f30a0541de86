"""Wall time of the production chain per CCD-visit, stage by stage, on this machine (numpy backend),
against plain single-tile ZOGY on the same pair.

    python bench/chain.py                       # 2048^2 and 4096^2 DECam-like pairs + `nightsift run`
    python bench/chain.py --sizes 1024 --no-night --repeat 1

For each size, one simulated pair (``simulate_ccd_pair`` + ``make_master``; not timed, cached on
disk with bench/gpu.py's cache, ``--cache``), then the production path of a night:

``statics``      ``prepare_statics`` once for the CCD (master calibration, reference background,
                 catalogue and PSF measured in its own frame)
``first visit``  statics + the first ``process_visit`` (what a CCD seen for the first time costs:
                 ``process_ccd``); this call keeps the products, for the completeness QA
``per visit``    median of ``--repeat`` further ``process_visit`` calls with the statics reused
                 (a night's steady state; the same raw frame as new visits)

The stage table is the chain's ``t_<stage>`` QA (``engine.pipeline.STAGES``), median of the
per-visit calls; the write stage (Avro) is included. In the same run, ``plain ZOGY`` is
``nightsift.kernels.zogy.zogy`` on the same pair as ONE tile with the simulation's true PSFs at the
CCD centre, float32 (science calibrated with the true detector, reference unaligned: the cost does
not depend on the pixels), median of ``--repeat``; ``ratio`` = per visit / plain ZOGY (the issue's
CPU target: <= 2.5 at 4096^2). The chain's Numba kernels are compiled first on a 256^2 pair (not
reported). Also: candidates, the S_corr std before renormalisation, completeness at expected
S/N >= 7 and peak RSS per size. ``--night`` also times the default ``nightsift run`` (3 visits x
2 CCDs of 1024^2, local engine) as a subprocess. Prints a table and writes JSON (``--out``,
default bench/chain.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu as shared  # noqa: E402  (bench/gpu.py: the cached pairs, plain ZOGY, RSS helpers)

CPU_TARGET_RATIO = 2.5


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _visit(frames, statics, cfg, *, keep_products=False):
    from nightsift.engine.pipeline import process_visit

    t0 = time.perf_counter()
    res = process_visit(frames, statics, config=cfg, write=True, keep_products=keep_products)[0]
    wall = time.perf_counter() - t0
    if res.error is not None:
        raise res.error
    return wall, res


def warm_up(cache: str, instrument: str, seed: int) -> float:
    """One 256^2 CCD through the chain: Numba compilation outside the timed runs."""
    from nightsift.engine.pipeline import VisitFrame, prepare_statics

    t0 = time.perf_counter()
    pair = shared.load_pairs(256, 1, seed=seed, profile=instrument, cache=cache, log=lambda *a: None)[0]
    with tempfile.TemporaryDirectory() as out:
        cfg = shared.bench_config(out)
        st = prepare_statics(pair.reference, pair.master, config=cfg, xp=np, ccd=0)
        _visit([VisitFrame(0, 0, raw=pair.raw)], [st], cfg)
    return time.perf_counter() - t0


def bench_pair(size: int, repeat: int, instrument: str, seed: int, cache: str) -> dict:
    from nightsift.engine.pipeline import STAGES, VisitFrame, prepare_statics
    from nightsift.engine.truth import expected_snr, match_candidates

    t0 = time.perf_counter()
    pair = shared.load_pairs(size, 1, seed=seed, profile=instrument, cache=cache,
                             log=lambda *a: print(*a, file=sys.stderr))[0]
    t_load = time.perf_counter() - t0
    shared.reset_peak_rss()
    with tempfile.TemporaryDirectory() as out:
        cfg = shared.bench_config(out)
        t0 = time.perf_counter()
        statics = prepare_statics(pair.reference, pair.master, config=cfg, xp=np, ccd=0)
        t_statics = time.perf_counter() - t0
        t_first, first = _visit([VisitFrame(0, 0, raw=pair.raw)], [statics], cfg, keep_products=True)
        runs = [_visit([VisitFrame(v, 0, raw=pair.raw)], [statics], cfg) for v in range(1, repeat + 1)]
    per_visit = [t for t, _ in runs]
    stages = {k: float(np.median([r.qa.get(f"t_{k}", np.nan) for _, r in runs])) for k in STAGES}
    rss = shared.peak_rss_bytes()
    # plain ZOGY on the same pair, one tile, true PSFs, float32
    inp = shared.plain_zogy_inputs([pair], 1, np, stamp_size=cfg.psf.stamp_size)
    rms = cfg.subtract.default_astrometric_rms
    t_plain = shared.median_time(lambda: shared.run_plain_zogy(inp, astrometric_rms=rms), np, repeat, warm=False)
    del inp
    m = match_candidates(first.candidates, pair.transients)
    snr = expected_snr(pair.transients, first.products.subtraction.flux_err)
    pv = float(np.median(per_visit))
    return {"size": size, "instrument": instrument, "repeat": repeat, "seed": seed,
            "pair_from_cache": pair.cached, "simulate_s": pair.simulate_s, "load_s": t_load,
            "statics_s": t_statics, "first_visit_s": t_statics + t_first, "first_process_visit_s": t_first,
            "per_visit_s": pv, "per_visit_runs_s": per_visit, "total_s": pv,
            "stages_s": stages, "stage_sum_s": float(np.nansum(list(stages.values()))),
            "plain_zogy_s": t_plain, "ratio_per_visit_to_plain_zogy": pv / t_plain,
            "n_candidates": int(len(runs[-1][1].candidates)), "scorr_std_raw": first.qa.get("scorr_std_raw"),
            "n_tiles": first.qa.get("n_tiles"),
            "completeness_snr7": float(m.found[snr >= 7].mean()) if (snr >= 7).any() else None,
            "peak_rss_gib": rss / 2**30}


def bench_night() -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "nightsift.engine.cli", "run", "--engine", "local", "--quiet", "--out", out]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        summary = json.loads((Path(out) / "night_summary.json").read_text()) if p.returncode == 0 else {}
    return {"command": "nightsift run --engine local", "wall_s": wall, "returncode": p.returncode,
            "summary": summary, "stdout": p.stdout[-2000:]}


def _fmt(v, f=".2f"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="CCD sides (default 2048 4096)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="per-visit process_visit calls after the first visit, and plain ZOGY runs (median)")
    ap.add_argument("--instrument", default="decam")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--cache", default=str(shared.DEFAULT_CACHE),
                    help="folder of cached simulated pairs (shared with bench/gpu.py; default %(default)s)")
    ap.add_argument("--night", dest="night", action="store_true", default=True,
                    help="also time the default `nightsift run` (default)")
    ap.add_argument("--no-night", dest="night", action="store_false")
    ap.add_argument("--out", default=str(Path(__file__).with_name("chain.json")))
    args = ap.parse_args(argv)
    from nightsift.engine.backend import retain_host_memory

    retain_host_memory()  # as a night's worker does (config run.retain_host_memory)
    from nightsift.engine.pipeline import STAGES

    info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "versions": shared.versions(),
            "env": shared.run_env(),
            "command": "python bench/chain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "load_average_start": load_average(), "cpu_target_ratio": CPU_TARGET_RATIO}
    info["warm_up_s"] = warm_up(args.cache, args.instrument, args.seed)
    pairs = []
    loads = []
    for size in args.sizes:
        r = bench_pair(size, args.repeat, args.instrument, args.seed, args.cache)
        r["load_average_after"] = load_average()
        loads.append(r["load_average_after"])
        pairs.append(r)
        print(f"{size}x{size}: {r['per_visit_s']:.2f} s per visit, first visit {r['first_visit_s']:.2f} s, "
              f"plain ZOGY {r['plain_zogy_s']:.2f} s, ratio {r['ratio_per_visit_to_plain_zogy']:.2f}", file=sys.stderr)
    night = bench_night() if args.night else None
    info["load_average_end"] = load_average()

    print(f"| stage (s per CCD-visit) | " + " | ".join(f"{p['size']}^2" for p in pairs) + " |")
    print("|---|" + "---:|" * len(pairs))
    for k in STAGES:
        print(f"| {k} | " + " | ".join(_fmt(p["stages_s"][k]) for p in pairs) + " |")
    print("| **per visit** (process_visit, statics reused) | "
          + " | ".join(f"**{p['per_visit_s']:.2f}**" for p in pairs) + " |")
    print("| statics (prepare_statics, once per CCD) | " + " | ".join(f"{p['statics_s']:.2f}" for p in pairs) + " |")
    print("| first visit (statics + process_visit) | " + " | ".join(f"{p['first_visit_s']:.2f}" for p in pairs) + " |")
    print("| plain ZOGY (1 tile, true PSFs, float32) | " + " | ".join(f"{p['plain_zogy_s']:.2f}" for p in pairs) + " |")
    print("| **per visit / plain ZOGY** | "
          + " | ".join(f"**{p['ratio_per_visit_to_plain_zogy']:.2f}**" for p in pairs) + " |")
    print("| candidates | " + " | ".join(str(p["n_candidates"]) for p in pairs) + " |")
    print("| S_corr std (raw) | " + " | ".join(_fmt(p["scorr_std_raw"], ".3f") for p in pairs) + " |")
    print("| completeness S/N>=7 | " + " | ".join(
        "-" if p["completeness_snr7"] is None else f"{p['completeness_snr7']:.1%}" for p in pairs) + " |")
    print("| peak RSS (GiB) | " + " | ".join(f"{p['peak_rss_gib']:.2f}" for p in pairs) + " |")
    for p in pairs:
        if p["size"] == 4096:
            ok = p["ratio_per_visit_to_plain_zogy"] <= CPU_TARGET_RATIO
            print(f"\nCPU target (per visit <= {CPU_TARGET_RATIO} x plain ZOGY at 4096^2 on {os.cpu_count()} cores): "
                  f"{'MET' if ok else 'MISSED'} ({p['ratio_per_visit_to_plain_zogy']:.2f})")
    if night:
        s = night["summary"]
        print(f"\nnightsift run (default night, local engine): {night['wall_s']:.1f} s wall, "
              f"{s.get('n_done')}/{s.get('n_tasks')} CCD-visits, {s.get('n_alerts')} alerts, "
              f"completeness S/N>=7 {s.get('completeness_snr7', float('nan')):.1%}")
    print(f"load average: {info['load_average_start']:.1f} -> "
          + " -> ".join(f"{v:.1f}" for v in loads) + f" -> {info['load_average_end']:.1f} on {info['cpus']} cores")
    Path(args.out).write_text(json.dumps({"info": info, "stages": list(STAGES), "pairs": pairs, "night": night},
                                         indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
