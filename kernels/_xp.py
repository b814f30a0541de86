"""One switch between numpy and cupy, decided by the arrays passed in (never by a global flag).

>>> import numpy as np
>>> xp = array_namespace(np.zeros(3))
>>> xp is np
True
"""
from __future__ import annotations

import os
import types

import numpy as np

try:  # cupy is optional: CPU machines and CI do not have it
    import cupy as _cupy  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None


def is_cupy(xp: types.ModuleType) -> bool:
    """True if ``xp`` is the cupy module."""
    return _cupy is not None and xp is _cupy


def array_namespace(*arrays) -> types.ModuleType:
    """Return ``numpy`` or ``cupy`` for the given arrays; ``None`` entries and scalars are ignored.

    Raises
    ------
    TypeError
        If numpy and cupy arrays are mixed: move them to one device first
        (``cupy.asarray`` / ``cupy.asnumpy``).
    """
    kinds = set()
    for a in arrays:
        if a is None or np.isscalar(a):
            continue
        if _cupy is not None and isinstance(a, _cupy.ndarray):
            kinds.add("cupy")
        else:
            kinds.add("numpy")
    if len(kinds) > 1:
        raise TypeError(
            "mixed numpy and cupy arrays were passed to one kernel; move them to one device first "
            "(cupy.asarray(...) or cupy.asnumpy(...))"
        )
    return _cupy if kinds == {"cupy"} else np


def fft_module(xp: types.ModuleType):
    """The FFT module matching ``xp``: ``scipy.fft`` for numpy (multi-threaded), ``cupy.fft``."""
    if is_cupy(xp):
        return _cupy.fft
    import scipy.fft

    return scipy.fft


def fft_kwargs(xp: types.ModuleType) -> dict:
    """Extra keyword arguments for the FFT calls of :func:`fft_module`: ``workers`` (all cores) for
    scipy.fft, whose transforms are single-threaded by default; none for cupy."""
    if is_cupy(xp):
        return {}
    return {"workers": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)}


def ndimage_module(xp: types.ModuleType):
    """``scipy.ndimage`` for numpy, ``cupyx.scipy.ndimage`` for cupy."""
    if is_cupy(xp):
        import cupyx.scipy.ndimage

        return cupyx.scipy.ndimage
    import scipy.ndimage

    return scipy.ndimage


def to_numpy(a):
    """Return a numpy copy/view of ``a`` (a no-op for numpy arrays)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def asarray_like(a, like, dtype=None):
    """Put ``a`` on the same device as ``like`` (numpy or cupy)."""
    xp = array_namespace(like)
    return xp.asarray(a, dtype=dtype)
