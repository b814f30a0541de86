"""Unit checks of the subtraction stage's helpers (the statistics are in test_chain_truth.py)."""
from types import SimpleNamespace

import numpy as np

from nightsift.engine.stages.psf import SOURCE_DTYPE
from nightsift.engine.stages.subtract import blank_sky


def _psf(cat, fwhm=3.0):
    return SimpleNamespace(model=SimpleNamespace(fwhm=np.array([fwhm])), catalog=cat)


def test_blank_sky_masks_around_sources_with_a_capped_radius():
    cat = np.zeros(3, SOURCE_DTYPE)
    cat["x"], cat["y"] = [100, 400, 600], [100, 300, 600]
    cat["a"] = [1.0, 10.0, 5000.0]  # a star, a galaxy, a satellite trail's isophote
    excluded = np.zeros((1024, 1024), bool)
    excluded[:, :8] = True
    blank = blank_sky(_psf(cat), _psf(cat[:0]), excluded)
    assert not blank[:, :8].any()
    assert not blank[100, 100 + 9] and blank[100, 100 + 10]  # 3 FWHM = 9 px around the star
    assert not blank[300, 400 + 30] and blank[300, 400 + 31]  # 3 a = 30 px around the galaxy
    assert not blank[600, 600 + 64] and blank[600, 600 + 65]  # the trail: capped at 64 px
    assert blank.mean() > 0.9
