"""``nightsift evaluate``: score a dataset split with a model, write the numbers and the plots.

:func:`run_evaluation` scores the float and int8 variants of a model (resolved, and checked
against their SHA-256, by :func:`nightsift.engine.classify.runtime.model_variants`: the one reader
of model metadata) on a dataset split, chooses each one's operating threshold on the validation
split and writes the breakdowns of :func:`.metrics.report` and the PNGs of
:func:`.reports.plot_report`; with ``cross``, also the domain-shift experiment of
:func:`.train.cross_domain`.

The metrics live in :mod:`.metrics` (pure numpy) and the files in :mod:`.reports`; their names
are importable from here too, as before.
"""
from __future__ import annotations

from pathlib import Path

from .metrics import (  # re-exported: callers that import the metrics from here
    average_precision, format_report, operating_point, pr_curve, report, roc_auc, summary, threshold_for_fnr,
)
from .reports import plot_report, write_json

__all__ = ["run_evaluation", "format_cross_domain", "average_precision", "roc_auc", "threshold_for_fnr",
           "operating_point", "summary", "report", "format_report", "pr_curve", "plot_report", "write_json"]


def _scorers(model) -> dict:
    """{label: (callable(inputs) -> scores, stored threshold or None, path)} for the ``"float"``
    and ``"int8"`` variants of ``model`` (:func:`.runtime.model_variants`: a metadata .json, a
    .keras or .tflite file; None = the shipped model)."""
    from .runtime import model_variants

    out = {}
    for label, spec in model_variants(model).items():
        if spec.backend == "keras":
            from .model import load_keras_model
            from .train import predict_keras

            km = load_keras_model(spec.path)
            score = lambda x, km=km: predict_keras(km, x)  # noqa: E731
        else:
            from .export import predict_int8

            score = lambda x, q=spec.path: predict_int8(q, x)  # noqa: E731
        out[label] = (score, spec.stored_threshold, str(spec.path))
    return out


def run_evaluation(*, model=None, spec=None, data_dir="nightsift-data", out_dir="nightsift-eval", split: str = "test",
                   target_fnr: float = 0.01, workers: int = 1, rebuild: bool = False, cross: bool = False,
                   source: str = "decam", epochs: int = 30, seed: int = 0, threads: int | None = None,
                   progress: bool = True, config=None, threshold_confidence: float = 0.0) -> dict:
    """``nightsift evaluate``: score a dataset split with a model, write numbers and plots.

    The operating threshold is chosen on the dataset's validation split for ``target_fnr`` at
    ``threshold_confidence`` (:func:`threshold_for_fnr`; the model's stored threshold is reported
    beside it). Writes ``evaluation.json`` (per model
    variant: overall numbers, breakdowns per instrument/CCD/seeing bin/filter/kind) and the PNGs
    of :func:`plot_report` to ``out_dir``; with ``cross``, also ``cross_domain.json`` from
    :func:`nightsift.engine.classify.train.cross_domain`.
    """
    from .dataset import DatasetSpec, build_dataset, load_dataset
    from .model import configure_tensorflow

    configure_tensorflow(threads)
    spec = spec or DatasetSpec()
    data = load_dataset(build_dataset(data_dir, spec, config=config, workers=workers, progress=progress,
                                      rebuild=rebuild))
    val, ev = data.split("val"), data.split(split)
    x_val, x_ev = val.inputs(), ev.inputs()
    out = Path(out_dir)
    res: dict = {"dataset": {"key": data.meta["key"], "spec": data.meta["spec"], "split": split,
                             "summary": data.meta["summary"]}, "target_fnr": target_fnr,
           "threshold_confidence": threshold_confidence, "models": {}}
    for label, (score, stored, path) in _scorers(model).items():
        thr = threshold_for_fnr(val.labels, score(x_val), target_fnr, threshold_confidence)
        p = score(x_ev)
        r = report(ev.labels, p, thr, domain=ev.domain, truth=ev.truth)
        r["model"] = path
        if stored is not None:
            r["at_stored_threshold"] = operating_point(ev.labels, p, float(stored))
        res["models"][label] = r
        plot_report(ev.labels, p, thr, out, title=f"{label} model, {split} split", prefix=f"{label}_")
        print(f"{label} model ({path}), {split} split, threshold for FNR <= {target_fnr:g} on validation "
              f"(confidence {threshold_confidence:g}):")
        print(format_report(r))
    if cross:
        from .train import cross_domain

        res["cross_domain"] = cross_domain(data, source=source, target_fnr=target_fnr, epochs=epochs, seed=seed,
                                           threads=threads, threshold_confidence=threshold_confidence)
        print(format_cross_domain(res["cross_domain"]))
        write_json(out / "cross_domain.json", res["cross_domain"])
    write_json(out / "evaluation.json", res)
    print(f"written: {out / 'evaluation.json'} and PNGs in {out}/")
    return res


def format_cross_domain(c: dict) -> str:
    """Table of a cross-domain result: test AUCPR (FNR/FPR at each model's threshold) per profile."""
    names = [k for k in ("multi", "single_profile", "single_condition") if k in c]
    cols = list(c[names[0]]["test"])
    lines = [f"cross-domain (source {c['source']}, {c['n_train']} training triplets each; "
             f"'{c['source']}_condition' = its FWHM {c['single_condition_fwhm_px'][0]:.2f}-"
             f"{c['single_condition_fwhm_px'][1]:.2f} px units): test AUCPR [FNR/FPR]"]
    lines.append(f"  {'trained on':18s}" + "".join(f"{k:>26s}" for k in cols))
    for n in names:
        row = "".join(f"{v['aucpr']:12.4f} [{v['fnr']:.3f}/{v['fpr']:.3f}]" for v in c[n]["test"].values())
        lines.append(f"  {n:18s}{row}")
    for n in names:
        lines.append(f"  drop of {n:16s} " + ", ".join(f"{k} {v:+.4f}" for k, v in c[n]["drop_aucpr"].items()))
    return "\n".join(lines)
