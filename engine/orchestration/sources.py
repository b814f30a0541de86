"""Where the CCD-visits of a night come from, seen from a subtraction worker.

A *source* hands a worker two things:

* the **static part of a CCD** (:class:`CCDStatic`): its master calibration and reference exposure,
  loaded once and kept resident by the worker the CCD is pinned to, for every visit of the night;
* one **frame** per visit (:class:`CCDFrame`): the raw (or calibrated) science exposure, plus the
  injected truth when the night is simulated.

A source is a small picklable object (it travels to Ray actors and worker processes); it must be
deterministic per ``(visit, ccd)`` so that a retried CCD-visit yields the same alerts.
:class:`SimulatedNight` is the built-in one (``nightsift run``, ``bench/night.py``);
:class:`~nightsift.engine.orchestration.folder.FolderNight` (``nightsift run --input DIR``) serves a
folder of FITS files, and also lists its CCD-visits (``tasks()``, see :func:`night_tasks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..config import CalibrateConfig, Config, SimulateConfig
from ..records import Exposure, RawFrame
from ..stages.calibrate import MasterCalibration

__all__ = ["CCDStatic", "CCDFrame", "CCDSource", "SimulatedNight", "night_tasks", "visit_schedule"]


@dataclass(frozen=True)
class CCDStatic:
    """What a worker keeps resident for one CCD between visits.

    Attributes
    ----------
    ccd : int
    master : MasterCalibration or None
        Master bias/dark/flat and bad-pixel mask of the CCD; ``None`` when its science frames
        arrive calibrated.
    reference : Exposure
        The reference exposure on its own pixel grid (e-), aligned to each visit by the chain.
    state : object
        Source-private data reused between visits (the simulator's static sky); may be ``None``.
    psf_file : str, optional
        The reference's PSF file (:func:`nightsift.engine.io.psf_files.read_psf`), used instead of
        measuring it.
    """

    ccd: int
    master: MasterCalibration | None
    reference: Exposure
    state: Any = None
    psf_file: str | None = None

    @property
    def nbytes(self) -> int:
        """Approximate resident size (bytes) of the reference and master frames."""
        n = 0
        for obj in (self.reference, self.master):
            for v in vars(obj).values():
                n += getattr(v, "nbytes", 0)
        return int(n)


@dataclass(frozen=True)
class CCDFrame:
    """One CCD of one visit.

    Attributes
    ----------
    visit, ccd : int
    raw : RawFrame or None
        Raw science frame (ADU) with its header.
    science : Exposure, optional
        Calibrated science exposure (e-), instead of ``raw`` (a folder of calibrated frames).
    truth : structured ndarray or None
        Injected transients (``TRANSIENT_DTYPE``: ``x``, ``y`` 0-based pixels, ``flux`` e-) when the
        night is simulated, else ``None``.
    psf : str, optional
        The science frame's PSF file, used instead of measuring it.
    """

    visit: int
    ccd: int
    raw: RawFrame | None
    truth: np.ndarray | None = field(default=None, repr=False)
    science: Exposure | None = field(default=None, repr=False)
    psf: str | None = None


class CCDSource(Protocol):
    """The two calls a subtraction worker makes (see the module docstring)."""

    def load_static(self, visit: int, ccd: int) -> CCDStatic:
        """Master calibration and reference of ``ccd`` (``visit`` is the first visit it is needed for)."""

    def load_frame(self, visit: int, ccd: int, static: CCDStatic) -> CCDFrame:
        """The raw science frame of ``(visit, ccd)``."""


def night_tasks(source, config: Config) -> list[tuple[int, int]]:
    """The ``(visit, ccd)`` CCD-visits of a night: ``source.tasks()`` when the source lists its own
    (a folder of files), else every visit and CCD of ``config.simulate``."""
    listed = getattr(source, "tasks", None)
    if listed is not None:
        return [(int(v), int(c)) for v, c in listed()]
    return [(v, c) for v in range(config.simulate.n_visits) for c in range(config.simulate.n_ccds)]


def visit_schedule(tasks) -> list[tuple[float, int, list[int]]]:
    """``tasks`` ``(visit, ccd)`` as a schedule of visits all arriving at once (``[(0.0, visit,
    [ccd, ...]), ...]``, the Ray engine's :func:`~nightsift.engine.orchestration.ray_engine.night_schedule` form)."""
    by_visit: dict[int, list[int]] = {}
    for v, c in tasks:
        by_visit.setdefault(int(v), []).append(int(c))
    return [(0.0, v, ccds) for v, ccds in sorted(by_visit.items())]


class SimulatedNight:
    """A simulated night (:mod:`nightsift.engine.simulate`): the same sky, CCD by CCD, every visit.

    Parameters
    ----------
    simulate : SimulateConfig
        Instrument, CCD shape, ``n_ccds`` (sets the focal-plane layout), ``n_transients`` per
        CCD-visit and ``seed``. ``n_visits`` is not used here (the caller lists the visits).
    calibrate : CalibrateConfig
        Used to build each CCD's master calibration (once per CCD, not once per visit).

    Notes
    -----
    A CCD's calibration frames and reference are seeded by ``(seed, ccd)`` only, so the static
    part built for the first visit a worker sees is the one of every visit; each frame is exactly
    :func:`~nightsift.engine.simulate.simulate_visit_ccd` ``(simulate, visit=, ccd=)``.
    """

    def __init__(self, simulate: SimulateConfig, calibrate: CalibrateConfig):
        self.simulate = simulate
        self.calibrate = calibrate

    def _pair(self, visit: int, ccd: int, state=None):
        """``(SimulatedCCD, StaticScene)`` of ``(visit, ccd)``; ``state``: the CCD's static scene, if built."""
        from ..simulate import simulate_ccd_pair, simulate_static, visit_options

        p, options = visit_options(self.simulate, visit=visit, ccd=ccd)
        if state is None:
            state = simulate_static(p, options)
        return simulate_ccd_pair(p, options, static=state), state

    def load_static(self, visit: int, ccd: int) -> CCDStatic:
        from ..stages.calibrate import make_master

        sim, state = self._pair(visit, ccd)
        master = make_master(sim.calibration, header=sim.science_raw.header, config=self.calibrate)
        return CCDStatic(ccd=ccd, master=master, reference=sim.reference, state=state)

    def load_frame(self, visit: int, ccd: int, static: CCDStatic) -> CCDFrame:
        sim, _ = self._pair(visit, ccd, static.state)
        return CCDFrame(visit=visit, ccd=ccd, raw=sim.science_raw, truth=sim.transients)
