"""A simulated night: several visits of several CCDs over a static sky."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from ..errors import ConfigError
from .instruments import InstrumentProfile, get_profile
from .options import SimulationOptions
from .pair import SimulatedCCD, simulate_ccd_pair
from .static import StaticScene, simulate_static

if TYPE_CHECKING:
    from ..config import SimulateConfig


def simulate_night(
    profile: str | InstrumentProfile = "decam",
    *,
    n_visits: int = 3,
    n_ccds: int = 2,
    shape: tuple[int, int] | None = (1024, 1024),
    seed: int = 2026,
    order: str = "visit",
    cache_static: bool = True,
    **kwargs,
) -> Iterator[tuple[int, int, SimulatedCCD]]:
    """Yield ``(visit, ccd, SimulatedCCD)`` for every visit and CCD of a night.

    The static sky of CCD ``c`` (stars, galaxies, detector, reference image, calibration frames)
    is the same on every visit (seeded by ``(seed, c)``); seeing, sky, transparency, pointing
    geometry, transients, cosmic rays and noise change per visit (seeded by ``(seed, c, visit)``).
    ``simulate_night(...)`` yields exactly what ``simulate_ccd_pair(profile, seed=seed,
    visit=v, ccd=c, n_ccds=n_ccds, shape=shape, **kwargs)`` returns.

    Parameters
    ----------
    profile : str or InstrumentProfile
    n_visits, n_ccds : int
    shape : (ny, nx) or None
        CCD shape (None: the profile's native shape).
    seed : int
    order : {"visit", "ccd"}
        ``"visit"``: all CCDs of visit 0, then visit 1, ... (as a telescope delivers them);
        ``"ccd"``: all visits of CCD 0, then CCD 1, ...
    cache_static : bool
        Keep each CCD's static part (reference image, detector, catalogues; ~14 bytes/pixel)
        between visits instead of rebuilding it. With ``order="ccd"`` only one is kept at a time.
    **kwargs
        Fields of :class:`SimulationOptions` for every CCD-visit (``transients``, ``artifacts``,
        ``n_transients``, ...).
    """
    if n_visits < 1 or n_ccds < 1:
        raise ConfigError(f"simulate_night: n_visits and n_ccds must be >= 1, got {n_visits}, {n_ccds}")
    if order not in ("visit", "ccd"):
        raise ConfigError(f"simulate_night: order must be 'visit' or 'ccd', got {order!r}")
    p = get_profile(profile)
    if order == "visit":
        pairs = [(v, c) for v in range(n_visits) for c in range(n_ccds)]
    else:
        pairs = [(v, c) for c in range(n_ccds) for v in range(n_visits)]
    base = SimulationOptions(shape=shape, seed=seed, n_ccds=n_ccds, **kwargs)
    cache: dict[int, StaticScene] = {}
    for v, c in pairs:
        if order == "ccd":
            for k in [k for k in cache if k != c]:
                del cache[k]
        o = base.replace(visit=v, ccd=c)
        st = cache.get(c)
        if st is None:
            st = simulate_static(p, o)
        if cache_static:
            cache[c] = st
        yield v, c, simulate_ccd_pair(p, o, static=st)


def visit_options(config: SimulateConfig, *, visit: int, ccd: int) -> tuple[InstrumentProfile, SimulationOptions]:
    """The profile and options of one CCD-visit of the night described by a
    :class:`~nightsift.engine.config.SimulateConfig`.

    ``config.instrument`` is the profile, ``(config.ny, config.nx)`` the shape (0 = the profile's
    native size), ``config.seed``, ``config.n_ccds`` and ``config.n_transients`` as named.
    """
    p = get_profile(config.instrument)
    return p, SimulationOptions(shape=(config.ny or p.ny, config.nx or p.nx), seed=config.seed, visit=visit,
                                ccd=ccd, n_ccds=config.n_ccds, n_transients=config.n_transients)


def simulate_visit_ccd(config, *, visit: int, ccd: int, **overrides) -> SimulatedCCD:
    """One CCD-visit of the night described by a :class:`~nightsift.engine.config.SimulateConfig`
    (see :func:`visit_options`).

    Keyword ``overrides`` go to :func:`simulate_ccd_pair` (fields of :class:`SimulationOptions`, or
    ``static=``). Equals what :func:`simulate_night` yields for ``(visit, ccd)`` with the same
    settings.
    """
    p, options = visit_options(config, visit=visit, ccd=ccd)
    return simulate_ccd_pair(p, options, **overrides)
