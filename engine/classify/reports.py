"""The files of a real/bogus evaluation: :func:`plot_report` (PR curve, score histograms and
confusion matrix as PNGs) and :func:`write_json` (the numbers, NaN as ``null``).

Both drivers write with these, ``nightsift train`` (:mod:`.train`) and ``nightsift evaluate``
(:mod:`.evaluate`); the numbers come from :mod:`.metrics`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write
from ..plotting import save_figure
from .metrics import average_precision, labels_and_scores, operating_point, pr_curve

__all__ = ["plot_report", "write_json"]


def plot_report(y, p, threshold: float, out_dir, *, title: str = "nightsift real/bogus", prefix: str = "") -> list[Path]:
    """Write ``pr_curve.png``, ``score_hist.png`` and ``confusion.png`` (with ``prefix``) to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p = labels_and_scores(y, p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    op = operating_point(y, p, threshold)
    return [_save(plt, _pr_figure(plt, y, p, op, threshold, title), out / f"{prefix}pr_curve.png"),
            _save(plt, _hist_figure(plt, y, p, threshold, title), out / f"{prefix}score_hist.png"),
            _save(plt, _confusion_figure(plt, op, title), out / f"{prefix}confusion.png")]


def _save(plt, fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=100)


def _pr_figure(plt, y, p, op: dict, threshold: float, title: str):
    """The precision-recall curve, with the operating point ``op`` at ``threshold``."""
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
    return fig


def _hist_figure(plt, y, p, threshold: float, title: str):
    """Histograms of the real and bogus scores (log counts), with the threshold."""
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
    return fig


def _confusion_figure(plt, op: dict, title: str):
    """The confusion matrix of the operating point ``op``."""
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    m = np.array([[op["tn"], op["fp"]], [op["fn"], op["tp"]]])
    ax.imshow(m, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="k" if m[i, j] < m.max() / 2 else "w")
    ax.set_xticks([0, 1], ["called bogus", "called real"])
    ax.set_yticks([0, 1], ["bogus", "real"])
    ax.set_title(f"{title}\nFNR {op['fnr']:.4f}  FPR {op['fpr']:.4f}", fontsize=9)
    return fig


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
    """Write ``obj`` as indented JSON (NaN -> null, numpy scalars as numbers, floats to 6 decimals),
    atomically (:func:`nightsift.engine.io.atomic.atomic_write`: a reader never sees half a file)."""
    text = json.dumps(_clean(obj), indent=1)
    return atomic_write(path, lambda fh: fh.write(text.encode()))
