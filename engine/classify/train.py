"""Train, evaluate and export the real/bogus CNN.

:func:`train_model` fits :func:`.model.build_model` on a dataset's training rows: Adam, binary
cross-entropy with balanced class weights (as sample weights), random dihedral augmentation of
every triplet (the 8 combinations of 90-degree rotations and flips, drawn per example and epoch),
early stopping on the validation specificity at the target sensitivity (1 - FPR where the FNR is
the target: the operating point the model is used at) with the best weights restored (the
learning rate drops on a plateau first); seeded (Keras, TensorFlow
op determinism, the batch order and the augmentation), so a rerun on the same machine repeats.

:func:`run_training` is ``nightsift train``: build (or reuse) the dataset, train, choose the
operating threshold on the validation split for the target FNR, evaluate on the test split, export
the int8 model, check it against the float one and write the model files with their metadata.
:func:`cross_domain` trains on one domain and tests on others (``nightsift evaluate --cross-domain``).
The numbers come from :mod:`.metrics` and the files from :mod:`.reports`; this module does not
import :mod:`.evaluate` (which imports it).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

from .metrics import format_report, report, summary, threshold_for_fnr
from .preprocess import NORMALIZATION, compress
from .reports import plot_report, write_json
from .realeval import TRAINING_CANDIDS_KEY

log = logging.getLogger("nightsift.classify")

__all__ = ["class_weights", "sample_weights", "dihedral", "train_model", "predict_keras", "run_training", "cross_domain"]


def class_weights(y) -> dict:
    """Balanced weights ``n / (2 n_c)`` of classes 0 and 1 (1.0 for an absent class)."""
    y = np.asarray(y).astype(int)
    n = len(y)
    return {c: (n / (2.0 * max(int((y == c).sum()), 1))) if (y == c).any() else 1.0 for c in (0, 1)}


def sample_weights(y, kinds=None, *, kind_balance: float = 0.0) -> np.ndarray:
    """Per-sample training weights: balanced classes, and within a class, kinds re-weighted.

    Parameters
    ----------
    y : array_like (n,) of 0/1
    kinds : array_like (n,) of str, optional
        The truth kind of each row (real: isolated, nuclear, variable; bogus: its cause).
    kind_balance : float
        Exponent ``a``: a row of a kind with ``n_k`` rows in its class weighs ``n_k**-a``, rescaled
        so that each class keeps the total weight of :func:`class_weights`. 0 leaves kinds as they
        come (saturated-star residuals, a third of the bogus, then outweigh the rarer star
        residuals the classifier confuses with variable stars); 1 gives every kind equal weight.

    Returns
    -------
    ndarray (n,) float32
    """
    y = np.asarray(y).astype(int)
    cw = class_weights(y)
    w = np.where(y > 0, cw[1], cw[0]).astype(np.float64)
    if kinds is not None and kind_balance > 0:
        kinds = np.asarray(kinds)
        for c in (0, 1):
            sel = np.flatnonzero(y == c)
            if sel.size == 0:
                continue
            _, inv, counts = np.unique(kinds[sel], return_inverse=True, return_counts=True)
            f = counts[inv].astype(np.float64) ** -kind_balance
            w[sel] *= f * sel.size / f.sum()
    return w.astype(np.float32)


def dihedral(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Apply one of the 8 symmetries of the square to each image.

    Parameters
    ----------
    x : ndarray (n, ny, nx, c) with ny == nx
    k : ndarray (n,) int in [0, 8)
        ``k % 4`` quarter turns (``numpy.rot90`` over the image axes), then a left-right flip if
        ``k >= 4``.

    Returns
    -------
    ndarray like ``x`` (a new array).
    """
    out = np.empty_like(x)
    for t in range(8):
        sel = np.flatnonzero(k == t)
        if len(sel) == 0:
            continue
        v = np.rot90(x[sel], t % 4, axes=(1, 2))
        if t >= 4:
            v = v[:, :, ::-1]
        out[sel] = v
    return out


