"""The retrospective search: would the anomaly score have found a class of events nobody trained on?

As in the literature's tests of anomaly detectors on survey streams: take one class of real events
out of the training data entirely, retrain the real/bogus CNN, fit the anomaly model on what the
model was trained on (the reference population), run a held-out night, and report where the
held-out events rank among all its candidates by anomaly score.

:func:`run_retrospective` does it on simulated data (:mod:`nightsift.engine.classify.dataset`):

1. the dataset's training and validation rows lose every real event of the held-out ``kind``
   (``nuclear``: transients on galaxy nuclei by default; ``variable`` or ``isolated`` too);
2. a CNN is trained on the rest (:func:`nightsift.engine.classify.train.train_model`);
3. the anomaly model (:func:`.anomaly.fit_anomaly`) is fitted on the embedding and features of the
   training rows;
4. the held-out night is the dataset's test split: CCD-visits no model saw, with every kind of real
   event and bogus the chain produces;
5. :func:`rank_report` gives, for the held-out events, their percentile among all the night's
   candidates (1 = the most anomalous), the median percentile, and the recall in the top 1 % and
   5 % of the ranking, next to what a random ranking gives (0.5, 0.01, 0.05). The same is
   reported for the embedding alone and the features alone, and for ``1 - rb``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..plotting import save_figure
from ..io.atomic import file_sha256
from .anomaly import candidate_features, fit_anomaly, save_anomaly

log = logging.getLogger("nightsift.discover")

__all__ = ["HOLDOUT_KINDS", "percentiles", "rank_report", "embed", "embed_data", "run_retrospective",
           "plot_retrospective"]

#: real-event kinds that can be held out (the simulator's transient kinds)
HOLDOUT_KINDS = ("nuclear", "variable", "isolated")


def percentiles(scores) -> np.ndarray:
    """Percentile of each score within ``scores``: the fraction of the others that score lower
    (ties count half), in [0, 1]; 1 = the most anomalous."""
    s = np.asarray(scores, dtype=np.float64)
    n = s.size
    if n < 2:
        return np.full(n, 0.5)
    order = np.sort(s)
    below = np.searchsorted(order, s, side="left")
    ties = np.searchsorted(order, s, side="right") - below - 1
    return (below + 0.5 * ties) / (n - 1)


def rank_report(scores, target, *, tops=(0.01, 0.05)) -> dict:
    """Where the ``target`` rows rank by ``scores`` (larger = ranked first).

    Parameters
    ----------
    scores : array_like (n,) float
    target : array_like (n,) bool
        The held-out events.
    tops : tuple of float
        Fractions of the ranking for the recall.

    Returns
    -------
    dict
        ``n``, ``n_target``, ``median_percentile`` (random: 0.5), ``mean_percentile``,
        ``recall_top_<p>pct`` = fraction of targets in the top ``ceil(p n)`` rows (random: p),
        ``lift_top_<p>pct`` = recall / p, and ``auc`` (the probability that a target outranks a
        non-target; = mean percentile against the others).
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(target, dtype=bool)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores and target must be 1-D of one length, got {s.shape}, {t.shape}")
    n, k = s.size, int(t.sum())
    out = {"n": int(n), "n_target": k}
    if k == 0 or n < 2:
        return out
    pct = percentiles(s)
    out["median_percentile"] = float(np.median(pct[t]))
    out["mean_percentile"] = float(np.mean(pct[t]))
    # rank with ties broken against the target (no credit for ties)
    order = np.lexsort((t.astype(int), -s))
    for p in tops:
        m = int(np.ceil(p * n))
        r = float(t[order[:m]].sum() / k)
        out[f"recall_top_{p * 100:g}pct"] = r
        out[f"lift_top_{p * 100:g}pct"] = r / p
    if k < n:
        from scipy.stats import rankdata

        ranks = rankdata(s)
        out["auc"] = float((ranks[t].sum() - k * (k + 1) / 2) / (k * (n - k)))
    return out


