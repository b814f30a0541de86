"""The real-data evaluation kit: ``nightsift evaluate --real PACKETS...``.

nightsift's classifier is scored on real survey alert packets (ZTF or Rubin, recognised per packet
by :func:`nightsift.engine.io.packets.read_packets`) and compared with each packet's own real/bogus
score -- ZTF's ``drb`` (braai) where present, else ``rb``; Rubin's ``reliability``; ``>= 0.5`` is
the reference label -- and, with braai's weights, with braai (``braai >= 0.5``). Without expert
labels (``--labels``, :func:`apply_expert_labels`: group ``<survey>:expert``) every figure is an
agreement with another survey's model. Per ``survey:own score`` group:

* overall and **by population** (:func:`populations`): near a bright catalogued source or not, by
  sign of the difference, by exposure, and whether the science cutout dips below the sky at the
  source; each with ``n``, the counts of each class, ROC AUC and AUCPR with bootstrap 95%
  intervals (:func:`.metrics.bootstrap_ci`), or ``null`` with the reason when a population holds
  one class only;
* the fraction of own-score-real alerts nightsift calls bogus at its shipped operating threshold
  (the model metadata's; issue #13's target: at most 5% of drb-real alerts), with a Clopper-Pearson
  95% interval, and beside it the other side of the same threshold, the fraction of own-score-bogus
  alerts it calls real: a lower threshold meets the first target by raising the second;
* a reliability diagram (nightsift's score binned against the fraction the own score calls real,
  :func:`.metrics.reliability_curve`) and a PNG of the worst-ranked triplets (own-real scored
  lowest, own-bogus scored highest).

Populations (exactly what is used):

* ``bright_star`` -- ZTF: ``distnr < 1"`` and ``magnr < 17`` (the nearest source of ZTF's reference
  catalogue); ``unknown`` where either is missing. Rubin packets carry no brightness of the nearest
  catalogued source (``diaObject.nearbyObj1Dist`` has no magnitude; ``diaSource`` no template
  flux), so the proxy is the template cutout: its peak within :data:`CENTRE_RADIUS_PX` pixels of the
  source, above the cutout's median, in units of the cutout's 1.4826 x MAD noise;
  ``>= RUBIN_TEMPLATE_SNR`` (100) counts as bright.
* ``sign`` -- ``isdiffpos`` (positive: the science is brighter than the reference).
* ``exposure`` -- ZTF: night ``nid`` and exposure time ``jd`` (every quadrant of one exposure shares
  them); Rubin: ``visit``.
* ``science_dip`` -- the science cutout's mean over the central :data:`SCIENCE_DIP_HALF` box at
  least :data:`SCIENCE_DIP_SIGMA` (5) sigma of that mean below the cutout's median
  (:func:`science_dip_snr`). No astrophysical source makes the science darker than the sky, so a
  reference score that calls such an alert real is wrong there.

**The real-data rule.** Of the real packets in ``../shared/data``, ``ztf/alerts_drb`` and
``rubin/alerts`` (:data:`MEASUREMENT_SETS`) are measurement sets: neither touches training, ever.
``ztf/alerts`` (:data:`TEACHER_SETS`) may touch training only as triplets labelled by braai
(``nightsift train --teacher-packets``, :mod:`.teacher`) or as unlabelled triplets for domain
adaptation (``--adapt-packets``, :mod:`.adapt`); it stays a measurement set for a model that did
not use it. Training on any real packet (teacher rows, expert labels of real alerts)
lists the packets' candids in the model metadata under :data:`TRAINING_CANDIDS_KEY`. This kit drops
every packet whose candid is listed there, with a loud count, and refuses when nothing is left: no
figure is ever reported on packets that touched training. :func:`refuse_measurement_sets` is the
check the training path runs on the real packets it is given.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..config import ClassifyConfig
from ..errors import InputError
from ..plotting import save_figure
from .metrics import average_precision, binomial_ci, bootstrap_ci, reliability_curve, roc_auc

__all__ = ["MEASUREMENT_SETS", "TEACHER_SETS", "TRAINING_CANDIDS_KEY", "BRIGHT_MAGNR", "BRIGHT_DISTNR_ARCSEC", "RUBIN_TEMPLATE_SNR",
           "CENTRE_RADIUS_PX", "SCIENCE_DIP_SIGMA", "SCIENCE_DIP_HALF", "FNR_TARGET", "refuse_measurement_sets",
           "training_candids", "drop_trained", "populations", "science_dip_snr", "population_metrics", "real_figures",
           "apply_expert_labels", "evaluate_real", "format_real", "plot_reliability"]

log = logging.getLogger(__name__)

#: the real packet folders of ``../shared/data`` that are measurement sets only (never training)
MEASUREMENT_SETS = ("ztf/alerts", "ztf/alerts_drb", "rubin/alerts")
#: ... of which these may touch training as braai-labelled or unlabelled triplets
#: (``train --teacher-packets`` / ``--adapt-packets``)
TEACHER_SETS = ("ztf/alerts",)
#: model-metadata key listing the candids of every real packet a training run used
TRAINING_CANDIDS_KEY = "real_training_candids"
#: ZTF "near a bright catalogued source": nearest reference-catalogue source brighter than this (mag)
BRIGHT_MAGNR = 17.0
#: ... and closer than this (arcsec)
BRIGHT_DISTNR_ARCSEC = 1.0
#: Rubin proxy: template peak within CENTRE_RADIUS_PX of the source at least this many sigma
RUBIN_TEMPLATE_SNR = 100.0
#: radius (pixels) around the source where the template peak is looked for
CENTRE_RADIUS_PX = 2.0
#: science dip: the science cutout's mean over the (2 h + 1)^2 box at the source this many sigma
#: (white-noise sigma of that mean, from the cutout's MAD) below its median
SCIENCE_DIP_SIGMA = 5.0
#: ... with this half-width h (pixels)
SCIENCE_DIP_HALF = 2
#: issue #13's target: at most this fraction of own-score-real alerts called bogus
FNR_TARGET = 0.05
#: exposures with fewer alerts are counted, not printed (all are in the JSON)
_PRINT_MIN_N = 10


# ----------------------------------------------------------------------------- the rule

def refuse_measurement_sets(paths, *, allowed: tuple[str, ...] = ()) -> None:
    """Refuse training on a real measurement set (:data:`MEASUREMENT_SETS`).

    Parameters
    ----------
    paths : path or iterable of paths
    allowed : tuple of str
        Sets this training path may use (the teacher and adaptation paths: :data:`TEACHER_SETS`).

    Raises
    ------
    InputError
        A path that is, or lies inside, a folder ``.../data/<set>`` of :data:`MEASUREMENT_SETS`
        not in ``allowed``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        parts = Path(p).resolve().parts
        for s in (m for m in MEASUREMENT_SETS if m not in allowed):
            want = ("data", *s.split("/"))
            if any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
                raise InputError(f"real packets of the measurement set '{s}' must not touch training (the "
                                 "real-data rule, README): label other alerts, or train without them", path=str(p))


