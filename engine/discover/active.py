"""The active-learning loop: expert labels into the next model, and what a labeled batch is worth.

* :func:`labeled_dataset` turns the labels of ``nightsift label`` (SQLite) and the alert packets
  they were given on into training rows (:class:`~nightsift.engine.classify.dataset.RBData`,
  normalised exactly as the simulated training data): ``nightsift train --with-labels DB
  --label-alerts DIR`` adds them to the training split (``run_training(extra_train=...)``).
* :func:`run_active_learning` measures the gain: from a model trained on an initial set, the
  labeling queue (:func:`nightsift.engine.discover.app.priority`: uncertainty near the threshold and
  anomaly, the order the page shows) picks a batch from a pool of unlabeled candidates; the truth of
  the simulation plays the expert. The model is retrained on the initial set plus that batch, and
  plus a random batch of the same size, with the same seeds, and both are evaluated on the same
  held-out test split (AUCPR, ROC AUC, FNR and FPR at the threshold chosen on validation for the
  target FNR). Repeated over seeds, the report gives the gain (queue - random) with its spread.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger("nightsift.discover")

__all__ = ["labeled_dataset", "select_batch", "run_active_learning"]


def labeled_dataset(db, alerts, *, interesting: str = "skip"):
    """Expert labels as training rows.

    Parameters
    ----------
    db : path
        The SQLite label database of ``nightsift label``; each candidate's latest label counts.
    alerts : path
        The alert ``.avro`` file or folder the labels were given on (their cutouts are the triplets).
    interesting : {"skip", "real", "bogus"}
        What an ``interesting`` label means for real/bogus training (default: left out).

    Returns
    -------
    (RBData, dict)
        Rows with ``truth.label`` 1 (real) / 0 (bogus), ``truth.kind`` ``expert_real`` /
        ``expert_bogus``, ``domain.instrument`` ``"expert"``, ``domain.split`` ``"train"``,
        triplets standardised with :func:`nightsift.engine.classify.preprocess.standardize`; and
        counts (``n_labels``, ``n_used``, ``n_interesting_skipped``, ``n_missing_alert``).

    Raises
    ------
    InputError
        No usable label (the message says why).
    """
    from ..classify.dataset import packet_rows
    from ..classify.preprocess import NORMALIZATION
    from ..io.avro import cutout_to_array
    from .app import CUTOUT_KINDS, load_alerts
    from .labels import LabelStore

    if interesting not in ("skip", "real", "bogus"):  # before the label database is opened (or created)
        raise ValueError(f"interesting must be skip, real or bogus, got {interesting!r}")
    latest, skipped = LabelStore(db).real_bogus(interesting=interesting)
    by_candid = {int(a["candid"]): (a, src) for a, src in load_alerts(alerts)}
    rows, labels, missing = [], [], 0
    for candid, lab in sorted(latest.items()):
        if candid not in by_candid:
            missing += 1
            continue
        rows.append(by_candid[candid])
        labels.append(lab)
    counts = {"n_labels": len(latest) + skipped, "n_used": len(rows), "n_interesting_skipped": skipped,
              "n_missing_alert": missing}
    if not rows:
        raise InputError(f"no usable expert label in {db} for the alerts in {alerts}: {counts}")
    trip = np.stack([np.stack([cutout_to_array(a[f], path=src) for f in CUTOUT_KINDS.values()], axis=-1)
                     for a, src in rows]).astype(np.float32)
    if trip.shape[1:] != (63, 63, 3):
        raise InputError(f"expert-labelled cutouts are {trip.shape[1:3]}, the model takes 63x63")
    cands = [a["candidate"] for a, _ in rows]
    meta = {"source": "expert labels", "db": str(db), "alerts": str(alerts), "normalization": NORMALIZATION, **counts,
            # real packets that touch training: the model metadata lists them, the real-data kit drops them
            "candids": [int(c["candid"]) for c in cands]}
    return packet_rows(trip, labels, cands, kinds=("expert_real", "expert_bogus"), instrument="expert",
                       meta=meta), counts


def select_batch(rb, anomaly, *, threshold: float, size: int, weight: float = 0.5) -> np.ndarray:
    """Indices of the ``size`` candidates the labeling queue shows first (highest
    :func:`~nightsift.engine.discover.app.priority`; ties by index)."""
    from .app import priority

    p, _, _ = priority(rb, anomaly, threshold=threshold, weight=weight)
    order = np.lexsort((np.arange(len(p)), -p))
    return order[: int(size)]


def _evaluate(model, val, test, target_fnr: float) -> dict:
    from ..classify.metrics import summary, threshold_for_fnr
    from ..classify.train import predict_keras

    thr = threshold_for_fnr(val.labels, predict_keras(model, val.inputs()), target_fnr)
    s = summary(test.labels, predict_keras(model, test.inputs()), thr)
    return {k: s[k] for k in ("aucpr", "roc_auc", "fnr", "fpr", "threshold")}


def _nanmean(v) -> float:
    """Mean of the finite values; NaN (quietly) when there is none (a metric undefined on a split
    without one of the classes)."""
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _one_seed(seed: int, units, train_all, val, test, *, initial_fraction, batch_size: int, weight: float,
              target_fnr: float, train_kw: dict) -> dict:
    """One repetition of :func:`run_active_learning`: split the training units into the initial
    set and the pool, train on the initial set, pick the queue's batch and a random batch of the
    same size from the pool, retrain with each, and evaluate the three models on ``test``."""
    from ..classify.metrics import threshold_for_fnr
    from ..classify.train import predict_keras, train_model
    from .anomaly import candidate_features, fit_anomaly
    from .retrospective import embed_data

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4242]))
    n_init = max(1, int(round(initial_fraction * len(units))))
    init_units = rng.choice(units, n_init, replace=False)
    in_init = np.isin(train_all.domain["unit"], init_units)
    initial, pool = train_all.select(in_init), train_all.select(~in_init)
    b = int(min(batch_size, len(pool)))
    kw = dict(train_kw, seed=int(seed), verbose=0)
    base, _ = train_model(initial, val, **kw)
    thr = threshold_for_fnr(val.labels, predict_keras(base, val.inputs()), target_fnr)
    rb_pool = predict_keras(base, pool.inputs()).astype(np.float64)
    an = fit_anomaly(embed_data(base, initial), candidate_features(initial.features), seed=int(seed))
    an_pool = an.score(embed_data(base, pool), candidate_features(pool.features))
    thr_q = float(np.clip(thr, 1e-3, 1 - 1e-3))
    queue = select_batch(rb_pool, an_pool, threshold=thr_q, size=b, weight=weight)
    rand = rng.choice(len(pool), b, replace=False)
    res = {"seed": int(seed), "n_initial": len(initial), "n_pool": len(pool), "batch_size": b,
           "initial": _evaluate(base, val, test, target_fnr)}
    for name, idx in (("queue", queue), ("random", rand)):
        batch = pool.select(np.sort(idx))
        model, _ = train_model(initial.append(batch), val, **kw)
        res[f"initial+{name}"] = _evaluate(model, val, test, target_fnr)
        res[f"{name}_batch_real_fraction"] = float(batch.labels.mean())
    return res


def _gain(runs: list[dict]) -> dict:
    """Per metric: mean and sd over the runs of (queue - random), and the means of (queue -
    initial) and (random - initial)."""
    gain = {}
    for m in ("aucpr", "roc_auc", "fnr", "fpr"):
        d_rand = np.array([r["initial+queue"][m] - r["initial+random"][m] for r in runs], float)
        d_init = np.array([r["initial+queue"][m] - r["initial"][m] for r in runs], float)
        d_ri = np.array([r["initial+random"][m] - r["initial"][m] for r in runs], float)
        gain[m] = {"queue_minus_random_mean": _nanmean(d_rand),
                   "queue_minus_random_sd": float(np.nanstd(d_rand, ddof=1))
                   if np.isfinite(d_rand).sum() > 1 else float("nan"),
                   "queue_minus_initial_mean": _nanmean(d_init),
                   "random_minus_initial_mean": _nanmean(d_ri)}
    return gain


def run_active_learning(*, spec=None, data_dir="nightsift-data", out_dir="nightsift-active", initial_fraction=0.3,
                        batch_size: int = 200, seeds=(0, 1, 2), weight: float = 0.5, epochs: int = 10,
                        patience: int = 3, model_kwargs=None, target_fnr: float = 0.01, threads: int | None = None,
                        workers: int = 1, config=None, progress: bool = True, data=None) -> dict:
    """Gain of a queue-selected labeled batch over a random batch of the same size (module docstring).

    Parameters
    ----------
    spec : DatasetSpec, optional
        Simulated data (default ``DatasetSpec(n_units=40, size=384)``).
    initial_fraction : float
        Share of the training split's CCD-visits the initial model is trained on; the rest is
        the unlabeled pool.
    batch_size : int
        Candidates labelled per batch (queue and random alike).
    seeds : tuple of int
        One repetition per seed (initial/pool split of the units, random batch, training).
    weight : float
        Queue ranking: weight of the uncertainty against the anomaly rank.
    epochs, patience, model_kwargs, target_fnr, threads
        Training and evaluation.
    data : RBData, optional
        Use this dataset instead of building ``spec``.

    Returns
    -------
    dict
        Per seed: test metrics of ``initial``, ``initial+queue``, ``initial+random``, the real
        fraction of each batch; and ``gain`` = mean and sd over seeds of (queue - random) and
        (queue - initial) per metric. Written to ``active_learning.json``.
    """
    from ..classify.dataset import DatasetSpec, build_dataset, load_dataset

    t0 = time.perf_counter()
    if data is None:
        spec = spec or DatasetSpec(n_units=40, size=384)
        data = load_dataset(build_dataset(data_dir, spec, config=config, workers=workers, progress=progress))
    train_all, val, test = data.split("train"), data.split("val"), data.split("test")
    units = np.unique(train_all.domain["unit"])
    if len(units) < 2:
        raise ValueError("active learning needs at least two training CCD-visits (initial set and pool)")
    train_kw = dict(epochs=epochs, patience=patience, threads=threads, model_kwargs=model_kwargs)
    runs = []
    for seed in seeds:
        res = _one_seed(seed, units, train_all, val, test, initial_fraction=initial_fraction, batch_size=batch_size,
                        weight=weight, target_fnr=target_fnr, train_kw=train_kw)
        runs.append(res)
        log.info("active learning seed %d: %s", seed, res)
    rep = {"batch_size": batch_size, "initial_fraction": initial_fraction, "weight": weight, "seeds": list(seeds),
           "n_train_split": len(train_all), "n_val": len(val), "n_test": len(test), "target_fnr": target_fnr,
           "runs": runs, "gain": _gain(runs), "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "active_learning.json").write_text(json.dumps(rep, indent=1))
    return rep
