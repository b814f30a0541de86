"""PSF estimation in hard fields, and the plausibility flags.

* a galaxy-rich field with an undersampled PSF (FWHM ~2.1 px, galaxies outnumbering the stars
  many times among the bright sources, 1.5-4x the PSF): the stellar locus is the lower envelope
  of sizes, the PSF FWHM (Moffat fit and the stamps' half-maximum width) within 10 % of the truth,
  and the same field with the lower envelope switched off takes galaxies for stars;
* a field with too few stars fails with one clear line instead of a PSF made of galaxies;
* plausibility flags (QA ``warnings``): a header SEEING that disagrees with the measured PSF, and
  zero points whose F_r is 20 % off the stars'; a clean pair has none.
"""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from nightsift.engine.config import Config, PSFConfig, SubtractConfig
from nightsift.engine.errors import AlgorithmFailure
from nightsift.engine.pipeline import process_pair
from nightsift.engine.simulate import simulate_ccd_pair
from nightsift.engine.simulate.instruments import PROFILES
from nightsift.engine.stages.measure import header_seeing
from nightsift.engine.stages.psf import psf_warnings
from nightsift.engine.stages.subtract import decide_flux_ratio, flux_ratio_warning
from nightsift.kernels.psf import half_max_fwhm

#: a space-like camera: 0.1"/px, so a 0.21" PSF is undersampled (2.1 px) and galaxies are resolved
SPACE = PROFILES["lsst"].replace(name="space", pixel_scale=0.1, seeing_fwhm=0.21, moffat_beta=2.5,
                                 psf_corner_growth=0.03, psf_ellipticity=0.02)
SEEING_KEYS = ("FWHM", "SEEING", "FWHMPIX")
#: a field whose science PSF stars are few enough that the lower envelope and the crowded retry
#: are both needed (QA psf_locus_floored, psf_crowded)
HARD_SEED = 3


def hard_pair(seed: int, *, seeing: float = 0.21, star_density: float = 1.0, galaxy_density: float = 40.0,
              keep_seeing: bool = False, **kw):
    """A galaxy-rich undersampled pair (science, reference, sim); the headers lose their true
    seeing cards (a user's files rarely hold the truth) unless ``keep_seeing``."""
    sim = simulate_ccd_pair(SPACE, shape=(1024, 1024), seed=seed, star_density=star_density,
                            galaxy_density=galaxy_density, seeing=seeing, ref_seeing=0.9 * seeing, artifacts=False,
                            **kw)
    sci, ref = sim.science_exposure(), sim.reference
    if not keep_seeing:
        for h in (sci.header, ref.header):
            for k in SEEING_KEYS:
                del h[k]
    return sci, ref, sim


def ref_truth(sim, x, y):
    """True reference FWHM at science position (x, y), in science pixels."""
    g = sim.geometry
    return sim.psf_fwhm_ref(*g.sci_to_ref(x, y, sim.shape)) / g.scale


def tile_centres(model):
    g = model.grid
    return [(x0 + g.core / 2 - 0.5, y0 + g.core / 2 - 0.5) for y0, x0 in g.origins]


@pytest.fixture(scope="module")
def hard_run():
    sci, ref, sim = hard_pair(HARD_SEED, transients=False)
    return sim, process_pair(sci, ref, config=Config(), write=False, keep_products=True)


