"""Full-integer int8 TFLite export of the real/bogus CNN, and the checks an Edge TPU build needs.

:func:`export_int8` converts a Keras model with post-training full-integer quantisation: int8
weights and activations, int32 biases, **int8 input and output**, activation ranges calibrated on a
representative sample of training inputs (already :func:`~.preprocess.preprocess`-ed). The batch
dimension is fixed to 1 (the Edge TPU compiler wants static shapes); the graph has no
shape-dependent ops, so on the CPU ``Interpreter.resize_tensor_input`` runs it on batches of any
size.

:func:`edgetpu_problems` lists what would stop ``edgetpu_compiler`` from mapping the whole graph:
a tensor that is not int8/int32, a dynamic shape, an op outside :data:`EDGETPU_OPS`.
:func:`predict_int8` is the plain reference runner used to check the int8 model against the float
one (``nightsift.engine.classify.runtime`` is the production runtime).

:func:`record_model_hashes` adds the SHA-256 of every model file to the model metadata before it
is written (``"sha256": {file name: hex digest}``); the runtime refuses a file whose digest differs
(:func:`nightsift.engine.classify.runtime.load_scorer`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write, file_sha256

__all__ = ["EDGETPU_OPS", "export_int8", "inspect_tflite", "edgetpu_problems", "predict_int8",
           "model_file_names", "record_model_hashes"]

#: TFLite builtin ops the Edge TPU compiler maps to the Edge TPU (compiler v16), from the table
#: "Supported operations" of Coral's "TensorFlow models on the Edge TPU",
#: https://coral.ai/docs/edgetpu/models-intro/#supported-operations (each with limitations listed
#: there, e.g. Mean/ReduceMax not over the batch dimension, FullyConnected with a 1-D output,
#: tensors with at most 3 dimensions larger than 1). QUANTIZE is listed too; DEQUANTIZE is not.
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE",
    "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})


def export_int8(model, representative, path, *, n_calibration: int = 500, seed: int = 0) -> Path:
    """Write a full-integer int8 ``.tflite`` of a Keras model.

    Parameters
    ----------
    model : keras.Model
        Float model with input ``(None, 63, 63, 3)`` and output ``(None, 1)``.
    representative : ndarray (n, 63, 63, 3) float32
        Preprocessed training inputs; ``n_calibration`` of them (drawn with ``seed``) calibrate
        the activation ranges.
    path : path
        The ``.tflite`` file to write (parent directories created), atomically
        (:func:`nightsift.engine.io.atomic.atomic_write`).

    Returns
    -------
    Path of the file.
    """
    import keras
    import tensorflow as tf

    rep = np.asarray(representative, dtype=np.float32)
    if rep.ndim != 4 or rep.shape[1:] != tuple(model.input_shape[1:]):
        raise ValueError(f"representative data must be (n, {model.input_shape[1:]}), got {rep.shape}")
    if len(rep) == 0:
        raise ValueError("representative data is empty")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(rep), size=min(n_calibration, len(rep)), replace=False)
    # a copy with a static batch of 1 (same weights): Edge TPU tensors must have static shapes
    fixed = keras.models.clone_model(model, input_tensors=keras.Input(shape=model.input_shape[1:], batch_size=1,
                                                                      name="triplet"))
    fixed.set_weights(model.get_weights())

    def gen():
        for i in idx:
            yield [rep[i:i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(fixed)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = gen
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # TF asks for QAT-style input statistics when the input type is int8; post-training
        # calibration sets the input scale from the representative data instead (harmless)
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        blob = conv.convert()
    return atomic_write(path, lambda fh: fh.write(blob))


def _interpreter(path, *, threads: int | None = None, delegates: bool = True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: TFLite model not found")
    kw = {} if delegates else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    return Interpreter(model_path=str(p), num_threads=threads, **kw)


def inspect_tflite(path) -> dict:
    """What a ``.tflite`` file holds: op names, tensor dtypes, input/output details.

    Returns
    -------
    dict with ``ops`` (sorted op names, no delegate applied), ``tensor_dtypes`` {tensor name:
    dtype name}, ``input``/``output`` (dtype name, shape_signature list, (scale, zero_point)).
    """
    it = _interpreter(path, delegates=False)
    it.allocate_tensors()
    ops = sorted({d["op_name"] for d in it._get_ops_details()})
    dtypes = {t["name"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}

    def io(d):
        return {"dtype": np.dtype(d["dtype"]).name, "shape_signature": [int(v) for v in d["shape_signature"]],
                "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]}

    return {"ops": ops, "tensor_dtypes": dtypes, "input": io(it.get_input_details()[0]),
            "output": io(it.get_output_details()[0])}


def edgetpu_problems(path) -> list[str]:
    """Reasons the model would not map wholly onto the Edge TPU (empty list: none found)."""
    info = inspect_tflite(path)
    probs = [f"op {op} is not supported by the Edge TPU compiler" for op in info["ops"] if op not in EDGETPU_OPS]
    probs += [f"tensor {name!r} is {dt}, not int8/int32" for name, dt in info["tensor_dtypes"].items()
              if dt not in ("int8", "int32")]
    for k in ("input", "output"):
        if info[k]["dtype"] != "int8":
            probs.append(f"{k} is {info[k]['dtype']}, not int8")
        if any(v < 0 for v in info[k]["shape_signature"]):
            probs.append(f"{k} has a dynamic shape {info[k]['shape_signature']}")
    return probs


def predict_int8(path, inputs, *, batch_size: int = 256, threads: int | None = None) -> np.ndarray:
    """Scores of preprocessed inputs through an int8 ``.tflite`` on the CPU (LiteRT).

    Parameters
    ----------
    path : path
        int8 model from :func:`export_int8`.
    inputs : ndarray (n, 63, 63, 3) float32
        :func:`~.preprocess.preprocess` output; quantised with the model's input scale/zero point.
    batch_size : int
        Rows per ``invoke`` (the input tensor is resized to it).

    Returns
    -------
    ndarray (n,) float32, the dequantised sigmoid output (steps of 1/256).
    """
    x = np.asarray(inputs, dtype=np.float32)
    it = _interpreter(path, threads=threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    s_in, z_in = inp["quantization"]
    s_out, z_out = out["quantization"]
    res = np.empty(len(x), np.float32)
    cur = None
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        if cur != len(chunk):
            it.resize_tensor_input(inp["index"], [len(chunk), *x.shape[1:]])
            it.allocate_tensors()
            cur = len(chunk)
        q = np.clip(np.rint(chunk / s_in + z_in), -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], q)
        it.invoke()
        res[i:i + len(chunk)] = (it.get_tensor(out["index"]).reshape(-1).astype(np.float32) - z_out) * s_out
    return res


def model_file_names(meta: dict) -> list[str]:
    """The model files a metadata dict names (top-level ``"tflite"``/``"keras"``/``"edgetpu"`` and
    every value of ``"files"``), relative to the metadata's folder, in order, once each."""
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    names = [meta.get(k) for k in ("tflite", "keras", "edgetpu")] + list(files.values())
    return list(dict.fromkeys(str(n) for n in names if isinstance(n, str) and n))


def record_model_hashes(meta: dict, folder) -> dict:
    """A copy of model metadata ``meta`` with ``"sha256"``: the digest of each file it names.

    Call it on the metadata just before writing it beside the model files (``folder``), e.g.
    ``write_json(out / "name.json", record_model_hashes(meta, out))``.

    Raises
    ------
    FileNotFoundError
        A named model file is not in ``folder``.
    """
    folder = Path(folder)
    out = dict(meta)
    out["sha256"] = {name: file_sha256(folder / name) for name in model_file_names(meta)}
    return out
