"""Real/bogus inference: one scorer interface over LiteRT (Edge TPU or CPU int8), Keras and braai.

::

    scorer = load_scorer(config.classify)          # once per process
    scores = scorer(triplets)                      # (n, 63, 63, 3) -> {"rb": (n,), "drb": (n,)}

Backends (``classify.backend``):

* ``"edgetpu"`` -- the int8 model through LiteRT with the Edge TPU delegate
  (``load_delegate("libedgetpu.so.1")``); a :class:`~nightsift.engine.errors.BackendError` says so
  when the library is not installed. Uses the ``edgetpu_compiler`` output when the model metadata
  names one (``"edgetpu"``), else the plain int8 model (the delegate then runs nothing on the TPU).
* ``"tflite"`` -- the same full-integer int8 model on the CPU (LiteRT / XNNPACK): inputs quantised
  with the input tensor's scale and zero point, outputs dequantised with the output tensor's.
* ``"keras"`` -- the float ``.keras`` model (``keras.saving.load_model(..., safe_mode=True)``:
  no pickle, no arbitrary code).
* ``"braai"`` -- ZTF's public d6_m7 model with ZTF's own preprocessing (:mod:`.braai`).
* ``"auto"`` -- ``"edgetpu"`` when the delegate loads, else ``"tflite"`` (``"keras"`` for a
  ``.keras`` ``classify.model``). In the chain (:func:`pipeline_scorer`) ``"auto"`` runs without a
  scorer only when there is nothing to run: no ``classify.model`` set and no model shipped, or no
  LiteRT runtime installed for the shipped model (a WARNING says so once). A configured model --
  ``classify.model``, or the shipped one -- that is missing, unreadable or damaged is an error.
* ``"none"`` -- no scorer (:func:`load_scorer` returns ``None``).

Models: ``classify.model = ""`` means the model shipped in ``engine/classify/models/``: the
metadata JSON there names the files (``"tflite"``, ``"keras"``, ``"edgetpu"``, at the top level or
under ``"files"``, where the int8 model may be ``"tflite_int8"``), the operating ``"threshold"``
(``"threshold_int8"`` for the int8 backends when present), the ``"version"`` (or ``"name"``) and
the ``"normalisation"`` (``"nightsift"`` or its versioned name ``preprocess.NORMALIZATION``:
:func:`nightsift.engine.classify.preprocess.preprocess`; ``"braai"``; ``"none"``). A path in
``classify.model`` may be a metadata JSON, a ``.tflite``/``.keras`` file (its metadata is the JSON
of the same stem, less an ``_int8``/``_edgetpu`` suffix, when present) or, for ``braai``, the
folder of ZTF's files. :func:`model_variants` resolves the float and int8 variants of one model
the same way (``nightsift evaluate``): this module is the one reader of model metadata.

Integrity: model metadata records the SHA-256 of each model file (``"sha256": {file name: hex}``,
:func:`nightsift.engine.classify.export.record_model_hashes`); :func:`load_scorer` refuses a file
whose digest differs (an :class:`~nightsift.engine.errors.InputError` naming the file). The shipped
model must carry its digests; a user model without one loads with a WARNING naming the file (its
integrity cannot be checked). A ``.keras`` archive is checked (zip structure, every member's CRC)
before Keras opens it.

The score is the model's probability that the candidate is real; it fills both ZTF fields ``rb``
and ``drb`` of the packets (nightsift has one, deep, classifier), with the model version in
``rbversion``/``drbversion``.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import CLASSIFY_BACKENDS, ClassifyConfig, one_of
from ..errors import BackendError, ConfigError, InputError
from .model import MODELS_DIR  # folder of the models shipped with nightsift (re-exported)

__all__ = [
    "MODELS_DIR",
    "EDGETPU_LIBRARY",
    "ModelSpec",
    "Scorer",
    "edgetpu_available",
    "resolve_model",
    "model_variants",
    "verify_model_file",
    "check_model",
    "load_scorer",
    "pipeline_scorer",
]

log = logging.getLogger("nightsift.classify")

#: shared library of the Edge TPU runtime (libedgetpu)
EDGETPU_LIBRARY = "libedgetpu.so.1"
#: side of the cutouts every model takes
SIZE = 63
_NORMALISATIONS = ("nightsift", "braai", "none")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: which backend runs which file, with which preprocessing.

    Attributes
    ----------
    backend : str
        ``"edgetpu"``, ``"tflite"``, ``"keras"`` or ``"braai"`` (never ``"auto"``).
    path : Path
        The model file (``.tflite``, ``.keras``, or braai's weights ``.h5``).
    normalisation : str
        ``"nightsift"``, ``"braai"`` or ``"none"``.
    version : str
        Written to the packets' ``rbversion``/``drbversion``.
    threshold : float
        Operating threshold on the score (``classify.threshold`` when >= 0, else the model's,
        else 0.5).
    metadata : dict
        The model's metadata JSON (empty when there is none).
    metadata_path : Path or None
        Where the metadata was read from (``None`` without metadata).
    stored_threshold : float or None
        The operating threshold the metadata records for this backend (``None``: it records none).
    """

    backend: str
    path: Path
    normalisation: str
    version: str
    threshold: float
    metadata: dict = field(default_factory=dict)
    metadata_path: Path | None = None
    stored_threshold: float | None = None


