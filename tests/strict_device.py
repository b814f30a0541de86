"""A strict "device" array namespace for machines without a GPU (a test tool, not part of nightsift).

:class:`StrictArray` wraps a numpy array and behaves like a cupy array: its data live "on a
device", so every *implicit* conversion to numpy or to Python values raises ``TypeError``. Running
the production chain on :data:`strict` therefore finds every hidden host round trip (each one a
device synchronisation and a copy on a real GPU) on a CPU-only machine.

Refused (``TypeError``, "strict device: ...")
    ``numpy.asarray(a)`` / ``numpy.array(a)`` (``__array__``; there is no ``__array_interface__``,
    ``__array_struct__`` or buffer), ``float(a)``, ``int(a)``, ``operator.index(a)``, ``complex(a)``,
    ``bool(a)`` (so ``if xp.any(m):``), ``a.item()``, ``a.tolist()``, ``a.tobytes()``, ``x in a``,
    iterating a 0-d or 1-D array (one value per element, see below), pickling, ``format(a, ".3f")``,
    numpy functions and ufuncs called on it directly (``np.sqrt(a)``, ``np.sum(a)``: call them on
    ``xp``), and mixing with numpy arrays: ``a + np_array``, ``xp.where(m, a, np_array)``,
    ``a[np_index]``, ``a[...] = np_array`` ("mixed host and device arrays"). ``repr`` shows shape and
    dtype, never values.
Allowed
    Python numbers and numpy scalars (``np.float32(2)``) as operands: constants, as on cupy (but not
    enum members such as ``MaskBits.BAD``, which cupy refuses: use ``int(...)``); numpy
    dtypes anywhere; metadata (``shape``, ``dtype``, ``len(a)``, ``xp.finfo``, ``xp.result_type``).
    Iterating an array of 2 or more dimensions yields device sub-arrays, as cupy does (unpacking
    ``yy, xx = xp.mgrid[...]`` moves nothing); a 1-D array would yield per-element values, i.e. a
    Python loop over sources or pixels, so it is refused.
Explicit crossings, counted in ``strict.stats`` (h2d/d2h bytes and counts)
    Upload: ``strict.asarray(host)`` / ``strict.array(host)`` of numpy data, lists or Python scalars
    (as ``cupy.asarray`` does); ``a.set(host)``. Download: ``a.get()``. Tests compare these counts
    with nightsift's ``TransferLedger``: an upload the ledger did not see is a hidden crossing.

Everything else delegates to numpy (``strict.fft`` to scipy.fft, ``strict.ndimage`` to
scipy.ndimage, ``strict.linalg`` / ``strict.random`` to numpy's): arguments are unwrapped, array
results re-wrapped, and numpy scalars or Python numbers computed from device data come back as 0-d
StrictArrays, as cupy returns 0-d arrays. Device arithmetic never emits numpy's floating-point
warnings (cupy has none): every delegated call runs under ``numpy.errstate(all="ignore")``.
"""
from __future__ import annotations

import enum
import threading
import types
from dataclasses import dataclass, fields

import numpy as np
import scipy.fft
import scipy.ndimage

__all__ = ["StrictArray", "TransferStats", "strict", "strict_namespace"]

_HINT = "use nightsift.kernels.to_host / host_scalars"
_SCALARS = (bool, int, float, complex, np.generic)


def _refuse(what):
    raise TypeError(f"strict device: implicit device-to-host conversion ({what}); {_HINT}")


def _mixed(where):
    raise TypeError(f"strict device: mixed host and device arrays in {where}; move the numpy array to the "
                    "device first (nightsift.kernels.to_device)")


@dataclass
class TransferStats:
    """What really crossed between host and the stand-in device (bytes and number of copies)."""

    h2d_bytes: int = 0
    h2d_count: int = 0
    d2h_bytes: int = 0
    d2h_count: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_STATS = TransferStats()
_LOCK = threading.Lock()


def _count(direction: str, nbytes: int) -> None:
    with _LOCK:
        setattr(_STATS, f"{direction}_bytes", getattr(_STATS, f"{direction}_bytes") + int(nbytes))
        setattr(_STATS, f"{direction}_count", getattr(_STATS, f"{direction}_count") + 1)


