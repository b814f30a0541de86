"""Array numerics of nightsift, written once over an array module (numpy or cupy).

Pure functions only: no file I/O, no configuration objects, no logging of results.
Arrays are ``(ny, nx)`` (or stacks ``(..., ny, nx)``) with 0-based pixel coordinates.
This package never imports :mod:`nightsift.engine`.
"""
from ._xp import array_namespace, fft_module, ndimage_module, is_cupy, to_numpy, asarray_like

__all__ = ["array_namespace", "fft_module", "ndimage_module", "is_cupy", "to_numpy", "asarray_like"]