def _batches(z, y, w, *, batch_size: int, augment: bool, seed: int, adapt_z=None):
    """A keras PyDataset of (inputs, labels, weights) from standardised float16 triplets.

    With ``adapt_z`` (unlabelled real rows, :mod:`.adapt`) each batch is followed by as many real
    rows drawn with replacement, and the labels and weights are dicts for the outputs ``score``
    (simulated rows only) and ``domain`` (0 simulated, 1 real; every row)."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0
            self._order()

        def _order(self):
            rng = np.random.default_rng([seed, self.epoch])
            self.perm = rng.permutation(len(y))
            self.k = rng.integers(0, 8, len(y)) if augment else np.zeros(len(y), int)

        def __len__(self):
            return int(np.ceil(len(y) / batch_size))

        def __getitem__(self, i):
            idx = np.sort(self.perm[i * batch_size:(i + 1) * batch_size])
            x = compress(z[idx])
            if augment:
                x = dihedral(x, self.k[idx])
            if adapt_z is None:
                return x, y[idx], w[idx]
            rng = np.random.default_rng([seed, self.epoch, i, 7])
            j = np.sort(rng.integers(0, len(adapt_z), len(idx)))
            xr = compress(adapt_z[j])
            xr = dihedral(xr, rng.integers(0, 8, len(j))) if augment else xr
            n, m = len(idx), len(j)
            return (np.concatenate([x, xr]),
                    {"score": np.r_[y[idx], np.zeros(m, y.dtype)], "domain": np.r_[np.zeros(n), np.ones(m)]},
                    {"score": np.r_[w[idx], np.zeros(m)], "domain": np.ones(n + m)})

        def on_epoch_end(self):
            self.epoch += 1
            self._order()

    return Batches()


def train_model(train, val, *, epochs: int = 30, batch_size: int = 64, patience: int = 5, learning_rate: float = 1e-3,
                augment: bool = True, seed: int = 0, threads: int | None = None, verbose: int = 1, model_kwargs=None,
                kind_balance: float = 0.0, ema: float = 0.0, target_fnr: float = 0.01, init_model=None,
                adapt=None, adapt_weight: float = 0.3):
    """Fit a fresh CNN, or go on from ``init_model``'s weights.

    Parameters
    ----------
    train, val : RBData
        Training and validation rows (see :mod:`.dataset`); ``val`` drives early stopping.
    epochs, batch_size : int
        Upper bound on epochs; rows per batch.
    patience : int
        Epochs without a better validation ``tnr_at_target`` before stopping (best weights
        restored); the learning rate drops by 0.3 after ``patience // 2`` such epochs.
        ``tnr_at_target`` is the specificity (1 - FPR) at a sensitivity of ``1 - target_fnr``:
        AUCPR, near 1, is set by the few most confident bogus rows (label noise among them) and
        can fall while the operating point improves.
    learning_rate : float
        Adam's step size.
    augment : bool
        Random dihedral augmentation of the training triplets.
    seed, threads, verbose : int
        Seed; TensorFlow intra-op threads (default all cores); Keras' verbosity (0, 1 bar, 2 lines).
    model_kwargs : dict, optional
        Passed to :func:`.model.build_model`.
    kind_balance : float
        Within-class re-weighting of the truth kinds (:func:`sample_weights`).
    target_fnr : float
        The operating FNR early stopping judges the model at.
    ema : float
        If > 0, the momentum of an exponential moving average of the weights (Polyak averaging,
        e.g. 0.998: an average over the last ~500 steps). Validation, early stopping and the
        returned model then use the averaged weights: a cheap ensemble over the training path.
    init_model : path, optional
        A ``.keras`` model of the same architecture whose weights the fit starts from (fine-tuning,
        e.g. the shipped model on new rows; usually with a smaller ``learning_rate``).
    adapt, adapt_weight : RBData, float
        Unlabelled real rows (:func:`.adapt.adapt_rows`): domain-adversarial training with this
        gradient-reversal weight (:mod:`.adapt`). The model returned is the plain CNN either way.

    Returns
    -------
    model : keras.Model
        With the best validation weights.
    history : dict
        Per-epoch ``loss``, ``val_loss``, ``val_auc_pr``, ``val_tnr_at_target`` ..., plus
        ``best_epoch``, ``epochs_run``, ``wall_s``, ``class_weight``, ``kind_balance``, ``ema``.
    """
    from .model import build_model, configure_tensorflow

    tf = configure_tensorflow(threads)
    import keras

    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"need training and validation rows, got {len(train)} and {len(val)}")
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    y = train.labels
    cw = class_weights(y)
    w = sample_weights(y, train.truth["kind"], kind_balance=kind_balance)
    model = build_model(seed=seed, **(model_kwargs or {}))
    if init_model is not None:
        from .model import load_keras_model

        model.set_weights(load_keras_model(init_model).get_weights())
    graph, val_data, ramp, monitor = _fit_graph(model, val, adapt, adapt_weight, epochs=epochs, seed=seed)
    _compile(graph, learning_rate=learning_rate, ema=ema, target_fnr=target_fnr, adapt=adapt is not None)
    data = _batches(train.z, y, w, batch_size=batch_size, augment=augment, seed=seed,
                    adapt_z=None if adapt is None else adapt.z)
    t0 = time.perf_counter()
    h = graph.fit(data, validation_data=val_data, epochs=epochs, verbose=verbose,
                  callbacks=ramp + _callbacks(patience=patience, learning_rate=learning_rate, ema=ema, monitor=monitor))
    hist = _history(h.history)
    hist.update(wall_s=round(time.perf_counter() - t0, 1), class_weight={str(k): round(v, 4) for k, v in cw.items()},
                kind_balance=float(kind_balance), ema=float(ema))
    if adapt is not None:
        hist["adapt"] = {"weight": float(adapt_weight), "n_rows": len(adapt)}
    return model, hist


def _fit_graph(model, val, adapt, weight: float, *, epochs: int, seed: int):
    """What ``fit`` runs: ``(graph, validation_data, callbacks, monitor)``. The model itself, or with
    ``adapt`` its domain-adversarial graph (:mod:`.adapt`), whose validation judges the score only."""
    if adapt is None:
        return model, (val.inputs(), val.labels), [], "val_tnr_at_target"
    from .adapt import domain_model, reversal_ramp

    graph, n = domain_model(model, weight, seed=seed), len(val)
    val_data = (val.inputs(), {"score": val.labels, "domain": np.zeros(n)},
                {"score": np.ones(n), "domain": np.zeros(n)})
    return graph, val_data, [reversal_ramp(graph, weight, epochs)], "val_score_tnr_at_target"


def _history(raw: dict) -> dict:
    """Keras' history with one naming for both graphs (the score's metrics without the output prefix;
    the losses keep theirs), ``epochs_run`` and ``best_epoch`` (the best validation operating point)."""
    hist = {k.replace("score_auc_pr", "auc_pr").replace("score_tnr_at_target", "tnr_at_target"):
            [float(v) for v in vals] for k, vals in raw.items()}
    hist["epochs_run"] = len(hist.get("loss", []))
    hist["best_epoch"] = (int(np.argmax(hist["val_tnr_at_target"])) + 1 if "val_tnr_at_target" in hist
                          else hist["epochs_run"])
    return hist


def _compile(model, *, learning_rate: float, ema: float, target_fnr: float, adapt: bool = False) -> None:
    """Adam (with Polyak averaging of the weights when ``ema`` > 0) on the binary cross-entropy,
    with the validation metrics ``auc_pr`` and ``tnr_at_target`` (:func:`train_model`); with
    ``adapt``, the two outputs of :func:`.adapt.domain_model`, each with its cross-entropy."""
    import keras

    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    opt = (keras.optimizers.Adam(learning_rate, use_ema=True, ema_momentum=float(ema)) if ema > 0
           else keras.optimizers.Adam(learning_rate))
    metrics = [keras.metrics.AUC(curve="PR", name="auc_pr"),
               keras.metrics.SpecificityAtSensitivity(1.0 - target_fnr, num_thresholds=1000, name="tnr_at_target")]
    if adapt:  # weighted: the real rows (score weight 0) stay out of the training metrics
        model.compile(optimizer=opt, loss={"score": "binary_crossentropy", "domain": "binary_crossentropy"},
                      weighted_metrics={"score": metrics})
    else:
        model.compile(optimizer=opt, loss="binary_crossentropy", metrics=metrics)


def _callbacks(*, patience: int, learning_rate: float, ema: float, monitor: str = "val_tnr_at_target") -> list:
    """Early stopping on ``val_tnr_at_target`` (best weights restored) after a learning-rate drop on
    its plateau; with EMA, the averaged weights swapped in for validation (:func:`train_model`)."""
    import keras

    stop = keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=patience, restore_best_weights=True)
    slow = keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.3,
                                             patience=max(1, patience // 2), min_lr=learning_rate * 0.01)
    # with EMA the averaged weights are swapped in before the epoch's end callbacks, so early stopping
    # scores and keeps them (the swap back happens at the next epoch's start)
    return ([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema > 0 else []) + [stop, slow]


def predict_keras(model, inputs, *, batch_size: int = 512) -> np.ndarray:
    """Scores (n,) float32 of preprocessed inputs (n, 63, 63, 3) through a Keras model."""
    x = np.asarray(inputs, dtype=np.float32)
    if len(x) == 0:
        return np.zeros(0, np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32).reshape(-1)


def _versions() -> dict:
    import keras
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
            "numpy": np.__version__}


def run_training(*, spec=None, data_dir="nightsift-data", out_dir="nightsift-model", report_dir=None,
                 name: str = "nightsift_rb", target_fnr: float = 0.01, epochs: int = 30, batch_size: int = 64,
                 patience: int = 5, learning_rate: float = 1e-3, seed: int = 0, threads: int | None = None,
                 workers: int = 1, rebuild: bool = False, command: str = "", verbose: int = 2,
                 progress: bool = True, config=None, extra_train=None, kind_balance: float = 0.0,
                 ema: float = 0.0, threshold_confidence: float = 0.0, init_model=None, adapt=None,
                 adapt_weight: float = 0.3) -> dict:
    """Build data, train, evaluate, export: what ``nightsift train`` does.

    Writes to ``out_dir``: ``<name>.keras`` (float), ``<name>_int8.tflite`` and ``<name>.json``
    (normalisation, thresholds, int8 quantisation, training command, dataset, metrics); to
    ``report_dir`` the evaluation JSON and PNGs.

    Parameters
    ----------
    spec : DatasetSpec, optional
    data_dir : path
        Dataset cache directory.
    out_dir : path
        Where the model files go (``engine/classify/models`` to replace the shipped model).
    report_dir : path, optional
        Default ``<out_dir>/<name>-report`` unless ``out_dir`` is the shipped models folder, then
        ``nightsift-train-report``.
    target_fnr : float
        FNR the operating threshold is chosen for on the validation split.
    threshold_confidence : float
        Confidence that the target FNR holds on new data (:func:`.metrics.threshold_for_fnr`).
    command : str
        The command line recorded in the metadata.
    extra_train : RBData, optional
        Rows added to the training split, e.g. expert labels from the labeling page
        (:func:`nightsift.engine.discover.active.labeled_dataset`, ``nightsift train --with-labels``).
    kind_balance, ema, init_model, adapt, adapt_weight
        As :func:`train_model` (kind re-weighting, weight averaging, fine-tuning, domain-adversarial
        training); the candids of ``adapt``'s packets are listed in the metadata like every real
        packet that touched training.

    Returns
    -------
    dict: the metadata written to ``<name>.json``.
    """
    from .dataset import DatasetSpec
    from .export import edgetpu_problems, inspect_tflite, predict_int8, record_model_hashes
    from .model import MODELS_DIR

    out = Path(out_dir)
    if report_dir is None:
        report_dir = "nightsift-train-report" if out.resolve() == MODELS_DIR.resolve() else out / f"{name}-report"
    rep_dir = Path(report_dir)
    t_all = time.perf_counter()
    data, train, val, test = _training_splits(data_dir, spec or DatasetSpec(), config=config, workers=workers,
                                              progress=progress, rebuild=rebuild, extra_train=extra_train)
    model, hist = train_model(train, val, epochs=epochs, batch_size=batch_size, patience=patience,
                              learning_rate=learning_rate, seed=seed, threads=threads, verbose=verbose,
                              kind_balance=kind_balance, ema=ema, target_fnr=target_fnr, init_model=init_model,
                              adapt=adapt, adapt_weight=adapt_weight)
    rule = {"target_fnr": target_fnr, "confidence": threshold_confidence, "plot_dir": rep_dir}
    thr, rep_f = _threshold_and_report("float", lambda x: predict_keras(model, x), val, test, **rule)
    keras_path, tfl_path = _save_models(model, train, out, name, seed=seed)
    thr8, rep_q = _threshold_and_report("int8", lambda x: predict_int8(tfl_path, x, threads=threads), val, test,
                                        keys=(), **rule)
    info = inspect_tflite(tfl_path)
    problems = edgetpu_problems(tfl_path)
    meta = _model_metadata(name, model, keras_path.name, tfl_path.name, info, problems, thresholds=(thr, thr8),
                           reports=(rep_f, rep_q), target_fnr=target_fnr, threshold_confidence=threshold_confidence)
    meta["training"] = _training_record(command, data, hist, extra_train=extra_train, seed=seed, batch_size=batch_size,
                                        learning_rate=learning_rate, patience=patience,
                                        total_wall_s=round(time.perf_counter() - t_all, 1))
    # every real packet that touched training is listed; nightsift evaluate --real drops them
    meta[TRAINING_CANDIDS_KEY] = _real_candids(extra_train, adapt)
    meta = record_model_hashes(meta, out)  # SHA-256 of each model file, checked before it loads
    write_json(out / f"{name}.json", meta)
    write_json(rep_dir / "evaluation.json", {"float": rep_f, "int8": rep_q, "history": hist,
                                             "dataset_summary": data.meta["summary"]})
    print(f"model -> {keras_path} ({keras_path.stat().st_size / 1e6:.2f} MB), {tfl_path} "
          f"({tfl_path.stat().st_size / 1e6:.2f} MB), {out / (name + '.json')}; report -> {rep_dir}/")
    if problems:
        print("Edge TPU: " + "; ".join(problems))
    return meta


def _real_candids(*rows) -> list[int]:
    """Every real packet that touched training (the rows' ``meta["candids"]``), sorted, once."""
    return sorted({int(c) for r in rows if r is not None for c in r.meta.get("candids", ())})


def _save_models(model, train, out: Path, name: str, *, seed: int) -> tuple[Path, Path]:
    """Write ``<name>.keras`` and its int8 export ``<name>_int8.tflite`` (calibrated on up to 2,000
    random training rows) to ``out``; their paths."""
    from .export import export_int8
    from .model import save_keras_model

    out.mkdir(parents=True, exist_ok=True)
    keras_path = out / f"{name}.keras"
    save_keras_model(model, keras_path)
    tfl_path = export_int8(model, train.inputs(np.random.default_rng(seed).choice(len(train), min(len(train), 2000),
                                                                                  replace=False)),
                           out / f"{name}_int8.tflite", seed=seed)
    return keras_path, tfl_path


def _training_splits(data_dir, spec, *, config, workers: int, progress: bool, rebuild: bool, extra_train):
    """The dataset (built or reused) and its train (plus ``extra_train``), val and test splits."""
    from .dataset import build_dataset, format_summary, load_dataset

    path = build_dataset(data_dir, spec, config=config, workers=workers, progress=progress, rebuild=rebuild)
    data = load_dataset(path)
    print(f"dataset {path}:\n{format_summary(data.meta['summary'])}")
    train, val, test = data.split("train"), data.split("val"), data.split("test")
    if extra_train is not None and len(extra_train):
        train = train.append(extra_train)
        print(f"training split + {len(extra_train)} extra rows ({int(extra_train.labels.sum())} real)")
    return data, train, val, test


def _threshold_and_report(label: str, predict, val, test, *, target_fnr: float, confidence: float, plot_dir,
                          keys=("per_instrument", "per_seeing_bin", "per_kind")):
    """A model variant's operating threshold on ``val``, and its report on ``test`` (printed, and
    plotted to ``plot_dir`` with the prefix ``<label>_``).

    Returns
    -------
    (threshold, :func:`.metrics.report` of the test split)
    """
    thr = threshold_for_fnr(val.labels, predict(val.inputs()), target_fnr, confidence)
    p_test = predict(test.inputs())
    rep = report(test.labels, p_test, thr, domain=test.domain, truth=test.truth)
    print(f"{label} model, test split:\n" + format_report(rep, keys=keys))
    plot_report(test.labels, p_test, thr, plot_dir, title=f"{label} model, test split", prefix=f"{label}_")
    return thr, rep


def _training_record(command: str, data, hist: dict, *, extra_train, seed: int, batch_size: int,
                     learning_rate: float, patience: int, total_wall_s: float) -> dict:
    """The ``"training"`` entry of the model metadata: command, dataset, settings, history, versions."""
    return {"command": command, "dataset": {"key": data.meta["key"], "spec": data.meta["spec"],
                                            "summary": data.meta["summary"]["total"],
                                            "per_split": data.meta["summary"]["per_split"]},
            "n_extra_train": 0 if extra_train is None else len(extra_train),
            "seed": seed, "epochs_run": hist["epochs_run"], "best_epoch": hist["best_epoch"],
            "batch_size": batch_size, "learning_rate": learning_rate, "patience": patience,
            "class_weight": hist["class_weight"], "kind_balance": hist.get("kind_balance", 0.0),
            "ema": hist.get("ema", 0.0), "adapt": hist.get("adapt"), "train_wall_s": hist["wall_s"],
            "total_wall_s": total_wall_s, "versions": _versions()}


def _model_metadata(name: str, model, keras_file: str, tflite_file: str, info: dict, problems: list, *,
                    thresholds: tuple, reports: tuple, target_fnr: float, threshold_confidence: float) -> dict:
    """The model metadata ``nightsift train`` writes, less ``"training"`` and ``"sha256"``: format,
    normalisation, input, files, the float and int8 ``thresholds``, the int8 quantisation
    (``info`` of :func:`.export.inspect_tflite`), the embedding layer and the test metrics of the
    float and int8 ``reports``."""
    from .model import EMBEDDING_LAYER

    (thr, thr8), (rep_f, rep_q) = thresholds, reports
    keys = ("aucpr", "roc_auc", "threshold", "precision", "recall", "fnr", "fpr", "n_real", "n_bogus")
    return {
        "format": "nightsift-rb/1",
        "name": name,
        "normalization": NORMALIZATION,
        "input": {"shape": [63, 63, 3], "channels": ["science", "reference", "difference"],
                  "preprocess": "nightsift.engine.classify.preprocess.preprocess"},
        "files": {"keras": keras_file, "tflite_int8": tflite_file},
        "target_fnr": target_fnr,
        "threshold_confidence": threshold_confidence,
        "threshold": thr,
        "threshold_int8": thr8,
        "int8": {"input_scale": info["input"]["quantization"][0], "input_zero_point": info["input"]["quantization"][1],
                 "output_scale": info["output"]["quantization"][0],
                 "output_zero_point": info["output"]["quantization"][1], "ops": info["ops"],
                 "edgetpu_problems": problems},
        "embedding_layer": EMBEDDING_LAYER,
        "embedding_dim": int(model.get_layer(EMBEDDING_LAYER).output.shape[-1]),
        "metrics": {
            "split": "test",
            "float": {k: rep_f["overall"][k] for k in keys},
            "int8": {k: rep_q["overall"][k] for k in keys},
            "aucpr_int8_minus_float": rep_q["overall"]["aucpr"] - rep_f["overall"]["aucpr"],
            "per_instrument_float": {k: {kk: v[kk] for kk in ("aucpr", "fnr", "fpr", "n_real", "n_bogus")}
                                     for k, v in rep_f["per_instrument"].items()},
        },
    }


def cross_domain(data, *, source: str = "decam", n_train: int | None = None, target_fnr: float = 0.01,
                 threshold_confidence: float = 0.0,
                 epochs: int = 30, batch_size: int = 64, patience: int = 5, seed: int = 0, threads: int | None = None,
                 verbose: int = 0) -> dict:
    """Domain-shift experiment: three models trained on equally many triplets, tested everywhere.

    * ``multi``: all instrument profiles and conditions (representative training);
    * ``single_profile``: only ``source`` (one camera, all its conditions);
    * ``single_condition``: only ``source`` in its best-seeing units (the narrowest third of its
      FWHM range), like training on the data of one night.

    Each is trained on ``n_train`` random training rows (default: all that ``single_condition``
    has, so that the comparison is of coverage, not of size), validated (early stopping and
    threshold for ``target_fnr``) on its own domain's validation rows and tested on every profile's
    test rows. The *drop* of a model is its in-domain test AUCPR minus its AUCPR on each other
    profile (``multi``'s in-domain figure is its AUCPR on ``source``).

    Returns
    -------
    dict ``{model: {"n_train", "threshold", "test": {profile: summary}, "drop_aucpr": {profile: d},
    "fnr_at_threshold": {...}}}`` plus ``"source"`` and ``"n_train"``.
    """
    d = data.domain
    inst = d["instrument"]
    src = inst == source
    if not src.any():
        raise ValueError(f"no rows of profile {source!r} in the dataset")
    fw = d["fwhm_px"][src]
    lo, hi = np.quantile(np.unique(fw), [0.0, 1.0 / 3.0])
    cond = src & (d["fwhm_px"] >= lo) & (d["fwhm_px"] <= hi)
    domains = {"multi": np.ones(len(d), bool), "single_profile": src, "single_condition": cond}
    is_train, is_val, is_test = (d["split"] == s for s in ("train", "val", "test"))
    n_avail = int((cond & is_train).sum())
    n = int(min(n_train or n_avail, n_avail))
    rng = np.random.default_rng(seed)
    profiles = [str(p) for p in np.unique(inst)]
    out: dict = {"source": source, "n_train": n, "single_condition_fwhm_px": [float(lo), float(hi)]}
    for name, dom in domains.items():
        tr_idx = np.sort(rng.choice(np.flatnonzero(dom & is_train), n, replace=False))
        va = data.select(dom & is_val)
        model, hist = train_model(data.select(tr_idx), va, epochs=epochs, batch_size=batch_size, patience=patience,
                                  seed=seed, threads=threads, verbose=verbose, target_fnr=target_fnr)
        thr = threshold_for_fnr(va.labels, predict_keras(model, va.inputs()), target_fnr, threshold_confidence)
        res = {"n_train": n, "epochs_run": hist["epochs_run"], "threshold": thr, "test": {}}
        for prof in profiles:
            te = data.select((inst == prof) & is_test)
            res["test"][prof] = summary(te.labels, predict_keras(model, te.inputs()), thr)
        te = data.select(cond & is_test)
        res["test"][f"{source}_condition"] = summary(te.labels, predict_keras(model, te.inputs()), thr)
        ref = res["test"][f"{source}_condition"] if name == "single_condition" else res["test"][source]
        res["drop_aucpr"] = {p: ref["aucpr"] - res["test"][p]["aucpr"] for p in profiles}
        out[name] = res
        log.info("cross-domain %s: %s", name, json.dumps({p: round(v["aucpr"], 4) for p, v in res["test"].items()}))
    return out
