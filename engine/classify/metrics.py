"""Real/bogus metrics: pure numpy functions of ``(labels, scores)`` (1 = real).

:func:`average_precision` (AUCPR, the step-wise average precision of scikit-learn),
:func:`roc_auc` (Mann-Whitney, ties counted half), :func:`threshold_for_fnr` (the operating
threshold: the highest score threshold whose false-negative rate on the given -- validation --
data is at most the target, because a missed transient costs more than a false alarm) and
:func:`operating_point` (precision, recall, FNR, FPR and the confusion matrix at a threshold; a
candidate is called real when ``score >= threshold``). :func:`report` gathers them overall and per
instrument profile, CCD, seeing bin, filter and truth kind; :func:`format_report` prints one.

This module computes and writes nothing else: no model, no file, no TensorFlow. The experiment
drivers (:mod:`.train`, :mod:`.evaluate`, :mod:`.crossdomain`) and the files of an evaluation
(:mod:`.reports`) build on it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "roc_auc", "threshold_for_fnr", "operating_point", "summary", "report",
           "format_report", "pr_curve", "seeing_bins",
           "labels_and_scores", "bootstrap_ci", "paired_auc_difference", "reliability_curve", "binomial_ci"]


def labels_and_scores(y, p) -> tuple[np.ndarray, np.ndarray]:
    """``(y, p)`` as flat bool labels and float64 scores, checked: same length, finite scores.

    Raises
    ------
    ValueError
        Lengths differ, or a score is not finite.
    """
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} and {p.shape[0]}")
    if not np.all(np.isfinite(p)):
        raise ValueError("scores must be finite")
    return y, p


def _tp_fp(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at each distinct score threshold, highest threshold first."""
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), len(ps) - 1]  # last index of each distinct score
    tp = np.cumsum(ys)[last]
    return tp, (last + 1) - tp


def average_precision(y, p) -> float:
    """Area under the precision-recall curve as average precision ``sum_k (R_k - R_{k-1}) P_k``
    over the distinct score thresholds (no interpolation). NaN without real examples."""
    y, p = labels_and_scores(y, p)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    tp, fp = _tp_fp(y, p)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pr_curve(y, p):
    """(recall, precision) at every distinct threshold, recall increasing."""
    y, p = labels_and_scores(y, p)
    tp, fp = _tp_fp(y, p)
    return np.r_[0.0, tp / max(y.sum(), 1)], np.r_[1.0, tp / (tp + fp)]


def roc_auc(y, p) -> float:
    """Area under the ROC curve: P(score of a real > score of a bogus), ties counted 1/2. NaN if a
    class is absent."""
    from scipy.stats import rankdata

    y, p = labels_and_scores(y, p)
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
    y, p = labels_and_scores(y, p)
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
    y, p = labels_and_scores(y, p)
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


