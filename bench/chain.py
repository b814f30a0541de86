"""Wall time of the production chain per CCD pair, stage by stage, on this machine (numpy backend).

    python bench/chain.py                       # 2048^2 and 4096^2 DECam-like pairs + `nightsift run`
    python bench/chain.py --sizes 1024 --no-night --repeat 1

For each size it simulates one pair (not timed), then times ``process_ccd`` (calibrate, align, PSF
x2, ZOGY, detect, package, write) ``--repeat`` times and reports the median per stage, the total,
peak RSS and the S_corr/completeness QA of the run (so a speed-up that breaks the numbers shows).
``--night`` also times the default ``nightsift run`` (3 visits x 2 CCDs of 1024^2, local engine) as a
subprocess. Prints a table and writes JSON (``--out``, default bench/chain.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("calibrate", "align", "psf_sci", "psf_ref", "subtract", "detect", "package", "write")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def bench_pair(size: int, repeat: int, instrument: str, seed: int) -> dict:
    from nightsift.engine.config import Config
    from nightsift.engine.pipeline import process_ccd
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.calibrate import make_master
    from nightsift.engine.truth import expected_snr, match_candidates

    t0 = time.perf_counter()
    sim = simulate_ccd_pair(instrument, shape=(size, size), seed=seed, n_transients=max(30, size // 32))
    t_sim = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        cfg = Config().replace(package={"output_dir": out})
        master = make_master(sim.calibration, header=sim.science_raw.header, config=cfg.calibrate)
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            res = process_ccd(sim.science_raw, master, sim.reference, config=cfg, visit=0, ccd=0,
                              keep_products=True)
            runs.append((time.perf_counter() - t0, res))
    totals = [t for t, _ in runs]
    res = runs[int(np.argsort(totals)[len(totals) // 2])][1]
    stages = {k: float(np.median([r.qa.get(f"t_{k}", 0.0) for _, r in runs])) for k in STAGES}
    m = match_candidates(res.candidates, sim.transients)
    snr = expected_snr(sim.transients, res.products.subtraction.flux_err)
    return {"size": size, "instrument": instrument, "repeat": repeat, "simulate_s": t_sim,
            "total_s": float(np.median(totals)), "stages_s": stages, "n_candidates": int(len(res.candidates)),
            "scorr_std_raw": res.qa.get("scorr_std_raw"), "n_tiles": res.qa.get("n_tiles"),
            "completeness_snr7": float(m.found[snr >= 7].mean()) if (snr >= 7).any() else None,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bench_night() -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "nightsift.engine.cli", "run", "--engine", "local", "--quiet", "--out", out]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        summary = json.loads((Path(out) / "night_summary.json").read_text()) if p.returncode == 0 else {}
    return {"command": "nightsift run --engine local", "wall_s": wall, "returncode": p.returncode,
            "summary": summary, "stdout": p.stdout[-2000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--instrument", default="decam")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--night", dest="night", action="store_true", default=True)
    ap.add_argument("--no-night", dest="night", action="store_false")
    ap.add_argument("--out", default=str(Path(__file__).with_name("chain.json")))
    args = ap.parse_args(argv)

    info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "command": "python bench/chain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "load_average_start": load_average()}
    pairs = []
    for size in args.sizes:
        r = bench_pair(size, args.repeat, args.instrument, args.seed)
        pairs.append(r)
        print(f"{size}x{size}: {r['total_s']:.2f} s per pair", file=sys.stderr)
    night = bench_night() if args.night else None
    info["load_average_end"] = load_average()

    head = f"| stage | " + " | ".join(f"{p['size']}^2 (s)" for p in pairs) + " |"
    print(head)
    print("|---|" + "---:|" * len(pairs))
    for k in STAGES:
        print(f"| {k} | " + " | ".join(f"{p['stages_s'][k]:.2f}" for p in pairs) + " |")
    print("| **total** | " + " | ".join(f"**{p['total_s']:.2f}**" for p in pairs) + " |")
    print("| candidates | " + " | ".join(str(p["n_candidates"]) for p in pairs) + " |")
    print("| S_corr std (raw) | " + " | ".join(f"{p['scorr_std_raw']:.3f}" for p in pairs) + " |")
    print("| completeness S/N>=7 | " + " | ".join(f"{p['completeness_snr7']:.1%}" for p in pairs) + " |")
    print("| peak RSS (GiB) | " + " | ".join(f"{p['peak_rss_gib']:.2f}" for p in pairs) + " |")
    if night:
        s = night["summary"]
        print(f"\nnightsift run (default night, local engine): {night['wall_s']:.1f} s wall, "
              f"{s.get('n_done')}/{s.get('n_tasks')} CCD-visits, {s.get('n_alerts')} alerts, "
              f"completeness S/N>=7 {s.get('completeness_snr7', float('nan')):.1%}")
    print(f"load average: {info['load_average_start']:.1f} -> {info['load_average_end']:.1f} on {info['cpus']} cores")
    Path(args.out).write_text(json.dumps({"info": info, "pairs": pairs, "night": night}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
