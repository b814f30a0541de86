"""Array backend selection and GPU resource setup, in one place.

``config.run.backend`` ("numpy" | "cupy" | "auto": :data:`~nightsift.engine.config.ArrayBackend`) is
turned into an array module here and nowhere else: :func:`get_backend`. Everything downstream
follows the arrays it is given (:func:`nightsift.kernels.array_namespace`), so nothing else forks on
the backend.

Also here, for a GPU worker (one per device, long-lived):

* :func:`configure_memory_pool` bounds CuPy's device memory pool so a night of CCDs cannot grow
  it without limit (an allocation past the limit raises ``cupy.cuda.memory.OutOfMemoryError``
  instead of taking the device from its neighbours);
* :func:`configure_fft_plan_cache` sizes CuPy's per-device cuFFT plan cache (count and bytes:
  a batched 4096x4096 plan's work area is as large as the batch);
* :class:`UploadPipeline` stages host batches through pinned buffers and a copy stream so the
  next batch's upload overlaps this batch's compute.

All of them are no-ops (or plain copies) for numpy, so the same driver code runs on a CPU.
"""
from __future__ import annotations

import contextlib
import importlib
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .config import ARRAY_BACKENDS
from .errors import BackendError, ConfigError

__all__ = [
    "GpuProbe",
    "probe_gpu",
    "get_backend",
    "backend_name",
    "to_device",
    "to_host",
    "configure_memory_pool",
    "configure_fft_plan_cache",
    "fft_plans_needed",
    "memory_stats",
    "UploadPipeline",
    "on_device",
    "retain_host_memory",
]

_INSTALL_HINT = ("install CuPy for your CUDA version (pip install 'nightsift[gpu]', i.e. cupy-cuda12x) on a "
                 "machine with an NVIDIA GPU and driver, or set run.backend = \"numpy\" (or \"auto\", which "
                 "falls back to numpy)")


@dataclass(frozen=True)
class GpuProbe:
    """Whether cupy can run here. ``reason`` says why not (empty when ``ok``)."""

    ok: bool
    n_devices: int
    reason: str


