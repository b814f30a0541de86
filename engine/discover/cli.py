"""The discover subcommands of ``nightsift`` (argument parsing and printing only):

    nightsift drift NIGHT_DIR [--reference DIR_OR_NPZ ...]   flag CCDs whose distributions moved
    nightsift label ALERT_DIR [--db labels.sqlite]           local labeling page (127.0.0.1 + token)
    nightsift retrospective [--holdout nuclear]              hold a class out, retrain, rank it by anomaly
    nightsift active-learning                                gain of a queue-chosen labeled batch vs a random one
    nightsift anomaly ALERTS --model anomaly.npz             write anomaly scores into the packets

:func:`add_subcommands` is called by :func:`nightsift.engine.cli.build_parser`.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_subcommands"]


def _load_config(args):
    from ..config import load_config

    return load_config(args.config)


def _reference(paths):
    from .drift import collect_night, load_samples, merge_samples

    nights = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            kept = p / "drift_samples.npz"
            nights.append(load_samples(kept) if kept.exists() else collect_night(p))
        else:
            nights.append(load_samples(p))
    return merge_samples(nights)


def cmd_drift(args) -> int:
    from .drift import collect_night, compare, plot_drift, save_samples

    cfg = _load_config(args)
    night_dir = Path(args.night)
    night = collect_night(night_dir)
    kept = save_samples(night_dir / "drift_samples.npz", night, meta={"night": str(night_dir)})
    reference = _reference(args.reference) if args.reference else None
    report = compare(night, reference, settings=cfg.discover)
    out = Path(args.out) if args.out else night_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(report.to_dict(), indent=1))
    png = plot_drift(report, night, reference, out / "drift.png")
    print(report.summary())
    print(f"kept this night's distributions: {kept}; report: {out / 'drift.json'}, plot: {png}")
    return 0


def _threshold(args, cfg) -> float:
    """The operating threshold: --threshold, else classify.threshold, else the model's, else 0.5."""
    if args.threshold is not None:
        return float(args.threshold)
    if cfg.classify.threshold >= 0:
        return float(cfg.classify.threshold)
    from ..errors import NightsiftError

    try:
        from ..classify.runtime import resolve_model

        spec = resolve_model(cfg.classify)
    except (NightsiftError, ImportError, OSError):
        spec = None
    return float(spec.threshold) if spec is not None and 0 < spec.threshold < 1 else 0.5