def training_candids(metadata: dict) -> set[int]:
    """The candids of the real packets a model was trained on (:data:`TRAINING_CANDIDS_KEY` of its
    metadata; none when the key is absent).

    Raises
    ------
    InputError
        The key holds something other than a list of integers.
    """
    vals = metadata.get(TRAINING_CANDIDS_KEY) or []
    try:
        if isinstance(vals, (str, bytes, dict)):
            raise TypeError
        return {int(v) for v in vals}
    except (TypeError, ValueError):
        raise InputError(f"model metadata '{TRAINING_CANDIDS_KEY}' must be a list of candids (integers)") from None


def drop_trained(records: list, trained: set[int]) -> np.ndarray:
    """Indices of ``records`` whose ``candid`` is not in ``trained`` (the rows a figure may use)."""
    def listed(r):
        c = r.get("candid")
        return c is not None and int(c) in trained
    return np.array([i for i, r in enumerate(records) if not listed(r)], dtype=np.int64)


# ----------------------------------------------------------------------------- populations

def _template_snr(template: np.ndarray) -> float:
    """Peak of the template within :data:`CENTRE_RADIUS_PX` of the centre pixel above the cutout's
    median, in units of its 1.4826 x MAD (NaN without finite pixels or noise)."""
    from nightsift.kernels.background import median_mad_sigma

    t = np.asarray(template, np.float64)
    c = t.shape[0] // 2
    yy, xx = np.indices(t.shape)
    near = (yy - c) ** 2 + (xx - c) ** 2 <= CENTRE_RADIUS_PX ** 2
    med, sig = (float(v) for v in median_mad_sigma(t))
    peak = t[near & np.isfinite(t)]
    if not peak.size or not (np.isfinite(sig) and sig > 0):
        return float("nan")
    return (float(peak.max()) - med) / sig