def edgetpu_available() -> bool:
    """True when the Edge TPU runtime library can be loaded (cheap; does not open a device)."""
    try:
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError:
        return False
    return True


def _edgetpu_delegate():
    # check the library first: LiteRT's load_delegate leaves a half-built object whose __del__
    # raises when the library is missing
    if not edgetpu_available():
        raise BackendError(f"classify.backend='edgetpu' but the Edge TPU runtime ({EDGETPU_LIBRARY}) is not "
                           "installed; install libedgetpu (Coral's apt package libedgetpu1-std) or use "
                           "backend 'tflite' (the same int8 model on the CPU) or 'auto'")
    from ai_edge_litert.interpreter import load_delegate

    try:
        return load_delegate(EDGETPU_LIBRARY)
    except (ValueError, OSError, RuntimeError) as e:
        raise BackendError(f"the Edge TPU delegate did not load ({e}); is an Edge TPU attached? "
                           "Use backend 'tflite' to run the int8 model on the CPU") from None


# ----------------------------------------------------------------------------- model resolution

def _read_metadata(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"model metadata is not readable JSON ({e})", path=str(path)) from None
    if not isinstance(meta, dict):
        raise InputError("model metadata must be a JSON object", path=str(path))
    return meta


def _default_metadata() -> tuple[Path | None, dict]:
    """The shipped model's metadata JSON (``models/*.json``): the one marked ``"default": true``,
    else the only one. ``(None, {})`` when there is none."""
    if not MODELS_DIR.is_dir():
        return None, {}
    cands = sorted(MODELS_DIR.glob("*.json"))
    metas = [(p, _read_metadata(p)) for p in cands]
    metas = [(p, m) for p, m in metas if any(k in m for k in ("tflite", "keras", "edgetpu", "files"))] or metas
    if not metas:
        return None, {}
    marked = [pm for pm in metas if pm[1].get("default")]
    if len(marked) == 1 or len(metas) == 1:
        return (marked or metas)[0]
    raise InputError(f"several model metadata files ({[p.name for p, _ in metas]}) and none marked "
                     "\"default\": true; set classify.model to one of them", path=str(MODELS_DIR))


def _sole(folder: Path, pattern: str, *, exclude: str | None = None) -> Path | None:
    found = [p for p in sorted(folder.glob(pattern)) if exclude is None or not p.name.endswith(exclude)]
    return found[0] if len(found) == 1 else None