def _user(args) -> str:
    import getpass

    if args.user:
        return args.user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cmd_label(args) -> int:
    import sys

    from .app import make_server

    cfg = _load_config(args)
    weight = args.weight if args.weight is not None else cfg.discover.label_uncertainty_weight
    srv = make_server(args.alerts, args.db, user=_user(args), threshold=_threshold(args, cfg), port=args.port,
                      weight=weight)
    q = srv.queue
    p = q.progress()
    print(f"nightsift label: {len(q)} alerts from {args.alerts}, {p['labeled']} already labeled in {args.db}; "
          f"user {q.user}, threshold {q.threshold:.3g}")
    print(f"open {srv.url}", flush=True)
    print("(Ctrl-C stops the server)", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    p = q.progress()
    print(f"labeled {p['labeled']} of {p['total']}: " + ", ".join(f"{k} {v}" for k, v in p["by_label"].items()))
    return 0


#: the small CNN of ``nightsift retrospective --tiny`` (fast; the anomaly signal comes mostly from features)
TINY_MODEL = {"filters": (8, 16), "dense": 32}


def cmd_retrospective(args) -> int:
    from ..classify.dataset import DatasetSpec
    from .retrospective import run_retrospective

    cfg = _load_config(args)
    kw = {"n_units": args.units, "size": args.size, "seed": args.data_seed, "test_fraction": args.test_fraction,
          "profiles": tuple(args.profiles.split(",")) if args.profiles else None,
          "transients": tuple(int(v) for v in args.transients.split(",")) if args.transients else None}
    spec = DatasetSpec(**{k: v for k, v in kw.items() if v is not None})
    rep = run_retrospective(holdout=args.holdout, spec=spec, data_dir=args.data, out_dir=args.out, method=args.method,
                            epochs=args.epochs, seed=args.seed, threads=args.threads, workers=args.workers,
                            n_components=args.components, model_kwargs=TINY_MODEL if args.tiny else None,
                            config=cfg, progress=not args.quiet, keep_embeddings=args.keep_embeddings)
    print(f"held out '{rep['holdout']}': {rep['n_removed_from_training']} events removed from training; "
          f"held-out night: {rep['n_night']} candidates, {rep['n_night_target']} of them '{rep['holdout']}'")
    print(f"{'ranking':22s} {'median pct':>10s} {'recall@1%':>10s} {'recall@5%':>10s} {'AUC':>6s}")
    rows = [("random", rep["random"])] + [(k, v) for k, v in rep["rank"].items()]
    if rep.get("rank_among_called_real"):
        rows.append(("anomaly, rb >= thr", rep["rank_among_called_real"]))
    for name, r in rows:
        print(f"{name:22s} {r.get('median_percentile', float('nan')):10.3f} {r.get('recall_top_1pct', float('nan')):10.3f} "
              f"{r.get('recall_top_5pct', float('nan')):10.3f} {r.get('auc', float('nan')):6.3f}")
    print(f"written: {Path(args.out) / 'retrospective.json'}, retrospective.png, anomaly.npz, rb_holdout.keras "
          f"({rep['wall_s']:.0f} s)")
    return 0


def cmd_active(args) -> int:
    from ..classify.dataset import DatasetSpec
    from .active import run_active_learning

    cfg = _load_config(args)
    kw = {"n_units": args.units, "size": args.size, "seed": args.data_seed,
          "profiles": tuple(args.profiles.split(",")) if args.profiles else None}
    spec = DatasetSpec(**{k: v for k, v in kw.items() if v is not None})
    rep = run_active_learning(spec=spec, data_dir=args.data, out_dir=args.out, initial_fraction=args.initial_fraction,
                              batch_size=args.batch, seeds=tuple(range(args.seeds)), weight=args.weight,
                              epochs=args.epochs, model_kwargs=TINY_MODEL if args.tiny else None,
                              target_fnr=args.target_fnr, threads=args.threads, workers=args.workers, config=cfg,
                              progress=not args.quiet)
    print(f"initial model on {args.initial_fraction:.0%} of the training CCD-visits; batches of {args.batch} "
          f"candidates from the pool; {len(rep['runs'])} seeds; test split {rep['n_test']} candidates")
    print(f"{'seed':>4s} {'model':16s} {'AUCPR':>7s} {'ROC AUC':>7s} {'FNR':>6s} {'FPR':>6s}  batch real")
    for r in rep["runs"]:
        for name in ("initial", "initial+queue", "initial+random"):
            m = r[name]
            frac = r.get(f"{name.split('+')[-1]}_batch_real_fraction")
            print(f"{r['seed']:4d} {name:16s} {m['aucpr']:7.4f} {m['roc_auc']:7.4f} {m['fnr']:6.3f} {m['fpr']:6.3f}"
                  + (f"  {frac:.2f}" if frac is not None and "+" in name else ""))
    g = rep["gain"]
    print("gain of the queue batch over the random batch (mean +- sd over seeds): "
          + ", ".join(f"{k} {v['queue_minus_random_mean']:+.4f} +- {v['queue_minus_random_sd']:.4f}" for k, v in g.items()))
    print(f"written: {Path(args.out) / 'active_learning.json'} ({rep['wall_s']:.0f} s)")
    return 0


def cmd_anomaly(args) -> int:
    from .anomaly import annotate_alerts

    cfg = _load_config(args)
    model = args.model or cfg.discover.anomaly_model
    if not model:
        from ..errors import ConfigError

        raise ConfigError("nightsift anomaly needs --model (or discover.anomaly_model): an anomaly.npz from "
                          "nightsift retrospective")
    r = annotate_alerts(args.alerts, model, rb_model=args.rb_model)
    q = r["score_quantiles"]
    print(f"anomaly_score written to {r['n_alerts']} alerts in {r['n_files']} files"
          + (f" (median {q['0.5']:.3g}, 90% {q['0.9']:.3g}, 99% {q['0.99']:.3g})" if q else ""))
    return 0


def add_subcommands(sub) -> None:
    """Register ``drift`` (and the other discover commands) on an argparse subparsers object."""
    d = sub.add_parser("drift", help="flag CCDs whose score/feature distributions shifted against a reference")
    d.add_argument("night", help="a night's output folder (alert files visit*_ccd*.avro, records/)")
    d.add_argument("--reference", nargs="+", metavar="DIR_OR_NPZ",
                   help="earlier nights (folders or their drift_samples.npz), merged per CCD; default: "
                        "the other CCDs of the same night")
    d.add_argument("--out", help="folder for drift.json and drift.png (default: the night's folder)")
    d.set_defaults(func=cmd_drift)

    lab = sub.add_parser("label", help="label alerts real/bogus/interesting in a local web page (127.0.0.1, token)")
    lab.add_argument("alerts", help="an alert .avro file or a folder of them")
    lab.add_argument("--db", default="labels.sqlite", help="SQLite label database (created; default labels.sqlite)")
    lab.add_argument("--user", help="name recorded with each label (default: the login name)")
    lab.add_argument("--threshold", type=float,
                     help="operating threshold of the real/bogus score (default: classify.threshold or the model's)")
    lab.add_argument("--weight", type=float, help="weight of uncertainty vs anomaly in the ranking (default 0.5)")
    lab.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    lab.set_defaults(func=cmd_label)

    from .retrospective import HOLDOUT_KINDS

    r = sub.add_parser("retrospective", help="hold a class of real events out of training, retrain, and see where "
                                              "the held-out night ranks them by anomaly score")
    r.add_argument("--holdout", default="nuclear", choices=HOLDOUT_KINDS, help="real-event kind held out (nuclear)")
    r.add_argument("--data", default="nightsift-data", help="dataset cache folder (default nightsift-data)")
    r.add_argument("--units", type=int, help="simulated CCD-visits (default 60)")
    r.add_argument("--size", type=int, help="CCD side in pixels (default 512)")
    r.add_argument("--profiles", help="instrument profiles, comma-separated (default ztf,decam)")
    r.add_argument("--transients", help="transients per CCD-visit as LO,HI (default 50,90)")
    r.add_argument("--test-fraction", type=float, help="share of CCD-visits in the held-out night (default 0.3)")
    r.add_argument("--data-seed", type=int, help="seed of the simulated dataset (default 44)")
    r.add_argument("--method", default="knn", choices=("knn", "iforest"), help="outlier measure (default knn)")
    r.add_argument("--components", type=int, default=4, help="principal components of the embedding (default 4)")
    r.add_argument("--epochs", type=int, default=15)
    r.add_argument("--tiny", action="store_true", help="a small CNN (filters 8/16, embedding 32): fast")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, help="TensorFlow CPU threads")
    r.add_argument("--workers", type=int, default=1, help="processes simulating CCDs")
    r.add_argument("--out", default="nightsift-retro", help="folder for the report, plot and models")
    r.add_argument("--keep-embeddings", action="store_true", help="also write embeddings.npz")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_retrospective)

    a = sub.add_parser("active-learning", help="gain of a labeled batch chosen by the labeling queue over a random "
                                                "batch of the same size (simulated expert)")
    a.add_argument("--data", default="nightsift-data", help="dataset cache folder (default nightsift-data)")
    a.add_argument("--units", type=int, help="simulated CCD-visits (default 40)")
    a.add_argument("--size", type=int, help="CCD side in pixels (default 384)")
    a.add_argument("--profiles", help="instrument profiles, comma-separated (default decam,ztf,lsst)")
    a.add_argument("--data-seed", type=int, help="seed of the simulated dataset")
    a.add_argument("--initial-fraction", type=float, default=0.3, help="share of training CCD-visits the first "
                                                                        "model sees (the rest is the pool)")
    a.add_argument("--batch", type=int, default=200, help="candidates labelled per batch (default 200)")
    a.add_argument("--seeds", type=int, default=3, help="repetitions (default 3)")
    a.add_argument("--weight", type=float, default=0.5, help="queue: weight of uncertainty vs anomaly (0.5)")
    a.add_argument("--epochs", type=int, default=10)
    a.add_argument("--tiny", action="store_true", help="a small CNN (filters 8/16, embedding 32): fast")
    a.add_argument("--target-fnr", type=float, default=0.01)
    a.add_argument("--threads", type=int)
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--out", default="nightsift-active")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_active)

    n = sub.add_parser("anomaly", help="write anomaly scores into alert packets (candidate.anomaly_score)")
    n.add_argument("alerts", help="an alert .avro file or a folder of them (rewritten in place, atomically)")
    n.add_argument("--model", help="anomaly model .npz (default discover.anomaly_model)")
    n.add_argument("--rb-model", help="the .keras CNN the anomaly model was fitted with (default: recorded in it)")
    n.set_defaults(func=cmd_anomaly)
