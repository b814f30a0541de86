"""One switch between array modules, decided by the arrays passed in (never by a global flag),
and the only door between host and device memory.

Backends
--------
* ``numpy``: the host. Kernels take their Numba CPU fast paths here.
* ``cupy``: an NVIDIA GPU. Kernels take their Numba CUDA / CuPy paths.
* any other array type that implements the Array API's ``__array_namespace__()`` protocol and
  whose namespace also offers ``fft`` and ``ndimage`` attributes (the test suite's strict
  device stand-in, which refuses every implicit conversion to numpy): kernels run their plain
  ``xp`` reference code on it, exactly as they would on a device.

Crossings
---------
Every host<->device copy of the chain goes through :func:`to_device`, :func:`to_host` or
:func:`host_scalars` (scalars). Each is recorded, with its size and a label, in every
:class:`TransferLedger` opened with :func:`count_transfers` around it, so the chain can report
the bytes it moved per CCD-visit (and a test can require that nothing else moved). On numpy
nothing crosses and nothing is recorded.

>>> import numpy as np
>>> xp = array_namespace(np.zeros(3))
>>> xp is np
True
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import types
from dataclasses import dataclass, field

import numpy as np

try:  # cupy is optional: CPU machines and CI do not have it
    import cupy as _cupy  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

__all__ = [
    "array_namespace", "is_cupy", "is_host", "fft_module", "fft_kwargs", "ndimage_module",
    "TransferLedger", "count_transfers", "to_device", "to_host", "to_numpy", "host_scalars",
    "host_scalar", "asarray_like",
]


def is_cupy(xp: types.ModuleType) -> bool:
    """True if ``xp`` is the cupy module."""
    return _cupy is not None and xp is _cupy


def is_host(xp) -> bool:
    """True if ``xp`` is numpy (arrays in host memory; the Numba CPU kernels apply)."""
    return xp is np


def _namespace_of(a):
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy
    if isinstance(a, (np.ndarray, np.generic)):
        return np
    ns = getattr(a, "__array_namespace__", None)
    if ns is not None and not isinstance(a, type):
        return ns()
    return np  # lists, Python scalars: host values


def array_namespace(*arrays) -> types.ModuleType:
    """Return the array module of the given arrays; ``None`` entries and scalars are ignored.

    Raises
    ------
    TypeError
        If arrays of different modules (e.g. numpy and cupy) are mixed: move them to one
        device first (:func:`to_device` / :func:`to_host`).
    """
    kinds = []
    for a in arrays:
        if a is None or np.isscalar(a):
            continue
        ns = _namespace_of(a)
        if all(ns is not k for k in kinds):
            kinds.append(ns)
    if len(kinds) > 1:
        names = sorted(getattr(k, "__name__", str(k)) for k in kinds)
        raise TypeError(
            f"mixed array modules ({', '.join(names)}) were passed to one kernel; move them to one "
            "device first (nightsift.kernels.to_device / to_host)"
        )
    return kinds[0] if kinds else np


def fft_module(xp: types.ModuleType):
    """The FFT module matching ``xp``: ``scipy.fft`` for numpy (multi-threaded), ``cupy.fft``, or
    the namespace's own ``fft``."""
    if is_cupy(xp):
        return _cupy.fft
    if is_host(xp):
        import scipy.fft

        return scipy.fft
    return xp.fft


def fft_kwargs(xp: types.ModuleType) -> dict:
    """Extra keyword arguments for the FFT calls of :func:`fft_module`: ``workers`` (all cores) for
    scipy.fft, whose transforms are single-threaded by default; none elsewhere."""
    if not is_host(xp):
        return {}
    return {"workers": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)}


def ndimage_module(xp: types.ModuleType):
    """``scipy.ndimage`` for numpy, ``cupyx.scipy.ndimage`` for cupy, else ``xp.ndimage``."""
    if is_cupy(xp):
        import cupyx.scipy.ndimage

        return cupyx.scipy.ndimage
    if is_host(xp):
        import scipy.ndimage

        return scipy.ndimage
    nd = getattr(xp, "ndimage", None)
    if nd is None:
        raise TypeError(f"array module {getattr(xp, '__name__', xp)!r} offers no ndimage functions")
    return nd


# --------------------------------------------------------------------------------------------
# crossings
# --------------------------------------------------------------------------------------------
@dataclass
class TransferLedger:
    """Host<->device traffic recorded while it was open (see :func:`count_transfers`).

    Attributes
    ----------
    h2d_bytes, h2d_count : int
        Bytes and number of host-to-device copies.
    d2h_bytes, d2h_count : int
        Bytes and number of device-to-host copies (arrays and scalar reads).
    scalar_reads : int
        Device-to-host reads of scalars (each a synchronisation of the device with the host),
        counted once per :func:`host_scalars` call.
    by_label : dict
        ``label -> [direction, bytes, count]`` (direction ``"h2d"`` or ``"d2h"``).
    """

    h2d_bytes: int = 0
    h2d_count: int = 0
    d2h_bytes: int = 0
    d2h_count: int = 0
    scalar_reads: int = 0
    by_label: dict = field(default_factory=dict)

    def record(self, direction: str, nbytes: int, label: str, *, scalar: bool = False) -> None:
        if direction == "h2d":
            self.h2d_bytes += int(nbytes)
            self.h2d_count += 1
        else:
            self.d2h_bytes += int(nbytes)
            self.d2h_count += 1
            self.scalar_reads += int(scalar)
        key = label or ("scalars" if scalar else direction)
        entry = self.by_label.setdefault(key, [direction, 0, 0])
        entry[1] += int(nbytes)
        entry[2] += 1

    def as_qa(self, prefix: str = "xfer_") -> dict:
        """Flat QA numbers: bytes and counts each way, scalar reads."""
        return {f"{prefix}h2d_bytes": self.h2d_bytes, f"{prefix}h2d_count": self.h2d_count,
                f"{prefix}d2h_bytes": self.d2h_bytes, f"{prefix}d2h_count": self.d2h_count,
                f"{prefix}scalar_reads": self.scalar_reads}


_LEDGERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("nightsift_transfer_ledgers", default=())


@contextlib.contextmanager
def count_transfers():
    """Record every crossing made through this module inside the ``with`` block.

    Nested blocks each see the crossings made inside them (a per-CCD ledger inside a per-batch
    one, say).

    >>> import numpy as np
    >>> with count_transfers() as led:
    ...     _ = to_host(np.ones(3))          # numpy: nothing crosses
    >>> led.d2h_bytes
    0
    """
    ledger = TransferLedger()
    token = _LEDGERS.set(_LEDGERS.get() + (ledger,))
    try:
        yield ledger
    finally:
        _LEDGERS.reset(token)


def _record(direction: str, nbytes: int, label: str, *, scalar: bool = False) -> None:
    for ledger in _LEDGERS.get():
        ledger.record(direction, nbytes, label, scalar=scalar)


_PINNED: dict = {}


def _staged(host: np.ndarray):
    """``host`` copied into a page-locked (pinned) buffer reused per shape and dtype (cupy): the
    DMA engine reads it directly instead of through the driver's pageable bounce buffer."""
    import cupyx

    key = (host.shape, host.dtype.str)
    buf = _PINNED.get(key)
    if buf is None:
        buf = _PINNED[key] = cupyx.empty_pinned(host.shape, host.dtype)
    np.copyto(buf, host)
    return buf


def to_device(a, xp, *, dtype=None, label: str = "", pinned: bool = False):
    """Copy host data ``a`` (numpy array, list, scalar) to ``xp``'s memory; the one upload door.

    For numpy this is ``numpy.asarray(a, dtype)`` (no copy of numpy input, nothing recorded).
    Arrays already on ``xp``'s device are returned as they are (cast when ``dtype`` is given).
    ``pinned`` (cupy; large frames): stage the copy through a reused page-locked buffer; the
    upload is complete when this returns (the buffer is refilled by the next call).
    """
    if is_host(xp):
        return np.asarray(a, dtype=dtype)
    if _namespace_of(a) is xp and not isinstance(a, (list, tuple)) and not np.isscalar(a):
        return a if dtype is None else a.astype(dtype, copy=False)
    host = np.asarray(a, dtype=dtype)
    if pinned and is_cupy(xp) and host.ndim:
        out = xp.empty(host.shape, host.dtype)
        out.set(_staged(host))
        xp.cuda.get_current_stream().synchronize()  # the staging buffer is reused by the next call
    else:
        out = xp.asarray(host)
    _record("h2d", host.nbytes, label)
    return out


def to_host(a, *, label: str = ""):
    """Copy a device array to a numpy array; the one download door (numpy: returned as it is).

    ``None`` passes through.
    """
    if a is None:
        return None
    if isinstance(a, (np.ndarray, np.generic)) or np.isscalar(a):
        return np.asarray(a)
    if not hasattr(a, "get"):
        raise TypeError(f"to_host: {type(a).__name__} is neither a numpy array nor a device array with .get()")
    out = np.asarray(a.get())
    _record("d2h", out.nbytes, label)
    return out


def to_numpy(a):
    """Alias of :func:`to_host` (kept for callers of the older name)."""
    return to_host(a)


def host_scalars(*values):
    """Read device scalars (0-d arrays or size-1 arrays) to Python numbers with one copy.

    Returns a tuple of Python ``float`` (``int`` for integer dtypes, ``bool`` for booleans) in
    the order given. Python numbers and numpy scalars pass through. One synchronisation of the
    device however many values are read: batch the scalars a decision needs.
    """
    dev = [i for i, v in enumerate(values) if not (np.isscalar(v) or isinstance(v, (np.ndarray, np.generic)))]
    out = list(values)
    if dev:
        xp = array_namespace(*(values[i] for i in dev))
        kinds = [values[i].dtype.kind for i in dev]
        flat = xp.stack([xp.reshape(values[i].astype(xp.float64), ()) for i in dev])
        host = np.asarray(flat.get())
        _record("d2h", host.nbytes, "scalars", scalar=True)
        for i, k, v in zip(dev, kinds, host.tolist()):
            out[i] = bool(v) if k == "b" else int(v) if k in "iu" else float(v)
    res = []
    for v in out:
        if isinstance(v, (np.ndarray, np.generic)):
            v = np.asarray(v).reshape(()).item()
        res.append(v)
    return tuple(res)


def host_scalar(value):
    """:func:`host_scalars` of one value."""
    return host_scalars(value)[0]


def asarray_like(a, like, dtype=None):
    """Put host data ``a`` on the device of ``like`` (:func:`to_device`)."""
    return to_device(a, array_namespace(like), dtype=dtype)