def science_dip_snr(science: np.ndarray) -> float:
    """The science cutout's mean over the :data:`SCIENCE_DIP_HALF` box at the centre, minus its median,
    in units of the white-noise sigma of that mean (1.4826 x MAD / box side); NaN without noise.
    Correlated noise makes the sigma an underestimate, so the flag errs towards calling dips."""
    from nightsift.kernels.background import median_mad_sigma

    t = np.asarray(science, np.float64)
    c, h = t.shape[0] // 2, SCIENCE_DIP_HALF
    box = t[c - h:c + h + 1, c - h:c + h + 1]
    med, sig = (float(v) for v in median_mad_sigma(t))
    box = box[np.isfinite(box)]
    if not box.size or not (np.isfinite(sig) and sig > 0):
        return float("nan")
    return (float(box.mean()) - med) / (sig / np.sqrt(box.size))


def _dip(science: np.ndarray | None) -> str:
    snr = science_dip_snr(science) if science is not None else float("nan")
    return "unknown" if not np.isfinite(snr) else ("dip" if snr <= -SCIENCE_DIP_SIGMA else "no dip")


def _bright(rec: dict, template: np.ndarray | None) -> str:
    if rec.get("survey") == "rubin":
        snr = _template_snr(template) if template is not None else float("nan")
        rec["template_snr"] = snr
        return "unknown" if not np.isfinite(snr) else ("bright" if snr >= RUBIN_TEMPLATE_SNR else "not bright")
    d, m = rec.get("distnr"), rec.get("magnr")
    if d is None or m is None or not (np.isfinite(d) and np.isfinite(m)) or d < 0:
        return "unknown"
    return "bright" if (d < BRIGHT_DISTNR_ARCSEC and m < BRIGHT_MAGNR) else "not bright"


def _exposure(rec: dict) -> str:
    if rec.get("survey") == "rubin":
        return f"visit {rec.get('visit')}"
    jd = rec.get("jd")
    return f"nid {rec.get('nid')} jd {jd:.5f}" if jd is not None else f"nid {rec.get('nid')}"


def populations(records: list, triplets: np.ndarray | None = None) -> dict[str, list[str]]:
    """The population of each record along each dimension (module docstring).

    Parameters
    ----------
    records : list of dict (n,)
        ZTF-named records (:func:`nightsift.engine.io.packets.read_packets`).
    triplets : ndarray (n, size, size, 3), optional
        The triplets: Rubin's bright-source proxy reads the template (channel 1); without them a
        Rubin record is ``unknown``. Rubin records get ``template_snr`` added.

    Returns
    -------
    dict: ``{"bright_star": [...], "sign": [...], "exposure": [...], "science_dip": [...]}``, one
    label per record (``science_dip``: ``"dip"``, ``"no dip"`` or, without triplets or noise,
    ``"unknown"``; :func:`science_dip_snr`).
    """
    out: dict[str, list[str]] = {"bright_star": [], "sign": [], "exposure": [], "science_dip": []}
    for i, r in enumerate(records):
        out["bright_star"].append(_bright(r, None if triplets is None else triplets[i, :, :, 1]))
        out["science_dip"].append(_dip(None if triplets is None else triplets[i, :, :, 0]))
        out["sign"].append("negative" if str(r.get("isdiffpos")).lower() in ("f", "0", "false", "-") else "positive")
        out["exposure"].append(_exposure(r))
    return out


# ----------------------------------------------------------------------------- metrics