def resolve_model(config: ClassifyConfig) -> ModelSpec | None:
    """Which file, backend, preprocessing and threshold ``config`` means (cheap: no model loaded).

    Parameters
    ----------
    config : ClassifyConfig

    Returns
    -------
    ModelSpec or None
        ``None`` for backend ``"none"``. ``"auto"`` becomes ``"edgetpu"`` when
        :func:`edgetpu_available`, else ``"tflite"``.

    Raises
    ------
    InputError
        No model file for the backend (the message says where it looked), unreadable metadata.
    BackendError
        ``"edgetpu"`` asked for and the Edge TPU runtime absent.
    ConfigError
        An unknown backend or normalisation.
    """
    backend = config.backend
    if backend == "none":
        return None
    if backend == "auto":
        if config.model and Path(config.model).suffix == ".keras":
            backend = "keras"  # a float model runs in Keras, not LiteRT
        else:
            backend = "edgetpu" if edgetpu_available() else "tflite"
    if backend not in CLASSIFY_BACKENDS:  # a ClassifyConfig is checked when made; a stand-in may not be
        raise ConfigError(f"classify.backend={config.backend!r}: expected {one_of(CLASSIFY_BACKENDS)}")
    if backend == "edgetpu" and not edgetpu_available():
        _edgetpu_delegate()  # raises the BackendError with the explanation

    if backend == "braai":
        from .braai import BRAAI_VERSION, braai_files

        weights, _ = braai_files(config.model or None)
        thr = config.threshold if config.threshold >= 0 else 0.5
        return ModelSpec("braai", weights, "braai", BRAAI_VERSION, float(thr), {})

    model = Path(config.model) if config.model else None
    return _spec(backend, model, *_locate_metadata(model), threshold=config.threshold)


def model_variants(model=None) -> dict[str, ModelSpec]:
    """The float and int8 variants of a model, for evaluation, from one read of its metadata.

    Parameters
    ----------
    model : str or PathLike, optional
        A metadata JSON (its variants are the files it names), a ``.keras`` file (the float
        variant alone) or a ``.tflite`` file (the int8 variant alone); ``None`` or ``""``: the
        shipped model.

    Returns
    -------
    dict
        ``{"float": ModelSpec (backend "keras"), "int8": ModelSpec (backend "tflite")}``, the
        variants the model has, each resolved as :func:`resolve_model` does (with no
        ``classify.threshold`` override: ``stored_threshold`` is the metadata's) and its file
        checked against its SHA-256 (:func:`verify_model_file`).

    Raises
    ------
    InputError
        Not a metadata JSON, ``.keras`` or ``.tflite`` file; a missing file; metadata naming no
        model file; a digest that differs.
    """
    path = Path(model) if model else None
    if path is not None and path.suffix not in (".json", ".keras", ".tflite"):
        raise InputError("expected a .keras, .tflite or model metadata .json file", path=str(path))
    meta_path, meta, folder = _locate_metadata(path)
    if path is not None and path.suffix != ".json":
        backends = {"float": "keras"} if path.suffix == ".keras" else {"int8": "tflite"}
    else:
        base = meta_path.parent if meta_path is not None else folder
        backends = {label: b for label, b in (("float", "keras"), ("int8", "tflite"))
                    if _named(meta, base, b) is not None}
    if not backends:
        raise InputError("the model metadata names no .keras or .tflite file to evaluate",
                         path=str(meta_path or folder))
    specs = {label: _spec(b, path, meta_path, meta, folder, threshold=-1.0) for label, b in backends.items()}
    for spec in specs.values():
        verify_model_file(spec)
    return specs


