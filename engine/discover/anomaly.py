"""Anomaly scores: how unlike a reference population an alert is, from the CNN's embedding plus
the candidate features.

The input of a candidate is its real/bogus CNN embedding (the ``embedding`` layer, 256 values,
:func:`nightsift.engine.classify.model.embedding_model`) and a few candidate features
(:data:`FEATURES`: log S/N, FWHM, elongation, log |S_corr|, bad pixels, distance to the nearest
reference source, sign). The embedding is standardised and reduced to its leading principal
components (fitted on the reference); the features are standardised robustly (median and IQR of
the reference). Two outlier measures are fitted on that space, both in plain numpy/scipy:

* ``"iforest"`` -- an isolation forest (Liu, Ting & Zhou 2008): random axis-parallel splits
  isolate a point in few steps when it is unlike the rest. The score is
  ``s = 2 ** (-E[h(x)] / c(psi))`` in (0, 1): about 0.5 or less for typical points, towards 1 for
  outliers (``h`` = path length, ``c(psi)`` = the average path length of an unsuccessful search
  in a binary tree of ``psi`` points).
* ``"knn"`` -- the mean distance to the ``k`` nearest reference points (a density estimate's
  inverse), in the standardised space.

A fitted :class:`AnomalyModel` is saved as one ``.npz`` (arrays and a JSON header; loaded with
``allow_pickle=False``), recording the real/bogus model it was fitted on (its file's SHA-256):
an embedding is only meaningful with the model that made it. :func:`annotate_alerts`
(``nightsift anomaly ALERTS --model anomaly.npz``) writes the score into the packets' nullable
``candidate.anomaly_score`` field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_write, file_sha256

__all__ = ["FEATURES", "METHODS", "IsolationForest", "AnomalyModel", "candidate_features", "fit_anomaly",
           "save_anomaly", "load_anomaly", "average_path_length", "annotate_alerts"]

#: candidate features the anomaly model uses besides the embedding, and how they are derived
FEATURES = ("log_snr", "fwhm", "elong", "log_scorr", "nbad", "log_distnr", "isdiffpos")
METHODS = ("iforest", "knn")
FORMAT = "nightsift-anomaly/1"


def average_path_length(n) -> np.ndarray:
    """``c(n)``: average path length of an unsuccessful binary-search-tree search among ``n``
    points, ``2 H(n-1) - 2 (n-1) / n`` with the harmonic number ``H(i) = ln i + 0.5772156649``;
    ``c(1) = 0``, ``c(2) = 1`` (Liu et al. 2008, eq. 1)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    big = n > 2
    m = n[big] - 1.0
    out[big] = 2.0 * (np.log(m) + np.euler_gamma) - 2.0 * m / n[big]
    out[n == 2] = 1.0
    return out


# ----------------------------------------------------------------------------- isolation forest

