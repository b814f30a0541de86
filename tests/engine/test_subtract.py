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


def test_flux_ratio_falls_back_to_the_zero_points_without_common_stars():
    """No common star (catalogues emptied): with MAGZP/EXPTIME in both headers F_r comes from the
    zero points; without them the CCD fails with an AlgorithmFailure naming the missing keys."""
    import dataclasses

    import pytest

    from nightsift.engine.config import Config
    from nightsift.engine.errors import AlgorithmFailure
    from nightsift.engine.pipeline import process_pair
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.subtract import subtract, zero_point_flux_ratio

    sim = simulate_ccd_pair("decam", shape=(512, 512), seed=5, n_transients=5)
    cfg = Config()
    res = process_pair(sim.science_exposure(), sim.reference, config=cfg, write=False, keep_products=True)
    p = res.products
    empty_sci = dataclasses.replace(p.sci_psf, catalog=p.sci_psf.catalog[:0])
    prior = zero_point_flux_ratio(p.science.header, p.reference.header)
    assert prior == pytest.approx(10 ** (0.4 * (p.reference.header["MAGZP"] - p.science.header["MAGZP"])), rel=1e-9)
    out = subtract(p.science, p.reference, empty_sci, p.ref_psf, config=cfg.subtract)
    assert out.qa["F_r"] == prior and out.qa["F_r_source"] == "zero_points"
    assert abs(res.qa["F_r"] / prior - 1) < 0.1  # the stars' value, close to the zero points'
    hdr = p.science.header.copy()
    del hdr["MAGZP"]
    with pytest.raises(AlgorithmFailure, match="MAGZP"):
        subtract(dataclasses.replace(p.science, header=hdr), p.reference, empty_sci, p.ref_psf, config=cfg.subtract)


def test_flux_ratio_combines_few_stars_with_the_zero_points():
    """Many stars decide F_r; a few scattered ones are pulled to the zero points by their weights."""
    from nightsift.engine.stages.subtract import combine_flux_ratio

    # 40 stars measuring 1.05 +- 0.3 %: the zero points (1.00 +- 2 %) barely move it
    f, e = combine_flux_ratio(1.05, 0.003, 1.00, 0.02)
    assert abs(f - 1.05) < 0.002 and e < 0.003
    # 4 faint stars measuring 0.905 +- 3.5 % on a CCD whose zero points say 1.024 +- 2 %
    f, e = combine_flux_ratio(0.905, 0.035, 1.024, 0.02)
    assert abs(f - 1.024) < abs(0.905 - 1.024) / 2 and e < 0.02
    # equal weights: the midpoint
    f, _ = combine_flux_ratio(1.0, 0.02, 1.1, 0.02 / 1.1)
    assert abs(f - 1.05) < 1e-9