def _versus(labels: np.ndarray, scores: np.ndarray, thr: float, *, n_boot: int, seed: int) -> dict:
    """ROC AUC and AUCPR of ``scores`` against ``labels`` with bootstrap intervals; null with a reason
    when a class is absent."""
    npos, nneg = int(labels.sum()), int((~labels).sum())
    m: dict = {"n_pos": npos, "n_neg": nneg}
    if npos == 0 or nneg == 0:
        m.update(roc_auc=None, aucpr=None, roc_auc_ci95=None, aucpr_ci95=None,
                 null_reason=f"one class only ({npos} real, {nneg} bogus by the reference)")
        return m
    m["roc_auc"], m["aucpr"] = roc_auc(labels, scores), average_precision(labels, scores)
    ci = bootstrap_ci(labels, scores, thr, n_boot=n_boot, seed=seed)
    m["roc_auc_ci95"], m["aucpr_ci95"] = ci.get("roc_auc_ci95"), ci.get("aucpr_ci95")
    return m


def population_metrics(own: np.ndarray, ns: np.ndarray, thr: float, *, braai: np.ndarray | None = None,
                       n_boot: int = 1000, seed: int = 0) -> dict:
    """The figures of one population.

    Parameters
    ----------
    own : ndarray (n,) float
        The packets' own score (NaN: none; those rows are left out of ``vs_own``).
    ns : ndarray (n,) float
        nightsift's score.
    thr : float
        nightsift's operating threshold (real when ``ns >= thr``).
    braai : ndarray (n,) float, optional
        braai's score (NaN: not scored).

    Returns
    -------
    dict: ``n``; ``vs_own`` (:func:`_versus` against ``own >= 0.5``); ``own_real_called_bogus``
    (``n``, ``k``, ``fraction``, ``ci95``: own-real alerts with ``ns < thr``) and its other side,
    ``own_bogus_called_real`` (own-bogus alerts with ``ns >= thr``): a threshold can buy the first
    with the second, so the two are reported together; ``called_real`` (nightsift's fraction
    ``ns >= thr``); with braai, ``vs_braai``, ``braai_real_called_bogus`` and ``braai_bogus_called_real``.
    """
    ok = np.isfinite(own)
    real = own[ok] >= 0.5
    m = {"n": int(len(ns)), "vs_own": _versus(real, ns[ok], thr, n_boot=n_boot, seed=seed),
         "own_real_called_bogus": _called(ns[ok][real], thr, real=True),
         "own_bogus_called_real": _called(ns[ok][~real], thr, real=False),
         "called_real": float(np.mean(ns >= thr)) if len(ns) else None}
    if braai is not None and np.isfinite(braai).any():
        fb = np.isfinite(braai)
        breal = braai[fb] >= 0.5
        m["vs_braai"] = _versus(breal, ns[fb], thr, n_boot=n_boot, seed=seed)
        m["braai_real_called_bogus"] = _called(ns[fb][breal], thr, real=True)
        m["braai_bogus_called_real"] = _called(ns[fb][~breal], thr, real=False)
    return m


def _called(scores: np.ndarray, thr: float, *, real: bool) -> dict:
    """How many of ``scores`` (alerts of one reference class) land on the other side of ``thr``:
    real ones below it, bogus ones at or above it; with a Clopper-Pearson interval."""
    n, k = len(scores), int(np.sum(scores < thr) if real else np.sum(scores >= thr))
    lo, hi = binomial_ci(k, n)
    return {"n": n, "k": k, "fraction": k / n if n else None, "ci95": [lo, hi] if n else None}


def _group_result(idx: np.ndarray, records: list, pops: dict, ns, own, braai, thr: float, *, n_boot: int,
                  seed: int) -> dict:
    """Overall, per-population figures and the reliability curve of one ``survey:own score`` group."""
    b = None if braai is None else braai[idx]
    res = {"n": int(len(idx)), "own_score": records[idx[0]]["own_score_name"],
           "overall": population_metrics(own[idx], ns[idx], thr, braai=b, n_boot=n_boot, seed=seed),
           "populations": {}}
    for dim, labels in pops.items():
        lab = np.array(labels, dtype=object)[idx]
        res["populations"][dim] = {
            str(k): population_metrics(own[idx][lab == k], ns[idx][lab == k], thr,
                                       braai=None if b is None else b[lab == k], n_boot=n_boot, seed=seed)
            for k in sorted(set(lab), key=str)}
    ok = np.isfinite(own[idx])
    res["reliability"] = reliability_curve(own[idx][ok] >= 0.5, ns[idx][ok])
    return res


