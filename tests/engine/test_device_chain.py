"""The production chain on a device: process_visit on the strict device stand-in (every implicit
host conversion raises), the crossings it is allowed, and batches that equal single CCD-visits.

On a machine with a GPU the same tests run on cupy (the ``gpu`` mark) and compare with numpy.
"""
from __future__ import annotations

import numpy as np
import pytest

from nightsift.engine.config import Config
from nightsift.engine.pipeline import VisitFrame, prepare_statics, process_visit
from nightsift.engine.simulate import simulate_ccd_pair
from nightsift.engine.stages.calibrate import make_master
from nightsift.kernels._xp import count_transfers

from ..strict_device import strict_namespace

SIZE = 512


@pytest.fixture(scope="module")
def pairs():
    """Two CCDs of one visit (different sky, geometry, transients), raw frames + masters + references."""
    out = []
    for ccd in (0, 1):
        sim = simulate_ccd_pair("decam", shape=(SIZE, SIZE), seed=3, ccd=ccd, n_ccds=2, n_transients=12)
        master = make_master(sim.calibration, header=sim.science_raw.header, config=Config().calibrate)
        out.append((sim, master))
    return out


def _run(pairs, xp, tmp_path, *, batch: bool, keep_products=False):
    cfg = Config().replace(package={"output_dir": str(tmp_path)})
    statics = [prepare_statics(sim.reference, master, config=cfg, xp=xp, ccd=c) for c, (sim, master) in
               enumerate(pairs)]
    frames = [VisitFrame(7, c, raw=sim.science_raw) for c, (sim, _) in enumerate(pairs)]
    if batch:
        with count_transfers() as ledger:
            res = process_visit(frames, statics, config=cfg, keep_products=keep_products)
        return res, ledger
    res = []
    for f, s in zip(frames, statics):
        res += process_visit([f], [s], config=cfg, keep_products=keep_products)
    return res, None


@pytest.fixture(scope="module")
def numpy_batch(pairs, tmp_path_factory):
    return _run(pairs, np, tmp_path_factory.mktemp("np"), batch=True)