def _unwrap(obj, where):
    """Device arrays -> their numpy buffers (recursively in lists, tuples, dicts); numpy arrays refused."""
    if isinstance(obj, StrictArray):
        return obj._a
    if isinstance(obj, np.ndarray):
        _mixed(where)
    if isinstance(obj, enum.Enum):
        _enum(obj, where)
    if isinstance(obj, (list, tuple)):
        items = [_unwrap(o, where) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: _unwrap(v, where) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """numpy results -> device arrays; numpy scalars and Python numbers -> 0-d device arrays."""
    if isinstance(obj, np.ndarray):
        return StrictArray(obj)
    if isinstance(obj, _SCALARS):
        return StrictArray(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        items = [_wrap(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, (np.random.Generator, np.random.RandomState)):
        return _Delegate(obj, f"strict_device.random.{type(obj).__name__}")
    return obj  # None, dtypes, other host metadata


def _call(fn, args, kwargs, name):
    out = kwargs.get("out")
    with np.errstate(all="ignore"):
        res = fn(*_unwrap(args, f"{name}()"), **_unwrap(kwargs, f"{name}()"))
    if isinstance(out, StrictArray) and res is out._a:
        return out
    return _wrap(res)


# ---------------------------------------------------------------------------------------------------
# the array
# ---------------------------------------------------------------------------------------------------
class StrictArray:
    """A numpy array "on the device" (``_a``) that refuses implicit host conversion; see the module notes.

    Build one with ``strict.asarray(host)`` (an upload) or any ``strict`` function; read it back
    with ``a.get()`` (a download) or nightsift's ``to_host`` / ``host_scalars``.
    """

    __slots__ = ("_a",)
    __array_ufunc__ = None  # numpy operators defer to ours; np.<ufunc>(a) raises
    __hash__ = None

    def __init__(self, a):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"StrictArray wraps a numpy.ndarray, got {type(a).__name__}; use strict.asarray")
        self._a = a

    def __array_namespace__(self, api_version=None):
        return strict

    # ---- explicit crossings -------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None):
        """Download: a numpy copy (counted in ``strict.stats``)."""
        host = np.array(self._a, order=order, copy=True)
        _count("d2h", host.nbytes)
        if out is None:
            return host
        out[...] = host
        return out

    def set(self, host):
        """Upload ``host`` (numpy, same shape) into this array (counted in ``strict.stats``)."""
        if isinstance(host, StrictArray):
            raise TypeError("strict device: StrictArray.set takes host data; use a[...] = b on the device")
        host = np.asarray(host)
        self._a[...] = host
        _count("h2d", host.nbytes)

    # ---- refused implicit conversions ---------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        _refuse("numpy.asarray / numpy.array (__array__)")

    def __array_function__(self, func, types, args, kwargs):
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"strict device: numpy.{name}() called on a device array (it would convert it to "
                        f"numpy); call xp.{name} of the array's namespace instead")

    def __float__(self):
        _refuse("float()")

    def __int__(self):
        _refuse("int()")

    def __index__(self):
        _refuse("__index__, e.g. a device value as a Python index, slice bound or range()")

    def __complex__(self):
        _refuse("complex()")

    def __bool__(self):
        _refuse("bool(), e.g. `if xp.any(...)` or `and`/`or` on a device value")

    def item(self, *args):
        _refuse(".item()")

    def tolist(self):
        _refuse(".tolist()")

    def tobytes(self, order="C"):
        _refuse(".tobytes()")

    def __contains__(self, value):
        _refuse("`x in a`")

    def __iter__(self):
        if self._a.ndim < 2:  # cupy yields device sub-arrays; per-element values are a host loop
            _refuse(f"iterating a {self._a.ndim}-d array, one value per element")
        return (StrictArray(self._a[i]) for i in range(self._a.shape[0]))

    def __buffer__(self, flags):  # Python >= 3.12 buffer protocol
        _refuse("the buffer protocol (memoryview)")

    def __reduce__(self):
        _refuse("pickling")

    def __reduce_ex__(self, protocol):
        _refuse("pickling")

    def __format__(self, spec):
        if spec:
            _refuse(f"format spec {spec!r}")
        return repr(self)

    def __repr__(self):
        return f"StrictArray(shape={self._a.shape}, dtype={self._a.dtype})"

    __str__ = __repr__

    def __getattr__(self, name):
        raise AttributeError(f"strict device: StrictArray has no attribute {name!r} (not in the supported subset)")

    # ---- metadata and device-side operations --------------------------------------------------
    def __len__(self):
        return len(self._a)

    device = property(lambda self: "strict_device")

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "an index")])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, "an index")] = _unwrap(value, "an assigned value")

    def __copy__(self):
        return StrictArray(self._a.copy())

    def __deepcopy__(self, memo):
        return StrictArray(self._a.copy())