# ----------------------------------------------------------------------------- the driver

def evaluate_real(paths, *, config: ClassifyConfig, braai_model: str | os.PathLike | None = None,
                  out_dir: str | os.PathLike | None = None, n_boot: int = 1000, seed: int = 0,
                  num_threads: int | None = None, n_worst: int = 8, labels: str | os.PathLike | None = None) -> dict:
    """``nightsift evaluate --real``: the figures of the module docstring on real packets.

    Parameters
    ----------
    paths : path or iterable of paths
        Packet files or folders of ``*.avro`` (ZTF and/or Rubin).
    config : ClassifyConfig
        nightsift's scorer (the shipped model by default) and its operating threshold.
    braai_model : path, optional
        braai's d6_m7 files: ZTF packets are also compared with ``braai >= 0.5`` (Rubin: not scored).
    out_dir : path, optional
        Where ``real_evaluation.json``, ``real_reliability.png`` and ``real_worst.png`` go.
    n_boot, seed : int
        Bootstrap resamples (0: no intervals) and their seed.
    labels : path, optional
        A ``nightsift label`` database: its expert labels become the reference of the packets they
        name (:func:`apply_expert_labels`; group ``<survey>:expert``).

    Returns
    -------
    dict: ``model``, ``threshold``, ``n_files``, ``n``, ``skipped``, ``warnings``,
    ``dropped_trained``, ``groups`` (per ``survey:own score``: :func:`_group_result`), and with
    ``labels`` the counts ``expert_labels``.

    Raises
    ------
    InputError
        No readable packet, or every packet's candid listed in the model's training candids.
    """
    from ..io.packets import read_packets
    from .runtime import load_scorer, resolve_model

    ps = read_packets(paths, keep_stamps=braai_model is not None)
    spec = resolve_model(config)  # the one reader of model metadata
    if spec is None:
        raise InputError("classify.backend is 'none': nothing to evaluate", stage="classify")
    warns: list[str] = []
    keep = _apply_rule(ps, spec, warns)
    scorer = load_scorer(config, num_threads=num_threads)
    records, trips = [ps.records[i] for i in keep], ps.triplets[keep]
    expert = apply_expert_labels(records, labels) if labels is not None else None
    ns = np.asarray(scorer.score(trips), np.float64)
    braai = _braai(ps, keep, braai_model, warns) if braai_model is not None else None
    thr = float(scorer.threshold)
    groups = real_figures(records, ns, threshold=thr, triplets=trips, braai=braai, n_boot=n_boot, seed=seed)
    res = {"model": repr(scorer), "model_metadata": str(spec.metadata_path) if spec.metadata_path else None,
           "threshold": thr, "fnr_target": FNR_TARGET, "n_files": ps.n_files, "n": len(records),
           "skipped": list(ps.skipped), "warnings": warns, "dropped_trained": int(len(ps.records) - len(keep)),
           "real_data_rule": f"measurement sets {list(MEASUREMENT_SETS)}: never trained on; packets whose candid "
                             f"is listed in the model metadata's '{TRAINING_CANDIDS_KEY}' are dropped",
           "populations_used": _populations_used(), "groups": groups}
    if expert is not None:
        res["expert_labels"] = expert
    if out_dir is not None:
        _write(Path(out_dir), res, trips, records, ns, braai, n_worst=n_worst)
    return res


def apply_expert_labels(records: list, db) -> dict:
    """Expert labels as the reference: each record whose candid has a latest label ``real`` or
    ``bogus`` in the ``nightsift label`` database ``db`` gets own score 1 or 0 under the name
    ``expert`` (its survey's score is kept as ``survey_score``); ``interesting`` and unlabelled
    records keep their survey's score (:meth:`.LabelStore.real_bogus`). In place; returns the
    counts ``n_labels``, ``n_used``, ``n_interesting_left`` and ``n_not_in_packets`` (real/bogus
    labels of candidates not among the packets).

    Raises
    ------
    InputError
        ``db`` is missing or not a label database, or none of its labels names a packet here.
    """
    from ..discover.labels import LabelStore

    if not Path(db).is_file():
        raise InputError("no such label database", path=str(db))
    labels, interesting = LabelStore(db).real_bogus()
    by_candid = {int(r["candid"]): r for r in records if r.get("candid") is not None}
    used = 0
    for candid, lab in labels.items():
        r = by_candid.get(candid)
        if r is None:
            continue
        r["survey_score"] = {"name": r.get("own_score_name"), "value": r.get("own_score")}
        r["own_score_name"], r["own_score"] = "expert", float(lab)
        used += 1
    counts = {"n_labels": len(labels) + interesting, "n_used": used, "n_interesting_left": interesting,
              "n_not_in_packets": len(labels) - used}
    if not used:
        raise InputError(f"none of the expert labels names a packet evaluated here: {counts}", path=str(db))
    return counts


