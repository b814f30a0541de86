"""The discover subcommands of ``nightsift`` (argument parsing and printing only):

    nightsift drift NIGHT_DIR [--reference DIR_OR_NPZ ...]   flag CCDs whose distributions moved
    nightsift label ALERT_DIR [--db labels.sqlite]           local labeling page (127.0.0.1 + token)
    nightsift retrospective                                  hold a class out, retrain, rank it by anomaly

:func:`add_subcommands` is called by :func:`nightsift.engine.cli.build_parser`.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_subcommands"]


def _load_config(args):
    from ..config import load_config

    return load_config(args.config)


def _settings(cfg):
    from .drift import DriftSettings

    d = getattr(cfg, "discover", None)
    if d is None:
        return DriftSettings()
    return DriftSettings(psi_threshold=d.drift_psi_threshold, ks_alpha=d.drift_ks_alpha, z_threshold=d.drift_z_threshold,
                         null_factor=d.drift_null_factor, min_candidates=d.drift_min_candidates,
                         min_groups=d.drift_min_groups)


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
    report = compare(night, reference, settings=_settings(cfg))
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
    d = getattr(cfg, "discover", None)
    weight = args.weight if args.weight is not None else (d.label_uncertainty_weight if d is not None else 0.5)
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
