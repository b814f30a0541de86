"""The simulation-to-sky gap of real/bogus models, side by side (issue #13's ablation table).

    python bench/realgap.py --models shipped /path/to/nightsift_rb.json ... \\
        --data nightsift-data-7 --units 400 --data-seed 7 --out bench/realgap.json

For each model (``shipped``, or a model metadata JSON written by ``nightsift train``):

* **simulated test CCDs**: the int8 model on the test split of the simulated dataset
  (``--data/--units/--data-seed``, built if missing), threshold chosen on its validation split for
  FNR <= 1% (confidence 0.9): AUCPR, FNR, FPR; the float model's AUCPR beside it (int8 - float).
  Twice: as simulated so far (``sim``), and with the star changes of ``--star-psf-scatter`` and
  ``--proper-motion`` (``sim+stars``: colour-dependent PSFs and proper motions leave residuals on
  bright stars, the bogus class real packets are full of; with ``--bright-variables`` also the
  matching real class, variable bright stars);
* **real packets** (``nightsift evaluate --real``, int8, the model's own operating threshold):
  ROC AUC [bootstrap 95%] against the packets' own score (``ztf/alerts_drb``: drb;
  ``rubin/alerts``: reliability; ``ztf/alerts``: braai >= 0.5, scored here), on the bright-star
  population too, and the share of own-real alerts called bogus.

With two or more models, each model is also compared with the first on the same packets: ROC AUC
difference with a **paired** bootstrap 95% interval (the rows drawn once for both), overall and on
the bright-star population, leaving out every packet that touched the training of any model compared.
The sets are small (``ztf/alerts_drb``: 10 drb-bogus of 137; its bright-star population 1 of 18), so
the paired interval is what says whether a change helped.

The real-data rule holds by construction: a packet whose candid is listed in the model's metadata
(``real_training_candids``: e.g. the teacher rows of ``train --teacher-packets``) is dropped by the kit,
and a set all of whose packets are listed is reported as ``trained on``, never measured. The count
``(n)`` says what is left: a teacher-trained model leaves only the ``ztf/alerts`` packets braai was
unsure of (score within the margin), a selected subset.
Needs the real data in ``../shared/data`` and the ``ml`` extra (TensorFlow, LiteRT).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
#: (label, folder under ../shared/data, group key of the kit)
REAL_SETS = (("ztf drb", "ztf/alerts_drb", "ztf:drb"), ("ztf braai", "ztf/alerts", "ztf:rb"),
             ("rubin", "rubin/alerts", "rubin:reliability"))


def _model_json(name: str) -> str | None:
    return None if name == "shipped" else str(Path(name).resolve())


def simulated(model: str | None, args, stars: bool) -> dict:
    from nightsift.engine.classify.dataset import DatasetSpec
    from nightsift.engine.classify.evaluate import run_evaluation

    extra = _star_split(args) if stars else {}
    spec = DatasetSpec(n_units=args.units, seed=args.data_seed, **extra)
    res = run_evaluation(model=model, spec=spec, data_dir=args.data, out_dir=args.tmp / "sim", workers=args.workers,
                         progress=False, threshold_confidence=0.9, target_fnr=0.01)
    m = res["models"]
    out = {k: {f: m[k]["overall"][f] for f in ("aucpr", "roc_auc", "fnr", "fpr", "threshold")}
           for k in m}
    if "int8" in out and "float" in out:
        out["aucpr_int8_minus_float"] = out["int8"]["aucpr"] - out["float"]["aucpr"]
    return out


def _star_split(args) -> dict:
    """The simulation options of the second simulated test split."""
    return {"star_psf_scatter": args.star_psf_scatter, "proper_motion": args.proper_motion,
            "bright_variables": args.bright_variables}


def real(model: str | None, folder: str, key: str, args) -> dict:
    from nightsift.engine.classify.realeval import evaluate_real
    from nightsift.engine.config import ClassifyConfig
    from nightsift.engine.errors import InputError

    cfg = ClassifyConfig(**({"model": model} if model else {}))
    braai = str(SHARED / "ztf" / "braai") if key == "ztf:rb" else None
    try:
        res = evaluate_real(SHARED / folder, config=cfg, braai_model=braai, n_boot=args.bootstrap)
    except InputError as e:
        if "touched training" in str(e):
            return {"trained_on": True, "note": str(e)}
        raise
    g = res["groups"][key]
    ref, who = ("vs_braai", "braai") if braai else ("vs_own", "own")

    def fig(m):
        v = m.get(ref) or {}
        return {"n": m["n"], "roc_auc": v.get("roc_auc"), "roc_auc_ci95": v.get("roc_auc_ci95"),
                "aucpr": v.get("aucpr"), **{f"{side}{k}": (m.get(f"{who}_{side}") or {}).get(f)
                                            for side in ("real_called_bogus", "bogus_called_real")
                                            for k, f in (("", "fraction"), ("_ci95", "ci95"))}}

    bright = g["populations"]["bright_star"].get("bright")
    return {"against": "braai >= 0.5" if braai else f"{g['own_score']} >= 0.5", "dropped_trained": res["dropped_trained"],
            "overall": fig(g["overall"]), "bright": fig(bright) if bright else None}


def paired(models: list[str | None], labels: list[str], folder: str, key: str, args) -> dict:
    """Each model's ROC AUC minus the first model's on the same packets, with paired bootstrap
    intervals, overall and on the bright-star population. Packets that touched the training of
    any of the models compared are left out of every comparison (the rule, applied to the union)."""
    from nightsift.engine.classify.crossdomain import _braai_scores
    from nightsift.engine.classify.metrics import paired_auc_difference
    from nightsift.engine.classify.realeval import drop_trained, populations, training_candids
    from nightsift.engine.classify.runtime import load_scorer, resolve_model
    from nightsift.engine.config import ClassifyConfig
    from nightsift.engine.io.packets import read_packets

    cfgs = [ClassifyConfig(**({"model": m} if m else {})) for m in models]
    trained = set().union(*(training_candids(resolve_model(c).metadata) for c in cfgs))
    ps = read_packets(SHARED / folder, keep_stamps=key == "ztf:rb")
    keep = drop_trained(ps.records, trained)
    if key == "ztf:rb":
        ref = np.asarray(_braai_scores(ps, str(SHARED / "ztf" / "braai"), False, []), np.float64)[keep]
    else:
        ref = np.array([r["own_score"] for r in ps.records], np.float64)[keep]
    recs, trips = [ps.records[i] for i in keep], ps.triplets[keep]
    y = ref >= 0.5
    bright = np.array(populations(recs, trips)["bright_star"]) == "bright"
    scores = [np.asarray(load_scorer(c).score(trips), np.float64) for c in cfgs]
    out = {"n": int(len(keep)), "left_out_trained": int(len(ps.records) - len(keep)), "vs_" + labels[0]: {}}
    for lab, s in zip(labels[1:], scores[1:]):
        out["vs_" + labels[0]][lab] = {
            "overall": paired_auc_difference(y, scores[0], s, n_boot=args.bootstrap),
            "bright": paired_auc_difference(y[bright], scores[0][bright], s[bright], n_boot=args.bootstrap)}
    return out


def paired_table(comp: dict, base: str) -> str:
    out = [f"| model - {base} | " + " | ".join(f"{lab}: dAUC [95%] (n) | bright dAUC [95%]" for lab in comp) + " |",
           "|---" * (1 + 2 * len(comp)) + "|"]
    names = list(next(iter(comp.values()))["vs_" + base])
    for name in names:
        cells = [name]
        for lab, c in comp.items():
            for part in ("overall", "bright"):
                d = c["vs_" + base][name][part]
                ci = d["delta_ci95"] or [None, None]
                n = f" ({c['n']})" if part == "overall" else ""
                cells.append("-" if d["delta"] is None else f"{d['delta']:+.3f} [{_f(ci[0], 2)}, {_f(ci[1], 2)}]{n}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def table(rows: dict) -> str:
    """Two markdown tables: the simulated test splits, then the real packets."""
    sims = list(next(iter(rows.values()))["simulated"])
    out = ["| model | " + " | ".join(f"{k}: int8 AUCPR | FNR | FPR | int8 - float" for k in sims) + " |",
           "|---" * (1 + 4 * len(sims)) + "|"]
    for name, r in rows.items():
        cells = [name]
        for k in sims:
            s = r["simulated"][k]
            cells += [_f(s["int8"]["aucpr"], 4), _f(s["int8"]["fnr"], 4), _f(s["int8"]["fpr"], 4),
                      _f(s.get("aucpr_int8_minus_float"), 4)]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| model | " + " | ".join(f"{lab}: AUC [95%] | bright AUC | real called bogus | bogus called real"
                                          for lab, _, _ in REAL_SETS) + " |",
            "|---" * (1 + 4 * len(REAL_SETS)) + "|"]
    for name, r in rows.items():
        cells = [name]
        for lab, _, _ in REAL_SETS:
            x = r["real"][lab]
            if x.get("trained_on"):
                cells += ["trained on", "-", "-", "-"]
                continue
            o, b = x["overall"], x["bright"] or {}
            ci = o["roc_auc_ci95"] or [None, None]
            cells += [f"{_f(o['roc_auc'])} [{_f(ci[0], 2)}, {_f(ci[1], 2)}] ({o['n']})", _f(b.get("roc_auc")),
                      _f(o["real_called_bogus"]), _f(o.get("bogus_called_real"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["shipped"], help="'shipped' or model metadata JSONs")
    ap.add_argument("--data", default="nightsift-data", help="simulated dataset folder (built if missing)")
    ap.add_argument("--units", type=int, default=400)
    ap.add_argument("--data-seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--star-psf-scatter", type=float, default=0.04,
                    help="the second simulated test split: star PSF scatter (0 with --proper-motion 0: none)")
    ap.add_argument("--proper-motion", type=float, default=0.01)
    ap.add_argument("--bright-variables", type=float, default=0.0,
                    help="the second simulated test split: share of variable stars on bright stars (default 0)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default="bench/realgap.json")
    args = ap.parse_args(argv)
    if not SHARED.exists():
        print(f"real data {SHARED} not present (../shared/data beside the clone)", file=sys.stderr)
        return 2
    import tempfile

    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        for name in args.models:
            model = _model_json(name)
            label = name if name == "shipped" else Path(name).parent.name
            sims = {"sim": simulated(model, args, False)}
            if args.star_psf_scatter or args.proper_motion or args.bright_variables:
                sims["sim+stars"] = simulated(model, args, True)
            rows[label] = {"model": model or "shipped", "simulated": sims,
                           "real": {lab: real(model, folder, key, args) for lab, folder, key in REAL_SETS}}
            print(f"{label}: done", flush=True)
    labels = list(rows)
    comp = {}
    if len(labels) > 1:
        models = [_model_json(m) for m in args.models]
        comp = {lab: paired(models, labels, folder, key, args) for lab, folder, key in REAL_SETS}
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
           "dataset": {"data": args.data, "units": args.units, "seed": args.data_seed,
                       "sim+stars": _star_split(args)},
           "rows": rows, "paired": comp, "rule": "figures only on packets that touched no training of the model (the kit drops the rest)"}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(table(rows))
    if comp:
        print()
        print(paired_table(comp, labels[0]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
