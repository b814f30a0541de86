"""The simulation-to-sky gap of real/bogus models, side by side (issue #13's ablation table).

    python bench/realgap.py --models shipped /path/to/nightsift_rb.json ... \\
        --data nightsift-data-7 --units 400 --data-seed 7 --out bench/realgap.json

For each model (``shipped``, or a model metadata JSON written by ``nightsift train``):

* **simulated test CCDs**: the int8 model on the test split of the simulated dataset
  (``--data/--units/--data-seed``, built if missing), threshold chosen on its validation split for
  FNR <= 1% (confidence 0.9): AUCPR, FNR, FPR; the float model's AUCPR beside it (int8 - float);
* **real packets** (``nightsift evaluate --real``, int8, the model's own operating threshold):
  ROC AUC [bootstrap 95%] against the packets' own score (``ztf/alerts_drb``: drb;
  ``rubin/alerts``: reliability; ``ztf/alerts``: braai >= 0.5, scored here), on the bright-star
  population too, and the share of own-real alerts called bogus.

The real-data rule holds by construction: a packet whose candid is listed in the model's metadata
(``real_training_candids``: e.g. the teacher rows of ``train --teacher-packets``) is dropped by the kit,
and a set all of whose packets are listed is reported as ``trained on``, never measured.
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

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
#: (label, folder under ../shared/data, group key of the kit)
REAL_SETS = (("ztf drb", "ztf/alerts_drb", "ztf:drb"), ("ztf braai", "ztf/alerts", "ztf:rb"),
             ("rubin", "rubin/alerts", "rubin:reliability"))


def _model_json(name: str) -> str | None:
    return None if name == "shipped" else str(Path(name).resolve())


def simulated(model: str | None, args) -> dict:
    from nightsift.engine.classify.dataset import DatasetSpec
    from nightsift.engine.classify.evaluate import run_evaluation

    spec = DatasetSpec(n_units=args.units, seed=args.data_seed)
    res = run_evaluation(model=model, spec=spec, data_dir=args.data, out_dir=args.tmp / "sim", workers=args.workers,
                         progress=False, threshold_confidence=0.9, target_fnr=0.01)
    m = res["models"]
    out = {k: {"aucpr": m[k]["aucpr"], "fnr": m[k]["fnr"], "fpr": m[k]["fpr"], "threshold": m[k]["threshold"]}
           for k in m}
    if "int8" in out and "float" in out:
        out["aucpr_int8_minus_float"] = out["int8"]["aucpr"] - out["float"]["aucpr"]
    return out


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
    ref, called = ("vs_braai", "braai_real_called_bogus") if braai else ("vs_own", "own_real_called_bogus")

    def fig(m):
        v = m.get(ref) or {}
        return {"n": m["n"], "roc_auc": v.get("roc_auc"), "roc_auc_ci95": v.get("roc_auc_ci95"),
                "aucpr": v.get("aucpr"), "real_called_bogus": (m.get(called) or {}).get("fraction"),
                "real_called_bogus_ci95": (m.get(called) or {}).get("ci95")}

    bright = g["populations"]["bright_star"].get("bright")
    return {"against": "braai >= 0.5" if braai else f"{g['own_score']} >= 0.5", "dropped_trained": res["dropped_trained"],
            "overall": fig(g["overall"]), "bright": fig(bright) if bright else None}


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def table(rows: dict) -> str:
    lines = ["| model | sim int8 AUCPR | sim FNR | sim FPR | int8 - float | "
             + " | ".join(f"{lab} AUC [95%] | {lab} bright AUC | {lab} real called bogus" for lab, _, _ in REAL_SETS)
             + " |", "|---" * (5 + 3 * len(REAL_SETS)) + "|"]
    for name, r in rows.items():
        s = r["simulated"].get("int8", {})
        cells = [name, _f(s.get("aucpr"), 4), _f(s.get("fnr"), 4), _f(s.get("fpr"), 4),
                 _f(r["simulated"].get("aucpr_int8_minus_float"), 4)]
        for lab, _, _ in REAL_SETS:
            x = r["real"][lab]
            if x.get("trained_on"):
                cells += ["trained on", "-", "-"]
                continue
            o, b = x["overall"], x["bright"] or {}
            ci = o["roc_auc_ci95"] or [None, None]
            cells += [f"{_f(o['roc_auc'])} [{_f(ci[0], 2)}, {_f(ci[1], 2)}]", _f(b.get("roc_auc")),
                      _f(o["real_called_bogus"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["shipped"], help="'shipped' or model metadata JSONs")
    ap.add_argument("--data", default="nightsift-data", help="simulated dataset folder (built if missing)")
    ap.add_argument("--units", type=int, default=400)
    ap.add_argument("--data-seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
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
            rows[label] = {"model": model or "shipped", "simulated": simulated(model, args),
                           "real": {lab: real(model, folder, key, args) for lab, folder, key in REAL_SETS}}
            print(table({label: rows[label]}).splitlines()[-1], flush=True)
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
           "dataset": {"data": args.data, "units": args.units, "seed": args.data_seed},
           "rows": rows, "rule": "figures only on packets that touched no training of the model (the kit drops the rest)"}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(table(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
