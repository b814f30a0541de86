"""Array numerics of nightsift, written once over an array module (numpy or cupy).

Pure functions only: no file I/O, no configuration objects, no logging of results.
Arrays are ``(ny, nx)`` (or stacks ``(..., ny, nx)``) with 0-based pixel coordinates.
This package never imports :mod:`nightsift.engine`.
"""
from ._xp import (
    TransferLedger, array_namespace, asarray_like, count_transfers, fft_module, host_scalar, host_scalars, is_cupy,
    is_host, ndimage_module, to_device, to_host, to_numpy,
)

__all__ = ["array_namespace", "fft_module", "ndimage_module", "is_cupy", "is_host", "to_numpy", "asarray_like",
           "to_device", "to_host", "host_scalar", "host_scalars", "count_transfers", "TransferLedger"]