def real_figures(records: list, ns: np.ndarray, *, threshold: float, triplets: np.ndarray | None = None,
                 braai: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per ``survey:own score`` group (first-seen order): overall and per-population figures
    (:func:`population_metrics`, :func:`populations`) and the reliability curve of ``ns``.

    Parameters
    ----------
    records : list of dict (n,)
        With ``survey``, ``own_score_name``, ``own_score`` (None: none) and the population fields.
    ns : ndarray (n,)
        nightsift's scores.
    threshold : float
        nightsift's operating threshold.
    triplets : ndarray (n, size, size, 3), optional
        For Rubin's bright-source proxy.
    braai : ndarray (n,), optional
        braai's scores (NaN: not scored).
    """
    ns = np.asarray(ns, np.float64)
    own = _own(records)
    pops = populations(records, triplets)
    keys = np.array([f"{r['survey']}:{r['own_score_name']}" for r in records])
    return {k: _group_result(np.flatnonzero(keys == k), records, pops, ns, own, braai, threshold, n_boot=n_boot,
                             seed=seed) for k in dict.fromkeys(keys.tolist())}


def _own(records: list) -> np.ndarray:
    return np.array([np.nan if r["own_score"] is None else r["own_score"] for r in records], np.float64)


def _apply_rule(ps, spec, warns: list) -> np.ndarray:
    """Rows of ``ps`` that touched no training of ``spec``'s model (the rule); loud about the rest."""
    trained = training_candids(spec.metadata)
    keep = drop_trained(ps.records, trained)
    n_drop = len(ps.records) - len(keep)
    if n_drop:
        msg = (f"{n_drop} of {len(ps.records)} packets DROPPED: their candids are listed in the model metadata's "
               f"'{TRAINING_CANDIDS_KEY}' ({spec.metadata_path}): they touched training, no figure is reported on them")
        log.warning(msg)
        warns.append(msg)
    if not len(keep):
        raise InputError(f"every one of the {len(ps.records)} packets touched training of this model (candids listed "
                         f"in '{TRAINING_CANDIDS_KEY}' of {spec.metadata_path}): nothing may be measured on them; "
                         "evaluate on other packets", path=str(spec.metadata_path))
    return keep


def _braai(ps, keep: np.ndarray, braai_model, warns: list) -> np.ndarray:
    from .crossdomain import _braai_scores

    return np.asarray(_braai_scores(ps, braai_model, False, warns), np.float64)[keep]


def _populations_used() -> dict:
    return {"bright_star": {"ztf": f"distnr < {BRIGHT_DISTNR_ARCSEC:g}\" and magnr < {BRIGHT_MAGNR:g}",
                            "rubin": f"template cutout peak within {CENTRE_RADIUS_PX:g} px of the source >= "
                                     f"{RUBIN_TEMPLATE_SNR:g} x its 1.4826 MAD above its median (proxy: Rubin "
                                     "packets carry no brightness of the nearest catalogued source)"},
            "sign": "isdiffpos", "exposure": {"ztf": "nid + jd (one exposure)", "rubin": "visit"},
            "science_dip": f"science cutout's mean over the central {2 * SCIENCE_DIP_HALF + 1}^2 px <= "
                           f"-{SCIENCE_DIP_SIGMA:g} sigma of that mean (white noise from its MAD) below its median"}


def _write(out: Path, res: dict, trips, records, ns, braai, *, n_worst: int) -> None:
    from .crossdomain import plot_most_wrong
    from .reports import write_json

    write_json(out / "real_evaluation.json", res)
    plot_reliability(res["groups"], out / "real_reliability.png", threshold=res["threshold"])
    names = [f"{r['survey']} {r.get('candid')} ({'-' if r.get('isdiffpos') == 'f' else '+'}, "
             f"{r['own_score_name']})" for r in records]
    other = np.full(len(ns), np.nan) if braai is None else braai
    plot_most_wrong(trips, ns, _own(records), other, names, out / "real_worst.png", n_worst=n_worst, reference_name="own",
                    other_name="braai")


def plot_reliability(groups: dict, path, *, threshold: float) -> Path:
    """Reliability diagram PNG: per group, nightsift's mean score per bin against the fraction of
    the bin the own score calls real (marker area ~ count), with the diagonal and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.plot([0, 1], [0, 1], ls=":", c="k", lw=1)
    ax.axvline(threshold, ls="--", c="0.6", lw=1, label=f"threshold {threshold:.2f}")
    for j, (key, g) in enumerate(groups.items()):
        c = g["reliability"]
        cnt = np.array(c["count"], float)
        x, y = np.array(c["mean_score"], float), np.array(c["fraction_real"], float)
        ok = cnt > 0
        ax.plot(x[ok], y[ok], "-", c=f"C{j}", lw=1)
        ax.scatter(x[ok], y[ok], s=8 + 200 * cnt[ok] / max(cnt.max(), 1), c=f"C{j}",
                   label=f"{key} (n={g['n']}, ECE {c['ece']:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("nightsift score (bin mean)")
    ax.set_ylabel("fraction real by the packet's own score")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("nightsift on real packets: reliability", fontsize=10)
    return save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------- the table

def _fig(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None:
        return f"{'-':>19s}"
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:.3f} [{ci[0]:.2f},{ci[1]:.2f}]" if ci else f"{m[key]:.3f}{'':12s}"


def _frac(cb: dict) -> str:
    return f"{cb['fraction']:6.1%} [{cb['ci95'][0]:.0%},{cb['ci95'][1]:.0%}]" if cb["n"] else f"{'-':>17s}"


def _line(name: str, m: dict) -> str:
    v = m["vs_own"]
    s = (f"  {name:24s} {m['n']:5d} {v['n_pos']:4d}/{v['n_neg']:<4d} {_fig(v, 'roc_auc')} {_fig(v, 'aucpr')} "
         f"{_frac(m['own_real_called_bogus'])} {_frac(m['own_bogus_called_real'])}")
    if "vs_braai" in m:
        s += (f"   vs braai: AUC {_fig(m['vs_braai'], 'roc_auc')} real called bogus "
              f"{_frac(m['braai_real_called_bogus'])} bogus called real {_frac(m['braai_bogus_called_real'])}")
    if v.get("null_reason"):
        s += f"  ({v['null_reason']})"
    return s


def format_real(res: dict) -> str:
    """The printed table of :func:`evaluate_real`'s result."""
    lines = [f"{res['n']} alerts from {res['n_files']} packet files ({len(res['skipped'])} skipped, "
             f"{res['dropped_trained']} dropped as trained-on); nightsift {res['model']}, threshold "
             f"{res['threshold']:.3g}; target: own-real called bogus <= {res['fnr_target']:.0%}"]
    for key, g in res["groups"].items():
        lines.append(f"{key}: nightsift vs {g['own_score']} >= 0.5 (ECE {g['reliability']['ece']:.3f})")
        lines.append(f"  {'population':24s} {'n':>5s} real/bog {'ROC AUC [95%]':>19s} {'AUCPR [95%]':>19s} "
                     f"{'real called bogus':>17s} {'bogus called real':>17s}")
        lines.append(_line("overall", g["overall"]))
        for dim, pops in g["populations"].items():
            small = 0
            for name, m in pops.items():
                if dim == "exposure" and m["n"] < _PRINT_MIN_N:
                    small += 1
                    continue
                lines.append(_line(f"{dim}: {name}" if dim != "exposure" else name, m))
            if small:
                lines.append(f"  ({small} exposures with < {_PRINT_MIN_N} alerts: in the JSON)")
    return "\n".join(lines)