def embed(model, inputs, *, batch_size: int = 512) -> np.ndarray:
    """CNN embedding ``(n, dim)`` float32 of preprocessed inputs ``(n, 63, 63, 3)``."""
    from ..classify.model import embedding_model

    x = np.asarray(inputs, dtype=np.float32)
    em = embedding_model(model)
    if len(x) == 0:
        return np.zeros((0, int(em.output.shape[-1])), np.float32)
    return np.asarray(em.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def _inputs_in_chunks(data, chunk: int = 4096):
    for i in range(0, len(data), chunk):
        yield data.inputs(slice(i, i + chunk))


def embed_data(model, data) -> np.ndarray:
    """:func:`embed` of every row of a dataset (``RBData``), in chunks of 4096."""
    parts = [embed(model, x) for x in _inputs_in_chunks(data)]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def _hold_out(data, holdout: str):
    """Split ``data`` for the retrospective search.

    Returns
    -------
    (train, val, night, target, counts)
        The training and validation rows less every real ``holdout`` event, the held-out night
        (the test split), the mask of its real ``holdout`` events, and the report's counts.

    Raises
    ------
    ValueError
        The night has no real ``holdout`` event.
    """
    is_held = (data.truth["label"] == 1) & (data.truth["kind"] == holdout)
    train = data.select((data.domain["split"] == "train") & ~is_held)
    val = data.select((data.domain["split"] == "val") & ~is_held)
    night = data.split("test")
    target = (night.truth["label"] == 1) & (night.truth["kind"] == holdout)
    if target.sum() == 0:
        raise ValueError(f"the held-out night has no real '{holdout}' event: use more or larger units "
                         f"(kinds there: {sorted(set(night.truth['kind']))})")
    kinds = night.truth["kind"]
    counts = {"n_train": len(train), "n_val": len(val),
              "n_removed_from_training": int(((data.domain["split"] != "test") & is_held).sum()),
              "n_night": len(night), "n_night_target": int(target.sum()),
              "night_kinds": {str(k): int((kinds == k).sum()) for k in np.unique(kinds)}}
    return train, val, night, target, counts


def _anomaly_scores(emb_ref, feat_ref, emb_night, feat_night, **fit_kw):
    """Fit :func:`.anomaly.fit_anomaly` on the reference three ways (embedding + features, the
    embedding alone, the features alone) and score the night with each.

    Returns
    -------
    (AnomalyModel, dict)
        The embedding + features model, and the night's scores by name (``"anomaly"``,
        ``"embedding"``, ``"features"``).
    """
    both = fit_anomaly(emb_ref, feat_ref, **fit_kw)
    scores = {"anomaly": both.score(emb_night, feat_night),
              "embedding": fit_anomaly(emb_ref, None, **fit_kw).score(emb_night, None),
              "features": fit_anomaly(None, feat_ref, **fit_kw).score(None, feat_night)}
    return both, scores


def _save_embeddings(path, emb_ref, feat_ref, emb_night, feat_night, rb_night, target, night) -> None:
    """``embeddings.npz``: reference and night embeddings (float16), features, the night's rb,
    target mask and truth (``night_kind``, ``night_label``)."""
    np.savez_compressed(path, emb_ref=emb_ref.astype(np.float16), feat_ref=feat_ref,
                        emb_night=emb_night.astype(np.float16), feat_night=feat_night, rb_night=rb_night,
                        target=target, night_kind=night.truth["kind"], night_label=night.truth["label"])


def run_retrospective(*, holdout: str = "nuclear", spec=None, data_dir="nightsift-data", out_dir="nightsift-retro",
                      method: str = "knn", epochs: int = 15, batch_size: int = 64, patience: int = 4,
                      model_kwargs=None, seed: int = 0, threads: int | None = None, workers: int = 1,
                      n_trees: int = 200, n_components: int = 4, config=None, progress: bool = True,
                      verbose: int = 0, data=None, keep_embeddings: bool = False) -> dict:
    """Hold ``holdout`` out, retrain, rank the held-out night by anomaly (see the module docstring).

    Parameters
    ----------
    holdout : str
        One of :data:`HOLDOUT_KINDS`.
    spec : DatasetSpec, optional
        The simulated data (default: ``DatasetSpec(n_units=60, profiles=("ztf", "decam"),
        test_fraction=0.3)``: ZTF's wide pixels put many galaxy hosts on a small CCD).
    data_dir : path
        Dataset cache.
    out_dir : path
        ``retrospective.json``, ``retrospective.png``, the anomaly model ``anomaly.npz`` and the
        CNN ``rb_holdout.keras`` it goes with.
    method : {"iforest", "knn"}
    epochs, batch_size, patience, model_kwargs, seed, threads
        Training (:func:`nightsift.engine.classify.train.train_model`).
    n_trees, n_components
        Anomaly model (:func:`.anomaly.fit_anomaly`).
    data : RBData, optional
        Use this dataset instead of building ``spec``.
    keep_embeddings : bool
        Also write ``embeddings.npz`` (reference and night embeddings, features, rb, truth).

    Returns
    -------
    dict
        The report written to ``retrospective.json``: the held-out class, counts, the training
        history, and :func:`rank_report` for ``"anomaly"`` (embedding + features), ``"embedding"``,
        ``"features"``, ``"one_minus_rb"``, plus the same restricted to the candidates the
        retrained model calls real (``"anomaly_among_called_real"``).
    """
    from ..classify.dataset import DatasetSpec, build_dataset, load_dataset
    from ..classify.metrics import threshold_for_fnr
    from ..classify.model import save_keras_model
    from ..classify.train import predict_keras, train_model

    if holdout not in HOLDOUT_KINDS:
        raise ValueError(f"holdout must be one of {HOLDOUT_KINDS}, got {holdout!r}")
    t0 = time.perf_counter()
    if data is None:
        spec = spec or DatasetSpec(n_units=60, profiles=("ztf", "decam"), test_fraction=0.3, seed=44)
        data = load_dataset(build_dataset(data_dir, spec, config=config, workers=workers, progress=progress))
    train, val, night, target, counts = _hold_out(data, holdout)
    model, hist = train_model(train, val, epochs=epochs, batch_size=batch_size, patience=patience, seed=seed,
                              threads=threads, verbose=verbose, model_kwargs=model_kwargs)
    thr = threshold_for_fnr(val.labels, predict_keras(model, val.inputs()), 0.05)
    emb_ref, feat_ref = embed_data(model, train), candidate_features(train.features)
    emb_night, feat_night = embed_data(model, night), candidate_features(night.features)
    rb_night = predict_keras(model, night.inputs())

    out = Path(out_dir)
    rb_path = save_keras_model(model, out / "rb_holdout.keras")  # the first output: creates ``out``
    meta = {"rb_model": str(rb_path), "rb_model_sha256": file_sha256(rb_path), "holdout": holdout}
    anomaly, scores = _anomaly_scores(emb_ref, feat_ref, emb_night, feat_night, meta=meta, method=method,
                                      n_trees=n_trees, n_components=n_components, seed=seed)
    scores["one_minus_rb"] = 1.0 - rb_night.astype(np.float64)
    save_anomaly(anomaly, out / "anomaly.npz")
    if keep_embeddings:  # for studying other outlier measures without retraining
        _save_embeddings(out / "embeddings.npz", emb_ref, feat_ref, emb_night, feat_night, rb_night, target, night)
    called = rb_night >= thr
    rep = {
        "holdout": holdout, "method": method, **counts,
        "random": {"median_percentile": 0.5, "recall_top_1pct": 0.01, "recall_top_5pct": 0.05, "auc": 0.5},
        "rank": {k: rank_report(v, target) for k, v in scores.items()},
        "threshold": float(thr),
        "rank_among_called_real": rank_report(scores["anomaly"][called], target[called]) if called.sum() > 1 else {},
        "training": {k: hist[k] for k in ("epochs_run", "best_epoch", "wall_s")},
        "files": {"anomaly_model": str(out / "anomaly.npz"), "rb_model": str(rb_path)},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / "retrospective.json").write_text(json.dumps(rep, indent=1))
    plot_retrospective(scores["anomaly"], target, out / "retrospective.png", title=f"held out: {holdout}")
    return rep


def plot_retrospective(scores, target, path, *, title: str = "") -> Path:
    """PNG: anomaly-score histograms (held-out vs the rest) and recall against the fraction of the
    ranking inspected, with the random diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(scores, np.float64)
    t = np.asarray(target, bool)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(s.min(), s.max(), 40) if s.size and s.max() > s.min() else 10
    ax[0].hist(s[~t], bins=bins, density=True, alpha=0.6, label=f"other candidates ({int((~t).sum())})")
    ax[0].hist(s[t], bins=bins, density=True, alpha=0.6, label=f"held-out class ({int(t.sum())})")
    ax[0].set_xlabel("anomaly score")
    ax[0].legend(fontsize=8)
    order = np.lexsort((t.astype(int), -s))
    frac = np.arange(1, s.size + 1) / max(s.size, 1)
    rec = np.cumsum(t[order]) / max(int(t.sum()), 1)
    ax[1].plot(frac, rec, label="anomaly ranking")
    ax[1].plot(frac, frac, ":", color="k", label="random")
    for p in (0.01, 0.05):
        ax[1].axvline(p, color="0.6", lw=0.8)
    ax[1].set_xscale("log")
    ax[1].set_xlim(1 / max(s.size, 2), 1)
    ax[1].set_xlabel("fraction of the night inspected (most anomalous first)")
    ax[1].set_ylabel("recall of the held-out class")
    ax[1].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
