"""Drift monitoring: PSI/KS statistics, the empirical null, and a simulated night with degraded CCDs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nightsift.engine.discover import drift
from nightsift.engine.config import DiscoverConfig
from nightsift.engine.discover.drift import CCDSample


# ----------------------------------------------------------------------------- statistics

def test_psi_identical_is_zero_and_known_shift(rng):
    x = rng.normal(size=5000)
    assert drift.psi(x, x) == pytest.approx(0.0, abs=1e-12)
    # two bins at the median: reference 50/50, sample 80/20 -> PSI = sum (q-p) ln(q/p)
    ref = np.r_[np.zeros(500), np.ones(500)]
    new = np.r_[np.zeros(800), np.ones(200)]
    want = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert drift.psi(ref, new, bins=2, eps=0.0) == pytest.approx(want, rel=1e-9)


def test_psi_counts_missing_values():
    ref = np.r_[np.linspace(0, 1, 900), np.full(100, np.nan)]
    same = ref.copy()
    more_missing = np.r_[np.linspace(0, 1, 500), np.full(500, np.nan)]
    assert drift.psi(ref, same) < 1e-3
    assert drift.psi(ref, more_missing) > 0.5


def test_psi_null_expectation_small_samples(rng):
    """Under the null PSI ~ (K-1)(1/n + 1/m): why a fixed 0.25 alone would flag small samples."""
    vals = [drift.psi(rng.normal(size=3000), rng.normal(size=40)) for _ in range(200)]
    assert np.mean(vals) == pytest.approx(10 * (1 / 3000 + 1 / 40), rel=0.35)


def test_robust_z_floors():
    z, mv, mr = drift.robust_z([2.0], [1.0, 1.0, 1.0], rel_floor=0.05)
    assert (mv, mr) == (2.0, 1.0) and z == pytest.approx(1 / 0.05)
    z, _, _ = drift.robust_z([64.0], [49.0, 49.0], rel_floor=0.0, poisson=True)
    assert z == pytest.approx(15 / 7)
    assert np.isnan(drift.robust_z([], [1.0])[0])


# ----------------------------------------------------------------------------- synthetic nights

def _sample(ccd, rng, visits, *, n=60, shift=0.0, jitter=0.15, noise=1.1, elong=0.2):
    """Candidates of ``visits`` CCD-visits: each visit's distribution moves a little (jitter), as
    seeing and sky do; ``shift`` moves the whole night."""
    s = CCDSample(ccd)
    for v in visits:
        mu = rng.normal(0, jitter) + shift
        f = {"fwhm_rel": rng.normal(1.0 + mu, 0.1, n), "elong": 1 + rng.exponential(elong, n),
             "log_snr": rng.normal(1.3, 0.3, n), "log_scorr": rng.normal(1.3, 0.3, n),
             "nbad": rng.poisson(0.1, n).astype(float)}
        s.add(f, np.full(n, v), {"n_candidates": float(n), "noise_ratio": noise + rng.normal(0, 0.01)}, [v])
    return s


def test_history_flags_shifted_ccd_only(rng):
    ref = {c: _sample(c, rng, range(0, 4)) for c in range(6)}
    night = {c: _sample(c, rng, range(10, 12), shift=(0.6 if c == 2 else 0.0)) for c in range(6)}
    night[2] = _sample(2, rng, range(10, 12), shift=0.6, elong=0.6)
    night[4] = _sample(4, rng, range(10, 12), noise=2.0)
    rep = drift.compare(night, ref)
    assert rep.mode == "history"
    assert rep.flagged == [2, 4]
    assert set(rep.ccds[2].reasons) == {"fwhm_rel", "elong"}
    assert rep.ccds[4].reasons == ["noise_ratio"]
    st = rep.ccds[2].stat("fwhm_rel")
    assert st.psi >= st.psi_crit >= 0.25 and st.ks_p < 0.01


def test_visit_scatter_widens_the_threshold(rng):
    """Visits that differ a lot among themselves (overdispersion) raise the PSI threshold: a night
    within that scatter is not flagged, although PSI > 0.25 and KS p is tiny."""
    ref = {0: _sample(0, rng, range(4), jitter=0.4, n=150)}
    night = {0: _sample(0, rng, [9], jitter=0.0, shift=0.3, n=150)}
    rep = drift.compare(night, ref)
    st = rep.ccds[0].stat("fwhm_rel")
    assert st.psi > 0.25 and st.ks_p < 1e-3
    assert st.psi_crit > st.psi and not rep.ccds[0].flagged


def test_single_visit_reference_is_not_tested(rng):
    ref = {0: _sample(0, rng, [0])}
    night = {0: _sample(0, rng, [5], shift=1.0)}
    rep = drift.compare(night, ref)
    assert not rep.ccds[0].flagged
    assert all(not s.tested for s in rep.ccds[0].stats)
    rep = drift.compare(night, ref, settings=DiscoverConfig(drift_min_groups=1))
    assert rep.ccds[0].flagged


def test_focal_plane_pool_is_cleaned(rng):
    night = {c: _sample(c, rng, [0, 1], jitter=0.05) for c in range(6)}
    night[5] = _sample(5, rng, [0, 1], shift=1.5)
    rep = drift.compare(night)
    assert rep.mode == "focal_plane"
    assert rep.flagged == [5] and rep.excluded == (5,)


def test_samples_roundtrip(tmp_path, rng):
    night = {c: _sample(c, rng, [0, 1]) for c in (0, 7)}
    p = drift.save_samples(tmp_path / "s.npz", night, meta={"night": "x"})
    back = drift.load_samples(p)
    assert sorted(back) == [0, 7]
    for c in night:
        np.testing.assert_array_equal(back[c].group, night[c].group)
        np.testing.assert_array_equal(back[c].visit_ids, night[c].visit_ids)
        for k in night[c].features:
            np.testing.assert_array_equal(back[c].features[k], night[c].features[k])
    merged = drift.merge_samples([night, back])
    assert merged[0].n_candidates == 2 * night[0].n_candidates


def test_load_samples_errors(tmp_path):
    from nightsift.engine.errors import InputError

    with pytest.raises(InputError, match="not found"):
        drift.load_samples(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="bad.npz"):
        drift.load_samples(tmp_path / "bad.npz")


def test_candidate_values_sentinels():
    c = [{"fwhm": -999.0, "elong": 0.0, "snr": 10.0, "scorr": -7.0, "nbad": 0, "rb": None},
         {"fwhm": 4.0, "elong": 1.5, "snr": 100.0, "scorr": 20.0, "nbad": 2, "rb": 0.9}]
    v = drift.candidate_values(c, psf_fwhm=4.0)
    assert np.isnan(v["fwhm_rel"][0]) and v["fwhm_rel"][1] == 1.0
    assert np.isnan(v["elong"][0])
    np.testing.assert_allclose(v["log_snr"], [1.0, 2.0])
    np.testing.assert_allclose(v["log_scorr"], [np.log10(7), np.log10(20)])
    assert np.isnan(v["rb"][0]) and v["rb"][1] == pytest.approx(0.9)
    assert "rb" not in drift.candidate_values(c[:1])


# ----------------------------------------------------------------------------- a simulated night

SIZE, N_CCDS, SEED = 320, 5, 12
HOT_CCD, NOISY_CCD = 1, 3
SEEING = {0: 1.0, 1: 1.25, 2: 1.1}  # arcsec per visit, the same on every CCD of a visit


def _hot_pixels(data, rng, n=80):
    """A new artifact type: a warm CCD whose new hot pixels the master dark does not know."""
    d = data.copy()
    ny, nx = d.shape
    d[rng.integers(5, ny - 5, n), rng.integers(5, nx - 5, n)] += rng.uniform(400, 1500, n)
    return d


def _pattern_noise(data, rng):
    """Changed noise: electronic pickup (a beat pattern) plus extra white read noise (ADU)."""
    ny, nx = data.shape
    yy, xx = np.mgrid[:ny, :nx]
    return data + 25 * np.sin(2 * np.pi * xx / 7.3 + 0.4) * np.sin(2 * np.pi * yy / 11.1) + rng.normal(0, 15, data.shape)


def _scorer():
    """The shipped real/bogus scorer when its runtime and model are installed (then the rb
    distribution is monitored too), else None: drift falls back to the features. ``None`` only
    for that (no model shipped, no LiteRT: backend ``auto``'s documented fallback); a model that
    is there and does not load fails the test."""
    from nightsift.engine.classify.runtime import pipeline_scorer
    from nightsift.engine.config import Config

    return pipeline_scorer(Config().classify)


def _run_night(out, visits, degrade, scorer=None):
    from nightsift.engine.config import Config
    from nightsift.engine.errors import AlgorithmFailure, SkipCCD
    from nightsift.engine.orchestration.ledger import write_record
    from nightsift.engine.orchestration.task import record_outcome
    from nightsift.engine.pipeline import process_ccd
    from nightsift.engine.records import RawFrame
    from nightsift.engine.simulate import simulate_ccd_pair
    from nightsift.engine.stages.calibrate import make_master

    cfg = Config().replace(subtract={"tile_size": 0}, package={"output_dir": str(out)})
    done = []
    for v in visits:
        for ccd in range(N_CCDS):
            sim = simulate_ccd_pair("decam", shape=(SIZE, SIZE), seed=SEED, visit=v, ccd=ccd, n_ccds=N_CCDS,
                                    seeing=SEEING[v], star_density=6.0)
            master = make_master(sim.calibration, header=sim.science_raw.header, config=cfg.calibrate)
            raw = sim.science_raw
            if ccd in degrade:
                raw = RawFrame(degrade[ccd](raw.data, np.random.default_rng(100 * v + ccd)).astype(np.float32),
                               raw.header)
            try:
                res = process_ccd(raw, master, sim.reference, config=cfg, visit=v, ccd=ccd, scorer=scorer)
            except (AlgorithmFailure, SkipCCD) as e:  # the CCD's own problem, recorded as the engines do
                write_record(out, v, ccd, **record_outcome(e))
                continue
            write_record(out, v, ccd, status="done", n_alerts=res.n_alerts, qa=res.qa)
            done.append((v, ccd))
    return done


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    scorer = _scorer()
    ref_done = _run_night(root / "ref", (0, 1), {}, scorer)
    new_done = _run_night(root / "new", (2,), {HOT_CCD: _hot_pixels, NOISY_CCD: _pattern_noise}, scorer)
    return root, ref_done, new_done, scorer is not None


@pytest.mark.slow
def test_simulated_night_degraded_ccds_flagged(nights):
    root, ref_done, new_done, scored = nights
    processed = {c for _, c in new_done}
    assert {HOT_CCD, NOISY_CCD} <= processed, f"a degraded CCD failed in the chain: {new_done}"
    healthy = processed - {HOT_CCD, NOISY_CCD}
    assert len(healthy) >= 2
    ref = drift.collect_night(root / "ref")
    night = drift.collect_night(root / "new")
    rep = drift.compare(night, ref)
    by = {c.ccd: c for c in rep.ccds}
    assert by[HOT_CCD].flagged, rep.summary()
    assert by[NOISY_CCD].flagged, rep.summary()
    assert not any(by[c].flagged for c in healthy), rep.summary()
    # the reasons are the ones the degradations cause
    assert "noise_ratio" in by[NOISY_CCD].reasons
    assert set(by[HOT_CCD].reasons) & {"rb", "fwhm_rel", "elong", "log_snr", "log_scorr", "n_candidates"}
    # with a scorer the real/bogus score distribution is monitored as well
    assert (by[HOT_CCD].stat("rb") is not None) == scored
    png = drift.plot_drift(rep, night, ref, root / "drift.png")
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_cli_drift(nights, capsys):
    from nightsift.engine.cli import main

    root = nights[0]
    out = root / "report"
    assert main(["drift", str(root / "new"), "--reference", str(root / "ref"), "--out", str(out)]) == 0
    rep = json.loads((out / "drift.json").read_text())
    assert HOT_CCD in rep["flagged"] and NOISY_CCD in rep["flagged"]
    assert (out / "drift.png").exists()
    assert (root / "new" / "drift_samples.npz").exists()
    assert "FLAGGED" in capsys.readouterr().out
    # a night's kept distributions (drift_samples.npz) serve as the reference of a later night
    assert main(["drift", str(root / "ref"), "--out", str(out / "ref")]) == 0
    kept = root / "ref" / "drift_samples.npz"
    assert kept.exists()
    assert main(["drift", str(root / "new"), "--reference", str(kept), "--out", str(out / "again")]) == 0
    assert json.loads((out / "again" / "drift.json").read_text())["flagged"] == rep["flagged"]