def _locate_metadata(model: Path | None) -> tuple[Path | None, dict, Path]:
    """``(metadata path, metadata, folder)`` of ``classify.model`` (``None``: the shipped model).

    A ``.tflite``/``.keras`` file's metadata is the JSON of the same stem, less an
    ``_int8``/``_edgetpu`` suffix; without one the metadata is ``{}`` and the path returned is where
    it was looked for.
    """
    if model is None:
        meta_path, meta = _default_metadata()
        return meta_path, meta, MODELS_DIR
    if model.suffix == ".json":
        return model, _read_metadata(model), model.parent
    if not model.is_file():
        raise InputError("classify.model: no such model file", path=str(model))
    stems = [model.stem] + [model.stem[: -len(x)] for x in ("_int8", "_edgetpu") if model.stem.endswith(x)]
    meta_path = next((model.with_name(st + ".json") for st in stems if model.with_name(st + ".json").is_file()),
                     model.with_suffix(".json"))
    return meta_path, (_read_metadata(meta_path) if meta_path.is_file() else {}), model.parent


def _named(meta: dict, base: Path, key: str) -> Path | None:
    """The file the metadata names for ``key`` (``"tflite"``, ``"keras"``, ``"edgetpu"``), in ``base``:
    top-level ``{"tflite": ...}`` or the training metadata's ``{"files": {"tflite_int8": ...}}``."""
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    name = meta.get(key) or files.get(key) or (files.get("tflite_int8") if key == "tflite" else None)
    return (base / name) if name else None


def _model_file(backend: str, model: Path | None, meta: dict, base: Path, folder: Path) -> Path:
    """The file ``backend`` runs: ``model`` itself when it is a ``.tflite``/``.keras`` file, else
    the one the metadata names, else the only file of its kind in ``folder``."""
    def sole(pattern, exclude=None):
        return _sole(folder, pattern, exclude=exclude) if folder.is_dir() else None

    path: Path | None
    if model is not None and model.suffix in (".tflite", ".keras"):
        path = model
    elif backend == "keras":
        path = _named(meta, base, "keras") or sole("*.keras")
    elif backend == "edgetpu":
        path = _named(meta, base, "edgetpu") or sole("*_edgetpu.tflite")
        if path is None:
            path = _named(meta, base, "tflite") or sole("*.tflite", "_edgetpu.tflite")
            if path is not None:
                log.warning("no edgetpu_compiler output for %s: the Edge TPU delegate will leave the int8 "
                            "model on the CPU", path)
    else:
        path = _named(meta, base, "tflite") or sole("*.tflite", "_edgetpu.tflite")
    if path is None or not path.is_file():
        kind = {"keras": "float .keras", "tflite": "int8 .tflite", "edgetpu": "Edge TPU .tflite"}[backend]
        raise InputError(f"no {kind} model for classify.backend={backend!r} (looked for "
                         f"{path or 'a metadata JSON or a single model file'}); train one with `nightsift train` "
                         "or set classify.model", path=str(path or folder))
    return path


def _stored_threshold(meta: dict, backend: str) -> float | None:
    """The operating threshold ``meta`` records for ``backend``: ``"threshold_int8"`` (chosen on the
    int8 model's own validation scores) for the int8 backends when present, else ``"threshold"``."""
    if backend in ("tflite", "edgetpu") and "threshold_int8" in meta:
        return float(meta["threshold_int8"])
    return float(meta["threshold"]) if "threshold" in meta else None


def _spec(backend: str, model: Path | None, meta_path: Path | None, meta: dict, folder: Path, *,
          threshold: float) -> ModelSpec:
    """The ModelSpec of ``backend`` for a located model (:func:`_locate_metadata`); ``threshold``
    overrides the metadata's when >= 0 (``classify.threshold``)."""
    path = _model_file(backend, model, meta, meta_path.parent if meta_path is not None else folder, folder)
    default_norm = "braai" if path.name.startswith("d6_m7") else "nightsift"  # d6_m7: ZTF's Edge TPU braai
    norm = _normalisation_name(str(meta.get("normalisation", meta.get("normalization", default_norm))), meta_path)
    version = str(meta.get("version") or meta.get("name") or path.stem)
    stored = _stored_threshold(meta, backend)
    thr = threshold if threshold >= 0 else (stored if stored is not None else 0.5)
    return ModelSpec(backend, path, norm, version, float(thr), meta,
                     meta_path if meta_path is not None and meta_path.is_file() else None, stored)


