"""Numba CUDA kernels of nightsift and their launch wrappers.

Every kernel here has a plain ``xp`` twin elsewhere in :mod:`nightsift.kernels` that is its oracle
in tests:

============================  ==========================================  ==============================
kernel (this package)         wrapper                                     reference twin
============================  ==========================================  ==============================
``peaks._peak_kernel``        :func:`.peaks.find_peaks_cuda`              :func:`nightsift.kernels.peaks.find_peaks` (``method="reference"``)
``stamps._gather_kernel``     :func:`.stamps.gather_triplets_cuda`        :func:`nightsift.kernels.cutouts.gather_triplets` (``method="reference"``) = ``extract_triplets`` per image
``resample._lanczos_kernel``  :func:`.resample.lanczos_resample_cuda`     :func:`nightsift.kernels.resample.lanczos_resample` (``method="reference"``)
``resample._mask_kernel``     :func:`.resample.resample_mask_cuda`        :func:`nightsift.kernels.resample.resample_mask` (``method="reference"``)
============================  ==========================================  ==============================

Where the kernels run
---------------------
* On a GPU they take **cupy** arrays through ``__cuda_array_interface__`` (no copy) and launch on
  cupy's current stream, so they order correctly with cupy work and with
  :class:`nightsift.engine.backend.UploadPipeline`'s streams.
* Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` in the environment *before* numba is
  first imported) they take **numpy** arrays and run one Python thread per CUDA thread: slow,
  only for small test inputs, but the same kernel source.

:func:`cuda_mode` tells which of the two (or neither) this process has. Kernels are compiled by
Numba on first launch per argument types and cached per device context, so a long-lived GPU
worker compiles each once.

Numba 0.68 still ships the built-in ``numba.cuda`` target (simulator included, which is what CI
uses). On a GPU machine NVIDIA's maintained target, the ``numba-cuda`` package (``pip install
"numba-cuda[cu12]"``), replaces ``numba.cuda`` transparently; the kernels use only the common API
(``cuda.jit``, ``cuda.grid``, ``cuda.atomic.add``, ``cuda.local.array``, ``cuda.external_stream``).
"""
from __future__ import annotations

import numpy as np

from .._xp import array_namespace, is_cupy

__all__ = ["cuda_mode", "check_cuda_arrays", "launch_config", "current_stream", "CudaUnavailable"]


class CudaUnavailable(RuntimeError):
    """A Numba CUDA kernel was asked for where it cannot run (no GPU, or wrong array type)."""


def simulator_enabled() -> bool:
    """True when Numba was imported with ``NUMBA_ENABLE_CUDASIM=1`` (read once, at import)."""
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def cuda_mode() -> str | None:
    """``"simulator"``, ``"gpu"`` (a CUDA device that Numba can use) or ``None``."""
    try:
        if simulator_enabled():
            return "simulator"
        from numba import cuda

        return "gpu" if cuda.is_available() else None
    except Exception:  # pragma: no cover - numba broken or absent
        return None


def check_cuda_arrays(name: str, *arrays):
    """Return the array module of ``arrays`` after checking a CUDA kernel can take them.

    Raises
    ------
    CudaUnavailable
        cupy arrays under the simulator, numpy arrays outside it, or no CUDA device at all.
    """
    xp = array_namespace(*arrays)
    sim = simulator_enabled()
    if is_cupy(xp):
        if sim:
            raise CudaUnavailable(
                f"{name}: cupy arrays were passed while NUMBA_ENABLE_CUDASIM=1; the CUDA simulator "
                "takes numpy arrays (unset NUMBA_ENABLE_CUDASIM to use the GPU)"
            )
        if cuda_mode() != "gpu":
            raise CudaUnavailable(f"{name}: numba.cuda sees no CUDA device; use method='reference'")
        return xp
    if not sim:
        raise CudaUnavailable(
            f"{name}: the CUDA kernel needs cupy arrays on a GPU (or numpy arrays with "
            "NUMBA_ENABLE_CUDASIM=1 set before numba is imported); use method='reference' for numpy"
        )
    return np


def current_stream(xp):
    """The Numba stream to launch on: cupy's current stream on a GPU, ``0`` in the simulator."""
    if not is_cupy(xp):
        return 0
    from numba import cuda

    ptr = xp.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def launch_config(n: int, threads: int = 256) -> tuple[int, int]:
    """(blocks, threads) for a 1-D launch over ``n`` items (at least one block)."""
    n = int(n)
    return max(1, -(-n // threads)), threads
