"""Unit checks of the subtraction stage's helpers (the statistics are in test_chain_truth.py)."""
import numpy as np

from nightsift.engine.records import SourceCatalog
from nightsift.engine.stages.subtract import blank_sky


def _catalog(x, y, a):
    n = len(x)
    z = np.zeros(n)
    return SourceCatalog(x=np.asarray(x, float), y=np.asarray(y, float), flux=z, fluxerr=z, snr=z,
                         a=np.asarray(a, float), b=np.asarray(a, float), peak=z, flag=np.zeros(n, np.int32),
                         size=np.full(n, np.nan), point=np.zeros(n, bool), psf_star=np.zeros(n, bool))


def test_blank_sky_masks_around_sources_with_a_capped_radius():
    # a star, a galaxy, a satellite trail's isophote
    cat = _catalog([100, 400, 600], [100, 300, 600], [1.0, 10.0, 5000.0])
    excluded = np.zeros((1, 1024, 1024), bool)
    excluded[0, :, :8] = True
    blank = blank_sky(excluded.shape, [cat], [cat.take(np.zeros(0, int))], np.array([3.0]), excluded)[0]
    assert not blank[:, :8].any()
    assert not blank[100, 100 + 9] and blank[100, 100 + 10]  # 3 FWHM = 9 px around the star
    assert not blank[300, 400 + 30] and blank[300, 400 + 31]  # 3 a = 30 px around the galaxy
    assert not blank[600, 600 + 64] and blank[600, 600 + 65]  # the trail: capped at 64 px
    assert blank.mean() > 0.9


def test_flux_ratio_falls_back_to_the_zero_points_without_common_stars():
    """No common star: with MAGZP/EXPTIME in both headers F_r comes from the zero points; without
    them the CCD fails with an AlgorithmFailure naming the missing keys and the file."""
    import pytest

    from nightsift.engine.config import Config
    from nightsift.engine.errors import AlgorithmFailure
    from nightsift.engine.pipeline import process_pair
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.subtract import decide_flux_ratio, zero_point_flux_ratio

    sim = simulate_ccd_pair("decam", shape=(512, 512), seed=5, n_transients=5)
    cfg = Config()
    sci = sim.science_exposure()
    res = process_pair(sci, sim.reference, config=cfg, write=False)
    prior = zero_point_flux_ratio(sci.header, sim.reference.header)
    assert prior == pytest.approx(10 ** (0.4 * (sim.reference.header["MAGZP"] - sci.header["MAGZP"])), rel=1e-9)
    assert abs(res.qa["F_r"] / prior - 1) < 0.1  # the stars' value, close to the zero points'
    assert res.qa["F_r_source"] == "stars+zero_points" and res.qa["n_flux_stars"] >= 5
    f, qa = decide_flux_ratio(float("nan"), 0, float("nan"), prior, config=cfg.subtract)
    assert f == prior and qa["F_r_source"] == "zero_points"
    with pytest.raises(AlgorithmFailure, match=r"sci\.fits: flux ratio.*MAGZP"):
        decide_flux_ratio(float("nan"), 0, float("nan"), None, config=cfg.subtract, path="sci.fits")
    # a star-based F_r far from the zero points (only changed sources matched) is replaced by them
    f, qa = decide_flux_ratio(0.5 * prior, 12, 0.01, prior, config=cfg.subtract)
    assert f == prior and qa["F_r_source"] == "zero_points"


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
