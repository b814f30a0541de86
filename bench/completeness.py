"""Injection-recovery: completeness of the chain versus magnitude and expected S/N, with a plot.

    python bench/completeness.py                     # 3 profiles x 2 CCDs of 1024^2, 80 transients each
    python bench/completeness.py --profiles decam --ccds 4 --size 2048

Simulates CCD pairs with transients from ~5 mag above to 0.3 mag below the 5-sigma limit (isolated,
on galaxy nuclei, variable stars), runs the full chain from raw frames, matches candidates to the truth
within 2 px (sign included) and reports completeness per bin of expected S/N (true flux over the chain's
own flux-error map) and of magnitude relative to the limit, overall and at S/N >= 7 (transients with a
masked pixel in their 5x5 box are counted separately). Prints a table, writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def run(profiles, n_ccds, size, n_transients, seed):
    from nightsift.engine.config import Config
    from nightsift.engine.pipeline import process_ccd
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.calibrate import make_master
    from nightsift.engine.truth import expected_snr, match_candidates

    cfg = Config()
    rows = []
    for p_i, profile in enumerate(profiles):
        for ccd in range(n_ccds):
            sim = simulate_ccd_pair(profile, shape=(size, size), seed=seed + 100 * p_i, ccd=ccd,
                                    n_transients=n_transients)
            master = make_master(sim.calibration, header=sim.science_raw.header, config=cfg.calibrate)
            res = process_ccd(sim.science_raw, master, sim.reference, config=cfg, write=False, keep_products=True)
            m = match_candidates(res.candidates, sim.transients)
            snr = expected_snr(sim.transients, res.products.subtraction.flux_err)
            t = sim.transients
            for i in range(len(t)):
                rows.append({"profile": profile, "ccd": ccd, "kind": str(t["kind"][i]), "mag": float(t["mag"][i]),
                             "dmag": float(t["mag"][i] - sim.meta["maglim_sci"]), "snr": float(snr[i]),
                             "masked": bool(t["masked"][i]), "found": bool(m.found[i])})
            print(f"{profile} ccd {ccd}: {int(m.found.sum())}/{len(t)} found, {len(res.candidates)} candidates",
                  file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="decam,ztf,lsst")
    ap.add_argument("--ccds", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--transients", type=int, default=80)
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--out", default=str(Path(__file__).with_name("completeness.json")))
    ap.add_argument("--plot", default=str(Path(__file__).with_name("completeness.png")))
    args = ap.parse_args(argv)
    from nightsift.engine.truth import completeness_curve, plot_completeness

    t0 = time.perf_counter()
    rows = run(args.profiles.split(","), args.ccds, args.size, args.transients, args.seed)
    wall = time.perf_counter() - t0
    found = np.array([r["found"] for r in rows])
    snr = np.array([r["snr"] for r in rows])
    dmag = np.array([r["dmag"] for r in rows])
    masked = np.array([r["masked"] for r in rows])
    clean = ~masked
    bins = np.array([0, 3, 4, 5, 6, 7, 10, 20, 50, 1e9])
    c, f, n = completeness_curve(snr[clean], found[clean], bins)
    print("| expected S/N | transients | completeness |")
    print("|---|---:|---:|")
    for lo, hi, fi, ni in zip(bins[:-1], bins[1:], f, n):
        print(f"| {lo:g}-{hi:g} | {ni} | {fi:.1%} |" if ni else f"| {lo:g}-{hi:g} | 0 | - |")
    k7 = clean & (snr >= 7)
    summary = {"n": len(rows), "n_clean": int(clean.sum()), "completeness_snr7": float(found[k7].mean()),
               "n_snr7": int(k7.sum()), "completeness_snr7_masked": float(found[masked & (snr >= 7)].mean())
               if (masked & (snr >= 7)).any() else None, "wall_s": wall}
    for kind in sorted({r["kind"] for r in rows}):
        sel = k7 & np.array([r["kind"] == kind for r in rows])
        summary[f"completeness_snr7_{kind}"] = float(found[sel].mean()) if sel.any() else None
    print(f"\ncompleteness at S/N >= 7: {summary['completeness_snr7']:.1%} of {summary['n_snr7']} "
          f"(unmasked); with a masked pixel in the 5x5 box: {summary['completeness_snr7_masked']}")
    cmd = "python bench/completeness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).write_text(json.dumps({"command": cmd, "date": time.strftime("%Y-%m-%d"), "summary": summary,
                                          "bins_snr": bins.tolist(), "completeness": [None if np.isnan(x) else x for x in f],
                                          "counts": n.tolist(), "rows": rows}, indent=1))
    plot_completeness(dmag[clean], found[clean], snr[clean], path=args.plot,
                      title=f"Injection recovery ({args.profiles}, {args.ccds} CCDs each of {args.size}^2)",
                      mag_label="magnitude - ideal 5-sigma limit of the epoch")
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