def seeing_bins(domain: np.ndarray) -> np.ndarray:
    """Seeing bin label of each row (FWHM in pixels: <2, 2-3, 3-4, 4-6, >=6)."""
    edges = [2.0, 3.0, 4.0, 6.0]
    names = np.array(["<2px", "2-3px", "3-4px", "4-6px", ">=6px"])
    return names[np.digitize(domain["fwhm_px"], edges)]


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
        Adds ``per_instrument``, ``per_ccd`` (keyed ``instrument:ccd``), ``per_seeing_bin``
        (:func:`seeing_bins`) and ``per_filter`` (keyed ``instrument:filter``: filters are per
        camera).
    truth : TRUTH_DTYPE array (n,), optional
        Adds ``per_kind``: recall of each transient kind, FPR of each bogus cause.
    """
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


def _resampled(labels: np.ndarray, n_boot: int, seed: int, stat, width: int) -> np.ndarray:
    """``stat(i)`` (``width`` values) over ``n_boot`` bootstrap resamples ``i`` of the rows (indices
    drawn with replacement) as an ``(n_boot, width)`` array; NaN where a resample holds one class only."""
    rng = np.random.default_rng(seed)
    vals = np.full((n_boot, width), np.nan)
    for k in range(n_boot):
        i = rng.integers(0, len(labels), len(labels))
        if labels[i].all() or not labels[i].any():
            continue
        vals[k] = stat(i)
    return vals


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, threshold: float, *, n_boot: int, seed: int) -> dict:
    """95% percentile intervals of ROC AUC, AUCPR and agreement over ``n_boot`` resamples of the rows
    (the metrics of this module; resamples where a class is absent are left out)."""
    if n_boot <= 0 or len(labels) < 2:
        return {}
    vals = _resampled(labels, n_boot, seed, lambda i: (roc_auc(labels[i], scores[i]),
                                                       average_precision(labels[i], scores[i]),
                                                       np.mean((scores[i] >= threshold) == labels[i])), 3)
    if not np.isfinite(vals).any():
        return {}
    lo, hi = np.nanpercentile(vals, [2.5, 97.5], axis=0)
    return {f"{name}_ci95": [float(lo[j]), float(hi[j])] for j, name in enumerate(("roc_auc", "aucpr", "agreement"))}


def paired_auc_difference(labels, scores_a, scores_b, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """ROC AUC of ``scores_b`` minus that of ``scores_a`` on the same rows, with a paired bootstrap
    95% interval: every resample draws the rows once for both models, so what the rows share
    (a few hard alerts) cancels, and a difference smaller than either AUC's own interval can show.

    Returns
    -------
    dict: ``delta``, ``delta_ci95`` ([lo, hi]; None without ``n_boot``), ``p_b_not_better`` (the
    share of resamples with ``delta <= 0``), ``n_pos``, ``n_neg``; ``delta`` None when a class is
    absent.
    """
    y = np.asarray(labels, bool)
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"labels and scores differ in length: {len(y)}, {len(a)}, {len(b)}")
    out: dict = {"n_pos": int(y.sum()), "n_neg": int((~y).sum()), "delta": None, "delta_ci95": None,
                 "p_b_not_better": None}
    if y.all() or not y.any():
        return out
    out["delta"] = roc_auc(y, b) - roc_auc(y, a)
    if n_boot <= 0:
        return out
    d = _resampled(y, n_boot, seed, lambda i: roc_auc(y[i], b[i]) - roc_auc(y[i], a[i]), 1)[:, 0]
    if not np.isfinite(d).any():
        return out
    lo, hi = np.nanpercentile(d, [2.5, 97.5])
    out["delta_ci95"] = [float(lo), float(hi)]
    out["p_b_not_better"] = float(np.mean(d[np.isfinite(d)] <= 0))
    return out


def reliability_curve(y, p, *, n_bins: int = 10) -> dict:
    """Reliability diagram of scores ``p`` against decisions ``y``: the scores cut into ``n_bins``
    equal bins of [0, 1] (a score of exactly 1 in the last bin), per bin the number of rows, their
    mean score and the fraction with ``y`` true (NaN in an empty bin).

    Returns
    -------
    dict: ``edges`` (n_bins + 1), ``count``, ``mean_score``, ``fraction_real`` (n_bins each) and
    ``ece``, the expected calibration error ``sum_b count_b |fraction_b - mean_b| / n`` (NaN
    without rows).
    """
    y, p = labels_and_scores(y, p)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(b, weights=p, minlength=n_bins) / count
        frac = np.bincount(b, weights=y.astype(float), minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(frac[filled] - mean[filled])) / len(y)) if len(y) else float("nan")
    return {"edges": edges.tolist(), "count": count.tolist(), "mean_score": mean.tolist(),
            "fraction_real": frac.tolist(), "ece": ece}


def binomial_ci(k: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) two-sided interval of a proportion ``k / n``; ``(nan, nan)`` for n = 0."""
    from scipy.stats import beta

    if n <= 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo = 0.0 if k <= 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi
