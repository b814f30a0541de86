"""The outside test: nightsift's simulation-trained classifier on real ZTF alerts, against ZTF.

:func:`score_ztf` reads a folder of real ZTF alert packets, scores every candidate

* with nightsift's scorer (any backend of :mod:`.runtime`; its own normalisation, on the triplets
  of :func:`nightsift.engine.io.avro.iter_ztf_packets`), and
* with ZTF's braai d6_m7 (ZTF's exact preprocessing, :mod:`.braai`),

and compares nightsift's score with two reference decisions, as there is no human label:
braai's (``braai >= 0.5``) and ZTF's random forest's (``rb >= 0.5``). It reports ROC AUC and
AUCPR (average precision) for each, the agreement at nightsift's operating threshold, and draws the
triplets nightsift gets most wrong against braai (a PNG).

Sign of the difference cutout: ZTF stores, for a negative candidate (``isdiffpos = 'f'``), the
reference-minus-science cutout (file ``..._refmsci.fits.gz``; its centre is positive in all 179 such
packets of the shared sample). nightsift's packets and classifier follow the same convention
(:func:`nightsift.engine.records.difference_sign`), so ZTF's triplets are scored as stored.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import ClassifyConfig
from ..errors import InputError
from ..plotting import save_figure
from .metrics import average_precision, roc_auc

__all__ = ["roc_auc", "average_precision", "ZTFComparison", "score_ztf", "plot_most_wrong"]


@dataclass(frozen=True)
class ZTFComparison:
    """Outcome of :func:`score_ztf`.

    Attributes
    ----------
    n : int
        Alerts scored.
    scorer : str
        nightsift's scorer (``repr``).
    threshold : float
        nightsift's operating threshold.
    metrics : dict
        ``{"vs_braai": {...}, "vs_rb": {...}}``, each with ``roc_auc``, ``aucpr``, ``n_pos``,
        ``n_neg``, and at nightsift's threshold ``agreement``, ``tpr``, ``fpr``; plus
        ``braai_vs_rb`` (braai's own score against ``rb >= 0.5``, for scale) and ``as_stored``
        (nightsift on ZTF's cutouts without the sign conversion).
    objectId, candid, nightsift, braai, rb : list
        Per alert, in file-name order.
    """

    n: int
    scorer: str
    threshold: float
    metrics: dict
    objectId: list = field(default_factory=list)
    candid: list = field(default_factory=list)
    nightsift: list = field(default_factory=list)
    braai: list = field(default_factory=list)
    rb: list = field(default_factory=list)


def _metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """ROC AUC and AUCPR of ``scores`` against reference decisions ``labels``, and the agreement,
    TPR and FPR of ``scores >= threshold`` with them. Not :func:`.metrics.operating_point`: that
    compares in float64, this in the scores' own float32 (NumPy 2 casts the threshold), which can
    differ for a score equal to the float32 of the threshold."""
    pred = scores >= threshold
    npos, nneg = int(labels.sum()), int((~labels).sum())
    return {
        "roc_auc": roc_auc(labels, scores),
        "aucpr": average_precision(labels, scores),
        "n_pos": npos,
        "n_neg": nneg,
        "agreement": float(np.mean(pred == labels)) if len(labels) else float("nan"),
        "tpr": float(pred[labels].mean()) if npos else float("nan"),
        "fpr": float(pred[~labels].mean()) if nneg else float("nan"),
    }


def score_ztf(directory: str | os.PathLike, *, config: ClassifyConfig, braai_model: str | os.PathLike | None = None,
              out_dir: str | os.PathLike | None = None, n_worst: int = 8, num_threads: int | None = None) -> ZTFComparison:
    """Score a folder of real ZTF packets with nightsift's classifier and with braai; compare.

    Parameters
    ----------
    directory : str or PathLike
        Folder of ZTF ``*.avro`` alert packets (one or more alerts each).
    config : ClassifyConfig
        nightsift's scorer (``backend`` must not be ``"none"``; ``"braai"`` compares braai
        with itself, a check of the plumbing).
    braai_model : str or PathLike, optional
        Folder of ZTF's braai files (default: :func:`.braai.default_braai_dir`).
    out_dir : str or PathLike, optional
        Where to write ``ztf_crossdomain.json`` (metrics + per-alert scores) and
        ``ztf_most_wrong.png``; nothing is written when ``None``.
    n_worst : int
        Triplets of each kind (braai-real nightsift scores lowest, braai-bogus it scores highest)
        drawn in the PNG.
    num_threads : int, optional
        LiteRT CPU threads.

    Returns
    -------
    ZTFComparison

    Raises
    ------
    InputError
        No packets in ``directory``, a missing model, an unreadable packet.
    """
    from .braai import load_braai
    from .runtime import load_scorer

    directory = Path(directory)
    scorer = load_scorer(config, num_threads=num_threads)
    if scorer is None:
        raise InputError("classify.backend is 'none': nothing to compare", stage="classify")
    trips, cands, btrips = _read_alerts(directory)
    isdiffpos = [c.get("isdiffpos") for c in cands]
    ns = scorer.score(trips)
    braai = load_braai(braai_model)
    bs = np.concatenate([np.asarray(braai.predict_on_batch(np.stack(btrips[i:i + 256])), np.float32)[:, 0]
                         for i in range(0, len(btrips), 256)])
    rb = np.array([np.nan if c.get("rb") is None else c["rb"] for c in cands], np.float64)
    thr = scorer.threshold
    braai_real = bs >= 0.5
    ok = np.isfinite(rb)
    rb_real = rb[ok] >= 0.5
    metrics = {
        "vs_braai": _metrics(braai_real, ns, thr),
        "vs_rb": _metrics(rb_real, ns[ok], thr),
        "braai_vs_rb": _metrics(rb_real, bs[ok], 0.5),
        "nightsift_real_fraction": float(np.mean(ns >= thr)),
        "braai_real_fraction": float(np.mean(braai_real)),
        "rb_real_fraction": float(np.mean(rb_real)) if ok.any() else float("nan"),
        "spearman_vs_braai": _spearman(ns, bs),
        "n_negative": int(sum(str(v).lower() not in ("t", "1", "true") for v in isdiffpos)),
    }
    res = ZTFComparison(n=len(ns), scorer=repr(scorer), threshold=float(thr), metrics=metrics,
                        objectId=[c.get("objectId") for c in cands], candid=[c.get("candid") for c in cands],
                        nightsift=[float(v) for v in ns], braai=[float(v) for v in bs],
                        rb=[None if not np.isfinite(v) else float(v) for v in rb])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ztf_crossdomain.json").write_text(json.dumps(asdict(res), indent=1) + "\n")
        plot_most_wrong(trips, ns, bs, rb,
                        [f"{c.get('objectId')} ({'+' if str(c.get('isdiffpos')).lower() in ('t', '1', 'true') else '-'})"
                         for c in cands], out / "ztf_most_wrong.png", n_worst=n_worst)
    return res


def _read_alerts(directory: Path) -> tuple[np.ndarray, list, list]:
    """Every alert of the ``*.avro`` packets in ``directory``, in file-name order: nightsift's
    triplets ``(n, 63, 63, 3)``, the candidate records and braai's triplets (ZTF's preprocessing).

    Raises
    ------
    InputError
        No packets, or not one braai triplet per alert.
    """
    from ..io.avro import iter_ztf_packets
    from .braai import read_braai_triplets

    trips, cands, btrips = [], [], []
    for _path, trip, cand in iter_ztf_packets(directory):
        trips.append(trip)
        cands.append(cand)
    if not trips:
        raise InputError("no ZTF .avro packets here", path=str(directory))
    for path in sorted(directory.glob("*.avro")):
        btrips.extend(t for t, _ in read_braai_triplets(path))
    if len(btrips) != len(trips):
        raise InputError(f"read {len(trips)} alerts but {len(btrips)} braai triplets", path=str(directory))
    return np.stack(trips), cands, btrips


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="mergesort"), kind="mergesort").astype(float)
    rb = np.argsort(np.argsort(b, kind="mergesort"), kind="mergesort").astype(float)
    if len(a) < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def plot_most_wrong(triplets: np.ndarray, nightsift: np.ndarray, braai: np.ndarray, rb: np.ndarray,
                    names: list, path: str | os.PathLike, *, n_worst: int = 8) -> Path:
    """PNG of the triplets nightsift disagrees with braai on most.

    Rows: the braai-real alerts (braai >= 0.5) with the lowest nightsift scores, then the
    braai-bogus ones with the highest; columns science, reference, difference (each stretched
    to its own 1-99.5 percentiles), titled with objectId and the three scores.

    Parameters
    ----------
    triplets : ndarray (n, 63, 63, 3)
        As scored by nightsift (NaN = no data).
    nightsift, braai, rb : ndarray (n,)
    names : list of str (n,)
    path : str or PathLike
    n_worst : int

    Returns
    -------
    Path of the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = np.flatnonzero(braai >= 0.5)
    bogus = np.flatnonzero(braai < 0.5)
    missed = real[np.argsort(nightsift[real], kind="mergesort")][:n_worst]
    false_alarm = bogus[np.argsort(-nightsift[bogus], kind="mergesort")][:n_worst]
    rows = [(i, "braai real, nightsift low") for i in missed] + [(i, "braai bogus, nightsift high") for i in false_alarm]
    if not rows:
        rows = [(0, "")]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.0, 2.1 * len(rows)), squeeze=False)
    for r, (i, kind) in enumerate(rows):
        for c, label in enumerate(("science", "reference", "difference")):
            ax = axes[r, c]
            img = triplets[i, :, :, c]
            fin = img[np.isfinite(img)]
            lo, hi = (np.percentile(fin, [1, 99.5]) if fin.size else (0.0, 1.0))
            ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
        rbv = "-" if not np.isfinite(rb[i]) else f"{rb[i]:.2f}"
        axes[r, 0].set_ylabel(f"{names[i]}\n{kind}\nns {nightsift[i]:.2f} braai {braai[i]:.2f} rb {rbv}", fontsize=6)
    return save_figure(fig, path)