def test_galaxy_rich_undersampled_field_gives_the_stellar_psf(hard_run):
    sim, res = hard_run
    # the field is hard: galaxies brighter than the median star outnumber such stars many times
    median_star = np.median(sim.stars["flux_sci"][sim.stars["in_sci"]])
    n_gal = int((sim.galaxies["flux"][sim.galaxies["in_sci"]] > median_star).sum())
    n_star = int((sim.stars["flux_sci"][sim.stars["in_sci"]] > median_star).sum())
    assert n_gal > 5 * n_star, (n_gal, n_star)
    assert res.status == "done", res.error
    qa = res.qa
    # the bright isolated candidates' locus sat on galaxies; too few isolated stars: the retry
    assert qa["sci_psf_locus_floored"] == 1 and qa["sci_psf_crowded"] == 1
    for which, truth in (("sci_psf", sim.psf_fwhm_sci), ("ref_psf", lambda x, y: ref_truth(sim, x, y))):
        m = getattr(res.products, which).model
        stamps = half_max_fwhm(np.asarray(m.stamps))
        for t, (cx, cy) in enumerate(tile_centres(m)):
            f = truth(cx, cy)
            print(f"{which} tile {t}: Moffat {m.fwhm[t]:.3f} stamp {stamps[t]:.3f} truth {f:.3f}")
            assert abs(m.fwhm[t] / f - 1) < 0.10, (which, t, m.fwhm[t], f)
            # the stamp is pixel-integrated: its half-maximum width is the truth convolved with a pixel
            assert abs(stamps[t] / np.hypot(f, 1.0) - 1) < 0.15, (which, t, stamps[t], f)
    # the PSF stars are stars
    cat = res.products.sci_psf.catalog
    sx, sy = sim.stars["x"], sim.stars["y"]
    for x, y in zip(cat.x[cat.psf_star], cat.y[cat.psf_star]):
        assert np.hypot(sx - x, sy - y).min() < 1.0, (x, y)
    assert qa["sci_psf_n_stars"] >= 3 and qa["ref_psf_n_stars"] >= 3
    assert qa["warnings"] == [], qa["warnings"]
    # the stars' own F_r agrees with the zero points (the stack's galaxy-light pedestal removed: with
    # it, 9-17 % high)
    assert abs(qa["F_r_stars"] / qa["F_r_zero_points"] - 1) < 0.05, qa["F_r_stars"]
    assert abs(qa["F_r"] / qa["F_r_zero_points"] - 1) < 0.05


def test_without_the_lower_envelope_the_locus_settles_on_galaxies():
    """The check above can fail: with the lower envelope off (and no crowded retry) the same field
    gives a PSF ~3x too broad, as the issue saw (~6 px for 2.1 px), and a star F_r far off the
    zero points; the flags say so (no header seeing here: the other image and the zero points)."""
    sci, ref, sim = hard_pair(HARD_SEED, transients=False)
    old = Config().replace(psf={"locus_resolved_ratio": 1e9, "crowded_isolation_fwhm": 0.0})
    res = process_pair(sci, ref, config=old, write=False)
    truth = sim.psf_fwhm_sci(512, 512)
    print("old locus: sci FWHM", res.qa["sci_psf_fwhm"], "ref", res.qa["ref_psf_fwhm"], "truth", truth)
    assert res.qa["sci_psf_fwhm"] > 1.5 * truth
    assert any("sci PSF FWHM" in w and "differ" in w for w in res.qa["warnings"]), res.qa["warnings"]
    assert any(w.startswith("flux ratio") for w in res.qa["warnings"]), res.qa["warnings"]


def test_too_few_stars_fail_with_one_clear_line():
    """1-2 stars among hundreds of galaxies make no stellar locus: the CCD fails naming the reason,
    instead of stacking galaxies."""
    sci, ref, _ = hard_pair(2, transients=False)
    with pytest.raises(AlgorithmFailure, match=r"too few PSF stars: .*galax.*PSF file"):
        process_pair(sci, ref, config=Config(), write=False)


def test_a_clean_pair_with_its_true_header_seeing_has_no_warning():
    sci, ref, sim = hard_pair(HARD_SEED, transients=False, keep_seeing=True)
    res = process_pair(sci, ref, config=Config(), write=False)
    assert res.qa["warnings"] == [], res.qa["warnings"]
    assert abs(res.qa["sci_psf_fwhm"] / sim.psf_fwhm_sci(512, 512) - 1) < 0.1


def test_a_wrong_header_seeing_is_flagged():
    sci, ref, sim = hard_pair(HARD_SEED, transients=False)
    true_arcsec = sim.psf_fwhm_sci(512, 512) * SPACE.pixel_scale
    sci.header["SEEING"] = (2.0 * true_arcsec, "[arcsec] seeing FWHM")
    res = process_pair(sci, ref, config=Config(), write=False)
    w = [m for m in res.qa["warnings"] if m.startswith("sci PSF FWHM")]
    assert len(w) == 1 and "header SEEING gives" in w[0], res.qa["warnings"]
    assert not any(m.startswith("ref PSF") for m in res.qa["warnings"])
    assert abs(res.qa["sci_psf_fwhm"] / sim.psf_fwhm_sci(512, 512) - 1) < 0.1  # the stars, not the header


