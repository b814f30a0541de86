"""What to simulate for one CCD-visit: :class:`SimulationOptions`, the arguments of
:func:`~nightsift.engine.simulate.simulate_ccd_pair` besides the instrument profile."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .instruments import InstrumentProfile
from .scene import Geometry

__all__ = ["SimulationOptions", "as_options"]


@dataclass(frozen=True)
class SimulationOptions:
    """Options of one simulated CCD-visit (validated on construction).

    ``None`` means "the profile's" (``shape``, ``n_ccds``, ``filter``) or "drawn" (``seeing``,
    ``ref_seeing``, ``sky``, ``geometry``, ``mag_range``); :meth:`resolved` fills in the profile's.

    Attributes
    ----------
    shape : (ny, nx), optional
        CCD shape; default the profile's native shape. At least 16 x 16.
    seed, visit, ccd : int
        Reproducibility: the static sky comes from ``(seed, ccd)``, the epoch from
        ``(seed, ccd, visit)``.
    n_ccds : int, optional
        CCDs in the focal plane (sets where CCD ``ccd`` sits on the sky); default the profile's.
    transients : bool
        ``False``: no transients and no variable stars (transient-free mode for false-positive
        statistics).
    n_transients : int
        Transients injected when ``transients`` is True (>= 0).
    transient_fractions : (float, float, float)
        Shares of isolated, nuclear and variable-star transients (a kind without enough
        hosts/stars falls back to isolated).
    mag_range : (bright, faint), optional
        Magnitudes of the transients (of ``|flux|``); default ``(maglim - 5, maglim + 0.3)`` where
        ``maglim`` is this epoch's ideal 5-sigma limit, i.e. S/N from ~500 down to ~3.8.
    artifacts : bool
        ``False``: no cosmic rays, hot pixels, bad columns, and no star bright enough to saturate
        in seeing down to 0.6x the typical one.
    seeing, ref_seeing : float, optional
        FWHM at the CCD centre (arcsec) of the science epoch / the reference; default drawn
        (science: typical x lognormal(0.15) within [0.7, 1.8]; reference: typical x [0.75, 0.95]).
    sky : float, optional
        Science sky rate (e-/s/px); default typical x [0.8, 1.3].
    geometry : Geometry, optional
        Science-vs-reference offset/rotation/scale; default drawn (see :func:`draw_geometry`).
    star_density, galaxy_density : float
        Stars per arcmin^2 brighter than mag 20, galaxies per arcmin^2 brighter than mag 22.
    n_saturated : int, optional
        Extra stars 0.5-2.5 mag brighter than the typical saturation level, placed inside the CCD
        (only with ``artifacts``); default none beyond the natural counts.
    psf_variation : bool
        ``False``: each epoch's PSF is the same all over the CCD (no growth towards the corners, no
        ellipticity gradient); for subtraction tests that want one exact PSF per image.
    filter : str, optional
        Default the profile's first filter.
    n_calib : int
        Frames in each calibration stack (>= 1).
    edge : int
        Transients keep this many pixels from the CCD edges (clipped to [0, (min(shape) - 1) // 4]).
    star_psf_scatter : float
        Per-star rms of ln(FWHM) in the science epoch (>= 0; 0: every star has the epoch's PSF).
        Stars of different colours have PSFs of slightly different widths, while the chain measures
        one PSF per tile, so bright stars leave ring residuals in the difference, as on the sky.
    proper_motion : float
        Per-star rms position change (pixels, per axis) between the reference and the science epoch
        (>= 0). Bright stars leave dipoles in the difference.
    bright_variables : float
        Share (0-1) of the variable-star transients put on bright stars: from the saturation level
        (not saturated in the reference) to 4 mag above the limit, uniform in magnitude, with a flux
        change of 3-70 % of the star's (log-uniform). Drawn from the catalogue as they are otherwise,
        variable stars are mostly faint (star counts rise towards the limit): the real class that
        matches the residuals of ``star_psf_scatter`` and ``proper_motion``. 0: as before, bit for bit.
    """

    shape: tuple[int, int] | None = None
    seed: int = 0
    visit: int = 0
    ccd: int = 0
    n_ccds: int | None = None
    transients: bool = True
    n_transients: int = 30
    transient_fractions: tuple[float, float, float] = (0.5, 0.3, 0.2)
    mag_range: tuple[float, float] | None = None
    artifacts: bool = True
    seeing: float | None = None
    ref_seeing: float | None = None
    sky: float | None = None
    geometry: Geometry | None = None
    star_density: float = 1.0
    galaxy_density: float = 2.0
    n_saturated: int | None = None
    psf_variation: bool = True
    filter: str | None = None
    n_calib: int = 3
    edge: int = 16
    star_psf_scatter: float = 0.0
    proper_motion: float = 0.0
    bright_variables: float = 0.0

    def __post_init__(self):
        if self.shape is not None:
            shape = (int(self.shape[0]), int(self.shape[1]))
            if shape[0] < 16 or shape[1] < 16:
                raise ConfigError(f"simulate: shape must be at least 16 x 16, got {shape}")
            object.__setattr__(self, "shape", shape)
        if self.n_calib < 1:
            raise ConfigError(f"simulate: n_calib must be >= 1, got {self.n_calib}")
        if self.n_transients < 0:
            raise ConfigError(f"simulate: n_transients must be >= 0, got {self.n_transients}")
        if not (self.star_psf_scatter >= 0 and self.proper_motion >= 0):
            raise ConfigError(f"simulate: star_psf_scatter and proper_motion must be >= 0, got "
                              f"{self.star_psf_scatter} and {self.proper_motion}")
        if not 0 <= self.bright_variables <= 1:
            raise ConfigError(f"simulate: bright_variables must be a share in [0, 1], got {self.bright_variables}")
        fr = self.transient_fractions
        if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
            raise ConfigError("simulate: transient_fractions must be three shares >= 0 (isolated, nuclear, variable)")

    def replace(self, **changes) -> SimulationOptions:
        """A copy with ``changes`` (validated); an unknown name raises ``TypeError``."""
        return dataclasses.replace(self, **changes)

    def resolved(self, profile: InstrumentProfile) -> SimulationOptions:
        """These options with the profile's ``shape``, ``n_ccds`` and ``filter`` filled in and
        ``edge`` clipped to the shape."""
        shape = self.shape if self.shape is not None else (profile.ny, profile.nx)
        shape = (int(shape[0]), int(shape[1]))
        return self.replace(
            shape=shape,
            n_ccds=int(self.n_ccds if self.n_ccds is not None else profile.n_ccds),
            filter=self.filter or profile.filters[0],
            edge=int(min(max(self.edge, 0), (min(shape) - 1) // 4)),
        )


def as_options(options: SimulationOptions | None, overrides: dict) -> SimulationOptions:
    """``options`` (default ``SimulationOptions()``) with the keyword ``overrides`` applied.

    Raises ``TypeError`` for an ``options`` of another type or an unknown option name."""
    if options is None:
        return SimulationOptions(**overrides)
    if not isinstance(options, SimulationOptions):
        raise TypeError(f"options must be a SimulationOptions, got {type(options).__name__}")
    return options.replace(**overrides) if overrides else options