@dataclass(frozen=True)
class IsolationForest:
    """A fitted isolation forest as flat arrays (every tree's nodes one after the other).

    Attributes
    ----------
    feature : ndarray (m,) int32
        Split feature of each node; -1 for a leaf.
    threshold : ndarray (m,) float64
        Split value (go left when ``x[feature] < threshold``).
    left, right : ndarray (m,) int32
        Children (absolute node indices); -1 for a leaf.
    size : ndarray (m,) int32
        Training points that reached a leaf (0 for inner nodes).
    depth : ndarray (m,) int16
        Depth of each node (root 0).
    roots : ndarray (t,) int32
        Root node of each tree.
    subsample : int
        Points per tree (``psi``).
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    size: np.ndarray
    depth: np.ndarray
    roots: np.ndarray
    subsample: int

    @classmethod
    def fit(cls, x, *, n_trees: int = 200, subsample: int = 256, seed: int = 0, weights=None) -> "IsolationForest":
        """Grow ``n_trees`` trees, each on ``min(subsample, n)`` points drawn without replacement,
        to depth ``ceil(log2 subsample)``.

        Parameters
        ----------
        x : ndarray (n, d) float
            Reference points (finite).
        n_trees, subsample : int
        seed : int
        weights : ndarray (d,), optional
            Relative probability of splitting on each feature (among those not constant in the
            node); default uniform, as in Liu et al.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"isolation forest: need (n >= 2, d) points, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("isolation forest: points must be finite")
        if n_trees < 1 or subsample < 2:
            raise ValueError("isolation forest: n_trees >= 1 and subsample >= 2")
        rng = np.random.default_rng(seed)
        w = np.ones(x.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (x.shape[1],) or not (w >= 0).all() or not w.sum() > 0:
            raise ValueError(f"isolation forest: weights must be (d,) >= 0 with a positive sum, got {w}")
        psi = int(min(subsample, len(x)))
        limit = int(np.ceil(np.log2(psi)))
        feat, thr, left, right, size, depth, roots = [], [], [], [], [], [], []
        for _ in range(n_trees):
            sample = x[rng.choice(len(x), psi, replace=False)]
            roots.append(len(feat))
            stack = [(np.arange(psi), 0, None, None)]  # (points, depth, parent, side)
            while stack:
                idx, d, parent, side = stack.pop()
                node = len(feat)
                if parent is not None:
                    (left if side == 0 else right)[parent] = node
                pts = sample[idx]
                splittable = np.zeros(0, int)
                if len(idx) > 1 and d < limit:
                    lo, hi = pts.min(axis=0), pts.max(axis=0)
                    splittable = np.flatnonzero((hi > lo) & (w > 0))
                if splittable.size == 0:
                    feat.append(-1), thr.append(0.0), left.append(-1), right.append(-1)
                    size.append(len(idx)), depth.append(d)
                    continue
                q = int(rng.choice(splittable, p=w[splittable] / w[splittable].sum()))
                p = float(rng.uniform(lo[q], hi[q]))
                feat.append(q), thr.append(p), left.append(-1), right.append(-1), size.append(0), depth.append(d)
                go_left = pts[:, q] < p
                stack.append((idx[~go_left], d + 1, node, 1))
                stack.append((idx[go_left], d + 1, node, 0))
        return cls(np.array(feat, np.int32), np.array(thr, np.float64), np.array(left, np.int32),
                   np.array(right, np.int32), np.array(size, np.int32), np.array(depth, np.int16),
                   np.array(roots, np.int32), psi)

    def path_lengths(self, x) -> np.ndarray:
        """Path length ``h`` of each point in each tree: ``(n, n_trees)`` float64, the depth of the
        leaf reached plus ``c(leaf size)`` for the points the depth limit left unseparated."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"isolation forest: points must be (n, d), got {x.shape}")
        n = len(x)
        rows = np.arange(n)
        out = np.empty((n, len(self.roots)))
        for t, root in enumerate(self.roots):
            node = np.full(n, root, np.int64)
            while True:
                f = self.feature[node]
                inner = f >= 0
                if not inner.any():
                    break
                r = rows[inner]
                nd = node[inner]
                go_left = x[r, f[inner]] < self.threshold[nd]
                node[inner] = np.where(go_left, self.left[nd], self.right[nd])
            out[:, t] = self.depth[node] + average_path_length(self.size[node])
        return out

    def score(self, x) -> np.ndarray:
        """Anomaly score ``2 ** (-mean h / c(psi))`` of each point, (n,) float64 in (0, 1)."""
        h = self.path_lengths(x).mean(axis=1)
        return np.power(2.0, -h / float(average_path_length(self.subsample)))

    def arrays(self) -> dict:
        return {"if_feature": self.feature, "if_threshold": self.threshold, "if_left": self.left,
                "if_right": self.right, "if_size": self.size, "if_depth": self.depth, "if_roots": self.roots,
                "if_subsample": np.array(self.subsample)}

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> "IsolationForest":
        return cls(a["if_feature"], a["if_threshold"], a["if_left"], a["if_right"], a["if_size"], a["if_depth"],
                   a["if_roots"], int(a["if_subsample"]))


# ----------------------------------------------------------------------------- features

def candidate_features(candidates) -> np.ndarray:
    """The :data:`FEATURES` of candidates, ``(n, len(FEATURES))`` float64.

    Parameters
    ----------
    candidates : structured ndarray (CANDIDATE_DTYPE or a dataset's features) or list of dict
        Fields ``snr``, ``fwhm``, ``elong``, ``scorr``, ``nbad``, ``distnr``, ``isdiffpos``
        (packet ``candidate`` records: ``isdiffpos`` ``"t"``/``"f"``, nulls allowed).

    Returns
    -------
    ndarray (n, 7): ``log10 snr``, ``fwhm`` (px), ``elong``, ``log10 |scorr|``, ``nbad``,
    ``log10(1 + distnr)`` with no reference source (-999, null) as ``log10(1 + 100)``, and
    ``isdiffpos`` as 1/0. Missing or unmeasured values (NaN, fwhm <= 0, elong < 1) are NaN;
    :class:`AnomalyModel` replaces them by the reference median.
    """
    if isinstance(candidates, np.ndarray) and candidates.dtype.names:
        get = lambda k: np.asarray(candidates[k])  # noqa: E731
        isdiff = get("isdiffpos").astype(np.float64)
    else:
        cands = list(candidates)

        def get(k):
            return np.array([np.nan if c.get(k) is None else c.get(k) for c in cands], dtype=np.float64) \
                if k != "isdiffpos" else None

        isdiff = np.array([1.0 if c.get("isdiffpos") in ("t", "1", True, 1) else 0.0 for c in cands])
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.log10(np.asarray(get("snr"), np.float64))
        fwhm = np.asarray(get("fwhm"), np.float64)
        elong = np.asarray(get("elong"), np.float64)
        scorr = np.log10(np.abs(np.asarray(get("scorr"), np.float64)))
        nbad = np.asarray(get("nbad"), np.float64)
        dist = np.asarray(get("distnr"), np.float64)
    fwhm = np.where(fwhm > 0, fwhm, np.nan)
    elong = np.where(elong >= 1, elong, np.nan)
    dist = np.where(np.isfinite(dist) & (dist >= 0), dist, 100.0)
    out = np.column_stack([snr, fwhm, elong, scorr, nbad, np.log10(1.0 + np.minimum(dist, 100.0)), isdiff])
    out[~np.isfinite(out)] = np.nan
    return out




# ----------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class AnomalyModel:
    """A fitted anomaly model: preprocessing of (embedding, features) plus the outlier measure.

    Attributes
    ----------
    method : str
        ``"iforest"`` or ``"knn"``.
    emb_center, emb_scale : ndarray (e,)
        Standardisation of the embedding (mean, std of the reference; 1 where constant).
    components : ndarray (e, k)
        Principal axes of the standardised reference embedding (``k = 0``: embedding unused).
    feat_center, feat_scale : ndarray (f,)
        Median and IQR/1.349 of the reference features (``f = 0``: features unused).
    space_scale : ndarray (k + f,)
        Scale of each column of the final space (for kNN distances).
    column_weight : ndarray (k + f,)
        Share of each column: with both blocks, the embedding's ``k`` columns share one half and
        the ``f`` features the other (a 16-component embedding would otherwise drown 7 features);
        the kNN distance weighs column ``j`` by ``sqrt(column_weight[j])`` and the isolation
        forest splits on it with probability ``column_weight[j]``.
    forest : IsolationForest or None
    reference : ndarray (m, k + f) or None
        kNN reference points.
    k : int
        Neighbours for kNN.
    meta : dict
        ``features``, ``rb_model`` (path), ``rb_model_sha256``, ``n_reference``, ``seed``,
        ``reference_scores`` quantiles, ... (JSON).
    """

    method: str
    emb_center: np.ndarray
    emb_scale: np.ndarray
    components: np.ndarray
    feat_center: np.ndarray
    feat_scale: np.ndarray
    space_scale: np.ndarray
    column_weight: np.ndarray
    forest: IsolationForest | None = None
    reference: np.ndarray | None = None
    k: int = 10
    meta: dict = field(default_factory=dict)

    @property
    def uses_embedding(self) -> bool:
        return self.components.shape[1] > 0

    @property
    def uses_features(self) -> bool:
        return self.feat_center.size > 0

    def transform(self, embedding=None, features=None) -> np.ndarray:
        """(embedding (n, e), features (n, f)) -> the model's space (n, k + f)."""
        parts = []
        n = None
        if self.uses_embedding:
            if embedding is None:
                raise InputError("this anomaly model needs the CNN embedding of the candidates")
            e = np.asarray(embedding, dtype=np.float64)
            if e.ndim != 2 or e.shape[1] != self.emb_center.size:
                raise InputError(f"embedding must be (n, {self.emb_center.size}), got {e.shape}")
            parts.append(((e - self.emb_center) / self.emb_scale) @ self.components)
            n = len(e)
        if self.uses_features:
            if features is None:
                raise InputError("this anomaly model needs the candidate features")
            f = np.asarray(features, dtype=np.float64)
            if f.ndim != 2 or f.shape[1] != self.feat_center.size:
                raise InputError(f"features must be (n, {self.feat_center.size}), got {f.shape}")
            if n is not None and len(f) != n:
                raise InputError(f"{len(f)} feature rows for {n} embeddings")
            f = np.where(np.isfinite(f), f, self.feat_center)  # missing -> the reference median
            parts.append((f - self.feat_center) / self.feat_scale)
        return np.hstack(parts)

    def score(self, embedding=None, features=None) -> np.ndarray:
        """Anomaly score of each candidate, (n,) float64, larger = more anomalous."""
        z = self.transform(embedding, features)
        if len(z) == 0:
            return np.zeros(0)
        if self.method == "iforest":
            return self.forest.score(z)
        from scipy.spatial import cKDTree

        w = np.sqrt(self.column_weight) / self.space_scale
        d, _ = cKDTree(self.reference * w).query(z * w, k=min(self.k, len(self.reference)))
        return np.asarray(d, np.float64).reshape(len(z), -1).mean(axis=1)


def _robust(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    med = np.nanmedian(f, axis=0)
    q75, q25 = np.nanpercentile(f, [75, 25], axis=0)
    scale = (q75 - q25) / 1.349
    std = np.nanstd(f, axis=0)
    scale = np.where(scale > 1e-12, scale, np.where(std > 1e-12, std, 1.0))
    return np.where(np.isfinite(med), med, 0.0), scale


def _embedding_axes(embedding, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardisation (mean, std; 1 where constant) and leading principal axes ``(e, k)`` of the
    reference embedding, ``k = min(n_components, rank)``; empty arrays without an embedding."""
    if embedding is None:
        return np.zeros(0), np.zeros(0), np.zeros((0, 0))
    e = np.asarray(embedding, dtype=np.float64)
    if not np.isfinite(e).all():
        raise ValueError("embedding must be finite")
    emb_center = e.mean(axis=0)
    sd = e.std(axis=0)
    emb_scale = np.where(sd > 1e-12, sd, 1.0)
    _, sv, vt = np.linalg.svd((e - emb_center) / emb_scale, full_matrices=False)
    rank = int(np.sum(sv > sv[0] * 1e-6)) if sv.size and sv[0] > 0 else 0
    return emb_center, emb_scale, vt[:int(min(n_components, rank))].T.copy()


def _column_weight(nk: int, nf: int, balance: bool) -> np.ndarray:
    """``AnomalyModel.column_weight`` of ``nk`` embedding components and ``nf`` features: with
    ``balance`` and both blocks, half to each block; otherwise every column alike."""
    if balance and nk and nf:
        return np.r_[np.full(nk, 0.5 / nk), np.full(nf, 0.5 / nf)]
    return np.full(nk + nf, 1.0 / max(nk + nf, 1))


def fit_anomaly(embedding=None, features=None, *, method: str = "knn", n_components: int = 4,
                n_trees: int = 200, subsample: int = 256, k: int = 10, max_reference: int = 20000, seed: int = 0,
                balance: bool = True, meta: Mapping | None = None) -> AnomalyModel:
    """Fit an anomaly model on a reference population.

    Parameters
    ----------
    embedding : ndarray (n, e), optional
        CNN embeddings of the reference candidates.
    features : ndarray (n, f), optional
        :func:`candidate_features` of the same candidates (NaN allowed). At least one of the two.
    method : {"knn", "iforest"}
        kNN by default: on the retrospective test (held-out nuclear transients, ``nightsift
        retrospective``) it ranks the unseen class far better than the isolation forest, whose
        axis-parallel splits miss anomalies that are unusual combinations of ordinary values
        (a brightening *on* a reference source) -- see the README's numbers.
    n_components : int
        Principal components of the embedding kept (capped by its rank). Few: a real/bogus
        CNN's embedding varies mostly along its one trained direction, and extra components
        add distance noise that drowns the features.
    n_trees, subsample : int
        Isolation forest size.
    k : int
        kNN neighbours.
    max_reference : int
        kNN keeps at most this many reference points (a seeded random subset).
    seed : int
    balance : bool
        Give the embedding block and the feature block equal weight (see
        ``AnomalyModel.column_weight``); False: every column alike.
    meta : mapping, optional
        Extra JSON-able entries for ``AnomalyModel.meta`` (e.g. the rb model's path and hash).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if embedding is None and features is None:
        raise ValueError("fit_anomaly needs the embedding, the features or both")
    n = len(embedding) if embedding is not None else len(features)
    if n < 10:
        raise ValueError(f"fit_anomaly: need at least 10 reference candidates, got {n}")
    emb_center, emb_scale, components = _embedding_axes(embedding, n_components)
    if features is not None:
        f = np.asarray(features, dtype=np.float64)
        if len(f) != n:
            raise ValueError(f"{len(f)} feature rows for {n} embeddings")
        feat_center, feat_scale = _robust(f)
    else:
        feat_center = feat_scale = np.zeros(0)
    model = AnomalyModel(method, emb_center, emb_scale, components, feat_center, feat_scale, np.ones(1), np.ones(1),
                         k=k)
    z = model.transform(embedding, features)
    space_scale = np.where(z.std(axis=0) > 1e-12, z.std(axis=0), 1.0)
    column_weight = _column_weight(components.shape[1], feat_center.size, balance)
    forest = reference = None
    rng = np.random.default_rng(seed)
    if method == "iforest":
        forest = IsolationForest.fit(z, n_trees=n_trees, subsample=subsample, seed=seed, weights=column_weight)
    else:
        reference = z if len(z) <= max_reference else z[rng.choice(len(z), max_reference, replace=False)]
    m = dict(meta or {})
    m.update(format=FORMAT, method=method, n_reference=int(n), seed=int(seed), features=list(FEATURES)
             if features is not None else [], embedding_dim=int(emb_center.size), n_components=int(components.shape[1]),
             balance=bool(balance))
    model = AnomalyModel(method, emb_center, emb_scale, components, feat_center, feat_scale, space_scale,
                         column_weight, forest, reference, int(k), m)
    ref_scores = model.score(embedding, features) if method == "iforest" else None
    if ref_scores is not None:
        model.meta["reference_score_quantiles"] = {str(q): float(np.quantile(ref_scores, q))
                                                   for q in (0.5, 0.9, 0.99)}
    return model


def save_anomaly(model: AnomalyModel, path) -> Path:
    """Write ``model`` to one ``.npz`` (no pickle), atomically."""
    arrays = {"emb_center": model.emb_center, "emb_scale": model.emb_scale, "components": model.components,
              "feat_center": model.feat_center, "feat_scale": model.feat_scale, "space_scale": model.space_scale,
              "column_weight": model.column_weight,
              "k": np.array(model.k), "meta": np.array(json.dumps({**model.meta, "method": model.method}))}
    if model.forest is not None:
        arrays.update(model.forest.arrays())
    if model.reference is not None:
        arrays["reference"] = model.reference
    return atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def load_anomaly(path) -> AnomalyModel:
    """Read :func:`save_anomaly` output (``allow_pickle=False``).

    Raises
    ------
    InputError
        Missing file, not an ``.npz``, or not a nightsift anomaly model (naming the file).
    """
    path = Path(path)
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError("anomaly model not found (fit one with nightsift retrospective --save-model)",
                         path=str(path)) from None
    except (OSError, ValueError) as e:
        raise InputError(f"not an anomaly model .npz ({e})", path=str(path)) from None
    with f:
        if "meta" not in f.files:
            raise InputError("not a nightsift anomaly model (no meta)", path=str(path))
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT:
            raise InputError(f"anomaly model format {meta.get('format')!r}, expected {FORMAT!r}", path=str(path))
        a = {k: f[k] for k in f.files}
    method = meta["method"]
    forest = IsolationForest.from_arrays(a) if method == "iforest" else None
    return AnomalyModel(method, a["emb_center"], a["emb_scale"], a["components"], a["feat_center"], a["feat_scale"],
                        a["space_scale"], a["column_weight"], forest, a.get("reference"), int(a["k"]), meta)


# ----------------------------------------------------------------------------- alert packets

def annotate_alerts(path, model, *, rb_model=None, batch_size: int = 512) -> dict:
    """Fill ``candidate.anomaly_score`` of alert packets in place (each file rewritten atomically).

    Parameters
    ----------
    path : path
        An alert ``.avro`` file or a folder of them (searched recursively).
    model : AnomalyModel or path
        The anomaly model (:func:`load_anomaly` of ``anomaly.npz``).
    rb_model : path, optional
        The ``.keras`` real/bogus model whose embedding ``model`` was fitted on; default the one
        recorded in ``model.meta["rb_model"]``. Its SHA-256 must match ``model.meta`` when recorded.
    batch_size : int
        Triplets per embedding batch.

    Returns
    -------
    dict
        ``n_files``, ``n_alerts`` and the 50/90/99 % quantiles of the scores written.

    Raises
    ------
    InputError
        No alert file, a CNN file that is not the one the model was fitted with, or no CNN when
        the model needs the embedding.
    """
    from ..io.avro import cutout_to_array, read_alerts, write_alerts

    m = load_anomaly(model) if not isinstance(model, AnomalyModel) else model
    p = Path(path)
    files = sorted(p.rglob("*.avro")) if p.is_dir() else [p]
    if not files or not files[0].exists():
        raise InputError("no alert .avro file to annotate", path=str(p))
    embed = None
    if m.uses_embedding:
        rb = rb_model or m.meta.get("rb_model")
        if not rb:
            raise InputError("this anomaly model needs the CNN embedding: give the .keras model it was fitted with")
        rb = Path(rb)
        if not rb.is_file():
            raise InputError("real/bogus model (for the embedding) not found", path=str(rb))
        want = m.meta.get("rb_model_sha256")
        if want and file_sha256(rb) != want:
            raise InputError(f"this is not the CNN the anomaly model was fitted with (SHA-256 differs from "
                             f"{want[:12]}...); refit the anomaly model for it", path=str(rb))
        from ..classify.model import embedding_model, load_keras_model
        from ..classify.preprocess import preprocess

        em = embedding_model(load_keras_model(rb))

        def embed(trip):
            x = preprocess(trip)
            return np.asarray(em.predict(x, batch_size=batch_size, verbose=0), np.float64)

    scores_all, n = [], 0
    for f in files:
        alerts = read_alerts(f)
        if not alerts:
            continue
        feats = candidate_features([a["candidate"] for a in alerts]) if m.uses_features else None
        emb = None
        if embed is not None:
            trip = np.stack([np.stack([cutout_to_array(a[k], path=str(f)) for k in
                                       ("cutoutScience", "cutoutTemplate", "cutoutDifference")], axis=-1)
                             for a in alerts])
            emb = embed(trip)
        s = m.score(emb, feats)
        for a, v in zip(alerts, s):
            a["candidate"]["anomaly_score"] = float(v)
        write_alerts(f, alerts)
        scores_all.append(s)
        n += len(alerts)
    s = np.concatenate(scores_all) if scores_all else np.zeros(0)
    return {"n_files": len(files), "n_alerts": n,
            "score_quantiles": {str(q): float(np.quantile(s, q)) for q in (0.5, 0.9, 0.99)} if s.size else {}}