def _enum(obj, where):
    """cupy refuses enum members (``IntFlag`` and the like) as operands: NotImplemented, TypeError."""
    raise TypeError(f"strict device: enum operand {obj!r} in {where}; cupy refuses it as an operand, "
                    "use int(...) (e.g. records.UNUSABLE)")


def _operand(other, op):
    if isinstance(other, StrictArray):
        return other._a
    if isinstance(other, np.ndarray):
        _mixed(f"operator {op}")
    if isinstance(other, enum.Enum):
        _enum(other, f"operator {op}")
    if isinstance(other, _SCALARS):
        return other
    return NotImplemented  # lists and other objects: Python raises "unsupported operand"


def _binary(name, inplace=False):
    def op(self, other):
        o = _operand(other, name)
        if o is NotImplemented:
            return NotImplemented
        with np.errstate(all="ignore"):
            res = getattr(self._a, name)(o)
        if res is NotImplemented:
            return NotImplemented
        return self if inplace else _wrap(res)

    op.__name__ = name
    return op


def _unary(name):
    def op(self):
        with np.errstate(all="ignore"):
            return _wrap(getattr(self._a, name)())

    op.__name__ = name
    return op


def _method(name):
    def m(self, *args, **kwargs):
        where = f"StrictArray.{name}()"
        with np.errstate(all="ignore"):
            res = getattr(self._a, name)(*_unwrap(args, where), **_unwrap(kwargs, where))
        return self if res is self._a else _wrap(res)  # astype(copy=False), in-place sort/fill: None

    m.__name__ = name
    return m


for _n in ("add sub mul truediv floordiv mod pow matmul and or xor lshift rshift divmod "
           "lt le eq ne gt ge").split():
    setattr(StrictArray, f"__{_n}__", _binary(f"__{_n}__"))
    if _n not in ("lt", "le", "eq", "ne", "gt", "ge"):
        setattr(StrictArray, f"__r{_n}__", _binary(f"__r{_n}__"))
        if _n != "divmod":
            setattr(StrictArray, f"__i{_n}__", _binary(f"__i{_n}__", inplace=True))
for _n in ("neg", "pos", "abs", "invert"):
    setattr(StrictArray, f"__{_n}__", _unary(f"__{_n}__"))
for _n in ("reshape astype copy sum mean std var min max argmin argmax any all cumsum cumprod prod ravel "
           "flatten transpose swapaxes conj conjugate clip round nonzero sort argsort dot fill view squeeze "
           "repeat take searchsorted partition argpartition diagonal trace compress").split():
    setattr(StrictArray, _n, _method(_n))
for _n in ("shape", "dtype", "ndim", "size", "nbytes", "itemsize", "strides", "flags"):
    setattr(StrictArray, _n, property(lambda self, n=_n: getattr(self._a, n)))
for _n in ("T", "real", "imag"):
    setattr(StrictArray, _n, property(
        lambda self, n=_n: StrictArray(getattr(self._a, n)),
        None if _n == "T" else lambda self, v, n=_n: setattr(self._a, n, _unwrap(v, f"StrictArray.{n} ="))))
del _n


# ---------------------------------------------------------------------------------------------------
# the namespace
# ---------------------------------------------------------------------------------------------------
#: numpy functions that answer with host metadata (shapes, dtypes, flags): results are not wrapped
_META = frozenset("shape ndim size isscalar result_type can_cast promote_types min_scalar_type issubdtype "
                  "isdtype broadcast_shapes iscomplexobj isrealobj may_share_memory shares_memory".split())
#: numpy functions that read or write host data behind the ledger's back (files, text, buffers)
_REFUSED = frozenset("save savez savez_compressed savetxt load loadtxt genfromtxt fromfile frombuffer "
                     "fromstring fromiter array_repr array_str array2string asmatrix testing".split())
#: index-trick objects (``xp.mgrid[0:3, 0:4]``): their ``[]`` results are wrapped
_INDEXERS = frozenset("mgrid ogrid r_ c_".split())


