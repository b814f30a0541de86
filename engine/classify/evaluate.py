"""Real/bogus metrics, the operating threshold, per-domain breakdowns and plots.

Metrics are pure numpy functions of ``(labels, scores)`` (1 = real): :func:`average_precision`
(AUCPR, the step-wise average precision of scikit-learn), :func:`roc_auc` (Mann-Whitney, ties
counted half), :func:`threshold_for_fnr` (the operating threshold: the highest score threshold
whose false-negative rate on the given -- validation -- data is at most the target, because a
missed transient costs more than a false alarm) and :func:`operating_point` (precision, recall,
FNR, FPR and the confusion matrix at a threshold; a candidate is called real when
``score >= threshold``). :func:`report` gathers them overall and per instrument profile, CCD,
seeing bin, filter and truth kind; :func:`plot_report` writes the PNGs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["average_precision", "roc_auc", "threshold_for_fnr", "operating_point", "report", "plot_report",
           "write_json"]


def _yp(y, p):
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} and {p.shape[0]}")
    if not np.all(np.isfinite(p)):
        raise ValueError("scores must be finite")
    return y, p


def average_precision(y, p) -> float:
    """Area under the precision-recall curve as average precision ``sum_k (R_k - R_{k-1}) P_k``
    over the distinct score thresholds (no interpolation). NaN without real examples."""
    y, p = _yp(y, p)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), len(ps) - 1]  # last index of each distinct score
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(y, p) -> float:
    """Area under the ROC curve: P(score of a real > score of a bogus), ties counted 1/2. NaN if a
    class is absent."""
    from scipy.stats import rankdata

    y, p = _yp(y, p)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(p)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def threshold_for_fnr(y, p, target_fnr: float = 0.01, confidence: float = 0.0) -> float:
    """Highest threshold ``t`` whose false-negative rate on ``(y, p)`` meets ``target_fnr``.

    ``FNR(t) = #(real with score < t) / #real``. With ``confidence = 0`` the rule is on the point
    estimate: ``FNR(t) <= target_fnr`` on these rows, so on new data from the same domain the FNR
    comes out above the target about half the time (binomial noise: +-0.13 points for 6,000 real
    at 1%). With ``confidence = c > 0`` the threshold is the highest whose one-sided Clopper-Pearson
    upper bound on the FNR, at level ``c``, is ``<= target_fnr``: the target then holds on new data
    with probability ``>= c`` (candidates taken as independent), at the cost of a lower threshold
    (more false positives). If the bound exceeds the target even with no real example missed (too
    few real examples), the threshold is the lowest real score.

    Parameters
    ----------
    y : (n,) bool or 0/1
        Labels (1 = real).
    p : (n,) float
        Scores (real when ``score >= t``).
    target_fnr : float in [0, 1)
    confidence : float in [0, 1)

    Raises
    ------
    ValueError
        Without real examples, or with ``target_fnr`` or ``confidence`` outside [0, 1).
    """
    y, p = _yp(y, p)
    if not 0 <= target_fnr < 1:
        raise ValueError(f"target_fnr must be in [0, 1), got {target_fnr}")
    if not 0 <= confidence < 1:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    s = np.sort(p[y])
    if len(s) == 0:
        raise ValueError("no real examples to choose a threshold on")
    n = len(s)
    k = int(np.floor(target_fnr * n + 1e-9))  # most real examples allowed below the threshold
    if confidence > 0:
        from scipy.stats import beta

        ks = np.arange(k + 1)
        upper = beta.ppf(confidence, ks + 1, n - ks)  # Clopper-Pearson upper bound with ks misses
        ok = np.flatnonzero(upper <= target_fnr)
        k = int(ok[-1]) if len(ok) else 0
    return float(s[min(k, n - 1)])


def operating_point(y, p, threshold: float) -> dict:
    """Counts and rates at ``threshold`` (real when ``score >= threshold``).

    Returns
    -------
    dict: threshold, n, n_real, n_bogus, tp, fp, tn, fn, precision, recall, fnr, fpr (NaN where a
    denominator is 0).
    """
    y, p = _yp(y, p)
    pred = p >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    div = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    return {"threshold": float(threshold), "n": int(len(y)), "n_real": tp + fn, "n_bogus": fp + tn, "tp": tp,
            "fp": fp, "tn": tn, "fn": fn, "precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
            "fnr": div(fn, tp + fn), "fpr": div(fp, fp + tn)}


def summary(y, p, threshold: float) -> dict:
    """:func:`operating_point` plus ``aucpr`` and ``roc_auc``."""
    d = {"aucpr": average_precision(y, p), "roc_auc": roc_auc(y, p)}
    d.update(operating_point(y, p, threshold))
    return d


def _by(y, p, threshold, keys) -> dict:
    out = {}
    for k in np.unique(keys):
        sel = keys == k
        out[str(k)] = summary(y[sel], p[sel], threshold)
    return out


def report(y, p, threshold: float, *, domain=None, truth=None) -> dict:
    """Overall numbers and the breakdowns of FNR/FPR by domain (JSON-able).

    Parameters
    ----------
    y, p : array_like (n,)
        Labels (1 real) and scores.
    threshold : float
        Operating threshold (chosen on validation data, see :func:`threshold_for_fnr`).
    domain : DOMAIN_DTYPE array (n,), optional
        Adds ``per_instrument``, ``per_ccd`` (keyed ``instrument:ccd``), ``per_seeing_bin`` and
        ``per_filter`` (keyed ``instrument:filter``: filters are per camera).
    truth : TRUTH_DTYPE array (n,), optional
        Adds ``per_kind``: recall of each transient kind, FPR of each bogus cause.
    """
    from .dataset import seeing_bins

    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    r = {"overall": summary(y, p, threshold)}
    if domain is not None:
        inst = domain["instrument"].astype(str)
        r["per_instrument"] = _by(y, p, threshold, inst)
        r["per_ccd"] = _by(y, p, threshold, np.char.add(np.char.add(inst, ":"), domain["ccd"].astype(str)))
        r["per_seeing_bin"] = _by(y, p, threshold, seeing_bins(domain))
        r["per_filter"] = _by(y, p, threshold, np.char.add(np.char.add(inst, ":"), domain["filter"].astype(str)))
    if truth is not None:
        r["per_kind"] = _by(y, p, threshold, truth["kind"].astype(str))
    return r


def format_report(r: dict, *, keys=("per_instrument", "per_seeing_bin", "per_kind")) -> str:
    """A few readable lines of a :func:`report`."""
    o = r["overall"]
    lines = [f"AUCPR {o['aucpr']:.4f}  ROC AUC {o['roc_auc']:.4f}  at threshold {o['threshold']:.3f}: "
             f"precision {o['precision']:.4f} recall {o['recall']:.4f} FNR {o['fnr']:.4f} FPR {o['fpr']:.4f} "
             f"({o['n_real']} real, {o['n_bogus']} bogus)"]
    for key in keys:
        if key not in r:
            continue
        lines.append(f"  {key}:")
        for k, v in r[key].items():
            lines.append(f"    {k:16s} n={v['n']:6d} real={v['n_real']:5d}  FNR {v['fnr']:.4f}  FPR {v['fpr']:.4f}  "
                         f"AUCPR {v['aucpr']:.4f}")
    return "\n".join(lines)


def pr_curve(y, p):
    """(recall, precision) at every distinct threshold, recall increasing."""
    y, p = _yp(y, p)
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), len(ps) - 1]
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, tp / max(y.sum(), 1)], np.r_[1.0, tp / (tp + fp)]


def plot_report(y, p, threshold: float, out_dir, *, title: str = "nightsift real/bogus", prefix: str = "") -> list[Path]:
    """Write ``pr_curve.png``, ``score_hist.png`` and ``confusion.png`` (with ``prefix``) to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p = _yp(y, p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    op = operating_point(y, p, threshold)

    fig, ax = plt.subplots(figsize=(5, 4.2))
    rec, prec = pr_curve(y, p)
    ax.plot(rec, prec, lw=1.5, label=f"AUCPR {average_precision(y, p):.4f}")
    ax.plot([op["recall"]], [op["precision"]], "ro", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("recall (real kept)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(max(0.0, min(prec.min(), 0.9) - 0.02), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    paths.append(out / f"{prefix}pr_curve.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.2))
    bins = np.linspace(0, 1, 51)
    ax.hist(p[~y], bins=bins, histtype="step", lw=1.5, label=f"bogus ({(~y).sum()})", color="C3")
    ax.hist(p[y], bins=bins, histtype="step", lw=1.5, label=f"real ({y.sum()})", color="C0")
    ax.axvline(threshold, ls=":", c="k", label="threshold")
    ax.set_yscale("log")
    ax.set_xlabel("real/bogus score")
    ax.set_ylabel("candidates")
    ax.legend(loc="upper center")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    paths.append(out / f"{prefix}score_hist.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    m = np.array([[op["tn"], op["fp"]], [op["fn"], op["tp"]]])
    ax.imshow(m, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="k" if m[i, j] < m.max() / 2 else "w")
    ax.set_xticks([0, 1], ["called bogus", "called real"])
    ax.set_yticks([0, 1], ["bogus", "real"])
    ax.set_title(f"{title}\nFNR {op['fnr']:.4f}  FPR {op['fpr']:.4f}", fontsize=9)
    fig.tight_layout()
    paths.append(out / f"{prefix}confusion.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _clean(o):
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else round(float(o), 6)
    if isinstance(o, np.integer):
        return int(o)
    return o


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON (NaN -> null, numpy scalars as numbers)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(obj), indent=1))
    return p


def _scorers(model) -> dict:
    """{label: callable(inputs) -> scores} for a model path (.keras, .tflite or the metadata .json;
    None = the shipped model, float and int8), with each one's stored threshold when known."""
    from .model import DEFAULT_MODEL

    p = Path(model) if model is not None else DEFAULT_MODEL.with_suffix(".json")
    if not p.exists():
        raise FileNotFoundError(f"{p}: model not found (train one with `nightsift train`)")
    stored: dict = {}
    if p.suffix == ".json":
        from .runtime import verify_file

        meta = json.loads(p.read_text())
        files = meta.get("files", {})
        paths = {"float": p.with_name(files["keras"]) if "keras" in files else None,
                 "int8": p.with_name(files["tflite_int8"]) if "tflite_int8" in files else None}
        stored = {"float": meta.get("threshold"), "int8": meta.get("threshold_int8", meta.get("threshold"))}
        for f in paths.values():  # the figures must be those of the files the metadata describes
            if f is not None:
                verify_file(f, meta, p, shipped=p.resolve() == DEFAULT_MODEL.with_suffix(".json").resolve())
    elif p.suffix == ".keras":
        paths = {"float": p, "int8": None}
    elif p.suffix == ".tflite":
        paths = {"float": None, "int8": p}
    else:
        raise ValueError(f"{p}: expected a .keras, .tflite or model .json file")
    out = {}
    if paths["float"] is not None:
        from .model import load_keras_model
        from .train import predict_keras

        km = load_keras_model(paths["float"])
        out["float"] = (lambda x, km=km: predict_keras(km, x), stored.get("float"), str(paths["float"]))
    if paths["int8"] is not None:
        from .export import predict_int8

        out["int8"] = (lambda x, q=paths["int8"]: predict_int8(q, x), stored.get("int8"), str(paths["int8"]))
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