def test_zero_points_disagreeing_with_the_stars_are_flagged():
    """Zero points implying an F_r 20 % off the star fit: flagged, and F_r is the zero points'."""
    sci, ref, _ = hard_pair(HARD_SEED, transients=False)
    sci.header["MAGZP"] = sci.header["MAGZP"] + 2.5 * np.log10(1.2)  # prior F_r 20 % lower
    res = process_pair(sci, ref, config=Config(), write=False)
    w = [m for m in res.qa["warnings"] if m.startswith("flux ratio")]
    assert len(w) == 1 and "% off the zero points" in w[0], res.qa["warnings"]
    assert res.qa["F_r_source"] == "zero_points" and res.qa["F_r"] == res.qa["F_r_zero_points"]
    assert abs(res.qa["F_r_stars"] / res.qa["F_r_zero_points"] - 1.2) < 0.06


# ------------------------------------------------------------------------------------------------
# the pieces
# ------------------------------------------------------------------------------------------------
def test_header_seeing_reads_units_from_the_comment_in_order():
    h = fits.Header()
    assert header_seeing(h, pixel_scale=0.26) is None  # no seeing card: no check
    h["SEEING"] = (1.3, "[arcsec] seeing")
    assert header_seeing(h, pixel_scale=0.26) == pytest.approx((5.0, "SEEING"))
    assert header_seeing(h, pixel_scale=None) is None  # arcsec without a pixel scale: unknown
    h["SEEING"] = (4.0, "seeing FWHM in pixels")
    assert header_seeing(h, pixel_scale=0.26) == pytest.approx((4.0, "SEEING"))
    h["FWHM"] = (5.23, "Median FWHM in pixels")  # DECam's card comes first
    assert header_seeing(h, pixel_scale=0.26) == pytest.approx((5.23, "FWHM"))
    h["FWHM"] = (0.0, "unknown")  # 0 / -1: not measured, the next card decides
    assert header_seeing(h, pixel_scale=0.26) == pytest.approx((4.0, "SEEING"))
    h2 = fits.Header()
    h2["PSF_FWHM"] = 0.7
    assert header_seeing(h2, pixel_scale=0.2) == pytest.approx((3.5, "PSF_FWHM"))


def test_psf_warnings_name_the_disagreement():
    cfg = PSFConfig()
    assert psf_warnings(2.1, 2.0, 2.0, (2.2, "SEEING"), (1.9, "FWHM"), config=cfg) == []
    assert psf_warnings(2.1, 2.0, 2.0, None, None, config=cfg) == []
    w = psf_warnings(6.1, 2.0, 2.0, (2.1, "SEEING"), None, config=cfg)
    assert "sci PSF FWHM 6.10 px implausible: header SEEING gives 2.10 px" in w[0]
    assert any("differ 3.0x" in m for m in w)
    w = psf_warnings(2.1, 2.0, 4.0, None, (2.0, "FWHM"), config=cfg)
    assert len(w) == 1 and w[0].startswith("ref PSF FWHM 4.00 px")


def test_flux_ratio_disagreement_warns_and_takes_the_zero_points():
    cfg = SubtractConfig()
    assert flux_ratio_warning(1.05, 40, 1.0, config=cfg) is None
    assert flux_ratio_warning(1.2, 40, None, config=cfg) is None
    assert flux_ratio_warning(float("nan"), 0, 1.0, config=cfg) is None
    assert "+20% off the zero points' 1.000" in flux_ratio_warning(1.2, 40, 1.0, config=cfg)
    f, qa = decide_flux_ratio(1.2, 40, 0.003, 1.0, config=cfg)
    assert f == 1.0 and qa["F_r_source"] == "zero_points" and qa["F_r_stars"] == 1.2
    f, qa = decide_flux_ratio(1.05, 40, 0.003, 1.0, config=cfg)  # within tolerance: combined, as before
    assert qa["F_r_source"] == "stars+zero_points" and abs(f - 1.05) < 0.002
