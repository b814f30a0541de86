"""Where each CCD's statics live during a night: the memory plan of the Ray engine.

A CCD's statics (:class:`~nightsift.engine.pipeline.CCDStatics`) are its reference image,
variance and mask (float32, float32, uint16), its PSF stamps and catalogue (measured once), and
its master calibration (bias, dark rate, flat: float32; bad-pixel mask: uint16): about 24 bytes
per pixel, ~400 MB for a 4096 x 4096 CCD. A subtraction actor serves ``ceil(n_ccds / n_actors)``
CCDs (``ccd % n_actors``). On a GPU, the first ``device_budget_gib / per_ccd`` of them stay on
the device; the others stay in pinned host memory and are uploaded with each batch that needs
them. On numpy, the device is the host: every CCD's statics are host memory.

:func:`plan_memory` is computed once at start-up, printed, and refused with a
:class:`~nightsift.engine.errors.ConfigError` naming the numbers when the statics cannot fit even
in the cluster's host memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["MemoryPlan", "plan_memory", "statics_bytes_per_ccd", "STATICS_BYTES_PER_PIXEL"]

GIB = 1024 ** 3
#: reference image + variance (float32) + mask (uint16), master bias/dark/flat (float32) + mask (uint16)
STATICS_BYTES_PER_PIXEL = 4 + 4 + 2 + 4 + 4 + 4 + 2
#: host memory the plan lets statics take, as a fraction of the cluster's (Ray's ``memory``
#: resource): the rest is for frames in flight, the chain's host arrays and the packaging
HOST_FRACTION = 0.6


def statics_bytes_per_ccd(ny: int, nx: int, *, with_master: bool = True) -> int:
    """Bytes of one CCD's statics (image planes; PSF stamps and catalogues add < 1 % and are not
    counted)."""
    per_px = STATICS_BYTES_PER_PIXEL if with_master else 4 + 4 + 2
    return int(ny) * int(nx) * per_px


@dataclass(frozen=True)
class MemoryPlan:
    """The statics plan of a night (see the module docstring).

    Attributes
    ----------
    n_ccds, n_actors, ccds_per_actor : int
    per_ccd_bytes : int
    device : bool
        The actors run on GPUs (else numpy: statics in host memory).
    device_budget_bytes : int
        Per GPU actor (0 on numpy).
    device_ccds_per_actor : int or None
        CCDs whose statics stay on each actor's device; ``None`` = all (numpy: the host is the device).
    host_bytes : int
        Statics kept in (pinned, on a GPU) host memory, whole cluster.
    host_limit_bytes : int
        What the plan allows them (``HOST_FRACTION`` of the cluster's memory; 0 = unknown).
    """

    n_ccds: int
    n_actors: int
    ccds_per_actor: int
    per_ccd_bytes: int
    device: bool
    device_budget_bytes: int
    device_ccds_per_actor: int | None
    host_bytes: int
    host_limit_bytes: int

    def describe(self) -> str:
        """One line: the plan, in the numbers it was made from."""
        mb = self.per_ccd_bytes / 2 ** 20
        head = (f"statics plan: {self.n_ccds} CCDs x {mb:.0f} MB over {self.n_actors} subtraction actor(s) "
                f"({self.ccds_per_actor} CCDs each)")
        if self.device:
            on = self.device_ccds_per_actor
            return (f"{head}: {on} per GPU on the device ({on * mb / 1024:.1f} of {self.device_budget_bytes / GIB:g} "
                    f"GiB budget), {self.ccds_per_actor - on} per GPU in pinned host memory uploaded with each batch "
                    f"({self.host_bytes / GIB:.1f} GiB host in all, limit {self.host_limit_bytes / GIB:.1f} GiB)")
        return (f"{head}: all in host memory (numpy), {self.host_bytes / GIB:.1f} GiB in all, "
                f"limit {self.host_limit_bytes / GIB:.1f} GiB")


def plan_memory(*, n_ccds: int, shape: tuple[int, int], n_actors: int, device: bool, device_budget_gib: float,
                host_memory_bytes: float, with_master: bool = True, ccds_per_actor: int | None = None) -> MemoryPlan:
    """The statics plan of a night.

    Parameters
    ----------
    n_ccds : int
        CCDs of the focal plane (those the night will see).
    shape : (ny, nx)
        A CCD's shape.
    n_actors : int
        Subtraction actors (one per GPU on a GPU backend).
    device : bool
        GPU actors.
    device_budget_gib : float
        ``[run] device_budget_gib``.
    host_memory_bytes : float
        The cluster's host memory for actors (Ray's ``memory`` resource); 0 = unknown (not checked).
    with_master : bool
        The CCDs have a master calibration (raw frames).
    ccds_per_actor : int, optional
        The most CCDs one actor serves (default ``ceil(n_ccds / n_actors)``).

    Raises
    ------
    ConfigError
        The statics that do not fit on the devices do not fit in host memory either.
    """
    n_actors = max(1, int(n_actors))
    per_ccd = statics_bytes_per_ccd(*shape, with_master=with_master)
    per_actor = int(ccds_per_actor) if ccds_per_actor else math.ceil(int(n_ccds) / n_actors)
    budget = int(device_budget_gib * GIB) if device else 0
    on_device = min(per_actor, budget // per_ccd) if device else None
    host_ccds = (per_actor - on_device) * n_actors if device else int(n_ccds)
    host_bytes = host_ccds * per_ccd
    limit = int(HOST_FRACTION * host_memory_bytes) if host_memory_bytes else 0
    plan = MemoryPlan(n_ccds=int(n_ccds), n_actors=n_actors, ccds_per_actor=per_actor, per_ccd_bytes=per_ccd,
                      device=bool(device), device_budget_bytes=budget, device_ccds_per_actor=on_device,
                      host_bytes=host_bytes, host_limit_bytes=limit)
    if limit and host_bytes > limit:
        where = (f"{per_actor - on_device} of each GPU actor's {per_actor} CCDs beyond run.device_budget_gib = "
                 f"{device_budget_gib:g}" if device else f"all {n_ccds} CCDs (numpy backend)")
        raise ConfigError(f"the CCD statics do not fit: {where} need {host_bytes / GIB:.1f} GiB of host memory "
                          f"({n_ccds} CCDs of {shape[0]}x{shape[1]} px, {per_ccd / 2 ** 20:.0f} MB each) but the "
                          f"cluster allows {limit / GIB:.1f} GiB ({HOST_FRACTION:.0%} of {host_memory_bytes / GIB:.1f} "
                          f"GiB); add nodes or GPUs, raise run.device_budget_gib, or run fewer CCDs")
    return plan