class _Callable:
    """A numpy function, ufunc or method: unwraps arguments, wraps results; ufunc methods
    (``xp.add.reduce``, ``xp.add.at``) are wrapped the same way."""

    def __init__(self, fn, name, meta=False):
        self._fn, self.__name__, self._meta = fn, name, meta
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if self._meta:
            return self._fn(*_unwrap(args, self.__name__), **_unwrap(kwargs, self.__name__))
        return _call(self._fn, args, kwargs, self.__name__)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._fn, name)
        return _Callable(attr, f"{self.__name__}.{name}") if callable(attr) else attr

    def __repr__(self):
        return f"<strict_device function {self.__name__}>"


class _Indexer:
    def __init__(self, obj, name):
        self._obj, self.__name__ = obj, name

    def __getitem__(self, key):
        return _wrap(self._obj[_unwrap(key, self.__name__)])


def _adapt(obj, name):
    short = name.rsplit(".", 1)[-1]
    if short in _REFUSED:
        raise AttributeError(f"strict device: {name} reads or writes host data; use numpy on the host and "
                             "nightsift.kernels.to_device / to_host")
    if short in _META:
        return _Callable(obj, name, meta=True)
    if isinstance(obj, type) or obj is None:  # dtypes, finfo, iinfo, errstate, newaxis
        return obj
    if short in _INDEXERS:
        return _Indexer(obj, name)
    if isinstance(obj, types.ModuleType):
        return _Delegate(obj, name)
    if callable(obj):
        return _Callable(obj, name)
    return obj  # constants: pi, e, inf, nan


class _Delegate:
    """Another module (scipy.fft, scipy.ndimage, numpy.linalg, numpy.random) or a random generator,
    seen from the device."""

    def __init__(self, target, name):
        self._target, self.__name__ = target, name

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _adapt(getattr(self._target, name), f"{self.__name__}.{name}")

    def __repr__(self):
        return f"<strict_device delegate {self.__name__} -> {getattr(self._target, '__name__', self._target)}>"


class _StrictNamespace(types.ModuleType):
    """The array module of :class:`StrictArray` (what ``array_namespace`` returns for it)."""

    def __init__(self):
        super().__init__("strict_device", __doc__)
        self.ndarray = StrictArray
        self.stats = _STATS
        self.fft = _Delegate(scipy.fft, "strict_device.fft")  # accepts scipy's `workers` too
        self.ndimage = _Delegate(scipy.ndimage, "strict_device.ndimage")
        self.linalg = _Delegate(np.linalg, "strict_device.linalg")
        self.random = _Delegate(np.random, "strict_device.random")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            obj = getattr(np, name)
        except AttributeError:
            raise AttributeError(f"strict device: no {name!r} (numpy has none)") from None
        out = _adapt(obj, f"strict_device.{name}")
        setattr(self, name, out)  # cache: __getattr__ runs once per name
        return out

    def reset_stats(self) -> None:
        """Zero :attr:`stats` (in place)."""
        with _LOCK:
            for f in fields(_STATS):
                setattr(_STATS, f.name, 0)

    def asarray(self, obj, dtype=None, *, copy=None, order=None):
        """Device arrays as they are (cast on the device); anything else is uploaded (counted)."""
        if isinstance(obj, StrictArray):
            a = obj._a
            if copy or (dtype is not None and np.dtype(dtype) != a.dtype) or (order and order != "K"):
                return StrictArray(np.array(a, dtype=dtype, order=order or "K", copy=True))
            return obj
        if isinstance(obj, (list, tuple)) and _holds_device(obj):  # assembled on the device, as cupy does
            return StrictArray(np.array(_unwrap(obj, "strict_device.asarray()"), dtype=dtype, order=order))
        host = np.asarray(obj, dtype=dtype, order=order)
        _count("h2d", host.nbytes)
        return StrictArray(np.array(host, copy=True))

    def array(self, obj, dtype=None, *, copy=True, order=None):
        return self.asarray(obj, dtype, copy=copy, order=order)

    asanyarray = asarray

    def ascontiguousarray(self, obj, dtype=None):
        if isinstance(obj, StrictArray):
            return StrictArray(np.ascontiguousarray(obj._a, dtype=dtype))
        return self.asarray(obj, dtype, order="C")


def _holds_device(seq) -> bool:
    return any(isinstance(o, StrictArray) or (isinstance(o, (list, tuple)) and _holds_device(o)) for o in seq)


#: the namespace: ``strict.zeros(...)``, ``strict.asarray(host)``, ``strict.fft.rfft2(...)``, ``strict.stats``
strict = _StrictNamespace()


def strict_namespace() -> _StrictNamespace:
    """The strict namespace with its transfer counters zeroed (for a pytest fixture)."""
    strict.reset_stats()
    return strict