def _is_shipped(spec: ModelSpec) -> bool:
    where = spec.metadata_path.parent if spec.metadata_path is not None else spec.path.parent
    try:
        return where.resolve() == MODELS_DIR.resolve()
    except OSError:
        return False


def verify_model_file(spec: ModelSpec) -> None:
    """Check ``spec.path`` against the SHA-256 its metadata records (see the module docstring).

    Raises
    ------
    InputError
        The digest differs (the file is damaged or was replaced), or the shipped model's metadata
        records none for it; one line naming the file. (No digest recorded for a model that is
        not the shipped one: a warning.)
    """
    from ..io.atomic import file_sha256

    path, metadata, metadata_path = spec.path, spec.metadata, spec.metadata_path
    hashes = metadata.get("sha256") if isinstance(metadata.get("sha256"), dict) else {}
    want = None
    if metadata_path is not None:
        try:
            rel = path.resolve().relative_to(Path(metadata_path).parent.resolve()).as_posix()
        except ValueError:
            rel = None
        want = hashes.get(rel) if rel is not None else None
    if want is None:
        if _is_shipped(spec):
            raise InputError(f"the shipped model's metadata ({metadata_path}) records no SHA-256 for this "
                             "file: the installation is damaged; reinstall nightsift", path=str(path))
        log.warning("%s: no SHA-256 recorded for this model file%s: its integrity cannot be checked (write the "
                    "metadata with nightsift.engine.classify.export.record_model_hashes, or retrain)", path,
                    f" in {metadata_path}" if metadata_path is not None else " (no metadata JSON)")
        return
    try:
        got = file_sha256(path)
    except OSError as e:
        raise InputError(f"model file cannot be read ({e.strerror or e})", path=str(path)) from None
    if got != str(want).lower():
        raise InputError(f"model file's SHA-256 {got[:12]}... differs from the {str(want)[:12]}... recorded in "
                         f"{metadata_path}: the file is damaged or was replaced; restore it (or retrain with "
                         "`nightsift train`)", path=str(path))


def _normalisation_name(name: str, where) -> str:
    """``"nightsift"`` (also under its versioned name, ``preprocess.NORMALIZATION``), ``"braai"``
    or ``"none"``; anything else is a ConfigError (a model trained with another normalisation)."""
    if name in _NORMALISATIONS:
        return name
    try:
        from .preprocess import NORMALIZATION
    except ImportError:
        NORMALIZATION = None
    if name == NORMALIZATION:
        return "nightsift"
    known = list(_NORMALISATIONS) + ([NORMALIZATION] if NORMALIZATION else [])
    raise ConfigError(f"model metadata {where}: normalisation {name!r} is not one this nightsift applies "
                      f"({known}); retrain the model or use the nightsift version it was made with")


# ----------------------------------------------------------------------------- predictors

