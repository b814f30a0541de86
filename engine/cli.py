"""``nightsift`` command line: argument parsing and progress display only.

    nightsift run                       simulate a small night, process it, write alerts, summarise
    nightsift run --address auto        the same on the Ray cluster this node belongs to
    nightsift run --input DIR           a night over a folder of FITS files (--preset decam|ztf|lsst)
    nightsift subtract SCI.fits REF.fits  run the chain on your own calibrated FITS pair
    nightsift simulate                  write simulated raw/calibration/reference FITS files
    nightsift score PACKETS...          score ZTF or Rubin alert packets with nightsift's classifier; ROC AUC /
                                        AUCPR / agreement against the packets' own drb, rb or reliability
                                        (and braai with --braai); `score-ztf` is an alias
    nightsift drift NIGHT_DIR           flag CCDs whose score/feature distributions shifted
    nightsift label ALERT_DIR           label alerts in a local web page (real / bogus / interesting)
    nightsift retrospective             hold a class of real events out, retrain, rank it by anomaly
    nightsift train                     simulate labelled triplets, train the real/bogus CNN, export int8
    nightsift evaluate                  AUCPR, FNR/FPR at the operating threshold, breakdowns, cross-domain
    nightsift evaluate --real PACKETS...  the same on real ZTF/Rubin packets against their own scores, by population
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import load_config
from .errors import NightsiftError

log = logging.getLogger("nightsift")


def _config(args, **sections):
    over = {k: v for k, v in sections.items() if v}
    return load_config(args.config, **over)


def _night_engine(cfg) -> str:
    """The night engine ``[run] engine`` asks for: "ray" or "local" ("auto": Ray when installed)."""
    from .errors import ConfigError
    from .orchestration.ray_engine import ray_available

    if cfg.run.engine == "local":
        return "local"
    if ray_available():
        return "ray"
    if cfg.run.engine == "ray":
        raise ConfigError("run.engine = 'ray' but Ray is not installed: pip install 'nightsift[cluster]', "
                          "or use --engine local")
    return "local"


def cmd_run(args) -> int:
    from .io.atomic import check_output_dir

    sim = {k: v for k, v in {"n_visits": args.visits, "n_ccds": args.ccds, "instrument": args.instrument,
                             "seed": args.seed, "ny": args.size, "nx": args.size}.items() if v is not None}
    run = {k: v for k, v in {"engine": args.engine, "address": args.address, "workers": args.workers}.items()
           if v is not None}
    inp = {k: v for k, v in {"dir": args.input, "preset": args.preset}.items() if v is not None}
    cfg = _config(args, simulate=sim, package={"output_dir": args.out} if args.out else None, run=run,
                  input=inp | ({"resume": False} if args.redo else {}))
    check_output_dir(cfg.package.output_dir)  # before any work: not after a whole night
    s = cfg.simulate
    engine = _night_engine(cfg)
    _night_checks(cfg, engine)
    on = (f"alerts -> {cfg.package.output_dir}/  [engine: {engine}"
          f"{', ' + (cfg.run.address or 'local Ray') if engine == 'ray' else ''}]")
    if cfg.input.dir:
        source, tasks, done = _folder_night(cfg, on)
    else:
        source, tasks, done = None, None, []
        print(f"nightsift: simulated night, {s.n_visits} visits x {s.n_ccds} CCDs of {s.ny}x{s.nx} px "
              f"({s.instrument}), {on}")
    summary, report = _run_night(cfg, engine, args, source, tasks, done)
    print(f"CCD-visits: {summary.n_done} done{f' ({len(done)} in an earlier run)' if done else ''}, "
          f"{summary.n_failed} failed, {summary.n_skipped} skipped of {summary.n_tasks} in {summary.wall_s:.1f} s")
    if summary.n_truth:
        print(f"alerts written: {summary.n_alerts}  (purity vs truth: {summary.purity:.1%} of alerts are injected "
              f"transients)")
        print(f"completeness: {summary.n_found}/{summary.n_truth} = {summary.completeness:.1%} of all injected "
              f"transients; {summary.n_found_snr7}/{summary.n_truth_snr7} = {summary.completeness_snr7:.1%} at "
              f"expected S/N >= 7")
    else:
        print(f"alerts written: {summary.n_alerts}  (no injected truth: completeness and purity not measured)")
    for r in summary.per_ccd:
        if r["status"] != "done":
            print(f"  visit {r['visit']} ccd {r['ccd']}: {r['status']}: {(r.get('error') or '').splitlines()[0]}")
    extra = {}
    if report is not None:
        import numpy as np

        lat = [v.latency_s for v in report.visits]
        extra = {"engine": "ray", "alerts_per_s": report.alerts_per_s, "visit_latency_p50_s": float(np.median(lat)),
                 "subtraction_actors": report.n_subtraction_actors, "inference_actors": report.n_inference_actors,
                 "scoring": report.scoring, "gpus": report.gpus, "retries": report.n_retries,
                 "actor_recoveries": report.n_restarts, "actors_replaced": report.n_replaced}
        print(f"ray: {report.n_subtraction_actors} subtraction actors ({report.gpus} GPUs), "
              f"{report.n_inference_actors} inference actors (scoring: {report.scoring}); "
              f"{report.alerts_per_s:.1f} alerts/s; visit latency p50 {extra['visit_latency_p50_s']:.1f} s; "
              f"{report.n_retries} retries, {report.n_replaced} actors replaced")
    from .classify.reports import write_json  # NaN (no injected truth) -> null, written atomically

    Path(cfg.package.output_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.package.output_dir) / "night_summary.json",
               {k: getattr(summary, k) for k in ("n_tasks", "n_done", "n_failed", "n_skipped", "n_alerts", "n_truth",
                                                 "n_found", "n_truth_snr7", "n_found_snr7", "wall_s", "completeness",
                                                 "completeness_snr7", "purity")} | extra)
    return 0 if summary.n_done else 1


def _night_checks(cfg, engine: str) -> None:
    """Refuse settings a night would otherwise ignore or lose (ConfigError, one line)."""
    from .errors import ConfigError

    for key in ("science_model", "reference_model"):
        if getattr(cfg.psf, key):
            raise ConfigError(f"psf.{key} = {getattr(cfg.psf, key)!r} gives one PSF file for one pair "
                              "(nightsift subtract --sci-psf/--ref-psf); a night measures each CCD's PSFs: "
                              f"remove psf.{key} from the config")
    if cfg.package.quicklook and engine == "ray":
        raise ConfigError("package.quicklook = true is not supported on the Ray engine (its writer carries "
                          "alert files only): use --engine local, or set package.quicklook = false")


def _folder_night(cfg, on: str):
    """``(source, CCD-visits to run, ledger records of those done already)`` of ``[input] dir``, its
    plan printed before any work."""
    from .orchestration.folder import FolderNight, split_done

    source = FolderNight.scan(cfg.input, cfg.calibrate)
    print(f"nightsift: night from {source.plan.root}, {on}")
    for line in source.plan.describe():
        print(f"  {line}")
    tasks = source.tasks()
    if not cfg.input.resume:
        return source, tasks, []
    todo, done = split_done(tasks, cfg.package.output_dir)
    if done:
        print(f"  resume: {len(done)} CCD-visits done in an earlier run are kept; {len(todo)} to run")
    return source, todo, done


def _run_night(cfg, engine: str, args, source, tasks, done: list):
    """``(NightSummary, Ray NightReport or None)`` of the night on ``engine``; ``done``: records of
    CCD-visits a resumed night keeps."""
    from .orchestration.local import run_simulated_night
    from .orchestration.task import summarize

    if tasks is not None and not tasks:  # everything done already
        return summarize(done, wall_s=0.0), None
    report = None
    if engine == "ray":
        from .orchestration.ray_engine import run_ray_night

        report = run_ray_night(cfg, progress=not args.quiet, source=source, tasks=tasks)
        summary = report.summary
    else:
        summary = run_simulated_night(cfg, workers=args.workers or 0, progress=not args.quiet, source=source,
                                      tasks=tasks)
    if done:
        summary = summarize(done + list(summary.per_ccd), wall_s=summary.wall_s)
    return summary, report


def cmd_subtract(args) -> int:
    import numpy as np

    from .backend import retain_host_memory
    from .classify.runtime import pipeline_scorer
    from .io.atomic import check_output_dir
    from .io.fits import read_exposure, write_image
    from .pipeline import process_pair
    from .report import write_subtraction_report

    psf = {k: v for k, v in (("science_model", args.sci_psf), ("reference_model", args.ref_psf)) if v}
    cfg = _config(args, package={"output_dir": args.out}, psf=psf)
    # the order matters for the message a user sees: the output folder, then the inputs, then the
    # model (a bad model must not hide a bad input), then the chain
    out = check_output_dir(cfg.package.output_dir)
    retain_host_memory(cfg.run.retain_host_memory)
    sci = read_exposure(args.science, config=cfg.calibrate, noise=args.sci_noise, noise_kind=args.sci_noise_kind)
    ref = read_exposure(args.reference, config=cfg.calibrate, noise=args.ref_noise, noise_kind=args.ref_noise_kind)
    scorer = pipeline_scorer(cfg.classify)
    res = process_pair(sci, ref, config=cfg, visit=args.visit, ccd=args.ccd, keep_products=True, scorer=scorer)
    p = res.products
    hdr = sci.wcs.to_header()
    from astropy.table import Table

    try:
        out.mkdir(parents=True, exist_ok=True)
        write_image(out / "difference.fits", p.subtraction.difference, hdr)
        write_image(out / "D.fits", p.subtraction.D, hdr)
        write_image(out / "scorr.fits", p.subtraction.S_corr, hdr)
        write_image(out / "reference_aligned.fits", p.reference.image, hdr)
        Table(res.candidates).write(out / "candidates.ecsv", overwrite=True)
        report, qa_path, png = write_subtraction_report(
            out, res, config=cfg, science=sci, reference=ref,
            psf_files={"sci": getattr(args, "sci_psf", None), "ref": getattr(args, "ref_psf", None)},
            products={k: f"{k}.fits" for k in ("difference", "D", "scorr", "reference_aligned")} | {
                "candidates": "candidates.ecsv"})
    except OSError as e:  # e.g. the disk filled up while the chain ran
        raise NightsiftError(f"{e.filename or out}: cannot write the products ({e.strerror or e})") from None
    c = res.candidates
    print(f"{len(c)} candidates ({int(c['isdiffpos'].sum())} positive, {int((~c['isdiffpos']).sum())} negative); "
          f"S_corr std {res.qa.get('scorr_std_raw', np.nan):.3f} before renormalisation; alerts -> {res.alerts_path}")
    for r in np.sort(c, order="snr")[::-1][: args.show]:
        print(f"  x={r['xpos']:7.1f} y={r['ypos']:7.1f}  S/N={r['snr']:6.1f}  {'+' if r['isdiffpos'] else '-'}  "
              f"mag={r['magpsf']:.2f}  fwhm={r['fwhm']:.2f}")
    print(f"QA -> {qa_path}" + (f", quicklook -> {png}" if png else "") + f"; {len(report['warnings'])} warnings")
    for w in report["warnings"]:
        print(f"warning: {w}")
    return 0


def cmd_simulate(args) -> int:
    from astropy.io import fits

    from .io.fits import write_exposure
    from .simulate import simulate_visit_ccd
    from .stages.calibrate import calibrate, make_master

    if args.instrument == "space":
        return _simulate_space(args)
    sim = {k: v for k, v in {"instrument": args.instrument, "seed": args.seed, "ny": args.size,
                             "nx": args.size}.items() if v is not None}
    cfg = _config(args, simulate=sim)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for visit in range(args.visits):
        for ccd in range(args.ccds):
            s = simulate_visit_ccd(cfg.simulate, visit=visit, ccd=ccd)
            stem = out / f"visit{visit:04d}_ccd{ccd:03d}"
            fits.PrimaryHDU(s.science_raw.data, s.science_raw.header).writeto(f"{stem}_raw.fits", overwrite=True)
            hl = fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(getattr(s.calibration, k), name=k.upper())
                                                      for k in ("bias", "dark", "flat")])
            hl[0].header["DARKTIME"] = s.calibration.dark_exptime
            hl[0].header["CCDNUM"] = ccd  # a calibration bundle of one CCD (nightsift run --input)
            hl.writeto(f"{stem}_calib.fits", overwrite=True)
            write_exposure(f"{stem}_ref.fits", s.reference)
            # the science frame through this pipeline's own calibration, ready for `nightsift subtract`
            master = make_master(s.calibration, header=s.science_raw.header, config=cfg.calibrate)
            write_exposure(f"{stem}_sci.fits", calibrate(s.science_raw, master, config=cfg.calibrate).value)
            from astropy.table import Table

            Table(s.transients).write(f"{stem}_truth.ecsv", overwrite=True)
            print(f"wrote {stem}_{{raw,calib,sci,ref}}.fits and _truth.ecsv "
                  f"(try: nightsift subtract {stem}_sci.fits {stem}_ref.fits)")
    return 0


def _simulate_space(args) -> int:
    """``nightsift simulate --instrument space``: one space-like pair (MJy/sr with ERR maps, no GAIN,
    undersampled PSF, galaxy-rich, a transient on a galaxy), its PSF files and truth
    (:func:`nightsift.engine.simulate.simulate_space_pair`)."""
    from .errors import ConfigError
    from .simulate import simulate_space_pair

    if args.visits != 1 or args.ccds != 1:
        raise ConfigError("--instrument space writes one science/reference pair: drop --visits/--ccds")
    size = args.size or 512
    paths = simulate_space_pair(shape=(size, size), seed=args.seed or 0).write(args.out)
    print(f"wrote {', '.join(p.name for p in paths.values())} in {args.out}/ (try: nightsift subtract "
          f"{paths['sci']} {paths['ref']}, or with --sci-psf {paths['psf_sci']} --ref-psf {paths['psf_ref']})")
    return 0


def cmd_score(args) -> int:
    from .classify.crossdomain import score_packets

    over = {k: v for k, v in {"backend": args.backend, "model": args.model}.items() if v}
    cfg = _config(args, classify=over or None)
    if args.braai_rubin and not args.braai:
        from .errors import ConfigError

        raise ConfigError("--braai-rubin needs --braai WEIGHTS (braai's d6_m7 files)")
    res = score_packets(args.packets, config=cfg.classify, braai_model=args.braai, braai_rubin=args.braai_rubin,
                        out_dir=args.out, num_threads=args.threads, n_boot=args.bootstrap, seed=args.seed)
    for line in res.skipped:
        print(f"skipped {line}")
    for w in res.warnings:
        print(f"warning: {w}")
    print(f"{res.n} alerts scored from {res.n_files} packet files, {len(res.skipped)} skipped; nightsift: {res.scorer}")
    for key, m in res.metrics.items():
        print(f"{key}: {m['n']} alerts ({m['n_negative']} negative); called real: nightsift "
              f"{m['nightsift_real_fraction']:.1%} (threshold {res.threshold:.3g}), own {m['own_real_fraction']:.1%}")
        for name, label in (("vs_own", f"nightsift vs {key.split(':')[1]} >= 0.5"),
                            ("vs_braai", "nightsift vs braai >= 0.5"), ("braai_vs_own", "braai vs own >= 0.5 (scale)")):
            if name in m:
                print(f"  {label:30s} {_figures(m[name])}")
    print(f"written: {Path(args.out) / 'packet_scores.json'}, packet_scores.csv, packets_most_wrong.png")
    return 0


def _figures(r: dict) -> str:
    """ROC AUC, AUCPR and agreement of one comparison, with their 95% intervals where measured."""
    def ci(k):
        lo_hi = r.get(f"{k}_ci95")
        return f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""
    return (f"ROC AUC {r['roc_auc']:.3f}{ci('roc_auc')}  AUCPR {r['aucpr']:.3f}{ci('aucpr')}  agreement "
            f"{r['agreement']:.1%}{ci('agreement')} (TPR {r['tpr']:.1%}, FPR {r['fpr']:.1%}; {r['n_pos']} real / "
            f"{r['n_neg']} bogus)")


def _dataset_spec(args):
    from .classify.dataset import DatasetSpec

    kw = {"n_units": args.units, "size": args.size, "seed": args.data_seed,
          "profiles": tuple(args.profiles.split(",")) if args.profiles else None,
          "star_psf_scatter": args.star_psf_scatter, "proper_motion": args.proper_motion,
          "bright_variables": args.bright_variables}
    return DatasetSpec(**{k: v for k, v in kw.items() if v is not None})


def cmd_train(args) -> int:
    from .classify.train import run_training

    cfg = _config(args, classify=_threshold_override(args))
    spec = _dataset_spec(args)
    target = args.target_fnr if args.target_fnr is not None else cfg.classify.target_fnr
    conf = cfg.classify.threshold_confidence
    command = (f"nightsift train --data {args.data} --units {spec.n_units} --size {spec.size} "
               f"--profiles {','.join(spec.profiles)} --data-seed {spec.seed} --epochs {args.epochs} "
               f"--batch-size {args.batch_size} --patience {args.patience} --lr {args.lr:g} --seed {args.seed} "
               f"--target-fnr {target:g} --threshold-confidence {conf:g} --kind-balance {args.kind_balance:g} "
               f"--ema {args.ema:g} --out {args.out}")
    if args.init_model:
        command += f" --init-model {args.init_model}"
    if spec.star_psf_scatter or spec.proper_motion:
        command += f" --star-psf-scatter {spec.star_psf_scatter:g} --proper-motion {spec.proper_motion:g}"
    if spec.bright_variables:
        command += f" --bright-variables {spec.bright_variables:g}"
    extra = None
    if args.with_labels:  # expert labels from `nightsift label` (issue #4's active-learning loop)
        from .discover.active import labeled_dataset
        from .errors import ConfigError

        if not args.label_alerts:
            raise ConfigError("--with-labels needs --label-alerts: the alert file or folder the labels were given on")
        from .classify.realeval import refuse_measurement_sets

        refuse_measurement_sets(args.label_alerts)  # the real-data rule: measurement sets never train
        extra, counts = labeled_dataset(args.with_labels, args.label_alerts, interesting=args.interesting)
        command += f" --with-labels {args.with_labels} --label-alerts {args.label_alerts}"
        print(f"expert labels: {counts['n_used']} used of {counts['n_labels']} ({int(extra.labels.sum())} real); "
              f"{counts['n_interesting_skipped']} 'interesting' left out, {counts['n_missing_alert']} without an alert")
    if args.teacher_packets:  # real ZTF triplets labelled by braai (issue #13's domain adaptation)
        extra = _teacher_rows(args, extra)
        command += (f" --teacher-packets {args.teacher_packets} --braai {args.braai or 'default'} "
                    f"--teacher-margin {args.teacher_margin:g} --teacher-repeat {args.teacher_repeat}")
    adapt = None
    if args.adapt_packets:  # unlabelled real triplets, domain-adversarial (issue #13's domain adaptation)
        adapt = _adapt_rows(args)
        command += f" --adapt-packets {args.adapt_packets} --adapt-weight {args.adapt_weight:g}"
    run_training(spec=spec, data_dir=args.data, out_dir=args.out, report_dir=args.report, target_fnr=target,
                 epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, learning_rate=args.lr,
                 seed=args.seed, threads=args.threads, workers=args.workers, rebuild=args.rebuild, command=command,
                 verbose=0 if args.quiet else 2, progress=not args.quiet, config=cfg, extra_train=extra,
                 kind_balance=args.kind_balance, ema=args.ema, threshold_confidence=conf, init_model=args.init_model,
                 adapt=adapt, adapt_weight=args.adapt_weight)
    return 0


def _adapt_rows(args):
    """The unlabelled real rows of ``--adapt-packets`` (:func:`.classify.adapt.adapt_rows`)."""
    from .classify.adapt import adapt_rows
    from .classify.realeval import TEACHER_SETS, refuse_measurement_sets
    from .errors import ConfigError

    if not args.adapt_weight > 0:
        raise ConfigError(f"--adapt-weight must be > 0, got {args.adapt_weight}")
    refuse_measurement_sets(args.adapt_packets, allowed=TEACHER_SETS)  # the real-data rule
    rows = adapt_rows(args.adapt_packets)
    print(f"domain adaptation: {len(rows)} unlabelled real triplets ({rows.meta['n_packets']} packets), "
          f"gradient-reversal weight {args.adapt_weight:g}")
    return rows


def _teacher_rows(args, extra):
    """The teacher rows of ``--teacher-packets`` (:func:`.classify.teacher.teacher_dataset`), after
    the expert rows ``extra`` when there are both."""
    from .classify.realeval import TEACHER_SETS, refuse_measurement_sets
    from .classify.teacher import teacher_dataset

    refuse_measurement_sets(args.teacher_packets, allowed=TEACHER_SETS)  # the real-data rule
    rows, counts = teacher_dataset(args.teacher_packets, args.braai, margin=args.teacher_margin,
                                   repeat=args.teacher_repeat)
    print(f"teacher labels (braai): {counts['n_used']} of {counts['n_packets']} ZTF packets "
          f"({counts['n_real']} real, {counts['n_bogus']} bogus), {counts['n_uncertain_left_out']} uncertain left out; "
          f"each row x{counts['repeat']}")
    if extra is None:
        return rows
    return extra.append(rows, {**extra.meta, "candids": sorted({*extra.meta.get("candids", ()), *rows.meta["candids"]})})


def cmd_evaluate(args) -> int:
    if args.real:
        return _evaluate_real(args)
    from .classify.evaluate import run_evaluation

    cfg = _config(args, classify=_threshold_override(args))
    target = args.target_fnr if args.target_fnr is not None else cfg.classify.target_fnr
    run_evaluation(model=args.model, spec=_dataset_spec(args), data_dir=args.data, out_dir=args.out, split=args.split,
                   target_fnr=target, workers=args.workers, rebuild=args.rebuild, cross=args.cross_domain,
                   source=args.source, epochs=args.epochs, seed=args.seed, threads=args.threads,
                   progress=not args.quiet, config=cfg, threshold_confidence=cfg.classify.threshold_confidence)
    return 0


def _evaluate_real(args) -> int:
    """``nightsift evaluate --real PACKETS...``: nightsift on real packets against their own scores and braai."""
    from .classify.realeval import evaluate_real, format_real

    cfg = _config(args, classify={"model": args.model} if args.model else None)
    res = evaluate_real(args.real, config=cfg.classify, braai_model=args.braai, out_dir=args.out,
                        n_boot=args.bootstrap, seed=args.seed, num_threads=args.threads, labels=args.labels)
    if "expert_labels" in res:
        print(f"expert labels ({args.labels}): {res['expert_labels']}")
    for line in res["skipped"]:
        print(f"skipped {line}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    print(format_real(res))
    print(f"written: {Path(args.out) / 'real_evaluation.json'}, real_reliability.png, real_worst.png")
    return 0


def _threshold_override(args):
    """``--threshold-confidence`` as a [classify] override (checked with the configuration, before
    any simulation or training)."""
    if args.threshold_confidence is None:
        return None
    return {"threshold_confidence": args.threshold_confidence}


def _add_dataset_args(a) -> None:
    a.add_argument("--data", default="nightsift-data", help="dataset cache folder (default nightsift-data)")
    a.add_argument("--units", type=int, help="simulated CCD-visits (default 300)")
    a.add_argument("--size", type=int, help="CCD side in pixels (default 512; finer-pixel profiles get more)")
    a.add_argument("--profiles", help="instrument profiles, comma-separated (default decam,ztf,lsst)")
    a.add_argument("--data-seed", type=int, help="seed of the simulated dataset (default 6)")
    a.add_argument("--workers", type=int, default=1, help="processes simulating CCDs (the data do not depend on it)")
    a.add_argument("--star-psf-scatter", type=float,
                   help="per-star rms of ln(PSF FWHM) in the science epoch: colour-dependent PSFs, ring residuals "
                        "on bright stars (default 0: off)")
    a.add_argument("--proper-motion", type=float,
                   help="per-star rms position change (px) between reference and science: dipoles (default 0)")
    a.add_argument("--bright-variables", type=float,
                   help="share of the variable stars put on bright stars (saturation level to 4 mag above the "
                        "limit, 3-70%% flux changes): the real class matching the residuals (default 0: off)")
    a.add_argument("--rebuild", action="store_true", help="rebuild the dataset even if it is cached")
    a.add_argument("--target-fnr", type=float, help="FNR the threshold is chosen for (default classify.target_fnr)")
    a.add_argument("--threshold-confidence", type=float,
                   help="confidence that the target FNR holds on new data (Clopper-Pearson bound on the validation "
                        "FNR; 0 = point estimate; default classify.threshold_confidence)")
    a.add_argument("--threads", type=int, help="TensorFlow / LiteRT CPU threads (default all cores)")
    a.add_argument("--seed", type=int, default=0, help="training seed")
    a.add_argument("--epochs", type=int, default=30, help="most epochs (early stopping on the validation FPR at the target FNR)")
    a.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    """The ``nightsift`` parser: the global options, then one sub-command each (``_add_<command>``)."""
    p = argparse.ArgumentParser(prog="nightsift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML configuration file (see engine/config.py for sections and defaults)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command")
    for add in (_add_run, _add_subtract, _add_simulate, _add_score, _add_train, _add_evaluate):
        add(sub)

    from .discover.cli import add_subcommands as add_discover_subcommands

    add_discover_subcommands(sub)  # drift, label, retrospective
    return p


def _add_run(sub) -> None:
    from .config import INPUT_PRESETS, NIGHT_ENGINES

    r = sub.add_parser("run", help="simulate a night (the default) and process it")
    r.add_argument("--visits", type=int)
    r.add_argument("--ccds", type=int)
    r.add_argument("--size", type=int, help="CCD side in pixels of the simulated night")
    r.add_argument("--instrument", help="instrument profile: decam, ztf, lsst")
    r.add_argument("--seed", type=int)
    r.add_argument("--workers", type=int, help="processes, or Ray subtraction actors (default: all cores / GPUs)")
    r.add_argument("--engine", choices=NIGHT_ENGINES,
                   help="night engine: Ray actors (the default when Ray is installed) or a local process pool")
    r.add_argument("--address", help="Ray cluster to join ('auto' after `ray start`); default: start a local Ray")
    r.add_argument("--out", help="output directory for alerts and records")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--input", metavar="DIR", help="run the night over this folder of FITS files (science, "
                   "bias/dark/flat, references) instead of a simulated one (config [input] dir)")
    r.add_argument("--preset", choices=INPUT_PRESETS, help="header conventions of the --input files "
                   "(config [input] preset; README: running a night over your files)")
    r.add_argument("--redo", action="store_true", help="run every CCD-visit of --input again, not only those "
                   "not done in an earlier run into the same --out")
    r.set_defaults(func=cmd_run)


def _add_subtract(sub) -> None:
    s = sub.add_parser("subtract", help="ZOGY on your own calibrated FITS pair")
    s.add_argument("science")
    s.add_argument("reference")
    s.add_argument("--out", default="nightsift-subtract")
    s.add_argument("--visit", type=int, default=0)
    s.add_argument("--ccd", type=int, default=0)
    s.add_argument("--show", type=int, default=10, help="print the N best candidates")
    for who in ("sci", "ref"):
        s.add_argument(f"--{who}-noise", metavar="FILE", help=f"noise map of the {who} image in a separate FITS file "
                       "(variance, error or inverse variance in the image's unit; replaces its own noise extension)")
        s.add_argument(f"--{who}-noise-kind", choices=("variance", "err", "wht"), help=f"what --{who}-noise holds, "
                       "when its EXTNAME (VARIANCE/ERR/WHT) and BUNIT do not say it (wht: inverse variance)")
        s.add_argument(f"--{who}-psf", metavar="FILE", help=f"PSF of the {who} image, used instead of measuring it: "
                       "a FITS PSF image (oversampled: OVERSAMP in its header) or a PSFEx .psf model, on that "
                       "image's pixel axes (default psf." + ("science_model" if who == "sci" else "reference_model")
                       + ")")
    s.set_defaults(func=cmd_subtract)


def _add_simulate(sub) -> None:
    m = sub.add_parser("simulate", help="write simulated FITS files (raw, calibration, reference, truth)")
    m.add_argument("--out", default="nightsift-sim")
    m.add_argument("--visits", type=int, default=1)
    m.add_argument("--ccds", type=int, default=1)
    m.add_argument("--size", type=int)
    m.add_argument("--instrument", help="instrument profile: decam, ztf, lsst; or space: one space-like pair "
                   "(MJy/sr with ERR maps, undersampled PSF, galaxy-rich) with its PSF files")
    m.add_argument("--seed", type=int)
    m.set_defaults(func=cmd_simulate)


def _add_score(sub) -> None:
    for name, help_ in (("score", "score ZTF or Rubin alert packets with nightsift's classifier; compare with their "
                                  "own scores (drb, rb, reliability) and with braai when its weights are given"),
                        ("score-ztf", "alias of `score`")):
        z = sub.add_parser(name, help=help_)
        z.add_argument("packets", nargs="+", help="alert packet files or folders of .avro packets (ZTF or Rubin, "
                                                  "recognised per packet)")
        z.add_argument("--backend", help="nightsift scorer: auto, tflite, keras, edgetpu (default: classify.backend)")
        z.add_argument("--model", help="nightsift model file or metadata JSON (default: the shipped model)")
        z.add_argument("--braai", metavar="WEIGHTS", help="ZTF's braai d6_m7 files (folder or .h5): also score "
                                                          "with braai and compare (default: no braai)")
        z.add_argument("--braai-rubin", action="store_true", help="score Rubin packets with braai too (a ZTF "
                                                                  "model: outside its domain)")
        z.add_argument("--out", default="nightsift-score", help="folder for the JSON, the CSV and the PNG")
        z.add_argument("--threads", type=int, default=None, help="LiteRT CPU threads")
        z.add_argument("--bootstrap", type=int, default=1000,
                       help="bootstrap resamples of the 95%% intervals (0: none)")
        z.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
        z.set_defaults(func=cmd_score)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="simulate labelled triplets, train the real/bogus CNN, evaluate, export int8")
    _add_dataset_args(t)
    t.add_argument("--out", default="nightsift-model",
                   help="folder for the model files (engine/classify/models replaces the shipped model)")
    t.add_argument("--report", help="folder for the evaluation JSON and PNGs (default beside the model)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--patience", type=int, default=5, help="epochs without a better validation FPR at the target FNR")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    t.add_argument("--kind-balance", type=float, default=0.0,
                   help="within each class, weight a truth kind of n rows by n**-a (0: as sampled; 1: kinds equal)")
    t.add_argument("--ema", type=float, default=0.0,
                   help="momentum of an exponential moving average of the weights used for validation and "
                        "the saved model (0: off; 0.998 averages ~500 steps)")
    t.add_argument("--with-labels", metavar="DB", help="add the expert labels of this `nightsift label` database "
                                                      "to the training split")
    t.add_argument("--label-alerts", metavar="PATH", help="alert file or folder the labels were given on")
    t.add_argument("--interesting", default="skip", choices=("skip", "real", "bogus"),
                   help="what an 'interesting' label means for training (default: left out)")
    t.add_argument("--init-model", metavar="KERAS", help="start from this .keras model's weights (fine-tuning; "
                                                         "e.g. engine/classify/models/nightsift_rb.keras with --lr 3e-4)")
    t.add_argument("--teacher-packets", metavar="PATH",
                   help="real ZTF packets (file or folder) labelled by braai and added to the training split; "
                        "their candids are listed in the model metadata (nightsift evaluate --real drops them)")
    t.add_argument("--braai", metavar="WEIGHTS", help="with --teacher-packets: braai's d6_m7 files (default: "
                                                      "$NIGHTSIFT_BRAAI_DIR, else shared/data/ztf/braai beside the checkout)")
    t.add_argument("--teacher-margin", type=float, default=0.2,
                   help="keep braai scores <= m (bogus) or >= 1 - m (real); the rest are left out (default 0.2)")
    t.add_argument("--teacher-repeat", type=int, default=1,
                   help="copies of each teacher row (default 1). bench/RESULTS.md measured teacher rows at about "
                        "10%% of the training rows: x4 with 400 CCD-visits, x16 with 1,800")
    t.add_argument("--adapt-packets", metavar="PATH",
                   help="unlabelled real packets (file or folder) for domain-adversarial training: a domain head "
                        "behind a gradient-reversal layer on the embedding; labels are never read; their candids "
                        "are listed in the model metadata (nightsift evaluate --real drops them)")
    t.add_argument("--adapt-weight", type=float, default=0.3,
                   help="with --adapt-packets: the gradient-reversal weight (default 0.3)")
    t.set_defaults(func=cmd_train)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="evaluate a real/bogus model on simulated data (numbers JSON, plots PNG)")
    _add_dataset_args(e)
    e.add_argument("--model", help="model .keras, .tflite or metadata .json (default: the shipped model)")
    e.add_argument("--out", default="nightsift-eval", help="folder for evaluation.json and the PNGs")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--cross-domain", action="store_true",
                   help="also train on one profile / one condition vs all, test on every profile")
    e.add_argument("--source", default="decam", help="profile of the single-domain models (default decam)")
    e.add_argument("--real", nargs="+", metavar="PACKETS",
                   help="evaluate on real ZTF/Rubin alert packets (files or folders) instead: ROC AUC/AUCPR against "
                        "their own drb/rb/reliability (and braai) overall and by population, reliability diagram")
    e.add_argument("--braai", metavar="WEIGHTS", help="with --real: ZTF's braai d6_m7 files, compared too")
    e.add_argument("--labels", metavar="DB", help="with --real: a `nightsift label` database; its expert labels "
                                                  "(real/bogus) are the reference of the packets they name")
    e.add_argument("--bootstrap", type=int, default=1000, help="with --real: bootstrap resamples (0: no intervals)")
    e.set_defaults(func=cmd_evaluate)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        args = parser.parse_args(["run", *(argv or sys.argv[1:])])
    try:
        return args.func(args)
    except NightsiftError as e:
        print(f"nightsift: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