def _same_candidates(a, b, *, rtol=1e-6):
    """Same candidates: ids, flags, and the numbers to ``rtol`` (1e-5 where the two runs used the
    Numba CPU Lanczos kernel, whose kernel table agrees with the exact reference to ~1e-7)."""
    assert len(a) == len(b), (len(a), len(b))
    for k in ("xpos", "ypos", "flux", "fluxerr", "scorr", "fwhm", "ra", "dec"):
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=k)
    for k in ("candid", "nbad", "isdiffpos", "edge"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_chain_runs_on_a_device_that_refuses_implicit_copies(pairs, numpy_batch, tmp_path):
    sx = strict_namespace()
    res, ledger = _run(pairs, sx, tmp_path, batch=True)
    want, _ = numpy_batch
    assert [r.status for r in res] == ["done", "done"]
    for r, w in zip(res, want):
        assert len(r.candidates) >= 8  # the transients are there
        _same_candidates(r.candidates, w.candidates, rtol=1e-5)
        np.testing.assert_allclose(r.triplets, w.triplets, rtol=1e-5, atol=0.02)  # e-, the noise is ~10
        assert r.alerts_path.exists()


def test_bytes_moved_per_ccd_visit_are_the_raw_frame_in_and_the_outputs_out(pairs, tmp_path):
    """The host sees raw frames going in and candidates, triplets and QA coming out: per CCD-visit,
    uploads are the raw frame plus < 1 % (the coarse WCS map, header numbers), downloads the
    triplets, the candidate columns, the QA and a few scalars (decisions the host must take)."""
    sx = strict_namespace()
    cfg = Config().replace(package={"output_dir": str(tmp_path)})
    statics = [prepare_statics(sim.reference, master, config=cfg, xp=sx, ccd=c) for c, (sim, master) in
               enumerate(pairs)]
    frames = [VisitFrame(8, c, raw=sim.science_raw) for c, (sim, _) in enumerate(pairs)]
    process_visit(frames, statics, config=cfg)  # device caches (spline matrices) filled once per shape
    sx.reset_stats()
    with count_transfers() as led:
        res = process_visit(frames, statics, config=cfg)
    assert (sx.stats.h2d_bytes, sx.stats.d2h_bytes) == (led.h2d_bytes, led.d2h_bytes)  # nothing hidden
    raw = sum(sim.science_raw.data.nbytes for sim, _ in pairs)
    assert led.by_label["raw"][1] == raw
    assert raw <= led.h2d_bytes < 1.01 * raw
    n = sum(len(r.candidates) for r in res)
    trip = n * 63 * 63 * 3 * 4
    assert led.by_label["triplets"][1] == trip
    assert trip <= led.d2h_bytes < trip + n * 13 * 8 + 8192
    # the per-CCD-visit QA reports the same crossings (shared out over the batch)
    assert sum(r.qa["xfer_h2d_bytes"] for r in res) == pytest.approx(led.h2d_bytes)
    assert all(r.qa["batch_size"] == 2 for r in res)
    # host synchronisations are counted and few (decisions: registration, PSF stamp sizes, F_r)
    assert 0 < led.scalar_reads <= 40


def test_a_batch_equals_its_ccd_visits_run_one_by_one(pairs, numpy_batch, tmp_path):
    single, _ = _run(pairs, np, tmp_path, batch=False)
    batched, _ = numpy_batch
    for a, b in zip(single, batched):
        _same_candidates(a.candidates, b.candidates)
        for k in ("F_r", "sci_psf_fwhm", "ref_psf_fwhm", "scorr_std_raw", "n_candidates"):
            assert a.qa[k] == pytest.approx(b.qa[k], rel=1e-9), k


def test_a_failing_ccd_leaves_the_batch_and_the_others_go_on(pairs, tmp_path):
    """CCD 0's frame has no finite pixel: it is failed with its reason; CCD 1 gives the same
    candidates as alone."""
    import dataclasses

    cfg = Config().replace(package={"output_dir": str(tmp_path)})
    statics = [prepare_statics(sim.reference, master, config=cfg, ccd=c) for c, (sim, master) in enumerate(pairs)]
    bad = dataclasses.replace(pairs[0][0].science_raw, data=np.full((SIZE, SIZE), np.nan, np.float32),
                              path="bad.fits")
    frames = [VisitFrame(9, 0, raw=bad), VisitFrame(9, 1, raw=pairs[1][0].science_raw)]
    res = process_visit(frames, statics, config=cfg)
    assert res[0].status == "failed" and "bad.fits" in str(res[0].error) and "no finite pixel" in str(res[0].error)
    assert res[1].status == "done"
    alone = process_visit(frames[1:], statics[1:], config=cfg)[0]
    _same_candidates(res[1].candidates, alone.candidates)


@pytest.mark.gpu
def test_cupy_equals_numpy(pairs, numpy_batch, tmp_path):
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("no CUDA GPU with cupy here")
    res, ledger = _run(pairs, cupy, tmp_path, batch=True)
    want, _ = numpy_batch
    for r, w in zip(res, want):
        assert r.status == "done"
        # float32 FFTs differ between cuFFT and pocketfft in the last bits: the same candidates
        # above threshold, positions within 0.01 px
        assert abs(len(r.candidates) - len(w.candidates)) <= 1
    assert ledger.h2d_bytes < 1.01 * sum(sim.science_raw.data.nbytes for sim, _ in pairs)


def test_packaging_can_run_apart_from_the_device_work(pairs, tmp_path):
    """process_visit(package=False) returns after the device work; package_results (in a thread of
    an engine's pool) then makes exactly the packets the inline chain makes."""
    from concurrent.futures import ThreadPoolExecutor

    from nightsift.engine.io.avro import read_alerts
    from nightsift.engine.pipeline import package_results

    cfg = Config().replace(package={"output_dir": str(tmp_path / "inline")})
    statics = [prepare_statics(sim.reference, master, config=cfg, ccd=c) for c, (sim, master) in enumerate(pairs)]
    frames = [VisitFrame(11, c, raw=sim.science_raw) for c, (sim, _) in enumerate(pairs)]
    inline = process_visit(frames, statics, config=cfg)
    bare = process_visit(frames, statics, config=cfg, package=False)
    assert all(r.alerts_path is None and r.n_alerts == 0 and len(r.triplets) == len(r.candidates) for r in bare)
    assert not list((tmp_path / "deferred").glob("*.avro"))
    cfg2 = cfg.replace(package={"output_dir": str(tmp_path / "deferred")})
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(package_results, bare, config=cfg2).result()
    for a, b in zip(inline, later):
        assert a.n_alerts == b.n_alerts > 0 and b.qa["n_alerts"] == b.n_alerts
        pa, pb = read_alerts(a.alerts_path), read_alerts(b.alerts_path)
        assert [x["candid"] for x in pa] == [x["candid"] for x in pb]
        assert [x["candidate"]["flux"] for x in pa] == [x["candidate"]["flux"] for x in pb]


@pytest.mark.parametrize("stage", ["align", "psf", "flux_ratio"])
def test_a_ccd_failing_mid_chain_leaves_the_batch_and_the_others_go_on(pairs, tmp_path, monkeypatch, stage):
    """CCD 0 fails inside the device half (alignment, PSF, flux ratio): its record names the
    stage's reason, and CCD 1 of the same batch gives the same candidates as alone (the batch's
    arrays and per-CCD lists stay in step when a row leaves)."""
    from nightsift.engine import pipeline
    from nightsift.engine.errors import AlgorithmFailure

    cfg = Config().replace(package={"output_dir": str(tmp_path)})
    statics = [prepare_statics(sim.reference, master, config=cfg, ccd=c) for c, (sim, master) in enumerate(pairs)]
    frames = [VisitFrame(9, c, raw=sim.science_raw) for c, (sim, _) in enumerate(pairs)]
    alone = process_visit(frames[1:], statics[1:], config=cfg, write=False)[0]
    first = {"seen": False}

    def once(real, fail):
        def wrapped(*a, **k):
            if not first["seen"]:
                first["seen"] = True
                return fail(real, *a, **k)
            return real(*a, **k)
        return wrapped

    def boom(*_a, **_k):
        raise AlgorithmFailure(f"injected {stage} failure", stage=stage)

    if stage == "align":
        monkeypatch.setattr(pipeline, "coarse_map", once(pipeline.coarse_map, lambda real, *a, **k: boom()))
    elif stage == "flux_ratio":
        monkeypatch.setattr(pipeline, "zero_point_flux_ratio",
                            once(pipeline.zero_point_flux_ratio, lambda real, *a, **k: boom()))
    else:
        real_psf = pipeline.measure_psf

        def psf_fails_first(*a, **k):
            res = real_psf(*a, **k)
            res.value[0] = AlgorithmFailure("injected psf failure", stage="psf")
            return res
        monkeypatch.setattr(pipeline, "measure_psf", psf_fails_first)
    res = process_visit(frames, statics, config=cfg, write=False)
    assert res[0].status == "failed" and f"injected {stage} failure" in str(res[0].error)
    assert res[1].status == "done"
    _same_candidates(res[1].candidates, alone.candidates)
