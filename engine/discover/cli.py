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


def add_subcommands(sub) -> None:
    """Register ``drift`` (and the other discover commands) on an argparse subparsers object."""
    d = sub.add_parser("drift", help="flag CCDs whose score/feature distributions shifted against a reference")
    d.add_argument("night", help="a night's output folder (alert files visit*_ccd*.avro, records/)")
    d.add_argument("--reference", nargs="+", metavar="DIR_OR_NPZ",
                   help="earlier nights (folders or their drift_samples.npz), merged per CCD; default: "
                        "the other CCDs of the same night")
    d.add_argument("--out", help="folder for drift.json and drift.png (default: the night's folder)")
    d.set_defaults(func=cmd_drift)
