"""ZTF's production real/bogus model braai d6_m7 (Duev et al. 2019, MNRAS 489, 3582), in Keras 3.

The public model (github dmitryduev/braai, MIT licence) is a Keras 2 ``Sequential`` stored as an
architecture JSON plus an HDF5 weights file. Keras 3 reads neither (``model_from_json`` does not
know the Keras 2 class layout), so :func:`build_braai` rebuilds the same graph in code with the same
layer names, :func:`check_architecture` compares it with the JSON (so a different file fails
loudly) and :func:`load_braai` copies the weights in by layer name with h5py.

Preprocessing, exactly as ZTF scored d6_m7 in production (``make_triplet(..., old_norm=True)`` of
ZTF's alert broker Kowalski, the code that produced ``drb`` for models up to d6_m7):

1. each cutout (science, reference, difference), at the size ZTF stored it: NaN -> 0;
2. each row divided by its L2 norm (``tf.keras.utils.normalize(x)``, ``axis=-1``, ``order=2``;
   an all-zero row stays zero) -- :func:`normalize_rows`;
3. cutouts that ZTF truncated at a CCD edge (e.g. 63 x 44) are padded back to 63 x 63 *after*
   normalising, always at the high end of each axis (rows at the bottom, columns at the right,
   whichever edge the candidate is near) with the constant ``1e-9`` -- :func:`ztf_pad`. This moves
   the candidate off the centre pixel when the truncation was at the low side; it is what ZTF did,
   so it is what reproduces ZTF's scores. (nightsift's own packet reader,
   :func:`nightsift.engine.io.avro.read_ztf_packet`, pads on the side of the edge with NaN instead,
   which keeps the candidate centred; :func:`braai_preprocess` turns that NaN into 0, so the two
   differ only for the few truncated packets.)
4. channels stacked as (science, reference, difference), float32.

:func:`braai_triplet` does steps 1-4 on raw cutouts; :func:`read_braai_triplets` reads them from
ZTF ``.avro`` packets; :func:`braai_preprocess` does 1-2 on 63 x 63 triplets that are already
assembled (nightsift's own ``extract_triplets`` output, where NaN marks pixels off the CCD).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError

__all__ = [
    "BRAAI_VERSION",
    "BRAAI_SIZE",
    "ZTF_PAD_VALUE",
    "default_braai_dir",
    "braai_files",
    "normalize_rows",
    "ztf_pad",
    "braai_triplet",
    "braai_preprocess",
    "read_braai_triplets",
    "build_braai",
    "check_architecture",
    "load_braai",
]

#: the model version, written to the packets' ``drbversion``/``rbversion``
BRAAI_VERSION = "d6_m7"
#: side of braai's input cutouts (pixels)
BRAAI_SIZE = 63
#: value ZTF pads truncated (edge) cutouts with, after normalising
ZTF_PAD_VALUE = 1e-9

_CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")

#: (Keras class, layer name, main setting) of d6_m7, in order; checked against the JSON
_LAYERS = (
    ("Conv2D", "conv1", 16),
    ("Conv2D", "conv2", 16),
    ("MaxPooling2D", "max_pooling2d", 2),
    ("Dropout", "dropout", 0.25),
    ("Conv2D", "conv3", 32),
    ("Conv2D", "conv4", 32),
    ("MaxPooling2D", "max_pooling2d_1", 4),
    ("Dropout", "dropout_1", 0.25),
    ("Flatten", "flatten", None),
    ("Dense", "fc_1", 256),
    ("Dropout", "dropout_2", 0.5),
    ("Dense", "fc_out", 1),
)


def default_braai_dir() -> Path:
    """Where the d6_m7 files are looked for when no path is configured.

    ``$NIGHTSIFT_BRAAI_DIR`` if set, else ``shared/data/ztf/braai`` beside the nightsift checkout
    (the layout of the project's real-data folder).
    """
    env = os.environ.get("NIGHTSIFT_BRAAI_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "ztf" / "braai"


def braai_files(path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Resolve ``(weights .h5, architecture .json)`` of d6_m7.

    Parameters
    ----------
    path : str or PathLike, optional
        The folder holding ``d6_m7.weights.h5`` and ``d6_m7.architecture.json``, or the weights
        file itself (the JSON is looked for beside it). ``None`` or ``""``: :func:`default_braai_dir`.

    Raises
    ------
    InputError
        If the weights file is not there (the message says where it was looked for).
    """
    p = Path(path) if path else default_braai_dir()
    if p.is_dir():
        weights = p / f"{BRAAI_VERSION}.weights.h5"
    else:
        weights = p
    arch = weights.parent / f"{BRAAI_VERSION}.architecture.json"
    if not weights.is_file():
        raise InputError(f"braai weights not found (expected {weights.name}); point classify.model at the "
                         f"folder of ZTF's braai files or set NIGHTSIFT_BRAAI_DIR", path=str(weights))
    return weights, arch


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Divide every row (last axis) by its L2 norm, as ``tf.keras.utils.normalize(x)``.

    Parameters
    ----------
    x : ndarray (..., nx), float
        Cutouts; NaN must already be replaced.

    Returns
    -------
    ndarray, same shape, float32
        ``x / ||x||_2`` along the last axis; rows whose norm is 0 are left as they are (zero).
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # see braai_preprocess
        norm = np.sqrt(np.add.reduce(x * x, axis=-1))
        norm[norm == 0] = 1.0
        return x / norm[..., None]


def ztf_pad(stamp: np.ndarray, *, size: int = BRAAI_SIZE, value: float = ZTF_PAD_VALUE) -> np.ndarray:
    """Pad a cutout truncated at a CCD edge to ``size x size`` as ZTF did for braai.

    Rows are added at the bottom and columns at the right (the high end of each axis), whichever
    side the CCD edge was on, filled with ``value`` (ZTF: ``1e-9``). A cutout already
    ``size x size`` is returned unchanged.

    Parameters
    ----------
    stamp : ndarray (ny, nx), ny, nx <= size
    size : int
    value : float

    Raises
    ------
    InputError
        If the cutout is not 2-D or is larger than ``size`` on a side.
    """
    stamp = np.asarray(stamp)
    if stamp.ndim != 2 or stamp.shape[0] > size or stamp.shape[1] > size:
        raise InputError(f"cutout of shape {stamp.shape} cannot be padded to {size}x{size}", stage="classify")
    if stamp.shape == (size, size):
        return stamp
    return np.pad(stamp, [(0, size - stamp.shape[0]), (0, size - stamp.shape[1])], mode="constant",
                  constant_values=value)


def braai_triplet(science: np.ndarray, reference: np.ndarray, difference: np.ndarray, *,
                  size: int = BRAAI_SIZE) -> np.ndarray:
    """ZTF's d6_m7 input from three raw cutouts (NaN -> 0, row L2 norm, pad at the high end).

    Parameters
    ----------
    science, reference, difference : ndarray (ny, nx), float (DN or e-; the scale cancels)
        The cutouts as stored in the packet (63 x 63, or smaller at a CCD edge; the three may
        differ in shape).
    size : int

    Returns
    -------
    ndarray (size, size, 3) float32
        Channels (science, reference, difference).
    """
    chans = [ztf_pad(normalize_rows(np.nan_to_num(np.asarray(c, dtype=np.float32), nan=0.0)), size=size)
             for c in (science, reference, difference)]
    return np.stack(chans, axis=-1).astype(np.float32, copy=False)


def braai_preprocess(triplets: np.ndarray) -> np.ndarray:
    """braai's normalisation of assembled triplets: NaN -> 0, each row / its L2 norm.

    Parameters
    ----------
    triplets : ndarray (n, ny, nx, 3) or (ny, nx, 3), float
        Channels (science, reference, difference), any flux unit; NaN marks pixels with no data
        (off the CCD).

    Returns
    -------
    ndarray (n, ny, nx, 3) float32
        Each row (fixed channel and y) divided by its L2 norm along x; rows with no data are 0.
        A new array; the input is not modified.
    """
    x = np.asarray(triplets, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"triplets must be (n, ny, nx, 3), got {x.shape}", stage="classify")
    x = np.nan_to_num(x, nan=0.0)  # as ZTF: NaN -> 0, +-inf -> the largest float32
    # rows run along x (axis 2) for each channel: normalise channel-last data without transposing
    # Real ZTF templates hold float32-max values where they have no data (NaN elsewhere); their
    # squares overflow, the row norm is inf and the row becomes 0 -- in ZTF's numpy code as here.
    with np.errstate(over="ignore", invalid="ignore"):
        norm = np.sqrt(np.add.reduce(x * x, axis=2, keepdims=True))
        norm[norm == 0] = 1.0
        return x / norm


def read_braai_triplets(path: str | os.PathLike) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield ``(triplet, candidate)`` for each alert of a ZTF ``.avro`` packet file, preprocessed
    exactly as ZTF did for d6_m7 (:func:`braai_triplet` on the cutouts as stored, truncated ones
    padded at the high end).

    Returns
    -------
    iterator of (ndarray (63, 63, 3) float32, dict)
        The candidate record carries ``objectId`` and ``edge_shapes`` (the stored cutout shapes,
        science/reference/difference).

    Raises
    ------
    InputError
        If the file is not readable Avro or a cutout is missing or not FITS.
    """
    import fastavro

    from ..io.avro import cutout_to_array

    path = Path(path)
    try:
        with open(path, "rb") as f:
            records = list(fastavro.reader(f))
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"not a readable Avro alert file ({e})", path=str(path)) from None
    for alert in records:
        stamps = []
        for key in _CUTOUTS:
            if alert.get(key) is None:
                raise InputError(f"{key} is null: braai needs all three cutouts", path=str(path))
            stamps.append(cutout_to_array(alert[key], path=str(path)))
        cand = dict(alert.get("candidate") or {})
        cand.setdefault("objectId", alert.get("objectId"))
        cand["edge_shapes"] = [s.shape for s in stamps]
        yield braai_triplet(*stamps), cand


def build_braai():
    """d6_m7's graph in Keras 3 (untrained), layer names as in ZTF's files.

    Input (63, 63, 3) -> conv1, conv2 (16 x 3x3, ReLU, valid) -> maxpool 2 -> dropout 0.25 ->
    conv3, conv4 (32 x 3x3, ReLU, valid) -> maxpool 4 -> dropout 0.25 -> flatten (1152) ->
    fc_1 (256, ReLU) -> dropout 0.5 -> fc_out (1, sigmoid).
    """
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((BRAAI_SIZE, BRAAI_SIZE, 3), name="triplet"),
        layers.Conv2D(16, 3, activation="relu", padding="valid", name="conv1"),
        layers.Conv2D(16, 3, activation="relu", padding="valid", name="conv2"),
        layers.MaxPooling2D(2, name="max_pooling2d"),
        layers.Dropout(0.25, name="dropout"),
        layers.Conv2D(32, 3, activation="relu", padding="valid", name="conv3"),
        layers.Conv2D(32, 3, activation="relu", padding="valid", name="conv4"),
        layers.MaxPooling2D(4, name="max_pooling2d_1"),
        layers.Dropout(0.25, name="dropout_1"),
        layers.Flatten(name="flatten"),
        layers.Dense(256, activation="relu", name="fc_1"),
        layers.Dropout(0.5, name="dropout_2"),
        layers.Dense(1, activation="sigmoid", name="fc_out"),
    ], name="VGG6")


def _json_signature(cfg_layers: Sequence[dict]) -> list[tuple]:
    out = []
    for layer in cfg_layers:
        cls, c = layer["class_name"], layer["config"]
        main = {"Conv2D": c.get("filters"), "Dense": c.get("units"), "Dropout": c.get("rate"),
                "MaxPooling2D": (c.get("pool_size") or [None])[0]}.get(cls)
        out.append((cls, c.get("name"), main))
    return out


def check_architecture(json_path: str | os.PathLike) -> None:
    """Check that a Keras 2 architecture JSON describes the graph :func:`build_braai` makes.

    Compares, layer by layer, class, name, filters/units/rate/pool size, plus the 3x3 valid
    convolutions, activations and the 63x63x3 input.

    Raises
    ------
    InputError
        Naming the file and the first layer that differs.
    """
    json_path = Path(json_path)
    try:
        cfg = json.loads(json_path.read_text())
        layers_cfg = cfg["config"]["layers"] if isinstance(cfg["config"], dict) else cfg["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"not a Keras architecture JSON ({e})", path=str(json_path)) from None
    got = _json_signature(layers_cfg)
    if got != list(_LAYERS):
        bad = next((i for i, (a, b) in enumerate(zip(got, _LAYERS)) if a != b), min(len(got), len(_LAYERS)))
        raise InputError(f"architecture differs from braai d6_m7 at layer {bad}: file has "
                         f"{got[bad] if bad < len(got) else 'nothing'}, expected "
                         f"{_LAYERS[bad] if bad < len(_LAYERS) else 'nothing'}", path=str(json_path))
    for layer in layers_cfg:
        c = layer["config"]
        if layer["class_name"] == "Conv2D" and (list(c["kernel_size"]) != [3, 3] or c["padding"] != "valid"
                                                or c["activation"] != "relu"):
            raise InputError(f"layer {c['name']}: expected 3x3 valid ReLU convolution", path=str(json_path))
        if layer["class_name"] == "Dense":
            want = "sigmoid" if c["name"] == "fc_out" else "relu"
            if c["activation"] != want:
                raise InputError(f"layer {c['name']}: activation {c['activation']}, expected {want}",
                                 path=str(json_path))
    shape = layers_cfg[0]["config"].get("batch_input_shape")
    if shape is not None and list(shape[1:]) != [BRAAI_SIZE, BRAAI_SIZE, 3]:
        raise InputError(f"input shape {shape[1:]}, expected [63, 63, 3]", path=str(json_path))


def load_braai(path: str | os.PathLike | None = None):
    """Load ZTF's d6_m7 weights into :func:`build_braai`'s graph.

    Parameters
    ----------
    path : str or PathLike, optional
        See :func:`braai_files`.

    Returns
    -------
    keras.Model
        Input (n, 63, 63, 3) float32 preprocessed as :func:`braai_triplet` /
        :func:`braai_preprocess`; output (n, 1) score in [0, 1] (1 = real).

    Raises
    ------
    InputError
        Missing files, an architecture JSON that is not d6_m7, or a weights file whose layers
        or shapes do not match (naming the layer).
    """
    import h5py

    weights, arch = braai_files(path)
    if arch.is_file():
        check_architecture(arch)
    model = build_braai()
    try:
        with h5py.File(weights, "r") as f:
            g = f["model_weights"] if "model_weights" in f else f
            for layer in model.layers:
                if not layer.weights:
                    continue
                if layer.name not in g:
                    raise InputError(f"no weights for layer {layer.name!r} (has {sorted(g.keys())})",
                                     path=str(weights))
                lg = g[layer.name]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in lg.attrs.get("weight_names", [])]
                values = [np.asarray(lg[n]) for n in names]
                want = [tuple(w.shape) for w in layer.weights]
                if [v.shape for v in values] != want:
                    raise InputError(f"layer {layer.name!r}: weight shapes {[v.shape for v in values]}, "
                                     f"expected {want}", path=str(weights))
                layer.set_weights(values)
    except OSError as e:
        raise InputError(f"not a readable HDF5 weights file ({e})", path=str(weights)) from None
    return model