def probe_gpu() -> GpuProbe:
    """Import cupy and count CUDA devices, without raising."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return GpuProbe(False, 0, f"cupy cannot be imported ({type(exc).__name__}: {exc})")
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError: no driver, no device, insufficient driver
        return GpuProbe(False, 0, f"cupy is installed but CUDA reports no usable device "
                                  f"({type(exc).__name__}: {exc})")
    if n < 1:
        return GpuProbe(False, 0, "cupy is installed but CUDA reports 0 devices")
    return GpuProbe(True, n, "")


def get_backend(name: str = "auto"):
    """The array module for ``config.run.backend``.

    Parameters
    ----------
    name : {"numpy", "cupy", "auto"}
        ``"auto"`` gives cupy when it imports and sees a CUDA device, else numpy.

    Returns
    -------
    module
        ``numpy`` or ``cupy``.

    Raises
    ------
    ConfigError
        ``name`` is not one of :data:`~nightsift.engine.config.ARRAY_BACKENDS`.
    BackendError
        ``"cupy"`` was asked for and cupy cannot be imported or sees no GPU; the message says
        which, and how to fix it.
    """
    if name not in ARRAY_BACKENDS:
        raise ConfigError(f"run.backend: unknown array backend {name!r}; must be one of {', '.join(ARRAY_BACKENDS)}")
    if name == "numpy":
        return np
    probe = probe_gpu()
    if probe.ok:
        return importlib.import_module("cupy")
    if name == "auto":
        return np
    raise BackendError(f"run.backend = \"cupy\" was requested but {probe.reason}; {_INSTALL_HINT}")


def backend_name(xp) -> str:
    """``"numpy"`` or ``"cupy"`` for an array module."""
    return "cupy" if getattr(xp, "__name__", "") == "cupy" else "numpy"


def _is_cupy(xp) -> bool:
    from nightsift.kernels._xp import is_cupy

    return is_cupy(xp) or backend_name(xp) == "cupy"


def to_device(obj, xp):
    """Move arrays to ``xp``'s device: ndarrays, and dicts/lists/tuples of them (others pass through).

    Each array goes through :func:`nightsift.kernels._xp.to_device`, the one (counted) door.
    """
    from nightsift.kernels._xp import to_device as _one

    if isinstance(obj, dict):
        return {k: to_device(v, xp) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, xp) for v in obj)
    if obj is None or np.isscalar(obj):
        return obj
    return _one(obj, xp)


def to_host(obj):
    """Move arrays back to numpy (through :func:`nightsift.kernels._xp.to_host`); containers are walked."""
    from nightsift.kernels._xp import to_host as _one

    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    if obj is None or np.isscalar(obj):
        return obj
    return _one(obj)


def configure_memory_pool(xp, *, limit_bytes: int | None = None, fraction: float | None = None):
    """Bound CuPy's default device memory pool (one call per device, before the work starts).

    Parameters
    ----------
    xp : numpy or cupy
    limit_bytes : int, keyword-only
        Upper bound of the pool on the current device (bytes).
    fraction : float, keyword-only
        Alternatively, a fraction (0, 1] of the device's total memory.

    Returns
    -------
    int or None
        The limit now in force (bytes), ``None`` for numpy (nothing to bound).

    Raises
    ------
    ConfigError
        Both or neither of ``limit_bytes`` / ``fraction`` given, or out of range.
    """
    if (limit_bytes is None) == (fraction is None):
        raise ConfigError("configure_memory_pool: give exactly one of limit_bytes or fraction")
    if limit_bytes is not None and int(limit_bytes) <= 0:
        raise ConfigError(f"configure_memory_pool: limit_bytes must be > 0, got {limit_bytes!r}")
    if fraction is not None and not (0 < float(fraction) <= 1):
        raise ConfigError(f"configure_memory_pool: fraction must be in (0, 1], got {fraction!r}")
    if not _is_cupy(xp):
        return None
    pool = xp.get_default_memory_pool()
    if limit_bytes is not None:
        pool.set_limit(size=int(limit_bytes))
    else:
        pool.set_limit(fraction=float(fraction))
    return int(pool.get_limit())


def fft_plans_needed(shapes: Iterable[tuple[int, ...]], *, transforms_per_shape: int = 2) -> int:
    """cuFFT plans a worker needs: one per distinct batched shape and direction.

    ``rfft2``/``irfft2`` of a ``(T, ny, nx)`` stack over the last two axes use one batched plan
    each, keyed by shape and dtype: ``transforms_per_shape`` (R2C and C2R) per distinct shape.
    """
    return max(1, transforms_per_shape * len({tuple(int(n) for n in s) for s in shapes}))


def configure_fft_plan_cache(xp, *, n_plans: int, max_bytes: int | None = None):
    """Size CuPy's cuFFT plan cache of the current device.

    Parameters
    ----------
    xp : numpy or cupy
    n_plans : int, keyword-only
        Plans kept (e.g. :func:`fft_plans_needed` of the tile-stack shapes; CuPy's default is 16).
    max_bytes : int, keyword-only
        Bound on the plans' work areas together (bytes); ``None`` leaves it unbounded.

    Returns
    -------
    The cupy ``PlanCache`` (``None`` for numpy: scipy.fft keeps no plans worth sizing).
    """
    if int(n_plans) < 1:
        raise ConfigError(f"configure_fft_plan_cache: n_plans must be >= 1, got {n_plans!r}")
    if not _is_cupy(xp):
        return None
    cache = xp.fft.config.get_plan_cache()
    cache.set_size(int(n_plans))
    cache.set_memsize(-1 if max_bytes is None else int(max_bytes))
    return cache


def memory_stats(xp) -> dict:
    """Device memory held by CuPy's pool: ``used_bytes``, ``pool_bytes`` (its high-water mark
    unless blocks were freed), ``limit_bytes`` (0: none). All 0 for numpy."""
    if not _is_cupy(xp):
        return {"used_bytes": 0, "pool_bytes": 0, "limit_bytes": 0}
    pool = xp.get_default_memory_pool()
    return {"used_bytes": int(pool.used_bytes()), "pool_bytes": int(pool.total_bytes()),
            "limit_bytes": int(pool.get_limit())}


# --------------------------------------------------------------------------------------------
# overlapping uploads with compute
# --------------------------------------------------------------------------------------------
class _NoStream:
    """numpy stand-in for a CUDA stream/event: the work is already done when it returns."""

    def record(self, stream=None):
        return self

    def synchronize(self):
        return None

    def wait_event(self, event):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@dataclass
class _Slot:
    host: np.ndarray  # pinned on cupy
    device: object  # cupy.ndarray, or a numpy array
    copied: object  # event: upload finished (compute may read ``device``; ``host`` may be refilled)
    free: object  # event: compute finished reading ``device`` (it may be overwritten)


class UploadPipeline:
    """Double-buffered host-to-device staging of equally shaped batches.

    While the caller computes on batch ``k`` (on :attr:`compute`, a CUDA stream), batch ``k+1``
    is copied into a pinned host buffer and uploaded on a separate copy stream. Each of the
    ``n_buffers`` slots owns a pinned host buffer, a device buffer and two events: *copied*
    (recorded on the copy stream after the upload; the compute stream waits on it, and the
    host waits on it before refilling the pinned buffer) and *free* (recorded on the compute
    stream when the caller hands the batch back; the copy stream waits on it before it
    overwrites that device buffer). No host synchronisation with the compute stream is needed.

    With numpy the slots are plain arrays and the events no-ops, so the same loop runs on a CPU
    (and the bookkeeping is unit-tested there).

    Parameters
    ----------
    xp : numpy or cupy
    shape : tuple of int
        Shape of every batch, e.g. ``(B, ny, nx)``.
    dtype : numpy dtype
    n_buffers : int, keyword-only
        Slots in flight (>= 2; 2 is double buffering).

    Examples
    --------
    >>> import numpy as np
    >>> pipe = UploadPipeline(np, (2, 3), np.float32)
    >>> sums = []
    >>> for dev in pipe.run(np.full((2, 3), k, np.float32) for k in range(3)):
    ...     with pipe.compute:
    ...         sums.append(float(dev.sum()))
    >>> sums
    [0.0, 6.0, 12.0]

    Notes
    -----
    A yielded device array is the pipeline's buffer: it is valid until the caller advances the
    loop ``n_buffers - 1`` more times. Copy out what must outlive that (results usually are new
    arrays anyway). Work on the batch must be queued on :attr:`compute` (``with pipe.compute:``)
    for the events to order it.
    """

    def __init__(self, xp, shape, dtype, *, n_buffers: int = 2):
        if int(n_buffers) < 2:
            raise ConfigError(f"UploadPipeline: n_buffers must be >= 2 (double buffering), got {n_buffers!r}")
        self.xp = xp
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.gpu = _is_cupy(xp)
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if self.gpu:
            self.copy_stream = xp.cuda.Stream(non_blocking=True)
            self.compute = xp.cuda.Stream(non_blocking=True)
        else:
            self.copy_stream = self.compute = _NoStream()
        self._slots = []
        for _ in range(int(n_buffers)):
            if self.gpu:
                mem = xp.cuda.alloc_pinned_memory(max(nbytes, 1))
                host = np.frombuffer(mem, self.dtype, int(np.prod(self.shape))).reshape(self.shape)
                device = xp.empty(self.shape, self.dtype)
                copied, free = xp.cuda.Event(), xp.cuda.Event()
                free.record(self.compute)  # initially free
                copied.record(self.copy_stream)
            else:
                host = np.empty(self.shape, self.dtype)
                device = host  # numpy: the "upload" is the copy into the slot
                copied = free = _NoStream()
            self._slots.append(_Slot(host, device, copied, free))
        #: (event, batch index, slot) of the last operations, for tests and debugging
        self.trace: deque = deque(maxlen=256)

    @property
    def n_buffers(self) -> int:
        return len(self._slots)

    def _upload(self, k: int, batch) -> _Slot:
        slot = self._slots[k % len(self._slots)]
        batch = np.asarray(batch)
        if batch.shape != self.shape:
            raise ValueError(f"UploadPipeline: batch {k} has shape {batch.shape}, the pipeline was built for "
                             f"{self.shape}")
        slot.copied.synchronize()  # the previous upload from this pinned buffer has finished
        np.copyto(slot.host, batch, casting="same_kind")
        if self.gpu:
            self.copy_stream.wait_event(slot.free)  # compute is done with this device buffer
            slot.device.set(slot.host, stream=self.copy_stream)  # async: the host buffer is pinned
            slot.copied.record(self.copy_stream)
        self.trace.append(("upload", k, k % len(self._slots)))
        return slot

    def run(self, batches: Iterable) -> Iterator:
        """Yield each batch as a device array, with the next one's upload already in flight.

        Parameters
        ----------
        batches : iterable of array_like, each of ``shape`` (numpy, host memory)

        Yields
        ------
        device array of ``shape`` and ``dtype`` (cupy, or numpy)
        """
        it = iter(batches)
        try:
            first = next(it)
        except StopIteration:
            return
        pending = [(0, self._upload(0, first))]
        k = 0
        while pending:
            k_cur, slot = pending.pop(0)
            # prefetch up to n_buffers - 1 batches ahead before handing this one out
            while len(pending) < len(self._slots) - 1:
                nxt = next(it, _END)
                if nxt is _END:
                    break
                k += 1
                pending.append((k, self._upload(k, nxt)))
            self.compute.wait_event(slot.copied)
            self.trace.append(("yield", k_cur, k_cur % len(self._slots)))
            yield slot.device
            slot.free.record(self.compute)  # everything queued on compute for this batch
            self.trace.append(("release", k_cur, k_cur % len(self._slots)))

    def synchronize(self):
        """Wait for both streams (end of a run, before reading results on the host)."""
        self.copy_stream.synchronize()
        self.compute.synchronize()


_END = object()


_RETAINED = False


def retain_host_memory(enable: bool = True) -> bool:
    """Let this process keep the host memory it frees, for reuse (glibc only; call once per worker).

    A CCD-visit allocates and frees dozens of image-sized arrays. By default glibc serves each
    (>= 32 MiB) with a fresh ``mmap`` and returns it on ``free``, so every new array page-faults
    its pages in again: on a 4096^2 CCD that was 1.4 million page faults and 33 s of system time
    for two visits (the chain's wall time 24 s per visit on 2 cores; 13-16 s with this). Raising
    the mmap and trim thresholds keeps the freed memory in the heap, as CuPy's memory pool does on
    a GPU. The resident size then stays at the process's peak (a worker's steady state anyway).

    Returns True when the allocator was tuned (now or before), False where it cannot be (not
    glibc) or ``enable`` is False.
    """
    global _RETAINED
    if not enable:
        return False
    if _RETAINED:
        return True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    # -1 disables trimming altogether (mallopt(3)); a finite threshold (at most 2 GiB, an int)
    # still returned the top of the heap between visits and the next visit faulted it in again
    ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, -1) and mallopt(M_TOP_PAD, 1 << 28)
    _RETAINED = bool(ok)
    return _RETAINED


@contextlib.contextmanager
def on_device(xp, index: int = 0):
    """Make CUDA device ``index`` current for cupy work inside the block (no-op for numpy)."""
    if not _is_cupy(xp):
        yield
        return
    with xp.cuda.Device(int(index)):
        yield
