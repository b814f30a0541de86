"""The outside test: nightsift's simulation-trained classifier on real survey alerts.

:func:`score_packets` (``nightsift score``; ``nightsift score-ztf`` is its alias) reads packets of
ZTF or Rubin, recognised per packet (:func:`nightsift.engine.io.packets.read_packets`; broken ones
skipped with one line each), scores them with nightsift's classifier and compares with each
packet's own score -- ZTF's ``drb`` where present, else ``rb``; Rubin's ``reliability`` -- per
survey and score: ROC AUC, AUCPR and the agreement at nightsift's threshold (and at 0.5), each with
a bootstrap 95% interval; braai (ZTF's d6_m7, ZTF's exact preprocessing, :mod:`.braai`) only when
its weights are given (a ZTF model: Rubin packets get a braai score only on request, with a
warning). It draws the triplets nightsift gets most wrong (a PNG).

Sign of the difference cutout: ZTF stores, for a negative candidate (``isdiffpos = 'f'``), the
reference-minus-science cutout (file ``..._refmsci.fits.gz``; its centre is positive in all 179 such
packets of the shared sample). nightsift's packets and classifier follow the same convention
(:func:`nightsift.engine.records.difference_sign`); Rubin's differences of negative sources are
flipped to it by the reader.

There is no human label in either survey's packets: these are agreements with another model, not
accuracies. Real-data rule: the packets are for measuring only; nothing here trains on them
(:mod:`.realeval`).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import ClassifyConfig
from ..errors import InputError
from ..plotting import save_figure
from .metrics import average_precision, bootstrap_ci, roc_auc

__all__ = ["roc_auc", "average_precision", "PacketComparison", "score_packets",
           "plot_most_wrong"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PacketComparison:
    """Outcome of :func:`score_packets`.

    Attributes
    ----------
    n : int
        Alerts scored.
    n_files : int
        Packet files looked at.
    scorer : str
        nightsift's scorer (``repr``).
    threshold : float
        nightsift's operating threshold.
    metrics : dict
        Per group ``"<survey>:<own score>"`` (``"ztf:rb"``, ``"ztf:drb"``, ``"rubin:reliability"``):
        ``vs_own`` (nightsift against ``own >= 0.5``: ``roc_auc``, ``aucpr``, ``agreement`` at
        ``threshold``, each with ``*_ci95``, and ``agreement_at_0.5``, ``tpr``, ``fpr``, ``n_pos``,
        ``n_neg``), ``n``, ``n_negative``, ``nightsift_real_fraction``, ``own_real_fraction``,
        ``spearman_vs_own``; with braai also ``vs_braai`` and ``braai_vs_own``.
    skipped : list of str
        One line per packet that could not be read.
    warnings : list of str
    rows : list of dict
        Per alert: ``file``, ``survey``, ``candid``, ``objectId``, ``ra``, ``dec``, ``isdiffpos``,
        ``snr``, ``magpsf``, ``own_score_name``, ``own_score``, ``nightsift``, ``braai``.
    """

    n: int
    n_files: int
    scorer: str
    threshold: float
    metrics: dict
    skipped: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    rows: list = field(default_factory=list)


#: per-alert columns of the CSV (and of :attr:`PacketComparison.rows`)
ROW_FIELDS = ("file", "survey", "candid", "objectId", "ra", "dec", "isdiffpos", "snr", "magpsf", "own_score_name",
              "own_score", "nightsift", "braai")


def score_packets(paths, *, config: ClassifyConfig, braai_model: str | os.PathLike | None = None,
                  braai_rubin: bool = False, out_dir: str | os.PathLike | None = None, n_worst: int = 8,
                  num_threads: int | None = None, n_boot: int = 1000, seed: int = 0) -> PacketComparison:
    """Score ZTF and/or Rubin alert packets with nightsift's classifier; compare with their own scores.

    Parameters
    ----------
    paths : path or iterable of paths
        Packet files or folders of ``*.avro``; the survey is recognised per packet.
    config : ClassifyConfig
        nightsift's scorer (``backend`` must not be ``"none"``).
    braai_model : str or PathLike, optional
        ZTF's braai d6_m7 files (folder or weights file): add braai's score and its comparisons.
        Without it nothing needs braai's weights.
    braai_rubin : bool
        Score Rubin packets with braai too (a ZTF model: out of its domain; a warning says so).
    out_dir : str or PathLike, optional
        Where to write ``packet_scores.json`` (metrics, skipped packets, warnings),
        ``packet_scores.csv`` (one row per alert) and ``packets_most_wrong.png``.
    n_worst : int
        Triplets of each kind drawn in the PNG.
    num_threads : int, optional
        LiteRT CPU threads.
    n_boot : int
        Bootstrap resamples of the 95% intervals (0: none).
    seed : int
        Seed of the bootstrap.

    Raises
    ------
    InputError
        No readable packet (one line), backend ``"none"``, missing model or braai weights.
    """
    from ..io.packets import read_packets
    from .runtime import load_scorer

    ps = read_packets(paths, keep_stamps=braai_model is not None)  # unreadable packets: before loading a model
    scorer = load_scorer(config, num_threads=num_threads)
    if scorer is None:
        raise InputError("classify.backend is 'none': nothing to score with", stage="classify")
    warns: list[str] = []
    ns = scorer.score(ps.triplets)
    bs = _braai_scores(ps, braai_model, braai_rubin, warns) if braai_model is not None else None
    thr = float(scorer.threshold)
    metrics = {key: _group_metrics([ps.records[i] for i in idx], ns[idx], None if bs is None else bs[idx], thr,
                                   n_boot=n_boot, seed=seed)
               for key, idx in _groups(ps.records).items()}
    rows = [_row(r, ns[i], None if bs is None else bs[i]) for i, r in enumerate(ps.records)]
    res = PacketComparison(n=len(ns), n_files=ps.n_files, scorer=repr(scorer), threshold=thr, metrics=metrics,
                           skipped=list(ps.skipped), warnings=warns, rows=rows)
    if out_dir is not None:
        _write_packet_outputs(Path(out_dir), res, ps, ns, bs, n_worst=n_worst)
    return res


def _groups(records: list) -> dict[str, np.ndarray]:
    """Row indices of each ``survey:own score`` group, in first-seen order."""
    keys = [f"{r['survey']}:{r['own_score_name']}" for r in records]
    return {k: np.flatnonzero(np.array(keys) == k) for k in dict.fromkeys(keys)}


def _braai_scores(ps, braai_model, braai_rubin: bool, warns: list) -> np.ndarray:
    """braai's score of each alert: ZTF's exact preprocessing of the cutouts as stored for ZTF
    packets; for Rubin packets NaN, or with ``braai_rubin`` its normalisation of nightsift's
    triplets (warned: braai never saw Rubin data)."""
    from .braai import braai_preprocess, braai_triplet, load_braai

    model = load_braai(braai_model)
    x = np.zeros(ps.triplets.shape, np.float32)
    use = np.zeros(len(ps.records), bool)
    for i, (rec, st) in enumerate(zip(ps.records, ps.braai_stamps)):
        if rec["survey"] == "ztf":
            x[i], use[i] = braai_triplet(*st), True
        elif braai_rubin:
            x[i], use[i] = braai_preprocess(ps.triplets[i])[0], True
    n_rubin = sum(r["survey"] == "rubin" for r in ps.records)
    if braai_rubin and n_rubin:
        warns.append(f"braai scored {n_rubin} Rubin packets although it is a ZTF model (1\"/px, ZTF's subtraction): "
                     "its Rubin scores are outside its domain")
    elif n_rubin:
        warns.append(f"braai not run on the {n_rubin} Rubin packets (a ZTF model; --braai-rubin to insist)")
    out = np.full(len(ps.records), np.nan, np.float32)
    idx = np.flatnonzero(use)
    for j in range(0, len(idx), 256):
        b = idx[j:j + 256]
        out[b] = np.asarray(model.predict_on_batch(x[b]), np.float32)[:, 0]
    return out


def _group_metrics(records: list, ns: np.ndarray, bs: np.ndarray | None, thr: float, *, n_boot: int, seed: int) -> dict:
    """The comparisons of one ``survey:own score`` group (:attr:`PacketComparison.metrics`)."""
    own = np.array([np.nan if r["own_score"] is None else r["own_score"] for r in records], np.float64)
    ok = np.isfinite(own)
    real = own[ok] >= 0.5
    vs_own = _metrics(real, ns[ok], thr)
    vs_own["agreement_at_0.5"] = float(np.mean((ns[ok] >= 0.5) == real)) if ok.any() else float("nan")
    vs_own.update(bootstrap_ci(real, ns[ok], thr, n_boot=n_boot, seed=seed))
    m = {"n": len(records), "n_without_own_score": int((~ok).sum()),
         "n_negative": int(sum(str(r.get("isdiffpos")).lower() not in ("t", "1", "true") for r in records)),
         "vs_own": vs_own, "nightsift_real_fraction": float(np.mean(ns >= thr)),
         "own_real_fraction": float(np.mean(real)) if ok.any() else float("nan"),
         "spearman_vs_own": _spearman(ns[ok], own[ok])}
    if bs is not None and np.isfinite(bs).any():
        fb = np.isfinite(bs)
        m["vs_braai"] = _metrics(bs[fb] >= 0.5, ns[fb], thr)
        both = fb & ok
        m["braai_vs_own"] = _metrics(own[both] >= 0.5, bs[both], 0.5)
        m["braai_real_fraction"] = float(np.mean(bs[fb] >= 0.5))
    return m


def _row(rec: dict, ns: float, bs: float | None) -> dict:
    row = {k: rec.get(k) for k in ROW_FIELDS[:-2]}
    row["nightsift"] = float(ns)
    row["braai"] = None if bs is None or not np.isfinite(bs) else float(bs)
    return row


def _write_packet_outputs(out: Path, res: PacketComparison, ps, ns: np.ndarray, bs: np.ndarray | None, *,
                          n_worst: int) -> None:
    """``packet_scores.json``, ``packet_scores.csv`` and ``packets_most_wrong.png`` in ``out``."""
    from ..io.atomic import atomic_write
    from .reports import write_json

    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in asdict(res).items() if k != "rows"}
    summary["real_data_rule"] = "survey packets are for measuring only; never train on them"
    write_json(out / "packet_scores.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in res.rows)
    atomic_write(out / "packet_scores.csv", lambda fh: fh.write(buf.getvalue().encode()))
    own = np.array([np.nan if r["own_score"] is None else r["own_score"] for r in ps.records], np.float32)
    other = np.full(len(ns), np.nan, np.float32) if bs is None else bs
    names = [f"{r['survey']} {r.get('objectId')} ({'-' if r.get('isdiffpos') == 'f' else '+'}, {r['own_score_name']})"
             for r in ps.records]
    plot_most_wrong(ps.triplets, ns, own, other, names, out / "packets_most_wrong.png", n_worst=n_worst,
                    reference_name="own", other_name="braai")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="mergesort"), kind="mergesort").astype(float)
    rb = np.argsort(np.argsort(b, kind="mergesort"), kind="mergesort").astype(float)
    if len(a) < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def plot_most_wrong(triplets: np.ndarray, nightsift: np.ndarray, braai: np.ndarray, rb: np.ndarray,
                    names: list, path: str | os.PathLike, *, n_worst: int = 8, reference_name: str = "braai",
                    other_name: str = "rb") -> Path:
    """PNG of the triplets nightsift disagrees with a reference score (braai) on most.

    Rows: the reference-real alerts (``braai >= 0.5``) with the lowest nightsift scores, then the
    reference-bogus ones with the highest (NaN reference: neither); columns science, reference,
    difference (each stretched to its own 1-99.5 percentiles), titled with the name and the three scores.

    Parameters
    ----------
    triplets : ndarray (n, 63, 63, 3)
        As scored by nightsift (NaN = no data).
    nightsift, braai, rb : ndarray (n,)
        nightsift's score, the reference score (braai; a packet's own score) and one more shown
        (rb; braai), NaN where absent.
    names : list of str (n,)
    path : str or PathLike
    n_worst : int
    reference_name, other_name : str
        What ``braai`` and ``rb`` hold, for the titles.

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
    rows = ([(i, f"{reference_name} real, nightsift low") for i in missed]
            + [(i, f"{reference_name} bogus, nightsift high") for i in false_alarm])
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
        axes[r, 0].set_ylabel(f"{names[i]}\n{kind}\nns {nightsift[i]:.2f} {reference_name} {braai[i]:.2f} "
                              f"{other_name} {rbv}", fontsize=6)
    return save_figure(fig, path)