def _score_column(y: np.ndarray) -> np.ndarray:
    """(n,), (n, 1) sigmoid or (n, 2) softmax output -> (n,) probability of 'real'."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y
    if y.ndim == 2 and y.shape[1] in (1, 2):
        return y[:, -1]
    raise InputError(f"model output of shape {y.shape}: expected (n,), (n, 1) or (n, 2)", stage="classify")


class _LiteRT:
    """One LiteRT interpreter; quantises float inputs for integer models and dequantises outputs."""

    def __init__(self, path: Path, *, batch_size: int, num_threads: int | None, delegates=()):
        Interpreter = _litert_interpreter()
        try:
            it = Interpreter(model_path=str(path), num_threads=num_threads,
                             experimental_delegates=list(delegates) or None)
        except (ValueError, RuntimeError) as e:
            raise InputError(f"LiteRT cannot load this model ({e})", path=str(path)) from None
        ins, outs = it.get_input_details(), it.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise InputError(f"expected one input and one output tensor, got {len(ins)} and {len(outs)}", path=str(path))
        shape = [int(s) for s in ins[0]["shape"]]
        if shape[1:] != [SIZE, SIZE, 3]:
            raise InputError(f"model input is {shape}, expected (batch, {SIZE}, {SIZE}, 3)", path=str(path))
        self.batch = shape[0]
        try:
            if batch_size != shape[0]:
                try:  # most CPU models take any batch; compiled Edge TPU models (and static reshapes) don't
                    it.resize_tensor_input(ins[0]["index"], [batch_size, SIZE, SIZE, 3], strict=False)
                    it.allocate_tensors()
                    self.batch = batch_size
                except (ValueError, RuntimeError):
                    it = Interpreter(model_path=str(path), num_threads=num_threads,
                                     experimental_delegates=list(delegates) or None)
                    it.allocate_tensors()
            else:
                it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            hint = ""
            if "edgetpu-custom-op" in str(e):
                hint = ": it is compiled for the Edge TPU (edgetpu-custom-op), use backend 'edgetpu' on a machine with one"
            raise InputError(f"LiteRT cannot prepare this model{hint} ({str(e).splitlines()[0]})", path=str(path)) from None
        self.it = it
        self.inp = it.get_input_details()[0]
        self.out = it.get_output_details()[0]
        self.in_dtype = np.dtype(self.inp["dtype"])
        self.in_scale, self.in_zero = self.inp["quantization"]
        self.out_scale, self.out_zero = self.out["quantization"]
        if self.in_dtype.kind in "iu" and self.in_scale == 0:
            raise InputError("integer input tensor without quantisation parameters", path=str(path))
        self._buf = np.zeros([self.batch, SIZE, SIZE, 3], self.in_dtype)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float -> the input tensor's integer type: ``clip(rint(x / scale + zero_point))``."""
        if self.in_dtype.kind not in "iu":
            return np.ascontiguousarray(x, dtype=self.in_dtype)
        info = np.iinfo(self.in_dtype)
        q = np.asarray(x, dtype=np.float32) / np.float32(self.in_scale)
        q += np.float32(self.in_zero)
        np.rint(q, out=q)
        np.clip(q, info.min, info.max, out=q)
        return q.astype(self.in_dtype)

    def dequantize(self, y: np.ndarray) -> np.ndarray:
        if np.dtype(y.dtype).kind in "iu" and self.out_scale != 0:
            return (y.astype(np.float32) - np.float32(self.out_zero)) * np.float32(self.out_scale)
        return y.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        out = np.empty(n, np.float32)
        q = self.quantize(x)  # the whole batch at once: per-call numpy overhead matters at batch 1
        for i in range(0, n, self.batch):
            chunk = q[i:i + self.batch]
            k = len(chunk)
            if k < self.batch:  # the last, short batch: zero-padded to the allocated shape
                self._buf[:k] = chunk
                self._buf[k:] = 0
                chunk = self._buf
            self.it.set_tensor(self.inp["index"], chunk)
            self.it.invoke()
            y = self.it.get_tensor(self.out["index"])[:k]
            out[i:i + k] = _score_column(self.dequantize(y))
        return out


class _KerasPredict:
    def __init__(self, model):
        self.model = model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _score_column(np.asarray(self.model.predict_on_batch(x), dtype=np.float32))


def _litert_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise BackendError("the LiteRT runtime is not installed: pip install 'nightsift[ml]' (ai-edge-litert), "
                           "or set classify.backend = 'none'") from None
    return Interpreter


