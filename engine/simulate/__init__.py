"""Simulated CCD data with known truth: the built-in default data of nightsift and the ground truth
of its tests.

A :class:`SimulatedCCD` holds a raw science frame (ADU, with calibration frames), a calibrated
archival reference (e-), and the truth: stars, galaxies, injected transients (isolated, nuclear,
variable stars), artifacts (cosmic rays, hot pixels, bad columns, saturation), the true PSFs, sky,
detector and the science-vs-reference geometry. Everything is deterministic from a seed.

>>> from nightsift.engine.simulate import simulate_ccd_pair
>>> sim = simulate_ccd_pair("decam", shape=(512, 512), seed=1)
>>> sim.science_raw.data.shape, sim.reference.image.dtype
((512, 512), dtype('float32'))

The options of :func:`simulate_ccd_pair` are the fields of :class:`SimulationOptions` (given as
keywords, as above, or as one object). Many visits of one CCD share its static part
(:class:`StaticScene`, from :func:`simulate_static`), passed as ``static=``.

:func:`simulate_space_pair` draws a space-telescope-like pair instead (MJy/sr with noise maps, an
undersampled PSF, a galaxy-rich field, a transient on a galaxy): :mod:`.space`.
"""
from .detector import (
    BAD_COLUMN_DTYPE, COSMIC_RAY_DTYPE, HOT_PIXEL_DTYPE, DetectorModel, make_cosmic_rays,
    make_detector,
)
from .instruments import PROFILES, InstrumentProfile, get_profile
from .night import simulate_night, simulate_visit_ccd, visit_options
from .options import SimulationOptions
from .pair import TRANSIENT_DTYPE, TRANSIENT_KINDS, SimulatedCCD, simulate_ccd_pair
from .psf import PSFField, draw_psf_field
from .scene import GALAXY_DTYPE, STAR_DTYPE, Geometry, SkyModel, draw_geometry
from .space import SPACE_TRANSIENT_DTYPE, SpaceOptions, SpacePair, simulate_space_pair, zogy_expected_snr
from .static import StaticScene, simulate_static
from .units import flux_to_mag, mag_to_flux

__all__ = [
    "BAD_COLUMN_DTYPE", "COSMIC_RAY_DTYPE", "GALAXY_DTYPE", "HOT_PIXEL_DTYPE", "PROFILES",
    "SPACE_TRANSIENT_DTYPE", "STAR_DTYPE", "TRANSIENT_DTYPE", "TRANSIENT_KINDS", "DetectorModel", "Geometry",
    "InstrumentProfile", "PSFField", "SimulatedCCD", "SimulationOptions", "SkyModel", "SpaceOptions",
    "SpacePair", "StaticScene", "draw_geometry", "draw_psf_field", "flux_to_mag", "get_profile", "mag_to_flux",
    "make_cosmic_rays", "make_detector", "simulate_ccd_pair", "simulate_night", "simulate_static",
    "simulate_space_pair", "simulate_visit_ccd", "visit_options", "zogy_expected_snr",
]