def _check_keras_archive(path: Path) -> None:
    """A ``.keras`` file is a zip archive: refuse a truncated or corrupt one in one line (Keras
    reports a truncated archive as "File not found" and a bad CRC as a zipfile traceback)."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error) as e:
        raise InputError(f"is not a readable .keras archive ({e}): the file is truncated or corrupt; restore it "
                         "(or retrain with `nightsift train`)", path=str(path)) from None
    except OSError as e:
        raise InputError(f"model file cannot be read ({e.strerror or e})", path=str(path)) from None
    if bad is not None:
        raise InputError(f"is corrupt: archive member {bad!r} fails its CRC check; restore the file (or retrain "
                         "with `nightsift train`)", path=str(path))


def _load_keras(path: Path):
    import zipfile

    try:
        import keras
    except ImportError:
        raise BackendError("Keras is not installed: pip install 'nightsift[ml]', or use classify.backend = "
                           "'tflite'") from None
    _check_keras_archive(path)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"Keras cannot load this model in safe mode ({first})", path=str(path)) from None


def _normaliser(name: str) -> Callable[[np.ndarray], np.ndarray]:
    if name == "braai":
        from .braai import braai_preprocess

        return braai_preprocess
    if name == "nightsift":
        try:
            from .preprocess import preprocess
        except ImportError as e:
            raise InputError(f"nightsift normalisation (nightsift.engine.classify.preprocess) missing ({e})",
                             stage="classify") from None
        return preprocess
    return lambda x: np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)


# ----------------------------------------------------------------------------- the scorer

class Scorer:
    """Batched real/bogus scoring of cutout triplets.

    Call it with triplets ``(n, 63, 63, 3)`` (science, reference, difference; any float dtype,
    NaN = no data, numpy or cupy) and get ``{"rb": (n,) float32, "drb": (n,) float32}``: the
    probability that each candidate is real. The triplets are normalised (the model's
    ``normalisation``) and run ``batch_size`` at a time. Build one with :func:`load_scorer`.

    Attributes
    ----------
    spec : ModelSpec
    batch_size : int
    threshold : float
        Operating threshold (a candidate is called real when ``score >= threshold``).
    versions : dict
        ``{"rb": version, "drb": version}`` for the packets' version fields.
    """

    fields = ("rb", "drb")

    def __init__(self, spec: ModelSpec, predict: Callable[[np.ndarray], np.ndarray], *,
                 preprocess: Callable[[np.ndarray], np.ndarray], batch_size: int):
        self.spec = spec
        self._predict = predict
        self._preprocess = preprocess
        self.batch_size = int(batch_size)

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    @property
    def versions(self) -> dict[str, str]:
        precision = "int8" if self.spec.backend in ("tflite", "edgetpu") else "float32"
        v = f"{self.spec.version}/{precision}"
        return {f: v for f in self.fields}

    def score(self, triplets) -> np.ndarray:
        """The scores alone: ndarray (n,) float32 in [0, 1]."""
        from nightsift.kernels._xp import to_numpy

        x = to_numpy(triplets)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (SIZE, SIZE, 3):
            raise InputError(f"triplets must be (n, {SIZE}, {SIZE}, 3), got {x.shape}", stage="classify")
        n = len(x)
        out = np.empty(n, np.float32)
        for i in range(0, n, self.batch_size):
            batch = np.asarray(self._preprocess(x[i:i + self.batch_size]), dtype=np.float32)
            out[i:i + self.batch_size] = self._predict(batch)
        return out

    def __call__(self, triplets) -> dict[str, np.ndarray]:
        s = self.score(triplets)
        return {f: s.copy() for f in self.fields}

    def __repr__(self) -> str:
        return (f"Scorer(backend={self.backend!r}, model={str(self.spec.path)!r}, version={self.spec.version!r}, "
                f"threshold={self.threshold:.4g}, batch_size={self.batch_size})")


def load_scorer(config: ClassifyConfig, *, num_threads: int | None = None,
                preprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> Scorer | None:
    """Build the scorer ``config`` asks for (loads the model: do it once per process).

    Parameters
    ----------
    config : ClassifyConfig
        ``backend``, ``model``, ``batch_size``, ``threshold``.
    num_threads : int, optional, keyword-only
        CPU threads of the LiteRT interpreter (``None``: LiteRT's default). Keras/TensorFlow
        use their own thread pools.
    preprocess : callable, optional, keyword-only
        Replaces the model's normalisation (``(n, 63, 63, 3) -> float32``), e.g. for a model
        built outside nightsift.

    Returns
    -------
    Scorer or None
        ``None`` for backend ``"none"``.

    Raises
    ------
    InputError, BackendError, ConfigError
        As :func:`resolve_model`, a model file whose SHA-256 differs from its metadata's
        (:func:`verify_model_file`), or a model file the backend cannot load.
    """
    spec = resolve_model(config)
    if spec is None:
        return None
    if spec.backend != "braai":  # ZTF's files carry no nightsift metadata
        verify_model_file(spec)
    if spec.backend == "braai":
        from .braai import load_braai

        predict = _KerasPredict(load_braai(spec.path))
    elif spec.backend == "keras":
        predict = _KerasPredict(_load_keras(spec.path))
    elif spec.backend == "edgetpu":
        predict = _LiteRT(spec.path, batch_size=config.batch_size, num_threads=num_threads,
                          delegates=[_edgetpu_delegate()])
    else:
        predict = _LiteRT(spec.path, batch_size=config.batch_size, num_threads=num_threads)
    prep = preprocess or _normaliser(spec.normalisation)
    log.info("classifier: %s %s (%s), threshold %.4g", spec.backend, spec.path, spec.version, spec.threshold)
    return Scorer(spec, predict, preprocess=prep, batch_size=config.batch_size)


@functools.lru_cache(maxsize=4)
def _cached(config: ClassifyConfig) -> Scorer | None:
    return load_scorer(config)


def pipeline_scorer(config: ClassifyConfig) -> Scorer | None:
    """The scorer for the chain, loaded once per process and cached (workers call this per CCD).

    ``None`` when the backend is ``"none"``, or ``"auto"`` with nothing to run: no
    ``classify.model`` and no model shipped, or no LiteRT runtime for the shipped model (a
    warning is logged once). Any other problem raises: a configured (or shipped) model that is
    missing, unreadable or fails its SHA-256 check, an explicit backend whose runtime is missing.
    """
    if config.backend == "none":
        return None
    if config.backend == "auto":
        why = _nothing_to_score_with(config)
        if why is not None:
            _warn_no_model(why)
            return None
    return _cached(config)


def check_model(config: ClassifyConfig) -> ModelSpec | None:
    """What :func:`pipeline_scorer` would load, resolved and checked without loading it (cheap: the
    metadata is read and the file hashed): call it before a night so that a missing, unreadable
    or damaged model stops the night at once instead of failing every CCD-visit.

    Returns
    -------
    ModelSpec or None
        ``None`` when the chain runs without a scorer (backend ``"none"``, or ``"auto"`` with
        nothing to run).

    Raises
    ------
    InputError, BackendError, ConfigError
        As :func:`resolve_model` and :func:`verify_model_file`.
    """
    if config.backend == "none" or (config.backend == "auto" and _nothing_to_score_with(config) is not None):
        return None
    spec = resolve_model(config)
    if spec is not None and spec.backend != "braai":
        verify_model_file(spec)
    return spec


def _nothing_to_score_with(config: ClassifyConfig) -> str | None:
    """Why ``"auto"`` runs without a scorer, or None when a model is to be loaded (and must load)."""
    if config.model:
        return None  # configured: it loads, or the run stops with the reason
    shipped = MODELS_DIR.is_dir() and any(next(MODELS_DIR.glob(g), None) is not None
                                          for g in ("*.json", "*.tflite", "*.keras"))
    if not shipped:
        return f"classify.model is not set and no model is shipped in {MODELS_DIR}"
    import importlib.util

    if importlib.util.find_spec("ai_edge_litert") is None:
        return "the LiteRT runtime is not installed (pip install 'nightsift[ml]') to run the shipped model"
    return None


@functools.lru_cache(maxsize=8)
def _warn_no_model(message: str) -> None:
    log.warning("alerts will carry no real/bogus score: %s", message)
